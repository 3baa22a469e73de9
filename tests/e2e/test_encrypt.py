"""PYCOLL_ENCRYPT=1: the coordinator channel under ZeroMQ CURVE, the data plane's TCP
connections under TLS 1.3 (csrc/transport/transport_tls.c), keys from the group secret.

A group forms and computes bit-identical results with it on; a client without the key (no
encryption, or another secret) is refused: its requests go unanswered; a data-plane peer
without the key fails the TLS handshake with a clear error; and the bytes on the wire are not
the plaintext messages (coordinator greeting; data frames captured through a relay)."""
import select
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import pycoll.testing
from pycoll.control.client import CoordinatorClient
from pycoll.control.coordinator import Coordinator
from pycoll.core import engine
from pycoll.core.dtypes import DTYPES, OPS as OP_CODES
from pycoll.core.native import ffi, lib
from pycoll.errors import CollectiveTimeout, CoordinatorError, InvalidArgument, ProtocolError
from pycoll.net.mesh import MeshLinks
from pycoll.plan import planners

zmq = pytest.importorskip("zmq")
pytestmark = pytest.mark.skipif(not zmq.has("curve"), reason="this libzmq has no CURVE")


def _sum(comm):
    x = (np.arange(50000, dtype=np.float32) * 0.37) * (comm.rank + 1)
    # one algorithm for both runs: auto may choose ring or innetwork here (close costs), and
    # two reduction orders round differently; the claim is that encryption changes no bit
    comm.all_reduce(x, algorithm="ring")
    return x


@pytest.mark.timeout(120)
def test_group_works_encrypted_and_results_are_bit_identical():
    outs = pycoll.testing.run(_sum, 3, timeout=90, env={"PYCOLL_ENCRYPT": "1", "PYCOLL_SECRET": "s3cret"})
    base = np.arange(50000, dtype=np.float32) * np.float32(0.37)
    plain = pycoll.testing.run(_sum, 3, timeout=90, env={"PYCOLL_SECRET": "s3cret"})
    for o, p in zip(outs, plain):
        assert np.array_equal(o, p) and np.array_equal(o, outs[0])
    assert np.allclose(outs[0], base * 6, rtol=1e-6)


@pytest.fixture
def encrypted_coordinator(monkeypatch):
    monkeypatch.setenv("PYCOLL_ENCRYPT", "1")
    coord = Coordinator("127.0.0.1", 0, world_size=1, secret=b"right").start()
    yield coord
    coord.stop()


def _status(port, secret, encrypt, monkeypatch):
    monkeypatch.setenv("PYCOLL_ENCRYPT", "1" if encrypt else "0")
    c = CoordinatorClient("127.0.0.1", port, secret=secret, heartbeat_timeout=2.0)
    try:
        return c.request({"t": "status"}, timeout=2.0)
    finally:
        c.close()


@pytest.mark.timeout(60)
def test_a_peer_without_the_key_is_refused(encrypted_coordinator, monkeypatch):
    port = encrypted_coordinator.port
    assert encrypted_coordinator.encrypted
    assert "epoch" in _status(port, b"right", True, monkeypatch)  # the key holder is answered
    for secret, encrypt in ((b"wrong", True), (b"right", False)):
        with pytest.raises(CoordinatorError):
            _status(port, secret, encrypt, monkeypatch)


@pytest.mark.timeout(30)
def test_encryption_needs_a_secret(monkeypatch):
    monkeypatch.setenv("PYCOLL_ENCRYPT", "1")
    monkeypatch.delenv("PYCOLL_SECRET", raising=False)
    with pytest.raises(InvalidArgument, match="secret"):
        Coordinator("127.0.0.1", 0, world_size=1, secret=None)


