"""Collectives in flight at once: pycoll one lane (in call order) vs pycoll on lanes vs Gloo, one run.

    python bench/overlap.py                          # 2 and 4 ranks, 2 and 4 buckets, burst and staggered
    python bench/overlap.py --ranks 2 --sizes 4 --reps 5 --burn 2

Each rank issues B async all_reduces of float32 tensors of S MiB each, then waits for all of them
(one "round"); the time of a round is the slowest rank's. Two ways of issuing them:

  burst      all B at once (a comm hook that launches every bucket together, FSDP's prefetch);
  staggered  as DDP does during backward: rank r computes (real matmuls, one torch thread) for
             --gap ms x (1 + r / (n - 1)) before each bucket, so the last rank computes twice as
             long as rank 0 and a fast rank's bucket waits on a peer still computing.

Implementations (each its own launch of n rank processes, all in this run, alternated per round of
launches so that drift hits all alike): ``pycoll`` (PYCOLL_TORCH_OVERLAP=1, today's default: one
collective at a time, in call order), ``pycoll-lK`` (K lanes, --lanes), ``gloo`` (torch's Gloo, 2
worker threads). The table gives median wall ms per round and CPU ms per round (user+sys of all
ranks, all threads), and the ratios seq/lanes (>1: the lanes are faster than one lane) and
gloo/impl (>1: pycoll faster than Gloo). --burn K runs K busy-loop processes meanwhile.
"""
import argparse
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.abspath(__file__)
sys.path.insert(0, os.path.dirname(HERE))
import train_step as _ts  # noqa: E402 - bench/ helpers: busy_loops, _killpg, ints, _sigterm

MODES = ("burst", "staggered")


# ---- rank side ------------------------------------------------------------------------------
def rank_main(a):
    signal.alarm(int(a.timeout) + 30)  # die on our own if the driver is gone or stuck
    sys.path.insert(0, ROOT)
    import datetime
    import resource

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    if a.backend == "pycoll":
        import pycoll.torch  # noqa: F401 - registers "pycoll" (the driver turns torch's autoload off)
        from pycoll.core import engine
    dist.init_process_group(a.backend, init_method=f"tcp://127.0.0.1:{a.port}", rank=a.rank,
                            world_size=a.n, timeout=datetime.timedelta(seconds=a.timeout))
    n, r = a.n, a.rank
    mm = torch.randn(96, 96)

    def compute(ms):
        end = time.perf_counter() + ms / 1e3
        while time.perf_counter() < end:
            mm @ mm

    def cpu():
        u = resource.getrusage(resource.RUSAGE_SELF)
        return u.ru_utime + u.ru_stime

    out = []
    for b in _ts.ints(a.buckets):
        for size in [float(s) for s in a.sizes.split(",")]:
            ts = [torch.full((int(size * 2**18),), float(r + 1)) for _ in range(b)]
            for mode in MODES:
                gap = a.gap * (1 + r / max(n - 1, 1))
                walls, cpus, peak = [], [], 0
                if a.backend == "pycoll":
                    engine.peak_running(reset=True)
                for i in range(a.warmup + a.reps):
                    for t in ts:
                        t.fill_(float(r + 1))
                    dist.barrier()
                    c, t0 = cpu(), time.perf_counter()
                    works = []
                    for t in ts:
                        if mode == "staggered":
                            compute(gap)
                        works.append(dist.all_reduce(t, async_op=True))
                    for w in works:
                        w.wait()
                    wall, used = time.perf_counter() - t0, cpu() - c
                    want = n * (n + 1) / 2
                    if any(float(t[0]) != want or float(t[-1]) != want for t in ts):
                        raise SystemExit(f"rank {r}: wrong result {[float(t[0]) for t in ts]}, want {want}")
                    if i >= a.warmup:
                        walls.append(wall)
                        cpus.append(used)
                if a.backend == "pycoll":
                    peak = engine.peak_running()
                out.append({"buckets": b, "mib": size, "mode": mode, "wall": walls, "cpu": cpus, "peak": peak})
    dist.barrier()
    dist.destroy_process_group()
    print("RESULT " + json.dumps(out), flush=True)
    os._exit(0)  # as bench/train_step.py: skip teardown (Gloo's rank 0 sometimes aborts there)


# ---- driver ---------------------------------------------------------------------------------
def launch(impl, n, a, tmp):
    backend = "gloo" if impl == "gloo" else "pycoll"
    lanes = "1" if impl in ("gloo", "pycoll") else impl.split("-l")[1]
    sys.path.insert(0, ROOT)  # the driver only: a rank imports pycoll only if it runs the pycoll backend
    from pycoll.testing import free_port
    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1", TORCH_DEVICE_BACKEND_AUTOLOAD="0", OMP_NUM_THREADS="1",
               PYCOLL_TORCH_OVERLAP=lanes)
    procs, files = [], []
    try:
        for r in range(n):
            out = open(os.path.join(tmp, f"{impl}-{n}-{r}.out"), "w+")
            err = open(os.path.join(tmp, f"{impl}-{n}-{r}.err"), "w+")
            files.append((out, err))
            cmd = [sys.executable, HERE, "--worker", backend, "--rank", str(r), "--n", str(n), "--port", str(port),
                   "--buckets", a.buckets, "--sizes", a.sizes, "--reps", str(a.reps), "--warmup", str(a.warmup),
                   "--gap", str(a.gap), "--timeout", str(a.timeout)]
            procs.append(subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env,
                                          start_new_session=True))
        deadline = time.monotonic() + a.timeout
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.returncode not in (None, 0) for p in procs):
                break
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                _ts._killpg(p)
    results = []
    for r, (p, (out, err)) in enumerate(zip(procs, files)):
        out.seek(0)
        err.seek(0)
        lines = [ln for ln in out.read().splitlines() if ln.startswith("RESULT ")]
        tail = err.read()[-1500:]
        if p.returncode != 0 or not lines:
            raise RuntimeError(f"{impl}, {n} ranks: rank {r} exit status {p.returncode}\n{tail}")
        results.append(json.loads(lines[-1][7:]))
    return results


