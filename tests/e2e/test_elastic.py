"""Elastic membership and churn: joins at update_topology only, deterministic
ranks, deaths detected (SIGKILL, SIGSTOP, graceful leave), PeerFailure
naming the lost peer, retry=True over the survivors with agreed
contributors, for every algorithm (a peer killed inside a collective: over
shared memory and over TCP); coordinator trouble is an error, never a
hang."""
import contextlib
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import pycoll
from collective_cases import on_transport
from elastic_util import Cluster, arm, peer_results
from pycoll.plan import planners
from pycoll.control.client import CoordinatorClient
from pycoll.testing import KILLED, free_port

ALGORITHMS = [a for a in planners.ALGORITHMS if a != "auto"]
COUNT = 4 << 20  # 16 MiB of float32: long enough to be killed inside


def _value(name):
    """Each peer's contribution, from its name, so any subset's sum is known."""
    return float(sum(ord(ch) for ch in name) % 97 + 1)


def _expected(names):
    return sum(_value(n) for n in names)


def _wait_epoch(cluster, epoch, timeout=30):
    deadline = time.monotonic() + timeout
    while cluster.coordinator.epoch < epoch:
        assert time.monotonic() < deadline, "group did not form"
        time.sleep(0.01)


# ---- joining ---------------------------------------------------------------
def _member_admits(comm, joiners):
    for _ in range(1000):  # every member sees the joiner pending before anyone admits it
        flag = np.array([comm.pending_joiners()], np.int64)
        comm.all_reduce(flag, op="min")
        if flag[0] >= joiners:
            break
        time.sleep(0.01)
    x = np.full(8, _value(comm.name))
    comm.all_reduce(x)  # the pending joiner does not take part
    before = (comm.world_size, float(x[0]))
    changed = comm.update_topology()
    y = np.full(8, _value(comm.name))
    comm.all_reduce(y, retry=True)
    return before, changed, comm.world_size, comm.rank, list(comm.members), list(comm.joined), float(y[0])


def _joiner(comm):
    y = np.full(8, _value(comm.name))
    comm.all_reduce(y, retry=True)
    return comm.world_size, comm.rank, list(comm.members), float(y[0]), list(comm.last_outcome.contributors)


@pytest.mark.timeout(120)
def test_joiner_waits_for_update_topology_and_gets_the_next_rank():
    with Cluster(min_world_size=3) as c:
        for n in ("m0", "m1", "m2"):
            c.spawn(n, _member_admits, 1)
        _wait_epoch(c, 1)
        c.spawn("j0", _joiner)
        members = c.results(["m0", "m1", "m2"], timeout=90)
        joiner = c.results(["j0"], timeout=30)[0]
    first = ["m0", "m1", "m2"]
    for before, changed, ws, rank, names, joined, total in members:
        assert before == (3, sum(_value(n) for n in first)), "the pending joiner took part too early"
        assert changed and ws == 4 and joined == ["j0"]
        assert names[3] == "j0" and sorted(names[:3]) == first
        assert total == _expected(names)
    ws, rank, names, total, contributors = joiner
    assert (ws, rank) == (4, 3) and total == _expected(names) and sorted(contributors) == sorted(first + ["j0"])


# ---- ranks after a loss ----------------------------------------------------
def _lose_one(comm, victim):
    # Everyone reaches the first epoch before the victim dies: on a loaded machine a peer still
    # building its connections could otherwise see the death first and start in the next epoch.
    comm.barrier()
    old_members, old_rank = list(comm.members), comm.rank
    if comm.name == victim:
        os.kill(os.getpid(), signal.SIGKILL)
    err = None
    x = np.ones(COUNT, np.float32)
    try:
        for _ in range(50):
            comm.all_reduce(x)
            x[:] = 1
    except pycoll.PeerFailure as exc:
        err = (exc.lost_names, exc.lost, str(exc))
    comm.update_topology()
    return old_members, old_rank, list(comm.members), comm.rank, comm.world_size, err


