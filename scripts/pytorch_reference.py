#!/usr/bin/env python3
"""Writes worker/tests/fixtures/pytorch_reference.safetensors: PyTorch's numbers for small
versions of lockstep's four model families (MLP, CNN, 2-block GPT, LSTM), in the manner of
llm.c's test_gpt2.c. For each model: the weights (PyTorch's layout, the names lockstep
uses), the inputs and targets, the logits, the loss, every parameter gradient, the weights
after one AdamW step, and the losses of three AdamW steps. The Rust test
(worker/tests/pytorch_reference.rs) loads the same weights into lockstep's model, built
from the job stored in the header, and checks forward, backward and the optimizer.

The modules below are the PyTorch equivalents of lockstep's models: a lockstep
model.safetensors loads into them with `load_state_dict` (see README, "PyTorch").

Run once, by hand, with PyTorch and safetensors installed (not in CI):
    python3 scripts/pytorch_reference.py [OUT.safetensors]
The reference is computed in float64 (weights drawn in float32), stored as float32.
"""

import json
import math
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

LR, BETAS, EPS, WEIGHT_DECAY = 0.01, (0.9, 0.99), 1e-8, 0.1
OPTIM = f"[optim]\nkind = 'adamw'\nlr = {LR}\nbeta1 = {BETAS[0]}\nbeta2 = {BETAS[1]}\neps = {EPS}\nweight_decay = {WEIGHT_DECAY}\n"


class Mlp(nn.Module):
    """lockstep `kind = "mlp"`: fc0 → relu → fc1 → relu → fc2."""

    def __init__(self, widths):
        super().__init__()
        for i, (a, b) in enumerate(zip(widths, widths[1:])):
            setattr(self, f"fc{i}", nn.Linear(a, b))
        self.n = len(widths) - 1

    def forward(self, x):
        for i in range(self.n):
            x = getattr(self, f"fc{i}")(x)
            x = F.relu(x) if i + 1 < self.n else x
        return x


class Cnn(nn.Module):
    """lockstep `kind = "sequential"` with the layers of CNN_JOB. lockstep keeps images
    NHWC, so its flatten is over (H, W, C): the permute before flatten is what makes the
    Linear after it take lockstep's weights as they are."""

    def __init__(self):
        super().__init__()
        self.l0 = nn.Conv2d(2, 4, 3, padding=1)
        self.l3 = nn.ConvTranspose2d(4, 3, 2, stride=2)
        self.l5 = nn.Conv2d(3, 5, 3, stride=2, padding=1)
        self.l7 = nn.Linear(4 * 4 * 5, 10)

    def forward(self, x):  # x (N, C, H, W)
        x = F.max_pool2d(F.relu(self.l0(x)), 2)
        x = self.l5(F.relu(self.l3(x)))
        return self.l7(x.permute(0, 2, 3, 1).flatten(1))


class Attention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x):  # (B, T, C)
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    """Pre-LN transformer block; GELU with the tanh approximation."""

    def __init__(self, d, heads):
        super().__init__()
        self.ln1, self.attn, self.ln2 = nn.LayerNorm(d), Attention(d, heads), nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x)), approximate="tanh"))


class Gpt(nn.Module):
    """lockstep `kind = "gpt"`, learned positions, pre-LN: tok_emb + pos_emb → h0.. → ln_f → head."""

    def __init__(self, vocab, context, d, heads, blocks):
        super().__init__()
        self.tok_emb, self.pos_emb = nn.Embedding(vocab, d), nn.Embedding(context, d)
        for i in range(blocks):
            setattr(self, f"h{i}", Block(d, heads))
        self.blocks = blocks
        self.ln_f, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, ids):  # (B, T)
        x = self.tok_emb(ids) + self.pos_emb(torch.arange(ids.shape[1]))
        for i in range(self.blocks):
            x = getattr(self, f"h{i}")(x)
        return self.head(self.ln_f(x))


class Lstm(nn.Module):
    """lockstep `kind = "rnn"`, `cell = "lstm"`: tok_emb → rnn0 (an LSTM cell, gates i f g o) → head."""

    def __init__(self, vocab, d):
        super().__init__()
        self.tok_emb, self.rnn0, self.head = nn.Embedding(vocab, d), nn.LSTMCell(d, d), nn.Linear(d, vocab)

    def forward(self, ids):  # (B, T)
        x = self.tok_emb(ids)
        h = c = torch.zeros(ids.shape[0], self.rnn0.hidden_size, dtype=x.dtype)
        outs = []
        for t in range(ids.shape[1]):
            h, c = self.rnn0(x[:, t], (h, c))
            outs.append(h)
        return self.head(torch.stack(outs, dim=1))


