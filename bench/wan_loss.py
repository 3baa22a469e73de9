"""What limits TCP over a long lossy link: congestion control against connections, in the emulator.

    sudo python bench/wan_loss.py                    # 1 Gbit/s, RTT 200 ms, 0.1 % loss, ~4 minutes
    sudo python bench/wan_loss.py --rate 2gbit --seconds 30 --flows 1,4,16

Bulk TCP transfers between two emulated hosts (pycoll.emulator: the delay line drops packets
i.i.d. with the given probability; 64 MiB socket buffer maxima, so windows are not the limit),
k parallel connections, for each congestion control the host offers (net.ipv4.
tcp_available_congestion_control). Printed: the goodput of all k together over the window in
which all ran (from 40 % of the run: slow start), as a fraction of the link, next to the
Mathis et al. bound for loss-based TCP, k * MSS / RTT * 1.22 / sqrt(p).

The same sockets are what pycoll's stripes are, so the table says how many stripes a lossy
long link needs under each congestion control, and whether the kernel's choice is the limit.
"""
import argparse
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def available_cc():
    with open("/proc/sys/net/ipv4/tcp_available_congestion_control") as f:
        return f.read().split()


def _steady_rate(results, skip):
    """Bits/s of all flows together after ``skip`` seconds from the last flow's start (slow start
    at a 200 ms round trip lasts seconds), to the first flow's end."""
    from pycoll.emulator.core import _bytes_at
    t0 = max(r["t_first"] for r in results) + skip
    t1 = min(r["t_last"] for r in results)
    if t1 - t0 < 1.0:
        return 0.0
    return sum(_bytes_at(r["timeline"], t1) - _bytes_at(r["timeline"], t0) for r in results) * 8 / (t1 - t0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", default="1gbit")
    ap.add_argument("--rtt", default="200ms")
    ap.add_argument("--loss", type=float, default=0.001)
    ap.add_argument("--flows", default="1,4,16")
    ap.add_argument("--cc", default=None, help="congestion controls (default: all available but reno)")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--mtu", type=int, default=9000)
    args = ap.parse_args(argv)
    from pycoll.emulator import Emulator, EmuSpec, parse_rate, parse_time
    rate, rtt = parse_rate(args.rate), parse_time(args.rtt)
    ccs = args.cc.split(",") if args.cc else [c for c in available_cc() if c != "reno"]
    flows = [int(k) for k in args.flows.split(",")]
    mss = args.mtu - 52  # IPv4 + TCP with timestamps
    print(f"## {args.rate}, RTT {args.rtt}, loss {args.loss:.2%}, MTU {args.mtu}, {args.seconds:.0f} s per run\n")
    print("| congestion control | connections | goodput | of the link | Mathis bound (loss-based) |")
    print("|---|---|---|---|---|")
    for cc in ccs:
        spec = EmuSpec.uniform(2, rate_bps=rate, delay_s=rtt / 2, loss=args.loss)
        with Emulator(spec, mtu=args.mtu, congestion=cc, seed=7) as emu:
            for k in flows:
                res = emu.measure_transfers([(0, 1)] * k, seconds=args.seconds, port=44300,
                                            timeout=args.seconds * 3 + 60)
                got = _steady_rate(res, args.seconds * 0.4)
                mathis = k * mss * 8 / rtt * 1.22 / math.sqrt(args.loss) if args.loss else math.inf
                print(f"| {cc} | {k} | {got / 1e6:.0f} Mbit/s | {got / rate:.0%} | "
                      f"{min(mathis, rate) / rate:.0%} of the link |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