@pytest.mark.timeout(120)
def test_ranks_are_reassigned_deterministically_after_a_loss():
    names = ["a", "b", "c", "d", "e"]
    with Cluster(min_world_size=5) as c:
        for n in names:
            c.spawn(n, _lose_one, "c")
        res = dict(zip(names, c.results(names, timeout=90)))
    assert res["c"] == KILLED
    old = res["a"][0]
    survivors = [n for n in old if n != "c"]
    victim_rank = old.index("c")
    for n in survivors:
        old_members, old_rank, members, rank, ws, err = res[n]
        assert old_members == old and members == survivors, "survivors keep their relative order"
        assert rank == survivors.index(n) and ws == 4
        assert err is not None, f"{n} never saw the failure"
        lost_names, lost_ranks, text = err
        assert lost_names == ("c",) and lost_ranks == (victim_rank,), err


# ---- a peer killed inside a collective, every algorithm ------------------
def _killed_inside(comm, victim, algorithm, retry):
    if comm.name == victim:
        arm("during:all_reduce")
    start_members = list(comm.members)
    x = np.full(COUNT, _value(comm.name), np.float32)
    original = x.copy()
    err, intact = None, True
    for _ in range(20):  # the victim dies inside the first of these
        try:
            comm.all_reduce(x, algorithm=algorithm, retry=retry)
        except pycoll.PeerFailure as exc:
            err = (exc.lost_names, str(exc))
            intact = bool(np.array_equal(x, original))
            break
        if retry:
            break
        x[:] = original
    out = comm.last_outcome
    y = np.full(8, _value(comm.name), np.float64)
    comm.all_reduce(y, algorithm=algorithm)  # the group carries on
    return (start_members, err, intact, float(x[0]), out and (out.contributors, out.attempts, out.lost),
            comm.world_size, float(y[0]))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_kill_inside_collective_names_the_lost_peer(algorithm, transport):
    names = ["p0", "p1", "p2", "p3"]
    with Cluster(min_world_size=4, connect_kwargs={"transport": transport}) as c:
        for n in names:
            c.spawn(n, on_transport, transport, _killed_inside, "p2", algorithm, False)
        res = dict(zip(names, c.results(names, timeout=90)))
    assert res["p2"] == KILLED
    survivors = [n for n in names if n != "p2"]
    for n in survivors:
        start, err, intact, _, _, ws, total = res[n]
        assert err is not None and err[0] == ("p2",) and "p2" in err[1], err
        assert intact, f"{n}: buffer not restored"
        assert ws == 3 and total == _expected(survivors)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_retry_reruns_over_the_survivors(algorithm, transport):
    names = ["p0", "p1", "p2", "p3", "p4"]
    with Cluster(min_world_size=5, connect_kwargs={"transport": transport}) as c:
        for n in names:
            c.spawn(n, on_transport, transport, _killed_inside, "p3", algorithm, True)
        res = dict(zip(names, c.results(names, timeout=90)))
    assert res["p3"] == KILLED
    survivors = [n for n in names if n != "p3"]
    for n in survivors:
        start, err, intact, value, (contributors, attempts, lost), ws, total = res[n]
        assert err is None, err
        assert sorted(contributors) == survivors and attempts == 2 and lost == ("p3",)
        assert value == _expected(survivors) and ws == 4 and total == _expected(survivors)


def _dies_at(comm, victim, point, algorithm):
    if comm.name == victim:
        arm(point)
    x = np.full(1 << 16, _value(comm.name), np.float64)
    comm.all_reduce(x, algorithm=algorithm, retry=True)
    first = (float(x[0]), comm.last_outcome.contributors, comm.last_outcome.attempts)
    y = np.full(1 << 16, _value(comm.name), np.float64)
    comm.all_reduce(y, algorithm=algorithm, retry=True)  # the loss is noticed by now at the latest
    return first, (float(y[0]), comm.last_outcome.contributors)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("point,included", [("agreed:all_reduce", False), ("decided:all_reduce", True)])
def test_outcome_is_agreed_when_a_peer_dies_around_the_decision(algorithm, point, included):
    """Dying after the transfers but before reporting done: the collective
    is aborted everywhere and re-run without the victim. Dying after the
    group decided to commit: every survivor's result includes the victim."""
    names = ["p0", "p1", "p2", "p3"]
    with Cluster(min_world_size=4) as c:
        for n in names:
            c.spawn(n, _dies_at, "p1", point, algorithm)
        res = dict(zip(names, c.results(names, timeout=90)))
    assert res["p1"] == KILLED
    survivors = [n for n in names if n != "p1"]
    firsts = {res[n][0] for n in survivors}
    assert len(firsts) == 1, f"survivors disagree on the outcome: {firsts}"
    value, contributors, attempts = firsts.pop()
    want = names if included else survivors
    assert sorted(contributors) == want and value == _expected(want)
    assert attempts == (1 if included else 2)
    for n in survivors:
        value2, contributors2 = res[n][1]
        assert value2 == _expected(survivors) and sorted(contributors2) == survivors