@pytest.mark.timeout(30)
def test_the_wire_is_not_plaintext(monkeypatch):
    """A raw TCP listener posing as the coordinator: an encrypted client's first bytes name the
    CURVE mechanism, not NULL (ZMTP greeting), and nothing after it is msgpack in the clear."""
    monkeypatch.setenv("PYCOLL_ENCRYPT", "1")
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(5)
    c = CoordinatorClient("127.0.0.1", srv.getsockname()[1], secret=b"right", heartbeat_timeout=2.0)
    try:
        conn, _ = srv.accept()
        conn.settimeout(2)
        # answer with our own greeting start so the client sends its full one
        conn.sendall(b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03")
        data = b""
        try:
            while len(data) < 64:
                part = conn.recv(64)
                if not part:
                    break
                data += part
        except socket.timeout:
            pass
        assert b"CURVE" in data and b"NULL" not in data
        conn.close()
    finally:
        c.close()
        srv.close()


# ---- the data plane: TLS 1.3 over TCP ----------------------------------------------------------
ENV_TLS = {"PYCOLL_ENCRYPT": "1", "PYCOLL_SECRET": "s3cret", "PYCOLL_TRANSPORT": "tcp"}
ENV_TCP = {"PYCOLL_SECRET": "s3cret", "PYCOLL_TRANSPORT": "tcp"}


def _collectives(comm):
    n, r = comm.world_size, comm.rank
    x = (np.arange(300001, dtype=np.float32) * np.float32(0.37) + r).astype(np.float32)
    comm.all_reduce(x)
    parts = np.zeros(70001 * n, dtype=np.float64)
    comm.all_gather(np.full(70001, r * 1.5 + 0.25, dtype=np.float64), parts)
    b = np.arange(90001, dtype=np.int32) * 7 if r == n - 1 else np.zeros(90001, dtype=np.int32)
    comm.broadcast(b, root=n - 1)
    return x, parts, b


@pytest.mark.timeout(180)
def test_data_plane_over_tls_is_bit_identical_to_tcp():
    """all_reduce, all_gather, broadcast over TCP forced, with and without TLS: the same bits
    (and 2 stripes per pair with a socket buffer size set: those options still apply)."""
    enc = pycoll.testing.run(_collectives, 3, timeout=120, env=ENV_TLS,
                             init_kwargs={"stripes": 2, "sockbuf": 262144})
    plain = pycoll.testing.run(_collectives, 3, timeout=120, env=ENV_TCP)
    for e, p in zip(enc, plain):
        for a, b in zip(e, p):
            assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
    want = sum((np.arange(300001, dtype=np.float32) * np.float32(0.37) + r).astype(np.float32) for r in range(3))
    assert np.allclose(enc[0][0], want, rtol=1e-5)
    assert np.array_equal(enc[1][1], np.concatenate([np.full(70001, r * 1.5 + 0.25) for r in range(3)]))
    assert np.array_equal(enc[0][2], np.arange(90001, dtype=np.int32) * 7)


def _tcp_pair():
    with socket.create_server(("127.0.0.1", 0)) as srv:
        a = socket.create_connection(srv.getsockname())
        b, _ = srv.accept()
    return a, b


class Relay:
    """rank 0 <-> relay <-> rank 1 over loopback TCP; keeps every byte it forwards."""

    def __init__(self):
        self.ends = []  # the ranks' sockets
        self.inner = []  # the relay's
        for _ in range(2):
            a, b = _tcp_pair()
            self.ends.append(a)
            self.inner.append(b)
        self.seen = bytearray()
        self.stop = False
        self.thread = threading.Thread(target=self._pump, daemon=True)
        self.thread.start()

    def _pump(self):
        peer = {self.inner[0]: self.inner[1], self.inner[1]: self.inner[0]}
        deadline = time.monotonic() + 60
        while not self.stop and time.monotonic() < deadline:
            ready, _, _ = select.select(list(peer), [], [], 0.05)
            for s in ready:
                data = s.recv(1 << 20)
                if not data:
                    return
                self.seen += data
                peer[s].sendall(data)

    def close(self):
        self.stop = True
        self.thread.join(timeout=5)
        for s in self.inner:
            s.close()


PATTERN = b"PYCOLL-PLAINTEXT-PATTERN-0123456"  # 32 bytes: finite float32 values


def _comms(kind, socks, keys, timeout=5.0):
    """A 2-rank C comm per rank over socks[r] (one connection each); returns comms or exceptions."""
    def make(r):
        fds = [-1, -1]
        fds[1 - r] = socks[r].detach()
        kinds = [lib.PC_CONN_TCP, lib.PC_CONN_TCP]
        kinds[1 - r] = kind[r] if isinstance(kind, tuple) else kind
        try:
            return engine.create(r, 2, 1, MeshLinks(kinds, fds, [-1] * 6), psk=keys[r], handshake_timeout=timeout)
        except Exception as exc:  # noqa: BLE001 - the test looks at it
            return exc
    with ThreadPoolExecutor(2) as ex:
        return list(ex.map(make, range(2)))


def _all_reduce(comms, xs):
    plans = [planners.plan_rings("all_reduce", 2, r, [[0, 1]], xs[r].size, 4) for r in range(2)]

    def one(r):
        ptrs = ffi.new("void *[2]", [ffi.cast("void *", xs[r].ctypes.data)] * 2)
        sizes = ffi.new("uint64_t[2]", [xs[r].nbytes] * 2)
        return lib.pc_comm_run(comms[r], plans[r].ptr, ptrs, sizes, DTYPES["float32"], OP_CODES["sum"], 1, 0x5eed,
                               20.0, ffi.new("int32_t *"))
    with ThreadPoolExecutor(2) as ex:
        return list(ex.map(one, range(2)))


def _through_relay(kind):
    relay = Relay()
    key = b"k" * 32
    comms = _comms(kind, relay.ends, [key, key])
    try:
        assert all(not isinstance(c, Exception) for c in comms), comms
        xs = [np.frombuffer(PATTERN * 32768, dtype=np.float32).copy() for _ in range(2)]  # 1 MiB each
        assert _all_reduce(comms, xs) == [lib.PC_OK, lib.PC_OK]
    finally:
        for c in comms:
            if not isinstance(c, Exception):
                engine.close(c)
        relay.close()
    return xs, bytes(relay.seen)


@pytest.mark.timeout(60)
def test_tls_bytes_on_the_wire_are_not_the_plaintext():
    """The same all_reduce through a relay that keeps the bytes: over TCP the inputs' pattern is
    on the wire (the check can fail), over TLS it is not, and the results are the same bits."""
    plain, wire_plain = _through_relay(lib.PC_CONN_TCP)
    enc, wire_enc = _through_relay(lib.PC_CONN_TLS)
    assert PATTERN in wire_plain
    assert PATTERN not in wire_enc and PATTERN[:12] not in wire_enc
    assert len(wire_enc) > 2 * (1 << 20)  # the payloads went through, encrypted
    want = np.frombuffer(PATTERN * 32768, dtype=np.float32) * np.float32(2)
    for p, e in zip(plain, enc):
        assert p.tobytes() == e.tobytes() == want.tobytes()


@pytest.mark.timeout(60)
def test_a_data_plane_peer_without_the_key_is_refused():
    """Another key: both ends fail the handshake at once with a ProtocolError naming the peer
    and the reason; a peer that does not encrypt at all: the TLS end gives up at its deadline."""
    t0 = time.monotonic()
    res = _comms(lib.PC_CONN_TLS, _tcp_pair(), [b"k" * 32, b"K" * 32])
    assert time.monotonic() - t0 < 5
    for r, exc in enumerate(res):
        assert isinstance(exc, ProtocolError), res
        assert f"to rank {1 - r} failed its handshake" in str(exc) and "group key" in str(exc)
        assert exc.peer == 1 - r
    t0 = time.monotonic()
    res = _comms((lib.PC_CONN_TLS, lib.PC_CONN_TCP), _tcp_pair(), [b"k" * 32, None], timeout=1.0)
    assert isinstance(res[0], CollectiveTimeout) and "no answer within 1 s" in str(res[0])
    assert time.monotonic() - t0 < 10
    engine.close(res[1])


def _receive_after_peer_closed(kind):
    """rank 1 closes its end (as a dead or aborting peer's kernel does, no close_notify); rank 0
    then waits to receive from it: (status, failed peer, message)."""
    comms = _comms(kind, _tcp_pair(), [b"k" * 32, b"k" * 32])
    assert all(not isinstance(c, Exception) for c in comms), comms
    engine.close(comms[1])
    x = np.zeros(1 << 16, np.uint8)
    plan = planners.plan_p2p(2, 0, 1, x.nbytes, False)
    ptrs = ffi.new("void *[2]", [ffi.cast("void *", x.ctypes.data)] * 2)
    sizes = ffi.new("uint64_t[2]", [x.nbytes] * 2)
    failed = ffi.new("int32_t *", -1)
    try:
        st = lib.pc_comm_run(comms[0], plan.ptr, ptrs, sizes, DTYPES["uint8"], OP_CODES["sum"], 1, 0x5eed, 10.0,
                             failed)
        return st, failed[0], ffi.string(lib.pc_comm_last_error(comms[0])).decode()
    finally:
        engine.close(comms[0])


@pytest.mark.timeout(60)
def test_a_closed_tls_peer_is_a_closed_peer_as_over_tcp():
    """OpenSSL 3 reports an end of stream without close_notify as an error; the engine must still
    see a closed peer (PC_ERR_PEER, the failure the group recovers from), as over TCP, not a
    socket error."""
    for kind in (lib.PC_CONN_TCP, lib.PC_CONN_TLS):
        st, failed, msg = _receive_after_peer_closed(kind)
        assert (st, failed) == (lib.PC_ERR_PEER, 1), (kind, st, msg)
        assert "connection to rank 1 closed" in msg


SIGPIPE_CHILD = """
import signal, sys
import numpy as np
signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # as in a C program, or a host that restored it
sys.path.insert(0, sys.argv[1])
import test_encrypt as te
from pycoll.core import engine
from pycoll.core.native import ffi, lib
from pycoll.plan import planners
comms = te._comms(lib.PC_CONN_TLS, te._tcp_pair(), [b"k" * 32, b"k" * 32])
engine.close(comms[1])
x = np.zeros(1 << 20, np.uint8)  # one frame of 1 MiB: many records, many writes
plan = planners.plan_p2p(2, 0, 1, x.nbytes, True)
ptrs = ffi.new("void *[2]", [ffi.cast("void *", x.ctypes.data)] * 2)
sizes = ffi.new("uint64_t[2]", [x.nbytes] * 2)
failed = ffi.new("int32_t *", -1)
st = lib.pc_comm_run(comms[0], plan.ptr, ptrs, sizes, te.DTYPES["uint8"], te.OP_CODES["sum"], 1, 0x5eed, 10.0,
                     failed)
print(st, failed[0], ffi.string(lib.pc_comm_last_error(comms[0])).decode(), flush=True)
"""


@pytest.mark.timeout(60)
def test_sending_to_a_closed_tls_peer_raises_no_sigpipe():
    """OpenSSL's own socket BIO writes with write(): a peer gone would kill a process that does
    not ignore SIGPIPE. Ours sends with MSG_NOSIGNAL: the send fails with a closed peer instead."""
    import os
    import subprocess
    import sys
    here = os.path.dirname(os.path.abspath(__file__))
    p = subprocess.run([sys.executable, "-c", SIGPIPE_CHILD, here], capture_output=True, text=True, timeout=50)
    assert p.returncode == 0, (p.returncode, p.stderr[-2000:])
    st, failed, msg = p.stdout.split(" ", 2)
    assert (int(st), int(failed)) == (lib.PC_ERR_PEER, 1) and "connection to rank 1 closed" in msg, p.stdout


@pytest.mark.timeout(30)
def test_a_tls_connection_needs_a_key():
    a, b = _tcp_pair()
    b.close()
    with pytest.raises(InvalidArgument):
        engine.create(0, 2, 1, MeshLinks([0, lib.PC_CONN_TLS], [-1, a.detach()], [-1] * 6), psk=None)


def _tagged(comm):
    out = []
    for tag in ("grads", "params"):
        x = np.arange(100003, dtype=np.float32) * np.float32(comm.rank + 1) + np.float32(len(tag))
        comm.all_reduce(x, tag=tag)
        out.append(x)
    return out


@pytest.mark.timeout(120)
def test_tag_channels_are_encrypted_too():
    """The tag channels' mesh is TLS as well (the same key): tagged all-reduces are exact."""
    res = pycoll.testing.run(_tagged, 3, timeout=90, env=ENV_TLS, init_kwargs={"tags": ["grads", "params"]})
    for tag, i in (("grads", 0), ("params", 1)):
        want = sum(np.arange(100003, dtype=np.float32) * np.float32(r + 1) + np.float32(len(tag)) for r in range(3))
        for r in range(3):
            assert res[r][i].tobytes() == want.astype(np.float32).tobytes()
