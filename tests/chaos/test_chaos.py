"""Chaos: peers run a DiLoCo-like loop while others are SIGKILLed at random
moments (also inside collectives, and right before or after the group
decides a collective's outcome) and new peers join.

The loop, on every peer: sync the shared state (newcomers receive the model
here), a few local steps from the current parameters, all-reduce of the
parameter delta with retry=True, outer step with the mean over the peers
that contributed, update_topology (joiners are admitted here).

Deltas are rounded to a 2**-20 grid, so their sums are exact in float64 in
any order: the reference below does not depend on the algorithm. Checks:
nothing hangs (a global deadline), every step's result is bit-identical
across the peers that report it and equals the sum over exactly its
contributors, replaying the whole run from the logs gives the final
parameters bit for bit, every finishing peer (joiners included) ends
bit-identical, no established peer ever had to fetch (parity failures = 0),
and no process or socket is left behind. Runs over shared memory and over
TCP.

Environment: PYCOLL_CHAOS_STEPS (default 100), PYCOLL_CHAOS_SEED (random).
"""
import json
import multiprocessing as mp
import os
import random
import signal
import socket
import statistics
import time
import zlib

import numpy as np
import pytest

from collective_cases import on_transport
from elastic_util import Cluster, arm
import pycoll
from pycoll.plan import planners
from pycoll.comm.shared_state import hash_arrays

STEPS = int(os.environ.get("PYCOLL_CHAOS_STEPS", "100"))
INITIAL = 6
DIM = 1 << 17          # 1 MiB of float64: collectives last long enough to be killed inside
LOCAL_STEPS = 2
LR = 0.3
GRID = 2.0 ** 20
HEARTBEAT = 3.0
MIN_ALIVE = 3          # never kill below this many admitted peers
KILLS = int(os.environ.get("PYCOLL_CHAOS_KILLS", "12"))
JOINS = int(os.environ.get("PYCOLL_CHAOS_JOINS", "10"))
DEADLINE = 240.0
ALGORITHMS = list(planners.ALGORITHMS)  # "auto" too (every new epoch calibrates when installed: more collectives)
KILL_POINTS = ["sigkill", "sigkill", "during:all_reduce", "during:all_reduce", "agreed:all_reduce",
               "decided:all_reduce"]

_TARGET = np.random.default_rng(7).standard_normal(DIM)


def local_delta(params, name, revision):
    """The inner loop: LOCAL_STEPS of SGD toward a noisy, peer-specific
    target; returns the change, rounded to the grid (exact sums)."""
    rng = np.random.default_rng([zlib.crc32(name.encode()), revision])
    p = params.copy()
    for _ in range(LOCAL_STEPS):
        p -= LR * (p - (_TARGET + 0.05 * rng.standard_normal(DIM)))
    return np.round(np.clip(p - params, -1.0, 1.0) * GRID) / GRID


def exact_sum(deltas):
    """The sum the group's all-reduce gives, bit for bit: grid values add exactly in any order,
    and it starts from the first contribution, not from +0.0 (+0.0 + -0.0 is +0.0, so a zero
    start turns a lone contributor's -0.0 entries into +0.0: seeds 224, 32 and 341 failed on
    that, a single survivor's step whose result was its own delta, bit for bit)."""
    total = deltas[0].copy()
    for d in deltas[1:]:
        total += d
    return total


def outer_step(params, total, contributors):
    params += total / len(contributors)


def loss(params):
    return float(np.sqrt(np.mean((params - _TARGET) ** 2)))


def digest(a):
    return hash_arrays([a])[0]


def chaos_worker(comm, outdir, steps, initial):
    try:
        return _train(comm, outdir, steps, initial)
    except pycoll.CoordinatorError as exc:
        if not exc.evicted:
            raise
        # The group dropped this peer (declared dead while alive, e.g. starved past the heartbeat
        # bound) and went on: the call says so clearly, and a user's loop joins anew. Its steps
        # so far stay checked; it takes no further part.
        with open(os.path.join(outdir, f"{comm.name}.jsonl"), "a") as f:
            f.write(json.dumps({"event": "evicted", "why": str(exc)[:300]}) + "\n")
        return None


