"""The new collectives through torch.distributed: pycoll's process group vs Gloo, one run.

    python bench/torch_ops.py                         # 2 and 4 ranks, 4 KiB .. 64 MiB
    python bench/torch_ops.py --ranks 2 --sizes 4K,1M --ops reduce,pingpong --reps 5
    python bench/torch_ops.py --burn 2                # loaded: two busy loops beside the ranks

Both backends run in the same processes, call by call: the default group is Gloo and a second
group over the same ranks is pycoll (``dist.new_group(backend="pycoll")``), and every call goes
through ``torch.distributed`` (what a user of either backend pays). Sizes are bytes per rank:
all_to_all_single of that many bytes per rank (equal splits), reduce of that many bytes to rank 0
(float32 sum), gather of that many bytes from every rank to rank 0, scatter of that many bytes to
every rank from rank 0, coalesced: all_reduce_coalesced of that many bytes in 8 tensors of unequal
sizes (float32 sum), all_gather: of that many bytes per rank into a list of separate tensors.
Each repetition times one call of each backend (which goes first
alternates), each after a barrier of its own group: on a shared host whose load changes by the
second, both see the same moments (timing all of one backend's repetitions and then the other's
gave one cell ratios from 0.33 to 2.13 in runs minutes apart). A collective's time is the slowest
rank's median. Python's one full garbage collection of torch's import-time objects is done
before timing (gc.freeze), so that it lands in no cell. pingpong: rank 0 sends to rank 1, which
sends back (the other ranks idle); latency = half the median round trip, bandwidth = bytes /
that. ratio = Gloo's time / pycoll's (above 1: pycoll is faster). ``--burn K`` runs K busy-loop
processes (bench/train_step.py's) for the whole run, as a training host's data loaders load it.
"""
import argparse
import functools
import gc
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
from pycoll.benchmark import collect_results, human_size, parse_size  # noqa: E402
from pycoll.testing import free_port  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_step  # noqa: E402 - bench/ helpers: busy_loops

HERE = os.path.abspath(__file__)
DEFAULT_SIZES = "4K,64K,1M,16M,64M"
OPS = ("all_to_all", "reduce", "gather", "scatter", "pingpong", "coalesced", "all_gather", "reduce_scatter",
       "all_gather_into")


def reps_for(nbytes, fixed=None):
    if fixed:
        return fixed
    # (on a shared host a median of 4 large calls moved by 2x from run to run)
    return 100 if nbytes <= 64 << 10 else 30 if nbytes <= 1 << 20 else 12 if nbytes <= 16 << 20 else 8


# ---- worker (one per rank) ----------------------------------------------------------------
def _timed(calls, barriers, reps):
    """Median time of each of ``calls`` (name -> function), repetitions interleaved."""
    names = list(calls)
    for name in names:
        calls[name]()  # warm up: connections, plans, pages
    times = {name: [] for name in names}
    for i in range(reps):
        for name in (names if i % 2 == 0 else names[::-1]):
            barriers[name]()
            t = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - t)
    return {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}


