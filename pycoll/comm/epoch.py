"""The Epoch: a communicator's membership epochs, their connections, their calls' sequence and
their failures.

A :class:`pycoll.Communicator` has one :class:`Epoch` for its whole life. The Epoch moves the
communicator from one membership epoch to the next and owns everything that must agree across
ranks within one:

* **who**: ``number`` (the epoch), ``rank``, ``world_size``, ``members`` (names, rank order),
  ``lost`` and ``joined`` (at the last change), ``peer_transports``;
* **the connections**: ``ccomm`` (the workers' C communicator), ``switch`` (the route through
  standalone aggregators, :class:`pycoll.comm.switch.SwitchPath`) and ``channels`` (one
  :class:`Channel` per tag); made by :meth:`install` at each :meth:`sync`, freed by :meth:`drop`,
  cancelled by :meth:`cancel`;
* **the sequence**: ``seq``, the number every frame of a call carries, the same on every rank;
  :meth:`next_seq` is the one place it (or a channel's) advances;
* **the failure state**: ``broken`` (the epoch must re-form before the next call),
  ``aborted_epoch`` and ``abort_reason`` (the coordinator's push, :meth:`on_abort`), what each tag
  still owes; :meth:`ensure_ready`/:meth:`ready_tag` apply the late-call rule (every rank fails
  the same call exactly once, see docs/fault-model.md), :meth:`failure`/:meth:`tag_failure`
  report a failed call (:meth:`report_failure`) and say what it raises
  (:func:`pycoll.comm.failures.failure_error`);
* **planning and running**: the epoch's algorithm choice (:meth:`selector`, its cost model
  measured once, when the epoch is installed), plans (:meth:`prepare`) and :meth:`launch`, which
  runs a prepared call on the engine;
* the **settings** (``options``, :class:`pycoll.options.Options`), the coordinator's ``client``,
  the ``stats`` of calls and the ``last_outcome`` of an agreed one.

The communicator (the public API, its fast path, async work, tags' threads), agreed calls
(:mod:`pycoll.comm.agreement`) and shared state (:mod:`pycoll.comm.shared_state`) work through
this interface; none of them reads another object's private state.
"""
from __future__ import annotations

import collections
import functools
import hashlib
import logging
import os
import struct
import threading
import time
import zlib

from pycoll import faults
from pycoll.comm import failover
from pycoll.comm.failures import FAILED, NOT_RUN, failure_error
from pycoll.comm.switch import EngineLayout, SwitchPath, split_members
from pycoll.core import engine
from pycoll.core.buffers import as_buffer
from pycoll.core.dtypes import check_op, op_code
from pycoll.core.native import ffi, lib
from pycoll.errors import CollectiveError, CoordinatorError, InvalidArgument, PeerFailure
from pycoll.faults import fault_armed, fault_point
from pycoll.net.links import set_keepalive, settle
from pycoll.net.mesh import connect_mesh, data_plane_key, local_peers, single_copy_bytes
from pycoll.net import probe as _probe
from pycoll.observability import Stat
from pycoll.plan import compression as _compression
from pycoll.plan import costmodel, planners, remap
from pycoll.plan import topology as _topology

__all__ = ["Epoch", "Call", "Channel"]

log = logging.getLogger("pycoll")

# Bound once: the per-call path (Epoch.launch) runs every few microseconds.
_comm_run = engine.run  # the C function itself (pycoll.core.engine)
_clear_cancel = engine.clear_cancel
_perf_counter = time.perf_counter
_tuple_new = tuple.__new__  # builds a Stat without the namedtuple's Python-level __new__
_OK = lib.PC_OK


class Call:
    """A prepared collective: what identical calls of one epoch share (plan,
    engine arguments, sizes). Only the buffers' addresses vary per call."""

    __slots__ = ("coll", "algorithm", "plan", "ptr", "ccomm", "switch", "desc", "ident", "code", "opc", "count",
                 "itemsize", "nbytes", "sizes", "nbufs")

    def __init__(self, coll, algorithm, plan, ccomm, switch, desc, ident, code, opc, count, itemsize, in_nbytes,
                 out_nbytes):
        self.coll, self.algorithm, self.plan, self.ptr, self.ident = coll, algorithm, plan, plan.ptr, ident
        self.ccomm, self.switch, self.desc, self.code, self.opc = ccomm, switch, desc, code, opc
        self.count, self.itemsize, self.nbytes = count, itemsize, max(in_nbytes, out_nbytes)
        self.sizes = ffi.new("uint64_t[2]", [in_nbytes, out_nbytes])  # read-only once made
        self.nbufs = 0  # > 0: a remapped plan over that many buffers (Epoch.prepare_remapped)


class Channel:
    """The connections of one tag (``tags=``) within an epoch: its calls pair
    across ranks by their order on it, and run beside other channels' calls
    (each holds its own lock, so one thread per tag at a time)."""

    __slots__ = ("tag", "ccomm", "seq", "lock", "bufs", "failed")

    def __init__(self, tag, ccomm):
        self.tag, self.ccomm, self.seq = tag, ccomm, 0
        self.lock = threading.Lock()
        self.bufs = ffi.new("void *[2]")
        self.failed = ffi.new("int32_t *")


