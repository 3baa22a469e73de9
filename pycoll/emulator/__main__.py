"""Command line: run a command in every peer of an emulated network.

    python -m pycoll.emulator --peers 3 --rate 100mbit --delay 25ms --loss 0.001 -- CMD...
    python -m pycoll.emulator --peers 2 --delay 20ms --check

Each peer runs CMD with PEER_RANK, PEER_WORLD_SIZE, PEER_IPS (comma-separated
addresses, index = rank), PEER_IP and PEER_NETNS in its environment.  The
exit status is 0 if every peer's command succeeded, else the first non-zero
status.  Everything is torn down on exit, Ctrl-C or SIGTERM.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import List, Optional

from .core import Emulator, available
from .spec import EmuSpec, parse_rate, parse_time


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pycoll.emulator", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peers", type=int, default=2, help="number of hosts (default 2)")
    p.add_argument("--rate", default=None,
                   help="per-link cap, e.g. 100mbit (= 100mbps: megabits/s), 1gbit, 125MB/s (default none)")
    p.add_argument("--delay", default="0ms", help="one-way delay per link, e.g. 25ms")
    p.add_argument("--jitter", default="0ms", help="+- uniform jitter (never reorders)")
    p.add_argument("--loss", type=float, default=0.0, help="per-packet loss probability")
    p.add_argument("--nic", default=None, help="per-host NIC cap (each direction), e.g. 1gbit")
    p.add_argument("--mtu", type=int, default=65000, help="TUN MTU (default 65000)")
    p.add_argument("--seed", type=int, default=1, help="loss/jitter PRNG seed")
    p.add_argument("--timeout", default="3600s", help="kill the commands after this long")
    p.add_argument("--keep-logs", action="store_true", help="keep the delay line's temp dir")
    p.add_argument("--check", action="store_true", help="self-test: ping every pair, one "
                   "bulk transfer, print delay-line counters")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    return p


def _check(emu: Emulator, rate: Optional[float]) -> int:
    ok = True
    print(f"namespaces: {', '.join(emu.netns)}")
    res = emu.loopback_check()
    print("pair      rtt_ms  expected_ms  connect_ms")
    for (u, v), r in sorted(res.items()):
        bad = r["rtt"] < 0.95 * r["expected"] or r["rtt"] > r["expected"] + max(0.02, r["expected"] / 2)
        ok &= not bad
        print(f"{u:>2} -> {v:<2}  {r['rtt'] * 1e3:7.2f}  {r['expected'] * 1e3:11.2f}  "
              f"{r['connect_s'] * 1e3:10.2f}{'  <-- unexpected' if bad else ''}")
    t = emu.measure_transfer(0, 1, seconds=2.0)
    exact = t["sha256"] == t["sent_sha256"] and t["bytes"] == t["sent_bytes"]
    ok &= exact
    rr = f" ({t['rate_bps'] / rate * 100:.0f}% of cap)" if rate and t["rate_bps"] else ""
    print(f"transfer 0 -> 1: {t['bytes']} bytes in {t['seconds']:.2f}s, "
          f"{(t['rate_bps'] or 0) / 1e6:.1f} Mbit/s{rr}, byte-exact: {exact}")
    for l in emu.stats()["links"]:
        print(f"link {l['src']}->{l['dst']}: in {l['in_pkts']} out {l['out_pkts']} "
              f"loss-drops {l['loss_drops']} overflow {l['overflow_drops']} "
              f"max-queue {l['max_queue_bytes']}B")
    print("check:", "OK" if ok else "FAILED")
    return 0 if ok else 1


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd and not args.check:
        _parser().error("give --check or -- CMD...")
    ok, why = available()
    if not ok:
        print(f"emulator unavailable: {why}", file=sys.stderr)
        return 2
    rate = parse_rate(args.rate)
    spec = EmuSpec.uniform(args.peers, rate, parse_time(args.delay), args.loss,
                           parse_time(args.jitter), parse_rate(args.nic))
    timeout = parse_time(args.timeout)
    try:
        return _run(spec, args, cmd, rate, timeout)
    except KeyboardInterrupt:  # the with-block has already torn everything down
        print("interrupted", file=sys.stderr)
        return 130


def _run(spec, args, cmd, rate, timeout) -> int:
    with Emulator(spec, mtu=args.mtu, seed=args.seed, keep_logs=args.keep_logs) as emu:
        if args.keep_logs:
            print(f"logs: {emu.log_dir}", file=sys.stderr)
        if args.check:
            rc = _check(emu, rate)
            if not cmd:
                return rc
        procs = [emu.run_in(r, cmd) for r in range(args.peers)]
        end = time.monotonic() + timeout
        while time.monotonic() < end and any(p.poll() is None for p in procs):
            time.sleep(0.05)
        codes = [p.poll() for p in procs]
        if any(c is None for c in codes):
            print(f"timeout after {timeout:.0f}s; killing peers", file=sys.stderr)
            return 124
        return next((c for c in codes if c != 0), 0)


if __name__ == "__main__":
    sys.exit(main())
