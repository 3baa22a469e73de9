"""A worker of ``pycoll run --elastic`` for tests/e2e/test_launch_elastic.py: a small NumPy
elastic loop (as examples/elastic_numpy.py) that logs what it saw, one JSON line per event, in
OUT_DIR/<name>.jsonl (name: ``w<RANK>.<PYCOLL_RESTART_COUNT>``, one per process).

    python elastic_launch_worker.py OUT_DIR --steps 30 --kill-rank 1 --kill-step 8

Each step: ``sync_shared_state`` (logged with the SHA-256 of the state's bytes), then an exact
int64 sum of every peer's contribution (a function of its name and the step, so a test can
recompute it over the contributors) with ``retry=True``, then ``update_topology()``. The
original worker of ``--kill-rank`` (or the one whose ``comm.rank`` is ``--kill-group-rank``)
SIGKILLs itself at ``--kill-step``, after that step's sync (its peers' all-reduce of that step runs
without it); its replacements do not.
"""
import argparse
import hashlib
import json
import os
import signal
import time
import zlib

import numpy as np

import pycoll

N = 1024


def contribution(name, step):
    """Peer ``name``'s int64 addend of ``step`` (sums are exact in any order)."""
    seed = zlib.crc32(name.encode())
    return (np.arange(N, dtype=np.int64) * (seed % 997 + 1) + step * 7919 + seed) % 1_000_003


def digest(state):
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(np.ascontiguousarray(state[key]).tobytes())
    return h.hexdigest()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--kill-rank", type=int, default=-1)
    ap.add_argument("--kill-group-rank", type=int, default=-1, help="kill the original worker whose comm.rank "
                    "is this at --kill-step instead (rank 0 of the group: nothing special about it)")
    ap.add_argument("--kill-step", type=int, default=-1)
    ap.add_argument("--pause", type=float, default=0.1)
    ap.add_argument("--linger", type=float, default=0.0, help="seconds to stay after the last step (joiners "
                    "that come meanwhile are not admitted: nobody calls update_topology() any more)")
    ap.add_argument("--heartbeat-timeout", type=float, default=None, help="this peer's detection bound")
    args = ap.parse_args()
    rank, restart = int(os.environ["RANK"]), int(os.environ["PYCOLL_RESTART_COUNT"])
    name = f"w{rank}.{restart}"
    log = open(os.path.join(args.out_dir, name + ".jsonl"), "a", buffering=1)

    def record(event, **fields):
        log.write(json.dumps(dict(fields, event=event, name=name, pid=os.getpid())) + "\n")

    record("start", env={k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "PYCOLL_RESTART_COUNT")})
    comm = pycoll.connect(name=name, timeout=20, join_timeout=40, heartbeat_timeout=args.heartbeat_timeout)
    record("admitted", rank=comm.rank, world_size=comm.world_size)
    print(f"{name} admitted as rank {comm.rank} of {comm.world_size}", flush=True)
    # an int64 sum and a float64 running average: both must reach the joiner bit for bit
    state = {"total": np.zeros(N, np.int64), "ema": np.zeros(N, np.float64)}
    revision = -1  # nothing yet: the group's state wins
    while True:
        res = comm.sync_shared_state(state, revision)
        revision = max(res.revision, 0)  # (-1 everywhere: a new group starts at step 0)
        record("sync", rev=revision, hash=digest(state), fetched=sorted(res.fetched),
               rank=comm.rank, world_size=comm.world_size)
        if revision >= args.steps:
            break
        if restart == 0 and revision == args.kill_step and args.kill_rank in (rank, -1) \
                and args.kill_group_rank in (comm.rank, -1) and (args.kill_rank, args.kill_group_rank) != (-1, -1):
            os.kill(os.getpid(), signal.SIGKILL)
        x = contribution(name, revision)
        comm.all_reduce(x, op="sum", retry=True)
        record("step", step=revision, contributors=list(comm.last_outcome.contributors), result=x.tolist())
        state["total"] += x
        state["ema"] = 0.9 * state["ema"] + 0.1 * np.sqrt(x.astype(np.float64))
        revision += 1
        time.sleep(args.pause)
        comm.update_topology()
    record("done", rev=revision, hash=digest(state))
    time.sleep(args.linger)
    comm.close()


if __name__ == "__main__":
    main()
