"""Train a small model with DistributedDataParallel on the pycoll backend.

Only the backend name differs from a Gloo script:

    torchrun --nproc-per-node 2 examples/ddp_train.py
    pycoll run -n 2 examples/ddp_train.py
    pycoll run -n 2 examples/ddp_train.py --backend gloo      # the same job on Gloo
    pycoll run -n 4 examples/ddp_train.py --compress bf16     # bfloat16 gradients on the wire

Every rank prints its loss, its median step time and a hash of its parameters (equal on every
rank); ``--out DIR`` also saves each rank's parameters and step times to ``DIR/rank<r>.pt``.
"""
import argparse
import hashlib
import os
import statistics
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP


def make_model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))


def batch(step, rank, size=32):
    """This rank's data for a step: the same on every backend and launcher."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(size, 16, generator=g)
    return x, torch.sin(x.sum(dim=1, keepdim=True))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", default="pycoll", help="pycoll (default) or gloo")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--compress", choices=["none", "fp16", "bf16"], default="none",
                   help="send gradients as float16/bfloat16 (pycoll's DDP compression hook)")
    p.add_argument("--out", default=None, help="directory for rank<r>.pt (parameters, step times)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    if args.backend == "pycoll":
        import pycoll.torch  # noqa: F401 - registers "pycoll" (automatic when pycoll is installed)
    dist.init_process_group(args.backend)  # env://: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    rank = dist.get_rank()

    # A different seed per rank: DDP must broadcast rank 0's initial parameters.
    model = DDP(make_model(seed=100 + rank))
    if args.compress != "none":
        from pycoll.torch import compression_hook
        model.register_comm_hook(None, compression_hook(torch.float16 if args.compress == "fp16" else torch.bfloat16))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    losses, times = [], []
    for step in range(args.steps):
        x, y = batch(step, rank)
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()  # DDP all-reduces the gradients here
        opt.step()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())

    params = torch.cat([q.detach().reshape(-1) for q in model.parameters()])
    digest = hashlib.sha256(params.numpy().tobytes()).hexdigest()[:16]
    median_ms = 1000 * statistics.median(times[3:] or times)
    print(f"rank {rank}/{dist.get_world_size()} {args.backend}: loss {losses[0]:.4f} -> {losses[-1]:.4f}, "
          f"median step {median_ms:.2f} ms, params sha256 {digest}", flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        torch.save({"params": params, "losses": losses, "step_times": times, "backend": args.backend,
                    "world_size": dist.get_world_size()}, os.path.join(args.out, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