def job(name, model, data):
    return f"name = '{name}'\nseed = 1\n[model]\n{model}\n[data]\n{data}\n[train]\nepochs = 1\nbatch_size = 4\n{OPTIM}"


MLP_JOB = job("mlp", "kind = 'mlp'\nhidden = [16, 8]\nactivation = 'relu'", "kind = 'idx'\ndir = '.'")
CNN_JOB = job(
    "cnn",
    "kind = 'sequential'\ninput_shape = [8, 8, 2]\nlayers = [\n"
    "  { type = 'conv2d', out_channels = 4, kernel = 3, padding = 1 },\n  { type = 'relu' },\n"
    "  { type = 'max_pool2d', kernel = 2 },\n  { type = 'conv_transpose2d', out_channels = 3, kernel = 2, stride = 2 },\n"
    "  { type = 'relu' },\n  { type = 'conv2d', out_channels = 5, kernel = 3, stride = 2, padding = 1 },\n"
    "  { type = 'flatten' },\n  { type = 'linear', out = 10 },\n]",
    "kind = 'idx'\ndir = '.'",
)
GPT_JOB = job(
    "gpt",
    "kind = 'gpt'\ncontext = 8\ndim = 16\nheads = 2\nblocks = 2\nnorm_order = 'pre_ln'\npositional = 'learned'",
    "kind = 'text'\ndir = '.'",
)
LSTM_JOB = job("lstm", "kind = 'rnn'\ncell = 'lstm'\ncontext = 6\ndim = 8\nblocks = 1", "kind = 'text'\ndir = '.'")


def decays(name, p):
    """lockstep decays the weights of Linear, convolution and recurrent layers, not biases,
    norms or embeddings."""
    return p.dim() >= 2 and not name.startswith(("tok_emb", "pos_emb"))


def reference(key, model, x, y, out):
    """Adds `key.*` tensors to `out`: weights, input, targets, logits, loss, gradients,
    weights after one AdamW step and the losses of three steps."""
    model = model.double()
    out[f"{key}.x"] = x.float()
    out[f"{key}.y"] = y.float()
    for name, p in model.named_parameters():
        out[f"{key}.param.{name}"] = p.detach().float().clone()
    groups = [
        {"params": [p for n, p in model.named_parameters() if decays(n, p)], "weight_decay": WEIGHT_DECAY},
        {"params": [p for n, p in model.named_parameters() if not decays(n, p)], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS)
    losses = []
    xin = x.double() if x.is_floating_point() else x
    for step in range(3):
        logits = model(xin)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        if step == 0:
            out[f"{key}.logits"] = logits.detach().float()
            out[f"{key}.loss"] = loss.detach().float().reshape(1)
            for name, p in model.named_parameters():
                out[f"{key}.grad.{name}"] = p.grad.float().clone()
        opt.step()
        if step == 0:
            for name, p in model.named_parameters():
                out[f"{key}.after.{name}"] = p.detach().float().clone()
        losses.append(loss.item())
    out[f"{key}.losses"] = torch.tensor(losses, dtype=torch.float32)
    print(f"{key}: loss {losses[0]:.6f}, after 3 steps {losses[-1]:.6f}")


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else "worker/tests/fixtures/pytorch_reference.safetensors"
    torch.manual_seed(0)
    out = {}
    reference("mlp", Mlp([12, 16, 8, 5]), torch.randn(4, 12), torch.randint(0, 5, (4,)), out)
    images = torch.randn(4, 2, 8, 8)  # NCHW for PyTorch
    cnn = Cnn()
    reference("cnn", cnn, images, torch.randint(0, 10, (4,)), out)
    out["cnn.x"] = images.permute(0, 2, 3, 1).contiguous()  # lockstep reads NHWC
    reference("gpt", Gpt(11, 8, 16, 2, 2), torch.randint(0, 11, (3, 8)), torch.randint(0, 11, (3, 8)), out)
    reference("lstm", Lstm(7, 8), torch.randint(0, 7, (2, 6)), torch.randint(0, 7, (2, 6)), out)
    metadata = {"jobs": json.dumps({"mlp": MLP_JOB, "cnn": CNN_JOB, "gpt": GPT_JOB, "lstm": LSTM_JOB})}
    metadata["made_by"] = f"scripts/pytorch_reference.py, torch {torch.__version__}"
    save_file({k: v.contiguous() for k, v in out.items()}, path, metadata=metadata)
    print(f"wrote {path}: {len(out)} tensors, lr {LR}, betas {BETAS}, eps {EPS}, weight decay {WEIGHT_DECAY}")
    assert math.isfinite(sum(v.abs().sum().item() for v in out.values()))


if __name__ == "__main__":
    main()
