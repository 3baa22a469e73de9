"""Detection and recovery times under churn, measured on this machine.

    PYTHONPATH=$PWD python bench/fault_latency.py [--trials 10] [--peers 4] [--mib 16] [--transport auto]
                                                  [--only KIND[,KIND...]]

Each trial starts a fresh group whose peers loop all-reduces of ``--mib`` MiB, then hurts it at
a random moment:

* ``sigkill``: SIGKILL of a random rank other than the coordinator's host (an elastic group,
  the coordinator in this process);
* ``sigstop``: SIGSTOP of a rank (no FIN, no RST: a hung machine or a cut cable; only the
  heartbeat bound can notice), with ``--heartbeat`` seconds;
* ``rank0``: SIGKILL of rank 0 of a ``pycoll.init`` group, which hosts the coordinator: the
  data plane reports the death, a surviving member succeeds the coordinator (pycoll.comm.failover);
* ``two``: SIGKILL of rank 0 and rank 2 at once (the coordinator's host and another rank);
* ``master``: SIGKILL of a standalone ``pycoll master``; the peers loop all_reduce(retry=True)
  and update_topology() (which need the coordinator); *recovery* = until the first such call
  after the kill completed, under the successor; every call must succeed (nothing lost);
* ``coordinator``: the same kill with ``failover=False``: peers must get a CoordinatorError,
  never hang (the behaviour before failover).

Times are measured from the moment of the fault (wall clock, same host):
*detection* = until a survivor's call raised (plain collectives), or, with
retry=True, until the group agreed to abort; *recovery* = until the next
collective over the survivors completed (plain: the next call; retry=True:
the retried call itself returned). Reports median and worst over all
survivors of all trials.
"""
import argparse
import json
import multiprocessing as mp
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "support"))

import numpy as np  # noqa: E402

import pycoll  # noqa: E402
from elastic_util import Cluster, _peer_main  # noqa: E402
from pycoll.control.client import CoordinatorClient  # noqa: E402
from pycoll.testing import free_port  # noqa: E402


def _wait_formed(paths, limit=60.0):
    """Waits (at most ``limit`` seconds) until every peer wrote its file: the group formed."""
    deadline = time.monotonic() + limit
    while not all(os.path.exists(x) for x in paths):
        if time.monotonic() > deadline:
            raise RuntimeError("the group did not form")
        time.sleep(0.01)


def _watchdog(path):
    """FAULT_LATENCY_STACKS=<seconds>: a peer still looping that long after it was ready dumps
    every thread's stack to ``path``.stacks, again every <seconds> (where a stalled trial waits)."""
    seconds = float(os.environ.get("FAULT_LATENCY_STACKS", "0") or 0)
    if seconds > 0:
        import faulthandler
        faulthandler.dump_traceback_later(seconds, repeat=True, file=open(path + ".stacks", "w"))


def _looper(comm, count, retry, path):
    x = np.ones(count, np.float32)
    _watchdog(path)
    with open(path, "a", buffering=1) as log:
        log.write(json.dumps({"event": "ready", "t": time.time()}) + "\n")
        for _ in range(100000):
            try:
                t0 = time.time()
                comm.all_reduce(x, retry=retry)
                t1 = time.time()
                if retry and comm.last_outcome.attempts > 1:
                    log.write(json.dumps({"event": "recovered", "t": t1, "start": t0}) + "\n")
                    return
            except pycoll.PeerFailure:
                log.write(json.dumps({"event": "detected", "t": time.time()}) + "\n")
                y = np.ones(16, np.float32)
                comm.all_reduce(y)
                log.write(json.dumps({"event": "recovered", "t": time.time()}) + "\n")
                return
            except pycoll.CoordinatorError:
                log.write(json.dumps({"event": "coordinator_error", "t": time.time()}) + "\n")
                return
            x[:] = 1


def _keep_stacks(paths):
    """Copy the watchdog's stack dumps (see _watchdog) to FAULT_LATENCY_STACKS_DIR, if any."""
    out = os.environ.get("FAULT_LATENCY_STACKS_DIR")
    if not out:
        return
    for x in paths:
        if os.path.exists(x + ".stacks") and os.path.getsize(x + ".stacks"):
            os.makedirs(out, exist_ok=True)
            with open(x + ".stacks") as src, open(os.path.join(out, f"{time.time():.3f}-{os.path.basename(x)}.txt"),
                                                  "w") as dst:
                dst.write(src.read())


