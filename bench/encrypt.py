"""The cost of PYCOLL_ENCRYPT=1 on the data plane: all-reduce over TCP vs TLS 1.3, one run.

    python bench/encrypt.py                      # 2 ranks, 16 MiB, float32 sum
    python bench/encrypt.py --size 4M --reps 20 --rounds 3
    sudo python bench/encrypt.py --wan           # emulated WAN: 2 sites, 2 Gbit/s, RTT 50 ms, 64/256 MiB

Both runs force TCP (PYCOLL_TRANSPORT=tcp: on one host pycoll would use shared memory, which
encryption leaves alone) and share the group secret; only PYCOLL_ENCRYPT differs. Rounds
alternate plain and encrypted groups, so a busy host slows both alike; we report the median
of rank 0's timed calls (each after a barrier) over all rounds, and the ratio TLS / TCP.
Gloo (torch.distributed, TCP, unencrypted) runs in the same run when torch is installed.

--wan: the same comparison across the emulated WAN (pycoll.emulator: two peers in network
namespaces, every directed link capped at --rate, --delay one way, the kernel's own TCP buffer
limits, stripes and socket buffers from pycoll.net.links.link_plan as bench/wan.py uses them).
Each round starts a plain group, then an encrypted one, then Gloo, each in fresh processes;
printed per size: rank 0's median time, busbw as a fraction of the link, TLS / TCP.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.abspath(__file__)
sys.path.insert(0, ROOT)  # run from a checkout
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


def wan_worker(cfg):
    """One rank inside an emulated peer: times all_reduce per size, rank 0 prints RESULT."""
    import numpy as np
    rank, master = int(os.environ["PEER_RANK"]), os.environ["PEER_IPS"].split(",")[0]
    out = {}
    if cfg["kind"] == "gloo":
        import torch
        import torch.distributed as dist
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "emu0")
        dist.init_process_group("gloo", init_method=f"tcp://{master}:{cfg['port']}", rank=rank, world_size=2)
        for s in cfg["sizes"]:
            x = torch.ones(s // 4)
            dist.all_reduce(x)
            ts = []
            for _ in range(cfg["reps"]):
                dist.barrier()
                t = time.perf_counter()
                dist.all_reduce(x)
                ts.append(time.perf_counter() - t)
            out[str(s)] = ts
        dist.destroy_process_group()
    else:
        import pycoll
        comm = pycoll.init(rank=rank, world_size=2, master_addr=master, master_port=cfg["port"], timeout=300,
                           stripes=cfg["stripes"], sockbuf=cfg["sockbuf"], join_timeout=120)
        warm = np.ones(1 << 20, np.float32)
        comm.all_reduce(warm)  # connections (TLS handshakes), plans
        for s in cfg["sizes"]:
            x = np.ones(s // 4, np.float32)
            comm.all_reduce(x)
            ts = []
            for _ in range(cfg["reps"]):
                comm.barrier()
                t = time.perf_counter()
                comm.all_reduce(x)
                ts.append(time.perf_counter() - t)
            out[str(s)] = ts
        comm.close()
    if rank == 0:
        print("RESULT " + json.dumps(out), flush=True)


def _wan_run(emu, cfg, env, timeout=600):
    procs = [emu.run_python(r, [HERE, "--wan-worker", json.dumps(cfg)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for r in range(2)]
    res = None
    for r, p in enumerate(procs):
        try:
            o, e = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise SystemExit(f"{cfg['kind']}: rank {r} did not finish in {timeout} s")
        if p.returncode:
            raise SystemExit(f"{cfg['kind']}: rank {r} exit {p.returncode}: {e[-2000:]}")
        for line in o.splitlines():
            if line.startswith("RESULT "):
                res = json.loads(line[7:])
    return res


def wan_main(a):
    from pycoll.emulator import Emulator, EmuSpec, available, parse_rate, parse_time
    from pycoll.net import links
    ok, why = available()
    if not ok:
        print(f"# cannot emulate a network here: {why}")
        return 2
    rate, delay = parse_rate(a.rate), parse_time(a.delay)
    sizes = [parse_size(s) for s in a.sizes.split(",")]
    plan = links.link_plan(rate / 8, 2 * delay)
    try:
        import torch.distributed  # noqa: F401
        kinds = ["tcp", "tls", "gloo"]
    except ImportError:
        kinds = ["tcp", "tls"]
        print("gloo: skipped (torch is not installed)")
    base = {"PYTHONPATH": ROOT, "PYTHONUNBUFFERED": "1", "PYCOLL_SECRET": "bench-secret",
            "TORCH_DEVICE_BACKEND_AUTOLOAD": "0", "PYCOLL_ENCRYPT": "0"}
    times = {(k, s): [] for k in kinds for s in sizes}
    spec = EmuSpec.uniform(2, rate_bps=rate, delay_s=delay)
    with Emulator(spec, tcp_buffers=False) as emu:  # the kernel's TCP buffer limits, as bench/wan.py
        port = 46100
        for rnd in range(a.rounds):
            for k in kinds:
                port += 1
                cfg = {"kind": k, "sizes": sizes, "reps": a.reps, "port": port, "stripes": plan.stripes,
                       "sockbuf": plan.sockbuf}
                res = _wan_run(emu, cfg, dict(base, PYCOLL_ENCRYPT="1" if k == "tls" else "0"))
                for s in sizes:
                    times[(k, s)] += res[str(s)]
                print(f"# round {rnd + 1}/{a.rounds} {k}: "
                      + ", ".join(f"{human_size(s)} {statistics.median(res[str(s)]):.3f} s" for s in sizes), flush=True)
    print(f"\n## all_reduce float32 sum, 2 peers, {a.rate} links, RTT {2 * delay * 1e3:.0f} ms, k={plan.stripes} "
          f"stripes, sockbuf {plan.sockbuf >> 20} MiB; {a.rounds} rounds x {a.reps} calls, rank 0 medians\n")
    print("| size | " + " | ".join(f"{k} time | {k} of link" for k in kinds) + " | TLS / TCP time |"
          + (" Gloo / TLS time |" if "gloo" in kinds else ""))
    print("|---" * (2 + 2 * len(kinds) + ("gloo" in kinds)) + "|")
    for s in sizes:
        med = {k: statistics.median(times[(k, s)]) for k in kinds}
        row = [human_size(s)] + [x for k in kinds for x in (f"{med[k]:.3f} s", f"{s * 8 / med[k] / rate:.0%}")]
        row.append(f"{med['tls'] / med['tcp']:.2f}x")
        if "gloo" in kinds:
            row.append(f"{med['gloo'] / med['tls']:.1f}x")
        print("| " + " | ".join(row) + " |")
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="16M")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--reps", type=int, default=None, help="timed calls per round (default 10; --wan 3)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--wan", action="store_true", help="across the emulated WAN (needs root)")
    ap.add_argument("--rate", default="2gbit", help="--wan: cap of each directed link")
    ap.add_argument("--delay", default="25ms", help="--wan: one-way delay")
    ap.add_argument("--sizes", default="64M,256M", help="--wan: sizes")
    ap.add_argument("--wan-worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.wan_worker:
        return wan_worker(json.loads(a.wan_worker))
    if a.wan:
        a.reps = a.reps or 3
        return wan_main(a)
    a.reps = a.reps or 10
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
    sys.exit(main())
