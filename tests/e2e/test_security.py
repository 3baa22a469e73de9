"""Attacks on a running group: each is refused (with a log line) and the
group keeps working with bit-exact results.

Covers: peers without / with a wrong secret (coordinator and mesh), garbage
and slow (slowloris) connections, handshake floods, replayed and stale
messages, identity spoofing, hostile frames on a data connection (bad magic,
version, length, oversized length, wrong sequence number, truncation, a
stalled peer), and the configurable limits.
"""
import fcntl
import logging
import multiprocessing as mp
import os
import secrets
import signal
import socket
import struct
import sys
import threading
import time

import msgpack
import numpy as np
import pytest
import zmq

import pycoll
import pycoll.testing
import wire_helpers as wh
from pycoll import auth
from pycoll.core.native import lib
from pycoll.control.client import CoordinatorClient
from pycoll.control.coordinator import PROTOCOL, Coordinator, pack
from pycoll.limits import Limits
from pycoll.net.mesh import ACK, HELLO, HELLO_MAGIC, HELLO_VERSION, Listener, build_mesh, connect_peer
from pycoll.plan.planners import plan_rings

SECRET = b"correct horse battery staple"


@pytest.fixture(autouse=True)
def _no_ambient_secret(monkeypatch):
    for var in ("PYCOLL_SECRET", "PYCOLL_SECRET_FILE"):
        monkeypatch.delenv(var, raising=False)


def _messages(caplog):
    return "\n".join(r.getMessage() for r in caplog.records)


