"""A member that dies between its join and its first heartbeat is found dead in a second, not after
the 4x grace a member gets for its first beat.

A chaos run (seed 316) lost a member that had re-registered with a successor coordinator a moment
before its SIGKILL: the successor waited 4 x 5 s for its first heartbeat, and the group's step took
20 s. The coordinator now probes the data listener of a member on its own host that it has not
heard from: a refusal means the process is gone.
"""
import socket
import time

import pytest

from pycoll.control.client import CoordinatorClient
from pycoll.control.coordinator import PROTOCOL, Coordinator
from pycoll.net.mesh import host_id
from pycoll.testing import free_port


def _listening():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


def _join(coord, listener, **extra):
    client = CoordinatorClient("127.0.0.1", coord.port, heartbeat_timeout=5.0)
    client.request({"t": "join", "proto": PROTOCOL, "addr": list(listener.getsockname()), **extra}, timeout=10)
    return client  # no heartbeats started: as a process killed right after its join's reply


def _watched_member(min_world_size):
    """A coordinator here and one member joined to it (heartbeats not started): (coordinator,
    the member's listener, its client, the times its on_dead callback was called)."""
    coord = Coordinator("127.0.0.1", 0, min_world_size=min_world_size, heartbeat_timeout=5.0).start()
    listener = _listening()
    client = _join(coord, listener, host_id=host_id())
    dead = []
    client.on_dead = lambda: dead.append(time.monotonic())
    return coord, listener, client, dead


def _wait_dead(coord, name, limit):
    deadline = time.monotonic() + limit
    while name not in coord.removed and time.monotonic() < deadline:  # (a never-admitted death is forgotten)
        time.sleep(0.02)
    return name in coord.removed


@pytest.mark.timeout(60)
def test_a_member_gone_before_its_first_heartbeat_is_found_dead_at_once():
    coord = Coordinator("127.0.0.1", 0, min_world_size=5, heartbeat_timeout=5.0).start()
    here = host_id()
    gone, silent, elsewhere = _listening(), _listening(), _listening()
    clients = []
    try:
        clients.append(_join(coord, gone, host_id=here))
        clients.append(_join(coord, silent, host_id=here))
        clients.append(_join(coord, elsewhere, host_id="another-host"))
        names = [c.name for c in clients]
        gone.close()        # its process died: the kernel refuses its port
        elsewhere.close()   # on another host a refusal may be a firewall: not proof
        t0 = time.monotonic()
        assert _wait_dead(coord, names[0], 5), "a member gone before its first heartbeat was waited for"
        assert time.monotonic() - t0 < 3
        assert "refuses" in coord.removed[names[0]]
        time.sleep(1.5)  # several probes later: a live but quiet member and a remote one keep their 20 s grace
        assert names[1] not in coord.removed and names[2] not in coord.removed
    finally:
        for c in clients:
            c.close()
        silent.close()
        coord.stop()


@pytest.mark.timeout(60)
def test_a_coordinator_gone_before_our_heartbeat_socket_reached_it_is_found_dead_at_once():
    """Chaos seed 465: members re-registered with a successor, which was SIGKILLed before their
    heartbeat sockets had dialed it. No connection, so none dropped: they waited out the 5 s
    heartbeat bound. A refused dial after a join is now a death (its port is probed)."""
    coord, listener, client, dead = _watched_member(min_world_size=2)
    try:
        assert client.cred
        coord.stop()  # gone before the heartbeat thread dials it
        t0 = time.monotonic()
        client.start_heartbeats()
        while not dead and time.monotonic() - t0 < 4:
            time.sleep(0.02)
        assert dead and dead[0] - t0 < 2, "a refused dial after the join was not taken for a death"
        assert client.coordinator_dead
    finally:
        client.close()
        listener.close()


@pytest.mark.timeout(60)
def test_a_coordinator_not_up_yet_is_not_declared_dead():
    """Before a join a refused dial is a coordinator still starting (a rank that came first)."""
    port = free_port()
    client = CoordinatorClient("127.0.0.1", port, heartbeat_timeout=5.0)
    dead = []
    client.on_dead = lambda: dead.append(1)
    try:
        client.start_heartbeats()
        time.sleep(1.0)
        assert not dead and not client.coordinator_dead
    finally:
        client.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("left", [False, True], ids=["member", "left"])
def test_a_coordinator_that_stops_after_we_left_is_no_news(left, caplog):
    """A member leaves (Communicator.close: Epoch.leave marks its client ``left``), the
    coordinator, having seen the last member go, stops before the member's close() ended its
    heartbeats: that loss is expected and silent (no "is gone" warning, no failover callback);
    every job's end raced into it before. A member that has not left still finds it dead."""
    coord, listener, client, dead = _watched_member(min_world_size=1)
    try:
        client.start_heartbeats()
        time.sleep(0.3)  # heartbeats answered: connected
        client.left = left
        caplog.set_level("WARNING", logger="pycoll")
        coord.stop()
        t0 = time.monotonic()
        while not dead and time.monotonic() - t0 < 2:
            time.sleep(0.02)
        gone = [r.getMessage() for r in caplog.records if "is gone" in r.getMessage()]
        if left:
            assert not dead and not gone and not client.coordinator_dead, (dead, gone)
        else:
            assert dead and gone and client.coordinator_dead
    finally:
        client.close()
        listener.close()
