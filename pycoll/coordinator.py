"""The coordinator: membership, epochs and liveness (pyzmq + msgpack).

It never touches tensor data. Peers talk to it over two DEALER sockets each:
``req`` for requests that get a reply (join, sync, ...) and ``hb`` for
heartbeats and for messages the coordinator pushes (abort).

Membership moves in *epochs*. An epoch is a fixed, ordered list of members;
a member's rank is its index. A new epoch forms at a *sync point*: every
live member of the current epoch has sent ``sync`` (``update_topology()``,
or the recovery after a failed collective). At that point the coordinator
drops dead members, admits pending joiners, and answers all of them with the
same member list; when nothing changed and nobody needs a rebuild the answer
is "unchanged" and peers keep their connections. No collective is ever
disturbed by a joiner, because joiners only enter at a sync point.

Death is noticed three ways: the member's heartbeat connection drops (a
socket monitor reports the disconnected fd, which we map back to the member
through the fd its heartbeats arrive on; instant for a killed process), heartbeats stop for
``heartbeat_timeout`` seconds, or the member says ``leave``. The coordinator
then pushes ``abort`` to the other members of the epoch so a collective in
flight is cancelled at once instead of waiting for a timeout.

Security: every message in both directions is signed with a key derived from
the shared secret (``pycoll.auth``); unsigned, forged, stale or replayed
messages are dropped (and logged, rate-limited) before they are parsed.
Requests are then shape-checked (``pycoll.schema``). A member's requests must
carry the credential it was given at join, so nobody can speak for it.
"""
import hmac
import logging
import os
import secrets
import threading
import time

import msgpack
import zmq
from zmq.utils.monitor import recv_monitor_message

from . import auth, schema
from .limits import resolve

log = logging.getLogger("pycoll.coordinator")

PROTOCOL = 1


def pack(obj):
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data):
    # Sockets cap messages at MAXMSGSIZE, which bounds what this can build.
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


class Member:
    __slots__ = ("name", "addr", "host_id", "rank_hint", "join_seq", "last_seen", "alive",
                 "req_ident", "hb_ident", "sync_rid", "sync_rebuild", "info", "cred")

    def __init__(self, name, addr, host_id, rank_hint, join_seq, info):
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
        self.info = info
        self.cred = secrets.token_hex(16)  # proves later requests come from this member