class Epoch:
    """One communicator's membership epochs (see the module doc)."""

    def __init__(self, client, listener, options, *, mesh_key=None, join=None, standby=None):
        """``options``: resolved (:meth:`pycoll.options.Options.resolve`); ``mesh_key``
        authenticates peer connections (pycoll.auth; None: no secret); ``join``: the message
        this peer joined with (re-registration with a restarted coordinator sends it again);
        ``standby``: the :class:`pycoll.comm.failover.Standby` that lets this peer succeed a
        lost coordinator (None: no failover)."""
        self.options = self._complete(options, listener)
        # Algorithm choice (pycoll.plan.costmodel): a topology (file, TOML path or Topology) gives
        # groups, ring order and the cost model; without one, it is measured when an epoch is installed.
        self.topology = _topology.load(self.options.topology)
        # topology="measure": probed at every epoch whose members differ from the last probe's
        self.probe_result = None
        self._probed = None  # (members, Topology) of the last probe
        self.client = client
        self.listener = listener
        self._mesh_key = mesh_key
        # PYCOLL_ENCRYPT: TCP connections under TLS 1.3 with a key from the group secret
        self._tls_key = data_plane_key(mesh_key)
        self._join_msg = join
        self.standby = standby
        self.on_host = None         # called with the coordinator this peer starts as a successor
        self._cut_off = False       # a failover found the coordinator alive for the others: we are cut off
        self._fo_lock = threading.Lock()  # one failover at a time (the caller's, or the heartbeat thread's)
        self._fresh_failover = False  # the heartbeat thread's failover re-registered us
        self._installing = None     # the epoch whose mesh is being built (a failover aborts it)
        self._addrs = []            # per rank of this epoch: the data listener's (host, port)
        self._standby_ports = []    # per rank: the port kept for a successor coordinator (0: none)
        self._coord_host = None      # the member whose process hosts the coordinator (the epoch says), if any
        self._fresh_join = None     # the epoch pycoll.connect returned in (see update_topology)
        if self.options.transport != "tcp":
            listener.enable_local()
        # who
        self.name = client.name     # this peer's stable name
        self.number = 0
        self.rank = -1
        self.world_size = 0
        self.members = []
        self.lost = []              # names lost at the last membership change
        self.joined = []            # names admitted at the last membership change
        self.peer_transports = []   # per rank of this epoch: "shm", "tcp" or "self"
        # single copy on, a same-host peer, no call yet big enough to tell whether the kernel
        # refused a read: the threshold such a call reaches (0: nothing to tell)
        self._refusal_check_from = 0
        self._hosts = None
        # the connections
        self.ccomm = None
        self.switch = None          # pycoll.comm.switch.SwitchPath when the epoch has standalone aggregators
        self.channels = {}          # tag -> Channel of this epoch (tags=, see all_reduce's tag=)
        self._comm_lock = threading.Lock()   # guards the C handles against cancel-during-free
        self.exec_lock = threading.Lock()    # one untagged collective at a time, in call order
        # the sequence
        self.seq = 0
        self._calls = 0             # untagged calls of this epoch made by the user (not internal ones)
        self._epoch_seq = 0         # seq when the epoch was installed (after its calibration)
        self._cbufs = ffi.new("void *[2]")
        self._cfailed = ffi.new("int32_t *")
        # the failure state
        self.closed = False
        self.broken = False
        self.aborted_epoch = -1     # highest epoch the coordinator said was aborted
        self.abort_reason = ""
        self._abort_lost = []
        self._tag_broken = False    # a tagged call failed: the epoch must re-form
        self._settled = set()       # tags whose call of this epoch already failed (in flight or not run)
        self._owed = {}             # tag -> epoch: its next call reports that epoch's failure
        self._owed_lock = threading.Lock()  # _settled and _owed: a tag's thread and a re-forming one
        self._epoch_info = None     # (epoch, the coordinator's word on its failure)
        # planning
        self._selector = None
        self._plans = {}
        self.fast = {}              # call key -> Call of this epoch (the communicator's fast path)
        # records
        self.last_outcome = None    # agreement.Outcome of the last retry=/verify= collective
        self.stats = collections.deque(maxlen=10000)
        client.on_abort = self.on_abort
        client.on_evicted = self.on_evicted

    # ---- settings ------------------------------------------------------
    @staticmethod
    def _complete(options, listener):
        """``options`` made concrete: stripes="auto" settled, the mesh timeout and the codec named."""
        options = settle(options)  # stripes="auto": from the link or topology
        if options.mesh_timeout is None:
            options = options.replace(mesh_timeout=listener.limits.connect_timeout)
        return options.replace(compression=_compression.codec_name(options.compression))

    def configure(self, **changes):
        """Replace the options with ``changes``, checked as when the communicator was made;
        the next calls follow them (remembered calls are forgotten)."""
        if "compression" in changes:
            changes["compression"] = _compression.codec_name(changes["compression"])
        options = self.options.replace(**changes)
        topology = _topology.load(options.topology) if "topology" in changes else self.topology
        self.options, self.topology = options, topology
        if "topology" in changes:
            self._probed = None
        self.fast.clear()  # prepared under the old settings

    # ---- membership ----------------------------------------------------
    def on_abort(self, msg):
        """Coordinator push (heartbeat thread): a member of an epoch failed.
        The epoch may be one we are still connecting for (mesh building
        watches aborted_epoch)."""
        epoch = int(msg.get("epoch", -1))
        if epoch < self.aborted_epoch:
            return
        self.abort_reason = msg.get("why", "")
        self._abort_lost = list(msg.get("lost", []))
        self.aborted_epoch = epoch
        if epoch != self.number:
            return
        self.cancel(epoch)

    def on_evicted(self, msg):
        """Heartbeat thread: the coordinator, alive, removed us (declared dead while we live, e.g.
        after a connection of ours closed). Every epoch up to its current one goes on without us:
        stop waiting in a collective or in building a mesh (whose peers moved on and refuse our
        hello), so the next coordinator request raises the eviction at once. Waiting on instead
        left a member stuck until the group finished, and it then succeeded the coordinator alone
        from its old epoch and ran a step the others had run without it (chaos seed 329)."""
        self.on_abort({"epoch": max(self.number, int(msg.get("epoch") or -1)),
                       "why": f"this peer was removed from the group: {msg.get('why')}"})
        self.cancel()

    def sync(self, rebuild, admit=False, timeout=None):
        """Reach a sync point with every live member; rebuild the mesh if the
        membership changed (or we must). Returns True if it changed.
        Joiners are admitted only when every member syncs with ``admit``
        (update_topology), never at a recovery sync. If a peer fails while
        the new mesh is being built, every member notices and syncs again.
        ``timeout``: seconds (default: the options' sync_timeout)."""
        limit = self.options.sync_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        if self.client.needs_rejoin:
            self._rejoin()
            rebuild = True
        while True:
            # The client's generation when the request goes out, read under its request lock: a
            # failover thread's move to a successor may come while we wait for that lock, and
            # then our request goes to the successor, whose reply is current (seeds 406 and 434:
            # read before, it was taken for a lost coordinator's, the successor's own member
            # synced again while the others built the mesh with it: 30 s to the mesh timeout).
            sent = []

            def sync_msg(rebuild=rebuild, admit=admit):
                sent.append(self.client.generation)
                return {"t": "sync", "epoch": self.number, "rebuild": rebuild, "admit": admit}
            try:
                reply = self.client.request(sync_msg, timeout=max(1.0, deadline - time.monotonic()))
            except CoordinatorError:
                if not (self.client.needs_rejoin and (self.options.coordinator_wait > 0 or self.can_fail_over()
                                                      or self.failover_pending()
                                                      or (self.options.failover and self.client.stranger)
                                                      or self._joining_anew())):
                    raise
                if time.monotonic() > deadline + self.options.coordinator_wait:
                    raise  # a coordinator that keeps dropping us: the loop ends too
                self._rejoin()  # a restarted coordinator does not know us yet
                rebuild = True
                continue
            if reply.get("unchanged") and not rebuild and self.ccomm is not None:
                return False
            self._installing = reply.get("epoch")
            if self.client.generation != sent[-1]:
                # An epoch formed by a coordinator lost since (the heartbeat thread moved us to its
                # successor): the others may never build it. Sync again under the successor.
                self._installing = None
                if time.monotonic() > deadline:
                    raise CoordinatorError(f"rank {self.rank}: no sync point under a coordinator that stayed "
                                           f"within {limit:.0f} s (it kept being lost)")
                rebuild = True
                continue
            try:
                self._install(reply)
                return True
            except PeerFailure as exc:
                members = reply.get("members") or []
                group = ([m[0] for m in members], [tuple(m[1]) for m in members], reply.get("rank", -1))
                self.report_failure(reply["epoch"], f"building the mesh failed: {exc}", lib.PC_ERR_PEER, group=group)
                if time.monotonic() > deadline:
                    raise
                rebuild, admit = True, False
            finally:
                self._installing = None

    def update_topology(self):
        """The members' sync point (Communicator.update_topology, under exec_lock)."""
        if (self._fresh_join == self.number and self.seq == self._epoch_seq and not self.broken
                and self.aborted_epoch != self.number and not self.client.needs_rejoin):
            # pycoll.connect returned at the members' update_topology(): this call is that one
            # (a sync now would wait for the members' next one while they wait in a collective)
            self._fresh_join = None
            return False
        return self.sync(rebuild=self.broken or self.aborted_epoch == self.number, admit=True)

    def joined_fresh(self):
        """pycoll.connect admitted us at the members' update_topology(): our first
        update_topology() is that same sync point, and has nothing left to do."""
        self._fresh_join = self.number

    def pending_joiners(self):
        """Number of peers waiting to be admitted (from the last heartbeat)."""
        status = self.client.last_status
        if status.get("epoch", self.number) < self.number:
            return 0  # from before our epoch formed: its "pending" counted us
        return int(status.get("pending", 0))

    def _rejoin(self):
        """The coordinator was lost (or dropped us): wait for one at the same
        address, register again with what we know of our epoch, and let the
        sync that follows re-form the group (membership and ranks)."""
        client, wait = self.client, self.options.coordinator_wait
        if self.options.failover and self.standby is not None:
            with self._fo_lock:  # (waits for a failover the heartbeat thread started)
                if self.can_fail_over():
                    self._failover()
                    return
                if self._fresh_failover:
                    # the heartbeat thread's failover re-registered us: the sync that follows
                    # re-forms the group under the successor
                    self._fresh_failover = False
                    client.needs_rejoin = False
                    client.evicted = None
                    client.stranger = False
                    self.broken = True
                    return
        if self._joining_anew():
            # Not admitted yet when the coordinator was lost: a member succeeds it and serves at
            # its address once the group re-formed (pycoll.comm.failover). Join there again.
            if not client.wait_for_coordinator(self.options.sync_timeout):
                raise CoordinatorError(f"no coordinator at {client.endpoint} within {self.options.sync_timeout:.0f} s "
                                       "(the one this peer was joining was lost, and no member took over its address)")
            deadline = time.monotonic() + self.options.sync_timeout
            while True:
                try:
                    client.request(self._join_msg, timeout=10)
                    break
                except CoordinatorError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            log.warning("%s joins again at %s (its coordinator was lost before it was admitted)", self.name,
                        client.endpoint)
            client.needs_rejoin = False
            client.evicted = None
            client.stranger = False
            return
        if self.options.failover and client.stranger and self._join_msg is not None and self.members:
            # A coordinator that never knew us answers at its address: a successor that took the
            # address over while we were idle (pycoll.comm.failover), or a restart. Re-register.
            wait = max(wait, 10.0)
        if client.evicted and (wait <= 0 or self._join_msg is None):
            raise CoordinatorError(
                f"rank {self.rank} ({self.name}) was evicted from the group by the coordinator at "
                f"{client.endpoint}, which is alive: {client.evicted} (a peer silent longer than its "
                f"heartbeat timeout, {client.heartbeat_timeout:.1f} s here, e.g. a stopped process, counts as "
                "dead, and the group went on without it). To take part again, join anew with pycoll.connect(), or "
                "make the communicator with coordinator_wait=<seconds> to re-register automatically",
                evicted=True)
        if wait <= 0 or self._join_msg is None:
            raise CoordinatorError(
                f"rank {self.rank}: lost contact with the coordinator at {client.endpoint}"
                + (f" ({client.evicted})" if client.evicted else "")
                + "; make the communicator with coordinator_wait=<seconds> to re-register automatically "
                "with a restarted coordinator, or restart the job from a checkpoint")
        if not client.wait_for_coordinator(wait):
            raise CoordinatorError(f"no coordinator at {client.endpoint} within {wait:.0f} s")
        resume = {"epoch": self.number, "members": list(self.members), "rank": self.rank}
        deadline = time.monotonic() + wait
        while True:
            try:
                client.request(dict(self._join_msg, rank=None, world_size=None, resume=resume), timeout=10)
                break
            except CoordinatorError:
                if time.monotonic() > deadline:  # e.g. our old self is still being removed
                    raise
                time.sleep(0.2)
        log.warning("rank %d re-registered with the coordinator at %s", self.rank, client.endpoint)
        client.needs_rejoin = False
        client.evicted = None
        client.stranger = False
        self.broken = True

    def link_bound(self):
        """Seconds within which a dead or cut data link fails (keepalive, TCP_USER_TIMEOUT):
        the options' stall_timeout, at most twice the heartbeat timeout (0: off)."""
        stall = self.options.stall_timeout
        return min(stall, 2.0 * self.client.heartbeat_timeout) if stall > 0 else 0.0

    #: a link with bytes in flight gets this many stall timeouts (see busy_link_bound)
    BUSY_SLACK = 4.0

    def busy_link_bound(self):
        """Seconds within which a data link with bytes in flight and no acknowledgement fails
        (TCP_USER_TIMEOUT): twice the heartbeat timeout, at most BUSY_SLACK stall timeouts,
        never stall_timeout alone. The kernel runs that timer while a live peer keeps its window
        shut too (busy, not reading), and a peer busy for longer than stall_timeout is slow, not
        dead (test_wan::test_slow_peer_is_not_a_stall); a cut link still fails within a few
        stall timeouts (test_wan::test_emulated_dead_link_fails_cleanly). 0: off."""
        stall = self.options.stall_timeout
        return min(2.0 * self.client.heartbeat_timeout, self.BUSY_SLACK * stall) if stall > 0 else 0.0

    def can_fail_over(self):
        """Whether a lost coordinator is succeeded here (pycoll.comm.failover): failover on, a
        member of an epoch, and the coordinator gone (its process) or silent past its bound."""
        return (self.options.failover and self.standby is not None and self._join_msg is not None
                and bool(self.members) and not self._cut_off and not self.removed()
                and self.client.coordinator_lost())

    def removed(self):
        """Whether a live coordinator told us it removed us (not: a stranger that never knew us).
        Such a member never succeeds a coordinator lost later: the group went on without it, and
        its old epoch must not re-form."""
        return bool(self.client.evicted) and not self.client.stranger

    def _joining_anew(self):
        """A pycoll.connect joiner not admitted yet whose coordinator was lost (see _rejoin)."""
        return (self.options.failover and not self.members and self._join_msg is not None
                and self._join_msg.get("rank") is None and self.client.needs_rejoin)

    def decided_elsewhere(self, seq, kind):
        """The coordinator was lost while we waited for the decision of round #``seq`` (of
        ``kind``): ask its successor (failing over first) whether another member got that
        decision. Returns the decision when it completes the operation here too
        (failover.completes), or None (the attempt runs again under the successor, as on
        every member: nobody completed it)."""
        if not self.options.failover or self.standby is None or not self.members:
            return None
        try:
            with self._fo_lock:
                if self.can_fail_over():
                    self._failover(background=True)  # (the group re-forms at the next sync)
            if self.client.coordinator_lost():
                return None
            info = self.client.request({"t": "fail", "epoch": self.number, "seq": seq, "withdraw": True,
                                        "why": "the coordinator was lost before the decision",
                                        "status": int(lib.PC_ERR_CANCELLED)},
                                       timeout=max(5.0, 3 * self.client.heartbeat_timeout))
        except CollectiveError as exc:
            log.info("rank %d: could not ask the successor about #%d: %s", self.rank, seq, exc)
            return None
        decided = info.get("decided")
        return decided if failover.completes(kind, decided) else None

    def failover_pending(self):
        """A failover is under way (the heartbeat thread's), or re-registered us and the group
        has not re-formed yet: a request refused meanwhile is answered by re-forming."""
        return self._fo_lock.locked() or self._fresh_failover

    def _on_coordinator_dead(self):
        """The heartbeat thread found the coordinator's process gone: re-register with its
        successor now, in the background, so that the successor hears from every live member at
        once, also from one busy computing (it forms its first epoch without the members it does
        not hear from within the heartbeat bound). The group itself re-forms at the members'
        next call that needs the coordinator, the same call on every member; plain collectives
        go on over the current connections until then."""
        if self.closed or not self.can_fail_over():
            return

        def run():
            if not self._fo_lock.acquire(blocking=False):
                return  # the caller's thread is on it
            try:
                if not self.closed and self.can_fail_over():
                    self._failover(background=True)
            except Exception as exc:  # noqa: BLE001 - the next call that needs the coordinator tries again
                log.info("rank %d: background failover did not complete: %s", self.rank, exc)
            finally:
                self._fo_lock.release()
        threading.Thread(target=run, name="pycoll-failover", daemon=True).start()

    def _failover(self, background=False):
        """The coordinator is lost: elect its successor among the last epoch's members (the
        lowest rank whose process is alive), start it here if we are that one, re-register
        there with what we remember (pycoll.comm.failover); the sync that follows re-forms the
        group. Tries again (electing anew) until the sync timeout if the successor fails too.
        Under ``_fo_lock``; ``background``: from the heartbeat thread (see _on_coordinator_dead)."""
        client = self.client
        deadline = time.monotonic() + self.options.sync_timeout
        old = client.endpoint
        succ = None
        while True:
            if succ is None:  # elect once; again only if the one elected is found dead
                confirmed = client.coordinator_dead  # (its port refuses; not mere silence, maybe a cut)
                succ, dead, unknown = failover.elect(self.members, self._addrs, self._standby_ports, self.rank,
                                                     lost=old if confirmed else None,
                                                     host=self._coord_host if confirmed else None)
                elected = time.monotonic()
                if succ == self.rank:
                    coord = self.standby.start_coordinator(self.name, client.origin,
                                                           dict(zip(self.members, self._addrs)))
                    if self.on_host is not None:
                        self.on_host(coord)
                host, port = self._addrs[succ][0], self._standby_ports[succ]
                log.warning("rank %d (%s): the coordinator at %s is lost; rank %d (%s) succeeds it at %s:%d "
                            "(known dead: %s; unreachable: %s)", self.rank, self.name, old, succ,
                            self.members[succ], host, port, dead or "none", unknown or "none")
                if client.endpoint != f"{host}:{port}":
                    client.retarget(host, port)
                installing = self._installing
                resume = {"epoch": self.number, "members": list(self.members), "rank": self.rank, "dead": dead,
                          "seen": max(self.number, installing or 0)}
            client.expect_coordinator()  # the successor may notice the loss a moment after us
            if faults.FAULTS_ARMED:  # test hook: a member slow to re-register with the successor
                fault_point("failover:register")
            try:
                # the last round we got the decision of, read under the request lock (after any
                # reply our own thread is taking): members that did not get it (the coordinator
                # died sending it) take it from the successor, so all leave the epoch at one call
                client.request(lambda: dict(self._join_msg, rank=None, world_size=None,
                                            resume=dict(resume, decided=failover.told_decision(client.last_round,
                                                                                               self.number))),
                               timeout=min(2.0, max(0.1, deadline - time.monotonic())),
                               give_up=None if succ == self.rank else _Watch(self._addrs[succ]).gone)
                break
            except CoordinatorError as exc:
                if getattr(exc, "evicted", False):  # the successor refused us (re-registered too late)
                    self._cut_off = True
                    client.evicted = client.evicted or str(exc)
                    raise
                if time.monotonic() > deadline:
                    raise CoordinatorError(f"rank {self.rank}: the coordinator at {old} is lost and no successor "
                                           f"took over within {self.options.sync_timeout:.0f} s: {exc}") from None
                if succ != self.rank and failover.probe_addrs([self._addrs[succ]], failover.PROBE_TIMEOUT)[0] == "dead":
                    succ = None  # the successor died too: elect again without it
                elif succ != self.rank and time.monotonic() > elected + 2 * client.heartbeat_timeout + 1.0:
                    # It is alive and did not take over: it still hears the coordinator, which we
                    # lost (our control link is cut). The group goes on without us.
                    self._cut_off = True
                    client.evicted = client.evicted or "cut off from the coordinator"
                    raise CoordinatorError(
                        f"rank {self.rank} ({self.name}) lost the coordinator at {old}, but rank {succ} "
                        f"({self.members[succ]}), alive, did not take over: the coordinator is alive and this "
                        "peer is cut off from it, so the group goes on without it. Join again with "
                        "pycoll.connect() once it can be reached", evicted=True) from None
                time.sleep(0.05)
        client.needs_rejoin = False
        client.evicted = None
        client.stranger = False
        if installing is not None and installing > self.number:
            # The lost coordinator formed an epoch we were still building: the others re-registered
            # too and will not build it, so stop waiting for them (a 30 s mesh timeout in a chaos
            # run, seed 328); the successor numbers its epochs past it ("seen").
            self.on_abort({"epoch": installing, "why": "the coordinator that formed this epoch was lost"})
        if background:
            self._fresh_failover = True  # the next call that needs the coordinator re-forms the group
        else:
            self.broken = True

    def _install(self, reply):
        """Install the epoch the coordinator's sync ``reply`` describes: its mesh, its C
        communicators, who is who; then measure its cost model."""
        self.drop()
        o = self.options
        members = reply["members"]
        rank = reply["rank"]
        addrs = [m[1] for m in members]
        epoch = reply["epoch"]

        if o.tags:
            self.listener.expect_meshes({self._channel_token(reply["token"])})
        links = connect_mesh(self.listener, rank, addrs, o.stripes, epoch, reply["token"],
                             o.mesh_timeout, o.sockbuf, key=self._mesh_key,
                             should_abort=lambda: self.aborted_epoch >= epoch,
                             local=local_peers(members, rank, o.transport), mode=o.transport,
                             encrypt=self._tls_key is not None)
        set_keepalive(links.fds, self.link_bound(), self.busy_link_bound())
        nworkers, switches = split_members(members)
        hcomm = None
        if switches:  # standalone aggregators: the whole mesh for them, the workers' part for us
            workers = links.dup_prefix(nworkers * o.stripes)  # before the first comm takes links
            hcomm = self._create_comm(rank, len(members), links)
            links = workers
            members = members[:nworkers]
        comm = self._create_comm(rank, len(members), links)
        channels = self._connect_channels(rank, [m[1] for m in members], epoch, reply["token"], members)
        with self._comm_lock:
            self.ccomm = comm
            self.number = reply["epoch"]  # (with the connections: see cancel)
        self.rank, self.world_size, self.number = rank, len(members), reply["epoch"]
        self.members = [m[0] for m in members]
        # From the first epoch on, a lost coordinator is news (and may be succeeded): before it,
        # the group is still forming, and its formation fails with the reason (the client logs the
        # loss at info while nothing is set: every failed launch would warn of it twice)
        self.client.on_dead = self._on_coordinator_dead
        self._addrs = [tuple(m[1]) for m in members]  # (the workers': who may succeed a lost coordinator)
        self._standby_ports = [int(m[5]) if len(m) > 5 and isinstance(m[5], int) else 0 for m in members]
        self._hosts = [m[2] if len(m) > 2 else None for m in members]
        self._selector = None
        self.peer_transports = ["self" if p == rank else "shm" if links.kinds[p * o.stripes] == lib.PC_CONN_SHM
                                else "tcp" for p in range(len(members))]
        self._refusal_check_from = self.single_copy_bytes() if "shm" in self.peer_transports else 0
        self.lost = list(reply.get("lost", []))
        self.joined = list(reply.get("joined", []))
        self._coord_host = reply.get("host") if isinstance(reply.get("host"), str) else None
        self.seq = 0
        self._calls = 0
        self._plans.clear()
        self.fast.clear()
        self.broken = False
        self._tag_broken = False
        self._settled = set()
        self._fresh_failover = False
        if hcomm is not None:
            self._install_switches(hcomm, switches)
        # auto's cost model is measured here, at the sync point, by every member before any call
        # of the epoch: choosing an algorithm never runs a collective (not inside an agreed call,
        # not on a tag's thread). A peer lost meanwhile raises PeerFailure, as in building the
        # mesh: sync reports the epoch failed and syncs again.
        try:
            self._measure_topology(rank, addrs)
            self._calibrate()
        except BaseException:
            for ch in channels.values():
                engine.close(ch.ccomm)
            raise
        self._epoch_seq = self.seq
        if channels:
            with self._comm_lock:
                self.channels = channels
        log.info("epoch %d: rank %d of %d%s", self.number, rank, self.world_size,
                 f" (lost {len(self.lost)})" if self.lost else "")

    def _channel_token(self, token):
        """The mesh token of this epoch's tag channels (a hello for it is parked
        while the group's own mesh is accepted, see mesh.Listener)."""
        return hashlib.sha256(f"{token}/tags/{self.options.tags!r}".encode()).hexdigest()[:32]

    def _connect_channels(self, rank, addrs, epoch, token, members):
        """Tag channels: one more mesh of the workers with len(tags) x stripes
        connections per pair, cut into one C comm per tag."""
        o = self.options
        if not o.tags or len(addrs) < 1:
            return {}
        ctoken = self._channel_token(token)
        k = len(o.tags)
        try:  # (connections that came early are parked for this token: accept_mesh takes them)
            links = connect_mesh(self.listener, rank, addrs, o.stripes * k, epoch, ctoken, o.mesh_timeout,
                                 o.sockbuf, key=self._mesh_key, should_abort=lambda: self.aborted_epoch >= epoch,
                                 local=local_peers(members, rank, o.transport), mode=o.transport,
                             encrypt=self._tls_key is not None)
        finally:
            self.listener.expect_meshes(())
        set_keepalive(links.fds, self.link_bound(), self.busy_link_bound())
        channels = {}
        try:
            for i, tag in enumerate(o.tags):
                channels[tag] = Channel(tag, self._create_comm(rank, len(addrs), links.channel(i, k, o.stripes)))
        except BaseException:
            for ch in channels.values():
                engine.close(ch.ccomm)
            raise
        return channels

    def _create_comm(self, rank, n, links):
        o = self.options
        return engine.create(rank, n, o.stripes, links, spin_us=o.spin_us, single_copy=self.single_copy_bytes(),
                             stall_timeout=o.progress_timeout or 0.0, psk=self._tls_key,
                             handshake_timeout=o.mesh_timeout or 30.0, single_copy_adapt=o.single_copy_adapt)

    def single_copy_refused(self):
        """{rank: errno} of the same-host peers whose memory the kernel refused us to read."""
        refused = {p: engine.single_copy_refused(self.ccomm, p) for p, t in enumerate(self.peer_transports)
                   if t == "shm"}
        return {p: err for p, err in refused.items() if err}

    def _report_refusals(self):
        """Once per epoch, after its first call big enough for single copy (its connections have
        probed by then): say so if the kernel refused reads, which only costs speed."""
        self._refusal_check_from = 0
        refused = self.single_copy_refused()
        if refused:
            log.warning("rank %d: the kernel does not let this process read the memory of same-host "
                        "rank(s) %s (%s%s): their payloads of %d bytes and more go through the shared-memory "
                        "rings instead of single copy, which is slower (single_copy=0 turns single copy and "
                        "this message off)", self.rank, sorted(refused),
                        os.strerror(next(iter(refused.values()))), _yama_hint(), self.single_copy_bytes())

    def single_copy_bytes(self):
        """The single-copy threshold in bytes (the options', else the C core's default)."""
        return single_copy_bytes(self.options.single_copy)

    def _install_switches(self, hcomm, switches):
        """Use the epoch's standalone aggregators for innetwork all-reduces, if they fit the topology."""
        elayout = EngineLayout(self.selector().layout, switches)
        if not elayout.usable:
            log.warning("epoch %d: standalone aggregators %s do not match the topology's switch groups; "
                        "not using them", self.number, sorted(switches))
        with self._comm_lock:  # kept even when unusable: the aggregators idle in the mesh until the next epoch
            self.switch = SwitchPath(hcomm, elayout, self.rank, self.options.stripes)

    def drop(self):
        """Free the epoch's connections (a call still running on a tag finishes first)."""
        with self._comm_lock:
            comm, self.ccomm = self.ccomm, None
            switch, self.switch = self.switch, None
            channels, self.channels = self.channels, {}
            self.fast.clear()  # its calls name the comm freed below
        for ch in channels.values():
            with ch.lock:  # a tagged call still running (cancelled by now) finishes first
                ccomm, ch.ccomm = ch.ccomm, None
            engine.close(ccomm)
        for c in (comm, switch.hcomm if switch is not None else None):
            engine.close(c)

    def cancel(self, epoch=None):
        """Cancel the collectives running now on any of the epoch's connections (any thread).
        ``epoch``: only if that is still the current one (an abort of an epoch read just before
        the next one was installed must not cancel the new one's connections: _install sets the
        number with the connections, under the same lock)."""
        with self._comm_lock:
            if epoch is not None and epoch != self.number:
                return
            for c in (self.ccomm, self.switch.hcomm if self.switch is not None else None):
                if c is not None:
                    engine.cancel(c)
            for ch in self.channels.values():
                if ch.ccomm is not None:
                    engine.cancel(ch.ccomm)

    def close(self):
        """No call starts from now on (Communicator.close stops its worker next, then
        :meth:`leave`)."""
        self.closed = True

    def leave(self):
        """Leave the group and free the connections and the listener (the client stays open:
        a hosted coordinator may still linger, see Communicator.close)."""
        self.client.left = True  # the coordinator may stop once it saw us go: not a failure
        try:
            self.client.request({"t": "leave"}, timeout=2.0)
        except CollectiveError:
            pass
        self.drop()
        self.listener.close()
        if self.standby is not None:
            self.standby.close()

    # ---- readiness: the late-call rule ------------------------------------
    def aborted(self):
        """Whether the coordinator said the current epoch was aborted."""
        return self.aborted_epoch == self.number

    def mark_broken(self):
        """A call of this epoch failed: the next call re-forms the group first."""
        self.broken = True

    def ensure_ready(self, ident=None):
        """Ready the epoch for an untagged call (``ident``: its identity, see :func:`identity`)."""
        if self.closed:
            raise CollectiveError("communicator is closed")
        if None in self._owed:  # a tagged call re-formed the group before we heard of the failure
            raise self._not_run(self._owed.pop(None))
        if self.aborted_epoch == self.number and not self.broken:
            # The epoch failed after our last call finished. Peers that were
            # inside a collective got the error there; we report it on this
            # call (not run) so every rank fails that call exactly once, and
            # all are at the same call afterwards.
            self.broken = True
            info = self._abort_info_now()
            if (ident is not None and info.get("call") is not None and info.get("seq") == self._calls + 1
                    and info["call"] != ident):
                # The call that failed was #seq, and ours is not it: we skipped it
                # (the others' next call is ours). Run ours in the re-formed group.
                log.warning("rank %d: the others' call #%d of epoch %d failed (%s) and this rank never made "
                            "it; this call runs in the re-formed group", self.rank, self._calls + 1, self.number,
                            info.get("why") or self.abort_reason)
                self._carry_owed()
                self.sync(rebuild=True)
                return
            raise self._not_run(self.number)
        if self.broken or self._tag_broken or self.ccomm is None or self.client.needs_rejoin:
            self._carry_owed()
            self.sync(rebuild=True)

    def _abort_info_now(self):
        """The coordinator's word on the current epoch's failure (asked once;
        the push may have gone out before the cause was known)."""
        if self._epoch_info is None or self._epoch_info[0] != self.number:
            info = self.report_failure(self.number, "a call found the epoch aborted")
            self._epoch_info = (self.number, info)
        return self._epoch_info[1]

    def _not_run(self, epoch):
        """The error of a call that did not run because ``epoch`` failed before it."""
        info = self._epoch_info[1] if self._epoch_info is not None and self._epoch_info[0] == epoch else {}
        return failure_error(NOT_RUN, info, rank=self.rank, epoch=epoch, why=self.abort_reason,
                             lost=self._abort_lost, members=self.members)

    def _carry_owed(self):
        """Before the group re-forms after a failure: every channel that has not
        failed a call for it yet (untagged or tagged) fails its next one, in
        the new epoch, so that it stays paired with the ranks where that
        channel's call was in flight."""
        if self.aborted_epoch != self.number:
            return
        self._abort_info_now()
        with self._owed_lock:
            for tag in self.channels:
                if tag not in self._settled:
                    self._owed[tag] = self.number
        if not self.broken:
            self._owed[None] = self.number

    def tag_needs_care(self, tag):
        """Whether a call on ``tag`` must first go through :meth:`ready_tag`."""
        return (self.closed or self.broken or self._tag_broken or self.aborted_epoch == self.number
                or tag in self._owed or self.client.needs_rejoin)

    def ready_tag(self, tag):
        """Ready the epoch for a call on ``tag`` (under exec_lock): every channel fails exactly
        one call when the epoch fails, the one it was running or else its next."""
        if self.closed:
            raise CollectiveError("communicator is closed")
        if tag in self._owed:
            raise self._not_run(self._owed.pop(tag))
        if self.aborted_epoch == self.number and tag not in self._settled and tag in self.channels:
            self._settled.add(tag)
            self._tag_broken = True
            self._abort_info_now()
            raise self._not_run(self.number)
        if (self.broken or self._tag_broken or self.ccomm is None or self.client.needs_rejoin
                or self.aborted_epoch == self.number):
            self._carry_owed()
            self.sync(rebuild=True)
        if tag not in self.channels:
            raise CollectiveError(f"tag {tag!r}: this epoch has no channel for it")

    # ---- failure reporting ------------------------------------------------
    def unreachable(self, status, members=None, addrs=None, rank=None):
        """After a failure with C ``status``: the members (names) whose data listeners we cannot
        reach, when a link may be at fault (a cut, not a death: a dead one refuses), so the
        coordinator can exclude the fewest peers that explain every report, even one it still
        hears (docs/fault-model.md, cut links). ``members``/``addrs``/``rank``: of the epoch
        being formed (default: the current one's)."""
        if status not in (lib.PC_ERR_IO, lib.PC_ERR_PEER, lib.PC_ERR_TIMEOUT, lib.PC_ERR_CANCELLED):
            return []
        if members is None:
            members, addrs, rank = self.members, self._addrs, self.rank
        if not addrs or len(addrs) != len(members) or not 0 <= rank < len(members):
            return []
        seen = failover.reachability(members, addrs, rank)
        return [members[i] for i, v in seen.items() if v == "unknown"]

    def report_failure(self, epoch, why, status=lib.PC_ERR_CANCELLED, withdraw=False, call=None, group=None):
        """Tell the coordinator an operation of ``epoch`` failed (so the other
        members abort now rather than at their timeout) and wait briefly for the
        cause. ``status``: the C status of the failure (connection-level ones,
        peer/IO/cancelled, keep the abort retryable). Returns the coordinator's
        answer ({} if it cannot be reached). ``withdraw``: we gave up waiting for
        the decision of round #seq; if it was decided meanwhile, the answer is
        that decision ({"decided": ...}) and nothing is aborted. ``call``: the
        identity and number of the user's call that failed while we were inside
        it (see ensure_ready). ``group``: (members, addrs, rank) of an epoch whose mesh
        could not be built (see unreachable)."""
        msg = failure_report(epoch, self.seq, why, status)
        unreachable = self.unreachable(status, *(group or ()))
        if unreachable and (epoch == self.number or group):
            msg["unreachable"] = unreachable
        if call is not None:  # (identity, number) of the user's call that failed
            msg["call"], msg["callno"] = call
        if withdraw:
            msg["withdraw"] = True
        try:
            return self.client.request(msg, timeout=FAIL_WAIT)
        except CollectiveError:
            return {}

    def failure(self, st, peer, coll, ccomm=None, ident=None):
        """The exception for an untagged call that failed with C status ``st``."""
        message = engine.last_error(ccomm or self.ccomm)
        if st == lib.PC_ERR_ARG:  # bad arguments: nothing was sent, the mesh is intact
            return engine.error(None, st, coll, peer, message)
        self.broken = True
        return self._explain(st, peer, coll, message, ident)

    def tag_failure(self, st, peer, coll, chan):
        """A tagged call failed: the epoch re-forms at the next call; the
        other channels' next calls report the failure (see ready_tag)."""
        message = engine.last_error(chan.ccomm)
        if st == lib.PC_ERR_ARG:
            return engine.error(None, st, f"{coll} (tag {chan.tag!r})", peer, message)
        self._tag_broken = True
        with self._owed_lock:
            self._settled.add(chan.tag)
            # Another thread may have started re-forming while this call was still returning from
            # its cancel, and counted the channel idle (_carry_owed): this failure is the one it owed.
            if self._owed.get(chan.tag) == self.number:
                del self._owed[chan.tag]
        return self._explain(st, peer, f"{coll} (tag {chan.tag!r})", message, None)

    def _explain(self, st, peer, coll, message, ident):
        """The exception for a failed collective, on the coordinator's word."""
        # Let everyone else abort now rather than at their timeout, and learn
        # the cause (who was lost) so the error can name it.
        info = self.report_failure(self.number, message, st, call=ident)
        self._epoch_info = (self.number, info)
        exc = failure_error(FAILED, info, rank=self.rank, epoch=self.number, what=coll, status=st, peer=peer,
                            message=message, aborted=self.aborted_epoch == self.number, why=self.abort_reason)
        if self.channels:
            # Our report aborted the epoch (the coordinator tells only the others): every
            # other channel's call fails too, and the idle ones owe it (see _carry_owed).
            self.aborted_epoch = max(self.aborted_epoch, self.number)
            self.cancel()
        return exc

    # ---- planning ------------------------------------------------------
    def selector(self):
        """The epoch's algorithm choice: its layout and cost model (see _calibrate)."""
        if self._selector is None:
            self._selector = costmodel.Selector(self.world_size, self.topology, self._hosts,
                                                self.options.segment_bytes)
        return self._selector

    def _calibrate(self):
        """Measure the cost model of the epoch just installed (costmodel.calibrate: a few ring
        all-reduces), when calibration is on and no topology gives the model. Every member runs
        it at the end of _install, so every member's calls of the epoch start at the same
        sequence number and every rank builds the same model."""
        sel = self.selector()
        if not (self.options.calibrate and sel.needs_calibration):
            return
        try:
            model = costmodel.calibrate(self._calibration_allreduce, self.world_size, sel.layout.hosts,
                                        shared_memory=all(t in ("self", "shm") for t in self.peer_transports))
        except CollectiveError as exc:
            if isinstance(exc, PeerFailure) and exc.lost:
                raise  # a member died: sync re-forms the group now
            # The epoch failed for another reason while we measured: a faster rank, done
            # measuring, already ran a call that failed (a mismatch, a timeout). That call is
            # this rank's next one: it raises there ("did not run"), so install completes
            # with the default model, which no collective of this failed epoch will use.
            log.info("epoch %d: calibration stopped (%s); the next call reports it", self.number, exc)
            self.aborted_epoch = max(self.aborted_epoch, self.number)
            self.broken = False  # (the measurement is not a call of the user's: that one still owes it)
            model = costmodel.CostModel(self.world_size, host_of=sel.layout.hosts)
        log.debug("epoch %d: cost model %r", self.number, model)
        self._selector = costmodel.Selector(self.world_size, self.topology, self._hosts, self.options.segment_bytes,
                                            model)

    def _measure_topology(self, rank, addrs):
        """topology="measure": probe the network (pycoll.net.probe) when the members changed,
        so ring order, groups and the cost model follow it. Every member runs it at the sync
        point, before any call of the epoch (its exchanges are the calibration all-reduce)."""
        if self.options.topology != _topology.MEASURE or self.world_size < 2:
            return
        members = tuple(self.members)
        if self._probed is None or self._probed[0] != members:
            hosts = [(str(a[0]), int(a[1])) for a in addrs[:self.world_size]]
            res = _probe.probe(rank, hosts, self._calibration_allreduce, seconds=self.options.probe_seconds)
            log.info("epoch %d: measured the network in %.2f s; sites %s", self.number, res.seconds, res.sites)
            self.probe_result = res
            self._probed = (members, res.topology(f"measured-epoch{self.number}"))
        self.topology = self._probed[1]
        self._selector = None

    def _calibration_allreduce(self, arr, op):
        """A ring all-reduce for the cost model's measurement (no stats, no faults), run while the
        epoch is installed: straight to the engine, not through ensure_ready's checks
        (which would sync again); an abort of the epoch cancels it (see launch)."""
        if faults.FAULTS_ARMED:  # test harness: die while the epoch is being installed
            fault_point("calibrate")
        buf = as_buffer(arr, writable=True, what="calibration buffer")
        call = self.prepare("all_reduce", buf, buf, buf.count, op, 0, "ring", False, None)
        ptr = ffi.cast("void *", buf.address)
        self.launch(call, ptr, ptr, None, internal=True)

    def _plan(self, coll, algorithm, count, itemsize, root, avg, preserve, codec="none"):
        key = (coll, algorithm, count, itemsize, root, avg, preserve, codec)
        plan = self._plans.get(key)
        if plan is None:
            o = self.options
            plan = planners.build(algorithm, coll, self.selector().layout, self.rank, count, itemsize,
                                  root=root, segment_bytes=o.segment_bytes, stripes=o.stripes,
                                  preserve=preserve, avg=avg)
            plan = _compression.compress(plan, codec)
            if len(self._plans) > 256:
                self._plans.clear()
            self._plans[key] = plan
        return plan

    def _codec(self, coll, dtype, compression):
        """The wire codec for this call: float32 of a compressible collective
        only (a per-call request for anything else is an error)."""
        name = self.options.compression if compression is None else _compression.codec_name(compression)
        if name == "none" or self.world_size < 2:
            return "none"
        if coll in _compression.COMPRESSIBLE and dtype == "float32":
            return name
        if compression is not None:
            raise InvalidArgument(f"{coll}: compression={compression!r} applies to float32 all_reduce, all_gather "
                                  f"and reduce_scatter only (got {dtype})")
        return "none"

    def prepare(self, coll, inbuf, outbuf, count, op, root, algorithm, preserve, compression, chan=None):
        """Check the arguments against this epoch and build (or find) the
        plan: a :class:`Call`, the same for the same arguments and epoch."""
        algorithm = planners.check_algorithm(algorithm)
        chosen = self.selector().choose(coll, algorithm, max(inbuf.nbytes, outbuf.nbytes))
        if not 0 <= root < self.world_size:
            raise InvalidArgument(f"root {root} is not a rank of this group (world size {self.world_size})")
        opc = op_code(op)
        check_op(inbuf.code, opc)
        avg = opc == lib.PC_AVG
        itemsize = inbuf.nbytes // max(inbuf.count, 1) if inbuf.count else lib.pc_dtype_size(inbuf.code)
        codec = self._codec(coll, inbuf.dtype, compression)
        switch = self.switch if self.switch is not None and self.switch.usable and chan is None else None
        if switch is not None and switch.applies(coll, chosen, opc, count):
            codec = "none"  # a standalone aggregator sums plain float32
            plan = switch.plan(count, itemsize, self.options.segment_bytes, preserve)
            ccomm = switch.hcomm
        else:
            switch, ccomm = None, self.ccomm if chan is None else chan.ccomm
            plan = self._plan(coll, chosen, count, itemsize, root, avg, preserve, codec)
        desc = _digest(coll, inbuf.code, opc, count, root, chosen, codec)
        ident = identity(coll, inbuf.code, op, count, root, algorithm, compression)
        return Call(coll, chosen, plan, ccomm, switch, desc, ident, inbuf.code, opc, count, itemsize, inbuf.nbytes,
                    outbuf.nbytes)

    def prepare_planned(self, coll, key, build, inbuf, outbuf, count, op, root=0, algorithm="direct", written=None):
        """A :class:`Call` for a one-step collective outside the algorithm choice (reduce,
        gather, scatter, all_to_all, point-to-point; see pycoll.plan.planners.plan_exchange):
        ``build(rank, world_size, options)`` makes this rank's plan, cached under ``key``
        (everything the plan depends on besides rank and world size). ``count`` and ``root``
        go into the argument digest every frame carries (0 where ranks may differ, as
        uneven all_to_all splits), and so does ``algorithm`` (the plan a rooted collective
        chose: "direct" or "tree"; ``written``: what the caller asked for, for the identity);
        point-to-point calls have no identity of their own (they
        are not calls of the whole group, see launch's ``p2p``)."""
        ckey = ("call", coll, self.rank, self.world_size, inbuf.code, op, count, root, inbuf.nbytes,
                outbuf.nbytes) + tuple(key)
        call = self._plans.get(ckey)  # the same call again: nothing to check or build
        if call is not None and call.ccomm is self.ccomm:
            return call
        opc = op_code(op)
        check_op(inbuf.code, opc)
        pkey = (coll, self.rank, self.world_size) + tuple(key)
        plan = self._plans.get(pkey)
        if plan is None:
            plan = build(self.rank, self.world_size, self.options)
            if len(self._plans) > 256:
                self._plans.clear()
            self._plans[pkey] = plan
        desc = _digest(coll, inbuf.code if coll != "p2p" else 0, opc, count, root, algorithm)
        ident = None if coll == "p2p" else identity(coll, inbuf.code, op, count, root, written or algorithm, None)
        itemsize = lib.pc_dtype_size(inbuf.code)
        call = Call(coll, algorithm, plan, self.ccomm, None, desc, ident, inbuf.code, opc, count, itemsize,
                    inbuf.nbytes, outbuf.nbytes)
        try:
            self._plans[ckey] = call
        except TypeError:  # an unhashable op that passed the checks: just not remembered
            pass
        return call

    def prepare_remapped(self, coll, bufs, count, op, ins, outs):
        """A :class:`Call` running ``coll`` (``count``: its per-rank count) with its input
        and output on stretches of ``bufs`` (pycoll.plan.remap: ``ins``, ``outs`` as
        ``(buffer, offset, bytes)``): one plan over the buffers, no packing. None where the
        plan chosen for the total size cannot be remapped (the caller packs). Where the remap
        cut transfers in pieces, the stretches' lengths go into the argument digest: ranks
        whose arrays split the total differently fail the first frame's check instead of
        exchanging pieces that do not pair. Where it cut none (an all_gather into a list: the
        cuts fall between the ranks' blocks), the frames are the plan's own, and so is the
        digest: a rank gathering into one array pairs with one gathering into a list."""
        code = bufs[0].code
        sizes = tuple(b.nbytes for b in bufs)
        key = ("remap", coll, code, op, count, sizes, tuple(ins), tuple(outs))
        call = self._plans.get(key, False)
        if call is not False and (call is None or call.ccomm is self.ccomm):
            return call
        opc = op_code(op)
        check_op(code, opc)
        in_nbytes, out_nbytes = sum(n for _, _, n in ins), sum(n for _, _, n in outs)
        chosen = self.selector().choose(coll, "auto", max(in_nbytes, out_nbytes))
        itemsize = lib.pc_dtype_size(code)
        plan = remap.remap(self._plan(coll, chosen, count, itemsize, 0, opc == lib.PC_AVG, False), len(bufs),
                           ins, outs)
        call = None
        if plan is not None:
            desc = _digest(coll, code, opc, count, 0, chosen)
            if lib.pc_plan_cut_transfers(plan.ptr):
                desc ^= zlib.crc32(struct.pack(f"<{len(ins) + len(outs)}Q", *(n for _, _, n in ins + outs)))
            call = Call(coll, chosen, plan, self.ccomm, None, desc, identity(coll, code, op, count, 0, "auto", None),
                        code, opc, count, itemsize, in_nbytes, out_nbytes)
            call.nbufs, call.sizes = len(bufs), ffi.new("uint64_t[]", sizes)
        if len(self._plans) > 256:
            self._plans.clear()
        self._plans[key] = call
        return call

    # ---- running -------------------------------------------------------
    def next_seq(self, chan=None):
        """Advance the sequence number of the next call, or round, of this epoch (``chan``: of
        that tag's channel) and return it. The one place it advances: every rank's calls must
        carry the same numbers."""
        if chan is not None:
            chan.seq += 1
            return chan.seq
        self.seq += 1
        return self.seq

    def launch(self, call, inptr, outptr, timeout, internal=False, agree=None, inbuf=None, outbuf=None, chan=None,
               p2p=False):
        """Run a prepared call on the memory at ``inptr``/``outptr`` (cffi
        pointers). Everything per call happens here, for both paths. ``p2p``: point-to-point
        transfers between some ranks only: their frames carry :data:`P2P_SEQ` (the group's
        sequence does not advance: the other ranks never see them), and they are no call of
        the group's (see ensure_ready); transfers between a pair pair up by their order."""
        seq = P2P_SEQ if p2p else self.next_seq(chan)
        if chan is not None:  # a tag's channel: its own sequence and argument arrays
            bufs, failed = chan.bufs, chan.failed
        else:
            if not internal and not p2p:
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
            timeout = self.options.timeout
        ccomm = call.ccomm
        _clear_cancel(ccomm)
        if self.aborted_epoch == self.number:  # the abort came before the clear: keep its cancel
            engine.cancel(ccomm)
        switch = call.switch
        if agree is not None:
            announce = (functools.partial(switch.announce, self.seq, call.desc, call.code, call.opc, call.count,
                                          call.itemsize, timeout)
                        if switch is not None else None)  # tell our switches what comes (pycoll.comm.switch)
            return agree.run(self, coll, call.algorithm, call.plan, bufs, call.sizes, inbuf, outbuf, call.opc,
                             call.desc, timeout, ccomm, announce)
        t0 = _perf_counter()
        st = _OK
        if switch is not None:  # tell our switches what comes (pycoll.comm.switch)
            st, failed[0] = switch.announce(self.seq, call.desc, call.code, call.opc, call.count, call.itemsize,
                                            timeout)
        if st == _OK and call.nbufs:  # remapped (prepare_remapped): inptr is the table of its buffers
            st = engine.run_remapped(ccomm, call.ptr, call.nbufs, inptr, call.sizes, call.code, call.opc, seq,
                                     call.desc, timeout, failed)
        elif st == _OK:
            st = _comm_run(ccomm, call.ptr, bufs, call.sizes, call.code, call.opc, seq, call.desc, timeout, failed)
        dt = _perf_counter() - t0
        if not internal:
            self.stats.append(_tuple_new(Stat, (coll, call.algorithm, call.nbytes, dt, self.world_size, self.number,
                                                st == _OK, 0)))
        if st == _OK:
            if self._refusal_check_from and call.nbytes >= self._refusal_check_from:
                self._report_refusals()
            if log.isEnabledFor(logging.DEBUG):
                log.debug("rank %d/%d epoch %d: %s %s %d B in %.3f ms (%.3f GB/s)", self.rank, self.world_size,
                          self.number, coll, call.algorithm, call.nbytes, dt * 1e3,
                          call.nbytes / dt / 1e9 if dt > 0 else 0.0)
            return call.algorithm
        log.info("rank %d/%d epoch %d: %s %s failed after %.3f ms (status %d)", self.rank, self.world_size,
                 self.number, coll, call.algorithm, dt * 1e3, st)
        if chan is not None:
            raise self.tag_failure(st, int(failed[0]), coll, chan)
        # (identity, number) of the user's call; an internal one (the cost model's measurement while
        # the epoch is installed) is no user's call
        ident = None if internal or call.ident is None else (call.ident, self._calls)
        raise self.failure(st, int(failed[0]), coll, ccomm, ident)


