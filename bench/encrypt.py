"""The cost of PYCOLL_ENCRYPT=1 on the data plane: all-reduce over TCP vs TLS 1.3, one run.

    python bench/encrypt.py                      # 2 ranks, 16 MiB, float32 sum
    python bench/encrypt.py --size 4M --reps 20 --rounds 3

Both runs force TCP (PYCOLL_TRANSPORT=tcp: on one host pycoll would use shared memory, which
encryption leaves alone) and share the group secret; only PYCOLL_ENCRYPT differs. Rounds
alternate plain and encrypted groups, so a busy host slows both alike; we report the median
of rank 0's timed calls (each after a barrier) over all rounds, and the ratio TLS / TCP.
Gloo (torch.distributed, TCP, unencrypted) runs in the same run when torch is installed.
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
import numpy as np  # noqa: E402

import pycoll.testing  # noqa: E402
from pycoll.benchmark import human_size, parse_size  # noqa: E402


def _pycoll_times(comm, nbytes, reps):
    x = np.ones(nbytes // 4, dtype=np.float32)
    flag = np.zeros(1, dtype=np.float32)
    for _ in range(2):  # warm-up: connections, buffers
        comm.all_reduce(x)
    out = []
    for _ in range(reps):
        comm.all_reduce(flag)  # barrier
        t = time.perf_counter()
        comm.all_reduce(x)
        out.append(time.perf_counter() - t)
    return out


def _gloo_times(nbytes, reps):
    import torch
    import torch.distributed as dist
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    for _ in range(2):
        dist.all_reduce(x)
    out = []
    for _ in range(reps):
        dist.barrier()
        t = time.perf_counter()
        dist.all_reduce(x)
        out.append(time.perf_counter() - t)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="16M")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args(argv)
    nbytes = parse_size(a.size)
    base = {"PYCOLL_SECRET": "bench-secret", "PYCOLL_TRANSPORT": "tcp", "TORCH_DEVICE_BACKEND_AUTOLOAD": "0"}
    times = {"tcp": [], "tls": [], "gloo": []}
    try:
        import torch.distributed  # noqa: F401
        have_gloo = True
    except ImportError:
        have_gloo = False
        print("gloo: skipped (torch is not installed)")
    for _ in range(a.rounds):
        for name, env in (("tcp", base), ("tls", dict(base, PYCOLL_ENCRYPT="1"))):
            times[name] += pycoll.testing.run(_pycoll_times, a.ranks, args=(nbytes, a.reps), timeout=600, env=env)[0]
        if have_gloo:
            times["gloo"] += pycoll.testing.run(_gloo_times, a.ranks, args=(nbytes, a.reps), timeout=600,
                                                init="torch:gloo", env=base)[0]
    med = {k: statistics.median(v) for k, v in times.items() if v}
    print(f"all_reduce float32 sum, {a.ranks} ranks, {human_size(nbytes)}, loopback TCP, "
          f"{a.rounds} rounds x {a.reps} calls, rank 0 medians")
    for k, v in med.items():
        print(f"  {k:5s} {v * 1e3:8.2f} ms   algbw {nbytes / v / 1e9:6.2f} GB/s")
    print(f"TLS / TCP time ratio: {med['tls'] / med['tcp']:.2f}x")
    if "gloo" in med:
        print(f"Gloo / TLS time ratio: {med['gloo'] / med['tls']:.2f}x  (Gloo / TCP {med['gloo'] / med['tcp']:.2f}x)")


if __name__ == "__main__":
    main()
