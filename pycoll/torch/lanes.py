"""Overlap for the torch backend: a group's async collectives on several lanes that run at once.

Without it (one lane) every async collective of a torch group runs on the communicator's one worker
thread, in call order: DDP's bucket i+1 waits until bucket i is off the wire, even while bucket i
itself only waits for a peer still in backward. With ``n`` lanes (``PYCOLL_TORCH_OVERLAP=n``) the
k-th async collective that a tag can carry (all_reduce, all_gather, reduce_scatter, broadcast and
their single-tensor forms) goes to lane ``k mod n``; the others (reduce, gather, scatter,
all_to_all, the coalesced forms) to lane 0. Each lane is one thread with connections of its own:
lane 0 the communicator's untagged calls, lane i > 0 the communicator's tag channel
:func:`lane_tag` (i) (see :meth:`pycoll.Communicator.all_reduce`'s ``tag=``). Torch requires every
rank to issue a group's collectives in the same order, so the k-th call lands on the same lane on
every rank and calls pair across ranks by their order within a lane.

What stays ordered (more than Gloo, whose 2 worker threads take any queued work with no regard to
the tensors, and whose barrier waits for all earlier work):

* a call whose tensors share bytes with an earlier call still in flight waits for that call's
  torch Work to complete (results copied back) before it starts, on its lane;
* a barrier waits for every earlier call, as Gloo's does;
* a blocking call, and point-to-point transfers (posted or run), first wait for every call in
  flight (the untagged connections then carry nothing else, so their frames keep one order on
  every rank).

Every lane, and the caller's thread, waits with a bound (the group's timeout), so nothing hangs.
Failures: once a call failed because a peer was lost, the group is unusable
(``_GroupState.usable``): a lane checks that before each call it starts, so every queued call fails
once with PeerFailure and nothing runs in a re-formed group.

Off by default: on a 2-core host the lanes did not pay (docs/overlap.md has the measurements).
"""
import threading

import torch

from pycoll.comm.work import CallOrderExecutor, Work
from pycoll.errors import CollectiveTimeout

__all__ = ["Lanes", "lane_tag", "spans"]


def lane_tag(i):
    """The communicator tag of lane ``i`` > 0 (lane 0 runs untagged)."""
    return f"pycoll-torch-lane-{i}"


def _span(t):
    """The bytes ``t`` may touch: [first, end) of its view (strides included)."""
    if t.numel() == 0:
        return None
    start = t.data_ptr()
    last = sum((s - 1) * st for s, st in zip(t.shape, t.stride()) if s > 0)
    return (t.device.type, start, start + (last + 1) * t.element_size())


def spans(*groups):
    """The byte ranges of every tensor in ``groups`` (tensors or nested lists of them)."""
    out = []
    stack = list(groups)
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            if x.layout == torch.strided:
                s = _span(x)
                if s is not None:
                    out.append(s)
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
    return out


def _overlap(a, b):
    for da, sa, ea in a:
        for db, sb, eb in b:
            if da == db and sa < eb and sb < ea:
                return True
    return False


class Lanes:
    """``n`` lanes for one torch group's async collectives (see the module doc)."""

    def __init__(self, n, timeout_s, usable):
        """``usable()`` raises when the group must not start another call (failed or shut down)."""
        if n < 2:
            raise ValueError("lanes: n must be at least 2 (one lane is the communicator's own worker)")
        self.n = n
        self.tags = (None,) + tuple(lane_tag(i) for i in range(1, n))
        self._execs = [CallOrderExecutor(f"pycoll-torch-lane{i}") for i in range(n)]
        self._next = 0             # taggable async calls issued so far: the k-th goes to lane k mod n
        self._inflight = []        # (spans, done event) of the Works issued and not completed
        self._lock = threading.Lock()
        self._timeout_s = timeout_s
        self._usable = usable

    def submit(self, calls, tagged, touched, what, barrier=False):
        """Queue ``calls`` (functions of ``(async_op, tag)`` when ``tagged``, else of
        ``async_op``), each to its lane, after the calls in flight that share bytes with
        ``touched`` (every call in flight for a ``barrier``). Returns one
        :class:`pycoll.comm.work.Work` per call."""
        with self._lock:
            self._inflight = live = [x for x in self._inflight if not x[1].is_set()]
            deps = [ev for sp, ev in live if barrier or _overlap(sp, touched)]
            works = []
            for call in calls:
                lane = 0
                if tagged:
                    lane, self._next = self._next % self.n, self._next + 1
                tag = self.tags[lane]
                fut = self._execs[lane].submit(self._run, call, tagged, tag, deps, what)
                works.append(Work(what, fut))
        return works

    def track(self, touched, done):
        """A Work just issued: later calls that touch its bytes wait for ``done`` (an Event)."""
        with self._lock:
            self._inflight.append((touched, done))

    def drain(self, what):
        """Wait for every call in flight (blocking calls and point-to-point transfers do)."""
        with self._lock:
            deps = [ev for _, ev in self._inflight if not ev.is_set()]
            self._inflight = []
        self._wait(deps, what)

    def _wait(self, events, what):
        for ev in events:
            if not ev.wait(self._timeout_s):
                raise CollectiveTimeout(f"pycoll backend: Timed out waiting {self._timeout_s:.0f} s for an earlier "
                                        f"collective that {what} depends on")

    def _run(self, call, tagged, tag, deps, what):
        self._wait(deps, what)
        self._usable()
        return call(False, tag) if tagged else call(False)

    def shutdown(self, timeout=None):
        """Fail the queued calls (never run) and stop the lanes' threads."""
        for ex in self._execs:
            ex.shutdown(wait=True, timeout=timeout)
