"""topology="measure" and `pycoll probe` in the emulator: the network found, not named.

    sudo python bench/probe.py                    # both parts, about 3 minutes
    sudo python bench/probe.py --sizes 4M --skip-cli

1. Rack-oblivious placement: 2 racks of 4 behind shared 100 Mbit/s uplinks (1 Gbit/s NICs,
   5 ms between racks), rank r in rack r % 2, so rank order alternates racks. The same 8
   processes form two groups in turn: without a topology (the naive ring 0..7 crosses the
   uplink at every hop) and with topology="measure" (the probe finds the racks from round
   trips alone, the shared uplinks from its two-flow test, and the ring order from the
   measured matrices). Printed: the probe's matrices, sites and time, the ring orders, and
   all-reduce times (ring and auto) in both groups, with the ratio.
2. `pycoll probe` as a user runs it, one command per emulated host: 6 hosts in 2 sites of 3;
   the probe's wall time (the issue's bound: 2 s for 6 peers) and the file it writes.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.abspath(__file__)
sys.path.insert(0, ROOT)
from pycoll.benchmark import collect_results, human_size, parse_size  # noqa: E402


def worker(a):
    import numpy as np
    import pycoll
    sizes = [int(s) for s in a.sizes.split(",")]
    out = {}

    def timed(comm, algos):
        res = {}
        for nbytes in sizes:
            x = np.ones(nbytes // 4, np.float32)
            for algo in algos:
                comm.all_reduce(x, algorithm=algo)  # warm-up
                ts = []
                for _ in range(a.reps):
                    comm.barrier()
                    t = time.perf_counter()
                    comm.all_reduce(x, algorithm=algo)
                    ts.append(time.perf_counter() - t)
                res[f"{nbytes} {algo}"] = [float(np.median(ts)), comm.stats[-1].algorithm]
        return res

    comm = pycoll.init(rank=a.rank, world_size=a.n, master_addr=a.master, master_port=a.port, timeout=600)
    out["naive"] = timed(comm, ["ring", "auto"])
    out["naive_ring"] = comm.epoch_state.selector().layout.ring
    comm.close()
    t0 = time.perf_counter()
    comm = pycoll.init(rank=a.rank, world_size=a.n, master_addr=a.master, master_port=a.port + 1, timeout=600,
                       topology="measure")
    out["init_s"] = time.perf_counter() - t0
    ep = comm.epoch_state
    out["measured"] = timed(comm, ["ring", "innetwork", "auto"])
    res = ep.probe_result
    out["probe"] = {"seconds": res.seconds, "sites": res.sites, "uplinks_mbit": {str(k): v * 8 / 1e6 for k, v in
                                                                               res.uplinks.items()},
                    "table": res.table(), "rounds": res.rounds}
    out["measured_ring"] = ep.selector().layout.ring
    out["model"] = repr(ep.selector().model())
    comm.close()
    if a.rank == 0:
        print("RESULT " + json.dumps(out), flush=True)


def part1(args):
    from pycoll.emulator import Emulator, EmuSpec, SiteSpec, parse_rate, parse_time
    n = 8
    base = EmuSpec.uniform(n, delay_s=parse_time(args.delay))
    spec = EmuSpec(n, link=base.link, host_nic_bps=parse_rate(args.nic),
                   sites=[SiteSpec(tuple(range(0, n, 2)), parse_rate(args.uplink), "rackA"),
                          SiteSpec(tuple(range(1, n, 2)), parse_rate(args.uplink), "rackB")])
    env = {"PYTHONUNBUFFERED": "1", "PYTHONPATH": ROOT, "TORCH_DEVICE_BACKEND_AUTOLOAD": "0"}
    t0 = time.monotonic()
    with Emulator(spec, mtu=args.mtu) as emu:
        port = 44500 + os.getpid() % 200 * 2
        procs = [emu.run_in(r, [sys.executable, HERE, "--worker", "--rank", str(r), "--n", str(n), "--master",
                                emu.peer_ip(0), "--port", str(port), "--sizes", ",".join(map(str, args.sizes)),
                                "--reps", str(args.reps)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for r in range(n)]
        res = collect_results(procs, args.timeout, "probe workers")[-1]
    print(f"\n## 1. topology=\"measure\": 2 racks of 4, rank r in rack r % 2, shared uplink {args.uplink}, "
          f"NICs {args.nic}, {args.delay} one way between racks [{time.monotonic() - t0:.0f} s]\n")
    p = res["probe"]
    print(p["table"])
    print(f"\nprobe: {p['seconds']:.2f} s ({p['rounds']} bandwidth rounds); group formation with the probe "
          f"{res['init_s']:.2f} s")
    print(f"sites found: {p['sites']} (truth: {[r % 2 for r in range(n)]}); shared uplinks found (Mbit/s): "
          f"{p['uplinks_mbit']}")
    print(f"ring order without a topology: {res['naive_ring']}; measured: {res['measured_ring']}")
    print(f"cost model: {res['model']}\n")
    print("| size | naive ring | naive auto (ran) | measured ring | measured innetwork | measured auto (ran) "
          "| naive ring / measured ring | naive ring / measured auto |")
    print("|---|---|---|---|---|---|---|---|")
    for s in args.sizes:
        nv, ms = res["naive"], res["measured"]
        print(f"| {human_size(s)} | {nv[f'{s} ring'][0]:.2f} s | {nv[f'{s} auto'][0]:.2f} s ({nv[f'{s} auto'][1]}) "
              f"| {ms[f'{s} ring'][0]:.2f} s | {ms[f'{s} innetwork'][0]:.2f} s | {ms[f'{s} auto'][0]:.2f} s "
              f"({ms[f'{s} auto'][1]}) | {nv[f'{s} ring'][0] / ms[f'{s} ring'][0]:.2f}x "
              f"| {nv[f'{s} ring'][0] / ms[f'{s} auto'][0]:.2f}x |")
    return res


def part2(args):
    from pycoll.emulator import Emulator, EmuSpec, SiteSpec, parse_rate, parse_time
    n = 6
    base = EmuSpec.uniform(n, delay_s=parse_time(args.delay))
    spec = EmuSpec(n, link=base.link, host_nic_bps=parse_rate(args.nic),
                   sites=[SiteSpec((0, 1, 2), parse_rate(args.uplink)), SiteSpec((3, 4, 5), parse_rate(args.uplink))])
    env = {"PYTHONUNBUFFERED": "1", "PYTHONPATH": ROOT, "TORCH_DEVICE_BACKEND_AUTOLOAD": "0"}
    out_dir = tempfile.mkdtemp(prefix="pycoll-probe-")
    path = os.path.join(out_dir, "measured.toml")
    with Emulator(spec, mtu=args.mtu) as emu:
        master = f"{emu.peer_ip(0)}:{44900 + os.getpid() % 90}"
        procs = [emu.run_in(r, [sys.executable, "-m", "pycoll", "probe", "--master", master, "--world-size", str(n),
                                "--rank", str(r), "--out", path], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for r in range(n)]
        outs = []
        for p in procs:
            o, e = p.communicate(timeout=args.timeout)
            if p.returncode:
                raise RuntimeError(f"pycoll probe failed: {e[-2000:]}")
            outs.append(o)
    print(f"\n## 2. `pycoll probe --master {master} --world-size 6 --rank R --out measured.toml`, one per "
          f"emulated host: 2 sites of 3, shared uplink {args.uplink}, NICs {args.nic}\n")
    print(outs[0])
    with open(path) as f:
        text = f.read()
    print("first lines of the file:\n" + "\n".join(text.splitlines()[:16]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="4M,16M")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--uplink", default="100mbit")
    ap.add_argument("--nic", default="1gbit")
    ap.add_argument("--delay", default="5ms")
    ap.add_argument("--mtu", type=int, default=9000)
    ap.add_argument("--skip-cli", action="store_true")
    ap.add_argument("--skip-group", action="store_true")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for name in ("--rank", "--n", "--port"):
        ap.add_argument(name, type=int, help=argparse.SUPPRESS)
    ap.add_argument("--master", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return worker(a)
    a.sizes = [parse_size(s) for s in a.sizes.split(",")]
    if not a.skip_group:
        part1(a)
    if not a.skip_cli:
        part2(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
