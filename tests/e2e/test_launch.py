"""The launch and control path: first contact, launch mistakes answered
within seconds (not after the 120 s join timeout), init right after close on
the same port, jobs kept apart, a joiner's first call, and an evicted peer
told what happened."""
import logging
import os
import signal
import socket
import threading
import time

import numpy as np
import pytest

import pycoll
import pycoll.testing
from elastic_util import Cluster
from pycoll.control.client import CoordinatorClient
from pycoll.control.coordinator import PROTOCOL, Coordinator
from pycoll.testing import free_port


def _init_timed(rank, world_size, **kw):
    """init in a rank of pycoll.testing.run(init=None): (seconds, error text or None, warnings)."""
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append((time.monotonic(), record.getMessage()))

    logging.getLogger("pycoll").addHandler(Keep(logging.WARNING))
    t0 = time.monotonic()
    try:
        comm = pycoll.init(rank=rank, world_size=world_size, **kw)
    except pycoll.CollectiveError as exc:
        return time.monotonic() - t0, f"{type(exc).__name__}: {exc}", [(t - t0, m) for t, m in records]
    comm.close()
    return time.monotonic() - t0, None, [(t - t0, m) for t, m in records]


# ---- 1. init right after close on the same port ------------------------------
def _init_close_loop(rounds):
    rank, ws, port = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["MASTER_PORT"])
    out = []
    for i in range(rounds):
        comm = pycoll.init(rank, ws, "127.0.0.1", port, join_timeout=20, timeout=20)
        x = np.full(4, float(rank + 1 + 10 * i), np.float32)
        comm.all_reduce(x)
        out.append((comm.world_size, float(x[0])))
        if rank == 0 and i % 2:
            time.sleep(0.3)  # rank 1 closes first and its next init reaches the old coordinator
        comm.close()
    return out


@pytest.mark.timeout(120)
def test_init_right_after_close_on_the_same_port_forms_the_full_group_every_time():
    rounds = 6
    res = pycoll.testing.run(_init_close_loop, 2, args=(rounds,), init=None, timeout=100)
    for r in res:
        assert r == [(2, float(3 + 20 * i)) for i in range(rounds)], res


def test_a_coordinator_whose_host_is_closing_refuses_joins_and_says_so():
    c = Coordinator("127.0.0.1", free_port(), world_size=1).start()
    host = CoordinatorClient("127.0.0.1", c.port, name="host")
    other = CoordinatorClient("127.0.0.1", c.port, name="late")
    try:
        c.host_name = "host"  # what pycoll.init sets on the coordinator rank 0 hosts
        host.request(_join(0, 1), timeout=10)
        host.request({"t": "leave"}, timeout=10)
        with pytest.raises(pycoll.CoordinatorError, match="shutting down") as info:
            other.request(_join(0, 1), timeout=10)
        assert getattr(info.value, "retry", False)
    finally:
        host.close()
        other.close()
        c.stop()


def _join(rank, ws, job=None):
    msg = {"t": "join", "proto": PROTOCOL, "addr": ["127.0.0.1", 9], "host_id": "h", "rank": rank,
           "world_size": ws, "info": {"pid": os.getpid()}}
    if job is not None:
        msg["job"] = job
    return msg


# ---- 2. a joiner whose first call is update_topology --------------------------
def _members_then_all_reduce(comm):
    while comm.pending_joiners() < 1:
        time.sleep(0.02)
    flag = np.array([1], np.int64)
    comm.all_reduce(flag)  # both members see the joiner before they admit it
    comm.update_topology()
    x = np.full(4, 1.0, np.float32)
    t0 = time.monotonic()
    comm.all_reduce(x)
    return comm.world_size, float(x[0]), time.monotonic() - t0


def _joiner_update_first(comm):
    t0 = time.monotonic()
    changed = comm.update_topology()
    x = np.full(4, 1.0, np.float32)
    comm.all_reduce(x)
    return comm.world_size, float(x[0]), time.monotonic() - t0, changed


@pytest.mark.timeout(90)
def test_a_joiner_whose_first_call_is_update_topology_does_not_stall_the_group():
    with Cluster(min_world_size=2, connect_kwargs={"timeout": 15}) as c:
        c.spawn("m0", _members_then_all_reduce)
        c.spawn("m1", _members_then_all_reduce)
        deadline = time.monotonic() + 30
        while c.coordinator.epoch < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        c.spawn("j", _joiner_update_first)
        members = c.results(["m0", "m1"], timeout=60)
        joiner = c.results(["j"], timeout=30)[0]
    for ws, total, took in members:
        assert (ws, total) == (3, 3.0) and took < 10, members
    assert joiner[:2] == (3, 3.0) and joiner[2] < 10, joiner


