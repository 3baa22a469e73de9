"""GPU check of the "pycoll" torch backend (CUDA tensors staged through pinned host buffers):
2-rank DDP on CUDA with pycoll and with Gloo from the same start, parameters compared bit for
bit, step times compared; then all_reduce of CUDA tensors at a few sizes, pycoll against Gloo.

    python bench/gpu_ddp_check.py [--steps 30] [--sizes 4096,1048576,16777216,67108864]

Needs a CUDA build of torch and at least one GPU (both ranks share GPU 0 when there is one;
each has its own when there are two). Prints one table; exits 1 if the parameters differ.
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(1024, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 2048),
                               torch.nn.ReLU(), torch.nn.Linear(2048, 10))


def _rank(rank, world, backend, port, steps, sizes, out):
    import pycoll.torch  # noqa: F401 - registers "pycoll" (also done by torch's plugin autoload)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device("cuda", rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=world)
    model = torch.nn.parallel.DistributedDataParallel(_model().to(device), device_ids=[device.index])
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gen = torch.Generator(device="cpu").manual_seed(1000 + rank)
    times = []
    for _ in range(steps):
        x = torch.randn(256, 1024, generator=gen).to(device)
        y = torch.randint(0, 10, (256,), generator=gen).to(device)
        torch.cuda.synchronize()
        start = time.perf_counter()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    params = torch.cat([p.detach().reshape(-1).cpu() for p in model.parameters()])
    coll = {}
    for nbytes in sizes:
        t = torch.ones(nbytes // 4, device=device)
        for _ in range(2):
            dist.all_reduce(t)
        torch.cuda.synchronize()
        runs = []
        for _ in range(5):
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(t)
            torch.cuda.synchronize()
            runs.append(time.perf_counter() - start)
        coll[nbytes] = statistics.median(runs)
    check = torch.full((1000,), float(rank + 1), device=device)
    dist.all_reduce(check)
    ok = bool((check == sum(range(1, world + 1))).all())
    dist.destroy_process_group()
    if rank == 0:
        out.put((backend, params.numpy().tobytes(), statistics.median(times[3:]), coll, ok))


def _run(backend, steps, sizes):
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    from pycoll.testing import free_port
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, 2, backend, port, steps, sizes, out)) for r in range(2)]
    for p in procs:
        p.start()
    res = out.get(timeout=600)
    for p in procs:
        p.join(60)
        if p.exitcode != 0:
            raise SystemExit(f"{backend}: a rank exited with {p.exitcode}")
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--sizes", default="4096,1048576,16777216,67108864")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device (or a CPU build of torch): nothing to check")
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"torch {torch.__version__}, {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}, 2 ranks")
    gloo = _run("gloo", args.steps, sizes)
    mine = _run("pycoll", args.steps, sizes)
    same = gloo[1] == mine[1]
    print(f"DDP {args.steps} steps: parameters bit-identical to Gloo: {same}; "
          f"all_reduce result check: gloo {gloo[4]}, pycoll {mine[4]}")
    print(f"{'':>16} {'gloo ms':>10} {'pycoll ms':>10} {'gloo/pycoll':>12}")
    print(f"{'DDP step':>16} {gloo[2] * 1e3:10.2f} {mine[2] * 1e3:10.2f} {gloo[2] / mine[2]:12.2f}")
    for nbytes in sizes:
        g, m = gloo[3][nbytes], mine[3][nbytes]
        print(f"{'all_reduce ' + _size(nbytes):>16} {g * 1e3:10.2f} {m * 1e3:10.2f} {g / m:12.2f}")
    sys.exit(0 if same and gloo[4] and mine[4] else 1)


def _size(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n}{unit}"
        n //= 1024
    return f"{n}TiB"


if __name__ == "__main__":
    main()
