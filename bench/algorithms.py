"""Every pycoll algorithm plus torch.distributed Gloo: busbw per size, on loopback and in the
topology emulator, and the size at which ``auto`` switches.

    python bench/algorithms.py                          # loopback, 4 ranks, 4 KiB .. 64 MiB
    python bench/algorithms.py --ranks 8 --sizes 4K,64K,1M
    sudo python bench/algorithms.py --emu full-mesh     # emulated networks (root), see SCENARIOS
    sudo python bench/algorithms.py --emu all --json out.json

Method: float32, each iteration = barrier + the timed collective, rank 0's median. busbw
(nccl-tests): all-reduce bytes/t * 2(n-1)/n, all-gather (output bytes)/t * (n-1)/n. Every
algorithm and Gloo (torch.distributed, initialised in the same processes) take turns in every
repetition, so load from other processes on a shared machine hits them alike. ``auto`` is pycoll's default; the table shows what it picked, and below it
the cost model's switch points on a fine size grid (the model the ranks used: measured at
start-up on loopback, from the topology in the emulator).

Emulator scenarios (one network namespace per peer, link caps with tc, delay in user space;
pycoll.emulator): rates are scaled down so the single delay-line process and a small machine
keep up.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
from pycoll.benchmark import collect_results, human_size, parse_size  # noqa: E402
from pycoll.testing import free_port  # noqa: E402

HERE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))
ALGOS = ["ring", "hamiltonian", "tree", "innetwork", "auto"]

# name: (topology TOML, collectives, default sizes, what it should show)
SCENARIOS = {
    "full-mesh": ("""name = "full-mesh-5-emu"
[defaults]
bandwidth = "100mbit"
latency = "1ms"
[[group]]
name = "mesh"
count = 5
""", "all_gather,all_reduce", "64K,1M,4M,16M",
                  "every ordered pair has its own 100 Mbit/s: the multi-ring should approach 4x the ring"),
    "two-racks": ("""name = "two-racks-emu"
[defaults]
bandwidth = "100mbit"
latency = "5ms"
[intra]
bandwidth = "1gbit"
latency = "100us"
[[group]]
name = "rack0"
count = 4
aggregator = "agent"
[[group]]
name = "rack1"
count = 4
aggregator = "agent"
""", "all_reduce", "4K,64K,1M,4M",
                  "racks of 4, 1 Gbit/s inside, 100 Mbit/s and 5 ms between: innetwork's ring has 2 members, not 8"),
    "shared-nic": ("""name = "shared-nic-4-emu"