# ---- 3. a peer evicted while stopped ------------------------------------------
def _busy(comm, calls):
    # a fixed number of calls, not a time: the survivors end at the same call, so neither sees
    # the other leave (a peer that stopped at its own deadline was seen gone in ms by the other)
    for _ in range(calls):
        comm.all_reduce(np.ones(256, np.float32), retry=True)
        time.sleep(0.02)
    return comm.world_size


def _stopped_then_calls(comm):
    texts = []
    while len(texts) < 2:
        try:
            comm.all_reduce(np.ones(256, np.float32), retry=True)
            time.sleep(0.01)
        except pycoll.CollectiveError as exc:
            texts.append(str(exc))
    return texts


@pytest.mark.timeout(120)
def test_an_evicted_peer_is_told_it_was_evicted_why_and_how_to_rejoin():
    with Cluster(min_world_size=3, heartbeat_timeout=1.0) as c:
        c.spawn("a", _busy, 300)  # >= 6 s: past z's 3 s stop and its eviction
        c.spawn("b", _busy, 300)
        c.spawn("z", _stopped_then_calls)
        deadline = time.monotonic() + 30
        while c.coordinator.epoch < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.5)
        c.kill("z", signal.SIGSTOP)
        time.sleep(3.0)
        c.kill("z", signal.SIGCONT)
        first, later = c.results(["z"], timeout=60)[0]
        assert c.results(["a", "b"], timeout=60) == [2, 2]
    for text in (first, later):
        assert "evicted" in text and "no heartbeat for" in text, text
        assert "pycoll.connect" in text and "coordinator_wait" in text, text
        assert "lost contact" not in text, text


# ---- 4. launch mistakes ----------------------------------------------------------
def _init_with_timeout(rank_override, ws_override, **kw):
    rank = int(os.environ["RANK"]) if rank_override is None else rank_override(int(os.environ["RANK"]))
    ws = int(os.environ["WORLD_SIZE"]) if ws_override is None else ws_override(int(os.environ["RANK"]))
    return _init_timed(rank, ws, master_addr="127.0.0.1", master_port=int(os.environ["MASTER_PORT"]), **kw)


def _ws_three(rank):
    return 3


@pytest.mark.timeout(90)
def test_a_rank_that_never_starts_gets_progress_lines_and_PYCOLL_JOIN_TIMEOUT():
    # 2 ranks started of a world of 3: rank 2 never starts
    res = pycoll.testing.run(_init_with_timeout, 2, args=(None, _ws_three), init=None, timeout=60,
                             env={"PYCOLL_JOIN_TIMEOUT": "7"})
    for took, err, warnings in res:
        assert err is not None and 6 < took < 12, (took, err)
        assert "rank 2" in err and "2 of 3" in err, err
        early = [m for t, m in warnings if t < 7]
        assert any("2 of 3" in m and "waiting for rank 2" in m for m in early), warnings
        # ranks whose join timed out leave a group that never formed: no death to warn of ("member ...
        # is gone": rank 0's coordinator seeing a rank go; "the coordinator ... is gone": a rank still
        # joining seeing rank 0's coordinator stop, which its own join error reports)
        assert not any("is gone" in m for _, m in warnings), warnings


class _Squatter:
    """Another program on the port: answers with ``banner`` (or stays silent)."""

    def __init__(self, banner):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.banner, self.conns = banner, []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            if self.banner:
                try:
                    conn.sendall(self.banner)
                except OSError:
                    pass

    def close(self):
        self.sock.close()
        for c in self.conns:
            c.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("banner", [b"HTTP/1.1 400 Bad Request\r\n\r\n", b""])
@pytest.mark.parametrize("rank", [0, 1])
def test_a_port_held_by_another_program_is_named_at_once(banner, rank):
    sq = _Squatter(banner)
    try:
        took, err, _ = _init_timed(rank, 2, master_addr="127.0.0.1", master_port=sq.port)
    finally:
        sq.close()
    assert err is not None and "not a pycoll coordinator" in err and str(sq.port) in err, err
    assert took < 10, took


@pytest.mark.timeout(60)
@pytest.mark.parametrize("rank", [0, 1])
def test_a_master_addr_that_does_not_resolve_is_named_at_once(rank):
    took, err, _ = _init_timed(rank, 2, master_addr="no-such-host.invalid", master_port=free_port())
    assert err is not None and "no-such-host.invalid" in err and "resolve" in err, err
    assert took < 10, took


def _ws_by_rank(rank):
    return 2 + rank  # rank 0 says 2, rank 1 says 3


