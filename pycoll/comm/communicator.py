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
"""
from __future__ import annotations

import collections
import functools
import hashlib
import logging
import queue
import struct
import threading
import time
import zlib
from typing import Any, Optional, Union

import numpy as np

from pycoll.plan import compression as _compression
from pycoll.comm import agreement as consensus
from pycoll.plan import costmodel
from pycoll.core import engine
from pycoll import faults
from pycoll.plan import planners
from pycoll.comm import shared_state
from pycoll.plan import topology as _topology
from pycoll.core.native import ffi, lib
from pycoll.core.buffers import as_buffer
from pycoll.core.dtypes import op_code
from pycoll.comm.failures import FAILED, NOT_RUN, failure_error
from pycoll.errors import CollectiveError, CoordinatorError, InvalidArgument, PeerFailure
from pycoll.faults import fault_armed, fault_point
from pycoll.net.mesh import connect_mesh, local_peers, single_copy_bytes
from pycoll.net.links import settle
from pycoll import options as _options
from pycoll.options import Options
from pycoll.observability import Stat
from pycoll.comm.switch import EngineLayout, SwitchPath, split_members
from pycoll.net.links import set_keepalive
from pycoll.comm.work import Work

log = logging.getLogger("pycoll")



# (re-exported: the tests build the plans the communicator builds)
DEFAULT_TIMEOUT, DEFAULT_SEGMENT, DEFAULT_STALL = _options.DEFAULT_TIMEOUT, _options.DEFAULT_SEGMENT, _options.DEFAULT_STALL

# Bound once: the per-call path (Communicator._launch, _fast_run) runs every few microseconds.
_comm_run = engine.run  # the C function itself (pycoll.core.engine)
_clear_cancel = engine.clear_cancel
_from_buffer = ffi.from_buffer
_perf_counter = time.perf_counter
_thread_id = threading.get_ident
_tuple_new = tuple.__new__  # builds a Stat without the namedtuple's Python-level __new__
_NULL = ffi.NULL
_OK = lib.PC_OK
_ndarray = np.ndarray

# Public signatures: an array is a C-contiguous NumPy array or torch CPU tensor, used in place.
Array = Any
Tag = Union[str, int]


class _Call:
    """A prepared collective: what identical calls of one epoch share (plan,
    engine arguments, sizes). Only the buffers' addresses vary per call."""

    __slots__ = ("coll", "algorithm", "plan", "ptr", "ccomm", "switch", "desc", "ident", "code", "opc", "count",
                 "itemsize", "nbytes", "sizes")

    def __init__(self, coll, algorithm, plan, ccomm, switch, desc, ident, code, opc, count, itemsize, in_nbytes,
                 out_nbytes):
        self.coll, self.algorithm, self.plan, self.ptr, self.ident = coll, algorithm, plan, plan.ptr, ident
        self.ccomm, self.switch, self.desc, self.code, self.opc = ccomm, switch, desc, code, opc
        self.count, self.itemsize, self.nbytes = count, itemsize, max(in_nbytes, out_nbytes)
        self.sizes = ffi.new("uint64_t[2]", [in_nbytes, out_nbytes])  # read-only once made


class _Channel:
    """The connections of one tag (``tags=``) within an epoch: its calls pair
    across ranks by their order on it, and run beside other channels' calls
    (each holds its own lock, so one thread per tag at a time)."""

    __slots__ = ("tag", "ccomm", "seq", "lock", "bufs", "failed")

    def __init__(self, tag, ccomm):
        self.tag, self.ccomm, self.seq = tag, ccomm, 0
        self.lock = threading.Lock()
        self.bufs = ffi.new("void *[2]")
        self.failed = ffi.new("int32_t *")