def _train(comm, outdir, steps, initial):
    name = comm.name
    logf = open(os.path.join(outdir, f"{name}.jsonl"), "a", buffering=1)

    def log(**kw):
        logf.write(json.dumps(kw) + "\n")

    log(event="admitted", epoch=comm.epoch, rank=comm.rank, world_size=comm.world_size,
        port=comm.epoch_state.listener.addr[1], pid=os.getpid(), t=time.time())
    params = np.zeros(DIM)
    revision = 0 if initial else -1
    state = {"params": params}
    first = True
    while True:
        res = comm.sync_shared_state(state, revision)
        if res.fetched and not first:
            log(event="parity_failure", revision=revision, fetched=res.fetched)
        if first:
            log(event="first_sync", fetched=res.fetched, revision=res.revision, bytes=res.bytes_received,
                sources=res.sources)
        first = False
        revision = res.revision
        if revision < 0:  # a group of newcomers only (every member had finished): nothing to train
            log(event="alone", epoch=comm.epoch, world_size=comm.world_size)
            logf.close()
            return revision
        if revision >= steps:
            break
        delta = local_delta(params, name, revision)
        arm_file = os.path.join(outdir, f"arm_{name}")
        if os.path.exists(arm_file):  # the harness wants us dead at this point of the next collective
            with open(arm_file) as f:
                arm(f.read().strip())
            log(event="armed", point=os.environ["PYCOLL_FAULT"], revision=revision)
        pre = (digest(params), digest(delta))  # (a wrong step then tells diverged state from a bad sum)
        before = delta.copy()
        t0 = time.monotonic()
        comm.all_reduce(delta, op="sum", algorithm=ALGORITHMS[revision % len(ALGORITHMS)], retry=True)
        seconds = time.monotonic() - t0
        out = comm.last_outcome
        if out.attempts > 1:  # kept for a post-mortem of a wrong retried step (which chunks differ)
            np.save(os.path.join(outdir, f"retried_{name}_{revision}.npy"), np.stack([before, delta]))
        outer_step(params, delta, out.contributors)
        log(event="step", rev=revision, contributors=list(out.contributors), digest=digest(delta),
            attempts=out.attempts, lost=list(out.lost), epoch=comm.epoch, rank=comm.rank, seconds=seconds,
            params_before=pre[0], delta_before=pre[1])
        revision += 1
        comm.update_topology()
    report = comm.verify_parity(state, revision)
    log(event="done", revision=revision, digest=digest(params), parity_ok=report.ok, loss=loss(params))
    logf.close()
    return revision


def _read_logs(outdir):
    logs = {}
    for fn in os.listdir(outdir):
        if fn.endswith(".jsonl"):
            with open(os.path.join(outdir, fn)) as f:
                logs[fn[:-6]] = [json.loads(line) for line in f if line.endswith("\n")]
    return logs


def admitted_ever(logs):
    return {n for n, lines in logs.items() if lines and lines[0]["event"] == "admitted"}


def _open_fds():
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    return out


def _rank0(logs, candidates):
    """The member at rank 0 of the latest epoch the logs show (it hosts the coordinator once a
    member succeeded the first one), among ``candidates``; None if unknown."""
    best = None
    for n, lines in logs.items():
        for ln in lines:
            if ln["event"] == "step" and ln.get("rank") == 0 and (best is None or ln["epoch"] > best[0]):
                best = (ln["epoch"], n)
    return best[1] if best is not None and best[1] in candidates else None


def test_the_replay_sums_signed_zeros_as_the_group_does():
    """A lone contributor's step is its own delta, -0.0 entries included; two -0.0 sum to -0.0.
    The engine's kernel agrees with the replay bit for bit."""
    from pycoll.core.native import ffi, lib
    a = np.array([-0.0, 0.0, -0.0, 2.0 ** -20, -(2.0 ** -20)])
    b = np.array([-0.0, -0.0, 0.0, -(2.0 ** -20), 0.0])
    assert exact_sum([a]).tobytes() == a.tobytes()
    engine_sum = np.empty_like(a)
    assert lib.pc_reduce(ffi.from_buffer(engine_sum), ffi.from_buffer(a), ffi.from_buffer(b), a.size,
                         lib.PC_F64, lib.PC_SUM) == lib.PC_OK
    assert exact_sum([a, b]).tobytes() == engine_sum.tobytes()
    assert np.signbit(exact_sum([a, b])[0]) and not np.signbit((np.zeros(5) + a + b)[0])  # the old replay's flaw


