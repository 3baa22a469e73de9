"""The standalone in-network aggregator (``pycoll aggregator``); the workers' side of it (and
what both sides share: the engine layout, the descriptor frame) is :mod:`pycoll.comm.switch`.

A standalone aggregator is a software switch for one ``aggregator = "switch"`` group of the
topology: it holds no model state, only scratch memory for the partial sums passing through.

Membership. It joins the coordinator like a peer, with ``info = {"role": "aggregator",
"group": NAME}``. The coordinator orders every epoch's members workers first, aggregators
last, so a worker's *engine rank* (its index in the connection mesh and in the C plans) equals
its user-visible ``comm.rank``, and the aggregators take engine ranks ``world_size ..``;
``comm.world_size`` counts workers only. :func:`split_members` is the one place that maps
between the two.

Data path. Workers keep their usual communicator over the workers (every algorithm runs there,
unchanged) and, when the epoch has switches, a second C communicator over the whole mesh (the
same sockets, duplicated descriptors) for ``innetwork`` all-reduces. For each such collective
the lowest worker of every switch group first sends its switch a 64-byte descriptor frame
(sequence number, digest, dtype, op, count, element size; frame seq 0, never used by a
collective); the switch then builds the aggregator half of :c:func:`pc_plan_hier` with
``PC_PLAN_SWITCH`` (its accumulator starts from its first member's data, in scratch) and runs
it. Frames on one connection arrive in order, so the descriptor always precedes the data.

Epochs and faults. The aggregator keeps a ``sync`` request pending at the coordinator, so it
never holds up a sync point and learns each new epoch at once. Its death aborts the epoch like
any member's (collectives in flight fail with :class:`PeerFailure`); the next epoch has no
switch for that group and the workers fall back to agent mode (the group's lowest rank
aggregates). ``avg`` all-reduces also run in agent mode (the engine divides by the plan's
rank count, which would include the switches).
"""
import logging
import threading
import time

from pycoll import bootstrap
from pycoll.core import engine
from pycoll.plan import planners
from pycoll.plan import topology as _topology
from pycoll.core.native import ffi, lib
from pycoll.errors import CollectiveError, PeerFailure
from pycoll.plan.layout import Layout
# The workers' side, shared with the switch (and public here too, as before it moved to pycoll.comm.switch):
from pycoll.comm.epoch import FAIL_WAIT, failure_report  # a worker's report, and its wait for the answer
from pycoll.comm.switch import (DESC_BYTES, DESC_DIGEST, DESC_FORMAT, DESC_MAGIC, DESC_SEQ,  # noqa: F401
                     EngineLayout, SwitchPath, pack_descriptor, run_plan, split_members, unpack_descriptor)

log = logging.getLogger("pycoll.aggregator")

ROLE = "aggregator"
IDLE_TIMEOUT = 1e9             # a switch waits for the next collective as long as the epoch lasts


