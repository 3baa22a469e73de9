"""Which decision of a lost coordinator a member that missed it takes from the successor
(pycoll.comm.failover.completes / told_decision): the ones that end the operation the same way
on every member, never a state sync that still moves bytes over the old epoch's links; and who
is elected successor (pycoll.comm.failover.elect), with the probes of the members' listeners
replaced by fixed answers."""
from pycoll.comm import failover
from pycoll.comm.failover import completes, elect, told_decision


def test_final_decisions_complete_the_operation_everywhere():
    assert completes("collective", {"decision": "commit", "members": ["a", "b"]})
    assert completes("collective", {"decision": "parity", "differ": [1]})
    assert completes("parity", {"decision": "report", "ok": True})
    assert completes("state", {"decision": "state", "transfer": False, "fetch": [], "serve": []})


def test_aborts_transfers_and_mismatched_kinds_do_not():
    assert not completes("collective", {"decision": "abort", "retry": True})
    assert not completes("state", {"decision": "state", "transfer": True, "fetch": [[0, [[1, 0, 8]]]]})
    assert not completes("state", {"decision": "commit"})  # a reply of another kind of round
    assert not completes("collective", None)
    assert not completes("other", {"decision": "commit"})


def test_a_member_tells_only_its_epochs_final_decision():
    reply = {"decision": "state", "transfer": False}
    assert told_decision((4, 15, "state", reply), 4) == {"seq": 15, "kind": "state", "reply": reply}
    assert told_decision((3, 15, "state", reply), 4) is None  # an earlier epoch's: every member left it
    assert told_decision((4, 16, "state", dict(reply, transfer=True)), 4) is None
    assert told_decision(None, 4) is None


def _probes(monkeypatch, answers):
    """Probe answers by address: {(host, port): "alive"/"dead"/"unknown"}."""
    monkeypatch.setattr(failover, "probe_addrs", lambda addrs, timeout: [answers[tuple(a)] for a in addrs])


MEMBERS = ["a", "b", "c", "d"]
ADDRS = [("127.0.0.1", 1000 + i) for i in range(4)]
STANDBY = [2000, 2001, 2002, 2003]


def test_the_lowest_live_rank_with_a_kept_port_succeeds(monkeypatch):
    _probes(monkeypatch, {ADDRS[0]: "dead", ADDRS[1]: "unknown", ADDRS[2]: "alive", ADDRS[3]: "alive"})
    assert elect(MEMBERS, ADDRS, STANDBY, 3) == (2, ["a"], ["b"])


def test_the_member_that_hosted_the_lost_coordinator_is_dead_even_if_its_listener_still_answers(monkeypatch):
    # a dying process closes its sockets one by one: its data listener may accept a probe just
    # after the coordinator it hosted (on its kept port) stopped answering
    _probes(monkeypatch, {a: "alive" for a in ADDRS})
    assert elect(MEMBERS, ADDRS, STANDBY, 2)[0] == 0
    assert elect(MEMBERS, ADDRS, STANDBY, 2, lost="127.0.0.1:2000") == (1, ["a"], [])
    assert elect(MEMBERS, ADDRS, STANDBY, 2, lost="127.0.0.1:29500")[0] == 0  # a standalone master was lost


def test_the_member_that_hosted_it_is_dead_also_when_we_knew_the_coordinator_by_another_address(monkeypatch):
    # a joiner knows only the group's first address, where the successor serves too
    _probes(monkeypatch, {a: "alive" for a in ADDRS})
    assert elect(MEMBERS, ADDRS, STANDBY, 3, lost="127.0.0.1:29500", host="b") == (0, ["b"], [])
    _probes(monkeypatch, {ADDRS[0]: "dead", ADDRS[1]: "alive", ADDRS[2]: "alive", ADDRS[3]: "alive"})
    assert elect(MEMBERS, ADDRS, STANDBY, 1, host="b") == (1, ["a"], [])  # ourselves: never counted dead


def test_a_member_the_live_coordinator_removed_never_succeeds_it():
    """Seed 329: a removed member that later saw the coordinator go (the group had finished)
    re-formed its old epoch alone. A stranger's "unknown" (a successor that never knew us) is not
    a removal: that member may still take part in a failover."""
    from types import SimpleNamespace
    from pycoll.comm.epoch import Epoch

    def epoch(evicted, stranger):
        client = SimpleNamespace(evicted=evicted, stranger=stranger, coordinator_lost=lambda: True)
        e = SimpleNamespace(options=SimpleNamespace(failover=True), standby=object(), _join_msg={}, members=["a"],
                            _cut_off=False, client=client)
        e.removed = lambda: Epoch.removed(e)
        return e

    assert Epoch.can_fail_over(epoch(None, False))
    assert Epoch.can_fail_over(epoch("unknown to the coordinator", True))
    assert not Epoch.can_fail_over(epoch("its connection to the coordinator dropped", False))


def test_a_sync_reply_from_the_successor_our_request_went_to_is_installed():
    """Seeds 406 and 434: the heartbeat thread's failover moved the client to the successor while
    the caller's sync waited for the client's request lock; the request then went to the
    successor, and its reply (the new epoch) was taken for the lost coordinator's, because the
    generation had been read before the request went out. That member synced again while the
    others built the epoch's mesh with it: 30 s to the mesh timeout."""
    from types import SimpleNamespace
    from pycoll.comm.epoch import Epoch

    class Client:
        needs_rejoin = False
        generation = 7
        requests = 0

        def request(self, msg, timeout):
            self.requests += 1
            self.generation += 1  # the failover's retarget, done while we waited for the lock
            msg = msg() if callable(msg) else msg
            assert msg["t"] == "sync"
            return {"ok": True, "epoch": 12, "unchanged": False, "rank": 0, "members": []}

    installed = []
    e = SimpleNamespace(options=SimpleNamespace(sync_timeout=1.0, coordinator_wait=0.0), client=Client(), number=10,
                        rank=0, ccomm=None, _installing=None, _install=installed.append)
    assert Epoch.sync(e, rebuild=True) is True
    assert e.client.requests == 1 and [r["epoch"] for r in installed] == [12]
