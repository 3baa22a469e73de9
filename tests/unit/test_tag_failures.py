"""Every tag channel fails exactly one call per failed epoch, whichever thread notices first.

A re-forming thread counts the channels whose call has not failed yet as idle and makes each owe
its next call (Epoch._carry_owed); a tagged call still returning from its cancel then fails too.
That failure is the one it owed: counting both made the channel fail twice on one rank and skip
a call its peers ran (they timed out waiting for it, seen once in a full-suite run)."""
import threading

from pycoll.comm.epoch import Channel, Epoch
from pycoll.core.native import lib


class _Stub(Epoch):
    """An epoch with its bookkeeping only: no coordinator, no connections."""

    def __init__(self, tags):
        self.number, self.aborted_epoch, self.broken, self.rank = 5, 5, True, 0
        self.channels = {t: Channel(t, None) for t in tags}
        self._settled, self._owed, self._owed_lock = set(), {}, threading.Lock()
        self._tag_broken = False
        self._epoch_info = (5, {})

    def _explain(self, st, peer, coll, message, ident):
        return RuntimeError(coll)

    def report_failure(self, *args, **kwargs):
        return {}


def test_a_call_failing_after_the_others_counted_it_idle_owes_nothing_more():
    ep = _Stub(["grads", "params"])
    ep._carry_owed()  # another thread re-forms first: both channels look idle
    assert ep._owed == {"grads": 5, "params": 5}
    ep.tag_failure(lib.PC_ERR_CANCELLED, -1, "all_reduce", ep.channels["grads"])  # grads' call was in flight
    assert ep._owed == {"params": 5}  # grads failed its one call; params (idle) owes its next
    assert "grads" in ep._settled


def test_a_call_failing_before_the_re_forming_is_not_counted_idle():
    ep = _Stub(["grads", "params"])
    ep.tag_failure(lib.PC_ERR_CANCELLED, -1, "all_reduce", ep.channels["grads"])
    ep._carry_owed()
    assert ep._owed == {"params": 5}


def test_an_owed_failure_of_an_older_epoch_stays():
    ep = _Stub(["grads"])
    ep._owed["grads"] = 4  # carried from epoch 4; this call failed in epoch 5
    ep.tag_failure(lib.PC_ERR_CANCELLED, -1, "all_reduce", ep.channels["grads"])
    assert ep._owed == {"grads": 4}
