"""Which decision of a lost coordinator a member that missed it takes from the successor
(pycoll.comm.failover.completes / told_decision): the ones that end the operation the same way
on every member, never a state sync that still moves bytes over the old epoch's links."""
from pycoll.comm.failover import completes, told_decision


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
