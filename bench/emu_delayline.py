"""Throughput and CPU cost of the emulator's C delay line.

    sudo python3 bench/emu_delayline.py [--seconds 8] [--delay 50ms]

One TCP flow (iperf3 if installed, else pycoll/emulator/probe.py) between two
emulated peers, for each configuration below; reports goodput (whole run and
the second half, i.e. after slow start) and the delay line's CPU use (user +
system time of its process / wall time; 100 % = one core).  Kernel work done
on the delay line's behalf in softirq context on other CPUs is not included.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pycoll.emulator import Emulator, EmuSpec, parse_time  # noqa: E402


def cpu_s(pid):
    with open(f"/proc/{pid}/stat") as f:
        v = f.read().rsplit(")", 1)[1].split()
    return (int(v[11]) + int(v[12])) / os.sysconf("SC_CLK_TCK")


def one(delay, rate, mtu, seconds, bufs):
    spec = EmuSpec.uniform(2, rate_bps=rate, delay_s=delay)
    with Emulator(spec, mtu=mtu, tcp_buffers=bufs) as emu:
        c0, t0 = cpu_s(emu.delayline_pid), time.monotonic()
        if shutil.which("iperf3"):
            srv = emu.run_in(1, ["iperf3", "-s", "-1"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
            time.sleep(0.3)
            c0, t0 = cpu_s(emu.delayline_pid), time.monotonic()
            r = emu.exec_in(0, ["iperf3", "-c", emu.peer_ip(1), "-t", str(seconds), "-J"],
                            timeout=seconds + 60)
            j = json.loads(r.stdout)
            per_s = [i["sum"]["bits_per_second"] for i in j["intervals"]]
            total = j["end"]["sum_received"]["bits_per_second"]
            srv.wait(timeout=10)
        else:
            res = emu.measure_transfer(0, 1, seconds=seconds)
            total = res["rate_bps"]
            per_s = [total]  # no per-second detail without iperf3
        c1, t1 = cpu_s(emu.delayline_pid), time.monotonic()
        st = emu.stats()
        fwd = st["links"][0]
    half = per_s[len(per_s) // 2:]
    return {"delay_ms": delay * 1e3, "tcp_buf_MiB": bufs >> 20,
            "rate_cap_mbit": rate / 1e6 if rate else None, "mtu": mtu,
            "goodput_mbit": total / 1e6, "second_half_mbit": sum(half) / len(half) / 1e6,
            "delayline_cpu_pct": 100 * (c1 - c0) / (t1 - t0),
            "max_queue_MB": fwd["max_queue_bytes"] / 1e6, "overflow_drops": fwd["overflow_drops"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=8)
    ap.add_argument("--delay", default="50ms")
    ap.add_argument("--tcp-buffers-mib", type=int, nargs="+", default=[64, 256],
                    help="tcp_rmem/wmem maxima to try for the uncapped runs")
    a = ap.parse_args()
    d = parse_time(a.delay)
    runs = [(None, m, b << 20) for b in a.tcp_buffers_mib for m in (65000, 9000)]
    runs += [(1e9, m, 64 << 20) for m in (65000, 9000)]
    for rate, mtu, bufs in runs:
        r = one(d, rate, mtu, a.seconds, bufs)
        print(json.dumps({k: (round(v, 1) if isinstance(v, float) else v) for k, v in r.items()}),
              flush=True)


if __name__ == "__main__":
    main()
