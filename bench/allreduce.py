"""All-reduce on loopback: pycoll vs torch.distributed Gloo vs Open MPI, one run.

    python bench/allreduce.py                     # 2 and 4 ranks, 4 KiB .. 64 MiB
    python bench/allreduce.py --ranks 2 --sizes 4K,1M,16M --reps 5

For every implementation the same method: float32 sum, each iteration is a
barrier and then the timed all-reduce; we report rank 0's median.
busbw = bytes / time * 2(n-1)/n (nccl-tests). pycoll runs twice: by default
(the input survives a failed call, which costs one pass over the buffer) and
with preserve_input=False (Gloo's semantics: the buffer is undefined after a
failure); speedups compare the default against the others. The *ceiling* is pycoll's raw
ring stream (every rank sends 2(n-1)/n * bytes to its right neighbour while
receiving as much from the left, no reduction) measured in the same run:
what any ring all-reduce can reach over these sockets.
Open MPI runs over TCP only (``--mca btl tcp,self``) when mpirun and mpi4py
are installed; it is skipped with a printed reason otherwise.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
from pycoll.benchmark import collect_results, human_size, parse_size  # noqa: E402
from pycoll.testing import free_port  # noqa: E402

HERE = os.path.abspath(__file__)
DEFAULT_SIZES = "4K,64K,1M,16M,64M"






FIXED_REPS = None  # --reps (set by main, in the driver and in every worker)


def reps_for(nbytes, scale, reps=None):
    """Timed repetitions at one size: ``reps`` (or --reps) if given, else by size times ``scale``."""
    reps = reps if reps is not None else FIXED_REPS
    if reps:
        return int(reps)
    base = 200 if nbytes <= 64 << 10 else 40 if nbytes <= 1 << 20 else 10 if nbytes <= 16 << 20 else 5
    return max(3, int(base * scale))


# ---- workers (each runs in its own process) -----------------------------------
def _time_loop(allreduce, barrier, nbytes, reps):
    import numpy as np
    a = np.ones(nbytes // 4, dtype=np.float32)
    allreduce(a)  # warm up connections, plans, pages
    times = []
    for _ in range(reps):
        barrier()
        t = time.perf_counter()
        allreduce(a)
        times.append(time.perf_counter() - t)
    return float(np.median(times)), float(np.min(times))


def worker_pycoll(rank, n, port, sizes, scale):
    import pycoll
    comm = pycoll.init(rank=rank, world_size=n, master_addr="127.0.0.1", master_port=port, timeout=120)
    out = {}
    for nbytes in sizes:
        comm.preserve_input = False
        fast = _time_loop(lambda a: comm.all_reduce(a, algorithm="ring"), comm.barrier, nbytes,
                          reps_for(nbytes, scale))[0]
        comm.preserve_input = True
        med, best = _time_loop(lambda a: comm.all_reduce(a, algorithm="ring"), comm.barrier, nbytes,
                               reps_for(nbytes, scale))
        ceiling = None
        if nbytes >= 16 << 20:  # shorter streams are too brief to measure a rate
            streams = []
            for _ in range(3):
                comm.barrier()
                streams.append(comm.stream_ring(nbytes * 2 * (n - 1) // n))
            ceiling = sorted(streams)[1]
        out[nbytes] = (med, best, ceiling, fast)
    comm.close()
    return out


def worker_gloo(rank, n, port, sizes, scale):
    import torch
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=n)
    out = {}
    for nbytes in sizes:
        def allreduce(a):
            dist.all_reduce(torch.from_numpy(a))
        out[nbytes] = (*_time_loop(allreduce, dist.barrier, nbytes, reps_for(nbytes, scale)), None)
    dist.destroy_process_group()
    return out


def worker_mpi(sizes, scale):
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    out = {}
    for nbytes in sizes:
        def allreduce(a):
            comm.Allreduce(MPI.IN_PLACE, a, op=MPI.SUM)
        out[nbytes] = (*_time_loop(allreduce, comm.Barrier, nbytes, reps_for(nbytes, scale)), None)
    return comm.Get_rank(), out


# ---- driver -------------------------------------------------------------------
def launch(impl, n, sizes, scale, timeout, reps=None):
    """Run one implementation on n local processes; rank 0's results."""
    args = ["--sizes", ",".join(map(str, sizes)), "--scale", str(scale)] + (["--reps", str(reps)] if reps else [])
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if impl == "mpi":
        cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-n", str(n), "--mca", "btl", "tcp,self",
               "--mca", "btl_tcp_if_include", "lo", sys.executable, HERE, "--worker", "mpi"] + args
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)]
    else:
        port = free_port()
        procs = [subprocess.Popen([sys.executable, HERE, "--worker", impl, "--rank", str(r), "--n", str(n),
                                   "--port", str(port)] + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  env=env, text=True) for r in range(n)]
    for rank, data in collect_results(procs, timeout, f"{impl} with {n} ranks"):
        if rank == 0:
            return {int(k): v for k, v in data.items()}
    raise RuntimeError(f"{impl} with {n} ranks: rank 0 reported no result")


