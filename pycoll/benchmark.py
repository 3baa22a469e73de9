"""The all-reduce benchmark behind ``pycoll bench``: pycoll's algorithms against Gloo on local ranks.

    pycoll bench                                   # 2 and 4 ranks, 4 KiB .. 16 MiB, table
    pycoll bench -n 2,4,8 --sizes 1M,64M --plot busbw.png --json results.json

Every world size runs in fresh local processes talking over loopback; at each message size the
implementations and algorithms take turns in the same processes (a change in the machine's load
hits them alike). For each: a few warm-up calls, then iterations of *barrier, time one all-reduce
of float32*; an iteration's time is the slowest rank's, and the table shows the median over
iterations. Bandwidth as nccl-tests defines it: algbw = bytes / time, busbw = algbw * 2(n-1)/n.

Implementations: ``pycoll`` (each algorithm in :data:`pycoll.plan.planners.ALGORITHMS`, ``auto`` too),
``gloo`` (torch.distributed's CPU backend: needs torch) and ``torch-pycoll`` (pycoll through the
torch.distributed backend, to see what that layer costs). Use :func:`run_benchmark` from Python,
or :func:`main` with command-line arguments (``bench/allreduce.py`` calls it).
"""
import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

from pycoll.observability import human_size, render_table  # noqa: F401 - public here too (demo, bench/)
from pycoll import units as _units

__all__ = ["Result", "run_benchmark", "format_table", "figure", "plot", "parse_size", "collect_results", "main"]

DEFAULT_SIZES = (4 << 10, 64 << 10, 1 << 20, 16 << 20)
DEFAULT_WORLD_SIZES = (2, 4)
IMPLS = ("pycoll", "gloo", "torch-pycoll")


@dataclass
class Result:
    """One (implementation, algorithm, world size, size) measurement."""

    impl: str
    algorithm: str
    world_size: int
    nbytes: int
    seconds: float       # median over iterations of the slowest rank's time
    min_seconds: float
    iters: int

    @property
    def algbw(self):
        """Bytes per second of the message."""
        return self.nbytes / self.seconds if self.seconds > 0 else 0.0

    @property
    def busbw(self):
        """Bytes per second on the busiest link, for an all-reduce: algbw * 2(n-1)/n."""
        n = self.world_size
        return self.algbw * 2 * (n - 1) / n if n > 1 else 0.0

    @property
    def label(self):
        return self.impl if self.impl != "pycoll" else f"pycoll {self.algorithm}"


def parse_size(text):
    """'4K', '64KiB', '1M', '16MB', '1048576' -> bytes (powers of 1024, :func:`pycoll.units.parse_size`);
    a multiple of 4, as the benchmark sends float32."""
    return _units.parse_size(text, multiple=4)


