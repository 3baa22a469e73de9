"""The DiLoCo family on pycoll's elastic communicator: DiLoCo, async DiLoCo, streaming DiLoCo.

    diloco = pycoll.train.DiLoCo(model, torch.optim.AdamW(model.parameters()), comm, sync_every=50)
    for x, y in batches:
        loss_fn(model(x), y).backward()
        diloco.step()          # the inner step; every sync_every steps also the outer one

Each peer trains its own copy of the model with its inner optimizer for ``sync_every`` (H) steps;
then the pseudo-gradients (the shared parameters at the round's start minus the peer's parameters
now) are summed with ``all_reduce(retry=True)`` and divided by the number of peers that
contributed, and an outer SGD step with Nesterov momentum moves the shared parameters. The shared
state is the parameters, the outer momentum and a counter (inner step, outer revision); at every
outer step ``update_topology`` admits joiners and drops the dead, and ``sync_shared_state`` makes
that state bit-identical on every peer (a joiner receives all of it; a member whose bytes agree
receives nothing). The inner optimizer's state stays local: a joiner's starts as the optimizer it
passed in (empty for a fresh one).

``mode="async"``: the pseudo-gradient all-reduce of round r runs in the background during round
r + 1's inner steps and is applied at the end of round r + 1 (one round late, as PCCL's async
DiLoCo). Joiners are admitted only when nothing is in flight (after the wait). The all-reduce
launched right after a joiner's admission holds a zero from it and is divided by the peers that
trained that round (its contributors that were members before the sync point); the joiner, which
does not know who they were, skips that update and receives its result at the next sync point
(PCCL's second sync of a newcomer).

``fragments=F`` (streaming DiLoCo): the parameters are cut into F fragments synced on a staggered
schedule (pycoll.train.outer.Schedule), each with its own shared parameters and momentum; the
peak traffic of a sync is 1/F of the model's.

``compression`` ("bf16", "int8", "fp16") is the pseudo-gradient all-reduce's wire codec; striping
(``stripes=``) and shared memory are the communicator's settings (``pycoll.connect(...,
stripes=4)``). docs/diloco.md says what each mode does, what a joiner gets and what a failure
loses.
"""
import dataclasses
import threading
import time
from typing import Optional

import torch

from pycoll.errors import CollectiveError, InvalidArgument
from pycoll.plan.compression import codec_name
from pycoll.train.outer import Schedule, nesterov_, split_fragments

__all__ = ["DiLoCo", "Round"]

MODES = ("sync", "async", "streaming")


@dataclasses.dataclass
class Round:
    """What one outer step did on this peer (``DiLoCo.last_round``)."""

    revision: int              # the shared state's revision after it (outer steps of the group so far)
    fragment: int              # the fragment it synced (0 unless streaming)
    step: int                  # the inner step it followed
    contributors: list         # names whose pseudo-gradients the applied update averages ([] if none applied)
    joined: list               # names admitted at its sync point
    lost: list                 # names lost during it (in the all-reduce or at the sync point)
    fetched: list              # shared-state tensors this peer received (a member whose state agrees: none)
    seconds: float             # time this peer waited for communication in it