class Coordinator:
    """Runs the membership service on ``tcp://host:port``.

    ``world_size``: when set, the first epoch waits for that many members
    (static groups, ``pycoll.init``); otherwise it forms as soon as
    ``min_world_size`` members are waiting (elastic groups, ``pycoll.connect``).
    ``secret``: the shared secret (default: ``PYCOLL_SECRET``); ``limits``: a
    :class:`pycoll.limits.Limits` (default: from the environment).
    """

    def __init__(self, host="127.0.0.1", port=0, world_size=None, min_world_size=1,
                 heartbeat_timeout=5.0, context=None, secret=None, limits=None):
        self.world_size = world_size
        self.min_world_size = min_world_size
        self.heartbeat_timeout = heartbeat_timeout
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
        self._sock.setsockopt(zmq.MAXMSGSIZE, self.limits.max_message_bytes)
        # a connection that never finishes its ZMTP greeting (slowloris) is closed
        self._sock.setsockopt(zmq.HANDSHAKE_IVL, int(self.limits.handshake_timeout * 1000))
        if port:
            self._sock.bind(f"tcp://{host}:{port}")
            self.port = port
        else:
            self.port = self._sock.bind_to_random_port(f"tcp://{host}", min_port=20000, max_port=30000)
        self.host = host
        self._monitor = self._sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._hb_fds = {}          # fd of a heartbeat connection -> Member
        self.members = {}          # name -> Member
        self.by_ident = {}         # zmq identity -> Member
        self.epoch = 0
        self.epoch_members = []    # names, rank order
        self.token = ""
        self._join_seq = 0
        self._stop = threading.Event()
        self._thread = None
        self.handlers = {"join": self._on_join, "sync": self._on_sync, "hb": self._on_hb,
                         "leave": self._on_leave, "status": self._on_status, "fail": self._on_fail}

    # ---- running -------------------------------------------------------
    def start(self):
        """Serve in a daemon thread; returns self."""
        self._thread = threading.Thread(target=self.serve, name="pycoll-coordinator", daemon=True)
        self._thread.start()
        return self

    def stop(self):
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
                if poller.poll(100):
                    for _ in range(1000):  # drain, bounded
                        try:
                            frames = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._dispatch(frames)
                    self._drain_monitor()
                self._check_liveness()
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
                    self._declare_dead(member, "its connection to the coordinator dropped")

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

    def _error(self, ident, msg, error):
        self._send(ident, {"rid": msg.get("rid"), "ok": False, "error": error})

    # ---- handlers ------------------------------------------------------
    def _on_join(self, ident, msg):
        if msg.get("proto") != PROTOCOL:
            return self._error(ident, msg, f"protocol {msg.get('proto')} != {PROTOCOL}")
        name = str(msg["name"])
        rank = msg.get("rank")
        ws = msg.get("world_size")
        if ws is not None:
            if self.world_size is None and self.epoch == 0:
                self.world_size = int(ws)
            elif self.world_size is not None and int(ws) != self.world_size:
                return self._error(ident, msg, f"world_size {ws} differs from the group's {self.world_size}")
        if rank is not None and self.epoch == 0:
            if self.world_size is not None and not 0 <= int(rank) < self.world_size:
                return self._error(ident, msg, f"rank {rank} out of range for world_size {self.world_size}")
            for m in self.members.values():
                if m.alive and m.rank_hint == rank and m.name != name:
                    return self._error(ident, msg, f"rank {rank} is already taken by another peer")
        old = self.members.get(name)
        if old is not None and old.alive:
            return self._error(ident, msg, f"a live member named {name!r} exists")
        if sum(1 for m in self.members.values() if m.alive) >= self.limits.max_peers:
            return self._error(ident, msg, f"the group is full (max_peers {self.limits.max_peers}, "
                                           "PYCOLL_MAX_PEERS)")
        self._join_seq += 1
        m = Member(name, list(msg["addr"]), str(msg.get("host_id", "")), rank, self._join_seq,
                   msg.get("info") or {})
        m.req_ident = ident
        self.members[name] = m
        self.by_ident[ident] = m
        log.info("member %s joined (rank hint %s)", name, rank)
        self._reply(ident, msg, epoch=self.epoch, cred=m.cred)
        self._maybe_form_epoch()

    def _member_for(self, ident, msg):
        m = self.members.get(str(msg.get("name")))
        if m is None or not m.alive:
            return None
        if not hmac.compare_digest(str(msg.get("cred", "")).encode(), m.cred.encode()):
            self.refusals.warning("cred", "refused a %r request for member %s without its credential "
                                  "(identity %r): someone else speaks for it", msg.get("t"), m.name, ident[:32])
            return None
        return m

    def _on_hb(self, ident, msg, fd=None):
        m = self._member_for(ident, msg)
        if m is None:
            return self._send(ident, {"t": "hb", "known": False})
        if m.hb_ident != ident:
            m.hb_ident = ident
            self.by_ident[ident] = m
        if fd is not None and self._hb_fds.get(fd) is not m:
            self._hb_fds[fd] = m
        m.last_seen = time.monotonic()
        pending = sum(1 for x in self.members.values() if x.alive and x.name not in self.epoch_members)
        self._send(ident, {"t": "hb", "known": True, "epoch": self.epoch, "pending": pending})

    def _on_sync(self, ident, msg):
        m = self._member_for(ident, msg)
        if m is None:
            return self._error(ident, msg, "unknown or dead member: join again")
        m.req_ident = ident
        m.last_seen = time.monotonic()
        m.sync_rid = msg.get("rid")
        m.sync_rebuild = bool(msg.get("rebuild"))
        self._maybe_form_epoch()

    def _on_fail(self, ident, msg):
        """A member's collective failed: cancel the epoch everywhere."""
        m = self._member_for(ident, msg)
        if m is not None and msg.get("epoch") == self.epoch:
            self._push_abort(f"rank {self.epoch_members.index(m.name) if m.name in self.epoch_members else '?'} "
                             f"reported: {msg.get('why', 'failure')}", exclude=m)
        self._reply(ident, msg)

    def _on_leave(self, ident, msg):
        m = self._member_for(ident, msg)
        if m is not None:
            self._declare_dead(m, "left the group", graceful=True)
        self._reply(ident, msg)

    def _on_status(self, ident, msg):
        self._reply(ident, msg, epoch=self.epoch, members=list(self.epoch_members),
                    alive=[n for n, x in self.members.items() if x.alive],
                    world_size=self.world_size)

    # ---- liveness ------------------------------------------------------
    def _check_liveness(self):
        now = time.monotonic()
        for m in list(self.members.values()):
            # last_seen starts at join: a member that never heartbeats expires too
            # (with more grace: its client may not have started heartbeats yet)
            limit = self.heartbeat_timeout if m.hb_ident is not None else 4 * self.heartbeat_timeout
            if m.alive and now - m.last_seen > limit:
                self._declare_dead(m, f"no heartbeat for {now - m.last_seen:.1f} s")

    def _declare_dead(self, m, why, graceful=False):
        if not m.alive:
            return
        m.alive = False
        (log.info if graceful else log.warning)("member %s is gone: %s", m.name, why)
        # A graceful leave finished its collectives: peers still completing
        # theirs must not be aborted. They notice at the next sync point.
        if m.name in self.epoch_members and not graceful:
            self._push_abort(f"rank {self.epoch_members.index(m.name)} lost: {why}", lost=[m.name])
        elif m.name not in self.epoch_members and self.members.get(m.name) is m:
            # never admitted: forget it now, so a flood of joins cannot grow memory
            del self.members[m.name]
            for ident in [i for i, x in self.by_ident.items() if x is m]:
                del self.by_ident[ident]
        self._maybe_form_epoch()

    def _push_abort(self, why, lost=(), exclude=None):
        for name in self.epoch_members:
            x = self.members.get(name)
            if x is not None and x.alive and x is not exclude and x.hb_ident is not None:
                self._send(x.hb_ident, {"t": "abort", "epoch": self.epoch, "why": why, "lost": list(lost)})

    # ---- epochs --------------------------------------------------------
    @staticmethod
    def _switch_group(m):
        """The group a standalone aggregator serves (pycoll.aggregator), else None (a worker)."""
        info = m.info if isinstance(m.info, dict) else {}
        return str(info.get("group", ""))[:128] if info.get("role") == "aggregator" else None

    def _maybe_form_epoch(self):
        current = [self.members[n] for n in self.epoch_members if self.members[n].alive]
        if any(m.sync_rid is None for m in current):
            return  # a live member has not reached the sync point yet
        joiners = [m for m in self.members.values()
                   if m.alive and m.name not in self.epoch_members and m.sync_rid is not None]
        waiting = current + joiners
        if not waiting:
            return
        if not current:  # first epoch, or everybody died: wait for enough peers
            need = self.world_size if (self.world_size and self.epoch == 0) else self.min_world_size
            if sum(1 for m in joiners if self._switch_group(m) is None) < need:
                return
        lost = [n for n in self.epoch_members if not self.members[n].alive]
        changed = bool(joiners or lost or any(m.sync_rebuild for m in current))
        if not changed:
            for m in current:
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
        for name in lost:  # forget the dead for good
            del self.members[name]
        for ident in [i for i, x in self.by_ident.items() if x.name not in self.members]:
            del self.by_ident[ident]
        members = [[m.name, m.addr, m.host_id, self._switch_group(m)] for m in waiting]
        log.info("epoch %d: %d members (lost %d, joined %d)", self.epoch, len(waiting), len(lost), len(joiners))
        for rank, m in enumerate(waiting):
            self._send(m.req_ident, {"rid": m.sync_rid, "ok": True, "epoch": self.epoch, "unchanged": False,
                                     "rank": rank, "members": members, "token": self.token, "lost": lost})
            m.sync_rid = None
            m.sync_rebuild = False


def main(host="127.0.0.1", port=29500, world_size=None, heartbeat_timeout=5.0):
    """Run a coordinator in the foreground until interrupted (secret from PYCOLL_SECRET)."""
    c = Coordinator(host, port, world_size=world_size, heartbeat_timeout=heartbeat_timeout)
    print(f"pycoll coordinator on tcp://{host}:{c.port} (pid {os.getpid()})", flush=True)
    try:
        c.serve()
    except KeyboardInterrupt:
        pass
