"""Detection and recovery times under churn, measured on this machine.

    PYTHONPATH=$PWD python bench/fault_latency.py [--trials 10] [--peers 4] [--mib 16]

Each trial starts a fresh elastic group whose peers loop all-reduces of
``--mib`` MiB, then hurts one peer at a random moment:

* ``sigkill``: SIGKILL (the kernel closes its sockets; the coordinator and
  the neighbours see the connection drop);
* ``sigstop``: SIGSTOP (no FIN, no RST: a hung machine or a cut cable; only
  the heartbeat bound can notice), with ``--heartbeat`` seconds;
* ``coordinator``: the coordinator process is killed (peers must get a
  CoordinatorError, never hang).

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


def _looper(comm, count, retry, path):
    x = np.ones(count, np.float32)
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


def _events(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def trial_peer_fault(kind, peers, count, heartbeat, retry, rng):
    with tempfile.TemporaryDirectory() as tmp, Cluster(heartbeat_timeout=heartbeat, min_world_size=peers) as c:
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
                                                         f"p{i}", {"heartbeat_timeout": heartbeat}, None, child))
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
    ap.add_argument("--only", default="")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    count = int(args.mib * (1 << 20) / 4)
    print(f"{args.peers} peers, {args.mib} MiB float32 all-reduces, {args.trials} trials each, "
          f"heartbeat timeout {args.heartbeat} s (detection bound for silent peers)")
    cases = [("sigkill", False), ("sigkill", True), ("sigstop", False), ("sigstop", True), ("coordinator", None)]
    for kind, retry in cases:
        if args.only and kind != args.only:
            continue
        samples = []
        n = args.trials if kind == "sigkill" else max(3, args.trials // 2)
        for _ in range(n):
            if kind == "coordinator":
                samples += trial_coordinator(args.peers, count, args.heartbeat, rng)
            else:
                samples += trial_peer_fault(kind, args.peers, count, args.heartbeat, retry, rng)
        label = {None: "", False: " plain", True: " retry=True"}[retry]
        summarize(f"{kind}{label}", samples)


if __name__ == "__main__":
    main()
