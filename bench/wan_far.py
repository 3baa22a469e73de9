"""The far-WAN case: where pycoll's all-reduce time goes at RTT 200 ms with 0.1 % loss.

    sudo python bench/wan_far.py                     # 2 peers, 2 Gbit/s, 64 and 256 MiB, ~3 minutes

Two emulated hosts (pycoll.emulator, MTU 65000, 64 MiB socket buffer maxima, BBR: what the
namespaces may use here), pycoll with k stripes (default 16), float32 all-reduce, median of 3 after
a warm-up, busbw as a fraction of the link, next to the bound of the schedule itself: a 2-rank
ring all-reduce moves S bytes per direction and waits for two one-way latencies (reduce-scatter,
then all-gather), so t >= S/B + 2L, whatever TCP does. Run with the kernel's
tcp_slow_start_after_idle=1 (every collective after a pause starts in slow start) and with 0.
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.abspath(__file__)
sys.path.insert(0, ROOT)


def worker(a):
    import numpy as np
    import pycoll
    comm = pycoll.init(rank=a.rank, world_size=2, master_addr=a.master, master_port=a.port, timeout=300,
                       stripes=a.stripes)
    out = {}
    for s in [int(x) for x in a.sizes.split(",")]:
        x = np.ones(s // 4, np.float32)
        comm.all_reduce(x, algorithm="ring")
        ts = []
        for _ in range(3):
            comm.barrier()
            time.sleep(0.5)  # a pause, as between training steps
            t = time.perf_counter()
            comm.all_reduce(x, algorithm="ring")
            ts.append(time.perf_counter() - t)
        out[str(s)] = float(np.median(ts))
    comm.close()
    if a.rank == 0:
        print("RESULT " + json.dumps(out), flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", default="2gbit")
    ap.add_argument("--delay", default="100ms", help="one way")
    ap.add_argument("--loss", type=float, default=0.001)
    ap.add_argument("--sizes", default="64M,256M")
    ap.add_argument("--stripes", type=int, default=16)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for n in ("--rank", "--port"):
        ap.add_argument(n, type=int, help=argparse.SUPPRESS)
    ap.add_argument("--master", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return worker(a)
    from pycoll.benchmark import human_size, parse_size
    from pycoll.emulator import Emulator, EmuSpec, parse_rate, parse_time
    rate, delay = parse_rate(a.rate), parse_time(a.delay)
    sizes = [parse_size(s) for s in a.sizes.split(",")]
    a.sizes = ",".join(map(str, sizes))
    print(f"## 2 peers, {a.rate}, RTT {2 * delay * 1e3:.0f} ms, loss {a.loss:.1%}, {a.stripes} stripes, ring all-reduce\n")
    print("| slow start after idle | size | time | busbw / link | bound S/B + 2L |")
    print("|---|---|---|---|---|")
    env = {"PYTHONPATH": ROOT, "TORCH_DEVICE_BACKEND_AUTOLOAD": "0"}
    for idle in (1, 0):
        spec = EmuSpec.uniform(2, rate_bps=rate, delay_s=delay, loss=a.loss)
        with Emulator(spec, congestion="bbr", sysctls=[f"net.ipv4.tcp_slow_start_after_idle={idle}"]) as emu:
            port = 44200 + idle
            procs = [emu.run_in(r, [sys.executable, HERE, "--worker", "--rank", str(r), "--master", emu.peer_ip(0),
                                    "--port", str(port), "--sizes", a.sizes, "--stripes", str(a.stripes)],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                     for r in range(2)]
            res = None
            for p in procs:
                o, e = p.communicate(timeout=600)
                if p.returncode:
                    raise RuntimeError(e[-2000:])
                for line in o.splitlines():
                    if line.startswith("RESULT "):
                        res = json.loads(line[7:])
        for s in sizes:
            t = res[str(s)]
            bound = (s * 8 / rate) / (s * 8 / rate + 2 * delay)
            print(f"| {'on' if idle else 'off'} | {human_size(s)} | {t:.2f} s | {s * 8 / t / rate:.0%} | {bound:.0%} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
