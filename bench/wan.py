"""WAN bandwidth: pycoll (1 vs k connections, each algorithm, compression) and
Gloo over emulated long fat links, in one run.

    sudo python bench/wan.py                       # four scenarios, about 6 minutes
    sudo python bench/wan.py --quick               # two sites at 256 MiB, about 1.5 minutes
    sudo python bench/wan.py --scenario custom --peers 3 --rate 1gbit --delay 50ms --loss 0.01 --sizes 64M

Scenarios (SCENARIOS below): two-sites (2 peers, 2 Gbit/s, RTT 50 ms, 16-256
MiB, every configuration), lossy (the same with 0.5 % loss and +-2 ms
jitter), three-sites (3 peers, 1 Gbit/s, RTT 50 ms: every algorithm), far
(RTT 200 ms, 0.1 % loss). Each builds a pycoll.emulator network (network
namespaces, real TCP; the C delay line adds the one-way delay, jitter and
loss, tc caps every directed link) and starts one worker per peer inside it. The workers run, in order: pycoll with 1 connection per pair
(kernel autotuned buffers), 1 connection with the largest buffers the kernel
grants, k connections with k and buffers from the bandwidth-delay product
(pycoll.net.links.link_plan), every other algorithm pycoll offers with that k, the
codecs, then torch.distributed Gloo (one connection per pair, as Gloo does).

TCP runs with the kernel's defaults inside the namespaces (``tcp_wmem`` max
4 MiB, BBR here): one connection is window-limited, which is the situation
striping exists for on real long-haul paths. Only the emulated links are
capped; CPU is whatever the machine has (the delay line forwards every
packet in user space, on the same cores as the ranks).

Reported per collective, float32, median over repetitions (rank 0's clock,
a barrier before each): bus bandwidth (nccl-tests: all-reduce bytes *
2(n-1)/n / t, all-gather output bytes * (n-1)/n / t) as a fraction of one
emulated link's capacity. A ring keeps one outgoing link per rank busy, so
1.0 is its ceiling; algorithms that use several links per rank (multi-ring)
and compression (fewer bytes on the wire; the fraction counts float32 bytes)
can go beyond.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.abspath(__file__)
sys.path.insert(0, ROOT)
from pycoll.benchmark import human_size, parse_size  # noqa: E402






def reps_for(nbytes, seconds_per_rep):
    """Repetitions: about 6 s of traffic per size, at least 1, at most 5."""
    return max(1, min(5, int(6.0 / max(seconds_per_rep, 1e-3))))


# ---- worker: runs inside a peer's namespace -----------------------------------
def _timed(fn, barrier, agree):
    """One timed run, then as many more as fit the per-size budget; the
    ranks agree on the count (their first times differ)."""
    barrier()
    t = time.perf_counter()
    fn()
    times = [time.perf_counter() - t]
    for _ in range(reps_for(0, agree(times[0])) - 1):
        barrier()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def worker(cfg):
    import numpy as np
    rank, n = int(os.environ["PEER_RANK"]), int(os.environ["PEER_WORLD_SIZE"])
    master = os.environ["PEER_IPS"].split(",")[0]
    sizes = cfg["sizes"]
    data = {s: np.random.default_rng([rank, s]).standard_normal(s // 4).astype(np.float32) for s in sizes}
    port = cfg["port"]

    def emit(**rec):
        if rank == 0:
            print("RESULT " + json.dumps(rec), flush=True)

    def progress(**rec):  # the driver prints these as they come: a long run shows where it is
        if rank == 0:
            print("PROGRESS " + json.dumps(rec), flush=True)

    def measure(name, all_reduce, all_gather, barrier, colls, agree):
        for coll in colls:
            for s in sizes:
                progress(config=name, coll=coll, nbytes=s)
                x = data[s]
                if coll == "all_reduce":
                    a = x.copy()
                    fn = lambda: all_reduce(a)  # noqa: E731
                else:
                    part = x[: s // 4 // n]
                    out = np.empty(part.size * n, np.float32)
                    out.fill(0)  # fault the pages in now, not during the first timed run
                    fn = lambda: all_gather(part, out)  # noqa: E731
                times = _timed(fn, barrier, agree)
                emit(config=name, coll=coll, nbytes=s if coll == "all_reduce" else part.nbytes * n,
                     times=times)

    import pycoll
    for i, c in enumerate(cfg["pycoll"]):
        progress(config=c["name"], step="connecting")
        try:
            comm = pycoll.init(rank=rank, world_size=n, master_addr=master, master_port=port + i, timeout=900,
                               stripes=c["stripes"], sockbuf=c["sockbuf"], join_timeout=120)
        except Exception as exc:  # noqa: BLE001 - reported, the run goes on
            emit(config=c["name"], error=f"init: {exc}")
            continue
        try:
            alg, codec = c.get("algorithm", "ring"), c.get("compression", "none")
            warm = np.ones(1 << 20, np.float32)
            comm.all_reduce(warm, algorithm=alg, compression=codec)  # connections, plans, slow start
            comm.all_reduce(warm, algorithm=alg, compression=codec)
            measure(c["name"],
                    lambda a: comm.all_reduce(a, algorithm=alg, compression=codec),
                    lambda p, o: comm.all_gather(p, o, algorithm=alg, compression=codec),
                    comm.barrier, c["colls"], lambda v: float(comm.all_reduce(np.array([v]), op="max")[0]))
        except Exception as exc:  # noqa: BLE001
            emit(config=c["name"], error=f"{type(exc).__name__}: {exc}")
        finally:
            comm.close()
    if cfg.get("gloo"):
        try:
            import torch
            import torch.distributed as dist
        except ImportError as exc:
            emit(config="gloo", error=f"torch not installed: {exc}")
            return
        progress(config="gloo", step="connecting")
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "emu0")
        dist.init_process_group("gloo", init_method=f"tcp://{master}:{port + 99}", rank=rank, world_size=n)
        def agree(v):
            t = torch.tensor([v], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            return float(t[0])

        try:
            dist.all_reduce(torch.ones(1 << 20))
            measure("gloo", lambda a: dist.all_reduce(torch.from_numpy(a)),
                    lambda p, o: dist.all_gather_into_tensor(torch.from_numpy(o), torch.from_numpy(p)),
                    dist.barrier, ["all_reduce", "all_gather"], agree)
        finally:
            dist.destroy_process_group()


# ---- driver --------------------------------------------------------------------
# Named scenarios (the default run does all four, a few minutes in all).
# "full": every configuration; "algorithms": every algorithm at k; "basic": 1 vs k connections, bf16.
SCENARIOS = {
    "two-sites": dict(peers=2, rate="2gbit", delay="25ms", loss=0.0, jitter="0ms", sizes="16M,64M,256M",
                      kind="full"),
    "lossy": dict(peers=2, rate="2gbit", delay="25ms", loss=0.005, jitter="2ms", sizes="64M", kind="basic"),
    "three-sites": dict(peers=3, rate="1gbit", delay="25ms", loss=0.0, jitter="0ms", sizes="64M",
                        kind="algorithms"),
    "far": dict(peers=2, rate="2gbit", delay="100ms", loss=0.001, jitter="0ms", sizes="64M", kind="basic"),
}


def configs(kind, rate_Bps, rtt):
    """pycoll configurations for one scenario, and the link plan behind k."""
    from pycoll.plan import planners
    from pycoll.net import links as wan
    lim = wan.kernel_limits()
    plan = wan.link_plan(rate_Bps, rtt, limits=lim)
    k, buf = plan.stripes, plan.sockbuf
    biggest = min(lim["rmem_max"], lim["wmem_max"])
    both, ar = ["all_reduce", "all_gather"], ["all_reduce"]
    out = [{"name": "ring k=1", "stripes": 1, "sockbuf": 0, "colls": both if kind == "full" else ar}]
    if kind == "full":
        out.append({"name": f"ring k=1 buf={biggest >> 20}M", "stripes": 1, "sockbuf": biggest, "colls": ar})
    out.append({"name": f"ring k={k}", "stripes": k, "sockbuf": buf, "colls": both if kind != "basic" else ar})
    if kind == "full":
        out.append({"name": f"ring k={2 * k}", "stripes": 2 * k, "sockbuf": buf, "colls": ar})
    if kind == "algorithms":
        for alg in planners.ALGORITHMS:
            if alg not in ("auto", "ring"):
                out.append({"name": f"{alg} k={k}", "stripes": k, "sockbuf": buf, "algorithm": alg, "colls": both})
    codecs = {"full": ["fp16", "bf16", "int8"], "basic": ["bf16"], "algorithms": []}[kind]
    for codec in codecs:
        out.append({"name": f"ring k={k} {codec}", "stripes": k, "sockbuf": buf, "compression": codec,
                    "colls": both if (codec == "bf16" and kind == "full") else ar})
    return out, plan, lim


def run_scenario(name, sc, gloo=True, seed=1, timeout=900):
    from pycoll.emulator import Emulator, EmuSpec, parse_rate, parse_time
    n, rate = sc["peers"], parse_rate(sc["rate"])
    delay, jitter = parse_time(sc["delay"]), parse_time(sc["jitter"])
    rtt = 2 * delay
    cfgs, plan, lim = configs(sc["kind"], rate / 8, rtt)
    sizes = [parse_size(x) for x in sc["sizes"].split(",")]
    spec = EmuSpec.uniform(n, rate_bps=rate, delay_s=delay, loss=sc["loss"], jitter_s=jitter)
    wcfg = {"sizes": sizes, "pycoll": cfgs, "gloo": gloo, "port": 29400}
    t0 = time.monotonic()

    def say(msg):
        print(f"# [{time.monotonic() - t0:5.1f} s] {name}: {msg}", flush=True)
    say(f"{n} peers, {sc['rate']} links, one-way delay {sc['delay']}, loss {sc['loss']}; "
        f"{len(cfgs)} pycoll configurations{' and Gloo' if gloo else ''} at {', '.join(map(human_size, sizes))}; "
        f"building the network")
    # tcp_buffers=False: the kernel's own TCP buffer limits inside the peers
    with Emulator(spec, tcp_buffers=False, seed=seed) as emu:
        procs = [emu.run_python(r, [HERE, "--worker", json.dumps(wcfg)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env={"PYTHONPATH": ROOT, "PYTHONUNBUFFERED": "1"})
                 for r in range(n)]
        say("workers started")
        results, errors, outputs = [], [], {}
        expired = threading.Event()

        def expire():
            expired.set()
            for q in procs:
                q.kill()
        timer = threading.Timer(timeout, expire)
        timer.daemon = True
        timer.start()

        def drain(r, p):  # rank 0's stderr and everything of the other ranks, read while rank 0 reports
            outputs[r] = ("" if r == 0 else p.stdout.read(), p.stderr.read())
        drains = [threading.Thread(target=drain, args=(r, p), daemon=True) for r, p in enumerate(procs)]
        for t in drains:
            t.start()
        for line in procs[0].stdout:  # rank 0 reports each measurement as it starts and ends
            if line.startswith("RESULT "):
                rec = json.loads(line[7:])
                results.append(rec)
                if "times" in rec:
                    say(f"{rec['config']} {rec['coll']} {human_size(rec['nbytes'])}: "
                        f"median {statistics.median(rec['times']):.2f} s over {len(rec['times'])}")
                else:
                    say(f"{rec['config']}: error: {rec.get('error', '?')[:200]}")
            elif line.startswith("PROGRESS "):
                rec = json.loads(line[9:])
                what = rec.get("step") or f"{rec['coll']} {human_size(rec['nbytes'])}"
                say(f"{rec['config']}: {what} ...")
        for r, p in enumerate(procs):
            p.wait()
            drains[r].join()
            if p.returncode and not expired.is_set():
                errors.append(f"rank {r}: exit {p.returncode}: {outputs[r][1][-1500:]}")
        timer.cancel()
        if expired.is_set():
            raise SystemExit(f"scenario {name}: workers did not finish in {timeout} s")
        stats = emu.stats()
    for e in errors:
        print(f"# {name}: worker error: {e}", file=sys.stderr)
    return {"name": name, "delay_s": delay, "rtt_s": rtt, "loss": sc["loss"], "jitter_s": jitter, "rate_bps": rate,
            "peers": n, "plan": {"stripes": plan.stripes, "sockbuf": plan.sockbuf, "bdp": plan.bdp,
                                 "window": plan.window},
            "limits": lim, "results": results, "wall_s": time.monotonic() - t0,
            "delayline": {k: sum(link.get(k, 0) for link in stats.get("links", []))
                          for k in ("in_pkts", "out_pkts", "out_bytes", "loss_drops", "overflow_drops")}}


def report(sc):
    n, rate_Bps = sc["peers"], sc["rate_bps"] / 8
    print(f"\n## {sc['name']}: {n} peers, every link {sc['rate_bps'] / 1e9:g} Gbit/s, RTT {sc['rtt_s'] * 1e3:.0f} ms, "
          f"loss {sc['loss'] * 100:g} %, jitter {sc['jitter_s'] * 1e3:g} ms "
          f"(BDP {sc['plan']['bdp'] / 2 ** 20:.1f} MiB; k={sc['plan']['stripes']}, "
          f"sockbuf {sc['plan']['sockbuf'] / 2 ** 20:.2f} MiB; scenario took {sc['wall_s']:.0f} s; "
          f"delay line: {sc['delayline']['out_pkts']} packets, {sc['delayline']['loss_drops']} lost, "
          f"{sc['delayline']['overflow_drops']} queue drops)")
    print("| config | collective | size | median | busbw Gbit/s | of link | vs ring k=1 | vs Gloo |")
    print("|---|---|---|---|---|---|---|---|")
    rows = [r for r in sc["results"] if "times" in r]
    med = {(r["config"], r["coll"], r["nbytes"]): statistics.median(r["times"]) for r in rows}
    for r in rows:
        key = (r["config"], r["coll"], r["nbytes"])
        t = med[key]
        factor = 2 * (n - 1) / n if r["coll"] == "all_reduce" else (n - 1) / n
        bus = r["nbytes"] * factor / t
        base = med.get(("ring k=1", r["coll"], r["nbytes"]))
        gloo = med.get(("gloo", r["coll"], r["nbytes"]))
        print(f"| {r['config']} | {r['coll']} | {human_size(r['nbytes'])} | {t:.2f} s ({len(r['times'])}x) | "
              f"{bus * 8 / 1e9:.2f} | {bus / rate_Bps:.0%} | "
              + (f"{base / t:.1f}x" if base else "-") + " | " + (f"{gloo / t:.1f}x" if gloo else "-") + " |")
    for r in sc["results"]:
        if "error" in r:
            print(f"| {r['config']} | error: {r['error'][:200]} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", default=",".join(SCENARIOS),
                    help=f"comma-separated, from {', '.join(SCENARIOS)} (default: all), or 'custom'")
    ap.add_argument("--peers", type=int, default=2, help="custom scenario: peers (default 2)")
    ap.add_argument("--rate", default="2gbit", help="custom: cap of every directed link (default 2gbit)")
    ap.add_argument("--delay", default="25ms", help="custom: one-way delay (default 25ms: RTT 50 ms)")
    ap.add_argument("--loss", type=float, default=0.0, help="custom: loss rate per packet")
    ap.add_argument("--jitter", default="0ms", help="custom: +- jitter")
    ap.add_argument("--sizes", default="16M,64M,256M", help="custom: sizes")
    ap.add_argument("--kind", default="full", choices=["full", "basic", "algorithms"], help="custom: configurations")
    ap.add_argument("--quick", action="store_true", help="the two-sites scenario at 256 MiB only")
    ap.add_argument("--no-gloo", action="store_true")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--json", help="write all results here too")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    from pycoll.emulator import available
    ok, why = available()
    if not ok:
        print(f"# cannot emulate a network here: {why}")
        return 2
    todo = {}
    if args.quick:
        todo["two-sites"] = dict(SCENARIOS["two-sites"], sizes="256M")
    for name in args.scenario.split(",") if not args.quick else []:
        if name == "custom":
            todo["custom"] = dict(peers=args.peers, rate=args.rate, delay=args.delay, loss=args.loss,
                                  jitter=args.jitter, sizes=args.sizes, kind=args.kind)
        elif name in SCENARIOS:
            todo[name] = SCENARIOS[name]
        else:
            ap.error(f"unknown scenario {name!r}")
    done = []
    t0 = time.monotonic()
    for name, sc in todo.items():
        res = run_scenario(name, sc, gloo=not args.no_gloo, seed=args.seed, timeout=args.timeout)
        report(res)
        done.append(res)
    print(f"\n# {len(done)} scenarios in {time.monotonic() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(done, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
