"""The ``"pycoll"`` backend for ``torch.distributed`` (CPU and CUDA tensors).

    import torch.distributed as dist
    import pycoll.torch.backend            # registers "pycoll" (automatic when pycoll is installed)
    dist.init_process_group("pycoll")      # env://: under torchrun or `pycoll run`
    model = torch.nn.parallel.DistributedDataParallel(model)

Registration. Importing this module registers the backend. An installed pycoll also declares an
entry point in torch's plugin group ``torch.backends``, which torch loads on ``import torch``, so
a script only changes the backend name (``TORCH_DEVICE_BACKEND_AUTOLOAD=0`` switches torch's
plugin loading off; then import this module yourself).

Rendezvous. Rank 0 of each process group starts a pycoll coordinator on a free port and publishes
``host:port`` in torch's store (the TCPStore of ``env://``); the others read it from there. So
``MASTER_PORT`` stays torch's, and the backend works the same under ``torchrun`` and ``pycoll run``
(which keeps its own coordinator on ``PYCOLL_MASTER_PORT``), and for groups from ``new_group``.

Collectives: ``all_reduce`` (ops SUM, PRODUCT, MIN, MAX, AVG, and BAND, BOR, BXOR on integer and
bool tensors), ``all_gather`` (a list of tensors), ``all_gather_single`` /
``all_gather_into_tensor``, ``reduce_scatter`` (a list of tensors), ``reduce_scatter_single`` /
``reduce_scatter_tensor``, ``broadcast``, ``barrier``, ``reduce``, ``gather``, ``scatter``,
``all_to_all`` and ``all_to_all_single`` (equal or uneven splits), each one C plan
(:mod:`pycoll.plan.exchange` for the one-step ones); the coalesced forms of all_reduce, all_gather,
all_gather_into_tensor and reduce_scatter_tensor (one pycoll call over the tensors of a dtype,
laid end to end); point-to-point ``send``/``recv`` with tags, ``isend``/``irecv`` and
``batch_isend_irecv`` (posted transfers run together, as one plan, when a work is waited on: see
:mod:`pycoll.comm.p2p`), and receive from any source. So FSDP2 (``fully_shard``),
DTensor and its functional collectives, DeviceMesh, the object collectives and
torch.distributed.checkpoint run on the backend. Dtypes: float16, bfloat16, float32, float64,
int8/16/32/64, uint8 (and uint16/32/64), bool (SUM and MAX are logical or, PRODUCT and MIN logical
and; results are 0 or 1, where Gloo adds the bytes). Anything else (other ops, dtypes, tensors on
devices other than CPU and CUDA) raises a ``ValueError`` that says what is supported, before
anything is sent.

Zero-copy. Tensors are handed to the C core by address: ``all_reduce``, ``broadcast``, the
``*_single`` / ``*_into_tensor`` forms and ``barrier`` never copy. The list forms copy only when
they must: ``all_gather`` into (``reduce_scatter`` from) a list whose tensors are not consecutive
slices of one buffer goes through one temporary buffer. Lists made with
``torch.empty(n * k).chunk(n)`` are consecutive and are not copied.

Staging (pycoll/torch/staging.py). What the C core cannot read in place goes through host copies:
a non-contiguous tensor through one temporary contiguous copy (as Gloo), a CUDA tensor through a
pinned host buffer from a pool reused across calls, copied on a side stream; a large all_reduce or
broadcast tensor in segments whose copies overlap the wire. Results are copied back, and the side
stream synchronized, before the Work completes. Sparse COO all_reduce (SUM) gathers every rank's
indices and values and sums them as Gloo does.

Async. With ``async_op=True`` (and for DDP) a call returns a ``torch.distributed.Work`` at once;
the collectives run one at a time, in call order, on pycoll's worker thread, with the GIL
released while bytes move. Blocking calls run on the calling thread (after any queued work).
``PYCOLL_TORCH_OVERLAP=n`` (n > 1) runs them on n lanes at once instead, each with connections of
its own, and keeps ordered what must be (calls that share bytes, barriers, blocking calls,
point-to-point): see :mod:`pycoll.torch.lanes`; off by default, as it did not pay on a 2-core host
(docs/overlap.md). ``wait()``
re-raises a failure; ``get_future()`` completes with the output tensors (DDP's hooks use it), or
with the failure as its error (its ``wait()``/``value()`` raise a RuntimeError that names it).
Future callbacks run on a completion thread of their own, so a callback may itself wait for
another collective (as PowerSGD's hook does).

A torch group. The group carries the name torch gives it (``pg.group_name``; torch finds groups by
name: ``destroy_process_group(pg)``, DeviceMesh, DTensor), and ``dist.get_backend(pg)`` is
``"pycoll"``. It stays a Python ``ProcessGroup`` subclass: torch's c10d ``Backend`` cannot be
subclassed from Python (no constructor, no trampoline), so there is no backend object for torch to
wrap, and ``pg._get_backend(device)`` has nothing to return (FSDP2's optional
"allocate comm buffers from the process group" mode needs it and is not supported).

Timeouts. A collective that misses its deadline raises :class:`pycoll.CollectiveTimeout` (a
RuntimeError; :class:`pycoll.CoordinatorError` when a peer never reached a sync point) whose text
starts ``"pycoll backend: Timed out waiting for <collective>"``, the words torch's tests match
(``" (Timed out|closed|timeout) "``); the group's timeout is the one given to
``init_process_group`` / ``new_group``.

Faults. pycoll re-forms a group over the survivors after a peer dies, but a torch process group
has a fixed rank and size: once a collective fails because a peer was lost (or the group re-formed
with other members), every later call on this process group raises ``pycoll.PeerFailure``. Create a
new process group, or use :class:`pycoll.Communicator` directly for elastic training.
"""
import atexit
import datetime
import functools
import logging
import queue
import threading
import time

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import WorkResult
from torch.distributed import ReduceOp

from pycoll import group as _group
from pycoll.control.coordinator import Coordinator
from pycoll.errors import CollectiveError, CollectiveTimeout, CoordinatorError, InvalidArgument, PeerFailure
from pycoll.comm.work import Work
from pycoll.options import environ
from pycoll.torch import lanes as lanes_mod
from pycoll.torch import staging

__all__ = ["BACKEND", "ProcessGroupPycoll", "register", "compression_hook", "communicator", "create_process_group"]

log = logging.getLogger("pycoll.torch")

#: The name to give ``init_process_group``.
BACKEND = "pycoll"

_STORE_KEY = "pycoll/coordinator"

_OPS = {
    ReduceOp.RedOpType.SUM: "sum",
    ReduceOp.RedOpType.PRODUCT: "prod",
    ReduceOp.RedOpType.MIN: "min",
    ReduceOp.RedOpType.MAX: "max",
    ReduceOp.RedOpType.AVG: "avg",
    ReduceOp.RedOpType.BAND: "band",
    ReduceOp.RedOpType.BOR: "bor",
    ReduceOp.RedOpType.BXOR: "bxor",
}

_DTYPES = {
    torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32",
    torch.float64: "float64", torch.int8: "int8", torch.int16: "int16", torch.int32: "int32",
    torch.int64: "int64", torch.uint8: "uint8", torch.bool: "bool",
}
for _name in ("uint16", "uint32", "uint64"):  # present in recent torch only
    if hasattr(torch, _name):
        _DTYPES[getattr(torch, _name)] = _name


def _op_name(op):
    """pycoll op name for a torch ReduceOp (or RedOpType); ValueError if unsupported."""
    kind = getattr(op, "op", op)
    name = _OPS.get(kind)
    if name is None:
        raise InvalidArgument(f"pycoll backend: reduce op {kind} is not supported; "
                              "use SUM, PRODUCT, MIN, MAX, AVG, BAND, BOR or BXOR")
    return name


