"""Fault-tolerant data parallel: an ordinary torch training loop that goes on while peers die and
join, with no restart.

    comm = pycoll.connect(...)                     # or pycoll.init(rank, world_size, ...)
    model = FaultTolerantDDP(net, torch.optim.AdamW(net.parameters()), comm, scheduler=sched)
    opt = model.optimizer
    while model.step < steps:
        opt.zero_grad()                             # the sync point: joiners admitted and healed
        loss_fn(model(x), y).backward()             # gradient buckets all-reduced during backward
        opt.step()                                  # averaged over the contributors; steps the scheduler

How a step goes:

* ``opt.zero_grad()`` is the sync point (``comm.update_topology()``, run on the wrapper's
  thread ahead of the step's buckets, overlapped with forward): pending joiners are admitted
  and dead members dropped. When the membership changed, every member and each joiner (whose
  wrapper does it on construction) run :func:`pycoll.train.state.heal`: a joiner receives
  model, optimizer state, step counter, scheduler and shared RNG state from the peers that hold
  the majority's bytes, striped over several of them and hash-checked on arrival, before its
  first step. With ``on_failure="discard"`` the sync point runs only when it has work: the
  step's last bucket carries one more number, how many members know of a joiner waiting (the
  coordinator's heartbeat replies say so, every 0.5 s), and the next sync point runs when that
  sum is above zero or the step failed here (see below). A step that needs none pays no round
  trip through the coordinator. A joiner waits one step more than with a sync point per step.
  ``on_failure="complete"`` syncs at every step.
* During ``backward()`` a post-accumulate-grad hook per parameter counts the gradients that are
  in and copies each into its bucket's flat buffer (``.grad`` is then its view), and a bucket whose
  gradients are all in is all-reduced (``avg``: the mean over the peers whose gradients are in
  it, divided in the engine) on the wrapper's own thread while backward goes on,
  as DDP overlaps them. Buckets are launched in one fixed order (reverse registration order, as
  DDP's first step) on every peer, whatever order the hooks fire in, so the k-th all-reduce
  pairs across peers.
* ``opt.step()`` waits for the buckets and steps the optimizer and the scheduler. Every peer takes the same step from the same
  averaged gradients, so the state stays bit-identical without moving it
  (``model.state.digest()`` checks it).

A step interrupted by a death: the survivors must end up in one state.

* ``on_failure="discard"`` (default): the buckets are plain all-reduces (the fast path, as DDP
  on the pycoll backend runs them) and nothing else is sent. A peer whose buckets all succeeded
  applies the step: a plain all-reduce that succeeded holds every member's data (a peer fails
  exactly one call per failed epoch, so none of a step's buckets ran in a re-formed group
  without one failing first), so its update is the mean over all the members of the step's
  sync point, even one that died after its buckets. A peer with a failed bucket drops the step
  (no optimizer or scheduler step, the step counter stays) and goes on with its next batch. So
  a death can leave the survivors one step apart, each holding a correct state of its step
  (all peers at step k hold the same bytes). They meet at the next sync point (a peer that
  applied fails its next step's first call, the epoch being aborted, and drops that step),
  which heals the group to the highest step: the peers that dropped the step receive the
  state of those that applied it, before their next forward (after a dropped step the sync
  point blocks ``zero_grad()`` instead of overlapping the forward pass). One batch of work lost per survivor per failure. Why the
  default: it costs nothing per step when nothing fails, while ``complete`` makes every bucket
  an agreed call, whose result waits in the engine's scratch until the group commits: a copy of
  every gradient byte and a round trip through the coordinator per bucket on every step. (An
  agreed vote per step, which made every survivor apply or drop alike, cost 3 to 6 ms a step
  at 4 ranks on this 2-core host; healing the peers that dropped a step costs only when
  something failed.)
* ``on_failure="complete"``: every bucket's all-reduce is agreed (``retry=True``): it commits on
  every survivor with the same contributors (``comm.last_outcome.contributors``), or re-runs
  over the survivors. The step is applied: a bucket that committed before the death holds the
  dead peer's gradients, one that ran after it does not; each is the mean over its own
  contributors, an unbiased gradient of the batches in it. No survivor's work is lost.

Re-running the same batch is not offered: the batch is the user's loop's, and the next batch
serves as well (a lost step is one batch of samples not trained on, whichever batch it is).

A step whose call failed is discarded on that peer (``complete``: a call that failed beyond
its retries, on every survivor alike); the next ``zero_grad()`` re-forms the group.
``max_discarded`` discarded steps in a row raise. The loss of the coordinator's host (rank 0 of a
``pycoll.init`` group, or a standalone ``pycoll master``) is survived the same way: a member
succeeds it (:mod:`pycoll.comm.failover`) at the sync point (and inside ``complete``'s agreed calls).

Speed: make the communicator with ``preserve_input=False`` (as the torch backend does): a failed
bucket's buffer is then left undefined instead of restored, which costs nothing here (its step
is discarded) and spares a copy of every gradient byte per step.

Limits: one ``backward()`` per step (no gradient accumulation), gradients of float32
parameters on CPU, every peer builds the same model and optimizer (same parameters, in the same
order, the same hyperparameters).
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Iterable, Optional

import torch

from pycoll.comm.work import CallOrderExecutor
from pycoll.errors import CollectiveError, CoordinatorError, PeerFailure
from pycoll.train.state import TrainingState, heal

__all__ = ["FaultTolerantDDP", "StepReport"]

log = logging.getLogger("pycoll.train")

#: a sync point that meets a lost coordinator tries again this many times (each bounded)
SYNC_TRIES = 5


class StepReport:
    """What the last ``optimizer.step()`` did: ``applied`` (False: discarded), ``contributors``
    (per bucket, the peers' names whose gradients are in it), ``members`` (the group at the
    step's sync point) and ``error`` (the failure that discarded it, if any)."""

    __slots__ = ("applied", "contributors", "members", "error")

    def __init__(self, applied, contributors, members, error=None):
        self.applied, self.contributors, self.members, self.error = applied, contributors, members, error

    def __repr__(self):
        return (f"StepReport(applied={self.applied}, contributors={[len(c or ()) for c in self.contributors]}, "
                f"members={len(self.members)}, error={self.error!r})")


class _Bucket:
    """Parameters whose gradients are all-reduced together, and the flat buffer they live in:
    each parameter's gradient is copied into its slice as backward makes it, and its ``.grad``
    becomes the slice's view (``views``), so the averaged result is the gradient with no copy
    out."""

    __slots__ = ("index", "params", "flat", "views", "pending", "work", "contributors", "error")

    def __init__(self, index, params, extra=0):
        self.index, self.params = index, params
        # (``extra`` floats after the gradients: the last bucket's joiner count, see _reduce)
        self.flat = torch.zeros(sum(p.numel() for p in params) + extra, dtype=torch.float32)
        self.views, at = [], 0
        for p in params:
            self.views.append(self.flat[at:at + p.numel()].view_as(p))
            at += p.numel()
        self.pending, self.work, self.contributors, self.error = len(params), None, None, None

    def attach(self):
        """Make every parameter's ``.grad`` its view (after anything replaced it: a
        ``zero_grad(set_to_none=True)`` of the model, say), keeping the gradient it holds."""
        for p, v in zip(self.params, self.views):
            if p.grad is None:  # (no part in backward: zeros)
                v.zero_()
                p.grad = v
            else:
                _adopt(p, v)


def _adopt(p, view):
    """Make ``p.grad`` (a gradient backward made) the bucket's ``view``, copying it in."""
    if p.grad is not view:
        view.copy_(p.grad)
        p.grad = view


class FaultTolerantDDP(torch.nn.Module):
    """Wrap ``module`` (its forward is the wrapper's) and ``optimizer`` for fault-tolerant data
    parallel training over ``comm`` (see the module docstring). Use :attr:`optimizer` (the
    wrapped one) in the loop.

    ``scheduler``: an LR scheduler, stepped after each applied step by the wrapper (do not step
    it yourself: a discarded step must not move it) and shared with joiners. ``generators``:
    torch.Generator objects whose state is shared (the same numbers on every peer; default: the
    wrapper's own :attr:`generator`, seeded with ``seed``). Per-peer randomness (which samples a
    peer draws) must come from a generator of the peer's own, not from these.
    ``bucket_cap_mb``: gradient bucket size (DDP's default 25; the first bucket, the last layers',
    holds ``first_bucket_mb``, 1 as DDP's, so that its all-reduce starts early in backward).
    Gradients live in the buckets (after backward, ``.grad`` are views of them);
    ``optimizer.zero_grad()`` sets them to None whatever ``set_to_none`` says. ``on_failure``: "discard" or "complete" (the same
    on every peer). ``retry``: retries of each agreed bucket (``complete``; True: the
    communicator's max_retries).
    ``checkpoint``: a :meth:`state_dict` to start from; the peers that start from none (or
    from an older one) receive it when the wrapper is made.
    Making it is a collective call: every member of ``comm`` makes its wrapper at the same point
    (a joiner on arrival), which heals them to the majority's state at the highest step.
    """

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, comm, *, scheduler=None,
                 generators: Optional[Iterable[torch.Generator]] = None, seed: int = 0, bucket_cap_mb: float = 25.0,
                 first_bucket_mb: float = 1.0,
                 on_failure: str = "discard", retry=True, max_discarded: int = 10,
                 timeout: Optional[float] = None, checkpoint: Optional[dict] = None):
        super().__init__()
        if on_failure not in ("complete", "discard"):
            raise ValueError(f"on_failure must be 'complete' or 'discard', not {on_failure!r}")
        self.module = module
        self.comm = comm
        self.on_failure, self.retry, self.max_discarded, self.timeout = on_failure, retry, max_discarded, timeout
        if generators is None:
            self.generator = torch.Generator().manual_seed(seed)
            generators = [self.generator]
        else:
            generators = list(generators)
            self.generator = generators[0] if generators else None
        self.state = TrainingState(module, optimizer, scheduler=scheduler, generators=generators)
        self.optimizer = _Optimizer(self, optimizer)
        self.scheduler = scheduler
        self.last_step: Optional[StepReport] = None
        self.last_heal = None  # the SyncResult of the last heal (None: none since the wrapper was made)
        self.heals = 0
        self.sync_points = 0  # sync points run since the wrapper was made (its making's not counted)
        self._discarded_in_a_row = 0
        self._buckets = self._make_buckets(optimizer, bucket_cap_mb, first_bucket_mb)
        for b in self._buckets:
            b.attach()
        self._slot_of = {id(p): (b, v) for b in self._buckets for p, v in zip(b.params, b.views)}
        self._next_launch = 0  # buckets launch in index order (see _launch_ready)
        self._lock = threading.Lock()
        self._members = tuple(comm.members)
        self._exec = CallOrderExecutor("pycoll-ftddp")
        self._hooks = [p.register_post_accumulate_grad_hook(self._grad_ready)
                       for b in self._buckets for p in b.params]
        self._revision = -1  # before the first heal: behind anyone who has trained
        self._sync_work = self._sync_error = None
        self._restore_due = False
        if checkpoint is not None:  # ahead of the peers that start fresh: they heal to it
            self.state.load_state_dict(checkpoint)
            self._revision = self.state.step
        # A joiner's first update_topology() is the members' sync point that admitted it (a no-op
        # here, pycoll.connect): it must come before the heal, which the members run after theirs.
        self.comm.update_topology()
        self._heal()
        self._synced = True  # this was the first step's sync point (see sync)

    # ---- buckets ---------------------------------------------------------------------------
    @staticmethod
    def _make_buckets(optimizer, cap_mb, first_mb):
        params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        for p in params:
            if p.dtype != torch.float32 or p.device.type != "cpu":
                raise ValueError(f"FaultTolerantDDP: float32 CPU parameters only (got {p.dtype} on {p.device})")
        caps = [max(1, int(mb * (1 << 20)) // 4) for mb in (min(first_mb, cap_mb), cap_mb)]
        buckets, cur, size = [], [], 0
        for p in reversed(params):  # backward produces the last layers' gradients first
            cur.append(p)
            size += p.numel()
            # DDP's rule: a bucket closes once it holds its cap or more. (Closing before the
            # tensor that would pass the cap left a 1 MiB first bucket with the last layer's
            # bias alone when its weight is larger, and nothing overlapped with backward.)
            if size >= caps[min(len(buckets), 1)]:
                buckets.append(cur)
                cur, size = [], 0
        if cur:
            buckets.append(cur)
        return [_Bucket(i, ps, extra=int(i == len(buckets) - 1)) for i, ps in enumerate(buckets)]

    def _grad_ready(self, p):
        """post-accumulate-grad hook: one more gradient of its bucket is in (copied into the
        bucket, where it is not yet: ``.grad`` is its view from here on)."""
        b, view = self._slot_of[id(p)]
        if p.grad is not None:
            _adopt(p, view)
        with self._lock:
            if b.pending <= 0 or self._next_launch > b.index:
                raise RuntimeError("FaultTolerantDDP: a second backward() in one step (its bucket is already "
                                   "all-reduced or on the way); one backward() per step, between "
                                   "optimizer.zero_grad() and optimizer.step()")
            b.pending -= 1
            self._launch_ready()

    def _launch_ready(self):
        """Launch, in index order, every bucket whose gradients are all in (under _lock)."""
        while self._next_launch < len(self._buckets):
            b = self._buckets[self._next_launch]
            if b.pending > 0:
                return
            self._launch(b)
            self._next_launch += 1

    def _launch(self, b):
        b.attach()  # (the gradients are already in the buffer unless something replaced them)
        b.work = self._exec.submit(self._reduce, b)

    def _reduce(self, b):
        """On the wrapper's thread: the bucket's all-reduce, agreed (``complete``: the same
        outcome on every survivor) or plain (``discard``). After a failure in this step nothing
        more runs here: a rank fails exactly one call per failed epoch (pycoll.comm.epoch), so
        every survivor's next call of the group is a sync point, whichever bucket failed where
        (``discard``: a peer whose buckets all succeeded fails its next step's first bucket).
        The last bucket's extra float is 1 where this peer knows of a joiner waiting: its mean,
        the same on every peer whose buckets succeeded, asks for the next sync point when above
        zero. op="avg": the mean over the contributors (the members; ``complete``: those of the
        committed attempt), divided in the engine (a ring divides each rank's share of the
        reduction once, not the whole bucket on every rank after it)."""
        earlier = self._buckets[:b.index]
        failed = self._sync_error or next((x.error for x in earlier if x.error is not None), None)
        if failed is not None:
            b.error = failed
            return
        if b.index == len(self._buckets) - 1:
            b.flat[-1] = 1.0 if self.comm.pending_joiners() > 0 else 0.0
        try:
            if self.on_failure == "complete":
                self.comm.all_reduce(b.flat, op="avg", retry=self.retry, timeout=self.timeout)
                b.contributors = tuple(self.comm.last_outcome.contributors)
            else:
                self.comm.all_reduce(b.flat, op="avg", timeout=self.timeout)
        except (PeerFailure, CoordinatorError, CollectiveError) as exc:
            b.error = exc

    # ---- the step --------------------------------------------------------------------------
    @property
    def step(self) -> int:
        """Optimizer steps applied so far (shared: equal on every peer)."""
        return self.state.step

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def sync(self, block: bool = True) -> bool:
        """The sync point (``optimizer.zero_grad()`` calls it): admit joiners, drop the dead,
        heal when the group changed. Returns True when it changed (``block=False``: returns
        False at once, and the sync runs on the wrapper's thread before the step's buckets,
        overlapped with forward and backward; see below). One sync point per step: calls after
        the first, before the step (and the first after the wrapper was made, whose making was
        one), do nothing, on every peer alike; so does the step's first call when the last
        step found no work for it (``on_failure="discard"``, see the module docstring).

        Why the sync may overlap the forward pass: a heal at a sync point only changes the
        peers that are behind or differ from the majority. A member that took every step with
        the others (its last step was not dropped: after a dropped step ``zero_grad()`` blocks
        on the sync point) holds the majority's bytes, so the heal only reads its state (hashes, and
        sends to joiners), and a joiner was healed when its wrapper was made, before its first
        forward. A member found to differ (which a correct run never shows) gets the majority's
        bytes at once and its restored scheduler and RNG state at ``optimizer.step()``; the
        gradients it computed in that step came from its old state (logged)."""
        self._reset_buckets()
        if self._synced:
            return False
        self._synced = True
        self._sync_error = None
        self.state.capture()  # here, on the caller's thread: what the shared generators hold now
        if not block:
            self._sync_work = self._exec.submit(self._sync_point, False)
            return False
        changed = self._sync_point(True)
        if self._sync_error is not None:
            raise self._sync_error
        return changed

    def _sync_point(self, restore):
        self.sync_points += 1
        for attempt in range(SYNC_TRIES):
            try:
                changed = self.comm.update_topology()
                if changed:
                    self._heal(captured=True, restore=restore)
                self._members = tuple(self.comm.members)
                return changed
            except CoordinatorError as exc:  # a lost coordinator: a member succeeds it, try again
                if attempt + 1 >= SYNC_TRIES:
                    self._sync_error = exc
                    return False
                log.warning("%s: sync point: %s; trying again", self.comm.name, exc)
                time.sleep(0.1)
            except (PeerFailure, CollectiveError) as exc:
                self._sync_error = exc
                return False
        return False

    def _heal(self, captured=False, restore=True):
        self.last_heal = heal(self.state, self.comm, self._revision, timeout=self.timeout, captured=captured,
                              restore=restore)
        if self.last_heal.fetched and not restore:
            self._restore_due = True
            log.warning("%s: this member's state differed from the majority's at step %d (%s): replaced",
                        self.comm.name, self.step, self.last_heal.fetched[:4])
        self._revision = self.state.step
        self.heals += 1

    def begin_step(self):
        """``optimizer.zero_grad()``: the sync point, overlapped with the forward pass, then the
        gradients to None. After a dropped step the sync point runs here instead, before the forward
        pass: this peer may be a step behind peers that applied it, and its heal must land
        before it computes gradients (overlapped, its forward would read weights the heal is
        writing)."""
        self.sync(block=self._discarded_in_a_row > 0)
        self.zero_grads()

    def zero_grads(self):
        """``optimizer.zero_grad()``: every ``.grad`` to None. Backward then makes each gradient
        afresh and the hook copies it into its bucket (one pass over the bytes, as DDP's copy
        into its buckets); zeroing the buckets for backward to add into took two (measured:
        2.3 ms against 1.9 ms per 16 MiB here)."""
        for b in self._buckets:
            for p in b.params:
                p.grad = None

    def _reset_buckets(self):
        self._wait_buckets()  # (a step abandoned without optimizer.step(): let its calls end)
        with self._lock:
            for b in self._buckets:
                b.pending, b.work, b.contributors, b.error = len(b.params), None, None, None
            self._next_launch = 0

    def _wait_buckets(self):
        if self._sync_work is not None:
            self._sync_work.result()  # _sync_point never raises: a failure lands in _sync_error
            self._sync_work = None
        for b in self._buckets:
            if b.work is not None:
                b.work.result()  # _reduce never raises: failures land in b.error

    def finish_step(self) -> StepReport:
        """``optimizer.step()``: wait for the buckets, average, step (see the module docstring)."""
        with self._lock:
            for b in self._buckets:  # parameters that took no part in backward: zeros, in order
                b.pending = 0
            self._launch_ready()
        self._wait_buckets()
        self._synced = False  # the next zero_grad() is the next step's sync point (discard: if due)
        if self._sync_error is not None:  # the sync point itself failed: no step can be taken
            raise self._sync_error
        if self._restore_due:
            self._restore_due = False
            self.state.restore()
        members = self._members
        error = next((b.error for b in self._buckets if b.error is not None), None)
        if self.on_failure == "complete":
            contributors = [b.contributors for b in self._buckets]
            applied = error is None
        else:  # (see the module docstring: applied where every bucket succeeded)
            applied = error is None
            contributors = [members if applied else None for _ in self._buckets]
            # (no buckets, no joiner count: a sync point every step)
            joiners_seen = not self._buckets or self._buckets[-1].flat[-1] > 0
            self._synced = applied and not joiners_seen  # else the next zero_grad() syncs
        if applied:  # (the buckets hold the means: op="avg" divides in the engine, each rank its share)
            self.optimizer.inner.step()
            if self.scheduler is not None:
                self.scheduler.step()
            self.state.advance()
            self._revision = self.state.step
            self._discarded_in_a_row = 0
        else:
            self._discarded_in_a_row += 1
            log.warning("%s: step %d discarded (%s)", self.comm.name, self.step,
                        error if error is not None else "a peer's gradients are missing")
            if self._discarded_in_a_row > self.max_discarded:
                raise CollectiveError(f"{self.comm.name}: {self._discarded_in_a_row} steps in a row discarded; "
                                      f"last: {error}") from error
        self.last_step = StepReport(applied, contributors, members, error)
        return self.last_step

    # ---- checkpoints and lifetime ----------------------------------------------------------
    def state_dict(self, *args, **kwargs):
        """A checkpoint of the whole training state (:meth:`TrainingState.state_dict`)."""
        return self.state.state_dict()

    def load_state_dict(self, sd, strict=True):
        """Load a checkpoint made by :meth:`state_dict` on this peer (between steps; every peer
        must load the same one: nothing is healed until the group changes). To resume a group
        from one peer's file, pass it as ``checkpoint=`` when making the wrapper instead."""
        self.state.load_state_dict(sd)

    def close(self) -> None:
        """Remove the hooks and stop the wrapper's thread (the communicator stays open)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._exec.shutdown(wait=True, timeout=30)


class _Optimizer:
    """The wrapped optimizer: ``zero_grad()`` is the sync point, ``step()`` the averaged step
    (returns the :class:`StepReport`); everything else is the inner optimizer's."""

    def __init__(self, ddp, inner):
        self._ddp, self.inner = ddp, inner

    def zero_grad(self, set_to_none: bool = True):
        """The sync point, then every ``.grad`` to None (whatever ``set_to_none`` says)."""
        self._ddp.begin_step()

    def step(self, closure=None):
        if closure is not None:
            raise ValueError("FaultTolerantDDP's optimizer.step() takes no closure")
        return self._ddp.finish_step()

    def __getattr__(self, name):
        return getattr(self.inner, name)
