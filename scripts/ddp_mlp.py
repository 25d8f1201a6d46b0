#!/usr/bin/env python3
"""PyTorch DDP (gloo) on the MNIST-MLP shapes, one process per host: the peer lockstep's
multi-host runs are compared with (run by hand; PyTorch is not a dependency of lockstep).

Each process gets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT and LOCAL_ADDR (the address
of the interface gloo should use) from its environment, e.g. one per netns test host:

    ip netns exec ls1 env RANK=0 WORLD_SIZE=2 MASTER_ADDR=10.77.0.2 MASTER_PORT=29500 \\
        LOCAL_ADDR=10.77.0.2 python scripts/ddp_mlp.py --steps 100 &
    ip netns exec ls2 env RANK=1 ... LOCAL_ADDR=10.77.0.3 python scripts/ddp_mlp.py --steps 100

Model 784-512-512-10, AdamW, global batch 256, 1 thread a rank (as lockstep's workers).
Rank 0 prints `ddp: N examples/s`.
"""
import argparse
import os
import subprocess
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP


def interface_of(addr):
    """The name of the interface that holds `addr` (gloo binds by interface name)."""
    out = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        fields = line.split()
        if fields[3].split("/")[0] == addr:
            return fields[1]
    raise SystemExit(f"no interface holds {addr}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--global-batch", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=5)
    args = ap.parse_args()
    os.environ["GLOO_SOCKET_IFNAME"] = interface_of(os.environ["LOCAL_ADDR"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="env://")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = DDP(nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    batch = args.global_batch // world
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(batch * 16, 784, generator=g)
    y = torch.randint(0, 10, (batch * 16,), generator=g)

    def step(s):
        i = (s % 16) * batch
        loss = F.cross_entropy(model(x[i:i + batch]), y[i:i + batch])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for s in range(args.warmup):
        step(s)
    dist.barrier()
    t0 = time.perf_counter()
    for s in range(args.steps):
        step(s)
    dist.barrier()
    wall = time.perf_counter() - t0
    if rank == 0:
        print(f"ddp: {args.steps * args.global_batch / wall:.0f} examples/s "
              f"({world} ranks, global batch {args.global_batch}, {args.steps} steps, {wall:.1f} s)", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
