"""Two racks behind one shared uplink each (Rina's case): every pycoll algorithm, Gloo, and a
rack-oblivious ring order, all-reduce 1-64 MiB, in the topology emulator.

    sudo python bench/shared_uplink.py                       # 2 racks of 4, 100 Mbit/s uplink, 1 Gbit/s NICs
    sudo python bench/shared_uplink.py --sizes 1M,4M --json out.json

The network (pycoll.emulator, sites): each rack is a router namespace with a bridge; its 4 ranks
hang off it on veths capped at the NIC rate; the two routers are joined through the delay line
(``--delay`` one way) and each router shapes everything its rack sends to, and receives from,
the other rack to ``--uplink`` (one drop-tail queue per direction, shared by every flow).

Two runs in it:

* rack-aware: ranks 0-3 in rack 0, 4-7 in rack 1, with the topology (topologies/
  two-racks-shared.toml, rates from the flags): ring (rack-aware order: crosses each uplink
  once per direction), hamiltonian (multi-ring), tree, innetwork (rack aggregators, a ring of
  2 across the uplink), auto, and Gloo in the same processes, interleaved.
* rack-oblivious: rank r in rack r % 2 and no topology, so the ring 0..7 crosses the uplink
  at every hop (4 flows per direction on one uplink): what a scheduler that ignores racks gets.

Printed: median time per size (rank 0, float32, barrier before each), busbw, the ratios the
issue asks for (innetwork vs the rack-aware ring and vs the oblivious ring), what ``auto`` ran
and whether that was the fastest measured. Rates are low (100 Mbit/s uplink) so a 2-core
machine is not the bottleneck. About 12 minutes with the defaults.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
import algorithms  # noqa: E402  (its worker runs the timed collectives)
from pycoll.benchmark import collect_results, human_size, parse_size  # noqa: E402

TOPOLOGY = """name = "two-racks-shared-emu"
[defaults]
latency = "{delay}"
host_nic = "{nic}"
[intra]
latency = "50us"
[[group]]
name = "rack0"
count = {k}
aggregator = "agent"
uplink = "{uplink}"
[[group]]
name = "rack1"
count = {k}
aggregator = "agent"
uplink = "{uplink}"
"""
ALGOS = ["ring", "hamiltonian", "tree", "innetwork", "auto"]


class _Args:  # what algorithms.worker_argv reads
    def __init__(self, sizes, algos, scale, gloo):
        self.sizes, self.colls, self.algos, self.scale, self.no_gloo = sizes, "all_reduce", algos, scale, not gloo


def run(spec, n, topo_path, algos, sizes, scale, gloo, timeout, mtu=9000, sysctls=()):
    from pycoll.emulator import Emulator
    env = {"PYTHONUNBUFFERED": "1", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "GLOO_SOCKET_IFNAME": "emu0", "PYCOLL_TIMEOUT": "600", "TORCH_DEVICE_BACKEND_AUTOLOAD": "0"}
    a = _Args(sizes, ",".join(algos), scale, gloo)
    with Emulator(spec, mtu=mtu, sysctls=sysctls) as emu:
        port = 44000 + os.getpid() % 450 * 2
        procs = [emu.run_in(r, algorithms.worker_argv("pycoll", r, n, emu.peer_ip(0), port, a, topo_path, True),
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for r in range(n)]
        return collect_results(procs, timeout, "shared-uplink run")[-1]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1M,4M,16M,64M")
    ap.add_argument("--rack", type=int, default=4, help="ranks per rack (2 racks)")
    ap.add_argument("--uplink", default="100mbit")
    ap.add_argument("--nic", default="1gbit")
    ap.add_argument("--delay", default="5ms", help="one way, between the racks")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply the repetition counts")
    ap.add_argument("--no-gloo", action="store_true")
    ap.add_argument("--no-oblivious", action="store_true", help="skip the rack-oblivious run")
    ap.add_argument("--mtu", type=int, default=9000, help="emulated MTU (default 9000: a 100 Mbit/s uplink's "
                    "queue holds tens of packets, not a handful)")
    ap.add_argument("--no-idle-restart", action="store_true",
                    help="net.ipv4.tcp_slow_start_after_idle=0 on every host (the kernel default restarts "
                         "a connection idle for one RTO in slow start, but not under BBR, which is exempt)")
    ap.add_argument("--json")
    ap.add_argument("--timeout", type=float, default=1800)
    args = ap.parse_args(argv)

    from pycoll.emulator import EmuSpec, SiteSpec
    from pycoll.plan.topology import load_topology
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    k, n = args.rack, 2 * args.rack
    tmp = tempfile.mkdtemp(prefix="pycoll-uplink-")
    topo_path = os.path.join(tmp, "two-racks-shared.toml")
    with open(topo_path, "w") as f:
        f.write(TOPOLOGY.format(delay=args.delay, nic=args.nic, uplink=args.uplink, k=k))
    topo = load_topology(topo_path)
    aware = EmuSpec.from_topology(topo)
    t0 = time.monotonic()
    sysctls = ["net.ipv4.tcp_slow_start_after_idle=0"] if args.no_idle_restart else []
    res = run(aware, n, topo_path, ALGOS, sizes, args.scale, not args.no_gloo, args.timeout, args.mtu, sysctls)
    t_aware = time.monotonic() - t0
    obl = {}
    if not args.no_oblivious:
        up = aware.sites[0].uplink_bps
        spec = EmuSpec(n, link=aware.link, host_nic_bps=aware.host_nic_bps,
                       sites=[SiteSpec(tuple(range(0, n, 2)), up, "rack0"), SiteSpec(tuple(range(1, n, 2)), up, "rack1")])
        t0 = time.monotonic()
        obl = run(spec, n, "", ["ring"], sizes, args.scale, False, args.timeout, args.mtu, sysctls)
    t_obl = time.monotonic() - t0
    report(args, n, sizes, res, obl, t_aware, t_obl)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "aware": res, "oblivious": obl}, f, indent=1)
    return 0


def report(args, n, sizes, res, obl, t_aware, t_obl):
    impls = ALGOS + (["gloo"] if not args.no_gloo else [])
    print(f"\n## all_reduce, float32, 2 racks of {args.rack}, shared uplink {args.uplink} per direction, "
          f"NICs {args.nic}, {args.delay} one way between racks, MTU {args.mtu}"
          f"{', no slow start after idle' if args.no_idle_restart else ''} [{t_aware:.0f} s + {t_obl:.0f} s]")
    print("median time (busbw MB/s); 'oblivious ring': rank r in rack r % 2, no topology\n")
    head = ["size"] + impls + (["oblivious ring"] if obl else []) + ["innetwork/ring"] + (
        ["innetwork/oblivious"] if obl else []) + ["auto ran", "fastest", "auto/fastest"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    bus = 2 * (n - 1) / n
    for s in sizes:
        t = {i: res[f"all_reduce {s} {i}"][0] for i in impls if f"all_reduce {s} {i}" in res}
        if obl:
            t["oblivious ring"] = obl[f"all_reduce {s} ring"][0]
        cells = [human_size(s)] + [f"{t[i]:.2f} s ({s * bus / t[i] / 1e6:.1f})" if i in t else "-"
                                   for i in impls + (["oblivious ring"] if obl else [])]
        cells.append(f"{t['ring'] / t['innetwork']:.2f}x")
        if obl:
            cells.append(f"{t['oblivious ring'] / t['innetwork']:.2f}x")
        ours = {a: t[a] for a in ALGOS if a != "auto" and a in t}
        fastest = min(ours, key=ours.get)
        cells += [res[f"all_reduce {s} auto"][1], fastest, f"{t['auto'] / ours[fastest]:.2f}"]
        print("| " + " | ".join(cells) + " |")
    model, points = res["model"]
    print(f"\nauto's model: {model}")
    print("auto switch points: " + ", ".join(f"from {human_size(x)}: {a}" for x, a in points["all_reduce"]))


if __name__ == "__main__":
    sys.exit(main())