def _events(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def trial_peer_fault(kind, peers, count, heartbeat, retry, rng, transport="auto"):
    with tempfile.TemporaryDirectory() as tmp, Cluster(heartbeat_timeout=heartbeat, min_world_size=peers,
                                                       connect_kwargs={"transport": transport}) as c:
        names = [f"p{i}" for i in range(peers)]
        for n in names:
            c.spawn(n, _looper, count, retry, os.path.join(tmp, n))
        deadline = time.monotonic() + 60
        while not all(os.path.exists(os.path.join(tmp, n)) for n in names):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(rng.uniform(0.2, 0.6))
        victim = rng.choice(names)
        t_fault = time.time()
        c.kill(victim, signal.SIGKILL if kind == "sigkill" else signal.SIGSTOP)
        survivors = [n for n in names if n != victim]
        c.results(survivors, timeout=heartbeat + 60)
        out = []
        for n in survivors:
            ev = {e["event"]: e["t"] for e in _events(os.path.join(tmp, n))}
            det = ev.get("detected")
            if retry:
                det = None
            out.append((None if det is None else det - t_fault, ev["recovered"] - t_fault))
        return out


def _init_peer(rank, peers, port, count, retry, path, heartbeat, transport):
    comm = pycoll.init(rank, peers, "127.0.0.1", port, heartbeat_timeout=heartbeat, timeout=60, transport=transport)
    try:
        _looper(comm, count, retry, path)
    finally:
        comm.close()


def trial_init_kill(victims, peers, count, heartbeat, retry, rng, transport):
    """SIGKILL ``victims`` (ranks) of a pycoll.init group: rank 0 hosts the coordinator."""
    port = free_port()
    ctx = mp.get_context("spawn")
    procs = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = [os.path.join(tmp, f"p{i}") for i in range(peers)]
        try:
            for i in range(peers):
                p = ctx.Process(target=_init_peer, args=(i, peers, port, count, retry, paths[i], heartbeat, transport))
                p.start()
                procs.append(p)
            _wait_formed(paths)
            time.sleep(rng.uniform(0.2, 0.6))
            t_fault = time.time()
            for v in victims:
                os.kill(procs[v].pid, signal.SIGKILL)
            out = []
            for i, p in enumerate(procs):
                if i in victims:
                    continue
                p.join(timeout=60)
                ev = {e["event"]: e["t"] for e in _events(paths[i])}
                if "recovered" not in ev:
                    raise RuntimeError(f"rank {i} did not recover: {ev}")
                det = None if retry else ev.get("detected")
                out.append((None if det is None else det - t_fault, ev["recovered"] - t_fault))
            return out
        finally:
            _keep_stacks(paths)
            for p in procs:
                p.kill()
                p.join()


def _master_looper(comm, path):
    """all_reduce(retry=True) + update_topology until the file ``path + '.stop'`` exists; logs
    each completed step's end time, and any error."""
    x = np.ones(1024, np.float32)
    _watchdog(path)
    with open(path, "a", buffering=1) as log:
        log.write(json.dumps({"event": "ready", "t": time.time()}) + "\n")
        while not os.path.exists(path + ".stop"):
            x[:] = 1
            try:
                comm.all_reduce(x, retry=True)
                comm.update_topology()
            except pycoll.CollectiveError as exc:
                log.write(json.dumps({"event": "error", "t": time.time(), "why": str(exc)[:300]}) + "\n")
                return
            log.write(json.dumps({"event": "step", "t": time.time(), "ok": bool(np.all(x == comm.world_size))})
                      + "\n")


def trial_master_failover(peers, heartbeat, rng, transport):
    """SIGKILL a standalone coordinator; recovery = until each peer's first coordinator-needing
    step completed after the kill (under the successor)."""
    port = free_port()
    master = subprocess.Popen([sys.executable, "-m", "pycoll", "master", "--port", str(port),
                               "--heartbeat-timeout", str(heartbeat), "--world-size", str(peers)])
    ctx = mp.get_context("spawn")
    procs, pipes = [], []
    with tempfile.TemporaryDirectory() as tmp:
        paths = [os.path.join(tmp, f"p{i}") for i in range(peers)]
        try:
            for i in range(peers):
                parent, child = ctx.Pipe(duplex=False)
                p = ctx.Process(target=_peer_main, args=(_master_looper, (paths[i],), port, f"p{i}",
                                                         {"heartbeat_timeout": heartbeat, "transport": transport},
                                                         None, child))
                p.start()
                child.close()
                procs.append(p)
                pipes.append(parent)
            _wait_formed(paths)
            time.sleep(rng.uniform(0.3, 0.6))
            t_fault = time.time()
            master.kill()
            time.sleep(2.0)
            for x in paths:
                open(x + ".stop", "w").close()
            for p in procs:
                p.join(timeout=60)
            out = []
            for x in paths:
                evs = _events(x)
                bad = [e for e in evs if e["event"] == "error" or (e["event"] == "step" and not e["ok"])]
                if bad:
                    raise RuntimeError(f"a call failed or was wrong across the coordinator's death: {bad[0]}")
                after = [e["t"] for e in evs if e["event"] == "step" and e["t"] > t_fault]
                out.append((None, after[0] - t_fault))
            return out
        finally:
            _keep_stacks(paths)
            master.kill()
            master.wait()
            for p in procs:
                p.kill()
                p.join()
            for c in pipes:
                c.close()


def trial_coordinator(peers, count, heartbeat, rng):
    port = free_port()
    master = subprocess.Popen([sys.executable, "-m", "pycoll", "master", "--port", str(port),
                               "--heartbeat-timeout", str(heartbeat), "--world-size", str(peers)])
    ctx = mp.get_context("spawn")
    procs, pipes = [], []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for i in range(peers):
                parent, child = ctx.Pipe(duplex=False)
                p = ctx.Process(target=_peer_main, args=(_looper, (count, True, os.path.join(tmp, f"p{i}")), port,
                                                         f"p{i}", {"heartbeat_timeout": heartbeat, "failover": False},
                                                         None, child))
                p.start()
                child.close()
                procs.append(p)
                pipes.append(parent)
            probe = CoordinatorClient("127.0.0.1", port, name="probe")
            deadline = time.monotonic() + 60
            try:
                while len(probe.request({"t": "status"}, timeout=30)["members"]) < peers:
                    if time.monotonic() > deadline or not all(p.is_alive() for p in procs):
                        raise RuntimeError("the group did not form")
                    time.sleep(0.05)
            finally:
                probe.close()
            time.sleep(rng.uniform(0.2, 0.6))
            t_fault = time.time()
            master.kill()
            for p in procs:
                p.join(timeout=heartbeat + 30)
            return [(_events(os.path.join(tmp, f"p{i}"))[-1]["t"] - t_fault, None) for i in range(peers)]
        finally:
            master.kill()
            for p in procs:
                p.kill()
                p.join()
            for c in pipes:
                c.close()


def summarize(label, samples):
    det = [d for d, _ in samples if d is not None]
    rec = [r for _, r in samples if r is not None]
    parts = [f"{label:38s}"]
    if det:
        parts.append(f"detection median {statistics.median(det) * 1e3:7.1f} ms, worst {max(det) * 1e3:7.1f} ms")
    if rec:
        parts.append(f"recovery median {statistics.median(rec) * 1e3:7.1f} ms, worst {max(rec) * 1e3:7.1f} ms")
    print("  ".join(parts) + f"  (n={len(samples)})", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--peers", type=int, default=4)
    ap.add_argument("--mib", type=float, default=16)
    ap.add_argument("--heartbeat", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--transport", default="auto", help="auto (shared memory on one host), shm or tcp")
    ap.add_argument("--only", default="", help="comma-separated kinds (default: all)")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    count = int(args.mib * (1 << 20) / 4)
    only = set(filter(None, args.only.split(",")))
    print(f"{args.peers} peers, {args.mib} MiB float32 all-reduces, {args.trials} trials each, "
          f"transport {args.transport}, heartbeat timeout {args.heartbeat} s (detection bound for silent peers)")
    cases = [("sigkill", False), ("sigkill", True), ("rank0", False), ("rank0", True), ("two", False),
             ("master", None), ("sigstop", False), ("sigstop", True), ("coordinator", None)]
    for kind, retry in cases:
        if only and kind not in only:
            continue
        samples = []
        n = args.trials if kind in ("sigkill", "rank0", "two", "master") else max(3, args.trials // 2)
        for _ in range(n):
            if kind == "coordinator":
                samples += trial_coordinator(args.peers, count, args.heartbeat, rng)
            elif kind == "master":
                samples += trial_master_failover(args.peers, args.heartbeat, rng, args.transport)
            elif kind in ("rank0", "two"):
                victims = [0] if kind == "rank0" else [0, 2]
                samples += trial_init_kill(victims, args.peers, count, args.heartbeat, retry, rng, args.transport)
            else:
                samples += trial_peer_fault(kind, args.peers, count, args.heartbeat, retry, rng, args.transport)
        label = {None: "", False: " plain", True: " retry=True"}[retry]
        summarize(f"{kind}{label}", samples)


if __name__ == "__main__":
    main()
