"""Point-to-point transfers: the queue that turns isend/irecv calls into one plan.

torch's point-to-point semantics let every rank post its transfers in any order and then wait,
e.g. a ring exchange in which every rank first receives from its left and then sends to its
right. Run one at a time, in call order, every rank would wait in its receive. So ``isend`` and
``irecv`` only queue their transfer here; the queue runs as *one* plan
(:func:`pycoll.plan.exchange.p2p`: all transfers at once, those with the same peer and direction
in call order) when a transfer's work is waited on, or when a blocking send/recv, or any
collective, is called. A blocking ``send``/``recv`` joins the queue and runs it at once. This is
what torch's ``batch_isend_irecv`` asks for, and what a group of isend/irecv followed by waits
gets too.
"""
import threading

from pycoll.comm.work import Work
from pycoll.errors import CollectiveError


class P2PWork(Work):
    """The work of one queued transfer: ``wait()`` first runs the queue it is in."""

    def __init__(self, description, queue, source=-1):
        super().__init__(description)
        self._queue = queue
        #: the rank a receive got its data from (known once done for a receive from any source)
        self.source = source

    def wait(self, timeout=None):
        self._queue.flush()
        return super().wait(timeout)


class Transfer:
    """One queued transfer: direction, the buffer (pycoll.core.buffers.Buffer), the peer's rank,
    the 32-bit tag, the result to hand back and its work."""

    __slots__ = ("is_send", "buf", "peer", "tag", "result", "timeout", "work")

    def __init__(self, is_send, buf, peer, tag, result, timeout, work):
        self.is_send, self.buf, self.peer, self.tag = is_send, buf, peer, tag
        self.result, self.timeout, self.work = result, timeout, work


class P2PQueue:
    """The transfers queued and not run yet; ``run(transfers)`` runs a batch (blocking) and
    raises its failure, which every work of the batch then carries."""

    def __init__(self, run):
        self._run = run
        self._lock = threading.Lock()
        self._pending = []

    def __bool__(self):
        return bool(self._pending)

    def add(self, transfer):
        with self._lock:
            self._pending.append(transfer)

    def flush(self):
        """Run every queued transfer as one batch (nothing to do when none is queued)."""
        with self._lock:
            batch, self._pending = self._pending, []
        if not batch:
            return
        try:
            self._run(batch)
        except BaseException as exc:  # noqa: BLE001 - every work of the batch carries it
            for t in batch:
                t.buf.release()
                t.work.complete(None, exc)
            return
        for t in batch:
            t.buf.release()
            t.work.complete(t.result)

    def fail_all(self, why):
        """The communicator closes: fail what never ran."""
        with self._lock:
            batch, self._pending = self._pending, []
        for t in batch:
            t.buf.release()
            t.work.complete(None, CollectiveError(f"{t.work.description}: {why}"))