def _check_tensor(t, what):
    """Reject what the C core cannot take in place, with a reason."""
    if not isinstance(t, torch.Tensor):
        raise InvalidArgument(f"pycoll backend: {what} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_cpu:  # (t.device would make a device object per tensor and call)
        raise InvalidArgument(f"pycoll backend: {what} is on {t.device}; only CPU and CUDA tensors are supported")
    if t.layout != torch.strided:
        raise InvalidArgument(f"pycoll backend: {what} has layout {t.layout}; only dense tensors are supported")
    if t.dtype not in _DTYPES:
        raise InvalidArgument(f"pycoll backend: {what} has dtype {t.dtype}; supported: "
                              + ", ".join(str(d).replace("torch.", "") for d in _DTYPES))
    if not t.is_contiguous():
        raise InvalidArgument(f"pycoll backend: {what} is not contiguous; pass t.contiguous() "
                              "(and copy the result back) or allocate it contiguous")
    return t


def _same_layout(tensors, like, what):
    for i, t in enumerate(tensors):
        _check_tensor(t, f"{what}[{i}]")
        if t.dtype != like.dtype or t.numel() != like.numel():
            raise InvalidArgument(f"pycoll backend: {what}[{i}] is {t.dtype} x {t.numel()}, "
                                  f"expected {like.dtype} x {like.numel()} like the input")


def _consecutive(tensors):
    """A flat tensor aliasing ``tensors`` (contiguous, of one dtype) if they lie end to end in
    one storage, in list order (equal sizes or not: no copy needed), else None."""
    first = tensors[0]
    at = first.data_ptr()
    count = 0
    for t in tensors:
        if t.data_ptr() != at:
            return None
        at += t.numel() * t.element_size()
        count += t.numel()
    # end to end and all inside the first one's storage: that storage's memory is theirs (one
    # storage object per call, not one per tensor: each costs a Python object), and a strided
    # view of the first one covers them (a third of the cost of empty().set_(storage))
    storage = first.untyped_storage()
    if at > storage.data_ptr() + storage.nbytes():
        return None
    return first.as_strided((count,), (1,))


def _copy_chunks(flat, outs, count):
    """Copy consecutive ``count``-element chunks of ``flat`` into ``outs``."""
    for i, o in enumerate(outs):
        o.view(-1).copy_(flat[i * count:(i + 1) * count])


def _sparse_sum(comm, tensors, timeout, world):
    """The world's sum of sparse COO ``tensors`` (one or more per rank), as Gloo computes it."""
    local = tensors[0]
    for t in tensors[1:]:
        local = local + t
    local = local.coalesce()
    sizes = list(local.shape)
    if len(sizes) > 16:  # the header below has room for 16
        raise InvalidArgument("pycoll backend: sparse all_reduce takes tensors of at most 16 dimensions")
    # every rank's header: sparse dims, dense dims, nnz, number of dims, the sizes
    head = torch.zeros(20, dtype=torch.int64)
    head[:4 + len(sizes)] = torch.tensor([local.sparse_dim(), local.dense_dim(), local.indices().shape[1],
                                          len(sizes)] + sizes)
    heads = torch.empty(world * 20, dtype=torch.int64)
    comm.all_gather(head, heads, timeout=timeout, dtype="int64")
    heads = heads.view(world, 20)
    if not bool((heads[:, [0, 1, 3]] == head[[0, 1, 3]]).all()) or not bool((heads[:, 4:] == head[4:]).all()):
        raise InvalidArgument("pycoll backend: sparse all_reduce inputs differ across ranks in shape or in "
                              f"sparse/dense dimensions (this rank: {sizes}, sparse_dim {local.sparse_dim()})")
    nnz = heads[:, 2].tolist()
    most = max(nnz)
    indices = torch.zeros(local.sparse_dim(), most, dtype=torch.int64)
    indices[:, :nnz[comm.rank]] = local.indices()
    dense = list(local.values().shape[1:])
    values = torch.zeros([most] + dense, dtype=local.dtype)
    values[:nnz[comm.rank]] = local.values()
    all_indices = torch.empty((world,) + tuple(indices.shape), dtype=torch.int64)
    all_values = torch.empty((world,) + tuple(values.shape), dtype=local.dtype)
    if indices.numel():  # (nothing to move when every rank's tensor is empty)
        comm.all_gather(indices.view(-1), all_indices.view(-1), timeout=timeout, dtype="int64")
    if values.numel():
        comm.all_gather(values.view(-1), all_values.view(-1), timeout=timeout, dtype=_DTYPES[local.dtype])
    out = None
    for r in range(world):
        part = torch.sparse_coo_tensor(all_indices[r][:, :nnz[r]], all_values[r][:nnz[r]], sizes, dtype=local.dtype)
        out = part if out is None else out + part
    return out.coalesce()


def _timeout_s(opts, default):
    t = getattr(opts, "timeout", None)
    if isinstance(t, datetime.timedelta) and t.total_seconds() > 0:
        return t.total_seconds()
    return default


class _Completer:
    """Completes torch futures off pycoll's worker thread, so that a future
    callback may wait for another collective without blocking the worker."""

    def __init__(self):
        self._queue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="pycoll-torch-futures", daemon=True)
        self._thread.start()

    def on_thread(self):
        return threading.current_thread() is self._thread

    def submit(self, fn):
        with self._lock:
            if not self._stopped:
                self._queue.put(fn)
                return
        _run_completion(fn)  # stopped: nobody reads the queue any more; complete here

    def stop(self, timeout=10.0):
        """Finish the queued completions and end the thread (joined, so no
        daemon thread touches torch objects while the interpreter exits)."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            self._queue.put(None)
        if not self.on_thread():
            self._thread.join(timeout)

    def _loop(self):
        while True:
            fn = self._queue.get()
            if fn is None:
                return
            _run_completion(fn)
            del fn  # drop the work now, not when the next one arrives


def _run_completion(fn):
    try:
        fn()
    except Exception:  # noqa: BLE001 - a callback's error belongs to its future
        log.exception("completing a torch future failed")


def _torch_timeout(exc, what):
    """A timeout in the words torch's own backends use: torch's tests (and code that
    follows them) match ``" (Timed out|closed|timeout) "``, and pycoll's text says "timed
    out" (a collective's deadline) or "no answer ... within" (a sync with the coordinator
    that a peer never reached). Same type (:class:`pycoll.CollectiveTimeout`, a
    RuntimeError and TimeoutError; or :class:`pycoll.CoordinatorError`), status and peer;
    the original stays in the text and as the cause."""
    timed_out = isinstance(exc, CollectiveTimeout) or getattr(exc, "timed_out", False)
    if not timed_out or str(exc).startswith(_TIMED_OUT):
        return exc
    msg = f"{_TIMED_OUT}waiting for {what}: {exc}"
    if isinstance(exc, CoordinatorError):
        new = CoordinatorError(msg, exc.status, exc.peer, evicted=exc.evicted)
        new.timed_out = True
    elif isinstance(exc, CollectiveError):
        new = CollectiveTimeout(msg, exc.status, exc.peer)
    else:
        return exc
    new.__cause__ = exc
    return new


_TIMED_OUT = "pycoll backend: Timed out "


def _future_value(box):
    """The value of a Work's torch future: its output tensors, or (raised, so
    that torch stores it as the future's error) the collective's failure."""
    def value(_):
        exc, outputs = box
        if exc is not None:
            raise exc
        return outputs
    return value


class _Work(dist.Work):
    """A torch Work over one or more queued pycoll collectives (none: ``failure`` says how the
    calls, already run on the caller's thread, ended)."""

    def __init__(self, state, pworks, outputs, post=None, what="", inline=False, failure=None):
        super().__init__()
        self._state = state
        self._outputs = outputs
        self._post = post
        self._what = what
        self._exc = None
        self._finished = False
        # The future torch sees (get_future(): DDP's reducer reads it from C++) must be
        # completed with an *error* on failure. torch.futures.Future.set_exception does
        # not do that: it stores the exception as the future's value (only Python's
        # wait()/value() raise it), and C++ readers take that value for the output
        # tensors (DDP: SIGSEGV in parseCppCommHookResult). A `then` callback that
        # raises is torch's one way to set a real error from Python, so the future
        # handed out is the child of a trigger that _complete_future fires. Made on the
        # first get_future() only: most works (every blocking call) are just waited on,
        # and a torch future and its `then` cost more than the rest of a small call.
        self._box = [None, outputs]  # (failure, outputs), read by the callback
        self._trigger = self._future = None
        # Works issued from a future callback complete on the worker itself
        # (the completion thread is busy running that callback).
        # (and those of a blocking call, done by now: its caller waits for nothing else, and
        # waking the completion thread per call costs a GIL hand-off, ~0.1 ms on a busy host)
        self._inline = inline or state.completer.on_thread()
        self._lock = threading.Lock()
        # made by the first wait() that finds the work unfinished (most never do: a blocking
        # call finished here, a point-to-point transfer ran in its own wait)
        self._done = None
        if pworks is None:  # completed by whoever runs it (see _P2PWork)
            return
        if not pworks:
            self._finish(failure)
            return
        self._left = len(pworks)
        for w in pworks:
            w.add_done_callback(self._one_done)

    @property
    def done_event(self):
        """A threading.Event set once the work completed (results copied back), failed or not."""
        with self._lock:  # made on demand, like wait()'s: set here if the work finished already
            if self._done is None:
                self._done = threading.Event()
                if self._finished:
                    self._done.set()
            return self._done

    def _one_done(self, pwork):
        with self._lock:
            if self._exc is None and pwork.exception() is not None:
                self._exc = pwork.exception()
            self._left -= 1
            last = self._left == 0
        if last:
            self._finish(self._exc)

    def _finish(self, exc):
        try:
            exc = _torch_timeout(exc, self._what)
            if exc is None:
                exc = self._state.check_membership(self._what)
            if exc is None and self._post is not None:
                try:
                    self._post()
                except Exception as e:  # noqa: BLE001 - reported through wait()/the future
                    exc = e
            if exc is not None:
                self._state.record_failure(exc)
        except Exception as e:  # noqa: BLE001 - never leave the work (and its future) pending
            exc = exc or e
        finally:
            self._exc = exc
            self._box[0] = exc
            with self._lock:
                self._finished = True
                has_future = self._future is not None
                done = self._done
            if done is not None:
                done.set()
            if has_future:
                if self._inline:
                    _run_completion(self._complete_future)
                else:
                    self._state.completer.submit(self._complete_future)

    def _complete_future(self):
        # runs _future_value: the future gets the outputs, or the failure as its error
        self._trigger.set_result(None)

    def wait(self, timeout=None):
        """Block until the collective finished; re-raise its failure."""
        secs = timeout.total_seconds() if isinstance(timeout, datetime.timedelta) else timeout
        if secs is not None and secs <= 0:
            secs = None  # torch's "unset" timeout
        if not self._finished:
            with self._lock:
                if not self._finished and self._done is None:
                    self._done = threading.Event()
                done = self._done
            if done is not None and not done.wait(secs):
                raise CollectiveTimeout(f"{_TIMED_OUT}waiting {secs} s for {self._what} to finish")
        if self._exc is not None:
            raise self._exc
        return True

    def get_future(self):
        """A torch Future completed with the output tensors (made on the first call; if the
        work finished already, completed here)."""
        with self._lock:
            if self._future is None:
                self._trigger = torch.futures.Future()
                self._future = self._trigger.then(_future_value(self._box))
                if self._finished:
                    _run_completion(self._complete_future)
            return self._future

    def get_future_result(self):
        """A torch Future completed with the outcome as an int ``WorkResult``: SUCCESS, TIMEOUT
        (the collective or a sync point timed out) or COMM_ERROR (any other failure)."""
        return self.get_future().then(self._work_result)

    def _work_result(self, _):
        exc = self._exc
        if exc is None:
            return int(WorkResult.SUCCESS)
        if isinstance(exc, TimeoutError) or getattr(exc, "timed_out", False):
            return int(WorkResult.TIMEOUT)
        return int(WorkResult.COMM_ERROR)

    def block_current_stream(self):
        """Results are on the host (CUDA ones copied back, side stream synchronized) when the
        work completes, so blocking the caller's stream is waiting for the work."""
        self.wait()

    def is_completed(self):
        return self._finished

    def is_success(self):
        return self._finished and self._exc is None

    def exception(self):
        return self._exc

    def result(self):
        return self._outputs

    def source_rank(self):
        raise RuntimeError("pycoll backend: source_rank() is only defined for recv from any source")

    def synchronize(self):
        pass  # CPU only: nothing to synchronize with a stream


class _P2PWork(_Work):
    """The torch Work of one posted point-to-point transfer: waiting on it first runs the
    posted transfers (pycoll.comm.p2p), so that every rank can post in any order and then wait.
    It is itself the transfer's completion (:meth:`pycoll.Communicator.post_transfer`), so a
    transfer costs no pycoll Work and future besides it."""

    def __init__(self, state, outputs, what, flush, peer, post=None):
        # completed on the thread that runs the posted transfers (the caller of wait(), or of
        # the next call), never pycoll's worker: no hand-off to the completion thread
        super().__init__(state, None, outputs, post, what=what, inline=True)
        self._flush = flush
        # how pycoll's errors name the transfer (as the Work of Communicator.isend / irecv)
        self.description = (f"{what} {'to' if what == 'send' else 'from'} rank {peer}" if peer is not None
                            else f"{what} from any source")
        self.source = -1 if peer is None else peer  # set once a receive from any source ran

    def complete(self, result=None, exc=None):
        """The transfer ran (post_transfer's completion)."""
        self._finish(exc)

    def wait(self, timeout=None):
        self._flush()
        return super().wait(timeout)

    def source_rank(self):
        """The sender's rank (for a receive from any source: once it completed)."""
        return self.source

    _source_rank = source_rank


def _drain_then(lanes, what, flush):
    lanes.drain(what)
    flush()


def _by_dtype_index(tensors):
    """Indices of ``tensors`` grouped by dtype, groups in order of first appearance."""
    groups = {}
    for i, t in enumerate(tensors):
        groups.setdefault(t.dtype, []).append(i)
    return list(groups.values())


def _by_dtype(tensors):
    return [[tensors[i] for i in idx] for idx in _by_dtype_index(tensors)]


def _split_counts(t, split_sizes, n, what):
    """Elements per block of all_to_all_single's ``t``: equal blocks (no sizes), or rows of
    its first dimension."""
    if not split_sizes:
        return None
    if len(split_sizes) != n or t.dim() == 0:
        raise InvalidArgument(f"pycoll backend: all_to_all_single {what}_split_sizes must have {n} entries")
    row = t.numel() // t.size(0) if t.size(0) else 0
    return [int(s) * row for s in split_sizes]


class _GroupState:
    """What works need from their process group. Works keep this plain object,
    never the torch ProcessGroup itself: a pybind ProcessGroup freed on a
    background thread while the interpreter exits aborts the process."""

    def __init__(self, comm, rank, size):
        self.comm = comm
        self.rank = rank
        self.size = size
        self.completer = _Completer()
        self.failure = None
        self.closed = False
        self.lanes = None  # pycoll.torch.lanes.Lanes with PYCOLL_TORCH_OVERLAP > 1

    def usable(self):
        if self.closed:
            raise CollectiveError("pycoll backend: the process group was shut down")
        if self.failure is not None:
            raise PeerFailure("pycoll backend: this process group is unusable since a collective failed "
                              f"({self.failure}); torch process groups have a fixed size: create a new "
                              "one, or use pycoll.Communicator for elastic training")

    def check_membership(self, what):
        comm = self.comm
        if comm.world_size != self.size or comm.rank != self.rank:
            return PeerFailure(f"pycoll backend: {what} ran after the group re-formed (now rank {comm.rank} "
                               f"of {comm.world_size}, process group has rank {self.rank} of {self.size})")
        return None

    def record_failure(self, exc):
        if isinstance(exc, InvalidArgument):
            return  # nothing was sent: the group is intact
        if isinstance(exc, (PeerFailure, CoordinatorError)) or self.check_membership("") is not None:
            if self.failure is None:
                self.failure = exc
                log.warning("pycoll process group rank %d: %s", self.rank, exc)

    def close(self):
        if self.closed:
            return
        self.closed = True
        try:
            self.comm.close()
        finally:
            if self.lanes is not None:  # (after close: a lane inside a call fails at once)
                self.lanes.shutdown(timeout=10.0)
            self.completer.stop()


class ProcessGroupPycoll(dist.ProcessGroup):
    """A torch process group whose collectives run on a :class:`pycoll.Communicator`.

    Made by ``dist.init_process_group("pycoll")``; the communicator is
    :attr:`communicator` (for its ``stats``).
    """

    def __init__(self, comm, rank, size, timeout_s, lanes=1):
        """``lanes`` > 1: async collectives on that many lanes (pycoll.torch.lanes); ``comm`` must
        then have been made with their tags (``lanes.lane_tag(i)``, i = 1 .. lanes - 1)."""
        super().__init__(rank, size)
        self.communicator = comm
        self._timeout_s = timeout_s
        self._state = _GroupState(comm, rank, size)
        self._group_name = ""
        self._group_desc = ""
        # PYCOLL_TORCH_OVERLAP lanes for async collectives (pycoll.torch.lanes); None: one, the
        # communicator's worker thread, in call order
        self._lanes = self._state.lanes = (lanes_mod.Lanes(lanes, timeout_s, self._state.usable)
                                           if lanes > 1 else None)
        _LIVE.add(self._state)

    def _run(self, what, calls, outputs, post=None, opts=None, tagged=False, reads=(), barrier=False):
        """``calls``: functions of ``async_op`` that start one pycoll collective each (``tagged``:
        of ``(async_op, tag=None)``, the tag of a lane, see :mod:`pycoll.torch.lanes`);
        ``reads``: tensors they read besides ``outputs`` (with lanes, a call waits for the calls
        in flight that touch the same bytes; a ``barrier`` for all of them)."""
        self._state.usable()
        staged = _staged_call()
        if staged:
            outputs, post = staged.outputs(outputs), _then(post, staged.finish)
            staged.calls(len(calls))
        blocking = opts is not None and not getattr(opts, "asyncOp", True)
        lanes = self._lanes
        if lanes is not None and not blocking:
            touched = lanes_mod.spans(outputs, reads)
            pworks = []
            for k, call in enumerate(calls):
                staged and staged.before_call(k)
                pworks.extend(lanes.submit([call], tagged, touched, what, barrier))
                staged and staged.after_call(k, pworks[-1])
            work = _Work(self._state, pworks, outputs, post, what)
            lanes.track(touched, work.done_event)
            return work
        if lanes is not None:
            lanes.drain(what)  # the untagged connections carry one call at a time, in one order
        if blocking and not staged:
            # The caller waits at once: run on this thread (no hand-off to the worker);
            # pycoll still runs it after any queued async work.
            failure = None
            for call in calls:
                try:
                    call(False)
                except InvalidArgument:
                    raise  # bad arguments: raise here, as the async path does
                except Exception as exc:  # noqa: BLE001 - reported through wait()
                    failure = failure or exc
            return _Work(self._state, [], outputs, post, what, inline=True, failure=failure)
        pworks = []
        for k, call in enumerate(calls):
            staged and staged.before_call(k)
            if blocking:  # as above, with a Work per call for the staging's copy-back callbacks
                w = Work(what)
                try:
                    call(False)
                    w.complete(None)
                except InvalidArgument:
                    raise
                except Exception as exc:  # noqa: BLE001 - reported through wait()
                    w.complete(None, exc)
            else:
                w = call(True)
            staged and staged.after_call(k, w)
            pworks.append(w)
        return _Work(self._state, pworks, outputs, post, what, inline=blocking)

    # ---- collectives ---------------------------------------------------
    def allreduce(self, tensors, opts=None):
        """``dist.all_reduce``: reduce each tensor in place."""
        if any(isinstance(t, torch.Tensor) and t.layout == torch.sparse_coo for t in tensors):
            return self._allreduce_sparse(tensors, opts)
        op = _op_name(opts.reduceOp if opts is not None else ReduceOp.SUM)
        timeout = _timeout_s(opts, self._timeout_s)
        for i, t in enumerate(tensors):
            _check_tensor(t, f"all_reduce tensor[{i}]")
        comm = self.communicator
        calls = [lambda a, tag=None, t=t: comm.all_reduce(t, op=op, timeout=timeout, dtype=_DTYPES[t.dtype],
                                                          async_op=a, tag=tag)
                 for t in tensors]
        return self._run("all_reduce", calls, list(tensors), opts=opts, tagged=True)

    def allgather(self, output_tensors, input_tensors, opts=None):
        """``dist.all_gather``: a list of world_size tensors per input."""
        if len(input_tensors) != 1 or len(output_tensors) != 1:
            raise InvalidArgument("pycoll backend: all_gather takes exactly one input tensor")
        inp = _check_tensor(input_tensors[0], "all_gather input")
        outs = output_tensors[0]
        if len(outs) != self.size():
            raise InvalidArgument(f"pycoll backend: all_gather needs {self.size()} output tensors, got {len(outs)}")
        _same_layout(outs, inp, "all_gather output")
        flat = _consecutive(outs)
        if flat is None:  # separate tensors: rank r's block lands in outs[r] (Communicator.all_gather)
            comm, timeout = self.communicator, _timeout_s(opts, self._timeout_s)
            call = lambda a: comm.all_gather(inp, list(outs), timeout=timeout,  # noqa: E731
                                             dtype=_DTYPES[inp.dtype], async_op=a)
            return self._run("all_gather", [call], output_tensors, opts=opts, reads=[inp])
        return self._gather(inp, flat, opts, output_tensors)

    def all_gather_single(self, output, input, opts=None):
        """``dist.all_gather_single`` / ``all_gather_into_tensor``."""
        self._check_gather_single(output, input)
        return self._gather(input, output, opts, [output])

    _allgather_base = all_gather_single

    def all_gather_single_coalesced(self, outputs, inputs, opts=None):
        """``all_gather_into_tensor`` of several tensors in one work (FSDP2; DTensor's
        functional collectives reach every all_gather_into_tensor through this): ONE pycoll
        call (:meth:`pycoll.Communicator.all_gather_coalesced`) when they share a dtype."""
        if len(outputs) != len(inputs):
            raise InvalidArgument(f"pycoll backend: all_gather_into_tensor_coalesced got {len(outputs)} "
                                  f"outputs for {len(inputs)} inputs")
        for out, inp in zip(outputs, inputs):
            self._check_gather_single(out, inp)
        comm, timeout = self.communicator, _timeout_s(opts, self._timeout_s)
        calls = [lambda a, ins=[inputs[i] for i in idx], outs=[outputs[i] for i in idx]: comm.all_gather_coalesced(
            ins, outs, timeout=timeout, dtype=_DTYPES[ins[0].dtype], async_op=a)
            for idx in _by_dtype_index(inputs)]
        return self._run("all_gather", calls, list(outputs), opts=opts, reads=inputs)

    allgather_into_tensor_coalesced = all_gather_single_coalesced  # torch's older name

    def _check_gather_single(self, output, input):
        _check_tensor(input, "all_gather input")
        _check_tensor(output, "all_gather output")
        if output.dtype != input.dtype or output.numel() != input.numel() * self.size():
            raise InvalidArgument(f"pycoll backend: all_gather output must be {input.dtype} x "
                                  f"{input.numel() * self.size()} (world size x input), got "
                                  f"{output.dtype} x {output.numel()}")

    def _gather(self, inp, flat, opts, outputs, post=None):
        comm, timeout = self.communicator, _timeout_s(opts, self._timeout_s)
        call = lambda a, tag=None: comm.all_gather(inp, flat, timeout=timeout,  # noqa: E731
                                                   dtype=_DTYPES[inp.dtype], async_op=a, tag=tag)
        return self._run("all_gather", [call], outputs, post, opts, tagged=True, reads=[inp, flat])

    def reduce_scatter(self, output_tensors, input_tensors, opts=None):
        """``dist.reduce_scatter``: a list of world_size input tensors."""
        if len(input_tensors) != 1 or len(output_tensors) != 1:
            raise InvalidArgument("pycoll backend: reduce_scatter takes exactly one output tensor")
        out = _check_tensor(output_tensors[0], "reduce_scatter output")
        ins = input_tensors[0]
        if len(ins) != self.size():
            raise InvalidArgument(f"pycoll backend: reduce_scatter needs {self.size()} input tensors, "
                                  f"got {len(ins)}")
        _same_layout(ins, out, "reduce_scatter input")
        flat = _consecutive(ins)
        if flat is None:  # one copy in: the C core reads a single buffer
            flat = torch.cat([t.reshape(-1) for t in ins])
        return self._scatter(out, flat, opts, [out])

    def reduce_scatter_single(self, output, input, opts=None):
        """``dist.reduce_scatter_single`` / ``reduce_scatter_tensor``."""
        self._check_scatter_single(output, input)
        return self._scatter(output, input, opts, [output])

    _reduce_scatter_base = reduce_scatter_single

    def reduce_scatter_single_coalesced(self, outputs, inputs, opts=None):
        """``reduce_scatter_tensor`` of several tensors in one work (DTensor's functional
        collectives reach every reduce_scatter_tensor through this): ONE pycoll call
        (:meth:`pycoll.Communicator.reduce_scatter_coalesced`) when they share a dtype."""
        if len(outputs) != len(inputs):
            raise InvalidArgument(f"pycoll backend: reduce_scatter_tensor_coalesced got {len(outputs)} "
                                  f"outputs for {len(inputs)} inputs")
        for out, inp in zip(outputs, inputs):
            self._check_scatter_single(out, inp)
        op = _op_name(opts.reduceOp if opts is not None else ReduceOp.SUM)
        comm, timeout = self.communicator, _timeout_s(opts, self._timeout_s)
        calls = [lambda a, ins=[inputs[i] for i in idx], outs=[outputs[i] for i in idx]:
                 comm.reduce_scatter_coalesced(ins, outs, op=op, timeout=timeout, dtype=_DTYPES[ins[0].dtype],
                                               async_op=a)
                 for idx in _by_dtype_index(inputs)]
        return self._run("reduce_scatter", calls, list(outputs), opts=opts, reads=inputs)

    reduce_scatter_tensor_coalesced = reduce_scatter_single_coalesced  # torch's older name

    def _check_scatter_single(self, output, input):
        _check_tensor(input, "reduce_scatter input")
        _check_tensor(output, "reduce_scatter output")
        if output.dtype != input.dtype or input.numel() != output.numel() * self.size():
            raise InvalidArgument(f"pycoll backend: reduce_scatter input must be {output.dtype} x "
                                  f"{output.numel() * self.size()} (world size x output), got "
                                  f"{input.dtype} x {input.numel()}")

    def _scatter(self, out, flat, opts, outputs):
        op = _op_name(opts.reduceOp if opts is not None else ReduceOp.SUM)
        comm, timeout = self.communicator, _timeout_s(opts, self._timeout_s)
        call = lambda a, tag=None: comm.reduce_scatter(flat, out, op=op, timeout=timeout,  # noqa: E731
                                                       dtype=_DTYPES[out.dtype], async_op=a, tag=tag)
        return self._run("reduce_scatter", [call], outputs, opts=opts, tagged=True, reads=[flat])

    def broadcast(self, tensors, opts=None):
        """``dist.broadcast``: root's tensor into every rank's, in place."""
        root = opts.rootRank if opts is not None else 0
        if opts is not None and opts.rootTensor != 0:
            raise InvalidArgument("pycoll backend: broadcast takes one tensor per rank (rootTensor 0)")
        if not 0 <= root < self.size():
            raise InvalidArgument(f"pycoll backend: broadcast root {root} is not in [0, {self.size()})")
        for i, t in enumerate(tensors):
            _check_tensor(t, f"broadcast tensor[{i}]")
        comm, timeout = self.communicator, _timeout_s(opts, self._timeout_s)
        calls = [lambda a, tag=None, t=t: comm.broadcast(t, root=root, timeout=timeout, dtype=_DTYPES[t.dtype],
                                                         async_op=a, tag=tag)
                 for t in tensors]
        return self._run("broadcast", calls, list(tensors), opts=opts, tagged=True)

    def allreduce_coalesced(self, tensors, opts=None):
        """``dist.all_reduce_coalesced`` (and DTensor's ``all_reduce_coalesced``): each
        tensor reduced in place, all of one dtype in ONE pycoll call
        (:meth:`pycoll.Communicator.all_reduce_coalesced`: one plan over them laid end to end)."""
        op = _op_name(opts.reduceOp if opts is not None else ReduceOp.SUM)
        for i, t in enumerate(tensors):
            _check_tensor(t, f"all_reduce_coalesced tensor[{i}]")
        comm, timeout = self.communicator, _timeout_s(opts, self._timeout_s)
        calls = [lambda a, ts=ts: comm.all_reduce_coalesced(ts, op=op, timeout=timeout, dtype=_DTYPES[ts[0].dtype],
                                                            async_op=a)
                 for ts in _by_dtype(tensors)]
        return self._run("all_reduce", calls, list(tensors), opts=opts)

    def barrier(self, opts=None):
        """``dist.barrier``."""
        comm, timeout = self.communicator, _timeout_s(opts, self._timeout_s)
        return self._run("barrier", [lambda a, tag=None: comm.barrier(timeout=timeout, async_op=a, tag=tag)], [],
                         opts=opts, tagged=True, barrier=True)

    # ---- rooted collectives and all_to_all: one-step C plans (pycoll.plan.exchange) -----
    def reduce(self, tensors, opts=None):
        """``dist.reduce``: every rank's tensor reduced into the root's, in place there (the
        others' tensors are only read); :meth:`pycoll.Communicator.reduce`."""
        root = self._root(opts, "reduce")
        if len(tensors) != 1 or (opts is not None and opts.rootTensor != 0):
            raise InvalidArgument("pycoll backend: reduce takes exactly one tensor per rank")
        t = _check_tensor(tensors[0], "reduce tensor")
        op = _op_name(opts.reduceOp if opts is not None else ReduceOp.SUM)
        comm, timeout = self.communicator, _timeout_s(opts, self._timeout_s)
        call = lambda a: comm.reduce(t, root=root, op=op, timeout=timeout, dtype=_DTYPES[t.dtype],  # noqa: E731
                                     async_op=a)
        return self._run("reduce", [call], [t], opts=opts)

    def gather(self, output_tensors, input_tensors, opts=None):
        """``dist.gather``: every rank's tensor into the root's list
        (:meth:`pycoll.Communicator.gather`: each rank sends straight to the root)."""
        root = self._root(opts, "gather")
        if len(input_tensors) != 1:
            raise InvalidArgument("pycoll backend: gather takes exactly one input tensor")
        inp = _check_tensor(input_tensors[0], "gather input")
        outs = None
        if self.rank() == root:
            if len(output_tensors) != 1 or len(output_tensors[0]) != self.size():
                raise InvalidArgument(f"pycoll backend: gather needs a list of {self.size()} output tensors "
                                      "on the root")
            outs = output_tensors[0]
            _same_layout(outs, inp, "gather output")
        elif output_tensors and any(len(o) for o in output_tensors):
            raise InvalidArgument("pycoll backend: gather takes output tensors only on the root")
        flat, post = None, None
        if outs is not None:
            flat = _consecutive(outs)
            if flat is None:  # separate tensors: gather into one buffer, then copy out
                flat = torch.empty(inp.numel() * self.size(), dtype=inp.dtype)
                post = functools.partial(_copy_chunks, flat, outs, inp.numel())
        comm, timeout = self.communicator, _timeout_s(opts, self._timeout_s)
        call = lambda a: comm.gather(inp, flat, root=root, timeout=timeout, dtype=_DTYPES[inp.dtype],  # noqa: E731
                                     async_op=a)
        return self._run("gather", [call], list(outs or []), post, opts, reads=[inp, flat])

    def scatter(self, output_tensors, input_tensors, opts=None):
        """``dist.scatter``: the root's list, one tensor to each rank
        (:meth:`pycoll.Communicator.scatter`: the root sends each its part)."""
        root = self._root(opts, "scatter")
        if len(output_tensors) != 1:
            raise InvalidArgument("pycoll backend: scatter takes exactly one output tensor")
        out = _check_tensor(output_tensors[0], "scatter output")
        flat = None
        if self.rank() == root:
            if len(input_tensors) != 1 or len(input_tensors[0]) != self.size():
                raise InvalidArgument(f"pycoll backend: scatter needs a list of {self.size()} input tensors on "
                                      "the root")
            ins = input_tensors[0]
            _same_layout(ins, out, "scatter input")
            flat = _consecutive(ins)
            if flat is None:  # one copy in: the C core reads a single buffer
                flat = torch.cat([t.reshape(-1) for t in ins])
        elif input_tensors and any(len(i) for i in input_tensors):
            raise InvalidArgument("pycoll backend: scatter takes input tensors only on the root")
        comm, timeout = self.communicator, _timeout_s(opts, self._timeout_s)
        call = lambda a: comm.scatter(flat, out, root=root, timeout=timeout, dtype=_DTYPES[out.dtype],  # noqa: E731
                                      async_op=a)
        return self._run("scatter", [call], [out], None, opts, reads=[flat])

    def alltoall(self, output_tensors, input_tensors, opts=None):
        """``dist.all_to_all``: input i to rank i, rank i's into output i (sizes may differ per
        rank); one pycoll all_to_all over the tensors laid end to end (one copy in unless the
        inputs are consecutive slices of one buffer, one copy out unless the outputs are)."""
        n = self.size()
        if len(output_tensors) != n or len(input_tensors) != n:
            raise InvalidArgument(f"pycoll backend: all_to_all needs {n} input and {n} output tensors, got "
                                  f"{len(input_tensors)} and {len(output_tensors)}")
        for i, t in enumerate(input_tensors):
            _check_tensor(t, f"all_to_all input[{i}]")
        for i, t in enumerate(output_tensors):
            _check_tensor(t, f"all_to_all output[{i}]")
            if t.dtype != input_tensors[0].dtype or input_tensors[i].dtype != input_tensors[0].dtype:
                raise InvalidArgument("pycoll backend: all_to_all tensors must share one dtype")
        send_counts = [t.numel() for t in input_tensors]
        recv_counts = [t.numel() for t in output_tensors]
        flat_in = _consecutive(input_tensors)
        if flat_in is None:
            flat_in = torch.cat([t.reshape(-1) for t in input_tensors])
        flat_out, post = _consecutive(output_tensors), None
        if flat_out is None or flat_out.untyped_storage().data_ptr() == flat_in.untyped_storage().data_ptr():
            # separate tensors (or outputs in the inputs' storage, which the plan would overwrite
            # while it reads): receive into one buffer, then copy out
            flat_out = torch.empty(sum(recv_counts), dtype=flat_in.dtype)

            def post():
                at = 0
                for o, c in zip(output_tensors, recv_counts):
                    o.view(-1).copy_(flat_out[at:at + c])
                    at += c
        comm, timeout = self.communicator, _timeout_s(opts, self._timeout_s)
        call = lambda a: comm.all_to_all(flat_in, flat_out, send_counts, recv_counts,  # noqa: E731
                                         timeout=timeout, dtype=_DTYPES[flat_in.dtype], async_op=a)
        return self._run("all_to_all", [call], list(output_tensors), post, opts, reads=[input_tensors, flat_out])

    def alltoall_base(self, output, input, output_split_sizes, input_split_sizes, opts=None):
        """``dist.all_to_all_single``: equal blocks of ``input``, or rows of its first
        dimension per ``input_split_sizes`` / ``output_split_sizes``; one C plan, in place in
        both tensors (:meth:`pycoll.Communicator.all_to_all`)."""
        _check_tensor(input, "all_to_all_single input")
        _check_tensor(output, "all_to_all_single output")
        if input.dtype != output.dtype:
            raise InvalidArgument(f"pycoll backend: all_to_all_single input is {input.dtype}, output {output.dtype}")
        send_counts = _split_counts(input, input_split_sizes, self.size(), "input")
        recv_counts = _split_counts(output, output_split_sizes, self.size(), "output")
        comm, timeout = self.communicator, _timeout_s(opts, self._timeout_s)
        call = lambda a: comm.all_to_all(input, output, send_counts, recv_counts, timeout=timeout,  # noqa: E731
                                         dtype=_DTYPES[input.dtype], async_op=a)
        return self._run("all_to_all", [call], [output], None, opts, reads=[input])

    all_to_all_single = alltoall_base

    def allgather_coalesced(self, output_lists, input_tensors, opts=None):
        """``dist.all_gather_coalesced``: ``output_lists[r][i]`` receives rank r's
        ``input_tensors[i]``; ONE pycoll all_gather per dtype
        (:meth:`pycoll.Communicator.all_gather_coalesced`), then a local copy out."""
        n = self.size()
        if len(output_lists) != n or any(len(o) != len(input_tensors) for o in output_lists):
            raise InvalidArgument(f"pycoll backend: all_gather_coalesced needs {n} output lists of "
                                  f"{len(input_tensors)} tensors")
        for i, t in enumerate(input_tensors):
            _check_tensor(t, f"all_gather_coalesced input[{i}]")
            _same_layout([o[i] for o in output_lists], t, f"all_gather_coalesced output[.][{i}]")
        flats = [torch.empty(n * t.numel(), dtype=t.dtype) for t in input_tensors]

        def post():
            for i, (t, flat) in enumerate(zip(input_tensors, flats)):
                _copy_chunks(flat, [o[i] for o in output_lists], t.numel())
        comm, timeout = self.communicator, _timeout_s(opts, self._timeout_s)
        calls = [lambda a, idx=idx: comm.all_gather_coalesced([input_tensors[i] for i in idx], [flats[i] for i in idx],
                                                               timeout=timeout, dtype=_DTYPES[input_tensors[idx[0]].dtype],
                                                               async_op=a)
                 for idx in _by_dtype_index(input_tensors)]
        return self._run("all_gather", calls, [t for o in output_lists for t in o], post, opts,
                         reads=[input_tensors, flats])

    # ---- point-to-point (pycoll.comm.p2p) --------------------------------------
    def send(self, tensors, dstRank, tag=0):  # noqa: N803 - torch's argument names
        """``dist.send`` / ``isend`` (and ``batch_isend_irecv``): posts the transfer; it runs,
        with every other posted one, as one plan when a work is waited on (see
        :meth:`pycoll.Communicator.isend`)."""
        return self._p2p(tensors, dstRank, tag, True)

    def recv(self, tensors, srcRank, tag=0):  # noqa: N803
        """``dist.recv`` / ``irecv`` from ``srcRank`` (see :meth:`send`)."""
        return self._p2p(tensors, srcRank, tag, False)

    def recv_anysource(self, tensors, tag=0):
        """``dist.recv`` / ``irecv`` without a source: the first rank whose frame reaches us
        (``work._source_rank()`` names it; see :meth:`pycoll.Communicator.irecv`)."""
        return self._p2p(tensors, None, tag, False)

    def _p2p(self, tensors, peer, tag, is_send):
        self._state.usable()
        what = "send" if is_send else "recv"
        if len(tensors) != 1:
            raise InvalidArgument(f"pycoll backend: {what} takes exactly one tensor")
        t = _check_tensor(tensors[0], f"{what} tensor")
        comm, flush = self.communicator, self.communicator.flush_p2p
        if self._lanes is not None:
            # transfers run on the untagged connections: after every collective in flight, on every rank
            self._lanes.drain(what)
            flush = functools.partial(_drain_then, self._lanes, what, flush)
        outputs, post = [t], None
        staged = _staged_call()  # a device or non-contiguous tensor: copied back (recv), buffer released
        if staged:
            outputs, post = staged.outputs(outputs), staged.finish
        work = _P2PWork(self._state, outputs, what, flush, peer, post)
        comm.post_transfer(is_send, t, peer, tag, work)
        return work

    def _root(self, opts, what):
        root = opts.rootRank if opts is not None else 0
        if not 0 <= root < self.size():
            raise InvalidArgument(f"pycoll backend: {what} root {root} is not in [0, {self.size()})")
        return root

    # ---- sparse all_reduce ------------------------------------------------
    def _allreduce_sparse(self, tensors, opts):
        """all_reduce of sparse COO tensors (SUM), as Gloo does it: the inputs are summed and
        coalesced, every rank's indices and values are all-gathered (first the sizes, then both
        padded to the largest nnz), each rank adds the world's tensors in rank order and coalesces,
        and the sum is copied into every input. Runs on the calling thread (async_op too)."""
        if _op_name(opts.reduceOp if opts is not None else ReduceOp.SUM) != "sum":
            raise InvalidArgument("pycoll backend: sparse all_reduce supports ReduceOp.SUM only (as Gloo)")
        for i, t in enumerate(tensors):
            if t.layout != torch.sparse_coo or t.device.type != "cpu":
                raise InvalidArgument(f"pycoll backend: sparse all_reduce tensor[{i}] must be a CPU sparse COO "
                                      f"tensor like tensor[0], got {t.layout} on {t.device}")
            if t.dtype not in _DTYPES:
                raise InvalidArgument(f"pycoll backend: sparse all_reduce tensor[{i}] has dtype {t.dtype}")
        self._state.usable()
        if self._lanes is not None:
            self._lanes.drain("all_reduce")  # runs untagged, on this thread
        try:
            out = _sparse_sum(self.communicator, tensors, _timeout_s(opts, self._timeout_s), self.size())
        except (CollectiveError, CoordinatorError) as exc:
            exc = _torch_timeout(exc, "all_reduce")
            self._state.record_failure(exc)
            raise exc
        for t in tensors:
            t.copy_(out)
        return _Work(self._state, [], list(tensors), None, "all_reduce")

    def monitored_barrier(self, timeout=None, wait_all_ranks=False):
        """``pg.monitored_barrier(timeout)``: a barrier with its own deadline whose failure says, in
        Gloo's words, that this rank timed out in monitoredBarrier. (``dist.monitored_barrier``
        itself refuses every backend but Gloo, so only direct calls on the group reach this; pycoll
        does not learn which peers are missing, so ``wait_all_ranks`` cannot list them.)"""
        secs = timeout.total_seconds() if isinstance(timeout, datetime.timedelta) else timeout
        secs = self._timeout_s if secs is None else max(float(secs), 0.001)  # 0: fail unless all are there
        self._state.usable()
        if self._lanes is not None:
            self._lanes.drain("monitored_barrier")
        start = time.monotonic()
        try:
            self.communicator.barrier(timeout=secs)
        except (CollectiveError, CoordinatorError) as exc:
            self._state.record_failure(exc)
            ms = int((time.monotonic() - start) * 1000)
            raise CollectiveTimeout(f"Rank {self.rank()} timed out in monitoredBarrier after {ms} ms "
                                    f"(pycoll backend: {exc})", exc.status, exc.peer) from exc

    # ---- identity and lifetime ----------------------------------------
    def getBackendName(self):
        """``"pycoll"``."""
        return BACKEND

    def name(self):
        """``"pycoll"``."""
        return BACKEND

    # torch names every group (``_new_process_group_helper`` calls ``_set_group_name``) and
    # finds it by that name: ``pg.group_name``, ``destroy_process_group(pg)``, DeviceMesh,
    # DTensor and the functional collectives. C++'s ProcessGroup keeps the name on its
    # registered c10d Backend objects, and a Python class cannot be one (torch's Backend
    # has no Python constructor), so the group keeps its name itself: these four are the
    # virtuals torch's Python-group trampoline (PyProcessGroup) forwards to Python.
    def getGroupName(self):
        return self._group_name

    def setGroupName(self, name):
        self._group_name = name

    def getGroupDesc(self):
        return self._group_desc

    def setGroupDesc(self, desc):
        self._group_desc = desc

    def shutdown(self):
        """Leave the pycoll group (``dist.destroy_process_group`` calls this)."""
        _LIVE.discard(self._state)
        self._state.close()

    def abort(self):
        """Same as :meth:`shutdown`: leave the group now."""
        self.shutdown()

    def __repr__(self):
        return f"<ProcessGroupPycoll rank {self.rank()} of {self.size()}>"


# ---- staging: device and non-contiguous tensors (pycoll/torch/staging.py) ----------
# Each collective method below is wrapped: its tensor arguments that the C core cannot read in
# place (CUDA tensors, non-contiguous tensors) are replaced by host stand-ins before the method
# runs, and _run copies the results back before the Work completes. The role says which
# arguments are read and written: "inout" arg 0 in place, "out" arg 0 written and the rest read,
# "in" all read; "segmented": the method treats each tensor of its arg-0 list on its own, so a
# large device tensor goes as a list of segments whose copies overlap the wire.
_STAGED_METHODS = {
    "allreduce": ("inout", True), "allreduce_coalesced": ("inout", False), "broadcast": ("inout", True),
    "reduce": ("inout", False),
    "allgather": ("out", False), "all_gather_single": ("out", False), "_allgather_base": ("out", False),
    "all_gather_single_coalesced": ("out", False), "allgather_into_tensor_coalesced": ("out", False),
    "allgather_coalesced": ("out", False),
    "reduce_scatter": ("out", False), "reduce_scatter_single": ("out", False),
    "_reduce_scatter_base": ("out", False), "reduce_scatter_single_coalesced": ("out", False),
    "reduce_scatter_tensor_coalesced": ("out", False),
    "gather": ("out", False), "scatter": ("out", False), "alltoall": ("out", False),
    "alltoall_base": ("out", False), "all_to_all_single": ("out", False),
    "send": ("in", False), "recv": ("out", False), "recv_anysource": ("out", False),
}

_staging_tls = threading.local()


def _staged_call():
    """The staging of the collective method running on this thread, if it staged anything."""
    return getattr(_staging_tls, "current", None)


def _then(first, second):
    if first is None:
        return second

    def both():
        first()
        second()
    return both


def _staging_method(method, role, segmented):
    @functools.wraps(method)
    def staged_method(self, *args, **kwargs):
        if getattr(_staging_tls, "current", None) is not None or not staging.any_needs_staging(args):
            # already staged (called from another staged method), or nothing to stage
            return method(self, *args, **kwargs)
        staged = staging.Staged(args, role, segmented)
        _staging_tls.current = staged
        try:
            return method(self, *staged.args, **kwargs)
        except BaseException:
            staged.release()
            raise
        finally:
            _staging_tls.current = None
    return staged_method


def _wrap_staged_methods(cls):
    for name, (role, segmented) in _STAGED_METHODS.items():
        method = cls.__dict__.get(name)
        if method is not None:
            setattr(cls, name, _staging_method(method, role, segmented))


_wrap_staged_methods(ProcessGroupPycoll)


_LIVE = set()  # states of open groups, closed at exit


@atexit.register
def _close_all():
    """Leave the group cleanly at exit if the script never called
    destroy_process_group (rank 0 keeps its coordinator up until the others left)."""
    for state in list(_LIVE):
        try:
            state.close()
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            pass


def _bind_host(addr):
    return "127.0.0.1" if addr.startswith("127.") or addr == "localhost" else "0.0.0.0"


def create_process_group(store, rank, size, timeout):
    """The creator torch calls for ``init_process_group("pycoll")`` and
    ``new_group(backend="pycoll")``: rendezvous through ``store``, then a
    pycoll communicator with the same ranks."""
    timeout_s = timeout.total_seconds() if isinstance(timeout, datetime.timedelta) else float(timeout)
    addr = environ("MASTER_ADDR") or "127.0.0.1"
    coordinator = None
    if rank == 0:
        try:
            coordinator = Coordinator(_bind_host(addr), 0, world_size=size).start()
        except Exception as exc:
            store.set(_STORE_KEY, f"error:{exc}")
            raise CoordinatorError(f"pycoll backend: rank 0 cannot start a coordinator: {exc}") from exc
        store.set(_STORE_KEY, f"{addr}:{coordinator.port}")
    where = store.get(_STORE_KEY).decode()
    if where.startswith("error:"):
        raise CoordinatorError(f"pycoll backend: rank 0 could not start a coordinator: {where[6:]}")
    host, port = where.rsplit(":", 1)
    try:
        # preserve_input=False: no scratch copy of each bucket. Torch's backends make no promise
        # about a failed call's buffers, and after a failure this group refuses every further call
        # (_GroupState.usable), so nobody reads them. It halves an all-reduce's CPU time on a loaded
        # host (2 ranks, 28 MiB, two busy loops: 19.4 ms of CPU with the copy, 8.3 ms without;
        # bench/shm.py --impls pycoll-shm,pycoll-shm-np --burn 2). The communicator API keeps it.
        nlanes = overlap_lanes()
        tags = tuple(lanes_mod.lane_tag(i) for i in range(1, nlanes))
        comm = _group.init(rank=rank, world_size=size, master_addr=host, master_port=int(port),
                           timeout=timeout_s, join_timeout=min(timeout_s, 300.0), preserve_input=False,
                           **({"tags": tags} if tags else {}))
    except BaseException:
        if coordinator is not None:
            coordinator.stop()
        raise
    if coordinator is not None:
        comm.adopt_coordinator(coordinator)  # rank 0: close() keeps it up until the others have left
    log.info("pycoll process group: rank %d of %d, coordinator %s, %d lane(s)", rank, size, where, nlanes)
    return ProcessGroupPycoll(comm, rank, size, timeout_s, lanes=nlanes)


#: Lanes of a group's async collectives when PYCOLL_TORCH_OVERLAP is unset (see pycoll.torch.lanes).
DEFAULT_LANES = 1


def overlap_lanes():
    """How many lanes a new pycoll process group runs its async collectives on: PYCOLL_TORCH_OVERLAP,
    else :data:`DEFAULT_LANES` (1: the communicator's worker thread, in call order)."""
    n = environ("PYCOLL_TORCH_OVERLAP")
    return DEFAULT_LANES if n is None else n


def register():
    """Register the ``"pycoll"`` backend with torch.distributed (idempotent)."""
    dist.Backend.register_backend(BACKEND, create_process_group, devices=["cpu", "cuda"])


def communicator(group=None):
    """The :class:`pycoll.Communicator` behind a pycoll process group
    (default: the default group), e.g. for ``communicator().stats``."""
    if group is None and not dist.is_initialized():
        raise InvalidArgument("no default process group: call torch.distributed.init_process_group(\"pycoll\") first")
    pg = group if group is not None else dist.group.WORLD
    if not isinstance(pg, ProcessGroupPycoll):
        raise InvalidArgument(f"{pg!r} is not a pycoll process group")
    return pg.communicator


def compression_hook(wire_dtype=torch.bfloat16):
    """A DDP communication hook that sends gradients as float16 or bfloat16.

        model.register_comm_hook(None, pycoll.torch.backend.compression_hook(torch.bfloat16))

    Halves the bytes on the wire (for slow links) at the cost of gradient
    precision: each bucket is cast to ``wire_dtype``, divided by the world
    size (so the sum cannot overflow float16), summed across ranks, and cast
    back into the bucket. Every rank gets the same bits. The hook's state is
    the process group to use (``None``: the default group). Works with any
    backend; with pycoll the narrow sum is widened to float32 at every step.
    """
    wire = wire_dtype if isinstance(wire_dtype, torch.dtype) else getattr(torch, str(wire_dtype))
    if wire not in (torch.float16, torch.bfloat16):
        raise InvalidArgument(f"compression_hook: wire dtype must be torch.float16 or torch.bfloat16, got {wire}")

    def hook(state, bucket):
        group = state if state is not None else dist.group.WORLD
        world = dist.get_world_size(group)
        buffer = bucket.buffer()
        compressed = buffer.to(wire).div_(world)
        fut = dist.all_reduce(compressed, group=group, async_op=True).get_future()

        def decompress(f):
            buffer.copy_(f.value()[0])
            return buffer
        return fut.then(decompress)

    hook.__name__ = hook.__qualname__ = f"pycoll_{str(wire).replace('torch.', '')}_compression_hook"
    return hook


register()
