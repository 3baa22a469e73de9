"""Training state as shared state: a torch model, its optimizer, an LR scheduler, a step counter
and RNG state, seen as one ``name -> tensor`` dict that
:meth:`pycoll.Communicator.sync_shared_state` makes bit-identical on every peer.

What travels, and under which names (sorted names are the order of the wire and of the hash):

* ``param/<name>`` and ``buffer/<name>``: the model's parameters and persistent buffers, in place;
* ``optim/<group>.<index>/<key>``: every tensor of the optimizer's per-parameter state, in place.
  State that does not exist yet (Adam's ``exp_avg`` before the first step) is *materialized* at
  construction (:meth:`TrainingState.materialize`), so that every peer, a joiner too, holds the
  same names and shapes from the start;
* ``train/step``: the number of optimizer steps taken (int64);
* ``train/rng.<i>``: the state of each shared ``torch.Generator`` (captured before a sync, set
  after one);
* ``train/meta``: what is not a tensor, pickled into a fixed-size byte tensor: the optimizer's
  hyperparameters per group (the scheduler changes ``lr``), non-tensor per-parameter state and
  the scheduler's ``state_dict()``. Pickled without memo (``Pickler.fast``): equal values give
  equal bytes whatever object sharing the process happens to have (an unpickled copy included),
  which the hash comparison needs.

Materializing: one optimizer step with zero gradients on every parameter, after which the
parameters are put back as they were and every state tensor is zeroed. For the optimizers whose
fresh state is zeros (Adam, AdamW, RMSprop, Adagrad with initial_accumulator_value=0, SGD with
momentum and dampening 0: ``buf = 0 * momentum + grad`` is ``grad``), the next real step is
bit-identical to the one an untouched optimizer takes (tests/unit/test_train_state.py checks
SGD and AdamW). An optimizer whose first step differs from a step on zero state (SGD with
dampening) must be given its state explicitly before the wrapper is made.
"""
from __future__ import annotations

import copy
import io
import pickle
import struct
from typing import Iterable, Optional

import numpy as np
import torch

from pycoll.core.hashing import hash_arrays

__all__ = ["TrainingState", "META_BYTES", "heal"]

#: default capacity of ``train/meta`` (the pickled non-tensor state): the same on every peer
META_BYTES = 16384
_LEN = struct.Struct("<Q")


def _pickle(obj) -> bytes:
    buf = io.BytesIO()
    p = pickle.Pickler(buf, protocol=4)
    p.fast = True  # no memo: the bytes depend on the values only (see the module docstring)
    p.dump(obj)
    return buf.getvalue()


def _contiguous(t: torch.Tensor, what: str) -> torch.Tensor:
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError(f"training state {what}: needs a contiguous CPU tensor (got {t.device}, "
                         f"contiguous={t.is_contiguous()})")
    return t