def summarize(launches):
    """{(buckets, mib, mode): (median wall ms, CPU ms per round, peak plans at once)} over launches."""
    cells = {}
    for ranks in launches:
        for k, cell in enumerate(ranks[0]):
            key = (cell["buckets"], cell["mib"], cell["mode"])
            walls = [max(w) for w in zip(*(rk[k]["wall"] for rk in ranks))]
            cpus = [sum(c) for c in zip(*(rk[k]["cpu"] for rk in ranks))]
            acc = cells.setdefault(key, ([], [], 0))
            cells[key] = (acc[0] + walls, acc[1] + cpus, max(acc[2], max(rk[k]["peak"] for rk in ranks)))
    return {k: (1e3 * statistics.median(w), 1e3 * statistics.median(c), p) for k, (w, c, p) in cells.items()}


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", default="2,4", help="comma-separated world sizes (default 2,4)")
    ap.add_argument("--buckets", default="2,4", help="collectives in flight per round (default 2,4)")
    ap.add_argument("--sizes", default="1,8,32", help="MiB per tensor, comma list (default 1,8,32)")
    ap.add_argument("--lanes", default="2,4", help="lane counts of the pycoll-lK variants (default 2,4)")
    ap.add_argument("--gap", type=float, default=10.0, help="staggered: rank 0's compute ms before each bucket")
    ap.add_argument("--reps", type=int, default=10, help="timed rounds per cell and launch (default 10)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds per cell (default 2)")
    ap.add_argument("--rounds", type=int, default=1, help="launches per implementation, alternated (default 1)")
    ap.add_argument("--burn", type=int, default=0, help="busy-loop processes meanwhile (default 0)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per launch")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--worker", choices=("pycoll", "gloo"), help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    return ap


def main(argv=None):
    a = build_parser().parse_args(argv)
    if a.worker:
        a.backend = a.worker
        return rank_main(a)
    if importlib.util.find_spec("torch") is None:
        print("bench/overlap.py: needs torch", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _ts._sigterm)
    impls = ["pycoll"] + [f"pycoll-l{k}" for k in _ts.ints(a.lanes) if k > 1] + ["gloo"]
    print(f"# {a.reps} timed rounds per cell, {a.warmup} warm-up; staggered gap {a.gap} ms (rank 0) to "
          f"{2 * a.gap} ms (last rank); burn {a.burn}; {os.cpu_count()} CPUs", flush=True)
    table = {}
    with tempfile.TemporaryDirectory(prefix="ovl-bench-") as tmp:
        with _ts.busy_loops(a.burn):
            for n in _ts.ints(a.ranks):
                runs = {i: [] for i in impls}
                for k in range(a.rounds):
                    for impl in (impls if k % 2 == 0 else impls[::-1]):
                        print(f"# {n} ranks: {impl} launch {k + 1}/{a.rounds}", file=sys.stderr, flush=True)
                        runs[impl].append(launch(impl, n, a, tmp))
                table[n] = {i: summarize(runs[i]) for i in impls}
    lane_impls = impls[1:-1]
    head = ("| ranks | in flight | MiB each | mode | " + " | ".join(f"{i} ms" for i in impls)
            + " | " + " | ".join(f"seq/{i}" for i in lane_impls) + " | " + " | ".join(f"gloo/{i}" for i in impls[:-1])
            + " | " + " | ".join(f"{i} CPU ms" for i in impls) + " | peak at once |")
    print("\n## Async all_reduces in flight (medians per round; ratios >1: the second named is faster)")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    rows = []
    for n, by in table.items():
        for key in by["pycoll"]:
            b, size, mode = key
            wall = {i: by[i][key][0] for i in impls}
            cpu = {i: by[i][key][1] for i in impls}
            peaks = "/".join(str(by[i][key][2]) for i in impls[:-1])
            print(f"| {n} | {b} | {size:g} | {mode} | " + " | ".join(f"{wall[i]:.1f}" for i in impls)
                  + " | " + " | ".join(f"{wall['pycoll'] / wall[i]:.2f}x" for i in lane_impls)
                  + " | " + " | ".join(f"{wall['gloo'] / wall[i]:.2f}x" for i in impls[:-1])
                  + " | " + " | ".join(f"{cpu[i]:.0f}" for i in impls) + f" | {peaks} |")
            rows.append({"ranks": n, "buckets": b, "mib": size, "mode": mode, "wall_ms": wall, "cpu_ms": cpu})
    print("\npeak at once: the most plans the engine ran at once in one rank (pycoll impls, in column order).")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(a).items() if k not in ("worker", "rank", "n", "port")},
                       "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("bench/overlap.py: interrupted", file=sys.stderr)
        sys.exit(130)
