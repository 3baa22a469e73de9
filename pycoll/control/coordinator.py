"""The coordinator: membership, epochs, liveness and agreement (pyzmq + msgpack).

It never touches tensor data. Peers talk to it over two DEALER sockets each:
``req`` for requests that get a reply (join, sync, outcome, ...) and ``hb``
for heartbeats and for messages the coordinator pushes (abort).

Membership moves in *epochs*. An epoch is a fixed, ordered list of members;
a member's rank is its index. A new epoch forms at a *sync point*: every
live member of the current epoch has sent ``sync``. At that point the
coordinator drops dead members and answers all of them with the same member
list; when nothing changed and nobody needs a rebuild the answer is
"unchanged" and peers keep their connections. Pending joiners are admitted
only when every member's sync came from ``update_topology()`` (``admit``),
never at the recovery sync after a failure, so no collective (and no retry
of one) is ever disturbed by a joiner. Ranks are then reassigned
deterministically: survivors keep their relative order, joiners follow in
the order they joined.

Death is noticed three ways: the member's heartbeat connection drops (a
socket monitor reports the disconnected fd, which we map back to the member
through the fd its heartbeats arrive on; instant for a killed process),
heartbeats stop for the member's detection bound (``heartbeat_timeout``,
default 5 s, a peer may ask for less), or the member says ``leave``.

*Aborts.* When a member of the epoch dies, or reports that an operation
failed, the epoch is *aborted*: every member gets an ``abort`` push (which
cancels a collective in flight) and must sync before running anything else.
The abort's *cause* (who was lost, if anyone) becomes final as soon as a
death is known, every live member has reported in, or ``cause_grace``
seconds passed; waiting peers are answered then, so a survivor's error names
the lost peer and every member agrees on whether a retry makes sense (it
does when a member was lost).

*Rounds.* Operations that need agreement are numbered like collectives (by
the per-epoch sequence number every member keeps) and collect one report
per member of the epoch:

* ``collective`` (the outcome of ``retry=True``/``verify=True``
  collectives): commit when every member reports its part succeeded (and,
  with digests, they all agree), abort when the epoch is aborted first.
  Each member copies results out of scratch only on commit, so the group
  agrees on whether collective #k happened and over whom.
* ``state`` (``sync_shared_state``): from per-tensor hashes, decide the
  majority per tensor and who fetches which bytes from whom (pycoll.control.parity).
* ``parity`` (``verify_parity``): the same comparison, reported, not fixed.

Security: every message in both directions is signed with a key derived from
the shared secret (``pycoll.auth``); unsigned, forged, stale or replayed
messages are dropped (and logged, rate-limited) before they are parsed.
Requests are then shape-checked (``pycoll.control.schema``). A member's requests must
carry the credential it was given at join, so nobody can speak for it.
"""
import collections
import hmac
import logging
import os
import secrets
import socket
import threading
import time

import msgpack
import zmq
from zmq.utils import z85
from zmq.utils.monitor import recv_monitor_message

from pycoll import auth
from pycoll import faults
from pycoll.control import parity
from pycoll.control import schema
from pycoll.net.mesh import host_id, probe_addrs
from pycoll.errors import InvalidArgument
from pycoll.limits import resolve
from pycoll.options import environ


def encryption(secret):
    """The coordinator channel's CURVE keys, (server public, server secret) in Z85, when
    PYCOLL_ENCRYPT is on, else None. Derived from the group secret: only its holders can
    compute the server's public key, so a peer without it fails the CURVE handshake (refused,
    nothing read), and every byte after it is encrypted (Curve25519, XSalsa20-Poly1305)."""
    if not environ("PYCOLL_ENCRYPT"):
        return None
    if not zmq.has("curve"):
        raise InvalidArgument("PYCOLL_ENCRYPT=1: this pyzmq/libzmq build has no CURVE security")
    if not secret:
        raise InvalidArgument("PYCOLL_ENCRYPT=1 needs a shared secret (PYCOLL_SECRET or token=): the keys "
                              "come from it")
    server_secret = z85.encode(auth.derive(secret, "coordinator-curve"))
    return zmq.curve_public(server_secret), server_secret


log = logging.getLogger("pycoll.coordinator")

PROTOCOL = 1

# C statuses (csrc/include/pycoll.h) of failures that say only "a connection broke or
# the call was stopped": re-running over the group that re-forms is safe. Any
# other reported failure (a protocol error, a timeout, a bad argument) makes
# an abort not retryable unless a member was lost.
_CONNECTION_STATUSES = {3, 4, 7}  # PC_ERR_IO, PC_ERR_PEER, PC_ERR_CANCELLED
_MISMATCH = 5  # PC_ERR_PROTO: ranks called different collectives


def pack(obj):
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data):
    # Sockets cap messages at MAXMSGSIZE, which bounds what this can build.
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


class Member:
    __slots__ = ("name", "addr", "host_id", "rank_hint", "join_seq", "last_seen", "alive",
                 "req_ident", "hb_ident", "sync_rid", "sync_rebuild", "sync_admit", "info", "hb_timeout", "cred")

    def __init__(self, name, addr, host_id, rank_hint, join_seq, info, hb_timeout):
        self.name = name
        self.addr = addr
        self.host_id = host_id
        self.rank_hint = rank_hint
        self.join_seq = join_seq
        self.last_seen = time.monotonic()
        self.alive = True
        self.req_ident = None
        self.hb_ident = None
        self.sync_rid = None      # request id of a sync waiting for an answer
        self.sync_rebuild = False
        self.sync_admit = False
        self.info = info
        self.hb_timeout = hb_timeout
        self.cred = secrets.token_hex(16)  # proves later requests come from this member

    def describe(self):
        pid = self.info.get("pid") if isinstance(self.info, dict) else None
        return f"{self.name}" + (f", pid {pid}" if pid else "")


class Round:
    """Reports of one numbered operation of the current epoch."""

    __slots__ = ("seq", "kind", "reports", "waiters")

    def __init__(self, seq, kind):
        self.seq = seq
        self.kind = kind
        self.reports = {}   # name -> message
        self.waiters = {}   # name -> (ident, rid)


class Abort:
    """Why the current epoch stopped; final once its cause is known."""

    __slots__ = ("why", "since", "final", "lost", "fatal", "status", "seq", "call")

    def __init__(self, why):
        self.why = why
        self.since = time.monotonic()
        self.final = False
        self.lost = []
        self.fatal = False  # a failure was reported that a retry would repeat
        self.status = None  # its C status (mismatched calls, a timeout): every rank raises that kind
        self.seq = None     # the call that failed (the user's call number, identity digest of its arguments), from the
        self.call = None    # first member that was inside it: a late member compares its own call


