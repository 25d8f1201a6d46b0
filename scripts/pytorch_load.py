#!/usr/bin/env python3
"""Loads a lockstep model file into the equivalent PyTorch module with a strict
`load_state_dict`, then evaluates it in PyTorch: test accuracy for an MNIST-layout
classifier (compare with `lockstep eval`), loss on non-overlapping validation windows for
a language model. By hand, with PyTorch installed:

    python3 scripts/pytorch_load.py runs/mnist-cnn/model.safetensors
"""

import gzip
import math
import os
import sys
import tomllib

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(__file__))
from pytorch_reference import Gpt, Lstm, Mlp  # noqa: E402


class Sequential(nn.Module):
    """lockstep `kind = "sequential"` (images NHWC in lockstep, NCHW here): layer i is `l{i}`."""

    def __init__(self, layers, input_shape):
        super().__init__()
        h, w, c = input_shape
        self.input_shape, self.kinds = input_shape, []
        for i, l in enumerate(layers):
            t, m = l["type"], None
            k, s, p = l.get("kernel"), l.get("stride"), l.get("padding", 0)
            if t == "conv2d":
                m = nn.Conv2d(c, l["out_channels"], k, stride=s or 1, padding=p, groups=l.get("groups", 1))
                h, w, c = (h + 2 * p - k) // (s or 1) + 1, (w + 2 * p - k) // (s or 1) + 1, l["out_channels"]
            elif t == "conv_transpose2d":
                m = nn.ConvTranspose2d(c, l["out_channels"], k, stride=s or 1, padding=p)
                h, w, c = (h - 1) * (s or 1) - 2 * p + k, (w - 1) * (s or 1) - 2 * p + k, l["out_channels"]
            elif t in ("max_pool2d", "avg_pool2d"):
                h, w = (h + 2 * p - k) // (s or k) + 1, (w + 2 * p - k) // (s or k) + 1
            elif t == "linear":
                m = nn.Linear(c if h is None else h * w * c, l["out"])
                h, w, c = None, None, l["out"]
            elif t == "flatten":
                h, w, c = None, None, h * w * c
            if m is not None:
                setattr(self, f"l{i}", m)
            self.kinds.append((t, l))

    def forward(self, x):  # (N, H·W·C) rows as lockstep stores them
        h, w, c = self.input_shape
        x = x.view(-1, h, w, c).permute(0, 3, 1, 2)
        for i, (t, l) in enumerate(self.kinds):
            if t in ("conv2d", "conv_transpose2d", "linear"):
                x = getattr(self, f"l{i}")(x)
            elif t == "relu":
                x = F.relu(x)
            elif t == "max_pool2d":
                x = F.max_pool2d(x, l["kernel"], l.get("stride") or l["kernel"], l.get("padding", 0))
            elif t == "avg_pool2d":
                x = F.avg_pool2d(x, l["kernel"], l.get("stride") or l["kernel"], l.get("padding", 0))
            elif t == "flatten":
                x = x.permute(0, 2, 3, 1).flatten(1)  # lockstep flattens (H, W, C)
            elif t != "dropout":
                raise SystemExit(f"layer type {t} is not in this script")
        return x


def build(job, state):
    m = job["model"]
    if m["kind"] == "mlp":
        widths = [state["fc0.weight"].shape[1]]
        i = 0
        while f"fc{i}.weight" in state:
            widths.append(state[f"fc{i}.weight"].shape[0])
            i += 1
        return Mlp(widths)
    if m["kind"] == "sequential":
        return Sequential(m["layers"], m["input_shape"])
    vocab = state["tok_emb.weight"].shape[0]
    if m["kind"] == "gpt":
        return Gpt(vocab, m["context"], m["dim"], m["heads"], m["blocks"])
    return Lstm(vocab, m["dim"])


def idx(path):
    opener = gzip.open if os.path.exists(path + ".gz") else open
    with opener(path + ".gz" if opener is gzip.open else path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return torch.frombuffer(bytearray(data[4 + 4 * dims :]), dtype=torch.uint8).reshape(shape)


def eval_images(model, data_dir):
    train = idx(f"{data_dir}/train-images-idx3-ubyte").flatten(1).double()
    mean, std = train.mean(), train.std(unbiased=False)  # lockstep's z_score: one mean, one std
    x = ((idx(f"{data_dir}/t10k-images-idx3-ubyte").flatten(1).double() - mean) / std).float()
    y = idx(f"{data_dir}/t10k-labels-idx1-ubyte").long()
    with torch.no_grad():
        logits = model(x)
    loss = F.cross_entropy(logits, y).item()
    print(f"PyTorch on {data_dir} test split: accuracy {(logits.argmax(1) == y).float().mean().item():.4f}, loss {loss:.6f}")


def eval_text(model, job):
    """Loss over every validation target, as lockstep's tiled windows (the last one short)."""
    d = job["data"]
    text = open(os.path.join(d["dir"], d.get("file", "input.txt")), encoding="utf-8").read()
    if d.get("lowercase") or d.get("half_width"):
        raise SystemExit("data.lowercase / data.half_width are not in this script")
    index = {ch: i for i, ch in enumerate(sorted(set(text)))}  # lockstep's CharTokenizer
    tokens = torch.tensor([index[ch] for ch in text])
    val = tokens[round(len(tokens) * (1 - d.get("val_fraction", 0.1))) :]
    t, total = job["model"]["context"], 0.0
    with torch.no_grad():
        for start in range(0, len(val) - 1, 256 * t):
            chunk = val[start : min(start + 256 * t, len(val) - 1) + 1]
            n = (len(chunk) - 1) // t
            parts = [(chunk[: n * t].view(n, t), chunk[1 : n * t + 1].view(n, t))] if n else []
            if (len(chunk) - 1) % t:
                parts.append((chunk[n * t : -1].view(1, -1), chunk[n * t + 1 :].view(1, -1)))
            for x, y in parts:
                logits = model(x)
                total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum").item()
    loss = total / (len(val) - 1)
    print(f"PyTorch on the validation split ({len(val) - 1} targets): loss {loss:.6f}, perplexity {math.exp(loss):.4f}")


def main():
    path = sys.argv[1]
    with safe_open(path, "pt") as f:
        header = f.metadata()
    job = tomllib.loads(header["lockstep.job"])
    state = load_file(path)
    model = build(job, state).float().eval()
    model.load_state_dict(state)  # strict: every name and shape must match
    print(f"{path}: load_state_dict(strict=True) ok: {len(state)} tensors into {type(model).__name__}")
    if job["data"]["kind"] == "idx":
        eval_images(model, job["data"]["dir"])
    else:
        eval_text(model, job)


if __name__ == "__main__":
    main()