# ---- the data mesh ----------------------------------------------------------------
def _all_reduce_over(fds_per_rank, count=1000):
    """Run an int64 and a float32 all-reduce over finished meshes; return
    whether every rank got the bit-exact reference."""
    n = len(fds_per_rank)
    comms = [wh.make_comm(r, n, fds_per_rank[r]) for r in range(n)]
    ok = True
    for dtype, code in ((np.int64, lib.PC_I64), (np.float32, lib.PC_F32)):
        rng = np.random.default_rng(7)
        inputs = [rng.integers(-1000, 1000, count).astype(dtype) for _ in range(n)]
        want = np.sum(np.stack(inputs).astype(np.int64), axis=0).astype(dtype)  # exact: small integers
        arrays = [x.copy() for x in inputs]
        out = [None] * n

        def go(r):
            p = plan_rings("all_reduce", n, r, [list(range(n))], count, arrays[r].itemsize, preserve=True)
            out[r] = wh.run(comms[r], p, arrays[r], arrays[r], dtype_code=code, op=lib.PC_SUM, seq=1, timeout=20)
        threads = [threading.Thread(target=go, args=(r,)) for r in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        ok &= all(o is not None and o[0] == lib.PC_OK for o in out)
        ok &= all(a.tobytes() == want.tobytes() for a in arrays)
    return ok


def _build(listeners, key, token, epoch, timeout=15.0, late=0.0, gate=None):
    """Every rank builds its mesh in a thread; ranks above 0 start ``late`` s
    later, and once ``gate()`` holds (or 10 s passed)."""
    n = len(listeners)
    addrs = [l.addr for l in listeners]
    fds, errors = [None] * n, []

    def go(r):
        if r:
            time.sleep(late)
            if gate is not None:
                _wait(gate, 10)
        try:
            fds[r] = build_mesh(listeners[r], r, addrs, 1, epoch, token, timeout, key=key)
        except Exception as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)
    threads = [threading.Thread(target=go, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    return threads, fds, errors


def _claim(addr, src, dst, epoch, token, key):
    """Connect now (into the backlog); a thread answers the challenge with
    ``key`` once the listener accepts. Returns the socket."""
    s = socket.create_connection(addr, timeout=10)

    def answer():
        try:
            chal = b""
            while len(chal) < auth.CHALLENGE_BYTES:
                part = s.recv(auth.CHALLENGE_BYTES - len(chal))
                if not part:
                    return
                chal += part
            hello = HELLO.pack(HELLO_MAGIC, HELLO_VERSION, 0, src, dst, epoch, token.encode()[:32])
            s.sendall(hello + auth.respond(key, chal, hello))
        except OSError:
            pass
    threading.Thread(target=answer, daemon=True).start()
    return s


@pytest.mark.timeout(60)
def test_mesh_refuses_strangers_and_still_forms(caplog):
    caplog.set_level(logging.WARNING)
    limits = Limits(handshake_timeout=2.0)
    listeners = [Listener("127.0.0.1", limits=limits) for _ in range(3)]
    key, token, epoch = auth.derive(SECRET, "mesh"), secrets.token_hex(16), 4
    hostile = []
    try:
        # strangers get there first: they sit in every listener's backlog
        for r, l in enumerate(listeners):
            g = socket.create_connection(l.addr)
            g.sendall(os.urandom(200))  # garbage
            hostile.append(g)
            for claim_key in (auth.derive(None, "mesh"), auth.derive(b"wrong", "mesh")):
                hostile.append(_claim(l.addr, 2, r, epoch, token, claim_key))  # no / wrong secret
            hostile.append(_claim(l.addr, 2, r, epoch, secrets.token_hex(16), key))  # another epoch's token
        t0 = time.monotonic()
        # rank 0 is busy with the strangers before its real peers dial (its log must show each refusal)
        wanted = ("bad magic", "authentication failed for a peer claiming rank 2 (wrong or missing PYCOLL_SECRET?)",
                  "hello for epoch")
        threads, fds, errors = _build(listeners, key, token, epoch,
                                      gate=lambda: all(w in _messages(caplog) for w in wanted))
        for t in threads:
            t.join(30)
        elapsed = time.monotonic() - t0
        assert not errors, errors
        assert elapsed < 10, "strangers must not hold up the mesh"
        assert _all_reduce_over(fds)
        log = _messages(caplog)
        assert "rank 0 rejected a connection" in log
        assert all(w in log for w in wanted)
    finally:
        for s in hostile:
            s.close()
        for l in listeners:
            l.close()


@pytest.mark.timeout(60)
def test_handshake_flood_is_bounded(caplog):
    caplog.set_level(logging.WARNING)
    limits = Limits(max_pending=8)
    listeners = [Listener("127.0.0.1", limits=limits) for _ in range(2)]
    key, token = auth.derive(SECRET, "mesh"), secrets.token_hex(16)
    flood = [socket.create_connection(listeners[0].addr) for _ in range(60)]  # silent connections
    try:
        threads, fds, errors = _build(listeners, key, token, 2, late=0.3)
        for t in threads:
            t.join(30)
        assert not errors, errors
        assert "more than 8 handshakes pending (max_pending)" in _messages(caplog)
        assert _all_reduce_over(fds)
    finally:
        for s in flood:
            s.close()
        for l in listeners:
            l.close()


@pytest.mark.timeout(60)
def test_slowloris_is_dropped_after_the_handshake_timeout(caplog):
    caplog.set_level(logging.WARNING)
    limits = Limits(handshake_timeout=0.5)
    listeners = [Listener("127.0.0.1", limits=limits) for _ in range(2)]
    key, token = auth.derive(SECRET, "mesh"), secrets.token_hex(16)
    slow = socket.create_connection(listeners[0].addr)
    stop = threading.Event()

    def drip():  # one byte every 0.1 s: never a whole hello
        try:
            while not stop.is_set():
                slow.send(b"P")
                time.sleep(0.1)
        except OSError:
            pass
    dripper = threading.Thread(target=drip, daemon=True)
    dripper.start()
    try:
        fds = [None, None]
        accept = threading.Thread(target=lambda: fds.__setitem__(0, build_mesh(
            listeners[0], 0, [l.addr for l in listeners], 1, 1, token, 10, key=key)))
        accept.start()
        time.sleep(1.2)  # the real peer comes late: the slow one has been dropped by now
        fds[1] = build_mesh(listeners[1], 1, [l.addr for l in listeners], 1, 1, token, 10, key=key)
        accept.join(15)
        assert "no valid hello within 0.5 s" in _messages(caplog)
        dripper.join(5)
        assert not dripper.is_alive(), "the slow connection should have been closed"
        assert _all_reduce_over(fds)
    finally:
        stop.set()
        slow.close()
        for l in listeners:
            l.close()


def test_connector_refuses_an_impostor_listener():
    """A listener that does not hold the secret cannot pose as a peer."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)

    def impostor():
        c, _ = srv.accept()
        c.sendall(os.urandom(auth.CHALLENGE_BYTES))
        c.recv(HELLO.size + auth.RESPONSE_BYTES)
        c.sendall(ACK + os.urandom(auth.PROOF_BYTES))  # acks, but cannot prove anything
        time.sleep(0.5)
        c.close()
    t = threading.Thread(target=impostor, daemon=True)
    t.start()
    try:
        with pytest.raises(pycoll.PeerFailure, match="failed to prove"):
            connect_peer(srv.getsockname(), 1, 0, 0, 1, "tok", time.monotonic() + 5, key=auth.derive(SECRET, "mesh"))
    finally:
        srv.close()


@pytest.mark.parametrize("server_secret,client_secret", [(SECRET, SECRET), (SECRET, b"wrong"), (SECRET, None)])
def test_service_handshake_for_aggregators(server_secret, client_secret):
    a, b = socket.socketpair()
    result = {}

    def server():
        try:
            auth.server_handshake(a, auth.derive(server_secret, "aggregator"), 2.0, b"ctx")
            result["server"] = "ok"
        except (auth.AuthError, OSError) as exc:
            result["server"] = exc
            a.close()
    t = threading.Thread(target=server)
    t.start()
    try:
        auth.client_handshake(b, auth.derive(client_secret, "aggregator"), 2.0, b"ctx")
        result["client"] = "ok"
    except (auth.AuthError, OSError) as exc:
        result["client"] = exc
    t.join(5)
    b.close()
    a.close()
    if server_secret == client_secret:
        assert result == {"server": "ok", "client": "ok"}
    else:
        assert isinstance(result["server"], auth.AuthError)
        assert result["client"] != "ok"


# ---- hostile frames on a data connection ------------------------------------------
FIRST_HDR = {  # byte offset in rank 1's stream -> new value (first frame header)
    "bad_magic": ({0: ord("E")}, None, None),
    "bad_version": ({4: 99}, None, None),
    "bad_kind": ({6: 7}, None, None),
    "wrong_seq": ({16: wh.SEQ + 1}, None, None),
    "wrong_digest": ({12: 0}, None, None),
    "bad_length": ({24: 1}, None, None),
    "oversized_length": ({31: 0x80}, None, None),
    "truncated": ({}, 40, None),
    "stalled": ({}, None, 40),
}
EXPECT = {
    "bad_magic": (lib.PC_ERR_PROTO, "bad magic"),
    "bad_version": (lib.PC_ERR_PROTO, "protocol version 99"),
    "bad_kind": (lib.PC_ERR_PROTO, "unknown frame kind"),
    "wrong_seq": (lib.PC_ERR_PROTO, "collective #8 while running #7"),
    "wrong_digest": (lib.PC_ERR_PROTO, "mismatched collective arguments"),
    "bad_length": (lib.PC_ERR_PROTO, "frame length"),
    "oversized_length": (lib.PC_ERR_PROTO, "frame length 922337"),
    "truncated": (lib.PC_ERR_PEER, "closed"),
    "stalled": (lib.PC_ERR_TIMEOUT, "timed out"),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("attack", list(FIRST_HDR))
def test_hostile_frames_are_refused_and_the_pair_recovers(attack):
    count = 5000
    rng = np.random.default_rng(11)
    inputs = [rng.standard_normal(count).astype(np.float32) for _ in range(2)]
    plans = [wh.plan("all_reduce", 2, r, count, 4096) for r in range(2)]
    # the tampered epoch
    patch, cut, hold = FIRST_HDR[attack]
    relay = wh.Relay(patch, cut, hold).start()
    f0, f1 = relay.fds()
    comms = [wh.make_comm(0, 2, [-1, f0]), wh.make_comm(1, 2, [f1, -1])]
    bufs = [(x.copy(),) * 2 for x in inputs]  # in place: in and out are one array
    t0 = time.monotonic()
    res = wh.run_pair(comms, plans, bufs, timeout=(1.0, 10.0))  # rank 0's deadline comes first
    elapsed = time.monotonic() - t0
    relay.close()
    status, failed, err = res[0]
    want_status, want_text = EXPECT[attack]
    assert status == want_status, (attack, status, err)
    assert want_text in err, err
    if status != lib.PC_ERR_TIMEOUT:
        assert failed == 1 and "rank 1" in err
        assert elapsed < 1.0, "refused at once, not at the deadline"
    assert res[1][0] in (lib.PC_ERR_PEER, lib.PC_ERR_IO, lib.PC_ERR_TIMEOUT), res[1]
    for r in range(2):  # nothing hostile reached the caller's buffers
        assert bufs[r][0].tobytes() == inputs[r].tobytes()
    # the next epoch: fresh connections, same plans, bit-exact result
    a, b = socket.socketpair()
    comms = [wh.make_comm(0, 2, [-1, a.detach()]), wh.make_comm(1, 2, [b.detach(), -1])]
    bufs = [(x.copy(),) * 2 for x in inputs]
    res = wh.run_pair(comms, plans, bufs, timeout=10)
    assert [r[0] for r in res] == [lib.PC_OK, lib.PC_OK], res
    want = (inputs[0] + inputs[1]).tobytes()  # two ranks: one addition, order-free
    assert bufs[0][0].tobytes() == want and bufs[1][0].tobytes() == want


# ---- the coordinator ------------------------------------------------------------------
def _client(port, secret, name=None):
    c = CoordinatorClient("127.0.0.1", port, name=name, secret=secret, heartbeat_timeout=5.0)
    return c


def _join(c, port_hint):
    c.request({"t": "join", "proto": PROTOCOL, "addr": ["127.0.0.1", port_hint]}, timeout=5)
    c.start_heartbeats()


def _sync_all(clients, rebuild=True):
    import concurrent.futures as cf
    with cf.ThreadPoolExecutor(len(clients)) as ex:
        return list(ex.map(lambda c: c.request({"t": "sync", "epoch": 0, "rebuild": rebuild}, timeout=10), clients))


@pytest.fixture
def small_group():
    """An in-process coordinator with two members that formed epoch 1."""
    def make(secret):
        coord = Coordinator("127.0.0.1", 0, secret=secret, min_world_size=2, heartbeat_timeout=3.0).start()
        clients = [_client(coord.port, secret) for _ in range(2)]
        aborts = []
        for i, c in enumerate(clients):
            c.on_abort = aborts.append
            _join(c, 1001 + i)
        _sync_all(clients)
        assert coord.epoch == 1
        made.append((coord, clients))
        return coord, clients, aborts
    made = []
    yield make
    for coord, clients in made:
        for c in clients:
            c.close()
        coord.stop()


def _dealer(port):
    d = zmq.Context.instance().socket(zmq.DEALER)
    d.setsockopt(zmq.LINGER, 0)
    d.connect(f"tcp://127.0.0.1:{port}")
    return d


def _wait(cond, limit=5.0):
    deadline = time.monotonic() + limit
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.01)
    return cond()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("secret", [SECRET, None])
def test_nobody_can_speak_for_a_member(small_group, caplog, secret):
    """Identity spoofing: requests naming a member but without its join
    credential are refused, with or without a group secret (an insider who
    holds the secret still cannot act for another member)."""
    caplog.set_level(logging.WARNING)
    coord, clients, aborts = small_group(secret)
    victim = clients[0].name
    hb_ident = coord.members[victim].hb_ident
    d = _dealer(coord.port)
    sealer = auth.Sealer(auth.derive(secret, "to-coordinator"))
    for msg in ({"t": "leave"}, {"t": "fail", "epoch": 1, "why": "spoofed"}, {"t": "sync", "epoch": 1, "rebuild": True},
                {"t": "hb"}, {"t": "leave", "cred": "0" * 32}):
        d.send(sealer.seal(pack(dict(msg, name=victim, rid=1))))
    d.send(sealer.seal(pack({"t": "join", "proto": PROTOCOL, "name": victim, "addr": ["127.0.0.1", 9], "rid": 2})))
    assert _wait(lambda: "without its credential" in _messages(caplog))
    time.sleep(0.3)
    assert coord.members[victim].alive and coord.epoch == 1 and not aborts
    assert coord.members[victim].hb_ident == hb_ident and coord.members[victim].sync_rid is None
    # the group still works: a sync point answers "unchanged" to both
    replies = _sync_all(clients, rebuild=False)
    assert all(r.get("unchanged") for r in replies)
    d.close()


@pytest.mark.timeout(60)
def test_replayed_and_forged_messages_are_refused(small_group, caplog):
    caplog.set_level(logging.WARNING)
    coord, clients, aborts = small_group(SECRET)
    a = clients[0]
    sent = []
    real_send = a._req.send
    a._req.send = lambda data, *args: (sent.append(bytes(data)), real_send(data, *args))[1]
    a.request({"t": "fail", "epoch": 0, "why": "old epoch: no effect"}, timeout=5)  # recorded
    d = _dealer(coord.port)
    d.send(sent[-1])                                   # replay, verbatim
    forged = bytearray(sent[-1])
    forged[-3] ^= 1
    d.send(bytes(forged))                              # payload changed after signing
    stale = auth.Sealer(auth.derive(SECRET, "to-coordinator"))
    d.send(stale.seal(pack({"t": "leave", "name": a.name, "cred": a.cred, "rid": 9}), now=time.time() - 3600))                                        # signed an hour ago
    d.send(b"x" * 10)                                  # too short to be signed
    assert _wait(lambda: all(w in _messages(caplog) for w in ("replayed message", "bad signature",
                                                                 "outside the replay window", "too short")))
    assert coord.members[a.name].alive and coord.epoch == 1 and not aborts
    assert all(r.get("unchanged") for r in _sync_all(clients, rebuild=False))
    d.close()


def test_opener_rules():
    key = auth.derive(SECRET, "x")
    s, o = auth.Sealer(key), auth.Opener(key, window=60)
    m1, m2 = s.seal(b"one"), s.seal(b"two")
    assert o.open(m2) == b"two"
    with pytest.raises(auth.AuthError, match="replayed"):
        o.open(m1)  # an older counter after a newer one
    with pytest.raises(auth.AuthError, match="replayed"):
        o.open(m2)
    with pytest.raises(auth.AuthError, match="bad signature"):
        auth.Opener(auth.derive(b"other", "x")).open(s.seal(b"three"))
    with pytest.raises(auth.AuthError, match="bad magic"):
        o.open(b"XXXX" + s.seal(b"four")[4:])
    nan = bytearray(s.seal(b"five"))
    nan[20:28] = struct.pack("<d", float("nan"))
    with pytest.raises(auth.AuthError):
        o.open(bytes(nan))
    # many senders: the table stays bounded
    small = auth.Opener(key, window=60, max_sessions=50)
    for _ in range(500):
        small.open(auth.Sealer(key).seal(b"hi"))
    assert len(small._last) <= 50


@pytest.mark.timeout(60)
def test_coordinator_limits():
    coord = Coordinator("127.0.0.1", 0, limits=Limits(max_peers=2, max_message_bytes=4096)).start()
    clients = []
    try:
        for i in range(2):
            clients.append(_client(coord.port, None))
            _join(clients[-1], 2000 + i)
        extra = _client(coord.port, None)
        clients.append(extra)
        with pytest.raises(pycoll.CoordinatorError, match="group is full"):
            _join(extra, 2003)
        d = _dealer(coord.port)
        d.send(b"\0" * 100_000)  # over max_message_bytes: libzmq drops the connection
        d.close()
        st = clients[0].request({"t": "status"}, timeout=5)
        assert len(st["alive"]) == 2
    finally:
        for c in clients:
            c.close()
        coord.stop()


def test_limits_from_environment(monkeypatch):
    monkeypatch.setenv("PYCOLL_MAX_PEERS", "7")
    monkeypatch.setenv("PYCOLL_HANDSHAKE_TIMEOUT", "0.25")
    lim = Limits.from_env(max_pending=3)
    assert (lim.max_peers, lim.handshake_timeout, lim.max_pending) == (7, 0.25, 3)
    assert lim.max_message_bytes == 1 << 20 and lim.connect_timeout == 30.0
    monkeypatch.setenv("PYCOLL_MAX_PEERS", "lots")
    with pytest.raises(pycoll.InvalidArgument, match="PYCOLL_MAX_PEERS"):
        Limits.from_env()
    with pytest.raises(pycoll.InvalidArgument, match="positive"):
        Limits(max_peers=0)


def test_secret_sources(monkeypatch, tmp_path):
    assert auth.load_secret() is None
    assert auth.load_secret("abc") == b"abc"
    monkeypatch.setenv("PYCOLL_SECRET", "from-env")
    assert auth.load_secret() == b"from-env"
    assert auth.load_secret(b"arg wins") == b"arg wins"
    monkeypatch.delenv("PYCOLL_SECRET")
    f = tmp_path / "secret"
    f.write_text("from-file\n")
    monkeypatch.setenv("PYCOLL_SECRET_FILE", str(f))
    assert auth.load_secret() == b"from-file"
    assert auth.derive(b"a", "mesh") != auth.derive(b"a", "to-coordinator") != auth.derive(b"b", "mesh")


def test_loud_warning_when_exposed_without_a_secret(caplog):
    caplog.set_level(logging.WARNING)
    assert auth.warn_if_exposed("0.0.0.0", None, "x")
    assert "SECURITY" in _messages(caplog) and "PYCOLL_SECRET" in _messages(caplog)
    assert not auth.warn_if_exposed("0.0.0.0", b"s", "x")
    assert not auth.warn_if_exposed("127.0.0.1", None, "x")
    assert not auth.warn_if_exposed("localhost", None, "x")
    caplog.clear()
    # the coordinator warns before it binds (192.0.2.1 is a documentation
    # address: the bind fails, no packet is sent)
    with pytest.raises(zmq.ZMQError):
        Coordinator("192.0.2.1", 29999)
    assert "coordinator listens on 192.0.2.1 without a shared secret" in _messages(caplog)


# ---- a real group under attack ----------------------------------------------------------
def _steady(comm, stop_path):
    ok = bad = 0
    epochs = set()
    for i in range(2000):
        x = np.arange(4096, dtype=np.int64) * (comm.rank + 1) + i
        comm.all_reduce(x)
        want = np.arange(4096, dtype=np.int64) * sum(r + 1 for r in range(comm.world_size)) + i * comm.world_size
        ok += bool(np.array_equal(x, want))
        bad += not np.array_equal(x, want)
        epochs.add(comm.epoch)
        # stop together: ranks that saw the file at different iterations would
        # call different collectives next (a mismatch, not what this test is about)
        stop = np.array([os.path.exists(stop_path) and i > 5], np.int64)
        comm.all_reduce(stop, op="max")
        if stop[0]:
            break
        time.sleep(0.005)
    y = np.linspace(-1, 1, 10007, dtype=np.float64) * (comm.rank + 1)
    comm.all_reduce(y)
    return ok, bad, sorted(epochs), comm.world_size, y.tobytes()


@pytest.mark.timeout(120)
def test_group_with_a_secret_shrugs_off_outsiders(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    n = 3
    port = pycoll.testing.free_port()
    coord = Coordinator("127.0.0.1", port, world_size=n, secret=SECRET).start()  # rank 0 uses it
    stop_path = str(tmp_path / "stop")
    results = {}
    runner = threading.Thread(target=lambda: results.setdefault("r", pycoll.testing.run(
        _steady, n, args=(stop_path,), port=port, timeout=100, init_kwargs={"token": SECRET, "timeout": 30})))
    runner.start()
    try:
        assert _wait(lambda: coord.epoch == 1, 60), "the group did not form"
        members = list(coord.epoch_members)
        # 1. peers without the secret, or with a wrong one, cannot join
        for token in (None, b"guess"):
            t0 = time.monotonic()
            with pytest.raises(pycoll.CoordinatorError, match="PYCOLL_SECRET"):
                pycoll.init(rank=1, world_size=n, master_port=port, join_timeout=20, token=token)
            assert time.monotonic() - t0 < 10, "refused at once, not by timeout"
        # 2. unsigned requests for real members
        d = _dealer(port)
        for m in members:
            for kind in ("leave", "fail", "sync"):
                d.send(pack({"t": kind, "name": m, "epoch": 1, "rid": 1}))
        # 3. garbage, msgpack bombs and a slow ZMTP greeting straight at the port
        for blob in (os.urandom(64), msgpack.packb([[[[1] * 50] * 50] * 20]), b"\xff" * 4096):
            d.send(blob)
        raw = socket.create_connection(("127.0.0.1", port))
        raw.sendall(os.urandom(300))
        slow = socket.create_connection(("127.0.0.1", port))
        for byte in b"\xff\x00\x00\x00\x00\x00\x00\x00\x01\x7f":
            slow.send(bytes([byte]))
            time.sleep(0.1)
        # 4. strangers at every peer's data port
        strangers = []
        for m in members:
            s = socket.create_connection(tuple(coord.members[m].addr))
            s.sendall(os.urandom(128))
            strangers.append(s)
        assert _wait(lambda: "bad signature" in _messages(caplog))
        time.sleep(0.5)
        open(stop_path, "w").close()
        runner.join(100)
        raw.close()
        slow.close()
        for s in strangers:
            s.close()
        d.close()
    finally:
        open(stop_path, "w").close()
        runner.join(100)
        coord.stop()
    results = results["r"]
    ref = sum(np.linspace(-1, 1, 10007, dtype=np.float64) * (r + 1) for r in range(n))
    finals = {r[4] for r in results}
    for ok, bad, epochs, ws, final in results:
        assert ok > 5 and bad == 0, (ok, bad)
        assert epochs == [1], f"an outsider caused an abort or a rebuild: epochs {epochs}\n{_messages(caplog)}"
        assert ws == n
    assert len(finals) == 1  # bit-identical on every rank
    assert np.allclose(np.frombuffer(finals.pop(), np.float64), ref)
    log = _messages(caplog)
    assert "coordinator refused a message" in log and "wrong or missing PYCOLL_SECRET" in log


def test_join_floods_leave_nothing_behind():
    """Joins that never heartbeat (or leave) are forgotten: memory stays bounded."""
    coord = Coordinator("127.0.0.1", 0, heartbeat_timeout=0.1, limits=Limits(max_peers=50))
    try:
        sealer = auth.Sealer(auth.derive(None, "to-coordinator"))
        for i in range(200):
            coord.handle(b"flood%d" % i, sealer.seal(pack({"t": "join", "proto": PROTOCOL, "name": f"f{i}",
                                                           "addr": ["127.0.0.1", 9], "rid": 1})))
        assert len(coord.members) == 50  # max_peers: the rest were refused
        time.sleep(0.5)  # 4 x heartbeat_timeout: members that never heartbeat expire
        coord._check_liveness()
        assert not coord.members and not coord.by_ident
        for i in range(50):  # room again
            coord.handle(b"again%d" % i, sealer.seal(pack({"t": "join", "proto": PROTOCOL, "name": f"g{i}",
                                                           "addr": ["127.0.0.1", 9], "rid": 1})))
        assert len(coord.members) == 50
    finally:
        coord._sock.disable_monitor()
        coord._monitor.close(0)
        coord._sock.close(0)


@pytest.mark.parametrize("msg,why", [
    ({"t": "join", "proto": PROTOCOL, "name": "a\nWARNING forged log line", "addr": ["h", 1]}, "printable"),
    ({"t": "join", "proto": PROTOCOL, "name": "a", "addr": "h:1"}, "host, port"),
    ({"t": "join", "proto": PROTOCOL, "name": "a", "addr": ["h", 70000]}, "host, port"),
    ({"t": "join", "proto": PROTOCOL, "name": "a"}, "needs a 'addr'"),
    ({"t": "join", "proto": PROTOCOL, "name": "a", "addr": ["h", 1], "rank": True}, "'rank'"),
    ({"t": "join", "proto": PROTOCOL, "name": "a", "addr": ["h", 1], "world_size": 10**6}, "'world_size'"),
    ({"t": "sync", "name": "x" * 129}, "'name'"),
    ({"name": "a"}, "'t'"),
    ([1, 2], "must be a map"),
])
def test_request_shape_checks(msg, why):
    from pycoll.control import schema
    with pytest.raises(ValueError, match=why):
        schema.check_request(msg, schema.fields(1024))


@pytest.mark.parametrize("coll", ["all_gather", "reduce_scatter"])
def test_refused_frames_never_reach_caller_memory(coll):
    """A frame with a bad header is refused before any of its payload lands
    in the caller's buffers (even without preserve_input)."""
    count, segment = 300, 256
    p = wh.plan(coll, 2, 0, count, segment)
    stream = bytearray(wh.valid_stream(coll, count, segment))
    stream[0] ^= 0xFF  # first header: bad magic; its payload follows untouched
    a, b = socket.socketpair()
    b.sendall(bytes(stream))
    b.shutdown(socket.SHUT_WR)
    comm = wh.make_comm(0, 2, [-1, a.detach()])
    inb, outb = wh.buffers(coll, p, count, 0)
    before_in, before_out = inb.tobytes(), outb.tobytes()
    st, failed, err = wh.run(comm, p, inb, outb)
    b.close()
    assert st == lib.PC_ERR_PROTO and "bad magic" in err
    first = next(op for op in p.ops() if op["kind"] in (lib.PC_OP_RECV, lib.PC_OP_RECV_REDUCE))
    buf = {0: (inb, before_in), 1: (outb, before_out)}.get(first["dst_buf"])
    if buf is not None:
        got, was = buf
        lo, hi = first["dst_off"], first["dst_off"] + first["len"]
        assert got.tobytes()[lo:hi] == was[lo:hi], "payload of a refused frame landed in caller memory"


@pytest.mark.timeout(30)
def test_coordinator_closes_a_slowloris_greeting():
    """A connection that never finishes its ZMTP greeting is closed after
    handshake_timeout; real clients are served meanwhile."""
    coord = Coordinator("127.0.0.1", 0, limits=Limits(handshake_timeout=0.5)).start()
    client = _client(coord.port, None)
    try:
        slow = socket.create_connection(("127.0.0.1", coord.port), timeout=5)
        slow.sendall(b"\xff")  # the first byte of a greeting, then nothing
        t0 = time.monotonic()
        assert client.request({"t": "status"}, timeout=5)["ok"]
        closed = False
        while time.monotonic() - t0 < 5:
            try:
                if not slow.recv(64):  # the coordinator's own greeting first, then EOF
                    closed = True
                    break
            except ConnectionResetError:
                closed = True
                break
        assert closed and time.monotonic() - t0 < 3, "slow greeting not dropped"
        slow.close()
    finally:
        client.close()
        coord.stop()


# ---- a closed stranger connection and fd reuse ------------------------------------------------
def _member_reusing_a_fd(port, go, out):
    """Joins, starts its heartbeats at the moment ``go`` sends (monotonic time, the same clock in
    every process of a host), reports after a while whether the coordinator dropped it, then
    waits to be killed."""
    c = CoordinatorClient("127.0.0.1", port, name="reuser", heartbeat_timeout=5.0)
    c.request({"t": "join", "proto": PROTOCOL, "addr": ["127.0.0.1", 1001]}, timeout=10)
    start_at = go.recv()
    time.sleep(max(0.0, start_at - time.monotonic()))
    c.start_heartbeats()
    time.sleep(2.0)
    out.send(c.evicted)
    time.sleep(60)


def _accepted_fd(local_port, peer_port):
    """This process's fd of the accepted TCP connection local_port <- peer_port (or None)."""
    inodes = set()
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            cols = line.split()
            if int(cols[1].split(":")[1], 16) == local_port and int(cols[2].split(":")[1], 16) == peer_port:
                inodes.add(cols[9])
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if link[8:-1] in inodes and link.startswith("socket:["):
            return int(fd)
    return None


@pytest.mark.timeout(90)
def test_a_closed_stranger_connection_does_not_evict_the_member_that_reuses_its_fd():
    """The coordinator learns of a dropped connection from an event that names only its file
    descriptor. A stranger (here: a port probe, as rank 0's `pycoll.init` makes) connects and
    closes; the kernel hands its fd to the next connection, a member's heartbeats; if the
    coordinator's thread was busy meanwhile (its process importing torch, say), it reads that
    heartbeat before the stale event. It must not evict the member (it did: a group then never
    formed, and every rank waited in init), and a member that really dies must still be noticed
    at once, long before the heartbeat timeout."""
    ctx = mp.get_context("spawn")
    coord = Coordinator("127.0.0.1", 0, heartbeat_timeout=5.0).start()
    out_r, out_w = ctx.Pipe(duplex=False)
    go_r, go_w = ctx.Pipe(duplex=False)
    member = ctx.Process(target=_member_reusing_a_fd, args=(coord.port, go_r, out_w), daemon=True)
    dummies = []
    try:
        member.start()
        assert _wait(lambda: "reuser" in coord.members, 20), "the member did not join"
        # every free fd below the highest open one taken, so the stranger's is the next one freed
        top = max(int(x) for x in os.listdir("/proc/self/fd"))
        while True:
            fd = os.open(os.devnull, os.O_RDONLY)
            if fd > top:
                os.close(fd)
                break
            dummies.append(fd)
        low = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        stranger = socket.socket(fileno=fcntl.fcntl(low.fileno(), fcntl.F_DUPFD, 4000))  # its own end: high
        low.close()
        stranger.connect(("127.0.0.1", coord.port))
        time.sleep(0.3)  # accepted by now; looking earlier would take an fd (a file) the accept wants
        assert _wait(lambda: _accepted_fd(coord.port, stranger.getsockname()[1]) is not None)
        stale = _accepted_fd(coord.port, stranger.getsockname()[1])
        start_at = time.monotonic() + 0.5
        go_w.send(start_at)
        time.sleep(0.2)
        # Keep the coordinator's thread off the GIL (zmq's I/O thread does not need it) while the
        # stranger's connection closes and the member's heartbeat connection takes its fd.
        switch = sys.getswitchinterval()
        sys.setswitchinterval(30.0)
        try:
            stranger.close()
            end = start_at + 1.0
            while time.monotonic() < end:
                pass
        finally:
            sys.setswitchinterval(switch)
        assert out_r.poll(15)
        assert out_r.recv() is None, "the coordinator evicted a live member"
        assert coord.members["reuser"].alive
        assert stale in coord._hb_fds, "the heartbeats did not reuse the stranger's fd (the scene did not happen)"
        # a real death is still seen through its connection, not only after the 5 s heartbeat timeout
        t0 = time.monotonic()
        os.kill(member.pid, signal.SIGKILL)
        assert _wait(lambda: "reuser" in coord.removed, 3.0)  # a joiner never admitted is forgotten at once
        assert time.monotonic() - t0 < 2.0
        assert "dropped" in coord.removed["reuser"], coord.removed["reuser"]
    finally:
        for fd in dummies:
            os.close(fd)
        if member.is_alive():
            member.kill()
        member.join(5)
        coord.stop()