def collect_results(procs, timeout, what, need=1):
    """The JSON payloads of the ``RESULT <json>`` lines that worker processes (bench/ scripts'
    ranks) print, in process order. Waits ``timeout`` seconds for all of them together; on
    expiry kills them all and raises RuntimeError, as it does (with the failed workers' stderr
    tails) when fewer than ``need`` results came back. ``what`` names the run in both."""
    results, errors = [], []
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
                q.wait()
            raise RuntimeError(f"{what} did not finish in {timeout} s") from None
        if p.returncode != 0:
            errors.append(err[-3000:])
        results += [json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")]
    if len(results) < need:
        raise RuntimeError(f"{what} failed:\n" + "\n".join(errors))
    return results


def _default_iters(nbytes, world_size):
    """Enough iterations for a stable median, about the same time per size."""
    return int(max(5, min(200, (256 << 20) // (nbytes * max(1, world_size // 2)))))


# ---- rank side -------------------------------------------------------------
def _measure(comm, op, barrier, iters, warmup):
    for _ in range(warmup):
        op()
    times = np.zeros(iters, np.float64)
    for i in range(iters):
        barrier()
        t0 = time.perf_counter()
        op()
        times[i] = time.perf_counter() - t0
    comm.all_reduce(times, op="max")  # an iteration lasts as long as its slowest rank
    return float(np.median(times)), float(times.min())


def _settle(comm, seconds=0.5):
    """Untimed small all-reduces until the group runs at its steady pace (the first
    timed case otherwise pays for the processes' and scheduler's start-up)."""
    a = np.zeros(1024, np.float32)
    flag = np.zeros(1, np.float32)
    t_end = time.perf_counter() + seconds
    while flag[0] == 0:  # every rank stops after the same call (rank 0 decides)
        for _ in range(50):
            comm.all_reduce(a)
        flag[0] = 1.0 if comm.rank == 0 and time.perf_counter() > t_end else 0.0
        comm.all_reduce(flag, op="max")


def _torch_groups(impls, port, comm, host="127.0.0.1"):
    """torch.distributed groups for the torch implementations, all alive at
    once so the cases can take turns: {impl: (dist, group)}."""
    wanted = [i for i in impls if i != "pycoll"]
    if not wanted:
        return {}
    import torch.distributed as dist
    if "torch-pycoll" in wanted:
        import pycoll.torch.backend  # noqa: F401 - registers the backend
    default = "gloo" if "gloo" in wanted else "pycoll"
    dist.init_process_group(default, init_method=f"tcp://{host}:{port}", rank=comm.rank,
                            world_size=comm.world_size)
    groups = {"gloo" if default == "gloo" else "torch-pycoll": None}
    if default == "gloo" and "torch-pycoll" in wanted:
        groups["torch-pycoll"] = dist.new_group(backend="pycoll")
    return {impl: (dist, group) for impl, group in groups.items()}


def _bench_rank(comm, plan, port, iters, warmup, progress, host="127.0.0.1"):
    """Runs on every rank: ``plan`` is a list of (impl, algorithm, nbytes),
    in the order to run (implementations take turns at each size, so a
    change in the machine's load hits them alike)."""
    from tqdm import tqdm
    out = []
    bar = tqdm(total=len(plan), desc=f"{comm.world_size} ranks", unit="case", leave=False,
               disable=not progress or comm.rank != 0, file=sys.stderr)
    torch_groups = _torch_groups({impl for impl, _, _ in plan}, port, comm, host)
    try:
        _settle(comm)
        for impl, algorithm, nbytes in plan:
            n_iter = iters or _default_iters(nbytes, comm.world_size)
            arr = np.full(nbytes // 4, comm.rank + 1, np.float32)
            if impl == "pycoll":
                def op(arr=arr, algorithm=algorithm):
                    comm.all_reduce(arr, algorithm=algorithm)
                barrier = comm.barrier
            else:
                import torch
                dist, group = torch_groups[impl]
                t = torch.from_numpy(arr)

                def op(t=t, dist=dist, group=group):
                    dist.all_reduce(t, group=group)

                def barrier(dist=dist, group=group):
                    dist.barrier(group=group)
            med, best = _measure(comm, op, barrier, n_iter, warmup)
            out.append((impl, algorithm, nbytes, med, best, n_iter))
            bar.update(1)
    finally:
        if torch_groups:
            next(iter(torch_groups.values()))[0].destroy_process_group()
        bar.close()
    return out


# ---- driver ----------------------------------------------------------------
def case_order(sizes, impls, algorithms):
    """The (impl, algorithm, bytes) cases in the order they run: size by size,
    every case of a size in turn, the turn starting one case later at each
    size, so that no case is always the one that first meets a change in the
    machine (or the group's own settling in: measured at 4 ranks on 2 cores,
    whatever ran first after start-up took 2-5x its later time)."""
    cases = [(impl, algorithm) for impl in impls for algorithm in (algorithms if impl == "pycoll" else ["-"])]
    plan = []
    for i, size in enumerate(sizes):
        k = i % len(cases) if cases else 0
        plan += [(impl, algorithm, int(size)) for impl, algorithm in cases[k:] + cases[:k]]
    return plan


def run_benchmark(world_sizes=DEFAULT_WORLD_SIZES, sizes=DEFAULT_SIZES, algorithms=None,
                  impls=("pycoll", "gloo"), iters=None, warmup=2, progress=False, timeout=600.0):
    """Measure and return a list of :class:`Result` (Gloo rows are skipped,
    with a note on stderr, when torch is not installed)."""
    from pycoll.plan import planners
    from pycoll.testing import free_port, run

    algorithms = list(algorithms or planners.ALGORITHMS)
    for a in algorithms:
        planners.check_algorithm(a)
    impls = list(impls)
    for impl in impls:
        if impl not in IMPLS:
            raise ValueError(f"unknown implementation {impl!r}; choose from {', '.join(IMPLS)}")
    if any(i != "pycoll" for i in impls):
        try:
            import torch  # noqa: F401
        except ImportError:
            print("pycoll bench: torch is not installed: skipping gloo/torch-pycoll "
                  "(pip install 'pycoll[torch]')", file=sys.stderr)
            impls = [i for i in impls if i == "pycoll"]
    plan = case_order(sizes, impls, algorithms)
    results = []
    for n in world_sizes:
        rows = run(_bench_rank, n, args=(plan, free_port(), iters, warmup, progress), timeout=timeout,
                   init_kwargs={"timeout": 120})[0]
        results += [Result(impl, algorithm, n, nbytes, med, best, k) for impl, algorithm, nbytes, med, best, k in rows]
    return results


def format_table(results):
    """A plain-text table: one row per measurement, with the ratio to Gloo's busbw."""
    gloo = {(r.world_size, r.nbytes): r.busbw for r in results if r.impl == "gloo"}
    header = ["ranks", "implementation", "size", "time", "algbw GB/s", "busbw GB/s", "vs gloo"]
    rows = []
    for r in sorted(results, key=lambda r: (r.world_size, r.label, r.nbytes)):
        ref = gloo.get((r.world_size, r.nbytes))
        ratio = f"{r.busbw / ref:.2f}x" if ref and r.impl != "gloo" else ""
        t = r.seconds
        shown = f"{t * 1e6:.0f} us" if t < 1e-3 else f"{t * 1e3:.2f} ms"
        rows.append([str(r.world_size), r.label, human_size(r.nbytes), shown, f"{r.algbw / 1e9:.3f}",
                     f"{r.busbw / 1e9:.3f}", ratio])
    return render_table(header, rows)


def figure(results, where="loopback"):
    """The matplotlib figure of :func:`plot`: busbw against message size on log-log axes, one panel
    per world size, one line per implementation/algorithm, and one legend below the panels (so it
    hides no line)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worlds = sorted({r.world_size for r in results})
    labels = sorted({r.label for r in results}, key=lambda s: (s == "gloo", s))
    fig, axes = plt.subplots(1, len(worlds), figsize=(5.5 * len(worlds), 4.8), squeeze=False, sharey=True)
    colors = {label: f"C{i}" for i, label in enumerate(x for x in labels if x != "gloo")}
    for ax, n in zip(axes[0], worlds):
        mine = [r for r in results if r.world_size == n]
        for label in labels:
            pts = sorted((r.nbytes, r.busbw / 1e9) for r in mine if r.label == label and r.busbw > 0)
            if not pts:
                continue
            style = {"linestyle": "--", "color": "black"} if label == "gloo" else {"color": colors[label]}
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label, **style)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")  # small and large messages differ by orders of magnitude
        ticks = sorted({r.nbytes for r in mine})
        ax.set_xticks(ticks, [human_size(t) for t in ticks], rotation=30)
        ax.set_title(f"all-reduce, {n} ranks ({where})")
        ax.set_xlabel("message size")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("bus bandwidth (GB/s, log scale)")
    handles = {}
    for ax in axes[0]:
        for line in ax.lines:
            handles.setdefault(line.get_label(), line)
    ncol = min(len(handles), 4)
    rows = -(-len(handles) // max(1, ncol))
    bottom = min(0.4, 0.14 + 0.05 * rows)  # room below the panels for the legend's rows
    fig.tight_layout(rect=(0, bottom, 1, 1))
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=ncol, frameon=False,
               bbox_to_anchor=(0.5, 0.0))
    return fig


def plot(results, path, where="loopback"):
    """Draw busbw against message size (log-log), one panel per world size, one line per
    implementation/algorithm, the legend below; needs matplotlib (``pip install 'pycoll[plot]'``)."""
    import matplotlib.pyplot as plt
    fig = figure(results, where)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _csv_ints(text):
    try:
        values = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _csv_sizes(text):
    try:
        return [parse_size(x) for x in str(text).split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(p):
    """The benchmark's options (shared by ``pycoll bench`` and bench/allreduce.py)."""
    p.add_argument("-n", "--world-sizes", type=_csv_ints, default=list(DEFAULT_WORLD_SIZES), metavar="N[,N...]",
                   help="numbers of local ranks (default 2,4)")
    p.add_argument("--sizes", type=_csv_sizes, default=list(DEFAULT_SIZES), metavar="SIZE[,SIZE...]",
                   help="message sizes, e.g. 4K,64K,1M,16M (default)")
    p.add_argument("--algorithms", default=None, metavar="A[,A...]",
                   help="pycoll algorithms to run (default: all)")
    p.add_argument("--impls", default="pycoll,gloo", metavar="I[,I...]",
                   help=f"implementations: {', '.join(IMPLS)} (default pycoll,gloo)")
    p.add_argument("--no-gloo", action="store_true", help="leave Gloo out")
    p.add_argument("--iters", type=int, default=None, help="timed iterations per case (default: by size)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls first (default 2)")
    p.add_argument("--plot", metavar="PNG", default=None, help="draw busbw vs size (needs matplotlib)")
    p.add_argument("--json", metavar="FILE", default=None, help="write the results as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    g = p.add_argument_group("across hosts (one command per host; or under torchrun / pycoll run, which set "
                             "RANK, WORLD_SIZE, MASTER_ADDR and the port)")
    g.add_argument("--master", default=None, metavar="HOST:PORT",
                   help="join a group there instead of spawning local ranks (rank 0 runs the coordinator; "
                        "Gloo uses PORT+1)")
    g.add_argument("--world-size", type=int, default=None, help="hosts (ranks) in the group (default WORLD_SIZE)")
    g.add_argument("--rank", type=int, default=None, help="this host's rank (default RANK)")
    g.add_argument("--topology", default="measure",
                   help="topology file, or 'measure' (default: probe the links when the group forms and "
                        "print the measured matrix), or 'none'")
    return p


def _distributed(args):
    """(rank, world size, host, port) when this run joins a group across hosts, else None."""
    from pycoll.options import environ
    rank = args.rank if args.rank is not None else environ("RANK")
    world = args.world_size if args.world_size is not None else environ("WORLD_SIZE")
    if args.master is None and (rank is None or world is None):
        return None
    if args.master:
        host, sep, port = args.master.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"--master: expected HOST:PORT, got {args.master!r}")
        port = int(port)
    else:
        host = environ("MASTER_ADDR") or "127.0.0.1"
        port = environ("PYCOLL_MASTER_PORT")
        if port is None:  # torchrun: MASTER_PORT is torch's store; ours is 2 above it (Gloo takes +1)
            port = environ("MASTER_PORT")
            if port is None:
                raise ValueError("no --master and no PYCOLL_MASTER_PORT / MASTER_PORT in the environment")
            port += 2
    if rank is None or world is None:
        raise ValueError("across hosts: give --rank and --world-size (or RANK and WORLD_SIZE)")
    return int(rank), int(world), host, int(port)


def run_across_hosts(rank, world, host, port, sizes, algorithms, impls, iters=None, warmup=2, progress=False,
                     topology="measure"):
    """Join the group at host:port as ``rank`` of ``world`` and benchmark across the hosts. Every
    rank returns (results, probe result or None); the results are the same on every rank."""
    import pycoll
    from pycoll.plan import planners
    algorithms = list(algorithms or planners.ALGORITHMS)
    for a in algorithms:
        planners.check_algorithm(a)
    topo = None if topology in (None, "", "none") else topology
    comm = pycoll.init(rank=rank, world_size=world, master_addr=host, master_port=port, timeout=600,
                       topology=topo)
    try:
        plan = case_order(sizes, impls, algorithms)
        rows = _bench_rank(comm, plan, port + 1, iters, warmup, progress, host)
        probe = comm.epoch_state.probe_result
    finally:
        comm.close()
    return [Result(impl, algorithm, world, nbytes, med, best, k) for impl, algorithm, nbytes, med, best, k in rows], probe


def run_from_args(args):
    """Run what the parsed arguments ask for; returns an exit code."""
    try:
        across = _distributed(args)
    except ValueError as exc:
        print(f"pycoll bench: {exc}", file=sys.stderr)
        return 2
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("pycoll bench: --plot needs matplotlib: pip install 'pycoll[plot]'", file=sys.stderr)
            return 2
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    if args.no_gloo:
        impls = [i for i in impls if i != "gloo"]
    algorithms = [a.strip() for a in args.algorithms.split(",")] if args.algorithms else None
    probe = None
    try:
        if across:
            if any(i != "pycoll" for i in impls):
                try:
                    import torch  # noqa: F401
                except ImportError:
                    print("pycoll bench: torch is not installed: skipping gloo/torch-pycoll", file=sys.stderr)
                    impls = [i for i in impls if i == "pycoll"]
            rank, world, host, port = across
            results, probe = run_across_hosts(rank, world, host, port, args.sizes, algorithms, impls, args.iters,
                                              args.warmup, not args.quiet, args.topology)
            if rank != 0:
                return 0
        else:
            results = run_benchmark(args.world_sizes, args.sizes, algorithms, impls, iters=args.iters,
                                    warmup=args.warmup, progress=not args.quiet)
    except ValueError as exc:
        print(f"pycoll bench: {exc}", file=sys.stderr)
        return 2
    where = f"{across[1]} hosts" if across else "loopback"
    print(f"all-reduce, float32, {where}: median of barrier-separated iterations, slowest rank")
    print(format_table(results))
    if probe is not None:
        print(f"\nmeasured links (pycoll probe, {probe.seconds:.2f} s):")
        print(probe.table())
    if args.json:
        doc = {"where": where, "results": [dict(asdict(r), algbw=r.algbw, busbw=r.busbw) for r in results]}
        if probe is not None:
            doc["links"] = {"bandwidth_Bps": _finite(probe.bw), "latency_s": _finite(probe.lat),
                            "rtt_s": _finite(probe.rtt), "sites": probe.sites,
                            "uplinks_Bps": {str(k): v for k, v in probe.uplinks.items()},
                            "probe_seconds": probe.seconds}
        with open(args.json, "w") as f:
            json.dump(doc if across else doc["results"], f, indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        plot(results, args.plot, where)
        print(f"wrote {args.plot}")
    return 0


def _finite(matrix):
    """A matrix as lists, with None where it is not finite (the diagonal): plain JSON."""
    return [[float(x) if np.isfinite(x) else None for x in row] for row in np.asarray(matrix, float)]


def main(argv=None):
    """Command-line entry: ``python -m pycoll.benchmark`` or ``pycoll bench``."""
    p = add_arguments(argparse.ArgumentParser(prog="pycoll bench", description=__doc__.split("\n\n")[0]))
    return run_from_args(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
