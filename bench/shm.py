"""All-reduce on one host: pycoll over shared memory vs pycoll over TCP vs
torch's Gloo vs Open MPI (its default transport on one host: shared memory).

    python bench/shm.py                      # 2 and 4 ranks, 4 KiB .. 64 MiB, a few minutes
    python bench/shm.py --ranks 2 --sizes 4K,1M,16M --rounds 5 --json out.json
    python bench/shm.py --ranks 2,4 --sizes 4K,1M,16M --impls pycoll-shm,pycoll-tcp,gloo --burn 2

Every implementation runs the same loop on float32 arrays, in place: barrier,
then time one all-reduce; each iteration's time is the slowest rank's, and a
figure is the median over the iterations of all rounds. "(engine)" is the
time pycoll's C engine itself took (the rest is its Python layer). Rounds alternate the
implementations so that a noisy neighbour hits all of them alike. busbw =
bytes x 2(n-1)/n / time (the nccl-tests convention).

"pycoll-shm" and "pycoll-tcp" use pycoll's defaults, which keep the input
intact if a collective fails (preserve_input=True: results go through
scratch and are copied out at the end). Open MPI and Gloo make no such
promise; "pycoll-shm-np" (preserve_input=False) is the like-for-like row.
"pycoll-shm-np-ring" (not run unless named in --impls) also turns single
copy off, to show what it gains on large buffers.

A second table gives the CPU time (user + sys, all threads) the ranks
spent inside each call, summed over the ranks (median over iterations):
what the collective took from anything else that wants the cores. A third
table runs as many calls again back to back after one barrier and gives
the mean per call: a barrier before each timed call lines the ranks up
(all of them on a CPU when the call starts), which on a loaded host hides
what a training loop pays to get its peers scheduled.
`--burn K` runs K busy-loop processes (`while True: pass`, normal
priority) during the whole measurement, like a training host whose cores
are busy with compute and data loaders; they are killed however the run
ends.
Open MPI runs under mpirun (needs mpi4py), Gloo under torch.distributed;
either is skipped with a note when missing.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
from pycoll.benchmark import human_size, parse_size  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SIZES = "4K,16K,64K,256K,1M,4M,16M,64M"
IMPLS = ["pycoll-shm", "pycoll-shm-np", "pycoll-tcp", "gloo", "mpi"]
QUIET_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}




def iterations(nbytes, scale):
    """Fewer iterations for bigger messages: about 64 MiB x 8 moved per size."""
    return max(5, min(300, int(scale * (512 << 20) // max(nbytes, 4096) // 8)))


def timed_loop(sizes, scale, barrier, allreduce, make, after=None):
    """This rank's samples: {"wall": {size: [seconds per iteration]}, "cpu":
    {size: [CPU seconds per iteration]}, "loop": {size: [seconds, CPU seconds]}}.
    An iteration is a barrier, then one timed call; CPU is user + sys of all
    this process's threads. "loop" is the mean per call of as many calls
    again (at least 1000 up to 64 KiB, so that the loop spans many scheduler
    time slices), back to back after one barrier (what a training loop sees:
    no barrier lines the ranks up before each call). ``after(x)`` runs after
    each timed iteration, outside the timing."""
    out = {"wall": {}, "cpu": {}, "loop": {}}
    for n in sizes:
        x = make(n)
        for _ in range(3 if n < (16 << 20) else 1):
            allreduce(x)
        ts, cs = [], []
        reps = iterations(n, scale)
        for _ in range(reps):
            barrier()
            c0 = time.process_time()
            t0 = time.perf_counter()
            allreduce(x)
            t1 = time.perf_counter()
            cs.append(time.process_time() - c0)
            ts.append(t1 - t0)
            if after is not None:
                after(x)
        calls = max(reps, 1000) if n <= (64 << 10) else reps
        barrier()
        c0 = time.process_time()
        t0 = time.perf_counter()
        for _ in range(calls):
            allreduce(x)
        out["loop"][n] = [(time.perf_counter() - t0) / calls, (time.process_time() - c0) / calls]
        out["wall"][n], out["cpu"][n] = ts, cs
    return out


def burners(k):
    """Start k busy-loop processes at normal priority; returns them (see stop_burners)."""
    procs = []
    try:
        for _ in range(k):
            procs.append(subprocess.Popen([sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL))
    except BaseException:
        stop_burners(procs)
        raise
    return procs


def stop_burners(procs):
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        p.wait()


# ---- the implementations (each runs on every rank) -------------------------
def pycoll_rank(comm, sizes, scale):
    """Wall times, plus the C engine's own time per all-reduce (comm.stats):
    the difference is the Python layer."""
    engine = {}

    def note(x):
        engine.setdefault(x.nbytes, []).append(comm.stats[-1].seconds)
    out = timed_loop(sizes, scale, comm.barrier, comm.all_reduce, lambda n: np.ones(n // 4, np.float32), note)
    out["engine"] = {n: engine[n][-len(out["wall"][n]):] for n in sizes}
    return out


def run_pycoll(world, sizes, scale, transport, preserve, **options):
    sys.path.insert(0, ROOT)
    import pycoll.testing
    res = pycoll.testing.run(pycoll_rank, world, args=(sizes, scale), timeout=900,
                             init_kwargs=dict(options, transport=transport, preserve_input=preserve, timeout=300))
    return res


def gloo_rank(rank, world, port, sizes, scale, conn):
    os.environ.update(QUIET_ENV)
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        res = timed_loop(sizes, scale, dist.barrier, dist.all_reduce,
                         lambda n: torch.ones(n // 4, dtype=torch.float32))
    finally:
        dist.destroy_process_group()
    conn.send(res)


def run_gloo(world, sizes, scale):
    import multiprocessing as mp
    sys.path.insert(0, ROOT)
    from pycoll.testing import free_port
    ctx = mp.get_context("spawn")
    port = free_port()
    procs, pipes = [], []
    for r in range(world):
        parent, child = ctx.Pipe(duplex=False)
        p = ctx.Process(target=gloo_rank, args=(r, world, port, sizes, scale, child))
        p.start()
        child.close()
        procs.append(p)
        pipes.append(parent)
    try:
        return [pp.recv() for pp in pipes]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


def mpi_worker(sizes, scale):
    from mpi4py import MPI
    comm = MPI.COMM_WORLD

    def allreduce(x):
        comm.Allreduce(MPI.IN_PLACE, x)
    res = timed_loop(sizes, scale, comm.Barrier, allreduce, lambda n: np.ones(n // 4, np.float32))
    everyone = comm.gather(res, root=0)
    if comm.rank == 0:
        print("MPI-RESULT " + json.dumps(everyone), flush=True)


def run_mpi(world, sizes, scale):
    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-n", str(world), sys.executable,
           os.path.abspath(__file__), "--mpi-worker", "--sizes", ",".join(map(str, sizes)), "--scale", str(scale)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=dict(os.environ, **QUIET_ENV))
    for line in out.stdout.splitlines():
        if line.startswith("MPI-RESULT "):
            return [{part: {int(k): v for k, v in d.items()} for part, d in r.items()}
                    for r in json.loads(line[len("MPI-RESULT "):])]
    raise RuntimeError(f"mpirun failed ({out.returncode}): {out.stderr[-2000:]}")


def available(impl):
    if impl == "gloo":
        try:
            import torch.distributed as dist
            return dist.is_available()
        except ImportError:
            return False
    if impl == "mpi":
        try:
            import mpi4py  # noqa: F401
        except ImportError:
            return False
        return shutil.which("mpirun") is not None
    return True


def run_impl(impl, world, sizes, scale):
    if impl == "pycoll-shm":
        return run_pycoll(world, sizes, scale, "shm", True)
    if impl == "pycoll-shm-np":
        return run_pycoll(world, sizes, scale, "shm", False)
    if impl == "pycoll-shm-np-ring":  # single copy off: every byte through the rings
        return run_pycoll(world, sizes, scale, "shm", False, single_copy=0)
    if impl == "pycoll-tcp":
        return run_pycoll(world, sizes, scale, "tcp", True)
    if impl == "gloo":
        return run_gloo(world, sizes, scale)
    return run_mpi(world, sizes, scale)


# ---- driver ----------------------------------------------------------------
def wait_quiet(limit, idle=0.9):
    """Wait up to `limit` s for a second in which the CPUs are >= `idle` idle."""
    def snap():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]
    end = time.monotonic() + limit
    while time.monotonic() < end:
        t0, i0 = snap()
        time.sleep(1.0)
        t1, i1 = snap()
        if t1 > t0 and (i1 - i0) / (t1 - t0) >= idle:
            return True
    return False


def fmt_time(s):
    return f"{s * 1e6:.1f} us" if s < 1e-3 else f"{s * 1e3:.2f} ms"




def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", default="2,4")
    ap.add_argument("--sizes", default=SIZES)
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--scale", type=float, default=1.0, help="multiplies the iteration counts")
    ap.add_argument("--wait-quiet", type=float, default=0.0,
                    help="before each run wait up to this many seconds for an idle machine")
    ap.add_argument("--idle", type=float, default=0.9, help="what idle means for --wait-quiet (fraction)")
    ap.add_argument("--json", help="write all samples here")
    ap.add_argument("--burn", type=int, default=0,
                    help="run this many busy-loop processes during the measurement (a loaded host)")
    ap.add_argument("--mpi-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    if args.mpi_worker:
        return mpi_worker(sizes, args.scale)
    os.environ.update(QUIET_ENV)
    impls = [i for i in args.impls.split(",") if i]
    skipped = [i for i in impls if not available(i)]
    impls = [i for i in impls if i not in skipped]
    for i in skipped:
        print(f"note: {i} is not available here, skipped", file=sys.stderr)
    samples = {}  # (impl, world, size) -> per-iteration seconds (slowest rank)
    cpu_samples = {}  # (impl, world, size) -> per-iteration CPU seconds (all ranks)
    t_start = time.monotonic()
    burn = burners(args.burn)
    try:
        measure(args, impls, sizes, samples, cpu_samples)
    finally:
        stop_burners(burn)
    shown = impls + (["pycoll-shm (engine)"] if "pycoll-shm" in impls else [])
    load = f", {args.burn} busy-loop processes running" if args.burn else ""
    report(samples, cpu_samples, shown, sizes, sorted({w for _, w, _ in samples}), load)
    print(f"\n(total {time.monotonic() - t_start:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{"impl": i, "ranks": w, "bytes": n, "seconds": v, "cpu_seconds": cpu_samples.get((i, w, n))}
                       for (i, w, n), v in samples.items()], f)


def measure(args, impls, sizes, samples, cpu_samples):
    for world in [int(w) for w in args.ranks.split(",")]:
        for rnd in range(args.rounds):
            order = impls[rnd % len(impls):] + impls[:rnd % len(impls)]
            for impl in order:
                if args.wait_quiet and not wait_quiet(args.wait_quiet, args.idle):
                    print("note: machine not idle", file=sys.stderr)
                t0 = time.monotonic()
                per_rank = run_impl(impl, world, sizes, args.scale)
                parts = {impl: [r["wall"] for r in per_rank]}
                if impl.startswith("pycoll"):
                    parts[impl + " (engine)"] = [r["engine"] for r in per_rank]
                for name, runs in parts.items():
                    for n in sizes:
                        slowest = np.max(np.array([r[n] for r in runs]), axis=0)
                        samples.setdefault((name, world, n), []).extend(slowest.tolist())
                for n in sizes:  # CPU: all ranks together
                    total = np.sum(np.array([r["cpu"][n] for r in per_rank]), axis=0)
                    cpu_samples.setdefault((impl, world, n), []).extend(total.tolist())
                    # back to back: the slowest rank's mean per call; CPU of all ranks
                    samples.setdefault((impl + " loop", world, n), []).append(max(r["loop"][n][0] for r in per_rank))
                    cpu_samples.setdefault((impl + " loop", world, n), []).append(sum(r["loop"][n][1] for r in per_rank))
                print(f"# {world} ranks, round {rnd + 1}/{args.rounds}, {impl}: {time.monotonic() - t0:.1f} s",
                      file=sys.stderr, flush=True)


def report(samples, cpu_samples, impls, sizes, worlds, load=""):
    med = {k: float(np.median(v)) for k, v in samples.items()}
    for world in worlds:
        print(f"\n## all-reduce float32, {world} ranks{load}: median time (busbw GB/s)\n")
        print("| size | " + " | ".join(impls) + " | shm/tcp | shm/mpi | shm-np/mpi |")
        print("|---|" + "---|" * (len(impls) + 3))
        for n in sizes:
            cells, bw = [], {}
            for impl in impls:
                t = med.get((impl, world, n))
                if t is None:
                    cells.append("-")
                    continue
                bw[impl] = n * 2 * (world - 1) / world / t / 1e9
                cells.append(f"{fmt_time(t)} ({bw[impl]:.2f})")

            def ratio(a, b):
                return f"{bw[a] / bw[b]:.2f}x" if a in bw and b in bw else "-"
            print(f"| {human_size(n)} | " + " | ".join(cells) + f" | {ratio('pycoll-shm', 'pycoll-tcp')} | "
                  f"{ratio('pycoll-shm', 'mpi')} | {ratio('pycoll-shm-np', 'mpi')} |")
        cpu_impls = [i for i in impls if (i, world, sizes[0]) in cpu_samples]
        print(f"\n## {world} ranks{load}: CPU time per all-reduce, all ranks together "
              "(median; in parentheses: CPU / wall)\n")
        print("| size | " + " | ".join(cpu_impls) + " |")
        print("|---|" + "---|" * len(cpu_impls))
        for n in sizes:
            cells = []
            for impl in cpu_impls:
                c, t = float(np.median(cpu_samples[(impl, world, n)])), med.get((impl, world, n))
                cells.append(f"{fmt_time(c)} ({c / t:.2f})" if t else fmt_time(c))
            print(f"| {human_size(n)} | " + " | ".join(cells) + " |")
        print(f"\n## {world} ranks{load}: back to back (no barrier between calls), mean time per all-reduce "
              "of the slowest rank / CPU time per all-reduce, all ranks together (median over runs)\n")
        print("| size | " + " | ".join(cpu_impls) + " |")
        print("|---|" + "---|" * len(cpu_impls))
        for n in sizes:
            cells = [f"{fmt_time(float(np.median(samples[(i + ' loop', world, n)])))} / "
                     f"{fmt_time(float(np.median(cpu_samples[(i + ' loop', world, n)])))}" for i in cpu_impls]
            print(f"| {human_size(n)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