[defaults]
latency = "1ms"
host_nic = "200mbit"
[[group]]
name = "node"
count = 4
""", "all_gather,all_reduce", "64K,1M,4M,16M",
                   "one 200 Mbit/s NIC per host, links uncapped: a single ring already fills it"),
}






def reps_for(nbytes, scale, emulated):
    if emulated:
        base = 10 if nbytes <= 64 << 10 else 5 if nbytes <= 1 << 20 else 3
    else:
        base = 100 if nbytes <= 64 << 10 else 20 if nbytes <= 1 << 20 else 6 if nbytes <= 16 << 20 else 3
    return max(2, int(base * scale))


def bus_factor(coll, n):
    return 2 * (n - 1) / n if coll == "all_reduce" else (n - 1) / n


# ---- workers (one process per rank) ------------------------------------------------------------
def _time_interleaved(runs, barrier, reps):
    """Median seconds per entry of ``runs`` ({name: fn}); the entries take turns in every
    repetition, so load from other processes on the machine hits them alike."""
    import numpy as np
    for run in runs.values():
        run()  # warm up: connections, plans, pages
    times = {name: [] for name in runs}
    for _ in range(reps):
        for name, run in runs.items():
            barrier()
            t = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t)
    return {name: float(np.median(ts)) for name, ts in times.items()}


def _buffers(coll, nbytes, n):
    import numpy as np
    if coll == "all_gather":
        per = max(nbytes // 4 // n, 1)
        return np.ones(per, np.float32), np.zeros(per * n, np.float32)
    return np.ones(max(nbytes // 4, 1), np.float32), None


def worker_pycoll(a):
    import pycoll
    comm = pycoll.init(rank=a.rank, world_size=a.n, master_addr=a.master, master_port=a.port, timeout=300,
                       topology=a.topology or None)
    if a.gloo:  # in the same processes, so Gloo takes turns with the others under the same load
        import torch
        import torch.distributed as dist
        dist.init_process_group("gloo", init_method=f"tcp://{a.master}:{a.port + 1}", rank=a.rank,
                                world_size=a.n)
    from pycoll.plan import planners
    layout = comm.epoch_state.selector().layout
    out = {}
    for coll in a.colls.split(","):
        for nbytes in a.sizes:
            x, y = _buffers(coll, nbytes, a.n)
            runs = {}
            for algo in a.algos.split(","):
                # skip what would run the very same plan as the ring
                if algo not in ("ring", "auto") and (planners.effective(algo, coll) == "ring" or (
                        algo == "innetwork" and not layout.aggregated)):
                    continue
                if coll == "all_gather":
                    runs[algo] = (lambda al: lambda: comm.all_gather(x, y, algorithm=al))(algo)
                else:
                    runs[algo] = (lambda al: lambda: comm.all_reduce(x, algorithm=al))(algo)
            if a.gloo:
                tx, ty = torch.from_numpy(x), (torch.from_numpy(y) if y is not None else None)
                runs["gloo"] = ((lambda: dist.all_gather_into_tensor(ty, tx)) if coll == "all_gather"
                                else (lambda: dist.all_reduce(tx)))
            times = _time_interleaved(runs, comm.barrier, reps_for(nbytes, a.scale, a.emulated))
            ours = [name for name in runs if name != "gloo"]
            ran = [st.algorithm for st in comm.stats if st.op == coll][-len(ours):]  # the last repetition
            for algo, t in times.items():
                out[f"{coll} {nbytes} {algo}"] = [t, ran[ours.index(algo)] if algo in ours else algo]
    sel = comm.epoch_state.selector()
    grid = [1 << k for k in range(10, 29)]
    points = {coll: sel.model().switch_points(coll, sel.layout, grid, comm.segment_bytes)
              for coll in a.colls.split(",")}
    out["model"] = [repr(sel.model()), points]
    if a.gloo:
        dist.destroy_process_group()
    comm.close()
    return out


# ---- driver ------------------------------------------------------------------------------------
def worker_argv(impl, rank, n, master, port, args, topology, emulated):
    argv = [sys.executable, HERE, "--worker", impl, "--rank", str(rank), "--n", str(n), "--master", master,
            "--port", str(port), "--sizes", ",".join(map(str, args.sizes)), "--colls", args.colls,
            "--algos", args.algos, "--scale", str(args.scale)]
    if topology:
        argv += ["--topology", topology]
    if emulated:
        argv += ["--emulated"]
    if impl == "pycoll" and not args.no_gloo:
        argv += ["--gloo"]
    return argv


def run_loopback(impl, n, args):
    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = [subprocess.Popen(worker_argv(impl, r, n, "127.0.0.1", port, args, args.topology, False),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True) for r in range(n)]
    return collect_results(procs, args.timeout, f"{impl} on {n} loopback ranks")[-1]


def run_emulated(impl, topo_path, args):
    from pycoll.emulator import EmuSpec, Emulator
    from pycoll.plan.topology import load_topology
    topo = load_topology(topo_path)
    spec = EmuSpec.from_topology(topo)
    env = {"PYTHONUNBUFFERED": "1", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "GLOO_SOCKET_IFNAME": "emu0", "PYCOLL_TIMEOUT": "300"}
    with Emulator(spec) as emu:
        port = 29000 + os.getpid() % 1000
        procs = [emu.run_in(r, worker_argv(impl, r, topo.world_size, emu.peer_ip(0), port, args, topo_path, True),
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for r in range(topo.world_size)]
        return collect_results(procs, args.timeout, f"{impl} in the emulator ({topo.name})")[-1]


def report(title, n, results, args):
    colls = args.colls.split(",")
    algos = args.algos.split(",")
    impls = algos + (["gloo"] if "gloo" in results else [])
    print(f"\n## {title}")
    for coll in colls:
        print(f"\n### {coll}, float32, {n} ranks: busbw GB/s (median time); ratios vs ring; auto's pick "
              "('-': that algorithm would run the ring's plan here, not measured)")
        head = "| size | " + " | ".join(impls) + " | " + " | ".join(f"{i}/ring" for i in impls if i != "ring")
        head += " | auto ran |"
        print(head)
        print("|" + "---|" * (head.count("|") - 1))
        for nbytes in args.sizes:
            t = {}
            for i in impls:
                src = results["gloo"] if i == "gloo" else results["pycoll"]
                key = f"{coll} {nbytes} {i}"
                if key in src:
                    t[i] = src[key]
            bw = {i: nbytes / v[0] * bus_factor(coll, n) / 1e9 for i, v in t.items()}
            row = f"| {human_size(nbytes)} | " + " | ".join(
                f"{bw[i]:.3f} ({fmt_t(t[i][0])})" if i in t else "-" for i in impls)
            row += " | " + " | ".join(f"{bw[i] / bw['ring']:.2f}x" if i in bw and "ring" in bw else "-"
                                      for i in impls if i != "ring")
            row += f" | {t['auto'][1] if 'auto' in t else '-'} |"
            print(row)
    model, points = results["pycoll"]["model"]
    print(f"\nauto's model: {model}")
    for coll, pts in points.items():
        print(f"auto switch points ({coll}): " + ", ".join(f"from {human_size(s)}: {a}" for s, a in pts))


def fmt_t(seconds):
    return f"{seconds * 1e6:.0f} us" if seconds < 1e-3 else f"{seconds * 1e3:.1f} ms" if seconds < 1 else \
        f"{seconds:.2f} s"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=4, help="loopback world size (default 4)")
    ap.add_argument("--sizes", default=None, help="sizes (default 4K,64K,1M,16M,64M; scenario defaults)")
    ap.add_argument("--colls", default=None, help="all_reduce,all_gather (default: both on loopback)")
    ap.add_argument("--algos", default=",".join(ALGOS))
    ap.add_argument("--scale", type=float, default=1.0, help="multiply the repetition counts")
    ap.add_argument("--topology", default="", help="a topology file for the loopback run")
    ap.add_argument("--emu", default=None, help=f"emulator scenario: {', '.join(SCENARIOS)}, all, or a .toml")
    ap.add_argument("--no-gloo", action="store_true")
    ap.add_argument("--json", help="also write the raw results here")
    ap.add_argument("--timeout", type=float, default=900)
    for hidden in ("--worker", "--master"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    for flag in ("--emulated", "--gloo"):
        ap.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        args.sizes = [int(s) for s in args.sizes.split(",")]
        out = worker_pycoll(args)
        if args.rank == 0:
            print("RESULT " + json.dumps(out), flush=True)
        return 0

    runs = []  # (title, n, runner(impl), colls, sizes)
    if args.emu:
        names = list(SCENARIOS) if args.emu == "all" else [args.emu]
        tmp = tempfile.mkdtemp(prefix="pycoll-bench-")
        for name in names:
            if name.endswith(".toml"):
                path, colls, sizes, what = name, "all_reduce", "4K,64K,1M,4M", name
            else:
                text, colls, sizes, what = SCENARIOS[name]
                path = os.path.join(tmp, f"{name}.toml")
                with open(path, "w") as f:
                    f.write(text)
            from pycoll.plan.topology import load_topology
            n = load_topology(path).world_size
            runs.append((f"emulator: {name} ({what})", n, (lambda p: lambda impl: run_emulated(impl, p, args))(path),
                         args.colls or colls, args.sizes or sizes))
    else:
        runs.append((f"loopback, {args.ranks} ranks" + (f", topology {args.topology}" if args.topology else ""),
                     args.ranks, lambda impl: run_loopback(impl, args.ranks, args),
                     args.colls or "all_reduce,all_gather", args.sizes or "4K,64K,1M,16M,64M"))
    everything = {}
    for title, n, runner, colls, sizes in runs:
        args.colls = colls
        args.sizes = [parse_size(s) for s in sizes.split(",")]
        t0 = time.monotonic()
        results = {"pycoll": runner("pycoll")}
        if not args.no_gloo:
            results["gloo"] = results["pycoll"]  # measured in the same processes, interleaved
        report(title + f" [{time.monotonic() - t0:.0f} s]", n, results, args)
        everything[title] = results
        args.colls = args.sizes = None
    if args.json:
        with open(args.json, "w") as f:
            json.dump(everything, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
