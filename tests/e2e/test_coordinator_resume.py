"""A successor coordinator re-forms the group from what the members remember, and refuses a
member that the group had dropped before the newest epoch anyone remembers.

Seen in a chaos run (seed 221): a member declared dead by one successor re-registered with the
next one from an older epoch; the others had completed a step without it, and the successor
formed an epoch with all of them, so its retried step paired with their next one (two different
sums for one step). It is now refused, as an evicted member is, and joins anew."""
import concurrent.futures as cf

import pytest

from pycoll.control.client import CoordinatorClient
from pycoll.control.coordinator import PROTOCOL, Coordinator
from pycoll.errors import CoordinatorError


def _resume(coord, name, port, epoch, members, dead, seen=None):
    c = CoordinatorClient("127.0.0.1", coord.port, name=name, heartbeat_timeout=5.0)
    resume = {"epoch": epoch, "members": members, "rank": members.index(name), "dead": dead}
    if seen is not None:
        resume["seen"] = seen
    c.request({"t": "join", "proto": PROTOCOL, "addr": ["127.0.0.1", port], "resume": resume}, timeout=10)
    c.start_heartbeats()
    return c


def _sync(c):
    try:
        return c.request({"t": "sync", "epoch": 0, "rebuild": True}, timeout=15)
    except CoordinatorError as exc:
        return exc


@pytest.mark.timeout(60)
def test_a_member_dropped_before_the_newest_epoch_is_refused_and_the_rest_go_on():
    coord = Coordinator("127.0.0.1", 0, min_world_size=1, heartbeat_timeout=5.0).start()
    clients = []
    try:
        # "c" left epoch 27 (x, a, b, c): it was dropped in 28; a and b went on to epoch 29 (x, a, b)
        clients.append(_resume(coord, "c", 1003, 27, ["x", "a", "b", "c"], ["x"]))
        clients.append(_resume(coord, "a", 1001, 29, ["x", "a", "b"], ["x"]))
        clients.append(_resume(coord, "b", 1002, 29, ["x", "a", "b"], ["x"]))
        with cf.ThreadPoolExecutor(3) as ex:
            c_reply, a_reply, b_reply = ex.map(_sync, clients)
        assert isinstance(c_reply, CoordinatorError) and c_reply.evicted, c_reply
        assert "dropped from the group before epoch 29" in str(c_reply)
        for reply in (a_reply, b_reply):
            assert reply["ok"] and reply["epoch"] == 30 and [m[0] for m in reply["members"]] == ["a", "b"], reply
            assert reply["joined"] == [], reply  # members of the lost coordinator's epoch did not join
    finally:
        for c in clients:
            c.close()
        coord.stop()


@pytest.mark.timeout(60)
def test_a_member_of_the_newest_epoch_that_had_not_installed_it_is_kept():
    """The coordinator died while telling epoch 29: "c" never installed it, so no call of 29 ran
    anywhere (each needs every member), and c re-forms with the others."""
    coord = Coordinator("127.0.0.1", 0, min_world_size=1, heartbeat_timeout=5.0).start()
    clients = []
    try:
        clients.append(_resume(coord, "c", 1003, 28, ["x", "a", "b", "c"], ["x"]))
        clients.append(_resume(coord, "a", 1001, 29, ["x", "a", "b", "c"], ["x"]))
        clients.append(_resume(coord, "b", 1002, 29, ["x", "a", "b", "c"], ["x"]))
        with cf.ThreadPoolExecutor(3) as ex:
            replies = list(ex.map(_sync, clients))
        for reply in replies:
            assert not isinstance(reply, Exception), reply
            assert reply["epoch"] == 30 and sorted(m[0] for m in reply["members"]) == ["a", "b", "c"], reply
            assert reply["joined"] == [], reply
    finally:
        for c in clients:
            c.close()
        coord.stop()


@pytest.mark.timeout(60)
def test_the_successor_numbers_its_epoch_past_one_the_lost_coordinator_formed_but_nobody_built():
    """The lost coordinator formed epoch 30 and died; "b" was building its mesh (installed: 29).
    The successor's epoch must not be 30 too: b aborts the 30 it was building (seed 328: it
    waited out the 30 s mesh timeout), and an epoch of the same number would be aborted with it."""
    coord = Coordinator("127.0.0.1", 0, min_world_size=1, heartbeat_timeout=5.0).start()
    clients = []
    try:
        clients.append(_resume(coord, "a", 1001, 29, ["x", "a", "b"], ["x"]))
        clients.append(_resume(coord, "b", 1002, 29, ["x", "a", "b"], ["x"], seen=30))
        with cf.ThreadPoolExecutor(2) as ex:
            replies = list(ex.map(_sync, clients))
        for reply in replies:
            assert reply["ok"] and reply["epoch"] == 31, reply
    finally:
        for c in clients:
            c.close()
        coord.stop()
