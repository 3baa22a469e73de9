"""Healing speed: ``sync_shared_state`` to one joiner from 1, 2 and 4 sources, on one host.

    python bench/heal.py                                  # 1,2,4 sources, 64M..4G (what fits), shm and tcp
    python bench/heal.py --sources 2 --sizes 256M,1G --transports shm --reps 5 --json out.json

Each configuration (transport, number of sources) is one group of sources + 1 processes on
loopback; every source holds the same state (``--tensors`` float32 tensors of equal size adding
up to the size), the last rank (the *joiner*) holds different bytes at a lower revision, so the
sync moves the whole state to it, striped over the sources. For every size the joiner is healed
``--reps`` times with the received bytes hash-checked (``verify=True``, the default) and as many
times without the check (``verify=False``), alternating, in the same run: the difference is what
the check costs. A figure is the median over the repetitions of the joiner's wall time for the
whole ``sync_shared_state`` call (hashing the state, the coordinator's round, the transfer and
the check, the agreement); GB/s = state bytes / that time. "first heal" is the first sync of each
size (checked; of the first size: the group's very first, on fresh connections), which is what a
joiner pays once. Next to it: the joiner's CPU time (user + sys,
all its threads) and the sources' together, and the joiner's phases (``SyncResult.phases``).
After the last repetition of each size the joiner's state is checked against the sources'
(``verify_parity``).

For scale: torchft reports healing 12 GB in 3-5 s on one host (2.4-4 GB/s). There is no Gloo
equivalent of healing (Gloo has no shared-state sync), so this bench compares pycoll
configurations only: transports, sources, with and without the check.

Memory: every process holds the whole state, so a size is run only where (sources + 1) x size
stays within ``--budget`` (default 12G); the rest are listed as skipped. The machine is shared:
the load average (``uptime``) is printed before and after.
"""
import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
from pycoll.benchmark import human_size, parse_size  # noqa: E402

SIZES = "64M,256M,1G,4G"
TORCHFT = (12e9, 3.0, 5.0)  # bytes, seconds (best, worst): torchft's published healing figure, one host


def make_state(nbytes, tensors, joiner):
    """``tensors`` float32 arrays adding up to ``nbytes`` (the last one takes the rest); the
    sources' bytes are a fixed pattern, the joiner's are zeros, written (its pages are there,
    as a model's that was built)."""
    state = {}
    count = nbytes // 4
    for i in range(tensors):
        lo, hi = count * i // tensors, count * (i + 1) // tensors
        a = np.empty(hi - lo, np.uint32)
        a.fill(0)
        if not joiner:
            a[:] = np.arange(lo, hi, dtype=np.uint32)
            a *= np.uint32(2654435761)
        state[f"t{i:03d}"] = a.view(np.float32)
    return state


def heal_rank(comm, sizes, reps, tensors):
    """Runs on every rank; the joiner (last rank) returns its samples, sources their CPU times."""
    import pycoll
    joiner = comm.rank == comm.world_size - 1
    out = {"joiner": joiner, "sizes": {}}
    for n in sizes:
        state = make_state(n, tensors, joiner)
        revision = 0 if joiner else 1
        rows = []
        for rep in range(2 * reps + 1):  # the first heal is reported on its own (a real joiner's)
            verify = rep % 2 == 1 if rep else True
            if joiner:
                for a in state.values():  # differ again from the majority: the whole state moves
                    a.view(np.uint8)[0] ^= 0xFF
            comm.barrier()
            c0, t0 = time.process_time(), time.perf_counter()
            res = comm.sync_shared_state(state, revision, verify=verify)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            rows.append({"first": rep == 0, "verify": verify, "wall": wall, "cpu": cpu, "phases": dict(res.phases),
                         "received": res.bytes_received, "sent": res.bytes_sent,
                         "sources": len({s for v in res.sources.values() for s in v})})
        report = comm.verify_parity(state, 1)
        if not report.ok:
            raise pycoll.ParityError(f"after healing {n} bytes the state differs: {report.differ}")
        out["sizes"][n] = rows
        del state
    return out


def run_config(transport, sources, sizes, reps, tensors, timeout):
    import pycoll.testing
    init = dict(transport=transport, timeout=timeout)
    return pycoll.testing.run(heal_rank, sources + 1, args=(sizes, reps, tensors), timeout=timeout,
                              init_kwargs=init)