class _Watch:
    """Whether an elected successor died meanwhile (a dying process's listener may still have
    accepted the election's probe): its listener probed every quarter second while we wait
    for its answer, so a dead one is given up in ms, not at the request's 2 s timeout."""

    def __init__(self, addr, every=0.25):
        self.addr, self.every, self.last = tuple(addr), every, time.monotonic()

    def gone(self):
        now = time.monotonic()
        if now - self.last < self.every:
            return False
        self.last = now
        return failover.probe_addrs([self.addr], 0.2)[0] == "dead"


#: seconds a failure report waits for the coordinator to name the cause
FAIL_WAIT = 3.0
#: the sequence number of point-to-point frames (collectives count from 1)
P2P_SEQ = 0


def failure_report(epoch, seq, why, status):
    """The message that tells the coordinator an operation of ``epoch`` failed (a worker's, a
    switch's): the others abort at once instead of at their timeout."""
    return {"t": "fail", "epoch": epoch, "seq": seq, "why": str(why)[:2000], "status": int(status)}


def _yama_hint():
    """'; Yama ptrace_scope N' where the kernel has Yama (the usual reason for a refusal)."""
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope") as f:
            return f"; Yama ptrace_scope {f.read().strip()}"
    except OSError:
        return ""


@functools.lru_cache(maxsize=4096)
def _digest(coll, dtype_code, op_code_, count, root, algorithm, codec="none"):
    """32-bit digest of a collective's arguments, carried in every frame so
    that mismatched calls across ranks are detected by the receiver."""
    return zlib.crc32(struct.pack("<iiiQi8s4s", planners.COLLECTIVES[coll], dtype_code, op_code_, count, root,
                                  algorithm.encode()[:8], codec.encode()[:4]))


@functools.lru_cache(maxsize=4096)
def identity(coll, dtype_code, op, count, root, algorithm, compression):
    """32-bit digest of a call as the caller wrote it (before ``auto`` chooses),
    so that a rank can tell, without running anything, whether its call is
    the one the others failed in."""
    return zlib.crc32(repr((coll, dtype_code, str(op), count, root, str(algorithm), str(compression))).encode())