class Communicator:
    """A group of peers that run collectives together. Use :func:`pycoll.init`
    or :func:`pycoll.connect` to make one."""

    def __init__(self, client, listener, options: Optional[Options] = None, *, coordinator=None, mesh_key=None,
                 **settings):
        """``options``: the settings, resolved (:meth:`pycoll.options.Options.resolve`); without
        them, ``settings`` (the same names as keywords) are resolved here, else they change
        ``options``. ``coordinator``: the in-process coordinator we host, if any (see
        :meth:`adopt_coordinator`); ``mesh_key`` authenticates peer connections (pycoll.auth)."""
        if options is None:
            options = Options.resolve(**settings)
        elif settings:
            options = options.replace(**settings)
        options = settle(options)  # stripes="auto" from the link or topology
        if options.mesh_timeout is None:
            options = options.replace(mesh_timeout=listener.limits.connect_timeout)
        options = options.replace(compression=_compression.codec_name(options.compression))
        self._options = options
        self._client = client
        self._listener = listener
        self._coordinator = coordinator  # the in-process coordinator we host, if any
        self._mesh_key = mesh_key  # authenticates peer connections (pycoll.auth); None: no secret
        # Algorithm choice (pycoll.plan.costmodel): a topology (file, TOML path or Topology) gives
        # groups, ring order and the cost model; without one, it is measured when an epoch is installed.
        self._topology = _topology.load(options.topology)
        self._selector = None
        self._hosts = None
        self._join_msg = None       # what we joined with (re-registration sends it again)
        if options.transport != "tcp":
            listener.enable_local()
        self.peer_transports = []   # per rank of this epoch: "shm", "tcp" or "self"
        self.rank = -1
        self.world_size = 0
        self.epoch = 0
        self.members = []
        self.lost = []              # names lost at the last membership change
        self.joined = []            # names admitted at the last membership change
        self.name = client.name     # this peer's stable name
        self.last_outcome = None    # consensus.Outcome of the last retry=/verify= collective
        self.stats = collections.deque(maxlen=10000)
        self._comm = None
        self._switch = None  # pycoll.comm.switch.SwitchPath when the epoch has standalone aggregators
        self._comm_lock = threading.Lock()   # guards self._comm against cancel-during-free
        self._exec_lock = threading.Lock()   # one collective at a time, in call order
        self._submit_lock = threading.Lock()
        self._queue = None
        self._worker = None
        self._inflight = 0
        self._seq = 0
        self._calls = 0             # untagged calls of this epoch made by the user (not internal ones)
        self._epoch_seq = 0         # _seq when the epoch was installed (after its calibration)
        self._plans = {}
        self._fast = {}             # call key -> _Call of this epoch (see _fast_run)
        self._broken = False
        self._aborted_epoch = -1    # highest epoch the coordinator said was aborted
        self._abort_reason = ""
        self._abort_lost = []
        self._closed = False
        self._cbufs = ffi.new("void *[2]")
        self._cfailed = ffi.new("int32_t *")
        # Tags (see all_reduce's tag=): one channel each, connections of their own.
        self._channels = {}         # tag -> _Channel of this epoch
        self._tag_broken = False    # a tagged call failed: the epoch must re-form
        self._settled = set()       # tags whose call of this epoch already failed (in flight or not run)
        self._owed = {}             # tag -> (epoch, seq): its next call reports that epoch's failure
        self._epoch_info = None     # (epoch, the coordinator's word on its failure)
        self._threads_seen = {}     # untagged calls in flight at once: warned once per thread pair
        self._holder = None         # thread id of the untagged call running now (see _contended)
        client.on_abort = self._on_abort

    # ---- settings (pycoll.options) ---------------------------------------
    @property
    def options(self) -> Options:
        """The communicator's settings (frozen). Each also reads as an attribute of the same
        name (``comm.timeout``); setting one (``comm.compression = "bf16"``) replaces this
        object with a checked copy, and the next calls follow it."""
        return self._options

    def _configure(self, **changes):
        """Replace the options with ``changes`` (checked as the constructor checks them)."""
        if "compression" in changes:
            changes["compression"] = _compression.codec_name(changes["compression"])
        options = self._options.replace(**changes)
        topology = _topology.load(options.topology) if "topology" in changes else self._topology
        self._options, self._topology = options, topology
        self._fast.clear()  # remembered calls were prepared under the old settings

    def _setting(name, doc, get=None):  # noqa: N805 - builds the properties below
        def setter(self, value):
            self._configure(**{name: value})
        return property(get or (lambda self: getattr(self._options, name)), setter, doc=doc)

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
                           "memory (0: never).", lambda self: single_copy_bytes(self._options.single_copy))
    compression = _setting("compression", "The default wire codec of float32 payloads.")
    topology = _setting("topology", "The topology (pycoll.plan.topology.Topology) or None.",
                        lambda self: self._topology)
    calibrate = _setting("calibrate", "Measure the cost model when an epoch is installed.")
    coordinator_wait = _setting("coordinator_wait", "Seconds to wait for a lost coordinator to come back.")
    sync_timeout = _setting("sync_timeout", "Seconds a sync point (forming an epoch) may take.")
    mesh_timeout = _setting("mesh_timeout", "Seconds to connect an epoch's mesh.")
    tags = _setting("tags", "The declared tags, in canonical order (see all_reduce's ``tag=``).")
    max_retries = _setting("max_retries", "Attempts of a retry=True collective beyond the first.")
    del _setting

    # ---- membership ----------------------------------------------------
    def _on_abort(self, msg):
        """Coordinator push (heartbeat thread): a member of an epoch failed.
        The epoch may be one we are still connecting for (mesh building
        watches _aborted_epoch)."""
        epoch = int(msg.get("epoch", -1))
        if epoch < self._aborted_epoch:
            return
        self._abort_reason = msg.get("why", "")
        self._abort_lost = list(msg.get("lost", []))
        self._aborted_epoch = epoch
        if epoch != self.epoch:
            return
        self.cancel()

    def _sync(self, rebuild, admit=False):
        """Reach a sync point with every live member; rebuild the mesh if the
        membership changed (or we must). Returns True if it changed.
        Joiners are admitted only when every member syncs with ``admit``
        (update_topology), never at a recovery sync. If a peer fails while
        the new mesh is being built, every member notices and syncs again."""
        deadline = time.monotonic() + self.sync_timeout
        if self._client.needs_rejoin:
            self._rejoin()
            rebuild = True
        while True:
            try:
                reply = self._client.request({"t": "sync", "epoch": self.epoch, "rebuild": rebuild, "admit": admit},
                                             timeout=max(1.0, deadline - time.monotonic()))
            except CoordinatorError:
                if not (self._client.needs_rejoin and self.coordinator_wait > 0):
                    raise
                self._rejoin()  # a restarted coordinator does not know us yet
                rebuild = True
                continue
            if reply.get("unchanged") and not rebuild and self._comm is not None:
                return False
            try:
                self._install_epoch(reply)
                return True
            except PeerFailure as exc:
                consensus.report_epoch_failure(self, reply["epoch"], f"building the mesh failed: {exc}",
                                               lib.PC_ERR_PEER)
                if time.monotonic() > deadline:
                    raise
                rebuild, admit = True, False

    def _rejoin(self):
        """The coordinator was lost (or dropped us): wait for one at the same
        address, register again with what we know of our epoch, and let the
        sync that follows re-form the group (membership and ranks)."""
        if self._client.evicted and (self.coordinator_wait <= 0 or self._join_msg is None):
            raise CoordinatorError(
                f"rank {self.rank} ({self.name}) was evicted from the group by the coordinator at "
                f"{self._client.endpoint}, which is alive: {self._client.evicted} (a peer silent longer than its "
                f"heartbeat timeout, {self._client.heartbeat_timeout:.1f} s here, e.g. a stopped process, counts as "
                "dead, and the group went on without it). To take part again, join anew with pycoll.connect(), or "
                "make the communicator with coordinator_wait=<seconds> to re-register automatically",
                evicted=True)
        if self.coordinator_wait <= 0 or self._join_msg is None:
            raise CoordinatorError(
                f"rank {self.rank}: lost contact with the coordinator at {self._client.endpoint}"
                + (f" ({self._client.evicted})" if self._client.evicted else "")
                + "; make the communicator with coordinator_wait=<seconds> to re-register automatically "
                "with a restarted coordinator, or restart the job from a checkpoint")
        if not self._client.wait_for_coordinator(self.coordinator_wait):
            raise CoordinatorError(f"no coordinator at {self._client.endpoint} within {self.coordinator_wait:.0f} s")
        resume = {"epoch": self.epoch, "members": list(self.members), "rank": self.rank}
        deadline = time.monotonic() + self.coordinator_wait
        while True:
            try:
                self._client.request(dict(self._join_msg, rank=None, world_size=None, resume=resume), timeout=10)
                break
            except CoordinatorError:
                if time.monotonic() > deadline:  # e.g. our old self is still being removed
                    raise
                time.sleep(0.2)
        log.warning("rank %d re-registered with the coordinator at %s", self.rank, self._client.endpoint)
        self._client.needs_rejoin = False
        self._client.evicted = None
        self._broken = True

    def _install_epoch(self, reply):
        self._drop_comm()
        members = reply["members"]
        rank = reply["rank"]
        addrs = [m[1] for m in members]
        epoch = reply["epoch"]
        if self.tags:
            self._listener.expect_meshes({self._channel_token(reply["token"])})
        links = connect_mesh(self._listener, rank, addrs, self.stripes, epoch, reply["token"],
                             self.mesh_timeout, self.sockbuf, key=self._mesh_key,
                             should_abort=lambda: self._aborted_epoch >= epoch,
                             local=local_peers(members, rank, self.transport), mode=self.transport)
        set_keepalive(links.fds, self.stall_timeout)
        nworkers, switches = split_members(members)
        hcomm = None
        if switches:  # standalone aggregators: the whole mesh for them, the workers' part for us
            workers = links.dup_prefix(nworkers * self.stripes)  # before the first comm takes links
            hcomm = self._create_comm(rank, len(members), links)
            links = workers
            members = members[:nworkers]
        comm = self._create_comm(rank, len(members), links)
        channels = self._connect_channels(rank, [m[1] for m in members], epoch, reply["token"], members)
        with self._comm_lock:
            self._comm = comm
        self.rank, self.world_size, self.epoch = rank, len(members), reply["epoch"]
        self.members = [m[0] for m in members]
        self._hosts = [m[2] if len(m) > 2 else None for m in members]
        self._selector = None
        self.peer_transports = ["self" if p == rank else "shm" if links.kinds[p * self.stripes] == lib.PC_CONN_SHM
                                else "tcp" for p in range(len(members))]
        self.lost = list(reply.get("lost", []))
        self.joined = list(reply.get("joined", []))
        self._seq = 0
        self._calls = 0
        self._plans.clear()
        self._fast.clear()
        self._broken = False
        self._tag_broken = False
        self._settled = set()
        if hcomm is not None:
            self._install_switches(hcomm, switches)
        # auto's cost model is measured here, at the sync point, by every member before any call
        # of the epoch: choosing an algorithm never runs a collective (not inside an agreed call,
        # not on a tag's thread). A peer lost meanwhile raises PeerFailure, as in building the
        # mesh: _sync reports the epoch failed and syncs again.
        try:
            self._calibrate_epoch()
        except BaseException:
            for ch in channels.values():
                engine.close(ch.ccomm)
            raise
        self._epoch_seq = self._seq
        if channels:
            with self._comm_lock:
                self._channels = channels
        log.info("epoch %d: rank %d of %d%s", self.epoch, rank, self.world_size,
                 f" (lost {len(self.lost)})" if self.lost else "")

    def _channel_token(self, token):
        """The mesh token of this epoch's tag channels (a hello for it is parked
        while the group's own mesh is accepted, see mesh.Listener)."""
        return hashlib.sha256(f"{token}/tags/{self.tags!r}".encode()).hexdigest()[:32]

    def _connect_channels(self, rank, addrs, epoch, token, members):
        """Tag channels: one more mesh of the workers with len(tags) x stripes
        connections per pair, cut into one C comm per tag."""
        if not self.tags or len(addrs) < 1:
            return {}
        ctoken = self._channel_token(token)
        k = len(self.tags)
        try:  # (connections that came early are parked for this token: accept_mesh takes them)
            links = connect_mesh(self._listener, rank, addrs, self.stripes * k, epoch, ctoken, self.mesh_timeout,
                                 self.sockbuf, key=self._mesh_key, should_abort=lambda: self._aborted_epoch >= epoch,
                                 local=local_peers(members, rank, self.transport), mode=self.transport)
        finally:
            self._listener.expect_meshes(())
        set_keepalive(links.fds, self.stall_timeout)
        channels = {}
        try:
            for i, tag in enumerate(self.tags):
                channels[tag] = _Channel(tag, self._create_comm(rank, len(addrs), links.channel(i, k, self.stripes)))
        except BaseException:
            for ch in channels.values():
                engine.close(ch.ccomm)
            raise
        return channels

    def _create_comm(self, rank, n, links):
        return engine.create(rank, n, self.stripes, links, spin_us=self.spin_us, single_copy=self.single_copy,
                             stall_timeout=self.progress_timeout or 0.0)

    def _install_switches(self, hcomm, switches):
        """Use the epoch's standalone aggregators for innetwork all-reduces, if they fit the topology."""
        elayout = EngineLayout(self._selector_for_epoch().layout, switches)
        if not elayout.usable:
            log.warning("epoch %d: standalone aggregators %s do not match the topology's switch groups; "
                        "not using them", self.epoch, sorted(switches))
        with self._comm_lock:  # kept even when unusable: the aggregators idle in the mesh until the next epoch
            self._switch = SwitchPath(hcomm, elayout, self.rank, self.stripes)

    def _drop_comm(self):
        with self._comm_lock:
            comm, self._comm = self._comm, None
            switch, self._switch = self._switch, None
            channels, self._channels = self._channels, {}
            self._fast.clear()  # its calls name the comm freed below
        for ch in channels.values():
            with ch.lock:  # a tagged call still running (cancelled by now) finishes first
                ccomm, ch.ccomm = ch.ccomm, None
            engine.close(ccomm)
        for c in (comm, switch.hcomm if switch is not None else None):
            engine.close(c)

    def update_topology(self) -> bool:
        """A sync point: every current member must call it (between steps).
        Admits pending joiners and drops dead members; returns True if the
        membership changed (then ``rank``, ``world_size``, ``members``,
        ``lost`` and ``joined`` describe the new group). Cheap when nothing
        changed: one round trip to the coordinator."""
        with self._exec_lock:
            if (getattr(self, "_fresh_join", None) == self.epoch and self._seq == self._epoch_seq and not self._broken
                    and self._aborted_epoch != self.epoch and not self._client.needs_rejoin):
                # pycoll.connect returned at the members' update_topology(): this call is that one
                # (a sync now would wait for the members' next one while they wait in a collective)
                self._fresh_join = None
                return False
            return self._sync(rebuild=self._broken or self._aborted_epoch == self.epoch, admit=True)

    @property
    def aggregators(self) -> list:
        """Names of the groups whose standalone aggregator (``pycoll aggregator``) serves this
        epoch's innetwork all-reduces (empty: agent mode everywhere)."""
        sw = self._switch
        if sw is None or not sw.usable:
            return []
        groups = sw.elayout.groups
        return sorted(groups)

    def pending_joiners(self) -> int:
        """Number of peers waiting to be admitted (from the last heartbeat)."""
        status = self._client.last_status
        if status.get("epoch", self.epoch) < self.epoch:
            return 0  # from before our epoch formed: its "pending" counted us
        return int(status.get("pending", 0))

    # ---- running collectives ------------------------------------------
    def _selector_for_epoch(self):
        """The epoch's algorithm choice: its layout and cost model (see _calibrate_epoch)."""
        if self._selector is None:
            self._selector = costmodel.Selector(self.world_size, self.topology, self._hosts, self.segment_bytes)
        return self._selector

    def _calibrate_epoch(self):
        """Measure the cost model of the epoch just installed (costmodel.calibrate: a few ring
        all-reduces), when calibration is on and no topology gives the model. Every member runs
        it at the end of _install_epoch, so every member's calls of the epoch start at the same
        sequence number and every rank builds the same model."""
        sel = self._selector_for_epoch()
        if not (self.calibrate and sel.needs_calibration):
            return
        try:
            model = costmodel.calibrate(self._calibration_allreduce, self.world_size, sel.layout.hosts)
        except CollectiveError as exc:
            if isinstance(exc, PeerFailure) and exc.lost:
                raise  # a member died: _sync re-forms the group now
            # The epoch failed for another reason while we measured: a faster rank, done
            # measuring, already ran a call that failed (a mismatch, a timeout). That call is
            # this rank's next one: it raises there ("did not run"), so install completes
            # with the default model, which no collective of this failed epoch will use.
            log.info("epoch %d: calibration stopped (%s); the next call reports it", self.epoch, exc)
            self._aborted_epoch = max(self._aborted_epoch, self.epoch)
            self._broken = False  # (the measurement is not a call of the user's: that one still owes it)
            model = costmodel.CostModel(self.world_size, host_of=sel.layout.hosts)
        log.debug("epoch %d: cost model %r", self.epoch, model)
        self._selector = costmodel.Selector(self.world_size, self.topology, self._hosts, self.segment_bytes, model)

    def _calibration_allreduce(self, arr, op):
        """A ring all-reduce for the cost model's measurement (no stats, no faults), run while the
        epoch is installed: straight to the engine, not through _execute's readiness checks
        (which would sync again); an abort of the epoch cancels it (see _launch)."""
        if faults.FAULTS_ARMED:  # test harness: die while the epoch is being installed
            fault_point("calibrate")
        buf = as_buffer(arr, writable=True, what="calibration buffer")
        call = self._prepare("all_reduce", buf, buf, buf.count, op, 0, "ring", False, None)
        ptr = ffi.cast("void *", buf.address)
        self._launch(call, ptr, ptr, None, internal=True)

    def _plan(self, coll, algorithm, count, itemsize, root, avg, preserve, codec="none"):
        key = (coll, algorithm, count, itemsize, root, avg, preserve, codec)
        plan = self._plans.get(key)
        if plan is None:
            plan = planners.build(algorithm, coll, self._selector_for_epoch().layout, self.rank, count, itemsize,
                                  root=root, segment_bytes=self.segment_bytes, stripes=self.stripes,
                                  preserve=preserve, avg=avg)
            plan = _compression.compress(plan, codec)
            if len(self._plans) > 256:
                self._plans.clear()
            self._plans[key] = plan
        return plan

    def _ensure_ready(self, ident=None):
        """Ready the epoch for a call (``ident``: its identity, see _identity)."""
        if self._closed:
            raise CollectiveError("communicator is closed")
        if None in self._owed:  # a tagged call re-formed the group before we heard of the failure
            raise self._not_run(self._owed.pop(None))
        if self._aborted_epoch == self.epoch and not self._broken:
            # The epoch failed after our last call finished. Peers that were
            # inside a collective got the error there; we report it on this
            # call (not run) so every rank fails that call exactly once, and
            # all are at the same call afterwards.
            self._broken = True
            info = self._abort_info_now()
            if (ident is not None and info.get("call") is not None and info.get("seq") == self._calls + 1
                    and info["call"] != ident):
                # The call that failed was #seq, and ours is not it: we skipped it
                # (the others' next call is ours). Run ours in the re-formed group.
                log.warning("rank %d: the others' call #%d of epoch %d failed (%s) and this rank never made "
                            "it; this call runs in the re-formed group", self.rank, self._calls + 1, self.epoch,
                            info.get("why") or self._abort_reason)
                self._carry_owed()
                self._sync(rebuild=True)
                return
            raise self._not_run(self.epoch)
        if self._broken or self._tag_broken or self._comm is None or self._client.needs_rejoin:
            self._carry_owed()
            self._sync(rebuild=True)

    def _abort_info_now(self):
        """The coordinator's word on the current epoch's failure (asked once;
        the push may have gone out before the cause was known)."""
        if self._epoch_info is None or self._epoch_info[0] != self.epoch:
            info = consensus.report_epoch_failure(self, self.epoch, "a call found the epoch aborted")
            self._epoch_info = (self.epoch, info)
        return self._epoch_info[1]

    def _not_run(self, epoch):
        """The error of a call that did not run because ``epoch`` failed before it."""
        info = self._epoch_info[1] if self._epoch_info is not None and self._epoch_info[0] == epoch else {}
        return failure_error(NOT_RUN, info, rank=self.rank, epoch=epoch, why=self._abort_reason,
                             lost=self._abort_lost, members=self.members)

    def _carry_owed(self):
        """Before the group re-forms after a failure: every channel that has not
        failed a call for it yet (untagged or tagged) fails its next one, in
        the new epoch, so that it stays paired with the ranks where that
        channel's call was in flight."""
        if self._aborted_epoch != self.epoch:
            return
        self._abort_info_now()
        for tag in self._channels:
            if tag not in self._settled:
                self._owed[tag] = self.epoch
        if not self._broken:
            self._owed[None] = self.epoch

    def _contended(self):
        """Another thread is inside an untagged call: untagged calls pair by call
        order across ranks, which differs between ranks when threads race, so
        say so (once per pair of threads), then wait for our turn."""
        holder, me = self._holder, _thread_id()
        worker = self._worker.ident if self._worker is not None else None
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

    def _tag_needs_care(self, tag):
        return (self._closed or self._broken or self._tag_broken or self._aborted_epoch == self.epoch
                or tag in self._owed or self._client.needs_rejoin)

    def _run_tagged(self, tag, run, description):
        """Run ``run(chan)`` on ``tag``'s channel, beside calls on other channels
        (blocking: tagged calls are made from threads of one's own). When the
        epoch fails, every channel fails exactly one call, the one it was
        running or else its next, as untagged calls do."""
        if tag not in self.tags:
            raise InvalidArgument(f"{description}: tag {tag!r} was not declared: make the communicator with "
                                  f"tags=(...) naming it (declared: {list(self.tags)})")
        for _ in range(100):  # each turn runs, raises, or re-forms the epoch
            chan = self._channels.get(tag)
            if chan is not None and not self._tag_needs_care(tag):
                with chan.lock:
                    if chan.ccomm is not None and not self._tag_needs_care(tag):
                        return run(chan)
            with self._exec_lock:  # the untagged calls' lock: re-forming waits for none of ours
                self._holder = None  # (not an untagged call: see _contended)
                self._ready_tag(tag)
        raise CollectiveError(f"{description} (tag {tag!r}): the group kept re-forming; giving up")

    def _ready_tag(self, tag):
        if self._closed:
            raise CollectiveError("communicator is closed")
        if tag in self._owed:
            raise self._not_run(self._owed.pop(tag))
        if self._aborted_epoch == self.epoch and tag not in self._settled and tag in self._channels:
            self._settled.add(tag)
            self._tag_broken = True
            self._abort_info_now()
            raise self._not_run(self.epoch)
        if (self._broken or self._tag_broken or self._comm is None or self._client.needs_rejoin
                or self._aborted_epoch == self.epoch):
            self._carry_owed()
            self._sync(rebuild=True)
        if tag not in self._channels:
            raise CollectiveError(f"tag {tag!r}: this epoch has no channel for it")

    def _codec(self, coll, dtype, compression):
        """The wire codec for this call: float32 of a compressible collective
        only (a per-call request for anything else is an error)."""
        name = self.compression if compression is None else _compression.codec_name(compression)
        if name == "none" or self.world_size < 2:
            return "none"
        if coll in _compression.COMPRESSIBLE and dtype == "float32":
            return name
        if compression is not None:
            raise InvalidArgument(f"{coll}: compression={compression!r} applies to float32 all_reduce, all_gather "
                                  f"and reduce_scatter only (got {dtype})")
        return "none"

    def _execute(self, coll, inbuf, outbuf, count, op, root, algorithm, timeout, preserve, compression=None,
                 internal=False, agree=None, fast_key=None, chan=None):
        """Run one collective on the current epoch; raises on failure.
        ``agree`` (a consensus.Agreement) runs it with outcome consensus.
        ``fast_key``: remember this call's prepared state under that key, so
        that the same call again can skip straight to the engine
        (:meth:`_fast_run`). ``chan``: a tag's channel (see _run_tagged,
        which readied the epoch)."""
        if chan is not None:
            call = self._prepare(coll, inbuf, outbuf, count, op, root, algorithm, preserve, compression, chan)
            return self._launch(call, ffi.cast("void *", inbuf.address), ffi.cast("void *", outbuf.address),
                                timeout, internal, chan=chan)
        if agree is not None:
            agree.skip = consensus.begin(self)
            if agree.root_name is not None:
                root = agree.root(self)
        else:
            ident = _identity(coll, inbuf.code, op, count, root, algorithm, compression)
            self._ensure_ready(None if internal else ident)
        call = self._prepare(coll, inbuf, outbuf, count, op, root, algorithm, preserve, compression)
        if agree is not None:
            return self._launch(call, ffi.cast("void *", inbuf.address), ffi.cast("void *", outbuf.address),
                                timeout, internal, agree, inbuf, outbuf)
        if fast_key is not None and not internal and call.switch is None:
            if len(self._fast) > 256:
                self._fast.clear()
            try:
                self._fast[fast_key] = call
            except TypeError:  # an unhashable argument that passed the checks: just not remembered
                pass
        return self._launch(call, ffi.cast("void *", inbuf.address), ffi.cast("void *", outbuf.address), timeout,
                            internal)

    def _prepare(self, coll, inbuf, outbuf, count, op, root, algorithm, preserve, compression, chan=None):
        """Check the arguments against this epoch and build (or find) the
        plan: a :class:`_Call`, the same for the same arguments and epoch."""
        algorithm = planners.check_algorithm(algorithm)
        chosen = self._selector_for_epoch().choose(coll, algorithm, max(inbuf.nbytes, outbuf.nbytes))
        if not 0 <= root < self.world_size:
            raise InvalidArgument(f"root {root} is not a rank of this group (world size {self.world_size})")
        opc = op_code(op)
        avg = opc == lib.PC_AVG
        itemsize = inbuf.nbytes // max(inbuf.count, 1) if inbuf.count else lib.pc_dtype_size(inbuf.code)
        codec = self._codec(coll, inbuf.dtype, compression)
        switch = self._switch if self._switch is not None and self._switch.usable and chan is None else None
        if switch is not None and switch.applies(coll, chosen, opc, count):
            codec = "none"  # a standalone aggregator sums plain float32
            plan = switch.plan(count, itemsize, self.segment_bytes, preserve)
            ccomm = switch.hcomm
        else:
            switch, ccomm = None, self._comm if chan is None else chan.ccomm
            plan = self._plan(coll, chosen, count, itemsize, root, avg, preserve, codec)
        desc = _digest(coll, inbuf.code, opc, count, root, chosen, codec)
        ident = _identity(coll, inbuf.code, op, count, root, algorithm, compression)
        return _Call(coll, chosen, plan, ccomm, switch, desc, ident, inbuf.code, opc, count, itemsize, inbuf.nbytes,
                     outbuf.nbytes)

    def _launch(self, call, inptr, outptr, timeout, internal=False, agree=None, inbuf=None, outbuf=None, chan=None):
        """Run a prepared call on the memory at ``inptr``/``outptr`` (cffi
        pointers). Everything per call happens here, for both paths."""
        if chan is not None:  # a tag's channel: its own sequence and argument arrays
            chan.seq += 1
            seq, bufs, failed = chan.seq, chan.bufs, chan.failed
        else:
            self._seq += 1
            seq = self._seq
            if not internal:
                self._calls += 1
            bufs, failed = self._cbufs, self._cfailed  # reused: one collective at a time
        bufs[0] = inptr
        bufs[1] = outptr
        coll = call.coll
        if faults.FAULTS_ARMED and not internal:  # test harness only
            fault_point(f"before:{coll}")
            if fault_armed(f"during:{coll}"):  # die while the collective runs
                threading.Timer(0.002, fault_point, (f"during:{coll}",)).start()
        if timeout is None:
            timeout = self._options.timeout
        ccomm = call.ccomm
        _clear_cancel(ccomm)
        if self._aborted_epoch == self.epoch:  # the abort came before the clear: keep its cancel
            engine.cancel(ccomm)
        switch = call.switch
        if agree is not None:
            announce = (functools.partial(switch.announce, self._seq, call.desc, call.code, call.opc, call.count,
                                          call.itemsize, timeout)
                        if switch is not None else None)  # tell our switches what comes (pycoll.comm.switch)
            return agree.run(self, coll, call.algorithm, call.plan, bufs, call.sizes, inbuf, outbuf, call.opc,
                             call.desc, timeout, ccomm, announce)
        t0 = _perf_counter()
        st = _OK
        if switch is not None:  # tell our switches what comes (pycoll.comm.switch)
            st, failed[0] = switch.announce(self._seq, call.desc, call.code, call.opc, call.count, call.itemsize,
                                            timeout)
        if st == _OK:
            st = _comm_run(ccomm, call.ptr, bufs, call.sizes, call.code, call.opc, seq, call.desc, timeout, failed)
        dt = _perf_counter() - t0
        if not internal:
            self.stats.append(_tuple_new(Stat, (coll, call.algorithm, call.nbytes, dt, self.world_size, self.epoch,
                                                st == _OK, 0)))
        if st == _OK:
            if log.isEnabledFor(logging.DEBUG):
                log.debug("rank %d/%d epoch %d: %s %s %d B in %.3f ms (%.3f GB/s)", self.rank, self.world_size,
                          self.epoch, coll, call.algorithm, call.nbytes, dt * 1e3,
                          call.nbytes / dt / 1e9 if dt > 0 else 0.0)
            return call.algorithm
        log.info("rank %d/%d epoch %d: %s %s failed after %.3f ms (status %d)", self.rank, self.world_size,
                 self.epoch, coll, call.algorithm, dt * 1e3, st)
        if chan is not None:
            raise self._tag_failure(st, int(failed[0]), coll, chan)
        # (identity, number) of the user's call; an internal one (the cost model's measurement while
        # the epoch is installed) is no user's call
        ident = None if internal or call.ident is None else (call.ident, self._calls)
        raise self._failure(st, int(failed[0]), coll, ccomm, ident)

    def _fast_call(self, key):
        """The prepared call remembered under ``key`` (see :meth:`_fast_run`),
        or None; ``key`` is the collective, its arguments and its arrays'
        dtypes and sizes (a change of settings forgets every call, see _configure)."""
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
            if (self._inflight or call.ccomm is not self._comm or self._broken or self._closed
                    or self._aborted_epoch == self.epoch or faults.FAULTS_ARMED or self._client.needs_rejoin):
                return None
            return self._launch(call, inptr, outptr, timeout)  # the exports keep the memory alive
        finally:
            self._exec_lock.release()

    def _failure(self, st, peer, coll, ccomm=None, ident=None):
        message = engine.last_error(ccomm or self._comm)
        if st == lib.PC_ERR_ARG:  # bad arguments: nothing was sent, the mesh is intact
            return engine.error(None, st, coll, peer, message)
        self._broken = True
        return self._explain(st, peer, coll, message, ident)

    def _tag_failure(self, st, peer, coll, chan):
        """A tagged call failed: the epoch re-forms at the next call; the
        other channels' next calls report the failure (see _run_tagged)."""
        message = engine.last_error(chan.ccomm)
        if st == lib.PC_ERR_ARG:
            return engine.error(None, st, f"{coll} (tag {chan.tag!r})", peer, message)
        self._tag_broken = True
        self._settled.add(chan.tag)
        return self._explain(st, peer, f"{coll} (tag {chan.tag!r})", message, None)

    def _explain(self, st, peer, coll, message, ident):
        """The exception for a failed collective, on the coordinator's word."""
        # Let everyone else abort now rather than at their timeout, and learn
        # the cause (who was lost) so the error can name it.
        info = consensus.report_epoch_failure(self, self.epoch, message, st, call=ident)
        self._epoch_info = (self.epoch, info)
        exc = failure_error(FAILED, info, rank=self.rank, epoch=self.epoch, what=coll, status=st, peer=peer,
                            message=message, aborted=self._aborted_epoch == self.epoch, why=self._abort_reason)
        if self._channels:
            # Our report aborted the epoch (the coordinator tells only the others): every
            # other channel's call fails too, and the idle ones owe it (see _carry_owed).
            self._aborted_epoch = max(self._aborted_epoch, self.epoch)
            self.cancel()
        return exc

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
        work = Work(description)
        with self._submit_lock:
            # close() sets _closed before it stops the worker: nothing queued now would run
            if not self._closed:
                if self._worker is None:
                    self._queue = queue.Queue()
                    self._worker = threading.Thread(target=self._worker_loop, name="pycoll-worker", daemon=True)
                    self._worker.start()
                self._inflight += 1
                self._queue.put((fn, work, bufs))
                return work
        self._run_pinned(lambda: None, bufs)  # unpin
        work.complete(None, CollectiveError(f"{description}: communicator is closed"))
        return work

    def _worker_loop(self):
        while True:
            item = self._queue.get()
            if item is None:
                break
            fn, work, bufs = item
            del item
            with self._exec_lock:
                try:
                    result, exc = self._run_pinned(fn, bufs), None
                except BaseException as e:  # noqa: BLE001 - handed to the waiter
                    result, exc = None, e
            del fn, bufs  # the caller's memory is theirs again
            with self._submit_lock:
                self._inflight -= 1
            work.complete(result, exc)
            del work, result, exc
        # Closed: what was queued after the stop (a _submit racing close()) fails, never hangs.
        while True:
            with self._submit_lock:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    return
                if item is not None:
                    self._inflight -= 1
            if item is not None:
                self._run_pinned(lambda: None, item[2])
                item[1].complete(None, CollectiveError(f"{item[1].description}: communicator is closed"))

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
                consensus.run_agreed(self, lambda agree: self._execute(
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
                consensus.run_agreed(self, lambda agree: self._execute(
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
                consensus.run_agreed(self, lambda agree: self._execute(
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
        with self._comm_lock:
            for c in (self._comm, self._switch.hcomm if self._switch is not None else None):
                if c is not None:
                    engine.cancel(c)
            for ch in self._channels.values():
                if ch.ccomm is not None:
                    engine.cancel(ch.ccomm)

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
        return shared_state.sync_shared_state(self, state, revision, timeout=timeout, retry=retry, threads=threads)

    def verify_parity(self, state: dict, revision: int = 0, *, timeout: Optional[float] = None,
                      threads: int = 0) -> shared_state.ParityReport:
        """Check, without fixing, that every peer holds the same bytes: returns
        a ParityReport (``report.ok``). Every member must call it together."""
        return shared_state.verify_parity(self, state, revision, timeout=timeout, threads=threads)

    # ---- measurement ---------------------------------------------------
    def stream_ring(self, nbytes: int, timeout: float = 60.0) -> float:
        """Raw transport ceiling: every rank streams nbytes to its right-hand
        neighbour while receiving as many from the left (no reduction).
        Returns seconds."""
        with self._exec_lock:
            self._ensure_ready()
            st, secs = engine.stream_ring(self._comm, nbytes, timeout)
            if st != lib.PC_OK:
                raise self._failure(st, -1, "stream_ring")
            return secs

    @property
    def bytes_sent(self) -> int:
        """Bytes this epoch's connections carried out of this peer."""
        return engine.bytes_sent(self._comm)

    @property
    def bytes_single_copy(self) -> int:
        """Bytes this peer copied straight out of same-host peers' memory this
        epoch (single copy, see ``single_copy``), instead of through a ring."""
        return engine.bytes_single_copy(self._comm)

    # ---- lifetime ------------------------------------------------------
    def close(self) -> None:
        """Leave the group and release every socket and buffer."""
        if self._closed:
            return
        self._closed = True
        if self._worker is not None:
            self._queue.put(None)
            self._worker.join(timeout=self.timeout)
        try:
            self._client.request({"t": "leave"}, timeout=2.0)
        except CollectiveError:
            pass
        self._drop_comm()
        self._listener.close()
        if self._coordinator is not None:
            self._linger_coordinator()
        self._client.close()

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


@functools.lru_cache(maxsize=4096)
def _digest(coll, dtype_code, op_code_, count, root, algorithm, codec="none"):
    """32-bit digest of a collective's arguments, carried in every frame so
    that mismatched calls across ranks are detected by the receiver."""
    return zlib.crc32(struct.pack("<iiiQi8s4s", planners.COLLECTIVES[coll], dtype_code, op_code_, count, root,
                                  algorithm.encode()[:8], codec.encode()[:4]))


@functools.lru_cache(maxsize=4096)
def _identity(coll, dtype_code, op, count, root, algorithm, compression):
    """32-bit digest of a call as the caller wrote it (before ``auto`` chooses),
    so that a rank can tell, without running anything, whether its call is
    the one the others failed in."""
    return zlib.crc32(repr((coll, dtype_code, str(op), count, root, str(algorithm), str(compression))).encode())


class _Empty:
    address = 0
    nbytes = 0
    count = 0
    dtype = "uint8"
    code = lib.PC_U8


_EMPTY = _Empty()
_BARRIER_KEY = ("barrier",)
