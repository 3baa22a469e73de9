"""The far-WAN case: where pycoll's all-reduce time goes at RTT 200 ms with 0.1 % loss.

    sudo python bench/wan_far.py                     # 2 peers, 2 Gbit/s, 64 and 256 MiB, 4 and 16 stripes, ~3 minutes
    sudo python bench/wan_far.py --loss 0            # the schedule alone, no loss recovery
    sudo python bench/wan_far.py --stripes 4,16 --segments 1M,256K --idle 1,0

Two emulated hosts (pycoll.emulator, MTU 65000, 64 MiB socket buffer maxima, BBR: what the
namespaces may use here), pycoll's ring all-reduce with k stripes and a pipeline segment, float32,
median of --reps after a warm-up, each after a 0.5 s pause (as between training steps); busbw as a
fraction of the link, next to two bounds of a 2-rank ring that moves S bytes per direction over a
link of B bytes/s with one-way latency L:

* S/B + 2L: reduce-scatter, then all-gather, one latency each (no pipelining across the phases);
* S/B + L: pycoll's ring pipelines by segment: a segment of the all-gather leaves as soon as the
  same segment of the reduce-scatter has arrived and been reduced, so while S/2B > L the link
  never idles and only the last segment's trip is paid (plus a segment's time on its stripe).

Times run from the first rank's start to the last rank's end (the namespaces share the host's
monotonic clock), so a rank that left the barrier early does not shorten them. Next to pycoll,
in the same network, the raw exchange: each rank sends S bytes to the other over the same
number of fresh TCP connections at once (Python threads, sendall/recv_into) after the same pause:
what any algorithm needs at least on this host, CPU and emulator included. Loss costs whole round
trips on top: the delay line's loss drops per configuration are printed.
``--idle`` sets net.ipv4.tcp_slow_start_after_idle in the namespaces; with BBR the kernel skips
the idle restart whatever it says (tcp_slow_start_after_idle_check returns early for congestion
controls with their own cong_control), so 1 and 0 measure the same thing.
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
sys.path.insert(0, ROOT)


def _raw_pair(a, comm):
    """a.stripes TCP connections to the other rank (rank 0 listens), 64 MiB-capable like pycoll's."""
    import socket
    if a.rank == 0:
        srv = socket.create_server(("0.0.0.0", a.port + 1000))
        comm.barrier()
        socks = [srv.accept()[0] for _ in range(a.stripes)]
        srv.close()
    else:
        comm.barrier()
        socks = [socket.create_connection((a.master, a.port + 1000)) for _ in range(a.stripes)]
    for s in socks:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return socks


