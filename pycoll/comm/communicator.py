"""The communicator: collectives over the current membership epoch.

Rank and world size can change at run time (after a peer dies, or when
joiners are admitted at ``update_topology()``); read ``comm.rank`` and
``comm.world_size`` after each such point.

Data path: every collective becomes a plan (cached per epoch) that the C
engine runs with the GIL released. Control path (Python): membership,
rebuilding the connection mesh after a failure, async queueing, stats.
A call that repeats an earlier one of the epoch (same arguments, same
dtypes and sizes) skips its checks and planning and goes almost straight to
the engine (Communicator._fast_run): small collectives cost microseconds.

The epoch itself (membership, connections, sequence numbers, failures,
plans) is the communicator's :class:`pycoll.comm.epoch.Epoch`; this module is
the public API over it, its fast path, async work and tags' threads.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Optional, Union

import numpy as np

from pycoll import faults
from pycoll import options as _options
from pycoll.comm import agreement as consensus
from pycoll.comm import shared_state
from pycoll.comm.epoch import Epoch, identity
from pycoll.comm.work import CallOrderExecutor, Work
from pycoll.core import engine
from pycoll.core.native import ffi, lib
from pycoll.core.buffers import as_buffer
from pycoll.core.dtypes import op_code
from pycoll.errors import CollectiveError, InvalidArgument
from pycoll.observability import Stat  # noqa: F401 - public here too (pycoll.Stat)
from pycoll.options import Options

log = logging.getLogger("pycoll")

# (re-exported: the tests build the plans the communicator builds)
DEFAULT_TIMEOUT, DEFAULT_SEGMENT, DEFAULT_STALL = _options.DEFAULT_TIMEOUT, _options.DEFAULT_SEGMENT, _options.DEFAULT_STALL

# Bound once: the per-call path (Communicator._fast_run, Epoch.launch) runs every few microseconds.
_from_buffer = ffi.from_buffer
_thread_id = threading.get_ident
_NULL = ffi.NULL
_ndarray = np.ndarray

# Public signatures: an array is a C-contiguous NumPy array or torch CPU tensor, used in place.
Array = Any
Tag = Union[str, int]


class Communicator:
    """A group of peers that run collectives together. Use :func:`pycoll.init`
    or :func:`pycoll.connect` to make one."""

    def __init__(self, client, listener, options: Optional[Options] = None, *, coordinator=None, mesh_key=None,
                 join=None, standby=None, **settings):
        """``options``: the settings, resolved (:meth:`pycoll.options.Options.resolve`); without
        them, ``settings`` (the same names as keywords) are resolved here, else they change
        ``options``. ``coordinator``: the in-process coordinator we host, if any (see
        :meth:`adopt_coordinator`); ``mesh_key`` authenticates peer connections (pycoll.auth);
        ``join``: the message this peer joined with, ``standby``: its port for a successor
        coordinator (see :class:`pycoll.comm.epoch.Epoch`)."""
        if options is None:
            options = Options.resolve(**settings)
        elif settings:
            options = options.replace(**settings)
        self._epoch = ep = Epoch(client, listener, options, mesh_key=mesh_key, join=join, standby=standby)
        self._coordinator = coordinator  # the in-process coordinator we host, if any
        ep.on_host = self.adopt_coordinator  # a successor of a lost coordinator (pycoll.comm.failover)
        # The call path: one untagged collective at a time (the epoch's lock, which shared
        # state takes too), inline or on the worker thread behind queued async work.
        self._exec_lock = ep.exec_lock
        self._fast = ep.fast        # call key -> Call of this epoch (see _fast_run; the epoch clears it)
        self._submit_lock = threading.Lock()
        self._executor = CallOrderExecutor("pycoll-worker", on_done=self._queued_done)
        self._inflight = 0  # calls queued on the executor and not finished
        self._threads_seen = {}     # untagged calls in flight at once: warned once per thread pair
        self._holder = None         # thread id of the untagged call running now (see _contended)

    # ---- settings (pycoll.options) ---------------------------------------
    @property
    def options(self) -> Options:
        """The communicator's settings (frozen). Each also reads as an attribute of the same
        name (``comm.timeout``); setting one (``comm.compression = "bf16"``) replaces this
        object with a checked copy, and the next calls follow it."""
        return self._epoch.options

    @property
    def epoch_state(self) -> Epoch:
        """The :class:`pycoll.comm.epoch.Epoch` behind this communicator (membership,
        connections, sequence numbers, failures): what pycoll's own modules work with."""
        return self._epoch

    def _setting(name, doc, get=None):  # noqa: N805 - builds the properties below
        def setter(self, value):
            self._epoch.configure(**{name: value})
        return property(get or (lambda self: getattr(self._epoch.options, name)), setter, doc=doc)

    timeout = _setting("timeout", "Seconds a collective may take (per call: ``timeout=``).")
    stall_timeout = _setting("stall_timeout", "Seconds after which keepalive declares an idle link dead (0: off).")
    progress_timeout = _setting("progress_timeout", "Fail a collective idle this many seconds (0: off).")
    stripes = _setting("stripes", "Connections per peer pair.")
    sockbuf = _setting("sockbuf", "Socket buffer bytes of the peer connections (0: the kernel's).")
    segment_bytes = _setting("segment_bytes", "The planners' pipeline unit in bytes.")
    spin_us = _setting("spin_us", "Microseconds the engine spins before it sleeps in poll.")
    preserve_input = _setting("preserve_input", "A failed call leaves its input as it was.")
    transport = _setting("transport", '"auto" (shared memory to same-host peers, TCP to the rest), "shm" or "tcp".')
    single_copy = _setting("single_copy", "Bytes from which a same-host peer copies a payload straight out of our "
                           "memory (0: never).", lambda self: self._epoch.single_copy_bytes())
    compression = _setting("compression", "The default wire codec of float32 payloads.")
    topology = _setting("topology", "The topology (pycoll.plan.topology.Topology) or None.",
                        lambda self: self._epoch.topology)
    calibrate = _setting("calibrate", "Measure the cost model when an epoch is installed.")
    coordinator_wait = _setting("coordinator_wait", "Seconds to wait for a lost coordinator to come back.")
    failover = _setting("failover", "A lost coordinator is succeeded by a member (pycoll.comm.failover).")
    sync_timeout = _setting("sync_timeout", "Seconds a sync point (forming an epoch) may take.")
    mesh_timeout = _setting("mesh_timeout", "Seconds to connect an epoch's mesh.")
    tags = _setting("tags", "The declared tags, in canonical order (see all_reduce's ``tag=``).")
    max_retries = _setting("max_retries", "Attempts of a retry=True collective beyond the first.")
    del _setting

    # ---- who (the current epoch's) ----------------------------------------
    def _epoch_fact(name, doc):  # noqa: N805 - builds the read-only properties below
        return property(lambda self: getattr(self._epoch, name), doc=doc)

    rank = _epoch_fact("rank", "This peer's rank in the current epoch.")
    world_size = _epoch_fact("world_size", "The number of ranks in the current epoch.")
    epoch = _epoch_fact("number", "The current membership epoch's number.")
    members = _epoch_fact("members", "The members' names, in rank order.")
    lost = _epoch_fact("lost", "Names lost at the last membership change.")
    joined = _epoch_fact("joined", "Names admitted at the last membership change.")
    peer_transports = _epoch_fact("peer_transports", 'Per rank: "shm", "tcp" or "self".')
    name = _epoch_fact("name", "This peer's stable name.")
    del _epoch_fact

    @property
    def stats(self):
        """The last 10000 collectives' records (:class:`pycoll.Stat`)."""
        return self._epoch.stats

    @stats.setter
    def stats(self, value):
        self._epoch.stats = value

    @property
    def last_outcome(self):
        """How the last ``retry=``/``verify=`` collective ended (agreement.Outcome), or None."""
        return self._epoch.last_outcome

    @last_outcome.setter
    def last_outcome(self, value):
        self._epoch.last_outcome = value

    # ---- membership ----------------------------------------------------
    def update_topology(self) -> bool:
        """A sync point: every current member must call it (between steps).
        Admits pending joiners and drops dead members; returns True if the
        membership changed (then ``rank``, ``world_size``, ``members``,
        ``lost`` and ``joined`` describe the new group). Cheap when nothing
        changed: one round trip to the coordinator."""
        with self._exec_lock:
            return self._epoch.update_topology()

    @property
    def aggregators(self) -> list:
        """Names of the groups whose standalone aggregator (``pycoll aggregator``) serves this
        epoch's innetwork all-reduces (empty: agent mode everywhere)."""
        sw = self._epoch.switch
        if sw is None or not sw.usable:
            return []
        groups = sw.elayout.groups
        return sorted(groups)

    def pending_joiners(self) -> int:
        """Number of peers waiting to be admitted (from the last heartbeat)."""
        return self._epoch.pending_joiners()

    # ---- running collectives ------------------------------------------
    def _contended(self):
        """Another thread is inside an untagged call: untagged calls pair by call
        order across ranks, which differs between ranks when threads race, so
        say so (once per pair of threads), then wait for our turn."""
        holder, me = self._holder, _thread_id()
        worker = self._executor.thread_id
        if holder is not None and holder != me and holder != worker:
            names = {t.ident: t.name for t in threading.enumerate()}
            pair = (names.get(holder, f"thread {holder}"), names.get(me, f"thread {me}"))
            if pair not in self._threads_seen and len(self._threads_seen) < 64:
                self._threads_seen[pair] = True
                log.warning("rank %d: threads %r and %r make untagged collective calls on one communicator at "
                            "the same time; untagged calls pair across ranks by their order, which racing "
                            "threads make differ between ranks (results then mix). Give each thread its own "
                            "tag (tags=... and tag=...), or make the calls from one thread",
                            self.rank, *pair)
        self._exec_lock.acquire()

    def _run_tagged(self, tag, run, description):
        """Run ``run(chan)`` on ``tag``'s channel, beside calls on other channels
        (blocking: tagged calls are made from threads of one's own). When the
        epoch fails, every channel fails exactly one call, the one it was
        running or else its next, as untagged calls do."""
        ep = self._epoch
        tags = ep.options.tags
        if tag not in tags:
            raise InvalidArgument(f"{description}: tag {tag!r} was not declared: make the communicator with "
                                  f"tags=(...) naming it (declared: {list(tags)})")
        for _ in range(100):  # each turn runs, raises, or re-forms the epoch
            chan = ep.channels.get(tag)
            if chan is not None and not ep.tag_needs_care(tag):
                with chan.lock:
                    if chan.ccomm is not None and not ep.tag_needs_care(tag):
                        return run(chan)
            with self._exec_lock:  # the untagged calls' lock: re-forming waits for none of ours
                self._holder = None  # (not an untagged call: see _contended)
                ep.ready_tag(tag)
        raise CollectiveError(f"{description} (tag {tag!r}): the group kept re-forming; giving up")

    def _execute(self, coll, inbuf, outbuf, count, op, root, algorithm, timeout, preserve, compression=None,
                 internal=False, agree=None, fast_key=None, chan=None):
        """Run one collective on the current epoch; raises on failure.
        ``agree`` (a consensus.Agreement) runs it with outcome consensus.
        ``fast_key``: remember this call's prepared state under that key, so
        that the same call again can skip straight to the engine
        (:meth:`_fast_run`). ``chan``: a tag's channel (see _run_tagged,
        which readied the epoch)."""
        ep = self._epoch
        if chan is not None:
            call = ep.prepare(coll, inbuf, outbuf, count, op, root, algorithm, preserve, compression, chan)
            return ep.launch(call, ffi.cast("void *", inbuf.address), ffi.cast("void *", outbuf.address),
                             timeout, internal, chan=chan)
        if agree is not None:
            agree.skip = consensus.begin(ep)
            if agree.root_name is not None:
                root = agree.root(ep)
        else:
            ident = identity(coll, inbuf.code, op, count, root, algorithm, compression)
            ep.ensure_ready(None if internal else ident)
        call = ep.prepare(coll, inbuf, outbuf, count, op, root, algorithm, preserve, compression)
        if agree is not None:
            return ep.launch(call, ffi.cast("void *", inbuf.address), ffi.cast("void *", outbuf.address),
                             timeout, internal, agree, inbuf, outbuf)
        if fast_key is not None and not internal and call.switch is None:
            if len(self._fast) > 256:
                self._fast.clear()
            try:
                self._fast[fast_key] = call
            except TypeError:  # an unhashable argument that passed the checks: just not remembered
                pass
        return ep.launch(call, ffi.cast("void *", inbuf.address), ffi.cast("void *", outbuf.address), timeout,
                         internal)

    def _fast_call(self, key):
        """The prepared call remembered under ``key`` (see :meth:`_fast_run`),
        or None; ``key`` is the collective, its arguments and its arrays'
        dtypes and sizes (a change of settings forgets every call, see Epoch.configure)."""
        try:
            return self._fast.get(key)
        except TypeError:  # an unhashable argument (it fails the full path's checks, or is never cached)
            return None

    def _fast_run(self, call, inarr, outarr, timeout, in_writable=False):
        """Run ``call`` (from :meth:`_fast_call`) on these arrays without
        checking and planning it again: identical arguments passed those
        checks and gave this plan earlier in this epoch. What can differ per
        call is checked here: the arrays' memory (C-contiguous, and writable
        where written: the buffer export checks both) and the communicator's
        state (failures, aborts, queued async work, closing, test faults).
        Returns the algorithm that ran, or None when this call must take the
        full path (then nothing ran). Arrays are NumPy ndarrays, or None for
        no buffer."""
        try:
            if inarr is None:
                inptr = outptr = _NULL
            else:
                inptr = _from_buffer("char[]", inarr, in_writable)
                outptr = inptr if outarr is inarr and in_writable else _from_buffer("char[]", outarr, True)
        except (TypeError, ValueError, BufferError):  # the full path says what is wrong
            return None
        if not self._exec_lock.acquire(False):
            self._contended()
        self._holder = _thread_id()
        try:
            # Inline only when no async work is queued (as _call; work queued
            # later by another thread is concurrent with this call anyway).
            ep = self._epoch
            if (self._inflight or call.ccomm is not ep.ccomm or ep.broken or ep.closed
                    or ep.aborted_epoch == ep.number or faults.FAULTS_ARMED or ep.client.needs_rejoin):
                return None
            return ep.launch(call, inptr, outptr, timeout)  # the exports keep the memory alive
        finally:
            self._exec_lock.release()

    def _call(self, fn, async_op, description, bufs=()):
        """Run fn now (sync) or queue it (async), keeping call order. ``bufs``
        (buffers.Buffer) stay pinned until fn returned (see _run_pinned)."""
        if not async_op:
            with self._submit_lock:
                if self._inflight == 0:
                    if not self._exec_lock.acquire(False):
                        self._contended()
                    self._holder = _thread_id()
                    inline = True
                else:
                    inline = False
            if inline:
                try:
                    return self._run_pinned(fn, bufs)
                finally:
                    self._exec_lock.release()
            return self._submit(fn, description, bufs).wait()
        return self._submit(fn, description, bufs)

    def _submit(self, fn, description, bufs=()):
        """Queue fn behind the async work already queued (one thread, call order)."""
        with self._submit_lock:
            # close() closes the epoch before it stops the executor: nothing queued now would run
            if not self._epoch.closed:
                self._inflight += 1
                return Work(description, self._executor.submit(self._run_queued, fn, bufs))
        self._run_pinned(lambda: None, bufs)  # unpin
        work = Work(description)
        work.complete(None, CollectiveError(f"{description}: communicator is closed"))
        return work

    def _run_queued(self, fn, bufs):
        with self._exec_lock:
            return self._run_pinned(fn, bufs)

    def _queued_done(self):
        """The executor finished (or dropped) one queued call: the next sync call may run inline."""
        with self._submit_lock:
            self._inflight -= 1

    @staticmethod
    def _run_pinned(fn, bufs):
        """Run a collective's closure. Its buffers stay pinned (NumPy refuses to
        resize them, torch storages stay alive) from the call until now, async
        calls included: the engine got their addresses at the call. A tensor
        whose memory moved meanwhile is reported (Buffer.check)."""
        try:
            result = fn()
            for b in bufs:
                b.check()
            return result
        finally:
            for b in bufs:
                b.release()

    # ---- public collectives -------------------------------------------
    def all_reduce(self, arr: Array, op: str = "sum", algorithm: str = "auto", *, timeout: Optional[float] = None,
                   dtype: Optional[str] = None, async_op: bool = False, retry: Union[bool, int] = False,
                   verify: bool = False, compression: Optional[str] = None, tag: Optional[Tag] = None) -> Any:
        """Reduce ``arr`` across all ranks, in place; returns ``arr``.

        ``compression`` ("fp16", "bf16", "int8", "none"; default: the
        communicator's) encodes float32 payloads on the wire; see
        :mod:`pycoll.plan.compression` for the error bounds.

        On failure the array holds its input again (unless the communicator
        was made with ``preserve_input=False``) and an exception is raised.

        ``retry=True`` (or a number of retries): the group agrees on the
        outcome before anyone writes ``arr`` (one extra round trip to the
        coordinator); if a peer is lost the call re-runs over the survivors
        and ``comm.last_outcome.contributors`` names the peers whose data is
        in the result (``op="avg"`` divides by their number).
        ``verify=True``: also cross-check a digest of the result across the
        group; a mismatch raises ParityError on every rank, ``arr`` intact.

        ``tag``: run on that tag's own connections (the communicator must be
        made with ``tags=`` naming it). Calls pair across ranks by their order
        among calls of the same tag, so threads that each use their own tag
        may call at once; see "Threads" in the README.
        """
        key = None
        if type(arr) is _ndarray and not (async_op or retry or verify or tag is not None):  # repeat: to the engine
            key = ("all_reduce", arr.dtype, arr.size, op, algorithm, dtype, compression)
            call = self._fast_call(key)
            if call is not None and self._fast_run(call, arr, arr, timeout, True) is not None:
                return arr
        return self._all_reduce(arr, op, algorithm, timeout, dtype, async_op, retry, verify, compression, key, tag)

    # The full paths live apart from the public methods: a closure's variables cost the enclosing
    # function a cell each at every call, fast path or not.
    def _all_reduce(self, arr, op, algorithm, timeout, dtype, async_op, retry, verify, compression, key, tag):
        buf = as_buffer(arr, writable=True, what="all_reduce buffer", dtype=dtype)
        op_code(op)

        def run(chan=None):
            if chan is not None:
                self._execute("all_reduce", buf, buf, buf.count, op, 0, algorithm, timeout, self.preserve_input,
                              compression, chan=chan)
            elif retry or verify:
                consensus.run_agreed(self._epoch, lambda agree: self._execute(
                    "all_reduce", buf, buf, buf.count, op, 0, algorithm, timeout, True, compression, agree=agree),
                    retry, verify)
            else:
                self._execute("all_reduce", buf, buf, buf.count, op, 0, algorithm, timeout, self.preserve_input,
                              compression, fast_key=key)
            return arr
        if tag is not None:
            return self._tagged_call(tag, run, async_op or retry or verify, "all_reduce", (buf,))
        return self._call(run, async_op, "all_reduce", (buf,))

    def all_reduce_async(self, arr: Array, op: str = "sum", algorithm: str = "auto", **kw) -> Work:
        """Like all_reduce, returns a :class:`Work`; several may be in flight."""
        return self.all_reduce(arr, op, algorithm, async_op=True, **kw)

    def all_gather(self, send: Array, recv: Array, algorithm: str = "auto", *, timeout: Optional[float] = None,
                   dtype: Optional[str] = None, async_op: bool = False, verify: bool = False,
                   compression: Optional[str] = None, tag: Optional[Tag] = None) -> Any:
        """``recv`` receives world_size blocks of ``send``, in rank order.
        ``verify=True`` cross-checks a digest of ``recv`` across the group;
        ``tag`` as for all_reduce."""
        key = None
        if type(send) is _ndarray and type(recv) is _ndarray and not (async_op or verify or tag is not None):
            key = ("all_gather", send.dtype, send.size, recv.dtype, recv.size, algorithm, dtype, compression)
            call = self._fast_call(key)
            if call is not None and self._fast_run(call, send, recv, timeout) is not None:
                return recv
        return self._all_gather(send, recv, algorithm, timeout, dtype, async_op, verify, compression, key, tag)

    def _all_gather(self, send, recv, algorithm, timeout, dtype, async_op, verify, compression, key, tag):
        sb = as_buffer(send, writable=False, what="all_gather send", dtype=dtype)
        rb = as_buffer(recv, writable=True, what="all_gather recv", dtype=dtype)
        self._check_same_dtype(sb, rb, "all_gather")

        def run(chan=None):
            if rb.count != sb.count * self.world_size:
                raise InvalidArgument(f"all_gather: recv has {rb.count} elements, needs world_size "
                                      f"({self.world_size}) x {sb.count}")
            if chan is not None:
                self._execute("all_gather", sb, rb, sb.count, "sum", 0, algorithm, timeout, False, compression,
                              chan=chan)
            elif verify:
                consensus.run_agreed(self._epoch, lambda agree: self._execute(
                    "all_gather", sb, rb, sb.count, "sum", 0, algorithm, timeout, False, compression, agree=agree),
                    False, True)
            else:
                self._execute("all_gather", sb, rb, sb.count, "sum", 0, algorithm, timeout, False, compression,
                              fast_key=key)
            return recv
        if tag is not None:
            return self._tagged_call(tag, run, async_op or verify, "all_gather", (sb, rb))
        return self._call(run, async_op, "all_gather", (sb, rb))

    def all_gather_async(self, send: Array, recv: Array, algorithm: str = "auto", **kw) -> Work:
        return self.all_gather(send, recv, algorithm, async_op=True, **kw)

    def reduce_scatter(self, send: Array, recv: Array, op: str = "sum", algorithm: str = "auto", *,
                       timeout: Optional[float] = None, dtype: Optional[str] = None, async_op: bool = False,
                       compression: Optional[str] = None, tag: Optional[Tag] = None) -> Any:  # no verify=: every rank holds its own block
        """``recv`` = this rank's block of the elementwise reduction of ``send``
        (``send`` holds world_size blocks of ``recv``'s size); ``tag`` as for all_reduce."""
        key = None
        if type(send) is _ndarray and type(recv) is _ndarray and not async_op and tag is None:
            key = ("reduce_scatter", send.dtype, send.size, recv.dtype, recv.size, op, algorithm, dtype,
                   compression)
            call = self._fast_call(key)
            if call is not None and self._fast_run(call, send, recv, timeout) is not None:
                return recv
        return self._reduce_scatter(send, recv, op, algorithm, timeout, dtype, async_op, compression, key, tag)

    def _reduce_scatter(self, send, recv, op, algorithm, timeout, dtype, async_op, compression, key, tag):
        sb = as_buffer(send, writable=False, what="reduce_scatter send", dtype=dtype)
        rb = as_buffer(recv, writable=True, what="reduce_scatter recv", dtype=dtype)
        self._check_same_dtype(sb, rb, "reduce_scatter")
        op_code(op)

        def run(chan=None):
            if sb.count != rb.count * self.world_size:
                raise InvalidArgument(f"reduce_scatter: send has {sb.count} elements, needs world_size "
                                      f"({self.world_size}) x {rb.count}")
            self._execute("reduce_scatter", sb, rb, rb.count, op, 0, algorithm, timeout, False, compression,
                          fast_key=key if chan is None else None, chan=chan)
            return recv
        if tag is not None:
            return self._tagged_call(tag, run, async_op, "reduce_scatter", (sb, rb))
        return self._call(run, async_op, "reduce_scatter", (sb, rb))

    def reduce_scatter_async(self, send: Array, recv: Array, op: str = "sum", algorithm: str = "auto", **kw) -> Work:
        return self.reduce_scatter(send, recv, op, algorithm, async_op=True, **kw)

    def broadcast(self, arr: Array, root: int = 0, algorithm: str = "auto", *, timeout: Optional[float] = None,
                  dtype: Optional[str] = None, async_op: bool = False, retry: Union[bool, int] = False,
                  verify: bool = False, tag: Optional[Tag] = None) -> Any:
        """Copy ``root``'s ``arr`` into every rank's ``arr``, in place.
        ``retry``/``verify``/``tag`` as for all_reduce; a retry follows the root peer
        to its new rank and fails (not retryable) if the root itself was lost."""
        key = None
        if type(arr) is _ndarray and type(root) is int and not (async_op or retry or verify or tag is not None):
            key = ("broadcast", arr.dtype, arr.size, root, algorithm, dtype)
            call = self._fast_call(key)
            if call is not None and self._fast_run(call, arr, arr, timeout, True) is not None:
                return arr
        return self._broadcast(arr, root, algorithm, timeout, dtype, async_op, retry, verify, key, tag)

    def _broadcast(self, arr, root, algorithm, timeout, dtype, async_op, retry, verify, key, tag):
        buf = as_buffer(arr, writable=True, what="broadcast buffer", dtype=dtype)

        def run(chan=None):
            if chan is not None:
                self._execute("broadcast", buf, buf, buf.count, "sum", root, algorithm, timeout,
                              self.preserve_input, chan=chan)
            elif retry or verify:
                consensus.run_agreed(self._epoch, lambda agree: self._execute(
                    "broadcast", buf, buf, buf.count, "sum", root, algorithm, timeout, True, agree=agree),
                    retry, verify, root=root)
            else:
                self._execute("broadcast", buf, buf, buf.count, "sum", root, algorithm, timeout,
                              self.preserve_input, fast_key=key)
            return arr
        if tag is not None:
            return self._tagged_call(tag, run, async_op or retry or verify, "broadcast", (buf,))
        return self._call(run, async_op, "broadcast", (buf,))

    def broadcast_async(self, arr: Array, root: int = 0, algorithm: str = "auto", **kw) -> Work:
        return self.broadcast(arr, root, algorithm, async_op=True, **kw)

    def barrier(self, *, timeout: Optional[float] = None, async_op: bool = False,
                tag: Optional[Tag] = None) -> Optional[Work]:
        """Return once every rank has entered the barrier (``tag`` as for all_reduce)."""
        if tag is not None:
            return self._tagged_call(tag, lambda chan: self._execute("barrier", _EMPTY, _EMPTY, 0, "sum", 0, "ring",
                                                                     timeout, False, chan=chan), async_op, "barrier")
        if not async_op:
            call = self._fast.get(_BARRIER_KEY)
            if call is not None and self._fast_run(call, None, None, timeout) is not None:
                return None
        return self._barrier(timeout, async_op)

    def _barrier(self, timeout, async_op):
        empty = _EMPTY

        def run():
            self._execute("barrier", empty, empty, 0, "sum", 0, "ring", timeout, False, fast_key=_BARRIER_KEY)
        return self._call(run, async_op, "barrier")

    def _tagged_call(self, tag, run, unsupported, description, bufs=()):
        """A tagged call (blocking; ``unsupported``: async_op, retry or verify was asked for)."""
        if unsupported:
            raise InvalidArgument(f"{description}: tag= runs blocking calls only (no async_op, retry or verify); "
                                  "call from a thread of your own for each tag")
        return self._run_pinned(lambda: self._run_tagged(tag, run, description), bufs)

    @staticmethod
    def _check_same_dtype(a, b, what):
        if a.dtype != b.dtype:
            raise InvalidArgument(f"{what}: send is {a.dtype} but recv is {b.dtype}")

    def cancel(self) -> None:
        """Cancel the collective running now (from any thread): it raises
        :class:`Cancelled` promptly and the group re-forms at the next call."""
        self._epoch.cancel()

    # ---- shared state (pycoll.comm.shared_state) -----------------------------
    def sync_shared_state(self, state: dict, revision: int, *, timeout: Optional[float] = None,
                          retry: Union[bool, int] = True, threads: int = 0) -> shared_state.SyncResult:
        """Make ``state`` bit-identical on every peer; returns a SyncResult.

        Every member must call it at the same point. Peers whose bytes differ
        from the majority, or whose ``revision`` is behind, receive the majority
        bytes in place (see :mod:`pycoll.comm.shared_state`). Afterwards every peer holds
        ``result.revision``. A lost peer restarts the sync over the survivors
        (``retry``, as for collectives). Raises InvalidArgument when peers
        disagree on names, dtypes or shapes.
        """
        return shared_state.sync_shared_state(self._epoch, state, revision, timeout=timeout, retry=retry,
                                              threads=threads)

    def verify_parity(self, state: dict, revision: int = 0, *, timeout: Optional[float] = None,
                      threads: int = 0) -> shared_state.ParityReport:
        """Check, without fixing, that every peer holds the same bytes: returns
        a ParityReport (``report.ok``). Every member must call it together."""
        return shared_state.verify_parity(self._epoch, state, revision, timeout=timeout, threads=threads)

    # ---- measurement ---------------------------------------------------
    def stream_ring(self, nbytes: int, timeout: float = 60.0) -> float:
        """Raw transport ceiling: every rank streams nbytes to its right-hand
        neighbour while receiving as many from the left (no reduction).
        Returns seconds."""
        ep = self._epoch
        with self._exec_lock:
            ep.ensure_ready()
            st, secs = engine.stream_ring(ep.ccomm, nbytes, timeout)
            if st != lib.PC_OK:
                raise ep.failure(st, -1, "stream_ring")
            return secs

    @property
    def bytes_sent(self) -> int:
        """Bytes this epoch's connections carried out of this peer."""
        return engine.bytes_sent(self._epoch.ccomm)

    @property
    def bytes_single_copy(self) -> int:
        """Bytes this peer copied straight out of same-host peers' memory this
        epoch (single copy, see ``single_copy``), instead of through a ring."""
        return engine.bytes_single_copy(self._epoch.ccomm)

    # ---- lifetime ------------------------------------------------------
    def close(self) -> None:
        """Leave the group and release every socket and buffer."""
        ep = self._epoch
        if ep.closed:
            return
        ep.close()
        self._executor.shutdown(wait=True, timeout=ep.options.timeout)
        ep.leave()
        if self._coordinator is not None:
            self._linger_coordinator()
        ep.client.close()

    def adopt_coordinator(self, coordinator) -> None:
        """Host ``coordinator`` (a :class:`pycoll.control.coordinator.Coordinator` started in this
        process, e.g. by the torch backend on rank 0): close() keeps it up until the other
        members have left, then stops it."""
        self._coordinator = coordinator

    def _linger_coordinator(self, limit=10.0):
        """We host the coordinator: keep it up until the others have left."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if not self._coordinator.workers_alive():
                break
            time.sleep(0.02)
        self._coordinator.stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"<pycoll.Communicator rank {self.rank} of {self.world_size}, epoch {self.epoch}>"


class _Empty:
    address = 0
    nbytes = 0
    count = 0
    dtype = "uint8"
    code = lib.PC_U8


_EMPTY = _Empty()
_BARRIER_KEY = ("barrier",)
