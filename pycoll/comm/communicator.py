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
import os
import threading
import time
from typing import Any, Optional, Union

import numpy as np

from pycoll import faults
from pycoll import options as _options
from pycoll.comm import agreement as consensus
from pycoll.comm import shared_state
from pycoll.comm.epoch import P2P_SEQ, Epoch, identity
from pycoll.comm.p2p import P2PQueue, P2PWork, Transfer
from pycoll.comm.work import CallOrderExecutor, Work
from pycoll.core import engine
from pycoll.core.native import ffi, lib
from pycoll.core.buffers import as_buffer, byte_view, scratch_like
from pycoll.core.dtypes import op_code
from pycoll.plan import exchange, remap
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
        self._p2p = P2PQueue(self._run_transfers)  # isend/irecv not run yet (pycoll.comm.p2p)

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
    single_copy_adapt = _setting("single_copy_adapt", "Each size's payloads go single-copy or through the rings, "
                                 "whichever this communicator timed faster (False: always single copy).")
    compression = _setting("compression", "The default wire codec of float32 payloads.")
    topology = _setting("topology", "The topology (pycoll.plan.topology.Topology) or None.",
                        lambda self: self._epoch.topology)
    calibrate = _setting("calibrate", "Measure the cost model when an epoch is installed.")
    probe_seconds = _setting("probe_seconds", 'topology="measure": each probe flow\'s duration in seconds.')
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
            if (self._inflight or self._p2p or call.ccomm is not ep.ccomm or ep.broken or ep.closed
                    or ep.aborted_epoch == ep.number or faults.FAULTS_ARMED or ep.client.needs_rejoin):
                return None
            return ep.launch(call, inptr, outptr, timeout)  # the exports keep the memory alive
        finally:
            self._exec_lock.release()

    def _call(self, fn, async_op, description, bufs=()):
        """Run fn now (sync) or queue it (async), keeping call order. ``bufs``
        (buffers.Buffer) stay pinned until fn returned (see _run_pinned).
        Point-to-point transfers queued before (isend/irecv) run first."""
        if self._p2p:
            self._p2p.flush()
        return self._call_now(fn, async_op, description, bufs)

    def _call_now(self, fn, async_op, description, bufs=()):
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
        """``recv`` receives world_size blocks of ``send``, in rank order: one array of
        world_size x ``send``'s size, or a list of world_size arrays of ``send``'s size (rank
        r's block lands in ``recv[r]`` itself, with no copy out where the plan allows it: see
        :meth:`all_reduce_coalesced`; not with ``verify`` or ``tag``).
        ``verify=True`` cross-checks a digest of ``recv`` across the group;
        ``tag`` as for all_reduce."""
        if isinstance(recv, (list, tuple)):
            return self._all_gather_list(send, recv, timeout, dtype, async_op, verify, compression, tag)
        key = None
        if type(send) is _ndarray and type(recv) is _ndarray and not (async_op or verify or tag is not None):
            key = ("all_gather", send.dtype, send.size, recv.dtype, recv.size, algorithm, dtype, compression)
            call = self._fast_call(key)
            if call is not None and self._fast_run(call, send, recv, timeout) is not None:
                return recv
        return self._all_gather(send, recv, algorithm, timeout, dtype, async_op, verify, compression, key, tag)

    def _all_gather_list(self, send, recvs, timeout, dtype, async_op, verify, compression, tag):
        """:meth:`all_gather` into a list of arrays: one plan over them where it can run so
        (:meth:`_run_remapped`), else into one temporary buffer and copied out."""
        if verify or tag is not None or compression is not None:
            raise InvalidArgument("all_gather into a list of arrays: no verify, tag or compression (gather into "
                                  "one array for those)")
        sb = as_buffer(send, writable=False, what="all_gather send", dtype=dtype)
        rbs = _same_dtype_buffers(recvs, True, "all_gather recv", dtype)

        def run():
            if len(rbs) != self.world_size or any(b.count != sb.count or b.dtype != sb.dtype for b in rbs):
                raise InvalidArgument(f"all_gather: recv must be {self.world_size} arrays (the world size) of "
                                      f"{sb.dtype} x {sb.count}, as send; got "
                                      f"{[f'{b.dtype} x {b.count}' for b in rbs]}")
            if not self._run_remapped("all_gather", [sb], rbs, 1, 1, "sum", timeout):
                flat = scratch_like(sb, sb.count * self.world_size)
                fb = as_buffer(flat, writable=True, what="all_gather recv", dtype=sb.dtype)
                self._execute("all_gather", sb, fb, sb.count, "sum", 0, "auto", timeout, False)
                _unpack(flat, rbs, 1)
            return recvs
        return self._call(run, async_op, "all_gather", (sb, *rbs))

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

    # ---- one-step collectives: reduce, gather, scatter, all_to_all (pycoll.plan.exchange) ------
    def _run_planned(self, coll, key, build, sb, rb, count, op, root, timeout, algorithm="direct", nbytes=0):
        """Run a planned collective (see Epoch.prepare_planned) on the current epoch. Rooted ones
        (reduce, gather, scatter) choose their plan: ``algorithm`` "direct", "tree" or "auto"
        (the epoch's cost model, for ``nbytes``), and so does all_to_all ("direct", "staged");
        ``build(rank, n, options, algorithm)``."""
        ep = self._epoch
        ep.ensure_ready(identity(coll, sb.code, op, count, root, "direct" if coll == "all_to_all" else algorithm,
                                 None))
        if coll in ("reduce", "gather", "scatter", "all_to_all"):
            chosen = ep.selector().choose_rooted(coll, algorithm, nbytes, root)
            key, plan = tuple(key) + (chosen,), build
            build = lambda rank, n, o: plan(rank, n, o, chosen)  # noqa: E731
        else:
            chosen = "direct"
        if coll == "all_to_all":  # a local choice: staged and direct send the same frames
            call = ep.prepare_planned(coll, key, build, sb, rb, count, op, root)
        else:
            call = ep.prepare_planned(coll, key, build, sb, rb, count, op, root, chosen, algorithm)
        ep.launch(call, ffi.cast("void *", sb.address), ffi.cast("void *", rb.address), timeout)

    def _check_root(self, root, what):
        if type(root) is not int or not 0 <= root < self.world_size:
            raise InvalidArgument(f"{what}: root {root!r} is not a rank of this group (world size {self.world_size})")

    def reduce(self, arr: Array, root: int = 0, op: str = "sum", *, timeout: Optional[float] = None,
               dtype: Optional[str] = None, async_op: bool = False, algorithm: str = "auto") -> Any:
        """Reduce ``arr`` of every rank into ``root``'s ``arr``, in place there; the other
        ranks' ``arr`` is only read. ``algorithm``: "direct" (the root reduces in rank order:
        the bits of a direct all_reduce), "tree" (a binomial tree: each rank reduces its input
        with its subtrees' results, in rank order relative to the root, grouped by subtree: see
        csrc/plan/plan_binomial.c; the same bits every time for the same world size and root),
        or "auto" (the cost model picks by size and world size, the same on every rank). On
        failure the root's ``arr`` holds its input. Returns ``arr``."""
        self._check_root(root, "reduce")
        _check_rooted_algorithm(algorithm, "reduce")
        buf = as_buffer(arr, writable=self.rank == root, what="reduce buffer", dtype=dtype)
        opc = op_code(op)
        avg = opc == lib.PC_AVG

        def run():
            self._check_root(root, "reduce")
            o = self.options
            count, es = buf.count, lib.pc_dtype_size(buf.code)
            self._run_planned("reduce", (count, es, root, avg, o.segment_bytes, o.stripes),
                              lambda rank, n, o, alg: exchange.reduce(rank, n, root, count, es, o.segment_bytes,
                                                                      o.stripes, avg, alg),
                              buf, buf, count, op, root, timeout, algorithm, buf.nbytes)
            return arr
        return self._call(run, async_op, "reduce", (buf,))

    def gather(self, send: Array, recv: Optional[Array] = None, root: int = 0, *, timeout: Optional[float] = None,
               dtype: Optional[str] = None, async_op: bool = False, algorithm: str = "auto") -> Any:
        """``root``'s ``recv`` (world_size x ``send``'s size) receives every rank's ``send``, in
        rank order; ``recv`` is only used (and needed) on the root. ``algorithm``: "direct"
        (one step), "tree" (binomial, lg n steps) or "auto" (as :meth:`reduce`). Returns ``recv``."""
        return self._rooted("gather", send, recv, root, timeout, dtype, async_op, algorithm)

    def scatter(self, send: Optional[Array], recv: Array, root: int = 0, *, timeout: Optional[float] = None,
                dtype: Optional[str] = None, async_op: bool = False, algorithm: str = "auto") -> Any:
        """Block r of ``root``'s ``send`` (world_size blocks of ``recv``'s size) into rank r's
        ``recv``; ``send`` is only used (and needed) on the root. ``algorithm`` as for
        :meth:`gather`. Returns ``recv``."""
        return self._rooted("scatter", recv, send, root, timeout, dtype, async_op, algorithm)

    def _rooted(self, coll, block, whole, root, timeout, dtype, async_op, algorithm="auto"):
        """gather (every rank's ``block`` into the root's ``whole``) or scatter (the root's
        ``whole`` cut into every rank's ``block``): one exchange seen from either side."""
        to_root = coll == "gather"
        mine, alls = ("send", "recv") if to_root else ("recv", "send")
        self._check_root(root, coll)
        _check_rooted_algorithm(algorithm, coll)
        bb = as_buffer(block, writable=not to_root, what=f"{coll} {mine}", dtype=dtype)
        wb = as_buffer(whole, writable=to_root, what=f"{coll} {alls}", dtype=dtype) if whole is not None else _EMPTY
        sb, rb = (bb, wb) if to_root else (wb, bb)
        if whole is not None:
            self._check_same_dtype(sb, rb, coll)
        plan = exchange.gather if to_root else exchange.scatter

        def run():
            self._check_root(root, coll)
            me, n, nbytes = self.rank, self.world_size, bb.nbytes
            if me == root:
                if whole is None or wb.count != n * bb.count:
                    raise InvalidArgument(f"{coll}: the root's {alls} must hold world_size ({n}) x {bb.count} "
                                          f"elements, got {None if whole is None else wb.count}")
                _check_apart(sb, rb, coll)
            at_root = wb if me == root else _EMPTY
            # scatter's digest carries recv's dtype and size: every rank's are the same
            inb, outb = (bb, at_root) if to_root else (_Described(at_root, bb.code), bb)
            self._run_planned(coll, (nbytes, root, me == root, self.options.stripes),
                              lambda rank, n, o, alg: plan(rank, n, root, nbytes, o.stripes, alg),
                              inb, outb, bb.count, "sum", root, timeout, algorithm, nbytes)
            return whole if to_root else block
        return self._call(run, async_op, coll, (bb,) if whole is None else (sb, rb))

    def all_to_all(self, send: Array, recv: Array, send_counts=None, recv_counts=None, *,
                   timeout: Optional[float] = None, dtype: Optional[str] = None, async_op: bool = False,
                   algorithm: str = "auto") -> Any:
        """Block r of ``send`` to rank r; rank r's block for us into block r of ``recv``, in
        one step. Equal blocks by default (``send`` and ``recv`` hold world_size blocks each);
        ``send_counts`` / ``recv_counts``: elements per block (uneven splits, torch's
        ``all_to_all_single``), summing to the arrays' sizes; ``send_counts[r]`` on rank q must
        equal ``recv_counts[q]`` on rank r (else every rank fails with ProtocolError).
        ``send`` and ``recv`` must not overlap. ``algorithm``: "direct" (every frame at once),
        "staged" (n-1 pairwise steps, one payload in flight each way: see
        :func:`pycoll.plan.exchange.all_to_all`) or "auto" (the cost model's choice by the
        largest block). Returns ``recv``."""
        if algorithm not in ("auto",) + exchange.ALL_TO_ALL_ALGORITHMS:
            raise InvalidArgument(f"all_to_all: algorithm {algorithm!r} is not one of auto, "
                                  f"{', '.join(exchange.ALL_TO_ALL_ALGORITHMS)}")
        sb = as_buffer(send, writable=False, what="all_to_all send", dtype=dtype)
        rb = as_buffer(recv, writable=True, what="all_to_all recv", dtype=dtype)
        self._check_same_dtype(sb, rb, "all_to_all")
        _check_apart(sb, rb, "all_to_all")

        def run():
            n, es = self.world_size, lib.pc_dtype_size(sb.code)
            sc = _splits(send_counts, sb.count, n, "send")
            rc = _splits(recv_counts, rb.count, n, "recv")
            sbytes, rbytes = tuple(c * es for c in sc), tuple(c * es for c in rc)
            # each rank decides by its largest block: the two plans exchange the same frames
            # (so ranks that choose differently still pair up; the digest says "direct")
            self._run_planned("all_to_all", (sbytes, rbytes, self.options.stripes),
                              lambda rank, n, o, a: exchange.all_to_all(rank, n, sbytes, rbytes, o.stripes, a),
                              sb, rb, 0, "sum", 0, timeout, algorithm, max(sbytes + rbytes, default=0))
            return recv
        return self._call(run, async_op, "all_to_all", (sb, rb))

    all_to_all_single = all_to_all

    # ---- coalesced forms: several arrays, one collective -------------------------
    def all_reduce_coalesced(self, arrays, op: str = "sum", *, timeout: Optional[float] = None,
                             dtype: Optional[str] = None, async_op: bool = False) -> Any:
        """Reduce every array of ``arrays`` (one dtype) in place, as ONE all_reduce over them
        laid end to end: one plan and one call whatever their number (a local copy in and
        out of a temporary buffer). Returns ``arrays``."""
        bufs = _same_dtype_buffers(arrays, True, "all_reduce_coalesced", dtype)
        op_code(op)

        def run():
            self._coalesced("all_reduce", bufs, bufs, 1, 1, op, timeout)
            return arrays
        return self._call(run, async_op, "all_reduce_coalesced", tuple(bufs))

    def all_gather_coalesced(self, sends, recvs, *, timeout: Optional[float] = None, dtype: Optional[str] = None,
                             async_op: bool = False) -> Any:
        """``recvs[i]`` receives world_size blocks of ``sends[i]``, in rank order, for every i,
        as ONE all_gather over the sends laid end to end. Returns ``recvs``."""
        sbs = _same_dtype_buffers(sends, False, "all_gather_coalesced send", dtype)
        rbs = _same_dtype_buffers(recvs, True, "all_gather_coalesced recv", dtype)

        def run():
            _check_pairs(sbs, rbs, self.world_size, "all_gather_coalesced")
            self._coalesced("all_gather", sbs, rbs, 1, self.world_size, "sum", timeout)
            return recvs
        return self._call(run, async_op, "all_gather_coalesced", tuple(sbs) + tuple(rbs))

    def reduce_scatter_coalesced(self, sends, recvs, op: str = "sum", *, timeout: Optional[float] = None,
                                 dtype: Optional[str] = None, async_op: bool = False) -> Any:
        """``recvs[i]`` = this rank's block of the reduction of ``sends[i]`` (world_size blocks
        of ``recvs[i]``'s size) for every i, as ONE reduce_scatter. Returns ``recvs``."""
        sbs = _same_dtype_buffers(sends, False, "reduce_scatter_coalesced send", dtype)
        rbs = _same_dtype_buffers(recvs, True, "reduce_scatter_coalesced recv", dtype)
        op_code(op)

        def run():
            _check_pairs(rbs, sbs, self.world_size, "reduce_scatter_coalesced")
            self._coalesced("reduce_scatter", sbs, rbs, self.world_size, 1, op, timeout)
            return recvs
        return self._call(run, async_op, "reduce_scatter_coalesced", tuple(sbs) + tuple(rbs))

    def _coalesced(self, coll, ins, outs, in_blocks, out_blocks, op, timeout):
        """One ``coll`` over ``ins`` laid end to end, each cut in ``in_blocks`` (see _pack);
        its output (``out_blocks`` / ``in_blocks`` x the input's size) unpacked into ``outs``,
        each cut in ``out_blocks``; ``outs is ins``: in place. The packed copies are ours alone
        and ``outs`` is written only on success, so the engine need not preserve its input."""
        if ins and self._run_remapped(coll, ins, outs, in_blocks, out_blocks, op, timeout):
            return
        dt = ins[0].dtype if ins else None
        flat = _pack(ins, in_blocks)
        fb = as_buffer(flat, writable=outs is ins, what=f"{coll}_coalesced", dtype=dt)
        out, ob = flat, fb
        if outs is not ins:
            out = scratch_like(outs[0], flat.size * out_blocks // in_blocks) if outs else np.empty(0, np.uint8)
            ob = as_buffer(out, writable=True, what=f"{coll}_coalesced", dtype=dt)
        # the count is the per-rank block: all_gather's input, reduce_scatter's output
        self._execute(coll, fb, ob, min(fb.count, ob.count), op, 0, "auto", timeout, False)
        _unpack(out, outs, out_blocks)

    def _run_remapped(self, coll, ins, outs, in_blocks, out_blocks, op, timeout):
        """:meth:`_coalesced` as one plan straight over the arrays (pycoll.plan.remap: no
        copy in or out), where it can run so; False where not (nothing ran): the plan for the
        total size moves data through scratch (small messages), or the arrays are reduced in
        place and must hold their input again after a failure (``preserve_input``: the packed
        copy is that backup)."""
        if outs is ins and self.preserve_input:
            return False
        bufs = list(ins) if outs is ins else list(ins) + list(outs)
        stretch_in = remap.stretches([b.nbytes for b in ins], in_blocks)
        stretch_out = stretch_in if outs is ins else remap.stretches([b.nbytes for b in outs], out_blocks, len(ins))
        count = min(sum(b.count for b in ins), sum(b.count for b in outs))  # (as _coalesced's packed call)
        ep = self._epoch
        ep.ensure_ready(identity(coll, ins[0].code, op, count, 0, "auto", None))
        call = ep.prepare_remapped(coll, bufs, count, op, stretch_in, stretch_out)
        if call is None:
            return False
        ep.launch(call, ffi.new("void *[]", [ffi.cast("void *", b.address) for b in bufs]), ffi.NULL, timeout)
        return True

    # ---- point-to-point (pycoll.comm.p2p) ----------------------------------------
    def send(self, arr: Array, dst: int, tag: int = 0, *, timeout: Optional[float] = None) -> None:
        """Send ``arr`` to rank ``dst``; returns once it was handed over. Pairs with ``dst``'s
        recv from us: transfers between two ranks pair in the order they were posted, and
        their ``tag`` (an integer; only the low 32 bits count) and sizes must match, else both
        fail (ProtocolError). Point-to-point calls are made by the two ranks only (other
        ranks' collectives are not affected)."""
        self.isend(arr, dst, tag, timeout=timeout).wait()

    def recv(self, arr: Array, src: Optional[int] = None, tag: int = 0, *, timeout: Optional[float] = None) -> Any:
        """Receive from rank ``src`` into ``arr`` (see :meth:`send`); returns ``arr``.
        ``src=None``: from any source, the first rank whose frame reaches us (its work's
        ``source`` names it; see :meth:`irecv`)."""
        return self.irecv(arr, src, tag, timeout=timeout).wait()

    def isend(self, arr: Array, dst: int, tag: int = 0, *, timeout: Optional[float] = None) -> Work:
        """Post a send (see :meth:`send`); returns a :class:`Work`. Posted transfers run
        together, as one plan, when one of their works is waited on, or at the next blocking
        send/recv or collective: so every rank may post its sends and receives in any order
        (a ring exchange) and then wait. ``arr`` must stay unchanged until then."""
        buf = as_buffer(arr, writable=False, what="send buffer")
        return self._post(True, buf, dst, tag, None, timeout, "send to")

    def irecv(self, arr: Array, src: Optional[int] = None, tag: int = 0, *,
              timeout: Optional[float] = None) -> Work:
        """Post a receive into ``arr`` (see :meth:`isend`); its work's result is ``arr`` and
        its ``source`` the sender's rank. ``src=None``: from any source. Such a receive waits
        (in C, on every connection at once) for the first rank with bytes for us and then
        receives that rank's next frame if it is a point-to-point frame with ``tag`` (ranks
        whose next frame is another one are passed over); its size must match. The
        transfers posted before it run first."""
        buf = as_buffer(arr, writable=True, what="recv buffer")
        if src is None:
            return self._post(False, buf, None, tag, arr, timeout, "recv from any source:")
        return self._post(False, buf, src, tag, arr, timeout, "recv from")

    def batch_isend_irecv(self, ops) -> list:
        """Post several transfers, ``ops`` a list of ``("send" | "recv", arr, peer[, tag])``;
        returns their works (in order). They run together, as one plan (see :meth:`isend`)."""
        works = []
        for i, item in enumerate(ops):
            if not isinstance(item, (tuple, list)) or len(item) not in (3, 4) or item[0] not in ("send", "recv"):
                raise InvalidArgument(f"batch_isend_irecv: op {i} must be (\"send\" | \"recv\", arr, peer[, tag]), "
                                      f"got {item!r}")
            kind, arr, peer = item[:3]
            tag = item[3] if len(item) == 4 else 0
            works.append(self.isend(arr, peer, tag) if kind == "send" else self.irecv(arr, peer, tag))
        return works

    def post_transfer(self, is_send: bool, arr: Array, peer: Optional[int], tag: int, work) -> None:
        """:meth:`isend` (``is_send``) or :meth:`irecv` with a completion of the caller's own
        instead of a :class:`Work` (the torch backend's Work): ``work.complete(result, exc)``
        is called once the transfer ran (``result``: ``arr`` of a receive), after
        ``work.source`` was set to the sender of a receive from any source;
        ``work.description`` names the transfer in errors."""
        buf = as_buffer(arr, writable=not is_send, what="send buffer" if is_send else "recv buffer")
        what = "send to" if is_send else "recv from" if peer is not None else "recv from any source:"
        self._post(is_send, buf, peer, tag, None if is_send else arr, None, what, work)

    def flush_p2p(self) -> None:
        """Run the posted point-to-point transfers now (waiting on any of their works does)."""
        self._p2p.flush()

    def _post(self, is_send, buf, peer, tag, result, timeout, what, work=None):
        if peer is None and self.world_size < 2:
            buf.release()
            raise InvalidArgument(f"{what} no other rank: a group of one has nobody to receive from")
        if peer is not None and (type(peer) is not int or not 0 <= peer < self.world_size or peer == self.rank):
            buf.release()
            raise InvalidArgument(f"{what} rank {peer!r}: the peer must be another rank of this group (rank "
                                  f"{self.rank} of {self.world_size})")
        if type(tag) is not int:
            buf.release()
            raise InvalidArgument(f"{what} rank {peer}: tag must be an integer, got {tag!r}")
        if self._epoch.closed:
            buf.release()
            raise CollectiveError("communicator is closed")
        if work is None:
            work = P2PWork(f"{what} rank {peer}" if peer is not None else what.rstrip(":"), self._p2p,
                           -1 if peer is None else peer)
        self._p2p.add(Transfer(is_send, buf, peer, tag & 0xFFFFFFFF, result, timeout, work))
        return work

    def _run_transfers(self, batch):
        """Run queued transfers (P2PQueue's runner): one plan, or, around each receive from any
        source, one plan for those before it, the receive, one for the rest. Raises their
        failure."""
        limits = [t.timeout for t in batch if t.timeout is not None]
        timeout = min(limits) if limits else None

        def run():
            ep = self._epoch
            ep.ensure_ready(None)
            part = []
            for t in batch:
                if t.peer is not None:
                    part.append(t)
                    continue
                self._run_plan_of(part, timeout)
                part = []
                st, peer = engine.probe(ep.ccomm, P2P_SEQ, t.tag, ep.options.timeout if timeout is None else timeout)
                if st != lib.PC_OK:
                    raise ep.failure(st, -1, "recv from any source", ep.ccomm)
                t.peer = t.work.source = peer
                self._run_plan_of([t], timeout)
            self._run_plan_of(part, timeout)
        self._call_now(run, False, "point-to-point")

    def _run_plan_of(self, batch, timeout):
        """Transfers with known peers as one plan (inside _run_transfers' call)."""
        if batch:
            ep = self._epoch
            # one pass: each transfer's offset in the (packed) send or receive side
            sends, recvs, transfers, at = [], [], [], [0, 0]
            for t in batch:
                if t.peer >= ep.world_size or t.peer == ep.rank:
                    raise InvalidArgument(f"{t.work.description}: the group re-formed (now rank {ep.rank} of "
                                          f"{ep.world_size})")
                side = 1 if t.is_send else 0
                (sends if side else recvs).append(t)
                transfers.append((side, t.peer, at[side], t.buf.nbytes, t.tag))
                at[side] += t.buf.nbytes
            transfers = tuple(transfers)
            # one send (recv) uses the caller's memory as it is; several go through one buffer
            inb = (_EMPTY if not sends else sends[0].buf if len(sends) == 1
                   else _bytes_buffer(_pack([t.buf for t in sends], 1, raw=True), False))
            out = None if len(recvs) < 2 else np.empty(at[0], np.uint8)
            outb = _EMPTY if not recvs else recvs[0].buf if out is None else _bytes_buffer(out, True)
            call = ep.prepare_planned("p2p", transfers, lambda rank, n, o: exchange.p2p(rank, n, list(transfers)),
                                      inb, outb, 0, "sum")
            ep.launch(call, ffi.cast("void *", inb.address), ffi.cast("void *", outb.address), timeout, p2p=True)
            if out is not None:
                _unpack(out, [t.buf for t in recvs], 1)

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
                          retry: Union[bool, int] = True, threads: int = 0,
                          verify: bool = True) -> shared_state.SyncResult:
        """Make ``state`` bit-identical on every peer; returns a SyncResult.

        Every member must call it at the same point. Peers whose bytes differ
        from the majority, or whose ``revision`` is behind, receive the majority
        bytes in place (see :mod:`pycoll.comm.shared_state`). Afterwards every peer holds
        ``result.revision``. A lost peer restarts the sync over the survivors
        (``retry``, as for collectives). Raises InvalidArgument when peers
        disagree on names, dtypes or shapes. Received bytes are hashed as they land
        and checked against the majority (:class:`ParityError` on a mismatch);
        ``verify=False`` skips that check.
        """
        return shared_state.sync_shared_state(self._epoch, state, revision, timeout=timeout, retry=retry,
                                              threads=threads, verify=verify)

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

    @property
    def bytes_from_windows(self) -> int:
        """Of ``bytes_single_copy``, the bytes copied out of same-host peers' result windows this
        epoch: a preserving all-reduce's reduced chunks, copied into this peer's output once,
        after every transfer succeeded (no copy into scratch first)."""
        return engine.bytes_from_windows(self._epoch.ccomm)

    @property
    def bytes_from_shared(self) -> int:
        """Of ``bytes_single_copy``, the bytes read with plain loads out of same-host peers' shared
        buffers this epoch: a peer's buffer used call after call (DDP's buckets) is moved onto
        shared memory that this peer maps (csrc/core/shared_buffers.h), so its reads need no
        process_vm_readv; ``PYCOLL_SHARED_BUFFERS=0`` turns the moves off."""
        return engine.bytes_from_shared(self._epoch.ccomm)

    @property
    def wait_stats(self) -> dict:
        """How this peer waited for its peers this epoch: {"spun_seconds": s, "sleeps": n}, the
        time its engine spun (a CPU kept busy while nothing arrived) and the waits it slept
        through in the kernel instead. The engine spins only where its recent waits say a spin
        pays and never while other work wants the host's CPUs."""
        spun, sleeps = engine.wait_stats(self._epoch.ccomm)
        return {"spun_seconds": spun, "sleeps": sleeps}

    @property
    def single_copy_runs(self) -> dict:
        """This epoch's collectives big enough for single copy with same-host peers that allow it,
        by the way this peer sent them: {"single_copy": n, "rings": m} (``single_copy_adapt``
        chose the rings where they were timed faster, and for its probes)."""
        single, rings = engine.single_copy_runs(self._epoch.ccomm)
        return {"single_copy": single, "rings": rings}

    @property
    def single_copy_refused(self) -> dict:
        """Same-host peers whose memory the kernel refuses this peer to read, as {rank: reason}
        (e.g. "Operation not permitted" under Yama's ptrace_scope 2): their large payloads go
        through the shared-memory rings instead of single copy. Known once a connection has
        received (the first large call of an epoch warns about it in the log)."""
        return {p: os.strerror(err) for p, err in self._epoch.single_copy_refused().items()}

    # ---- lifetime ------------------------------------------------------
    def close(self) -> None:
        """Leave the group and release every socket and buffer."""
        ep = self._epoch
        if ep.closed:
            return
        ep.close()
        self._p2p.fail_all("communicator closed before the transfer ran (wait() on its work runs it)")
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


