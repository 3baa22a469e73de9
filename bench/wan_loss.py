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


def allowed_cc():
    """What a network namespace may select (tcp_allowed_congestion_control; here reno and bbr:
    cubic is available but not allowed outside the initial namespace)."""
    with open("/proc/sys/net/ipv4/tcp_allowed_congestion_control") as f:
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
    ap.add_argument("--buffers", default="kernel,64M",
                    help="socket buffer maxima to compare: 'kernel' (tcp_wmem max 4 MiB here) and/or sizes")
    args = ap.parse_args(argv)
    from pycoll.emulator import Emulator, EmuSpec, parse_rate, parse_time
    rate, rtt = parse_rate(args.rate), parse_time(args.rtt)
    ccs = args.cc.split(",") if args.cc else [c for c in allowed_cc() if c != "reno"] or allowed_cc()
    flows = [int(k) for k in args.flows.split(",")]
    mss = args.mtu - 52  # IPv4 + TCP with timestamps
    print(f"## {args.rate}, RTT {args.rtt}, loss {args.loss:.2%}, MTU {args.mtu}, {args.seconds:.0f} s per run\n")
    print("| congestion control | buffers (max) | connections | goodput | of the link | window bound | "
          "Mathis bound (loss-based) |")
    print("|---|---|---|---|---|---|---|")
    from pycoll.units import parse_size
    for cc, buf in [(c, b) for c in ccs for b in args.buffers.split(",")]:
        spec = EmuSpec.uniform(2, rate_bps=rate, delay_s=rtt / 2, loss=args.loss)
        mx = 4 << 20 if buf == "kernel" else parse_size(buf)
        with Emulator(spec, mtu=args.mtu, congestion=cc, seed=7,
                      tcp_buffers=False if buf == "kernel" else mx) as emu:
            for k in flows:
                res = emu.measure_transfers([(0, 1)] * k, seconds=args.seconds, port=44300,
                                            timeout=args.seconds * 3 + 60)
                got = _steady_rate(res, args.seconds * 0.4)
                mathis = k * mss * 8 / rtt * 1.22 / math.sqrt(args.loss) if args.loss else math.inf
                window = k * mx * 8 / rtt  # all of tcp_wmem's max in flight each round trip (an upper bound)
                print(f"| {cc} | {buf} | {k} | {got / 1e6:.0f} Mbit/s | {got / rate:.0%} | "
                      f"{min(window, rate) / rate:.0%} | {min(mathis, rate) / rate:.0%} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