class TrainingState:
    """The training state of one peer: ``model``, ``optimizer``, optional ``scheduler``, a step
    counter and the state of ``generators`` (torch.Generator objects every peer must draw the
    same numbers from). :meth:`tensors` is the dict for ``sync_shared_state``."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, scheduler=None,
                 generators: Iterable[torch.Generator] = (), meta_bytes: int = META_BYTES):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.generators = list(generators)
        self._step = torch.zeros((), dtype=torch.int64)
        self._meta = torch.zeros(int(meta_bytes), dtype=torch.uint8)
        self._rng = [g.get_state().clone() for g in self.generators]
        self._params = {}  # id(param) -> (group, index): the optimizer's order, the same on every peer
        for gi, group in enumerate(optimizer.param_groups):
            for pi, p in enumerate(group["params"]):
                self._params[id(p)] = (gi, pi)
        self.materialize()
        self._names = sorted(self._collect())

    # ---- the step counter ------------------------------------------------------------------
    @property
    def step(self) -> int:
        """Optimizer steps taken (shared: a joiner receives it)."""
        return int(self._step)

    def advance(self) -> None:
        """Count one optimizer step."""
        self._step += 1

    # ---- materializing ----------------------------------------------------------------------
    def materialize(self) -> None:
        """Create the optimizer's per-parameter state where it does not exist yet (see the
        module docstring): parameters and existing state are left bit for bit as they were."""
        opt = self.optimizer
        missing = [p for g in opt.param_groups for p in g["params"] if not opt.state.get(p)]
        if not missing:
            return
        keep = {p: (p.detach().clone(), p.grad) for p in missing}
        others = [p for g in opt.param_groups for p in g["params"] if p not in keep]
        grads = {p: p.grad for p in others}
        # one step that only the missing parameters take: the others have no gradient (skipped)
        for p in others:
            p.grad = None
        for p in missing:
            p.grad = torch.zeros_like(p)
        groups = [dict((k, v) for k, v in g.items() if k != "params") for g in opt.param_groups]
        with torch.no_grad():
            opt.step()
            for p, (data, grad) in keep.items():
                p.copy_(data)
                p.grad = grad
                for v in opt.state[p].values():
                    if isinstance(v, torch.Tensor):
                        v.zero_()
        for p in others:
            p.grad = grads[p]
        for g, saved in zip(opt.param_groups, groups):  # an optimizer may note things in its groups
            g.update(saved)

    # ---- the shared dict --------------------------------------------------------------------
    def _collect(self) -> dict:
        out = {}
        for name, p in self.model.named_parameters():
            out[f"param/{name}"] = _contiguous(p.data, name)
        for name, b in self.model.named_buffers():
            if b is not None:
                out[f"buffer/{name}"] = _contiguous(b, name)
        for p, st in self.optimizer.state.items():
            gi, pi = self._params[id(p)]
            for key, v in st.items():
                if isinstance(v, torch.Tensor):
                    out[f"optim/{gi}.{pi}/{key}"] = _contiguous(v, f"optimizer state {key!r}")
        out["train/step"] = self._step
        out["train/meta"] = self._meta
        for i, t in enumerate(self._rng):
            out[f"train/rng.{i}"] = t
        return out

    def _meta_value(self) -> dict:
        opt = self.optimizer
        groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
        scalars = {}
        for p, st in opt.state.items():
            rest = {k: v for k, v in st.items() if not isinstance(v, torch.Tensor)}
            if rest:
                scalars["%d.%d" % self._params[id(p)]] = rest
        sched = self.scheduler.state_dict() if self.scheduler is not None else None
        return {"groups": groups, "state": dict(sorted(scalars.items())), "scheduler": sched}

    def capture(self) -> None:
        """Write the non-tensor state (``train/meta``) and the generators' states into their
        tensors: call before the dict is synchronized or hashed."""
        blob = _pickle(self._meta_value())
        cap = self._meta.numel() - _LEN.size
        if len(blob) > cap:
            raise ValueError(f"training state: the non-tensor state pickles to {len(blob)} bytes, more than "
                             f"meta_bytes={self._meta.numel()} allows; make the state with a larger meta_bytes "
                             f"(the same on every peer)")
        raw = self._meta.numpy()
        raw[:] = 0
        raw[:_LEN.size] = np.frombuffer(_LEN.pack(len(blob)), np.uint8)
        raw[_LEN.size:_LEN.size + len(blob)] = np.frombuffer(blob, np.uint8)
        for g, t in zip(self.generators, self._rng):
            t.copy_(g.get_state())

    def restore(self) -> None:
        """Apply ``train/meta`` and the generators' tensors (after a sync wrote them)."""
        raw = self._meta.numpy()
        (n,) = _LEN.unpack(raw[:_LEN.size].tobytes())
        if n > raw.size - _LEN.size:
            raise ValueError(f"training state: train/meta says {n} bytes, more than its {raw.size}")
        value = pickle.loads(raw[_LEN.size:_LEN.size + n].tobytes())
        self._apply_meta(value)
        for g, t in zip(self.generators, self._rng):
            g.set_state(t.clone())

    def _apply_meta(self, value: dict) -> None:
        opt = self.optimizer
        for g, saved in zip(opt.param_groups, value["groups"]):
            g.update(saved)
        by_index = {v: p for p, v in ((p, self._params[id(p)]) for g in opt.param_groups for p in g["params"])}
        for key, rest in value["state"].items():
            gi, pi = (int(x) for x in key.split("."))
            opt.state[by_index[(gi, pi)]].update(rest)
        if self.scheduler is not None and value["scheduler"] is not None:
            self.scheduler.load_state_dict(value["scheduler"])

    def tensors(self, capture: bool = True) -> dict:
        """``name -> tensor`` of the whole state (the live tensors: a sync writes them in place),
        after :meth:`capture` (``capture=False``: the caller did it). Names and shapes are the
        same on every peer made alike."""
        if capture:
            self.capture()
        out = self._collect()
        if sorted(out) != self._names:
            raise RuntimeError(f"training state: the optimizer's state changed names since it was made "
                               f"(now {sorted(set(out) ^ set(self._names))[:4]} differ); every peer must "
                               f"hold the same tensors")
        return out

    # ---- hashing ---------------------------------------------------------------------------
    def hashes(self) -> dict:
        """``name -> 64-bit hash`` (pycoll.core.hashing) of every tensor of the state."""
        state = self.tensors()
        names = sorted(state)
        return dict(zip(names, hash_arrays([state[n] for n in names])))

    def digest(self) -> int:
        """One 64-bit hash of the whole state (the per-step parity check): equal on two peers
        exactly when every tensor's bytes are equal (but for a hash collision)."""
        per = np.array(list(self.hashes().values()), dtype=np.uint64)
        return hash_arrays([per])[0]

    # ---- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """A checkpoint: model, optimizer, scheduler, step and generators, all copies (torch's
        optimizer.state_dict() hands out the live state tensors, which training goes on
        changing, and load_state_dict() keeps them: two optimizers would share them)."""
        return {"model": {k: v.clone() for k, v in self.model.state_dict().items()},
                "optimizer": copy.deepcopy(self.optimizer.state_dict()),
                "scheduler": copy.deepcopy(self.scheduler.state_dict()) if self.scheduler is not None else None,
                "step": self.step,
                "generators": [g.get_state().clone() for g in self.generators]}

    def load_state_dict(self, sd: dict) -> None:
        """Load a :meth:`state_dict` checkpoint (every peer the same one, or one peer alone and
        the next sync heals the others to the majority)."""
        with torch.no_grad():
            self.model.load_state_dict(sd["model"])
        self.optimizer.load_state_dict(copy.deepcopy(sd["optimizer"]))  # (see state_dict: no sharing)
        self.materialize()  # (a checkpoint taken before the first step has no optimizer state)
        if self.scheduler is not None and sd.get("scheduler") is not None:
            self.scheduler.load_state_dict(sd["scheduler"])
        self._step.fill_(int(sd["step"]))
        for g, s in zip(self.generators, sd.get("generators", [])):
            g.set_state(s.clone())
        self._names = sorted(self._collect())


def heal(state: TrainingState, comm, revision: int, *, timeout: Optional[float] = None, captured: bool = False,
         restore: bool = True):
    """Make ``state`` bit-identical on every member of ``comm`` (all call it at the same point):
    a peer behind (lower ``revision``: a joiner passes -1, members their step) or different
    receives the majority's bytes, striped over the peers that hold them and hash-checked on
    arrival (:mod:`pycoll.comm.shared_state`). Returns the SyncResult. ``captured``: the caller
    ran :meth:`TrainingState.capture` already; ``restore=False``: the caller applies what was
    received (:meth:`TrainingState.restore`) itself, when ``result.fetched``."""
    result = comm.sync_shared_state(state.tensors(capture=not captured), revision, timeout=timeout)
    if result.fetched and restore:
        state.restore()
    return result