# ---- a silent peer (stopped, or its connection cut) -----------------------
def _loop_until(comm, steps):
    worst = 0.0
    for i in range(steps):
        x = np.full(1 << 14, _value(comm.name))
        t0 = time.monotonic()
        comm.all_reduce(x, retry=True)
        worst = max(worst, time.monotonic() - t0)
        assert x[0] == _expected(comm.last_outcome.contributors)
        time.sleep(0.01)
    return worst, comm.world_size, list(comm.last_outcome.contributors)


def _stopped_peer(comm):
    try:
        _loop_until(comm, 10 ** 6)
    except pycoll.CollectiveError as exc:
        return type(exc).__name__, getattr(exc, "evicted", False), str(exc)


@pytest.mark.timeout(120)
def test_silent_peer_is_detected_within_the_heartbeat_bound_and_told_it_was_removed():
    hb = 1.0
    names = ["s0", "s1", "s2"]
    with Cluster(min_world_size=4, heartbeat_timeout=hb) as c:
        for n in names:
            c.spawn(n, _loop_until, 150)
        c.spawn("z", _stopped_peer)
        _wait_epoch(c, 1)
        time.sleep(0.5)
        c.kill("z", signal.SIGSTOP)  # no RST, no FIN: only the heartbeat bound can notice
        res = c.results(names, timeout=90)
        c.kill("z", signal.SIGCONT)
        kind, evicted, text = c.results(["z"], timeout=30)[0]
    for worst, ws, contributors in res:
        assert ws == 3 and sorted(contributors) == names
        assert worst < hb + 8, f"a call took {worst:.1f} s: detection must be bounded by the heartbeat timeout"
    assert kind == "CoordinatorError" and evicted and "removed" in text, text


# ---- graceful leave ---------------------------------------------------------
def _leaver(comm, leaver):
    x = np.full(8, _value(comm.name))
    comm.all_reduce(x, retry=True)
    if comm.name == leaver:
        return "left"  # close() is called by the harness
    comm.update_topology()
    y = np.full(8, _value(comm.name))
    comm.all_reduce(y, retry=True)
    return comm.world_size, list(comm.lost), float(y[0]), list(comm.members)


@pytest.mark.timeout(90)
def test_graceful_leave_is_a_clean_membership_change():
    names = ["g0", "g1", "g2", "g3"]
    with Cluster(min_world_size=4) as c:
        for n in names:
            c.spawn(n, _leaver, "g1")
        res = dict(zip(names, c.results(names, timeout=60)))
    assert res["g1"] == "left"
    for n in ("g0", "g2", "g3"):
        ws, lost, total, members = res[n]
        assert ws == 3 and lost == ["g1"] and total == _expected(members)


# ---- broadcast: the root moves with retries; losing it is not retryable ---
def _bcast(comm, victim, root_name, point):
    if comm.name == victim:
        arm(point)
    root = comm.members.index(root_name)
    x = np.full(COUNT, _value(comm.name), np.float32)
    try:
        comm.broadcast(x, root=root, retry=True)
    except pycoll.PeerFailure as exc:
        return "failed", exc.retryable, exc.lost_names, bool(np.all(x == _value(comm.name)))
    return "ok", float(x[0]), comm.last_outcome.attempts, tuple(sorted(comm.last_outcome.contributors))


@pytest.mark.timeout(120)
def test_broadcast_retry_follows_the_root_and_fails_cleanly_without_it():
    names = ["b0", "b1", "b2", "b3"]
    with Cluster(min_world_size=4) as c:  # b1 dies before reporting: retried without it, root b3 moves
        for n in names:
            c.spawn(n, _bcast, "b1", "b3", "agreed:broadcast")
        res = dict(zip(names, c.results(names, timeout=90)))
    assert res["b1"] == KILLED
    for n in ("b0", "b2", "b3"):
        assert res[n] == ("ok", _value("b3"), 2, ("b0", "b2", "b3")), res[n]
    with Cluster(min_world_size=3) as c:  # the root itself is lost: nothing to retry
        for n in names[:3]:
            c.spawn(n, _bcast, "b0", "b0", "agreed:broadcast")
        res = dict(zip(names[:3], c.results(names[:3], timeout=90)))
    for n in ("b1", "b2"):
        state, retryable, lost, intact = res[n]
        assert state == "failed" and not retryable and "b0" in lost and intact