class Coordinator:
    """Runs the membership service on ``tcp://host:port``.

    ``world_size``: when set, the first epoch waits for that many members
    (static groups, ``pycoll.init``); otherwise it forms as soon as
    ``min_world_size`` members are waiting (elastic groups, ``pycoll.connect``).
    ``heartbeat_timeout``: the default detection bound for a silent member
    (a member may ask for its own when it joins). ``cause_grace``: how long
    a failure report waits for a death to explain it.
    ``secret``: the shared secret (default: ``PYCOLL_SECRET``); ``limits``: a
    :class:`pycoll.limits.Limits` (default: from the environment).
    ``job_id``: the job this coordinator serves; joiners that carry another
    job id (``PYCOLL_JOB_ID``, torchrun's ``TORCHELASTIC_RUN_ID``) are refused.
    Without it, the coordinator adopts the first job id a joiner carries
    (until the group is empty again). A joiner without a job id is accepted.
    """

    def __init__(self, host="127.0.0.1", port=0, world_size=None, min_world_size=1,
                 heartbeat_timeout=5.0, context=None, cause_grace=0.5, secret=None, limits=None, job_id=None):
        self.world_size = world_size
        self._fixed_world_size = world_size is not None
        self.job_id = job_id or None
        self._fixed_job = self.job_id is not None
        self._job_origin = "its coordinator" if self._fixed_job else None
        self.host_name = None   # the member whose process hosts us (pycoll.init rank 0): its leave = we stop soon
        self.closing = False    # shutting down: joins are refused (retry=True) so they wait for the next one
        self.conflict = None    # (why, until): a launch mistake that failed the forming group
        self.min_world_size = min_world_size
        self.heartbeat_timeout = heartbeat_timeout
        self.cause_grace = cause_grace
        self.limits = resolve(limits)
        secret = auth.load_secret(secret)
        auth.warn_if_exposed(host, secret, "the pycoll coordinator")
        self._sealer = auth.Sealer(auth.derive(secret, "from-coordinator"))
        self._opener = auth.Opener(auth.derive(secret, "to-coordinator"), self.limits.replay_window)
        self._checks = schema.fields(self.limits.max_peers)
        self.refusals = auth.QuietLog(log)
        self._ctx = context or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a reconnecting peer keeps its identity
        # a send to an identity with no live connection fails (EHOSTUNREACH) instead of vanishing:
        # how a disconnect is checked against the member it seems to belong to (_routable)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._sock.setsockopt(zmq.MAXMSGSIZE, self.limits.max_message_bytes)
        # a connection that never finishes its ZMTP greeting (slowloris) is closed
        self._sock.setsockopt(zmq.HANDSHAKE_IVL, int(self.limits.handshake_timeout * 1000))
        keys = encryption(secret)
        self.encrypted = keys is not None
        if keys:  # (before bind: the mechanism is fixed when the listener starts)
            self._sock.curve_server = True
            self._sock.curve_publickey, self._sock.curve_secretkey = keys
        if port:
            self._sock.bind(f"tcp://{host}:{port}")
            self.port = port
        else:
            self.port = self._sock.bind_to_random_port(f"tcp://{host}", min_port=20000, max_port=30000)
        self.host = host
        self._monitor = self._sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._hb_fds = {}          # fd of a heartbeat connection -> Member (a hint: fds are reused)
        self._suspects = {}        # name -> (recheck until, next recheck, interval): _check_suspects
        self._host_id = host_id()
        self._unheard_probed = {}  # name -> when its listener was last probed: _check_unheard
        self.members = {}          # name -> Member
        self.by_ident = {}         # zmq identity -> Member
        self.removed = collections.OrderedDict()  # name -> why, for members declared dead (bounded)
        self.epoch = 0
        self.epoch_members = []    # names, rank order
        self.token = ""
        self.abort = None          # Abort of the current epoch, or None
        self.rounds = {}           # seq -> Round (current epoch)
        self.decided = collections.OrderedDict()  # seq -> {rank: reply}, the last few decided rounds
        self.resume = None         # after a restart: {"epoch", "expect", "dead", "since"} from re-registering peers
        # name -> "alive"/"dead"/"unknown": a successor's probes of the members that have not
        # re-registered yet (pycoll.comm.failover.watch_resume; replaced whole, read here)
        self.resume_probe = {}
        self._also_after_resume = None  # (host, port) to serve on once resumed (also_listen)
        # A successor: (epoch, seq) -> the decision of an agreed round of the lost coordinator that
        # a re-registering member got; asked for by members that did not (withdraw, _on_fail)
        self.resumed_decided = collections.OrderedDict()
        self.resume_waiters = []  # (ident, msg) of such questions asked while members re-register
        self.resumed_undecided = set()  # (epoch, seq) answered "not decided" (a later claim is refused)
        # A successor (pycoll.comm.failover) forms no first epoch of fresh joiners before the lost
        # coordinator's members re-register (until this monotonic time): a joiner that finds it
        # first (at the lost coordinator's address) would start a new group, and the members'
        # re-registration would then join that one as newcomers with their old state.
        self.resume_expected_until = 0.0
        self.fail_waiters = []     # (name, ident, rid): failure reports waiting for the cause
        self.cut = set()           # (reporter, peer) of this epoch: peer unreachable over the data network
        self.stats = collections.Counter()
        self._join_seq = 0
        self._stop = threading.Event()
        self._thread = None
        self.handlers = {"join": self._on_join, "sync": self._on_sync, "hb": self._on_hb,
                         "leave": self._on_leave, "status": self._on_status, "fail": self._on_fail,
                         "round": self._on_round}

    def also_listen(self, host, port, after_resume=False):
        """Serve on ``host:port`` too (a successor takes over the lost coordinator's address when
        it is on this host, so newcomers that know only that address find the group). Returns
        whether it could bind (the address is not ours, or taken: False). ``after_resume``: only
        once the re-registering members formed their epoch (until then a member that has not
        noticed the loss yet must find that address dead, not served by a stranger)."""
        if after_resume:
            self._also_after_resume = (host, port, time.monotonic() + self.ALSO_AFTER_S)
            return True
        try:
            self._sock.bind(f"tcp://{socket.gethostbyname(host)}:{int(port)}")
        except (OSError, zmq.ZMQError) as exc:
            log.info("not serving on %s:%s too: %s", host, port, exc)
            return False
        return True

    # ---- running -------------------------------------------------------
    def start(self):
        """Serve in a daemon thread; returns self."""
        self._thread = threading.Thread(target=self.serve, name="pycoll-coordinator", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        self.closing = True
        self._stop.set()
        if self._thread and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def serve(self):
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        log.info("coordinator listening on %s:%d", self.host, self.port)
        try:
            while not self._stop.is_set():
                # a suspect is rechecked within milliseconds: its death usually reaches the router
                # a moment after the disconnect event, and survivors wait on the cause
                if poller.poll(2 if self._suspects else 50):
                    for _ in range(1000):  # drain, bounded
                        try:
                            frames = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._dispatch(frames)
                    self._drain_monitor()
                self._check_liveness()
                self._check_suspects()
                self._check_abort()
                if self.resume is not None:
                    self._tell_left_behind()
                    self._maybe_form_epoch()
                self._answer_resume_waiters(force=self.resume is None)
                if self._also_after_resume is not None and time.monotonic() > self._also_after_resume[2]:
                    self._serve_also()
        finally:
            self._sock.disable_monitor()
            self._monitor.close(0)
            self._sock.close(0)

    def _drain_monitor(self):
        for _ in range(1000):
            try:
                event = recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_DISCONNECTED:
                member = self._hb_fds.pop(event["value"], None)
                if member is not None and member.alive:
                    self._suspect(member)

    # A disconnect event names only a file descriptor, and the kernel reuses those at once: a
    # stranger's (or a port probe's) connection that closes can be reported after its fd already
    # carries another member's heartbeats. So a disconnect is a hint, checked against the member's
    # own heartbeat connection: gone (not routable) -> dead now; still there -> rechecked for a
    # moment (in case the router has not yet seen the close), then cleared. Rechecks come at
    # 2, 4, 8, ... ms: a real death shows at the first, and a live member gets a handful of
    # probes, not one per pass of the loop.
    SUSPECT_S = 0.5

    def _suspect(self, m):
        if not self._routable(m):
            self._suspects.pop(m.name, None)
            self._declare_dead(m, "its connection to the coordinator dropped")
        else:
            now = time.monotonic()
            self._suspects[m.name] = (now + self.SUSPECT_S, now + 0.002, 0.002)

    def _check_suspects(self):
        now = time.monotonic()
        for name, (until, due, step) in list(self._suspects.items()):
            m = self.members.get(name)
            if m is None or not m.alive or now > until:
                del self._suspects[name]
            elif now < due:
                continue
            elif not self._routable(m):
                del self._suspects[name]
                self._declare_dead(m, "its connection to the coordinator dropped")
            else:
                self._suspects[name] = (until, now + 2 * step, 2 * step)

    def _routable(self, m):
        """The member's heartbeat connection is open (a probe it ignores gets through)."""
        if m.hb_ident is None:
            return False
        try:
            self._sock.send_multipart([m.hb_ident, self._sealer.seal(pack({"t": "probe"}))], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            return exc.errno == zmq.EAGAIN  # queue full: connected, just slow
        return True

    # ---- plumbing ------------------------------------------------------
    def _send(self, ident, msg):
        try:
            self._sock.send_multipart([ident, self._sealer.seal(pack(msg))], zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # peer gone: its disconnect is handled separately
            log.debug("send to %r failed: %s", ident, exc)

    def _dispatch(self, frames):
        if len(frames) != 2:
            self.refusals.warning("frames", "dropping malformed message (%d frames)", len(frames))
            return
        data = frames[1]
        try:
            peer = data.get("Peer-Address")
        except zmq.ZMQError:
            peer = "?"
        self.handle(frames[0].bytes, data.bytes, lambda: data.get(zmq.SRCFD), peer)

    def handle(self, ident, data, fd=lambda: None, peer="?"):
        """Authenticate, parse, check and dispatch one message; never raises."""
        try:
            payload = self._opener.open(data)
        except auth.AuthError as exc:
            self.refusals.warning(" ".join(str(exc).split()[:2]),  # rate-limited per kind of failure
                                  "coordinator refused a message from %s (identity %r): %s",
                                  peer, ident[:32], exc)
            if data[:4] == auth.ENVELOPE_MAGIC:  # a pycoll peer: tell it why rather than let it time out
                try:
                    self._sock.send_multipart([ident, auth.REFUSED + str(exc).encode()[:200]], zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
            return
        try:
            msg = unpack(payload)
            schema.check_request(msg, self._checks)
            kind = msg["t"]
            handler = self.handlers[kind]
        except Exception as exc:  # noqa: BLE001 - anything malformed is dropped, never fatal
            self.refusals.warning("malformed", "dropping malformed message from %s (identity %r): %s",
                                  peer, ident[:32], exc)
            return
        try:
            if kind == "hb":
                handler(ident, msg, fd())
            else:
                handler(ident, msg)
        except Exception as exc:  # noqa: BLE001
            self.refusals.warning("bad " + kind, "bad %r request from %s (identity %r): %s", kind, peer, ident[:32],
                                  exc)
            if "rid" in msg:
                self._send(ident, {"rid": msg.get("rid"), "ok": False, "error": f"bad request: {exc}"})

    def _reply(self, ident, msg, **fields):
        self._send(ident, {"rid": msg.get("rid"), "ok": True, **fields})

    def _error(self, ident, msg, error, **fields):
        self._send(ident, {"rid": msg.get("rid"), "ok": False, "error": error, **fields})

    def _rank_of(self, name):
        return self.epoch_members.index(name) if name in self.epoch_members else -1

    def _workers(self):
        """Members of the epoch that take part in rounds (standalone
        aggregators run their plans but never report)."""
        return [n for n in self.epoch_members if n not in self.members or self._switch_group(self.members[n]) is None]

    # ---- handlers ------------------------------------------------------
    def _live_epoch_members(self):
        return [self.members[n] for n in self.epoch_members if n in self.members and self.members[n].alive]

    def _forming_static(self):
        """Live members that joined with a rank (pycoll.init) and wait for the group to form."""
        return [m for m in self.members.values()
                if m.alive and m.rank_hint is not None and m.name not in self.epoch_members]

    @staticmethod
    def _who(rank, info, host_id=""):
        pid = info.get("pid") if isinstance(info, dict) else None
        return f"rank {rank}" + (f" (pid {pid})" if pid else "")

    def _fail_forming(self, why):
        """A launch mistake (world sizes differ, a rank started twice): every
        rank waiting for this group gets ``why`` now, and ranks of the same
        launch that come in the next few seconds too, instead of waiting for
        the join timeout."""
        log.warning("the group cannot form: %s", why)
        self.conflict = (why, time.monotonic() + max(5.0, self.heartbeat_timeout))
        for m in self._forming_static():
            if m.sync_rid is not None and m.req_ident is not None:
                self._send(m.req_ident, {"rid": m.sync_rid, "ok": False, "error": why, "conflict": True})
            m.alive = False
            self.removed[m.name] = why
            del self.members[m.name]
            for ident in [i for i, x in self.by_ident.items() if x is m]:
                del self.by_ident[ident]
        if not self._fixed_world_size and not self._live_epoch_members():
            self.world_size = None

    def _on_join(self, ident, msg):
        if msg.get("proto") != PROTOCOL:
            return self._error(ident, msg, f"protocol {msg.get('proto')} != {PROTOCOL}")
        name = str(msg["name"])
        rank = msg.get("rank")
        ws = msg.get("world_size")
        info = msg.get("info") or {}
        old = self.members.get(name)
        if old is not None and old.alive and old.req_ident == ident and old.addr == list(msg["addr"]):
            # the same peer asking again (its first try's answer was lost, or came late): same answer
            return self._reply(ident, msg, epoch=self.epoch, heartbeat_timeout=old.hb_timeout, cred=old.cred)
        if self.closing:
            return self._error(ident, msg, f"the coordinator at {self.host}:{self.port} is shutting down (the "
                                           "process that hosts it is closing); waiting for the next one",
                               retry=True)
        job = msg.get("job") or None
        live = [m for m in self.members.values() if m.alive]
        if not live and not self._fixed_job:
            self.job_id, self._job_origin = None, None  # an empty coordinator serves whichever job comes
        if job is not None and self.job_id is not None and job != self.job_id:
            return self._error(ident, msg, f"this peer belongs to job {job!r}, but the coordinator at "
                                           f"{self.host}:{self.port} serves job {self.job_id!r} (its job id came "
                                           f"from {self._job_origin}): two jobs share this port; give each job "
                                           "its own MASTER_PORT")
        running = self._live_epoch_members()
        resume = msg.get("resume")
        if rank is not None and not resume:
            if running:
                return self._error(ident, msg, f"a group of {len(self.epoch_members)} is already running here "
                                               f"(epoch {self.epoch}" + (f", job {self.job_id!r}" if self.job_id
                                                                          else "") +
                                   "): pycoll.init joins only a group that is forming (another job on this port? "
                                   "pycoll.connect joins a running elastic group)", retry=True)
            conflict = self.conflict
            if conflict is not None and time.monotonic() < conflict[1]:
                return self._error(ident, msg, conflict[0], conflict=True)
            self.conflict = None
            forming = self._forming_static()
            if ws is not None:
                if not forming and not self._fixed_world_size:
                    self.world_size = int(ws)  # a new group forms: its first rank sets the size
                elif self.world_size is not None and int(ws) != self.world_size:
                    first = min(forming, key=lambda m: m.join_seq) if forming else None
                    origin = (f", set by {self._who(first.rank_hint, first.info, first.host_id)}" if first
                              else " (the coordinator's)")
                    why = (f"world_size mismatch: {self._who(rank, info, str(msg.get('host_id', '')))} was started "
                           f"with world_size {ws}, but the group has world_size {self.world_size}{origin}; every "
                           "rank must get the same WORLD_SIZE")
                    self._fail_forming(why)
                    return self._error(ident, msg, why, conflict=True)
            if self.world_size is not None and not 0 <= int(rank) < self.world_size:
                return self._error(ident, msg, f"rank {rank} out of range for world_size {self.world_size}")
            for m in forming:
                if m.rank_hint == rank and m.name != name:
                    why = (f"rank {rank} was started twice: {self._who(rank, m.info, m.host_id)} and "
                           f"{self._who(rank, info, str(msg.get('host_id', '')))} both claim it; every rank "
                           "must be started exactly once (check RANK for each process)")
                    self._fail_forming(why)
                    return self._error(ident, msg, why, conflict=True)
        if job is not None and self.job_id is None:
            self.job_id = job
            self._job_origin = f"its first member ({self._who(rank, info)})" if rank is not None \
                else f"its first member ({name})"
        if old is not None and old.alive:
            return self._error(ident, msg, f"a live member named {name!r} exists")
        if old is not None and name in self.epoch_members:
            return self._error(ident, msg, f"member {name!r} is still being removed from epoch {self.epoch}; "
                                           "join again once the group re-formed, or use another name")
        if sum(1 for m in self.members.values() if m.alive) >= self.limits.max_peers:
            return self._error(ident, msg, f"the group is full (max_peers {self.limits.max_peers}, "
                                           "PYCOLL_MAX_PEERS)")
        clash = self._transport_clash(str(msg.get("host_id", "")), msg.get("info"))
        if clash:
            return self._error(ident, msg, clash)
        self._join_seq += 1
        hb_timeout = float(msg.get("heartbeat_timeout") or self.heartbeat_timeout)
        resume = msg.get("resume")
        told = resume.get("decided") if isinstance(resume, dict) else None
        if (isinstance(told, dict) and isinstance(told.get("seq"), int)
                and (int(resume.get("epoch", 0)), told["seq"]) in self.resumed_undecided):
            # Too late: the others were told that round was not decided and run its call again,
            # while this member went on past it. It would call a different operation than they do.
            return self._error(ident, msg, f"this peer ({name}) re-registered with the successor coordinator "
                                           f"after the others were told round #{told['seq']} of epoch "
                                           f"{resume.get('epoch')} was not decided (they run that call again, "
                                           "this peer went past it); the group goes on without it. Join again "
                                           "with pycoll.connect()", evicted=True, why="re-registered too late")
        if resume and self.epoch == 0 and not self.epoch_members:
            # A member of a group whose coordinator died re-registers with us
            # (a restarted coordinator): remember who else to wait for.
            if self.resume is None:
                self.resume = {"epoch": 0, "expect": set(), "dead": set(), "heard": set(), "told": {},
                               "since": time.monotonic()}
                log.warning("re-forming a group that lost its coordinator (epoch %s)", resume.get("epoch"))
            self.resume["epoch"] = max(self.resume["epoch"], int(resume.get("epoch", 0)))
            # the newest epoch anyone heard the lost coordinator form (maybe not built anywhere):
            # ours are numbered past it, so no member mistakes ours for that one
            self.resume["seen"] = max(self.resume.get("seen", 0), int(resume.get("seen") or 0))
            self.resume["expect"].update(str(n) for n in resume.get("members", []))
            # members whose process this peer found gone (a refused connection): not waited for
            self.resume["dead"].update(str(n) for n in resume.get("dead", []) or [])
            self.resume["heard"].add(name)
            # which epoch each re-registering member left, and who was in it (see _drop_stale)
            self.resume.setdefault("left", {})[name] = (int(resume.get("epoch", 0)),
                                                        {str(n) for n in resume.get("members", [])})
            told = resume.get("decided")
            if isinstance(told, dict) and isinstance(told.get("reply"), dict) and isinstance(told.get("seq"), int):
                self.resumed_decided[(int(resume.get("epoch", 0)), told["seq"])] = told["reply"]
                while len(self.resumed_decided) > 64:
                    self.resumed_decided.popitem(last=False)
            rank = resume.get("rank")
        m = Member(name, list(msg["addr"]), str(msg.get("host_id", "")), rank, self._join_seq,
                   msg.get("info") or {}, hb_timeout)
        m.req_ident = ident
        self.members[name] = m
        self.by_ident[ident] = m
        self.removed.pop(name, None)
        log.info("member %s joined (rank hint %s)", name, rank)
        self._reply(ident, msg, epoch=self.epoch, heartbeat_timeout=hb_timeout, cred=m.cred, job=self.job_id)
        self._maybe_form_epoch()

    def _member_for(self, ident, msg):
        m = self.members.get(str(msg.get("name")))
        if m is None or not m.alive:
            return None
        if not hmac.compare_digest(str(msg.get("cred", "")).encode(), m.cred.encode()):
            if not msg.get("cred") and msg.get("t") == "hb":
                return None  # a heartbeat sent while its peer's join was in flight (a re-registration)
            self.refusals.warning("cred", "refused a %r request for member %s without its credential "
                                  "(identity %r): someone else speaks for it", msg.get("t"), m.name, ident[:32])
            return None
        return m

    def _unknown(self, ident, msg):
        name = str(msg.get("name"))
        why = self.removed.get(name)
        if why is not None and self.conflict is not None and why == self.conflict[0]:
            return self._error(ident, msg, why, conflict=True)  # a launch mistake failed its group (_fail_forming)
        if why is not None:
            return self._error(ident, msg, f"this peer ({name}) was evicted from the group by the coordinator at "
                                           f"{self.host}:{self.port} (removed: {why}); the group went on without "
                                           "it. Join again with pycoll.connect(), or make the communicator with "
                                           "coordinator_wait=<seconds> to re-register automatically",
                               evicted=True, why=why)
        return self._error(ident, msg, "unknown or dead member: join again", evicted=True)

    def _on_hb(self, ident, msg, fd=None):
        m = self._member_for(ident, msg)
        if m is None:
            return self._send(ident, {"t": "hb", "known": False, "why": self.removed.get(str(msg.get("name"))),
                                      "epoch": self.epoch})
        if m.hb_ident != ident:
            first = m.hb_ident is None
            m.hb_ident = ident
            self.by_ident[ident] = m
            if first and self.abort is not None and m.name in self.epoch_members:
                # the epoch was aborted before we could reach this member (its first heartbeat
                # after a re-registration comes now): tell it, or it waits in its call until
                # its timeout while the others wait for it at the sync point
                self._send(ident, {"t": "abort", "epoch": self.epoch, "why": self.abort.why, "lost": self._lost()})
        if self.resume is not None and m.name in self.resume["heard"]:
            self._tell_left_behind(m)  # (its first heartbeat may come after the others synced)
        if fd is not None and self._hb_fds.get(fd) is not m:
            prev = self._hb_fds.get(fd)
            self._hb_fds[fd] = m
            if prev is not None and prev.alive:
                self._suspect(prev)  # its fd carries another connection now: its own has closed
        m.last_seen = time.monotonic()
        pending = sum(1 for x in self.members.values() if x.alive and x.name not in self.epoch_members)
        reply = {"t": "hb", "known": True, "epoch": self.epoch, "pending": pending}
        if m.name not in self.epoch_members and m.rank_hint is not None:
            # a rank waiting for its group to form: who is there (progress lines, pycoll.init)
            reply["forming"] = {"world_size": self.world_size,
                                "ranks": sorted(x.rank_hint for x in self._forming_static())}
        self._send(ident, reply)

    def _on_sync(self, ident, msg):
        m = self._member_for(ident, msg)
        if m is None:
            return self._unknown(ident, msg)
        m.req_ident = ident
        m.last_seen = time.monotonic()
        m.sync_rid = msg.get("rid")
        m.sync_rebuild = bool(msg.get("rebuild"))
        m.sync_admit = bool(msg.get("admit"))
        if self.resume is not None and m.name in self.resume["heard"]:
            self._tell_left_behind()
        self._check_abort()
        self._maybe_form_epoch()

    def _on_fail(self, ident, msg):
        """A member's plain collective (or its mesh) failed: abort the epoch
        everywhere, answer once the cause is known."""
        m = self._member_for(ident, msg)
        if m is None:
            return self._unknown(ident, msg)
        if msg.get("withdraw") and msg.get("epoch") != self.epoch and self.resume is not None:
            self.resume_waiters.append((ident, msg))  # answered once the members re-registered
            return self._answer_resume_waiters()
        if msg.get("withdraw") and (msg.get("epoch"), msg.get("seq")) in self.resumed_decided:
            return self._reply(ident, msg, decided=self.resumed_decided[(msg.get("epoch"), msg.get("seq"))])
        if msg.get("epoch") != self.epoch or m.name not in self.epoch_members:
            return self._reply(ident, msg, **self._abort_info(stale=True))
        if msg.get("withdraw") and msg.get("seq") in self.decided:  # gave up waiting, but it was decided
            return self._reply(ident, msg, decided=self.decided[msg["seq"]][self._rank_of(m.name)])
        for peer in msg.get("unreachable") or ():
            if peer in self.epoch_members and peer != m.name:
                self.cut.add((m.name, peer))
        self._abort_epoch(f"rank {self._rank_of(m.name)} ({m.name}) reported: {msg.get('why', 'failure')}",
                          exclude=m, status=msg.get("status"))
        if "call" in msg and self.abort.call is None:
            self.abort.seq, self.abort.call = msg.get("callno"), msg["call"]
        self.fail_waiters.append((m.name, ident, msg.get("rid")))
        self._check_abort()

    def _on_round(self, ident, msg):
        """A report for round #seq of the epoch; answered when decided."""
        m = self._member_for(ident, msg)
        if m is None:
            return self._unknown(ident, msg)
        if msg.get("epoch") != self.epoch or m.name not in self.epoch_members:
            return self._reply(ident, msg, decision="abort", **self._abort_info(stale=True))
        seq, kind = int(msg["seq"]), str(msg["kind"])
        rnd = self.rounds.get(seq)
        if rnd is None:
            rnd = self.rounds[seq] = Round(seq, kind)
        rnd.reports[m.name] = msg
        rnd.waiters[m.name] = (ident, msg.get("rid"))
        for peer in msg.get("unreachable") or ():
            if peer in self.epoch_members and peer != m.name:
                self.cut.add((m.name, peer))
        if rnd.kind != kind:
            self._abort_epoch(f"members called different operations as #{seq} of epoch {self.epoch} "
                              f"({rnd.kind} and {kind})", final=True, status=-1)
        elif not msg.get("ok", True):
            self._abort_epoch(f"rank {self._rank_of(m.name)} ({m.name}) failed: {msg.get('why', 'failure')}",
                              exclude=m, status=msg.get("status"))
        self._check_abort()
        self._resolve(rnd)

    def _on_leave(self, ident, msg):
        m = self._member_for(ident, msg)
        if m is not None:
            if self.host_name is not None and m.name == self.host_name:
                self.closing = True  # our host is closing: it stops us once the others left
            self._declare_dead(m, "left the group", graceful=True)
        self._reply(ident, msg)

    def _on_status(self, ident, msg):
        self._reply(ident, msg, epoch=self.epoch, members=list(self.epoch_members),
                    alive=[n for n, x in self.members.items() if x.alive],
                    world_size=self.world_size, stats=dict(self.stats))

    # ---- liveness ------------------------------------------------------
    def _check_liveness(self):
        now = time.monotonic()
        for m in list(self.members.values()):
            # last_seen starts at join: a member that never heartbeats expires too
            # (with more grace: its client may not have started heartbeats yet)
            limit = m.hb_timeout if m.hb_ident is not None else 4 * m.hb_timeout
            if m.alive and now - m.last_seen > limit:
                self._declare_dead(m, f"no heartbeat for {now - m.last_seen:.1f} s (its limit: {limit:.1f} s)")
        self._check_unheard(now)

    # A member's client beats at once after its join's reply, so one not heard from for this long
    # may have died between its join and its first beat (a member re-registering with a successor,
    # killed a moment later: the group waited out the 4x grace, 20 s in a chaos run, seed 316).
    # Its data listener tells: it listens from the join to the close, and on this host and network
    # namespace a refusal is the kernel answering for a process that is gone. Members elsewhere
    # wait out the grace (a firewall may refuse for a live process).
    UNHEARD_PROBE_S = 0.5

    def _check_unheard(self, now):
        unheard = [m for m in self.members.values()
                   if m.alive and m.hb_ident is None and m.host_id == self._host_id
                   and now - m.last_seen > self.UNHEARD_PROBE_S
                   and now - self._unheard_probed.get(m.name, 0.0) > self.UNHEARD_PROBE_S]
        if not unheard:
            return
        for m in unheard:
            self._unheard_probed[m.name] = now
        states = probe_addrs([tuple(m.addr) for m in unheard], timeout=0.02)
        for m, state in zip(unheard, states):
            if state == "dead":
                self._declare_dead(m, f"no heartbeat since its join {now - m.last_seen:.1f} s ago, and its "
                                      f"listener at {m.addr[0]}:{m.addr[1]} refuses: the process is gone")
        for name in [n for n, m in ((n, self.members.get(n)) for n in self._unheard_probed)
                     if m is None or not m.alive or m.hb_ident is not None]:
            del self._unheard_probed[name]  # (bounded by the members table)

    def _declare_dead(self, m, why, graceful=False):
        if not m.alive:
            return
        m.alive = False
        self.removed[m.name] = why
        while len(self.removed) > 1000:
            self.removed.popitem(last=False)
        # a member never admitted to an epoch (the group still forming) fails nothing by going: its
        # join timing out, as every rank's does when one never starts, is no death to warn of
        quiet = graceful or m.name not in self.epoch_members
        (log.info if quiet else log.warning)("member %s is gone: %s", m.name, why)
        if m.name in self.epoch_members:
            rank = self._rank_of(m.name)
            if not graceful:
                self.stats["deaths"] += 1
                self._abort_epoch(f"rank {rank} ({m.describe()}) lost: {why}", final=True)
            elif any(m.name not in rnd.reports for rnd in self.rounds.values()):
                # A graceful leave finished its collectives: peers still
                # completing theirs are not aborted, only an operation
                # that waits for the leaver is.
                self._abort_epoch(f"rank {rank} ({m.describe()}) left during an operation", final=True)
        elif self.members.get(m.name) is m:
            self._forget(m)  # never admitted: forget it now, so a flood of joins cannot grow memory
        self._check_abort()
        self._maybe_form_epoch()

    # ---- aborts --------------------------------------------------------
    def _lost(self):
        return [n for n in self.epoch_members if n in self.members and not self.members[n].alive]

    def _abort_epoch(self, why, final=False, exclude=None, status=None):
        """Abort the current epoch (once); ``status``: the C status of a
        reported failure, None for a death."""
        if self.abort is None:
            self.abort = Abort(why)
            self.stats["aborts"] += 1
            log.info("epoch %d aborted: %s", self.epoch, why)
            lost = self._lost()
            for name in self.epoch_members:
                x = self.members.get(name)
                if x is not None and x.alive and x is not exclude and x.hb_ident is not None:
                    self._send(x.hb_ident, {"t": "abort", "epoch": self.epoch, "why": why, "lost": lost})
        elif final and not self.abort.final and "lost" in why:
            self.abort.why = why  # a death explains an earlier failure report better
        if status is not None and status not in _CONNECTION_STATUSES and not self.abort.final:
            self.abort.fatal = True
            if self.abort.status is None:
                self.abort.status = status
        if final:
            self.abort.final = True

    def _abort_info(self, stale=False):
        if stale:
            return {"why": "this operation belongs to an epoch that has ended", "lost": [], "lost_ranks": [],
                    "retry": True}
        lost = self.abort.lost
        return {"why": self.abort.why, "lost": lost, "lost_ranks": [self._rank_of(n) for n in lost],
                "lost_info": [self.members[n].describe() for n in lost if n in self.members],
                "retry": bool(lost) or not self.abort.fatal, "status": None if lost else self.abort.status,
                # A mismatch has no one failed call (each rank made its own): a late rank's
                # call then fails too rather than run as if it had skipped the failed one.
                **({} if self.abort.status == _MISMATCH else {"seq": self.abort.seq, "call": self.abort.call})}

    def _check_abort(self):
        """Make the abort's cause final when it is known, then answer waiters."""
        a = self.abort
        if a is None:
            return
        if not a.final:
            live = [self.members[n] for n in self.epoch_members if self.members[n].alive]
            waiting = {name for name, _, _ in self.fail_waiters}
            for rnd in self.rounds.values():
                waiting.update(rnd.waiters)
            accounted = all(x.name in waiting or x.sync_rid is not None for x in live)
            if self._lost() or accounted or time.monotonic() - a.since > self.cause_grace:
                a.final = True
        if not a.final:
            return
        a.lost = self._lost()
        if a.lost and "lost" not in a.why:
            x = self.members[a.lost[0]]
            a.why = f"rank {self._rank_of(x.name)} ({x.describe()}) lost: {self.removed.get(x.name, 'gone')}"
        info = self._abort_info()
        for name, ident, rid in self.fail_waiters:
            self._send(ident, {"rid": rid, "ok": True, **info})
        self.fail_waiters = []
        for rnd in list(self.rounds.values()):
            for name, (ident, rid) in rnd.waiters.items():
                self._send(ident, {"rid": rid, "ok": True, "decision": "abort", **info})
            rnd.waiters.clear()
        self.rounds.clear()

    # ---- rounds --------------------------------------------------------
    def _resolve(self, rnd):
        """Decide a round once every member of the epoch reported."""
        if self.abort is not None or rnd.seq not in self.rounds:
            return
        missing = [n for n in self._workers() if n not in rnd.reports]
        if missing:
            dead = [n for n in missing if not self.members[n].alive]
            if dead:
                self._abort_epoch(f"rank {self._rank_of(dead[0])} left before #{rnd.seq}", final=True)
                self._check_abort()
            return
        del self.rounds[rnd.seq]
        self.stats[f"round_{rnd.kind}"] += 1
        by_rank = {self._rank_of(n): msg for n, msg in rnd.reports.items()}
        replies = {}
        try:
            if rnd.kind == "collective":
                replies = self._decide_collective(rnd, by_rank)
            elif rnd.kind == "state":
                replies = self._decide_state(by_rank)
            elif rnd.kind == "parity":
                report = parity.compare({r: m for r, m in by_rank.items()})
                replies = {r: {"decision": "report", **report} for r in by_rank}
            else:
                replies = {r: {"decision": "error", "why": f"unknown round kind {rnd.kind!r}"} for r in by_rank}
        except parity.LayoutMismatch as exc:
            replies = {r: {"decision": "error", "why": str(exc)} for r in by_rank}
        except (KeyError, TypeError, ValueError, IndexError) as exc:  # a report missing its fields
            replies = {r: {"decision": "error", "why": f"malformed report for #{rnd.seq}: {exc!r}"} for r in by_rank}
        self.decided[rnd.seq] = replies
        while len(self.decided) > 32:
            self.decided.popitem(last=False)
        for name, (ident, rid) in rnd.waiters.items():
            if faults.FAULTS_ARMED:  # test hook: die having told only some members (pycoll.comm.failover)
                faults.fault_point(f"coordinator:{rnd.kind}")
            self._send(ident, {"rid": rid, "ok": True, **replies[self._rank_of(name)]})

    def _decide_collective(self, rnd, by_rank):
        digests = {r: m.get("digest") for r, m in by_rank.items()}
        common = {"members": self._workers(), "epoch": self.epoch, "seq": rnd.seq}
        if any(d is not None for d in digests.values()):
            want = parity.majority(digests)
            odd = sorted(r for r, d in digests.items() if d != want)
            if odd:
                self.stats["parity_failures"] += 1
                return {r: {"decision": "parity", "digests": [digests[q] for q in sorted(digests)],
                            "differ": odd, **common} for r in by_rank}
        self.stats["commits"] += 1
        return {r: {"decision": "commit", **common} for r in by_rank}

    def _decide_state(self, by_rank):
        plan = parity.plan_sync(by_rank)
        moved = any(plan["fetch"][r] for r in by_rank)
        shared = {"revision": plan["revision"], "majority": [plan["majority"][n] for n in plan["names"]],
                  "fetchers": plan["fetchers"], "transfer": moved}
        return {r: {"decision": "state", "fetch": plan["fetch"][r], "serve": plan["serve"][r], **shared}
                for r in by_rank}

    def workers_alive(self):
        """Whether a worker (a member that is not a standalone aggregator) is still alive: the
        communicator that hosts this coordinator keeps it up until none is (aggregators never
        leave on their own: they go when the workers have)."""
        return any(m.alive and self._switch_group(m) is None for m in list(self.members.values()))

    # ---- epochs --------------------------------------------------------
    @staticmethod
    def _switch_group(m):
        """The group a standalone aggregator serves (pycoll.aggregator), else None (a worker)."""
        info = m.info if isinstance(m.info, dict) else {}
        return str(info.get("group", ""))[:128] if info.get("role") == "aggregator" else None

    @staticmethod
    def _standby_of(m):
        """The port a member keeps for a successor coordinator (pycoll.comm.failover), or 0."""
        port = m.info.get("standby") if isinstance(m.info, dict) else None
        return port if isinstance(port, int) and 0 < port < 65536 else 0

    @staticmethod
    def _transport_of(info):
        """A member's same-host transport setting ("auto", "shm" or "tcp")."""
        mode = info.get("transport") if isinstance(info, dict) else None
        return mode if mode in ("auto", "shm", "tcp") else "auto"

    def _transport_clash(self, host_id, info):
        """Why a joiner's transport setting cannot work with the live members
        on its host (one requires shared memory, the other refuses it), else
        None. Refused at the join, so a misconfigured peer gets the error and
        the running group is not disturbed."""
        mode = self._transport_of(info)
        if mode == "auto" or not host_id:
            return None
        other = "tcp" if mode == "shm" else "shm"
        for m in self.members.values():
            if m.alive and m.host_id == host_id and self._transport_of(m.info) == other:
                return (f"transport={mode} conflicts with member {m.name} on the same host, which uses "
                        f"transport={other}: peers on one host must not mix shm and tcp (auto works with either)")
        return None

    #: seconds after which a successor serves the lost coordinator's address even if still resuming
    ALSO_AFTER_S = 1.0

    def _serve_also(self):
        if self._also_after_resume is not None:
            host, port, _ = self._also_after_resume
            self._also_after_resume = None
            self.also_listen(host, port)

    def _answer_resume_waiters(self, force=False):
        """Answer the members that asked whether a round of the lost coordinator was decided,
        once every member of the old epoch re-registered (or is known dead, or the wait is over)."""
        if not self.resume_waiters:
            return
        resume = self.resume
        if resume is not None and not force:
            known = resume["heard"] | resume["dead"] | {n for n, v in self.resume_probe.items() if v == "dead"}
            if (resume["expect"] - known) and time.monotonic() - resume["since"] < self.resume_patience():
                return
        for ident, msg in self.resume_waiters:
            key = (msg.get("epoch"), msg.get("seq"))
            if key in self.resumed_decided:
                self._reply(ident, msg, decided=self.resumed_decided[key])
            else:
                self.resumed_undecided.add(key)
                while len(self.resumed_undecided) > 64:
                    self.resumed_undecided.pop()
                self._reply(ident, msg, **self._abort_info(stale=True))
        self.resume_waiters = []

    #: seconds between two aborts a successor sends a member left behind in the old epoch
    RETELL_S = 0.5

    def _tell_left_behind(self, only=None):
        """A successor re-forming the group: cancel the old epoch's operation that a re-registered
        member (``only``: that one; default: every one) may be waiting in, once that operation
        cannot complete: a member of the old epoch is known dead, or another member left the
        epoch for the sync point (the lost coordinator answered the two of them differently,
        e.g. its last sync reply reached only some). Told again every RETELL_S seconds until it
        reaches the sync point: a member whose heartbeat reached us only after the others
        synced, or that was between two calls when told, is never left waiting in a collective
        for its timeout (the data plane would not tell it: nobody failed, they just left)."""
        resume = self.resume
        if resume is None:
            return
        synced = any(x is not None and x.alive and x.sync_rid is not None
                     for x in (self.members.get(n) for n in resume["heard"]))
        if not (resume["dead"] or synced):
            return
        dead = sorted(resume["dead"])
        why = (f"the coordinator was lost with {', '.join(dead)}; the group re-forms under its successor" if dead
               else "the coordinator was lost; the group re-forms under its successor")
        now = time.monotonic()
        for name in ([only.name] if only is not None else sorted(resume["heard"])):
            x = self.members.get(name)
            if x is None or not x.alive or x.sync_rid is not None or x.hb_ident is None:
                continue
            last = resume["told"].get(name)
            if last is not None and now - last < self.RETELL_S:
                continue
            resume["told"][name] = now
            self._send(x.hb_ident, {"t": "abort", "epoch": resume["epoch"], "lost": dead, "why": why})

    def _forget(self, m):
        """Drop a member that is no part of any epoch from the tables."""
        del self.members[m.name]
        for ident in [i for i, x in self.by_ident.items() if x is m]:
            del self.by_ident[ident]

    def _drop_stale(self):
        """While re-forming after a lost coordinator: a member that re-registered from an older
        epoch than another, and was not a member of that newer one, had been dropped from the
        group (declared dead, maybe wrongly, by a coordinator since lost). The others may have
        completed calls without it since, so pairing its next call with theirs would mix two
        different steps: it is refused, as an evicted member is, and may join anew."""
        left = self.resume.get("left", {})
        heard = [n for n in self.resume["heard"] if n in left and n in self.members and self.members[n].alive]
        if not heard:
            return
        newest = max(left[n][0] for n in heard)
        members_of_newest = set().union(*(left[n][1] for n in heard if left[n][0] == newest))
        for name in [n for n in heard if left[n][0] < newest and n not in members_of_newest]:
            m = self.members[name]
            why = (f"this peer ({name}) was dropped from the group before epoch {newest} (it re-registered "
                   f"from epoch {left[name][0]}), and the others went on without it; join again with "
                   "pycoll.connect()")
            log.warning("refusing %s: %s", name, why)
            if m.sync_rid is not None:
                self._send(m.req_ident, {"rid": m.sync_rid, "ok": False, "error": why, "evicted": True, "why": why})
                m.sync_rid = None
            m.alive = False
            self.removed[name] = why
            self._forget(m)
            self.resume["heard"].discard(name)
            self.resume["expect"].discard(name)
        # the members the newest epoch had are the ones to wait for, not an older epoch's
        self.resume["expect"] = {n for n in self.resume["expect"] if n in members_of_newest}

    def resume_patience(self):
        """Seconds a successor waits for a member that is alive but has not re-registered."""
        return max(3.0, 2 * self.heartbeat_timeout)

    def resume_missing(self):
        """Names of the old epoch's members that have not re-registered yet (None: not resuming)."""
        resume = self.resume
        if resume is None:
            return None
        try:  # (called from another thread: a snapshot, taken again if the dicts changed meanwhile)
            return sorted(set(resume["expect"]) - set(self.members) - set(resume["dead"]))
        except RuntimeError:
            return []

    def _exclude_cut(self, current):
        """Every live member is at the sync point and some reported peers they cannot reach over
        the data network: exclude the fewest members that explain every report (one end of each
        reported pair), even ones we still hear. Ties: the members named most often, then the
        highest ranks. Returns whether any was excluded (they get an error and count as dead)."""
        live = {m.name for m in current}
        edges = {(a, b) for a, b in self.cut if a in live and b in live}
        self.cut = set()
        if not edges:
            return False
        drop = minimum_cover(edges, self._rank_of)
        reporters = {}
        for a, b in edges:
            for x, y in ((a, b), (b, a)):
                if x in drop:
                    reporters.setdefault(x, set()).add(self._rank_of(y))
        for name in sorted(drop, key=self._rank_of):
            m = self.members[name]
            why = (f"rank {self._rank_of(name)} ({name}) cannot be reached over the data network by ranks "
                   f"{sorted(reporters.get(name, ()))} (its links are cut; the coordinator still hears it): "
                   "excluded so that the group goes on. Join again with pycoll.connect() once the links are back")
            if m.sync_rid is not None:
                self._send(m.req_ident, {"rid": m.sync_rid, "ok": False, "error": why, "evicted": True, "why": why})
                m.sync_rid = None
            self.stats["cut_excluded"] += 1
            self._declare_dead(m, why)
        return True

    def _maybe_form_epoch(self):
        resumed = set()
        current = [self.members[n] for n in self.epoch_members if self.members[n].alive]
        if any(m.sync_rid is None for m in current):
            return  # a live member has not reached the sync point yet
        if self.cut and self._exclude_cut(current):
            return  # (declaring them dead formed the epoch without them)
        admit = all(m.sync_admit for m in current if self._switch_group(m) is None)
        joiners = [m for m in self.members.values()
                   if m.alive and m.name not in self.epoch_members and m.sync_rid is not None] if admit else []
        waiting = current + joiners
        if not waiting:
            return
        if not current and self.resume is not None:
            # Re-forming after a coordinator restart: wait for every member of
            # the old epoch to re-register, or for the detection bound (the
            # missing ones are dead), then continue the epoch numbering.
            # No split brain (docs/fault-model.md): the members we do not hear from must be known
            # dead (their processes are gone), or fewer than those that re-registered, which then
            # are the majority of the old epoch's live part; the other side of a cut never is.
            self._drop_stale()
            joiners = [m for m in joiners if m.alive]
            probed = self.resume_probe
            dead = self.resume["dead"] | {n for n, v in probed.items() if v == "dead"}
            heard = {n for n in self.resume["heard"] if n in self.members and self.members[n].alive}
            if heard - {m.name for m in joiners}:
                return  # re-registered (alive: it heartbeats), not at the sync point yet: it comes
            # a peer that joined without a resume (it was being admitted when the coordinator was
            # lost) is alive and not of the old epoch for itself: it waits to be admitted anew
            fresh = {n for n, x in self.members.items() if x.alive and n not in self.resume["heard"]}
            joiners = [m for m in joiners if m.name in heard]  # (the fresh ones at a later sync point)
            missing = self.resume["expect"] - heard - dead - fresh
            waited = time.monotonic() - self.resume["since"]
            if missing and any(probed.get(n) == "alive" for n in missing) and waited < self.resume_patience():
                return  # alive (its listener answers), just slow to notice: wait for it
            if missing and waited < self.heartbeat_timeout:
                return
            if missing and len(missing) >= len(joiners):
                why = (f"this side of the group ({len(joiners)} peer(s): {sorted(m.name for m in joiners)}) is "
                       f"not a majority: {len(missing)} member(s) of epoch {self.resume['epoch']} "
                       f"({sorted(missing)}) cannot be reached and are not known dead (a cut link?); the "
                       "group goes on on the other side, if anywhere. Join it again with pycoll.connect() "
                       "once it can be reached")
                log.warning("not forming an epoch: %s", why)
                for m in joiners:
                    self._send(m.req_ident, {"rid": m.sync_rid, "ok": False, "error": why, "minority": True})
                    m.sync_rid = None
                self.resume["since"] = time.monotonic()  # heard from again later: counted again
                return
            if not joiners:
                return
            waiting = joiners
            resumed = {m.name for m in joiners}  # members of the lost coordinator's epoch: not joiners
            self.epoch = max(self.epoch, self.resume["epoch"], self.resume.get("seen", 0))
            self.resume = None
            self._serve_also()
        elif not current:  # first epoch, or everybody died: wait for enough peers
            if self.epoch == 0 and time.monotonic() < self.resume_expected_until:
                return  # a successor: the old members re-register first (joiners are admitted after)
            # a static group (pycoll.init, ranks given) waits for all its ranks, also when it forms again
            # on a coordinator whose earlier group has left (a persistent `pycoll master`/`pycoll run`)
            static = self.epoch == 0 or any(m.rank_hint is not None for m in joiners)
            need = self.world_size if (self.world_size and static) else self.min_world_size
            if sum(1 for m in joiners if self._switch_group(m) is None) < need:
                return
        lost = [n for n in self.epoch_members if not self.members[n].alive]
        changed = bool(joiners or lost or any(m.sync_rebuild for m in current) or self.abort is not None)
        if not changed:
            for m in current:
                if faults.FAULTS_ARMED:  # test hook: die having answered only some members' sync
                    faults.fault_point("coordinator:sync")
                self._send(m.req_ident, {"rid": m.sync_rid, "ok": True, "epoch": self.epoch,
                                         "unchanged": True})
                m.sync_rid = None
            return
        prev = {n: i for i, n in enumerate(self.epoch_members)}
        big = 1 << 30
        # workers first: their engine ranks are their ranks; aggregators last (pycoll.aggregator)
        waiting.sort(key=lambda m: (self._switch_group(m) is not None, prev.get(m.name, big),
                                    m.rank_hint if m.rank_hint is not None else big, m.join_seq))
        self.epoch += 1
        self.epoch_members = [m.name for m in waiting]
        self.token = secrets.token_hex(16)
        self.abort = None
        self.rounds = {}
        self.decided.clear()
        self.fail_waiters = []
        self.cut = set()
        self.stats["epochs"] += 1
        for name in lost + [n for n, x in self.members.items() if not x.alive and n not in self.epoch_members]:
            self.members.pop(name, None)  # forget the dead for good (members, and joiners that died waiting)
        for ident in [i for i, x in self.by_ident.items() if x.name not in self.members]:
            del self.by_ident[ident]
        for fd in [f for f, x in self._hb_fds.items() if x.name not in self.members]:
            del self._hb_fds[fd]
        members = [[m.name, m.addr, m.host_id, self._switch_group(m), self._transport_of(m.info), self._standby_of(m)]
                   for m in waiting]
        joined = [m.name for m in joiners if m.name not in resumed]
        log.info("epoch %d: %d members (lost %d, joined %d)", self.epoch, len(waiting), len(lost), len(joiners))
        for rank, m in enumerate(waiting):
            self._send(m.req_ident, {"rid": m.sync_rid, "ok": True, "epoch": self.epoch, "unchanged": False,
                                     "rank": rank, "members": members, "token": self.token, "lost": lost,
                                     "joined": joined, "host": self.host_name})
            m.sync_rid = None
            m.sync_rebuild = False
            m.sync_admit = False


def minimum_cover(edges, rank_of, exact_up_to=16):
    """The fewest members that touch every (a, b) pair of ``edges`` (a minimum vertex cover),
    the same for the same pairs: among the smallest, the one whose members are named most
    often, then the one with the highest ranks (``rank_of``). Exact up to ``exact_up_to``
    members involved, greedy (most named first) beyond."""
    import itertools
    degree = collections.Counter(x for e in edges for x in e)
    nodes = sorted(degree, key=lambda x: (-degree[x], -rank_of(x)))
    if len(nodes) > exact_up_to:
        cover, left = [], set(edges)
        while left:
            count = collections.Counter(x for e in left for x in e)
            best = max(count, key=lambda x: (count[x], rank_of(x)))
            cover.append(best)
            left = {e for e in left if best not in e}
        return cover
    for k in range(1, len(nodes) + 1):
        best = None
        for combo in itertools.combinations(nodes, k):
            chosen = set(combo)
            if all(a in chosen or b in chosen for a, b in edges):
                key = (sum(degree[x] for x in combo), sorted((rank_of(x) for x in combo), reverse=True))
                if best is None or key > best[0]:
                    best = (key, combo)
        if best is not None:
            return list(best[1])
    return nodes


def main(host="127.0.0.1", port=29500, world_size=None, heartbeat_timeout=5.0):
    """Run a coordinator in the foreground until interrupted (secret from PYCOLL_SECRET)."""
    c = Coordinator(host, port, world_size=world_size, heartbeat_timeout=heartbeat_timeout)
    print(f"pycoll coordinator on tcp://{host}:{c.port} (pid {os.getpid()})", flush=True)
    try:
        c.serve()
    except KeyboardInterrupt:
        pass
