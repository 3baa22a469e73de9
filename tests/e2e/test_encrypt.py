"""PYCOLL_ENCRYPT=1: the coordinator channel under ZeroMQ CURVE, keys from the group secret.

A group forms and computes bit-identical results with it on; a client without the key (no
encryption, or another secret) is refused: its requests go unanswered; and the bytes on the
wire are not the plaintext messages."""
import socket

import numpy as np
import pytest

import pycoll.testing
from pycoll.control.client import CoordinatorClient
from pycoll.control.coordinator import Coordinator
from pycoll.errors import CoordinatorError, InvalidArgument

zmq = pytest.importorskip("zmq")
pytestmark = pytest.mark.skipif(not zmq.has("curve"), reason="this libzmq has no CURVE")


def _sum(comm):
    x = (np.arange(50000, dtype=np.float32) * 0.37) * (comm.rank + 1)
    comm.all_reduce(x)
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
