"""The standalone aggregator's epoch loop (pycoll.aggregator.Aggregator.serve) when an epoch's mesh
cannot be built, with the coordinator and the mesh replaced by scripted stand-ins: it must report
the failure and follow the next epoch, as a worker does, not die (the suite once saw a switch
exit on it: the other switch was killed while the workers were idle, the coordinator formed an
epoch that still named it, and the survivor's mesh build found its listener gone)."""
import types

from pycoll.aggregator import Aggregator
from pycoll.errors import PeerFailure


class _Client:
    """The coordinator's side: answers each request with the next scripted reply, keeps them all."""

    def __init__(self, replies):
        self.replies, self.sent, self.on_abort = list(replies), [], None

    def request(self, msg, timeout=None):
        self.sent.append(msg)
        return self.replies.pop(0)


def _aggregator(client, installs):
    listener = types.SimpleNamespace(limits=types.SimpleNamespace(connect_timeout=5.0))
    agg = Aggregator(client, listener, "rack0")
    outcomes = list(installs)

    def install(reply):
        outcome = outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome
    agg._install = install
    return agg


def test_a_mesh_that_cannot_be_built_is_reported_and_the_next_epoch_followed():
    client = _Client([{"epoch": 4, "members": [], "rank": 4},   # the epoch that still names the dead switch
                      {},                                        # the coordinator's answer to the report
                      {"epoch": 5, "members": [], "rank": 4}])  # the epoch without it
    gone = PeerFailure("rank 4: rank 5 is gone (its listener refuses connections)")
    agg = _aggregator(client, [gone, None])  # then: no workers left, so serve() returns
    agg.serve()
    kinds = [(m["t"], m.get("epoch"), m.get("rebuild")) for m in client.sent]
    assert kinds == [("sync", 0, True), ("fail", 4, None), ("sync", 0, True)], client.sent
    assert "rank 5 is gone" in client.sent[1]["why"]


def test_an_unanswered_report_still_leads_to_the_next_sync():
    from pycoll.errors import CoordinatorError

    class _Silent(_Client):
        def request(self, msg, timeout=None):
            if msg["t"] == "fail":
                self.sent.append(msg)
                raise CoordinatorError("no answer")
            return super().request(msg, timeout)
    client = _Silent([{"epoch": 4, "members": [], "rank": 4}, {"epoch": 5, "members": [], "rank": 4}])
    agg = _aggregator(client, [PeerFailure("rank 5 is gone"), None])
    agg.serve()
    assert [m["t"] for m in client.sent] == ["sync", "fail", "sync"]