@pytest.mark.timeout(DEADLINE + 60)
def test_chaos(tmp_path, transport):
    _chaos(tmp_path, transport, steps=STEPS, kills=KILLS, joins=JOINS, kill_points=KILL_POINTS, standalone=False,
           deadline=DEADLINE)


#: No single point of failure: kills of the standalone coordinator's process, of rank 0 (which
#: hosts the coordinator once a member succeeded it) and of two members at once, among ordinary
#: kills. PYCOLL_CHAOS_SPOF_STEPS (default 60, about a minute here) makes the long variant
#: (e.g. 200 steps: see the README's fault table).
SPOF_STEPS = int(os.environ.get("PYCOLL_CHAOS_SPOF_STEPS", "60"))
SPOF_POINTS = ["coordinator", "rank0", "rank0", "two", "sigkill", "during:all_reduce", "agreed:all_reduce"]


@pytest.mark.timeout(DEADLINE + 60)
def test_chaos_no_single_point_of_failure(tmp_path):
    _chaos(tmp_path, "shm", steps=SPOF_STEPS, kills=max(6, SPOF_STEPS // 8), joins=max(5, SPOF_STEPS // 10),
           kill_points=SPOF_POINTS, standalone=True, deadline=DEADLINE, first_kill="coordinator")


def _chaos(tmp_path, transport, *, steps, kills, joins, kill_points, standalone, deadline, first_kill=None):
    STEPS, KILLS, JOINS, DEADLINE = steps, kills, joins, deadline  # noqa: N806 - the module's defaults, per run
    seed = int(os.environ.get("PYCOLL_CHAOS_SEED", str(random.randrange(1 << 30))))
    rng = random.Random(seed)
    outdir = str(tmp_path)
    # Process-wide things that outlive any one run (zmq's I/O thread, the
    # multiprocessing resource tracker) exist before the baseline is taken.
    from multiprocessing import resource_tracker
    resource_tracker.ensure_running()
    from pycoll.control.coordinator import Coordinator
    Coordinator("127.0.0.1", 0).start().stop()
    fds_before = _open_fds()
    t_start = time.monotonic()
    killed, armed, joined_spawned = [], [], []
    names = [f"w{i}" for i in range(INITIAL)]
    exitcodes, unadmitted = {}, []
    with Cluster(heartbeat_timeout=HEARTBEAT, min_world_size=INITIAL, standalone=standalone,
                 connect_kwargs=dict(timeout=60, join_timeout=DEADLINE, transport=transport)) as c:
        for n in names:
            c.spawn(n, on_transport, transport, chaos_worker, outdir, STEPS, True)
        # Chaos is scheduled by progress (training steps), not wall time, so a
        # fast run gets as much of it as a slow one.
        kill_at = [(step, rng.random() < 0.15, rng.choice(kill_points))
                   for step in sorted(rng.sample(range(2, int(STEPS * 0.85)), KILLS))]
        if first_kill is not None:
            kill_at[0] = (kill_at[0][0], False, first_kill)
        join_at = sorted(rng.sample(range(2, int(STEPS * 0.8)), JOINS))
        njoin = 0
        while True:
            now = time.monotonic()
            assert now - t_start < DEADLINE, f"chaos run did not finish in {DEADLINE} s (seed {seed})"
            logs = _read_logs(outdir)
            admitted = {n for n, lines in logs.items() if lines and lines[0]["event"] == "admitted"}
            finished = {n for n, lines in logs.items() if lines and lines[-1]["event"] == "done"}
            alive = {n for n, p in c.procs.items() if p.is_alive()}
            progress = max((ln["rev"] for lines in logs.values() for ln in lines if ln["event"] == "step"),
                           default=0)
            members_alive = (admitted & alive) - finished
            if finished and not members_alive:
                break  # everyone that was admitted has finished or died
            for n in set(c.procs) - alive:  # a peer that raised is a failure, with its traceback
                if c._collect(n) and c.done[n] is not None and c.done[n][0] == "error":
                    pytest.fail(f"peer {n} failed (seed {seed}): {c.done[n][1]}\n{c.done[n][2]}")
            pending_arms = [n for n in armed if n in alive]  # will die at their next collective
            if join_at and progress >= join_at[0]:
                join_at.pop(0)
                name = f"j{njoin}"
                njoin += 1
                c.spawn(name, on_transport, transport, chaos_worker, outdir, STEPS, False)
                joined_spawned.append(name)
            if kill_at and progress >= kill_at[0][0]:
                _, pending_joiner, point = kill_at[0]
                waiting = sorted((alive - admitted) & set(joined_spawned))
                candidates = sorted(members_alive - set(pending_arms))
                if pending_joiner and waiting:  # a joiner dies before it was admitted
                    kill_at.pop(0)
                    c.kill(rng.choice(waiting))
                    killed.append(("pending joiner", "sigkill", progress))
                elif point == "coordinator" and c.master is not None and c.master.poll() is None:
                    kill_at.pop(0)
                    time.sleep(rng.uniform(0, 0.03))
                    c.kill_coordinator()  # a member succeeds it (pycoll.comm.failover)
                    killed.append(("coordinator", "sigkill", progress))
                elif len(candidates) - (2 if point == "two" else 1) >= MIN_ALIVE:  # else wait for joiners
                    kill_at.pop(0)
                    victim = rng.choice(candidates)
                    if point in ("coordinator", "rank0", "two"):
                        # rank 0 hosts the coordinator once a member succeeded the first one
                        victim = _rank0(logs, candidates) or victim
                    if point == "two":  # rank 0 and another member at the same moment
                        other = rng.choice([n for n in candidates if n != victim])
                        time.sleep(rng.uniform(0, 0.03))
                        c.kill(victim)
                        c.kill(other)
                        killed.append((other, point, progress))
                    elif point in ("sigkill", "coordinator", "rank0"):  # whatever it is doing right now
                        time.sleep(rng.uniform(0, 0.03))
                        c.kill(victim)
                    else:  # at that point of its next collective
                        with open(os.path.join(outdir, f"arm_{victim}"), "w") as f:
                            f.write(point)
                        armed.append(victim)
                    killed.append((victim, point, progress))
            time.sleep(0.02)
        # Joiners still waiting to be admitted when the run ended never will be.
        for n, p in c.procs.items():
            if p.is_alive() and n not in admitted:
                unadmitted.append(n)
                p.kill()
        for n, p in c.procs.items():
            p.join(timeout=30)
            exitcodes[n] = p.exitcode
            alive_after = p.is_alive()
            assert not alive_after, f"{n} did not exit"
        for n in c.procs:
            if c._collect(n) and c.done[n] is not None and c.done[n][0] == "error":
                pytest.fail(f"peer {n} failed (seed {seed}): {c.done[n][1]}\n{c.done[n][2]}")
        if os.environ.get("PYCOLL_CHAOS_DEBUG"):
            for n in c.procs:
                print(n, exitcodes[n], c.done.get(n), [ln["event"] for ln in _read_logs(outdir).get(n, [])][:3])
        wall = time.monotonic() - t_start
        ports = [lines[0]["port"] for lines in _read_logs(outdir).values() if lines]
    logs = _read_logs(outdir)

    # ---- no hang, no leak ----------------------------------------------------
    assert not mp.active_children(), "processes left behind"
    assert all(code is not None for code in exitcodes.values())
    for n, code in exitcodes.items():
        assert code in (0, -signal.SIGKILL), f"{n} exited with {code}: {logs.get(n, [])[-3:]}"
    for port in ports:  # every peer's listening socket is gone with it
        s = socket.socket()
        try:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still accepts connections"
        finally:
            s.close()
    for _ in range(100):  # zmq closes sockets in its I/O thread, a moment later
        left = _open_fds()
        if len(left - fds_before) == 0:
            break
        time.sleep(0.05)
    assert not left - fds_before, f"the test process leaked file descriptors: {sorted(left - fds_before)}"

    # ---- every step agreed, and equal to the sum over exactly its contributors
    by_rev = {}
    for n, lines in logs.items():
        for ln in lines:
            if ln["event"] == "step":
                by_rev.setdefault(ln["rev"], set()).add((tuple(ln["contributors"]), ln["digest"]))
    assert sorted(by_rev) == list(range(STEPS)), f"missing steps: {sorted(set(range(STEPS)) - set(by_rev))}"
    for rev, outcomes in by_rev.items():
        assert len(outcomes) == 1, f"step {rev}: participants disagree: {outcomes}"
    params = np.zeros(DIM)
    loss0 = loss(params)
    for rev in range(STEPS):
        (contributors, dg), = by_rev[rev]
        total = exact_sum([local_delta(params, w, rev) for w in contributors])
        if digest(total) != dg:
            mine = [(n, ln.get("params_before") == digest(params), ln.get("delta_before") == digest(
                local_delta(params, n, rev)), ln.get("attempts"), ln.get("epoch")) for n, lines in logs.items()
                for ln in lines if ln["event"] == "step" and ln["rev"] == rev]
            pytest.fail(f"step {rev}: result differs from the sum over {contributors} (seed {seed}); per peer "
                        f"(name, its params were the replay's, its delta was, attempts, epoch): {mine}")
        outer_step(params, total, contributors)
    final = digest(params)

    # ---- everyone who finished holds the same bits, and it is the replay ---
    done = {n: lines[-1] for n, lines in logs.items() if lines and lines[-1]["event"] == "done"}
    assert done, "nobody finished"
    for n, ln in done.items():
        assert ln["revision"] == STEPS and ln["digest"] == final and ln["parity_ok"], (n, ln)
    parity_failures = sum(1 for lines in logs.values() for ln in lines if ln["event"] == "parity_failure")
    assert parity_failures == 0
    joiners_admitted = [n for n in joined_spawned if n in logs and logs[n] and logs[n][0]["event"] == "admitted"]
    joiners_finished = [n for n in joiners_admitted if n in done]
    for n in joiners_admitted:  # a joiner's first sync brought it the model
        first = [ln for ln in logs[n] if ln["event"] == "first_sync"]
        if first and first[0]["revision"] > 0:
            assert first[0]["fetched"] == ["params"]
    assert loss(params) < loss0 / 10

    # ---- summary -------------------------------------------------------------
    deaths = [n for n, code in exitcodes.items() if code == -signal.SIGKILL and n in admitted_ever(logs)]
    assert len(killed) >= KILLS * 2 // 3, f"too little chaos: {killed}"
    inside = [n for n in deaths if any(ln["event"] == "armed" for ln in logs.get(n, []))]
    retried = [ln for lines in logs.values() for ln in lines if ln["event"] == "step" and ln["attempts"] > 1]
    retries = sum(max(ln["attempts"] for lines in logs.values() for ln in lines
                      if ln["event"] == "step" and ln["rev"] == rev) - 1 for rev in range(STEPS))
    recov = [ln["seconds"] for ln in retried]
    normal = [ln["seconds"] for lines in logs.values() for ln in lines
              if ln["event"] == "step" and ln["attempts"] == 1]
    print(f"\nchaos summary (seed {seed}): {STEPS} steps in {wall:.1f} s, {INITIAL} initial peers; "
          f"kills {len(deaths)} of members ({len(inside)} inside a collective or at its decision) "
          f"+ {sum(1 for k in killed if k[0] == 'pending joiner')} of joiners still waiting; "
          f"joins {len(joiners_admitted)} admitted of {len(joined_spawned)} spawned "
          f"({len(joiners_finished)} finished bit-identical, {len(unadmitted)} never admitted before the end); "
          f"retries {retries}; epochs {max((ln['epoch'] for lines in logs.values() for ln in lines if ln['event'] == 'step'), default=0)}; "
          f"coordinators killed {sum(1 for k in killed if k[0] == 'coordinator' or k[1] in ('coordinator', 'rank0', 'two'))}; "
          f"parity failures {parity_failures}; "
          f"evicted {sum(1 for lines in logs.values() if lines and lines[-1]['event'] == 'evicted')}; "
          f"loss {loss0:.3f} -> {loss(params):.4f}")
    if recov:
        print(f"  all_reduce with a retry: median {statistics.median(recov) * 1e3:.0f} ms, "
              f"worst {max(recov) * 1e3:.0f} ms (plain steps median {statistics.median(normal) * 1e3:.1f} ms)")