def _raw_exchange(socks, nbytes, buf):
    """nbytes each way over all socks at once, split evenly: what any algorithm must move."""
    import threading
    per = nbytes // len(socks)

    def send(s):
        view = memoryview(buf)[:per]
        s.sendall(view)

    def recv(s):
        view, got = memoryview(buf)[per:2 * per], 0
        while got < per:
            n = s.recv_into(view[got:])
            if not n:
                raise ConnectionError("peer closed")
            got += n
    ts = [threading.Thread(target=f, args=(s,)) for s in socks for f in (send, recv)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()


def worker(a):
    import numpy as np
    import pycoll
    comm = pycoll.init(rank=a.rank, world_size=2, master_addr=a.master, master_port=a.port, timeout=300,
                       stripes=a.stripes, segment_bytes=a.segment)
    socks = _raw_pair(a, comm) if a.raw else None
    out = {}
    for s in [int(x) for x in a.sizes.split(",")]:
        x = np.ones(s // 4, np.float32)
        raw = bytearray(2 * (s // a.stripes)) if a.raw else None
        run = (lambda: _raw_exchange(socks, s, raw)) if a.raw else (lambda: comm.all_reduce(x, algorithm="ring"))
        run()
        spans = []
        for _ in range(a.reps):
            comm.barrier()
            time.sleep(0.5)  # a pause, as between training steps
            t = time.monotonic()  # one clock for both ranks: the namespaces share the host's
            run()
            spans.append((t, time.monotonic()))
        out[str(s)] = spans
    comm.barrier()
    for sk in socks or ():
        sk.close()
    comm.close()
    print("RESULT " + json.dumps(out), flush=True)


def _losses(emu):
    return sum(link.get("loss_drops", 0) for link in emu.stats().get("links", []))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", default="2gbit")
    ap.add_argument("--delay", default="100ms", help="one way")
    ap.add_argument("--loss", type=float, default=0.001)
    ap.add_argument("--sizes", default="64M,256M")
    ap.add_argument("--stripes", default="4,16", help="comma-separated connection counts to compare")
    ap.add_argument("--segments", default="1M", help="comma-separated pipeline segments to compare")
    ap.add_argument("--idle", default="1", help="tcp_slow_start_after_idle values (comma-separated)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-raw", action="store_true", help="skip the raw TCP exchange of the same bytes")
    ap.add_argument("--raw", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json", help="write the results here too")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for n in ("--rank", "--port", "--segment"):
        ap.add_argument(n, type=int, help=argparse.SUPPRESS)
    ap.add_argument("--master", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        a.stripes = int(a.stripes)
        return worker(a)
    from pycoll.benchmark import human_size, parse_size
    from pycoll.emulator import Emulator, EmuSpec, parse_rate, parse_time
    rate, delay = parse_rate(a.rate), parse_time(a.delay)
    sizes = [parse_size(s) for s in a.sizes.split(",")]
    a.sizes = ",".join(map(str, sizes))
    print(f"## 2 peers, {a.rate}, RTT {2 * delay * 1e3:.0f} ms, loss {a.loss:.1%}, ring all-reduce, "
          f"median of {a.reps} (time: first start to last end over both ranks, one host clock)\n")
    print("| slow start after idle | stripes | segment | size | pycoll | busbw / link | raw TCP, same bytes | "
          "pycoll / raw | bound S/B + L | bound S/B + 2L | packets lost |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    env = {"PYTHONPATH": ROOT, "TORCH_DEVICE_BACKEND_AUTOLOAD": "0"}
    rows, ports = [], iter(range(46200, 46900))

    def pair(emu, k, seg, raw):
        """Both ranks' (start, end) per timed call -> {size: [seconds]}, and the packets lost meanwhile."""
        lost0, port = _losses(emu), next(ports)
        argv_ = [sys.executable, HERE, "--worker", "--master", emu.peer_ip(0), "--port", str(port),
                 "--sizes", a.sizes, "--stripes", str(k), "--segment", str(seg), "--reps", str(a.reps)]
        procs = [emu.run_in(r, argv_ + ["--rank", str(r)] + (["--raw"] if raw else []), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
        res = []
        for p in procs:
            o, e = p.communicate(timeout=600)
            if p.returncode:
                raise RuntimeError(e[-2000:])
            res += [json.loads(line[7:]) for line in o.splitlines() if line.startswith("RESULT ")]
        spans = {s: [max(x[1], y[1]) - min(x[0], y[0]) for x, y in zip(res[0][str(s)], res[1][str(s)])]
                 for s in sizes}
        return spans, _losses(emu) - lost0

    for idle in (int(x) for x in a.idle.split(",")):
        spec = EmuSpec.uniform(2, rate_bps=rate, delay_s=delay, loss=a.loss)
        with Emulator(spec, congestion="bbr", sysctls=[f"net.ipv4.tcp_slow_start_after_idle={idle}"]) as emu:
            for k in (int(x) for x in a.stripes.split(",")):
                raw, raw_lost = pair(emu, k, 1 << 20, True) if not a.no_raw else ({}, 0)
                for seg in (parse_size(x) for x in a.segments.split(",")):
                    got, lost = pair(emu, k, seg, False)
                    for s in sizes:
                        t = statistics.median(got[s])
                        r = statistics.median(raw[s]) if raw else float("nan")
                        wire = s * 8 / rate
                        rows.append(dict(idle=idle, stripes=k, segment=seg, nbytes=s, times=got[s], raw=raw.get(s),
                                         lost=lost, raw_lost=raw_lost))
                        print(f"| {'on' if idle else 'off'} | {k} | {human_size(seg)} | {human_size(s)} | {t:.2f} s | "
                              f"{wire / t:.0%} | {r:.2f} s ({wire / r:.0%}) | {r / t:.0%} | "
                              f"{wire / (wire + delay):.0%} | {wire / (wire + 2 * delay):.0%} | "
                              f"{lost} ({raw_lost} raw; all sizes) |", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