@pytest.mark.timeout(90)
def test_a_world_size_mismatch_fails_every_rank_promptly_naming_it():
    res = pycoll.testing.run(_init_with_timeout, 2, args=(None, _ws_by_rank), init=None, timeout=60)
    for took, err, _ in res:
        assert err is not None and "world_size" in err and "2" in err and "3" in err, err
        assert took < 10, (took, err)


def _rank_at_most_one(rank):
    return min(rank, 1)


@pytest.mark.timeout(90)
def test_a_duplicate_rank_fails_every_rank_promptly_naming_it():
    res = pycoll.testing.run(_init_with_timeout, 3, args=(_rank_at_most_one, None), init=None, timeout=60)
    for took, err, _ in res:
        assert err is not None and "rank 1" in err and "twice" in err, err
        assert took < 10, (took, err)


# ---- 5. jobs on one port ------------------------------------------------------------
def _hold(comm, seconds):
    comm.all_reduce(np.ones(4, np.float32))
    time.sleep(seconds)
    return comm.world_size


@pytest.mark.timeout(90)
def test_a_second_job_on_the_same_port_is_refused_naming_both_jobs():
    port = free_port()
    out = {}
    a = threading.Thread(target=lambda: out.setdefault("a", pycoll.testing.run(
        _hold, 2, args=(8.0,), port=port, timeout=60, env={"PYCOLL_JOB_ID": "job-aaa"})))
    a.start()
    try:
        deadline = time.monotonic() + 30
        while True:  # job A's coordinator is up and its group formed
            try:
                probe = CoordinatorClient("127.0.0.1", port)
                st = probe.request({"t": "status"}, timeout=1)
                probe.close()
                if st.get("epoch", 0) >= 1:
                    break
            except pycoll.CollectiveError:
                probe.close()
            assert time.monotonic() < deadline, "job A did not start"
            time.sleep(0.1)
        res = pycoll.testing.run(_init_with_timeout, 2, args=(None, None), init=None, port=port, timeout=60,
                                 env={"PYCOLL_JOB_ID": "job-bbb"})
    finally:
        a.join(70)
    assert out["a"] == [2, 2]
    for took, err, _ in res:
        assert err is not None and "job-aaa" in err and "job-bbb" in err, err
        assert took < 10, (took, err)


def test_job_ids_at_the_coordinator():
    c = Coordinator("127.0.0.1", free_port(), job_id="J1").start()
    clients = [CoordinatorClient("127.0.0.1", c.port, name=n) for n in ("a", "b", "c")]
    try:
        clients[0].request(dict(_join(None, None, job="J1")), timeout=10)
        clients[1].request(dict(_join(None, None)), timeout=10)  # no job id (a plain pycoll.connect): accepted
        with pytest.raises(pycoll.CoordinatorError, match="J2.*J1|J1.*J2"):
            clients[2].request(dict(_join(None, None, job="J2")), timeout=10)
    finally:
        for cl in clients:
            cl.close()
        c.stop()
    # without job_id= the coordinator adopts its first joiner's
    c = Coordinator("127.0.0.1", free_port()).start()
    clients = [CoordinatorClient("127.0.0.1", c.port, name=n) for n in ("a", "b")]
    try:
        clients[0].request(dict(_join(None, None, job="K1")), timeout=10)
        with pytest.raises(pycoll.CoordinatorError, match="K2.*K1|K1.*K2"):
            clients[1].request(dict(_join(None, None, job="K2")), timeout=10)
    finally:
        for cl in clients:
            cl.close()
        c.stop()


def test_job_id_from_the_environment(monkeypatch):
    from pycoll import group
    monkeypatch.delenv("PYCOLL_JOB_ID", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert group.job_id() is None
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # torchrun's default: no id at all
    assert group.job_id() is None
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "tr-7")
    assert group.job_id() == "tr-7"
    monkeypatch.setenv("PYCOLL_JOB_ID", "pj-1")
    assert group.job_id() == "pj-1"


@pytest.mark.timeout(60)
def test_pycoll_run_gives_its_workers_a_job_id(tmp_path, capfd, monkeypatch):
    from pycoll import launcher
    monkeypatch.delenv("PYCOLL_JOB_ID", raising=False)
    script = tmp_path / "w.py"
    script.write_text("import os\nprint('JOB=' + os.environ.get('PYCOLL_JOB_ID', ''))\n")
    assert launcher.run([str(script)], 2) == 0
    assert launcher.run([str(script)], 1) == 0
    jobs = [line.split("JOB=", 1)[1] for line in capfd.readouterr().out.splitlines() if "JOB=" in line]
    assert len(jobs) == 3 and all(jobs), jobs
    assert jobs[0] == jobs[1] and jobs[2] != jobs[0], jobs