class Aggregator:
    """A standalone aggregator process for group ``group`` (see the module doc)."""

    def __init__(self, client, listener, group, *, topology=None, stripes=1, segment_bytes=1 << 20,
                 mesh_timeout=None, mesh_key=None, sync_timeout=3600.0):
        self._client = client
        self._listener = listener
        self.group = group
        self.topology = _topology.load(topology)
        self.stripes = stripes
        self.segment_bytes = segment_bytes
        self.mesh_timeout = mesh_timeout if mesh_timeout is not None else listener.limits.connect_timeout
        self._mesh_key = mesh_key
        self.sync_timeout = sync_timeout
        self.epoch = 0
        self.collectives = 0       # collectives aggregated (all epochs)
        self._comm = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        client.on_abort = self._on_abort

    def _on_abort(self, msg):
        if msg.get("epoch") == self.epoch:
            with self._lock:
                if self._comm is not None:
                    engine.cancel(self._comm)

    def _drop(self):
        with self._lock:
            comm, self._comm = self._comm, None
        engine.close(comm)

    def _install(self, reply):
        from pycoll.net.mesh import connect_mesh, data_plane_key
        members = reply["members"]
        rank = reply["rank"]
        workers, switches = split_members(members)
        if not workers:  # every worker has left: the job is over
            return None
        psk = data_plane_key(self._mesh_key)  # PYCOLL_ENCRYPT: TLS, as the workers' side of these links
        links = connect_mesh(self._listener, rank, [m[1] for m in members], self.stripes, reply["epoch"],
                             reply["token"], self.mesh_timeout, 0, key=self._mesh_key, encrypt=psk is not None)
        comm = engine.create(rank, len(members), self.stripes, links, psk=psk, handshake_timeout=self.mesh_timeout)
        layout = Layout(workers, self.topology, [m[2] for m in members[:workers]])
        elayout = EngineLayout(layout, switches)
        with self._lock:
            self._comm = comm
        self.epoch = reply["epoch"]
        leader = elayout.leaders.get(rank)
        log.info("aggregator %s: epoch %d, engine rank %d of %d, leader %s%s", self.group, self.epoch, rank,
                 len(members), leader, "" if elayout.usable else " (idle: switches unusable this epoch)")
        return rank, elayout if elayout.usable else None, leader

    def _serve_epoch(self, rank, elayout, leader, epoch_changed):
        """Aggregate collectives until this epoch's comm fails or is cancelled."""
        if elayout is None or leader is None:
            epoch_changed.wait()
            return
        desc_plan = planners.plan_p2p(elayout.world_size, rank, leader, DESC_BYTES, False)
        desc = ffi.new("uint8_t[]", DESC_BYTES)
        desc_addr = int(ffi.cast("uintptr_t", desc))
        plans = {}
        while not self._stop.is_set():
            st, _ = run_plan(self._comm, desc_plan, 0, 0, desc_addr, DESC_BYTES, lib.PC_U8, lib.PC_SUM,
                             DESC_SEQ, DESC_DIGEST, IDLE_TIMEOUT)
            if st != lib.PC_OK:
                return
            try:
                seq, digest, dtype, op, count, itemsize, timeout = unpack_descriptor(ffi.buffer(desc, DESC_BYTES))
            except CollectiveError as exc:  # the leader and we disagree: fail the epoch, never guess
                log.warning("aggregator %s: %s", self.group, exc)
                engine.shutdown(self._comm)
                return
            key = (count, itemsize)
            plan = plans.get(key)
            if plan is None:
                if len(plans) > 64:
                    plans.clear()
                plan = plans[key] = elayout.plan(rank, count, itemsize, self.segment_bytes, self.stripes, False)
            st, _ = run_plan(self._comm, plan, 0, 0, 0, 0, dtype, op, seq, digest, timeout)
            if st != lib.PC_OK:
                log.warning("aggregator %s: collective %d failed: %s", self.group, seq,
                            engine.last_error(self._comm))
                return
            self.collectives += 1

    def serve(self, max_seconds=None):
        """Follow epochs and aggregate until stopped (or ``max_seconds``)."""
        deadline = time.monotonic() + max_seconds if max_seconds else None
        reply = self._client.request({"t": "sync", "epoch": self.epoch, "rebuild": True},
                                     timeout=self.sync_timeout)
        while not self._stop.is_set():
            if reply.get("unchanged"):
                reply = self._client.request({"t": "sync", "epoch": self.epoch, "rebuild": False},
                                             timeout=self.sync_timeout)
                continue
            self._drop()
            try:
                installed = self._install(reply)
            except PeerFailure as exc:
                # A member died between the coordinator forming this epoch and its mesh (the other
                # switch, killed while every worker was idle): as a worker does, report it, so the
                # others abort now, and sync again for the epoch without it.
                log.warning("aggregator %s: building the mesh of epoch %s failed: %s", self.group,
                            reply.get("epoch"), exc)
                self._report_mesh_failure(reply, exc)
                reply = self._client.request({"t": "sync", "epoch": self.epoch, "rebuild": True},
                                             timeout=self.sync_timeout)
                continue
            if installed is None:
                log.info("aggregator %s: no workers left, stopping", self.group)
                return
            rank, elayout, leader = installed
            changed = threading.Event()
            worker = threading.Thread(target=self._serve_epoch, args=(rank, elayout, leader, changed),
                                      name="pycoll-aggregator", daemon=True)
            worker.start()
            # keep a sync pending: workers' sync points never wait for us
            while True:
                if deadline and time.monotonic() > deadline:
                    self._stop.set()
                    break
                reply = self._client.request({"t": "sync", "epoch": self.epoch, "rebuild": False},
                                             timeout=self.sync_timeout)
                if not reply.get("unchanged"):
                    break
            changed.set()
            with self._lock:
                if self._comm is not None:
                    engine.cancel(self._comm)
            worker.join(timeout=10)

    def _report_mesh_failure(self, reply, exc):
        msg = failure_report(reply.get("epoch"), 0, f"building the mesh failed: {exc}", lib.PC_ERR_PEER)
        try:
            self._client.request(msg, timeout=FAIL_WAIT)
        except CollectiveError:
            pass  # the coordinator learns of the death from the heartbeats too

    def close(self):
        self._stop.set()
        try:
            self._client.request({"t": "leave"}, timeout=2.0)
        except CollectiveError:
            pass
        self._drop()
        self._listener.close()
        self._client.close()


def start(group, master_addr="127.0.0.1", master_port=29500, *, topology=None, token=None, limits=None,
          join_timeout=120.0, heartbeat_interval=0.5, heartbeat_timeout=None, stripes=1, **options):
    """Join the group's coordinator as the standalone aggregator of ``group`` (through
    :func:`pycoll.bootstrap.join`, as every peer does); returns an :class:`Aggregator` (call
    ``serve()``). ``heartbeat_timeout``: its detection bound (default: the coordinator's)."""
    joined = bootstrap.join(master_addr, master_port, join_timeout=join_timeout, heartbeat_interval=heartbeat_interval,
                            heartbeat_timeout=heartbeat_timeout, token=token, limits=limits,
                            info={"role": ROLE, "group": str(group)}, who=f"aggregator {str(group)!r}")
    try:
        return Aggregator(joined.client, joined.listener, group, topology=topology, stripes=stripes,
                          mesh_key=joined.mesh_key, **options)
    except BaseException:
        joined.close()
        raise