@pytest.mark.timeout(120)
def test_broadcast_outcome_is_the_same_on_every_survivor_whenever_the_victim_dies():
    """Killed 2 ms into the transfer, the victim may or may not have
    finished its part (its data can already sit in socket buffers): either
    way every survivor reports the same outcome, and it is a correct one."""
    names = ["b0", "b1", "b2", "b3"]
    with Cluster(min_world_size=4) as c:
        for n in names:
            c.spawn(n, _bcast, "b2", "b0", "during:broadcast")
        res = dict(zip(names, c.results(names, timeout=90)))
    assert res["b2"] == KILLED
    outcomes = {res[n] for n in ("b0", "b1", "b3")}
    assert len(outcomes) == 1, outcomes
    state, value, attempts, contributors = outcomes.pop()
    assert state == "ok" and value == _value("b0")
    assert (attempts, contributors) in ((1, tuple(names)), (2, ("b0", "b1", "b3")))


# ---- verify=True ------------------------------------------------------------
def _verified(comm):
    x = np.arange(1000, dtype=np.float32) * (comm.rank + 1)
    comm.all_reduce(x, verify=True)
    g = np.zeros(3 * comm.world_size, np.int32)
    comm.all_gather(np.full(3, comm.rank, np.int32), g, verify=True)
    return x.tobytes(), g.tolist(), comm.last_outcome.digest


@pytest.mark.timeout(60)
def test_verify_cross_checks_digests():
    names = ["v0", "v1", "v2"]
    with Cluster(min_world_size=3) as c:
        for n in names:
            c.spawn(n, _verified)
        res = c.results(names, timeout=50)
    want = (np.arange(1000, dtype=np.float32) * 6).tobytes()
    assert all(r[0] == want for r in res) and len({r[2] for r in res}) == 1
    assert all(r[1] == [0, 0, 0, 1, 1, 1, 2, 2, 2] for r in res)


def test_coordinator_reports_digest_mismatch_to_every_member():
    """The decision logic itself, driven by two hand-made members."""
    from pycoll.control.coordinator import Coordinator
    coord = Coordinator("127.0.0.1", 0, min_world_size=2).start()
    clients = [CoordinatorClient("127.0.0.1", coord.port, name=f"x{i}") for i in range(2)]
    try:
        for i, cl in enumerate(clients):
            cl.request({"t": "join", "proto": 1, "addr": ["127.0.0.1", 1 + i]}, timeout=5)
        import threading
        replies = [None, None]

        def ask(i, msg):
            replies[i] = clients[i].request(msg, timeout=5)
        for round_msgs in ([{"t": "sync", "rebuild": True}] * 2,
                           [{"t": "round", "kind": "collective", "epoch": 1, "seq": 1, "ok": True, "digest": d}
                            for d in (7, 7)],
                           [{"t": "round", "kind": "collective", "epoch": 1, "seq": 2, "ok": True, "digest": d}
                            for d in (7, 8)]):
            threads = [threading.Thread(target=ask, args=(i, m)) for i, m in enumerate(round_msgs)]
            [t.start() for t in threads]
            [t.join(10) for t in threads]
            if round_msgs[0]["t"] == "round" and round_msgs[0]["seq"] == 1:
                assert [r["decision"] for r in replies] == ["commit", "commit"]
        assert [r["decision"] for r in replies] == ["parity", "parity"]
        assert replies[0]["differ"] == [1] and replies[0]["digests"] == [7, 8]
    finally:
        for cl in clients:
            cl.close()
        coord.stop()


# ---- coordinator trouble -----------------------------------------------------
def _until_coordinator_dies(comm):
    for _ in range(100000):
        try:
            x = np.full(64, 1.0)
            comm.all_reduce(x, retry=True)
            comm.update_topology()
        except pycoll.CoordinatorError as exc:
            return time.time(), str(exc)
        time.sleep(0.01)
    return None, "never failed"