def busbw(nbytes, seconds, n):
    return nbytes / seconds * 2 * (n - 1) / n / 1e9 if seconds else 0.0


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", default="2,4", help="comma-separated world sizes (default 2,4)")
    ap.add_argument("--sizes", default=DEFAULT_SIZES, help=f"message sizes (default {DEFAULT_SIZES})")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply the repetition counts")
    ap.add_argument("--reps", type=int, default=None,
                    help="timed repetitions per size (default: 200 for small sizes down to 5 for large, times --scale)")
    ap.add_argument("--no-mpi", action="store_true", help="skip Open MPI")
    ap.add_argument("--no-gloo", action="store_true", help="skip Gloo")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--timeout", type=float, default=600)
    # worker mode
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    return ap


def main(argv=None):
    global FIXED_REPS
    args = build_parser().parse_args(argv)
    if args.reps is not None and args.reps < 1:
        print("bench/allreduce.py: --reps must be at least 1", file=sys.stderr)
        return 2
    FIXED_REPS = args.reps
    sizes = [parse_size(s) for s in args.sizes.split(",")]

    if args.worker == "mpi":
        rank, out = worker_mpi(sizes, args.scale)
        if rank == 0:  # mpirun merges the ranks' stdout
            print("RESULT " + json.dumps([rank, out]), flush=True)
        return 0
    if args.worker:
        fn = {"pycoll": worker_pycoll, "gloo": worker_gloo}[args.worker]
        out = fn(args.rank, args.n, args.port, sizes, args.scale)
        print("RESULT " + json.dumps([args.rank, out]), flush=True)
        return 0

    impls = ["pycoll"]
    if not args.no_gloo:
        try:
            import torch.distributed  # noqa: F401
            impls.append("gloo")
        except ImportError:
            print("# Gloo skipped: torch is not installed (pip install torch==2.13.0)")
    if not args.no_mpi:
        have_mpi = shutil.which("mpirun") is not None
        try:
            import mpi4py  # noqa: F401
        except ImportError:
            have_mpi = False
        if have_mpi:
            impls.append("mpi")
        else:
            print("# Open MPI skipped: needs mpirun (apt-get install openmpi-bin libopenmpi-dev) and mpi4py")
    all_results = {}
    for n in [int(x) for x in args.ranks.split(",")]:
        res = {impl: launch(impl, n, sizes, args.scale, args.timeout, args.reps) for impl in impls}
        all_results[n] = res
        print(f"\n## all-reduce, float32 sum, {n} ranks on loopback (median; busbw in GB/s)")
        head = "| size | pycoll | pycoll no-preserve | " + " | ".join(i for i in impls if i != "pycoll")
        head += " | pycoll busbw | no-preserve busbw | ceiling busbw | no-preserve % of ceiling | " + " | ".join(
            f"speedup vs {i}" for i in impls if i != "pycoll") + " |"
        print(head)
        print("|" + "---|" * (head.count("|") - 1))
        for nbytes in sizes:
            med = {i: res[i][nbytes][0] for i in impls}
            ceil_t = res["pycoll"][nbytes][2]
            pb = busbw(nbytes, med["pycoll"], n)
            fast = res["pycoll"][nbytes][3]
            fb = busbw(nbytes, fast, n)
            # the ceiling streamed 2(n-1)/n * nbytes per rank in ceil_t: same bus bytes as the all-reduce
            cb = (nbytes * 2 * (n - 1) / n) / ceil_t / 1e9 if ceil_t else 0.0
            row = f"| {human_size(nbytes)} | {fmt_t(med['pycoll'])} | {fmt_t(fast)} | "
            row += " | ".join(fmt_t(med[i]) for i in impls if i != "pycoll")
            row += f" | {pb:.2f} | {fb:.2f} | {cb:.2f} | " + (f"{100 * fb / cb:.0f}%" if cb else "-") + " | "
            row += " | ".join(f"{med[i] / med['pycoll']:.2f}x" for i in impls if i != "pycoll") + " |"
            print(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({str(k): v for k, v in all_results.items()}, f, indent=1)
    return 0


def fmt_t(seconds):
    return f"{seconds * 1e6:.0f} us" if seconds < 1e-3 else f"{seconds * 1e3:.2f} ms"


if __name__ == "__main__":
    sys.exit(main())