class DiLoCo:
    """DiLoCo over ``comm`` for ``model`` (a Module or its parameters) and ``inner_optimizer``.

    Every member constructs it at the same point (right after ``pycoll.connect``/``init``): the
    construction is a ``sync_shared_state``, so the members start from the same bits (the
    majority's) and a joiner receives the group's state at the outer step it was admitted at."""

    def __init__(self, model, inner_optimizer, comm, *, sync_every: int, outer_lr: float = 0.7,
                 momentum: float = 0.9, mode: str = "sync", fragments: Optional[int] = None,
                 compression: Optional[str] = None, algorithm: str = "auto", timeout: Optional[float] = None):
        if mode not in MODES:
            raise InvalidArgument(f"mode must be one of {MODES}, not {mode!r}")
        fragments = (1 if mode != "streaming" else 4) if fragments is None else fragments
        if mode != "streaming" and fragments != 1:
            raise InvalidArgument(f'fragments={fragments} needs mode="streaming"')
        self.mode, self.outer_lr, self.momentum = mode, float(outer_lr), float(momentum)
        self.compression = None if compression is None else codec_name(compression)
        self.algorithm, self.timeout = algorithm, timeout
        self._comm, self._inner = comm, inner_optimizer
        self._params = _parameters(model)
        self.schedule = Schedule(sync_every, fragments)
        self._groups = split_fragments([p.numel() for p in self._params], fragments)
        with torch.no_grad():
            self._global = [torch.cat([self._params[i].detach().reshape(-1) for i in g]) for g in self._groups]
        self._momentum = [torch.zeros_like(g) for g in self._global]
        # the pseudo-gradient buffers: async keeps two (one in flight, one being made)
        self._deltas = [[torch.zeros_like(g) for g in self._global] for _ in range(2 if mode == "async" else 1)]
        self._counters = torch.zeros(2, dtype=torch.int64)  # [inner steps, outer revision]: the group's
        self._state = {"diloco.counters": self._counters}
        for f, (g, m) in enumerate(zip(self._global, self._momentum)):
            self._state[f"diloco.params.{f}"] = g
            self._state[f"diloco.momentum.{f}"] = m
        self._pending = None   # async: (work, buffer, names that trained its round or None, outcome, ended)
        self.last_round: Optional[Round] = None
        self._join()

    # ---- the training loop ----------------------------------------------
    def step(self) -> Optional[Round]:
        """The inner optimizer's step (then its ``zero_grad``); after every ``sync_every / fragments``
        steps also an outer step, whose :class:`Round` it returns (else None)."""
        self._inner.step()
        self._inner.zero_grad()
        self._counters[0] += 1
        f = self.schedule.due(int(self._counters[0]))
        if f is None:
            return None
        return self._outer_async() if self.mode == "async" else self._outer(f)

    def finish(self) -> Optional[Round]:
        """The end of training (every member calls it together): the model gets the shared
        parameters (streaming: each fragment's local steps since its last sync are dropped). async:
        first wait for the all-reduce in flight, apply it and sync the state once more, so the model
        holds the last round's work and a peer admitted at the last sync point gets that update too;
        returns that outer step's :class:`Round` (else None)."""
        if self._pending is None:
            for f in range(len(self._groups)):
                self._load(f)
            return None
        t0 = time.perf_counter()
        contributors, lost, skipped = self._apply_pending()
        self._counters[1] += 1
        res = self._comm.sync_shared_state(self._state, self.revision - 1 if skipped else self.revision,
                                           timeout=self.timeout)
        self._load(0)
        self.last_round = Round(self.revision, 0, self.inner_steps, contributors, [], lost, list(res.fetched),
                                time.perf_counter() - t0)
        return self.last_round

    # ---- what the tests and users read -----------------------------------
    @property
    def revision(self) -> int:
        """Outer steps the group has taken (the shared state's revision)."""
        return int(self._counters[1])

    @property
    def inner_steps(self) -> int:
        """Inner steps the group has taken (a joiner continues the count)."""
        return int(self._counters[0])

    @property
    def in_flight(self) -> bool:
        """async: a pseudo-gradient all-reduce is still running."""
        return self._pending is not None and not self._pending[0].done()

    @property
    def shared_state(self) -> dict:
        """The tensors kept bit-identical across peers (name -> tensor; do not modify)."""
        return dict(self._state)

    # ---- outer steps ----------------------------------------------------
    def _outer(self, f):
        """sync and streaming: average fragment f's pseudo-gradients, step, sync the state."""
        t0 = time.perf_counter()
        delta = self._deltas[0][f]
        self._pseudo_gradient(f, delta)
        self._comm.all_reduce(delta, op="sum", retry=True, compression=self.compression, algorithm=self.algorithm,
                              timeout=self.timeout)
        outcome = self._comm.last_outcome
        contributors = list(outcome.contributors)
        delta.div_(len(contributors))
        nesterov_(self._global[f], self._momentum[f], delta, self.outer_lr, self.momentum)
        self._counters[1] += 1
        joined, lost, fetched = self._sync_point()
        self._load(f)
        self.last_round = Round(self.revision, f, self.inner_steps, contributors, joined,
                                sorted(set(outcome.lost) | set(lost)), fetched, time.perf_counter() - t0)
        return self.last_round

    def _outer_async(self):
        """async: make this round's pseudo-gradient, apply the last round's (waiting for its
        all-reduce, which ran during this round), sync, and launch this round's."""
        t0 = time.perf_counter()
        delta = self._free_buffer()
        self._pseudo_gradient(0, delta)  # against the parameters this round started from
        contributors, lost, skipped = self._apply_pending() if self._pending is not None else ([], [], False)
        self._counters[1] += 1
        trained = list(self._comm.members)  # (after the wait: whoever is a member now trained this round)
        joined, lost_at_sync, fetched = self._sync_point(behind=skipped)
        self._launch(delta, trained)
        self._load(0)
        self.last_round = Round(self.revision, 0, self.inner_steps, contributors, joined,
                                sorted(set(lost) | set(lost_at_sync)), fetched, time.perf_counter() - t0)
        return self.last_round

    def _free_buffer(self):
        """async: the pseudo-gradient buffer that is not in flight."""
        a, b = self._deltas[0][0], self._deltas[1][0]
        return b if self._pending is not None and self._pending[1] is a else a

    def _launch(self, delta, trained):
        """async: start the all-reduce of ``delta``; ``trained``: the names whose sum it is (the
        members before the sync point; a joiner's zero is not among them), None for a joiner,
        which does not know them: it takes the result from the group at the next sync instead."""
        work = self._comm.all_reduce(delta, op="sum", retry=True, async_op=True, compression=self.compression,
                                     algorithm=self.algorithm, timeout=self.timeout)
        outcome, ended = [], threading.Event()

        def grab(_work):  # in the worker, as it ends: before a call queued behind it can replace last_outcome
            outcome.append(self._comm.last_outcome)
            ended.set()
        work.add_done_callback(grab)
        self._pending = (work, delta, None if trained is None else frozenset(trained), outcome, ended)

    def _apply_pending(self):
        """Wait for the all-reduce in flight; apply its average over the peers that trained.
        Returns (those names, names lost during it, whether this peer skipped the update)."""
        work, delta, trained, outcome, ended = self._pending
        self._pending = None
        work.wait()
        if not ended.wait(30.0):  # (set by then, or microseconds later: callbacks run right after waiters wake)
            raise CollectiveError("DiLoCo: the pseudo-gradient all-reduce ended without an outcome")
        outcome = outcome[0]
        if trained is None:  # a joiner's first: the members apply it, and the sync brings it here
            return [], list(outcome.lost), True
        names = [n for n in outcome.contributors if n in trained]
        if names:  # (none: every peer that trained is gone, and the sum is the joiners' zeros)
            delta.div_(len(names))
            nesterov_(self._global[0], self._momentum[0], delta, self.outer_lr, self.momentum)
        return names, list(outcome.lost), False

    def _sync_point(self, behind=False):
        """Admit joiners, drop the dead, make the shared state bit-identical; returns (joined,
        lost, fetched) as this peer saw them. ``behind``: this peer skipped the outer step, so it
        reports the revision before it and receives the state of the peers that took it."""
        comm = self._comm
        before = list(comm.members)
        changed = comm.update_topology()
        # (a successor coordinator's first epoch names its re-registered members as joined too)
        joined = [n for n in comm.joined if n not in before] if changed else []
        lost = list(comm.lost) if changed else []
        res = comm.sync_shared_state(self._state, self.revision - 1 if behind else self.revision,
                                     timeout=self.timeout)
        return joined, lost, list(res.fetched)

    def _join(self):
        """Construction: the group's state (a founder: the majority's bits at revision 0); an async
        joiner then takes part in the all-reduce the members launch after admitting it, with a
        zero, and takes that round's update from the group at its first outer step."""
        comm = self._comm
        t0 = time.perf_counter()
        res = comm.sync_shared_state(self._state, self.revision, timeout=self.timeout)
        for f in range(len(self._groups)):
            self._load(f)
        if self.mode == "async" and self.revision >= 1:
            delta = self._free_buffer()
            delta.zero_()  # a zero: we did not train the round being reduced
            self._launch(delta, None)
        joined = [comm.name] if self.revision else []
        self.last_round = Round(self.revision, 0, self.inner_steps, [], joined, [], list(res.fetched),
                                time.perf_counter() - t0)

    # ---- moving between the model and the flat shared tensors -----------
    def _pseudo_gradient(self, f, out):
        """out = shared parameters of fragment f - this peer's parameters now."""
        with torch.no_grad():
            torch.cat([self._params[i].detach().reshape(-1) for i in self._groups[f]], out=out)
            torch.sub(self._global[f], out, out=out)

    def _load(self, f):
        """This peer's parameters of fragment f = the shared ones."""
        with torch.no_grad():
            offset = 0
            for i in self._groups[f]:
                p = self._params[i]
                p.copy_(self._global[f][offset:offset + p.numel()].view_as(p))
                offset += p.numel()


def _parameters(model):
    params = list(model.parameters()) if hasattr(model, "parameters") else list(model)
    if not params:
        raise InvalidArgument("DiLoCo needs at least one parameter")
    dtypes = {p.dtype for p in params}
    if len(dtypes) != 1 or not params[0].is_floating_point():
        raise InvalidArgument(f"DiLoCo needs parameters of one floating dtype, not {sorted(map(str, dtypes))}")
    if any(p.device.type != "cpu" for p in params):
        raise InvalidArgument("DiLoCo's shared state lives on the CPU: move the model there, or keep a CPU copy")
    return params