@pytest.mark.timeout(90)
def test_coordinator_death_is_a_clear_error_not_a_hang():
    """Without failover (failover=False) a dead coordinator is a CoordinatorError on every
    peer (with failover, tests/e2e/test_failover.py: a member succeeds it)."""
    hb = 1.0
    port = free_port()
    master = subprocess.Popen([sys.executable, "-m", "pycoll", "master", "--port", str(port),
                               "--heartbeat-timeout", str(hb)], env=dict(os.environ))
    import multiprocessing as mp
    from elastic_util import _peer_main
    ctx = mp.get_context("spawn")
    procs, pipes = [], []
    try:
        for i in range(3):
            parent, child = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_peer_main, args=(_until_coordinator_dies, (), port, f"c{i}",
                                                     {"heartbeat_timeout": hb, "timeout": 20, "failover": False},
                                                     None, child))
            p.start()
            child.close()
            procs.append(p)
            pipes.append(parent)
        probe = CoordinatorClient("127.0.0.1", port, name="probe")
        try:  # wait until all three are members (a peer still joining waits for join_timeout instead)
            deadline = time.monotonic() + 60
            while len(probe.request({"t": "status"}, timeout=10)["members"]) < 3:
                assert time.monotonic() < deadline, "group did not form"
                time.sleep(0.05)
        finally:
            probe.close()
        time.sleep(0.3)  # let them loop
        killed_at = time.time()
        master.kill()
        master.wait(timeout=10)
        import pickle
        for pipe in pipes:
            assert pipe.poll(30), "a peer hung after the coordinator died"
            status, *rest = pickle.loads(pipe.recv_bytes())
            assert status == "ok", rest
            when, text = rest[0]
            assert when is not None and "coordinator" in text
            assert when - killed_at < hb + 10
    finally:
        if master.poll() is None:
            master.kill()
        for p in procs:
            p.kill()
            p.join(5)


def _through_restart(comm, steps):
    state = {"w": np.zeros(1000)}
    revision, errors = 0, 0
    while True:
        try:
            res = comm.sync_shared_state(state, revision)
            revision = res.revision
            if revision >= steps:
                break
            d = np.ones(1000)
            comm.all_reduce(d, retry=True)
            state["w"] += d / len(comm.last_outcome.contributors)
            revision += 1
            comm.update_topology()
            time.sleep(0.02)
        except pycoll.CoordinatorError:
            errors += 1  # the next call re-registers with the restarted coordinator
            assert errors < 10
    return revision, state["w"].tobytes(), errors, comm.epoch


@pytest.mark.timeout(120)
def test_peers_reregister_with_a_restarted_coordinator_and_carry_on():
    """failover=False, coordinator_wait: the peers wait for a coordinator restarted at the same address."""
    hb, steps = 1.0, 80
    port = free_port()
    cmd = [sys.executable, "-m", "pycoll", "master", "--port", str(port), "--heartbeat-timeout", str(hb)]
    master = subprocess.Popen(cmd)
    import multiprocessing as mp
    from elastic_util import _peer_main
    ctx = mp.get_context("spawn")
    procs, pipes = [], []
    try:
        for i in range(3):
            parent, child = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_peer_main, args=(_through_restart, (steps,), port, f"r{i}",
                                                     {"heartbeat_timeout": hb, "timeout": 20,
                                                      "coordinator_wait": 60, "failover": False}, None, child))
            p.start()
            child.close()
            procs.append(p)
            pipes.append(parent)
        probe = CoordinatorClient("127.0.0.1", port, name="probe")
        try:
            deadline = time.monotonic() + 60
            while len(probe.request({"t": "status"}, timeout=10)["members"]) < 3:
                assert time.monotonic() < deadline, "group did not form"
                time.sleep(0.05)
            time.sleep(0.3)
            epoch_before = probe.request({"t": "status"}, timeout=10)["epoch"]
        finally:
            probe.close()
        master.kill()
        master.wait(timeout=10)
        time.sleep(hb + 0.5)  # everyone notices
        master = subprocess.Popen(cmd)  # same address, no memory of the group
        results = peer_results(pipes)
    finally:
        master.kill()
        master.wait()
        for p in procs:
            p.kill()
            p.join(5)
    assert {r[0] for r in results} == {steps}
    assert len({r[1] for r in results}) == 1 and np.all(np.frombuffer(results[0][1]) == steps)
    assert all(r[3] > epoch_before for r in results), "the group re-formed under the new coordinator"
    print("errors seen by the application:", [r[2] for r in results], "epochs", epoch_before, [r[3] for r in results])