def _call(op, group, nbytes, rank, n):
    """A function that runs ``op`` once on ``group`` with buffers made here."""
    import torch
    import torch.distributed as dist
    count = max(1, nbytes // 4)
    if op == "all_to_all":
        count -= count % n
        x, y = torch.ones(count), torch.empty(count)
        return lambda: dist.all_to_all_single(y, x, group=group)
    if op == "reduce":
        x = torch.ones(count)
        return lambda: dist.reduce(x, dst=0, group=group)
    if op == "gather":
        x = torch.ones(count)
        outs = list(torch.empty(n * count).chunk(n)) if rank == 0 else None
        return lambda: dist.gather(x, outs, dst=0, group=group)
    if op == "scatter":
        y = torch.empty(count)
        ins = list(torch.ones(n * count).chunk(n)) if rank == 0 else None
        return lambda: dist.scatter(y, ins, src=0, group=group)
    if op == "pingpong":
        x = torch.ones(count)
        if rank == 0:
            return lambda: (dist.send(x, 1, group=group), dist.recv(x, 1, group=group))
        if rank == 1:
            return lambda: (dist.recv(x, 0, group=group), dist.send(x, 0, group=group))
        return lambda: None
    if op == "all_gather":
        x = torch.ones(count)
        outs = [torch.empty(count) for _ in range(n)]
        return lambda: dist.all_gather(outs, x, group=group)
    if op == "reduce_scatter":  # FSDP's gradient path: bytes per rank in, 1/n of them out
        count -= count % n
        x, y = torch.ones(count), torch.empty(count // n)
        return lambda: dist.reduce_scatter_tensor(y, x, group=group)
    if op == "all_gather_into":  # FSDP's parameter path: one flat output of n blocks
        x, y = torch.ones(count), torch.empty(n * count)
        return lambda: dist.all_gather_into_tensor(y, x, group=group)
    if op == "coalesced":
        cuts = [count * k // 36 for k in (0, 1, 3, 6, 10, 15, 21, 28, 36)]  # 8 tensors, sizes 1 : 2 : ... : 8
        xs = [torch.ones(b - a) for a, b in zip(cuts, cuts[1:])]
        return lambda: dist.all_reduce_coalesced(xs, group=group)
    raise ValueError(op)


def worker(rank, n, port, sizes, ops, reps):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist
    import pycoll.torch.backend  # noqa: F401 - registers "pycoll" (plugin autoload is off here)
    dist.init_process_group("gloo", rank=rank, world_size=n)
    groups = {"gloo": dist.group.WORLD, "pycoll": dist.new_group(backend="pycoll")}
    barriers = {impl: functools.partial(dist.barrier, group=g) for impl, g in groups.items()}
    gc.collect()
    gc.freeze()
    out = {}
    for op in ops:
        for nbytes in sizes:
            calls = {impl: _call(op, g, nbytes, rank, n) for impl, g in groups.items()}
            for impl, med in _timed(calls, barriers, reps_for(nbytes, reps)).items():
                out[f"{op} {nbytes} {impl}"] = med
            del calls  # this size's buffers
    dist.barrier()
    dist.destroy_process_group(groups["pycoll"])
    dist.destroy_process_group()
    return out


# ---- driver -------------------------------------------------------------------------------
def launch(n, sizes, ops, reps, timeout):
    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1", TORCH_DEVICE_BACKEND_AUTOLOAD="0")
    args = ["--sizes", ",".join(map(str, sizes)), "--ops", ",".join(ops)] + (["--reps", str(reps)] if reps else [])
    procs = [subprocess.Popen([sys.executable, HERE, "--worker", "--rank", str(r), "--n", str(n), "--port", str(port)]
                              + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
             for r in range(n)]
    return dict(collect_results(procs, timeout, f"{n} ranks", need=n))  # [rank, data] pairs


def table(n, sizes, ops, results):
    lines = [f"\n{n} ranks (medians; ratio = Gloo / pycoll, above 1: pycoll is faster)",
             f"{'op':<12}{'size':>8}{'pycoll':>12}{'Gloo':>12}{'ratio':>8}   note"]
    rows = []
    for op in ops:
        for nbytes in sizes:
            if op == "pingpong":  # rank 0's round trip
                mine, theirs = (results[0][f"{op} {nbytes} {impl}"] / 2 for impl in ("pycoll", "gloo"))
                note = (f"latency {mine * 1e6:.1f} / {theirs * 1e6:.1f} us" if nbytes <= 64 << 10 else
                        f"bandwidth {nbytes / mine / 1e9:.2f} / {nbytes / theirs / 1e9:.2f} GB/s")
            else:  # the slowest rank
                mine, theirs = (max(results[r][f"{op} {nbytes} {impl}"] for r in results) for impl in ("pycoll", "gloo"))
                note = ""
            ratio = theirs / mine if mine else float("inf")
            rows.append({"n": n, "op": op, "bytes": nbytes, "pycoll_s": mine, "gloo_s": theirs, "ratio": ratio})
            lines.append(f"{op:<12}{human_size(nbytes):>8}{_t(mine):>12}{_t(theirs):>12}{ratio:>8.2f}   {note}")
    return "\n".join(lines), rows


def _t(s):
    return f"{s * 1e6:.0f} us" if s < 1e-3 else f"{s * 1e3:.2f} ms"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", default="2,4")
    ap.add_argument("--sizes", default=DEFAULT_SIZES)
    ap.add_argument("--ops", default=",".join(OPS))
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per cell (default: by size)")
    ap.add_argument("--burn", type=int, default=0, help="busy-loop processes beside the ranks (loaded host)")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    ops = [o for o in args.ops.split(",") if o]
    bad = [o for o in ops if o not in OPS]
    if bad:
        ap.error(f"unknown ops {bad}; choose from {', '.join(OPS)}")
    if args.worker:
        out = worker(args.rank, args.n, args.port, sizes, ops, args.reps)
        print("RESULT " + json.dumps([args.rank, out]), flush=True)
        return 0
    all_rows = []
    ranks = [int(x) for x in args.ranks.split(",")]
    if min(ranks) < 2:
        ap.error("--ranks: world sizes of 2 or more")
    print(f"load average before: {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs; "
          f"busy loops beside the ranks: {args.burn}", flush=True)
    with train_step.busy_loops(args.burn):
        for n in ranks:
            results = launch(n, sizes, ops, args.reps, args.timeout)
            text, rows = table(n, sizes, ops, {int(k): v for k, v in results.items()})
            print(text, flush=True)
            all_rows += rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump(all_rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