class _Described:
    """A buffer that names another dtype in the argument digest (scatter: the root's send and
    the others' empty input digest as recv's dtype)."""

    def __init__(self, buf, code):
        self.address, self.nbytes, self.count, self.dtype, self.code = buf.address, buf.nbytes, buf.count, \
            buf.dtype, code


def _check_rooted_algorithm(algorithm, what):
    if algorithm not in ("auto",) + exchange.ROOTED_ALGORITHMS:
        raise InvalidArgument(f"{what}: algorithm {algorithm!r} is not one of auto, "
                              f"{', '.join(exchange.ROOTED_ALGORITHMS)}")


def _check_apart(a, b, what):
    """Send and receive memory must not overlap (the plans read one while writing the other)."""
    if a.nbytes and b.nbytes and a.address < b.address + b.nbytes and b.address < a.address + a.nbytes:
        raise InvalidArgument(f"{what}: send and recv overlap; pass separate arrays")


def _splits(counts, total, n, what):
    """Elements per block: equal blocks of ``total`` (None), or ``counts`` checked."""
    if counts is None:
        if total % n:
            raise InvalidArgument(f"all_to_all: {what} has {total} elements, not a multiple of world size {n}")
        return [total // n] * n
    counts = [int(c) for c in counts]
    if len(counts) != n or min(counts) < 0 or sum(counts) != total:
        raise InvalidArgument(f"all_to_all: {what}_counts {counts} must be {n} non-negative counts summing to the "
                              f"{what} array's {total} elements")
    return counts


def _same_dtype_buffers(arrays, writable, what, dtype):
    if not isinstance(arrays, (list, tuple)):
        raise InvalidArgument(f"{what}: expected a list of arrays, got {type(arrays).__name__}")
    bufs = [as_buffer(a, writable=writable, what=f"{what} [{i}]", dtype=dtype) for i, a in enumerate(arrays)]
    for i, b in enumerate(bufs):
        if b.dtype != bufs[0].dtype:
            for x in bufs:
                x.release()
            raise InvalidArgument(f"{what}: array {i} is {b.dtype} but array 0 is {bufs[0].dtype}; one dtype per call")
    return bufs


def _check_pairs(small, big, n, what):
    """``big[i]`` must hold world_size x ``small[i]``'s elements."""
    if len(small) != len(big):
        raise InvalidArgument(f"{what}: {len(small)} and {len(big)} arrays; one output per input")
    for i, (s, b) in enumerate(zip(small, big)):
        if b.count != n * s.count or b.dtype != s.dtype:
            raise InvalidArgument(f"{what}: array {i}: {b.dtype} x {b.count} must be world size ({n}) x "
                                  f"{s.dtype} x {s.count}")


def _pack(bufs, blocks, raw=False):
    """A new array with ``bufs`` laid end to end, block by block: each buffer is cut in
    ``blocks`` equal blocks, and block r of every buffer comes before block r+1 of any
    (blocks=1: simply end to end). Its dtype has the buffers' item size (``raw``: bytes, for
    buffers of several dtypes)."""
    if raw or not bufs:
        flat = np.empty(sum(b.nbytes for b in bufs), np.uint8)
    else:
        flat = scratch_like(bufs[0], sum(b.count for b in bufs))
    rows = byte_view_of(flat).reshape(blocks, -1) if flat.nbytes else None
    at = 0
    for b in bufs:
        width = b.nbytes // blocks
        if width:
            rows[:, at:at + width] = byte_view(b).reshape(blocks, width)
        at += width
    return flat


def _unpack(flat, bufs, blocks):
    """The inverse of :func:`_pack`: ``flat``'s pieces back into ``bufs``."""
    if not flat.nbytes:
        return
    rows = byte_view_of(flat).reshape(blocks, -1)
    at = 0
    for b in bufs:
        width = b.nbytes // blocks
        if width:
            byte_view(b).reshape(blocks, width)[:] = rows[:, at:at + width]
        at += width


def byte_view_of(arr):
    return arr.reshape(-1).view(np.uint8)


def _bytes_buffer(arr, writable):
    return as_buffer(arr, writable=writable, what="point-to-point buffer", dtype="uint8")
_BARRIER_KEY = ("barrier",)