@pytest.mark.timeout(200)
def test_elastic_example_trains_through_churn():
    here = os.path.dirname(os.path.abspath(__file__))
    demo = os.path.join(here, "..", "..", "examples", "elastic_demo.py")
    out = subprocess.run([sys.executable, demo, "--steps", "100", "--kills", "2", "--seed", "3"],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    losses = [float(line.split("loss")[1].split()[0]) for line in out.stdout.splitlines() if "] step" in line]
    assert len(losses) >= 5 and losses[-1] < losses[0] / 10, losses
    assert out.stdout.count("--- demo: SIGKILL") == 2
    finals = {line.split("loss")[-1].strip() for line in out.stdout.splitlines() if "done at step 100" in line}
    assert len(finals) == 1, "every finishing peer holds the same model"


def test_malformed_round_reports_are_refused_or_answered_never_hang():
    """Hand-made members send rounds the peers' code never sends: the shape
    check drops them, or every waiter gets an error decision."""
    import threading
    from pycoll.control.coordinator import Coordinator
    coord = Coordinator("127.0.0.1", 0, min_world_size=2).start()
    clients = [CoordinatorClient("127.0.0.1", coord.port, name=f"y{i}") for i in range(2)]
    try:
        for i, cl in enumerate(clients):
            cl.request({"t": "join", "proto": 1, "addr": ["127.0.0.1", 1 + i]}, timeout=5)
        replies = [None, None]

        def ask(i, msg, timeout=5):
            try:
                replies[i] = clients[i].request(msg, timeout=timeout)
            except pycoll.CoordinatorError as exc:
                replies[i] = exc
        threads = [threading.Thread(target=ask, args=(i, {"t": "sync", "rebuild": True})) for i in range(2)]
        [t.start() for t in threads]
        [t.join(10) for t in threads]
        ask(0, {"t": "round", "kind": "state", "epoch": 1, "seq": "x"}, timeout=1)  # bad shape: dropped
        assert isinstance(replies[0], pycoll.CoordinatorError) and replies[0].timed_out
        bad = [{"t": "round", "kind": "state", "epoch": 1, "seq": 5, "revision": 0},  # no tensors
               {"t": "round", "kind": "state", "epoch": 1, "seq": 5, "revision": 0, "tensors": []}]
        threads = [threading.Thread(target=ask, args=(i, bad[i])) for i in range(2)]
        [t.start() for t in threads]
        [t.join(10) for t in threads]
        assert [r["decision"] for r in replies] == ["error", "error"], replies
    finally:
        for cl in clients:
            cl.close()
        coord.stop()


# ---- standalone aggregators are members that never report rounds ---------
def _agreed_through_switches(comm):
    from switches import wait_for_switches
    wait_for_switches(comm, ["rack0", "rack1"])
    x = np.arange(1000, dtype=np.float64) * (comm.rank + 1)
    y = x.copy()
    comm.all_reduce(x, algorithm="innetwork")
    sent = lib_bytes(comm)
    comm.all_reduce(y, algorithm="innetwork", retry=True, verify=True)
    through_switches = lib_bytes(comm) > sent
    state = {"w": np.full(10, 1.0 if comm.rank == 0 else 0.0)}
    res = comm.sync_shared_state(state, 1 if comm.rank == 0 else 0)
    return (x.tobytes() == y.tobytes(), list(comm.last_outcome.contributors), list(comm.members),
            state["w"].tolist(), res.revision, through_switches)


def lib_bytes(comm):
    from pycoll.core.native import lib
    return lib.pc_comm_bytes_sent(comm.epoch_state.switch.hcomm)


@pytest.mark.timeout(180)
def test_agreement_and_shared_state_with_standalone_aggregators(tmp_path):
    from switches import run_workers, two_switches
    with two_switches(tmp_path) as (port, path, _):
        results = run_workers(_agreed_through_switches, port, path)
    for same, contributors, members, w, revision, through in results:
        assert same and through, "the agreed all-reduce ran through the switches and matches the plain one"
        assert contributors == members and len(members) == 4, "contributors are the workers, not the switches"
        assert w == [1.0] * 10 and revision == 1


def _compressed_retry(comm, victim):
    if comm.name == victim:
        arm("during:all_reduce")
    x = np.full(COUNT, _value(comm.name), np.float32)  # small integers: fp16 sums stay exact
    comm.all_reduce(x, retry=True, compression="fp16", algorithm="ring")
    return x.tobytes(), sorted(comm.last_outcome.contributors), comm.last_outcome.attempts


@pytest.mark.timeout(120)
def test_retry_with_wire_compression_keeps_the_input_until_commit():
    names = ["c0", "c1", "c2", "c3"]
    with Cluster(min_world_size=4) as c:
        for n in names:
            c.spawn(n, _compressed_retry, "c1")
        res = dict(zip(names, c.results(names, timeout=100)))
    assert res["c1"] == KILLED
    survivors = ["c0", "c2", "c3"]
    want = np.full(COUNT, _expected(survivors), np.float32).tobytes()
    for n in survivors:
        data, contributors, attempts = res[n]
        assert contributors == survivors and attempts == 2
        assert data == want, "the retry started from a damaged input"


@contextlib.contextmanager
def _two_members():
    """A coordinator with two hand-made members (joined, no epoch yet) and
    ``both(msgs)``: each member sends its message at the same time; the replies."""
    import threading
    from pycoll.control.coordinator import Coordinator
    coord = Coordinator("127.0.0.1", 0, min_world_size=2, cause_grace=0.2).start()
    clients = [CoordinatorClient("127.0.0.1", coord.port, name=f"m{i}") for i in range(2)]
    replies = [None, None]

    def both(msgs):
        def ask(i):
            replies[i] = clients[i].request(msgs[i], timeout=5)
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
        [t.start() for t in threads]
        [t.join(10) for t in threads]
        return list(replies)
    try:
        for i, cl in enumerate(clients):
            cl.request({"t": "join", "proto": 1, "addr": ["127.0.0.1", 1 + i]}, timeout=5)
        yield clients, both
    finally:
        for cl in clients:
            cl.close()
        coord.stop()


def test_abort_is_retryable_for_broken_connections_not_for_protocol_errors():
    """The coordinator's decision, driven by two hand-made members: with no
    member lost, an abort caused by a broken connection is retried by
    everyone, one caused by a protocol error (or a timeout) by no one."""
    with _two_members() as (clients, both):
        outcomes = []
        for epoch, status in ((1, 4), (2, 5), (3, 6), (4, 7)):  # PEER, PROTO, TIMEOUT, CANCELLED
            assert both([{"t": "sync", "rebuild": True}] * 2)[0]["epoch"] == epoch
            got = both([{"t": "round", "kind": "collective", "epoch": epoch, "seq": 1, "ok": False,
                         "status": status, "why": "x"},
                        {"t": "round", "kind": "collective", "epoch": epoch, "seq": 1, "ok": True}])
            assert [r["decision"] for r in got] == ["abort", "abort"] and got[0]["retry"] == got[1]["retry"]
            outcomes.append(got[0]["retry"])
        assert outcomes == [True, False, False, True]


def test_a_failure_after_a_commit_gets_the_abort_not_the_old_commit():
    """Regression: a call that finds the epoch aborted reports the last seq,
    which the previous agreed collective used; it must get the abort and its
    cause, and only a member withdrawing from a round gets that round's
    decision back."""
    with _two_members() as (clients, both):
        both([{"t": "sync", "rebuild": True}] * 2)
        done = {"t": "round", "kind": "collective", "epoch": 1, "seq": 1, "ok": True}
        assert [r["decision"] for r in both([done, done])] == ["commit", "commit"]
        late = clients[0].request({"t": "fail", "epoch": 1, "seq": 1, "status": 4, "why": "x", "withdraw": True},
                                  timeout=5)
        assert late["decided"]["decision"] == "commit"  # withdrawing from #1: it had committed
        info = clients[0].request({"t": "fail", "epoch": 1, "seq": 1, "status": 4, "why": "broken"}, timeout=5)
        assert "decided" not in info and info["retry"] is True and "broken" in info["why"]