def uptime():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def summarize(per_rank, n, verify):
    joiner = next(r for r in per_rank if r["joiner"])
    rows = [r for r in joiner["sizes"][n] if r["verify"] == verify and not r["first"]]
    src = [[r for r in p["sizes"][n] if r["verify"] == verify and not r["first"]]
           for p in per_rank if not p["joiner"]]
    first = next(r for r in joiner["sizes"][n] if r["first"])
    wall = float(np.median([r["wall"] for r in rows]))
    phases = {k: float(np.median([r["phases"].get(k, 0.0) for r in rows])) for k in rows[0]["phases"]}
    return {"wall": wall, "gbs": n / wall / 1e9, "cpu": float(np.median([r["cpu"] for r in rows])),
            "src_cpu": float(np.median(np.sum([[r["cpu"] for r in s] for s in src], axis=0))),
            "phases": phases, "walls": [r["wall"] for r in rows], "received": rows[0]["received"],
            "first": first["wall"],
            "from": rows[0]["sources"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sources", default="1,2,4")
    ap.add_argument("--sizes", default=SIZES)
    ap.add_argument("--transports", default="shm,tcp")
    ap.add_argument("--reps", type=int, default=3, help="repetitions per size, with and without the check each")
    ap.add_argument("--tensors", type=int, default=8, help="tensors the state is cut into")
    ap.add_argument("--budget", default="12G", help="most bytes of state all processes together may hold")
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--json", help="write all samples here")
    args = ap.parse_args()
    os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    budget = parse_size(args.budget)
    print(f"load average before: {uptime()} ({os.cpu_count()} CPUs)", flush=True)
    results, skipped, t_start = [], [], time.monotonic()
    for transport in args.transports.split(","):
        for sources in [int(s) for s in args.sources.split(",")]:
            fit = [n for n in sizes if (sources + 1) * n <= budget]
            skipped += [(transport, sources, n) for n in sizes if n not in fit]
            if not fit:
                continue
            t0 = time.monotonic()
            per_rank = run_config(transport, sources, fit, args.reps, args.tensors, args.timeout)
            print(f"# {transport}, {sources} source(s): {time.monotonic() - t0:.0f} s, load {uptime()}",
                  file=sys.stderr, flush=True)
            for n in fit:
                on, off = summarize(per_rank, n, True), summarize(per_rank, n, False)
                results.append({"transport": transport, "sources": sources, "bytes": n, "verify": on,
                                "no_verify": off})
    report(results, skipped, args)
    print(f"\nload average after: {uptime()}; total {time.monotonic() - t_start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f)


def report(results, skipped, args):
    lo, hi = TORCHFT[0] / TORCHFT[2] / 1e9, TORCHFT[0] / TORCHFT[1] / 1e9
    print(f"\n## healing one joiner: median of {args.reps} ({args.tensors} float32 tensors per state)\n")
    print("GB/s = state bytes / the joiner's whole sync_shared_state call. check: the received bytes "
          "hash-checked (default); no check: verify=False. CPU: user + sys, the joiner's / all sources' "
          f"together. torchft (published, one host): 12 GB in 3-5 s = {lo:.1f}-{hi:.1f} GB/s. No Gloo "
          "row: Gloo has no equivalent of healing.\n")
    print("| transport | sources | size | check: time (GB/s) | no check: time (GB/s) | check / no check | "
          "vs torchft | first heal (GB/s) | CPU joiner / sources (check) | joiner phases, check (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        on, off = r["verify"], r["no_verify"]
        ph = " ".join(f"{k} {v:.3f}" for k, v in on["phases"].items())
        print(f"| {r['transport']} | {r['sources']} | {human_size(r['bytes'])} | {on['wall']:.3f} s "
              f"({on['gbs']:.2f}) | {off['wall']:.3f} s ({off['gbs']:.2f}) | {on['gbs'] / off['gbs']:.2f} | "
              f"{on['gbs'] / hi:.2f}-{on['gbs'] / lo:.2f}x | "
              f"{on['first']:.3f} s ({r['bytes'] / on['first'] / 1e9:.2f}) | "
              f"{on['cpu']:.2f} / {on['src_cpu']:.2f} s | {ph} |")
    if skipped:
        print("\nskipped (over --budget " + args.budget + "): " +
              ", ".join(f"{t} {s} src {human_size(n)}" for t, s, n in skipped))


if __name__ == "__main__":
    main()
