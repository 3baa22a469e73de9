"""A peer's side of the coordinator protocol.

Two DEALER sockets: ``req`` (requests with replies, used under a lock by
whichever thread calls) and ``hb`` (owned by a heartbeat thread that also
receives pushed ``abort`` messages and hands them to a callback). Every
wait has a deadline: a coordinator that vanishes is a CoordinatorError,
never a hang. Messages are signed both ways (``pycoll.auth``); anything from
the coordinator's address that fails the check is ignored.
"""
import logging
import socket
import threading
import time
import uuid

import zmq
from zmq.utils.monitor import recv_monitor_message

from pycoll import auth
from pycoll.control.coordinator import PROTOCOL, encryption, pack, unpack
from pycoll.errors import CoordinatorError
from pycoll.limits import resolve
from pycoll.net.mesh import probe_addrs

log = logging.getLogger("pycoll.control")


class CoordinatorClient:
    """``heartbeat_timeout``: how long the coordinator may stay silent before
    it counts as lost (requests then fail with CoordinatorError instead of
    waiting on). Heartbeats go out every ``heartbeat_interval`` seconds
    (default: a quarter of the timeout, at most 0.5 s)."""

    def __init__(self, host, port, name=None, heartbeat_interval=None, heartbeat_timeout=5.0,
                 on_abort=None, context=None, secret=None, limits=None):
        self.host, self.port = host, port
        self.origin = (host, port)  # the address the group was made with (a successor serves there too)
        self.limits = resolve(limits)
        secret = auth.load_secret(secret)
        self._curve = encryption(secret)  # (server public key, -) when PYCOLL_ENCRYPT is on
        self._to_key = auth.derive(secret, "to-coordinator")
        self._from_key = auth.derive(secret, "from-coordinator")
        self._sealer = auth.Sealer(self._to_key)  # used under self._lock only
        self.cred = ""  # given by the coordinator at join
        self._beat_now = False  # the heartbeat thread sends one now, not at its next interval
        self._moves = 0  # retargets asked for: a request in flight to the coordinator we leave gives up
        self.name = name or uuid.uuid4().hex[:12]
        self.heartbeat_timeout = heartbeat_timeout
        self.heartbeat_interval = heartbeat_interval or min(0.5, heartbeat_timeout / 4.0)
        self.evicted = None  # why the coordinator dropped us, once it says so
        self.needs_rejoin = False  # a request failed because the coordinator was lost, or we were evicted
        # the coordinator that answers never knew us (not: removed us): a restarted one, or a
        # successor serving at the lost one's address (pycoll.comm.failover)
        self.stranger = False
        self.on_dead = None  # called (heartbeat thread) when the coordinator's process is found gone
        # we left the group (Epoch.leave): the coordinator may stop as soon as it saw the last member
        # go, before close() stops our heartbeats, and its loss is then no news
        self.left = False
        self.on_abort = on_abort
        # called (heartbeat thread) when the coordinator, alive, says it removed us (with why): whatever
        # we wait in was aborted without us
        self.on_evicted = None
        self.last_status = {}
        self._ctx = context or zmq.Context.instance()
        self._lock = threading.Lock()
        self._rid = 0
        self._req = self._socket(b"/req")
        self._req_opener = auth.Opener(self._from_key, self.limits.replay_window)
        self._stop = threading.Event()
        self._lost_since = None
        self._last_reply = time.monotonic()
        # Seconds the heartbeat thread has run since the last reply: the coordinator's silence as
        # we could have heard it. Time this process was stopped (SIGSTOP, a paused VM) or starved
        # counts for little: on waking, the silence is ours, not the coordinator's (an evicted
        # peer must learn it was evicted, not fail over a coordinator that is alive).
        self._silent = 0.0
        # The coordinator's process is gone (its connection dropped and its port refuses): a
        # fact, not a silence, so requests fail at once (see _heartbeat_loop, failover).
        self.coordinator_dead = False
        self._retarget = 0  # bumped by retarget(): the heartbeat thread reconnects its socket
        # guards coordinator_dead against a verdict on the coordinator we just left (see _confirm_dead)
        self._dead_lock = threading.Lock()
        self._hb_thread = None
        self.on_wait = None  # called as on_wait(kind, waited_s) every progress_interval s a request waits
        self.progress_interval = 5.0
        # (epoch, seq, kind, reply) of the last round this peer got a decision for, recorded under
        # the request lock before the request returns: a re-registration with a successor (a
        # request too, so after it) always tells the decisions this peer acted on (failover)
        self.last_round = None

    def _socket(self, suffix):
        s = self._ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.IDENTITY, self.name.encode() + suffix + uuid.uuid4().hex[:6].encode())
        s.setsockopt(zmq.MAXMSGSIZE, self.limits.max_message_bytes)
        s.setsockopt(zmq.HANDSHAKE_IVL, int(self.limits.handshake_timeout * 1000))
        if self._curve:
            s.curve_serverkey = self._curve[0]
            s.curve_publickey, s.curve_secretkey = zmq.curve_keypair()
        s.setsockopt(zmq.RECONNECT_IVL, 20)  # a successor coordinator binds a moment after we dial it
        s.setsockopt(zmq.RECONNECT_IVL_MAX, 500)
        s.connect(f"tcp://{self.host}:{self.port}")
        return s

    @property
    def endpoint(self):
        return f"{self.host}:{self.port}"

    @property
    def generation(self):
        """How many times this client moved to another coordinator (a reply taken before a move
        is from one we left)."""
        return self._retarget

    def request(self, msg, timeout, give_up=None):
        """Send one request and wait up to ``timeout`` s for its reply. ``msg``: a dict, or a
        function that makes it, called under the request lock (so it sees every reply an
        earlier request returned, e.g. ``last_round``). ``give_up()``: asked while waiting (every
        20 ms); True ends the wait with CoordinatorError (the one asked is known gone)."""
        with self._lock:
            moves = self._moves
            if callable(msg):
                msg = msg()
            self._rid += 1
            rid = self._rid
            msg = dict(msg, rid=rid, name=self.name, cred=self.cred)
            opener = self._req_opener
            try:
                self._req.send(self._sealer.seal(pack(msg)), zmq.NOBLOCK)
            except zmq.ZMQError as exc:
                raise CoordinatorError(f"cannot send to coordinator at {self.endpoint}: {exc}") from exc
            start = time.monotonic()
            deadline = start + timeout
            next_progress = start + self.progress_interval
            while True:
                now = time.monotonic()
                left = deadline - now
                if self.on_wait is not None and now >= next_progress and left > 0:
                    next_progress = now + self.progress_interval
                    try:
                        self.on_wait(msg["t"], now - start)
                    except Exception:  # noqa: BLE001 - progress reports never break a request
                        log.debug("progress callback failed", exc_info=True)
                if left <= 0:
                    exc = CoordinatorError(
                        f"no answer from the coordinator at {self.endpoint} to {msg['t']!r} within "
                        f"{timeout:.1f} s (is it running? did the group lose a member it waits for?)")
                    exc.timed_out = True
                    raise exc
                if self._stop.is_set():
                    raise CoordinatorError("client closed")
                if give_up is not None and give_up():
                    raise CoordinatorError(f"gave up waiting for the coordinator at {self.endpoint}: it is gone")
                if self._moves != moves:  # (another thread holds on to us to move to a successor)
                    self.needs_rejoin = True
                    raise CoordinatorError(f"the coordinator at {self.endpoint} was lost while this request "
                                           "waited for it; this peer re-registers with its successor")
                if self._req.poll(min(left, 0.02) * 1000):
                    reply = self._open(opener, self._req.recv(), msg["t"])
                    if reply is None or reply.get("rid") != rid:
                        continue  # forged, or a late reply to a request that already timed out
                    if not reply.get("ok"):
                        if reply.get("evicted"):
                            self.needs_rejoin = True
                            self.evicted = self.evicted or str(reply.get("why") or reply.get("error"))
                            self.stranger = not reply.get("why")
                        exc = CoordinatorError(f"coordinator refused {msg['t']!r}: {reply.get('error')}",
                                               evicted=bool(reply.get("evicted")))
                        exc.retry = bool(reply.get("retry"))  # a passing state (shutting down): try again
                        exc.conflict = bool(reply.get("conflict"))
                        raise exc
                    if msg["t"] == "join" and isinstance(reply.get("cred"), str):
                        self.cred = reply["cred"]
                        # a heartbeat sent while the join was in flight went unheard (no credential
                        # yet): beat now, so the coordinator can reach us (aborts) at once
                        self._beat_now = True
                    elif msg["t"] == "round" and "decision" in reply:
                        self.last_round = (msg.get("epoch"), msg.get("seq"), msg.get("kind"), reply)
                    return reply
                if self.coordinator_lost():
                    self.needs_rejoin = True
                    raise CoordinatorError(
                        f"the coordinator at {self.endpoint} stopped answering heartbeats for more than "
                        f"{self.heartbeat_timeout:.1f} s. Restart it at the same address (`pycoll master --port "
                        f"{self.port}`): peers made with coordinator_wait > 0 re-register at their next call; "
                        "otherwise restart the job from a checkpoint")

    def _open(self, opener, data, what=None):
        """The coordinator's message as a dict, or None if it is not authentic."""
        if what is not None and data[:4] == auth.REFUSED:
            raise CoordinatorError(
                f"the coordinator at {self.endpoint} refused {what!r}: "
                f"{data[4:].decode(errors='replace')}. Every peer and the coordinator need the same "
                "PYCOLL_SECRET (or token=)")
        try:
            msg = unpack(opener.open(data))
        except Exception as exc:  # noqa: BLE001 - forged or garbled: ignore, never crash
            log.warning("ignoring a message from the coordinator address that failed checks: %s", exc)
            return None
        return msg if isinstance(msg, dict) else None

    # ---- first contact -------------------------------------------------
    def check_endpoint(self, wait=4.0):
        """Before the first request: is ``host:port`` a pycoll coordinator?
        Returns "zmq" (a ZeroMQ peer answered), "closed" (nothing listens yet:
        wait for it) or raises CoordinatorError naming the problem (a name that
        does not resolve, another program on the port)."""
        return check_endpoint(self.host, self.port, wait)

    # ---- heartbeats ----------------------------------------------------
    def start_heartbeats(self):
        self._hb_thread = threading.Thread(target=self._heartbeat_loop, name="pycoll-heartbeat", daemon=True)
        self._hb_thread.start()

    def coordinator_lost(self):
        return self._hb_thread is not None and (self.coordinator_dead or self._silent > self.heartbeat_timeout)

    def expect_coordinator(self):
        """A coordinator is about to answer (a successor starting): count it as heard from now,
        so a request waits for its answer instead of failing for the old one's silence."""
        self.coordinator_dead = False
        self._last_reply = time.monotonic()
        self._silent = 0.0

    def retarget(self, host, port):
        """Talk to the coordinator at ``host:port`` from now on (a successor, see
        pycoll.comm.failover): new sockets, a new credential at the next join."""
        self._moves += 1  # a request waiting on the lost one (holding the lock) gives up now
        with self._lock:
            self._req.close(0)
            with self._dead_lock:
                self.host, self.port = host, port
                self._retarget += 1
                self.coordinator_dead = False
            self._req = self._socket(b"/req")
            self.cred = ""
            self._last_reply = time.monotonic()
            self._silent = 0.0

    def _confirm_dead(self):
        """The heartbeat connection dropped: the coordinator is dead if its port now refuses a
        connection (the kernel answered for a process that is gone); a port that accepts, or
        stays silent, is not proof (a restart, a cut link: the heartbeat bound decides those)."""
        # (a dying process closes its connections and its listening socket one after the other:
        # a probe in between is still accepted, so look again for a moment)
        if self.left:
            return
        with self._dead_lock:
            generation, addr = self._retarget, (self.host, self.port)
        for _ in range(5):
            if probe_addrs([addr], 0.2)[0] == "dead":
                break
            time.sleep(0.01)
        else:
            return
        with self._dead_lock:
            if generation != self._retarget or self.left:
                return  # we moved to a successor meanwhile (the verdict was on the one we left), or left
            newly = not self.coordinator_dead
            self.coordinator_dead = True
        if newly:
            # a client still joining, or in a group still forming (no epoch has set on_dead yet), hears
            # of it from its join or the formation, which fails with the reason: the same news twice,
            # the first one alarming, in every failed launch
            (log.warning if self.on_dead is not None else log.info)(
                "the coordinator at %s:%d is gone (its connection dropped, its port refuses)", *addr)
            if self.on_dead is not None:
                try:
                    self.on_dead()
                except Exception:  # noqa: BLE001 - a callback never breaks the heartbeats
                    log.exception("coordinator-death callback failed")

    def wait_for_coordinator(self, timeout):
        """Block until a coordinator answers our heartbeats again (a restarted
        one at the same address); False if none did within ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self._stop.is_set():
            if time.monotonic() - self._last_reply < 2 * self.heartbeat_interval + 0.2:
                return True
            time.sleep(min(0.05, self.heartbeat_interval))
        return False

    def _heartbeat_loop(self):
        hb = self._socket(b"/hb")
        monitor = hb.get_monitor_socket(_HB_EVENTS)
        generation = self._retarget
        sealer = auth.Sealer(self._to_key)
        opener = auth.Opener(self._from_key, self.limits.replay_window)
        # one loop turn takes ~20 ms; a longer gap is this process stopped or starved (see _silent)
        gap_cap = max(0.1, self.heartbeat_timeout / 8.0)
        tick = time.monotonic()
        try:
            next_beat = 0.0
            while not self._stop.is_set():
                now = time.monotonic()
                self._silent += min(now - tick, gap_cap)
                tick = now
                if generation != self._retarget:  # a successor coordinator: dial it
                    hb.disable_monitor()
                    monitor.close(0)
                    hb.close(0)
                    hb = self._socket(b"/hb")
                    monitor = hb.get_monitor_socket(_HB_EVENTS)
                    generation, next_beat = self._retarget, 0.0
                if monitor.poll(0):
                    dropped = False
                    while monitor.poll(0):
                        event = recv_monitor_message(monitor)["event"]
                        # A refused dial after our join was answered (the coordinator died before this
                        # socket reached it: no connection to drop, chaos seed 465 waited out the 5 s
                        # heartbeat bound); before a join, a refusal is a coordinator not up yet.
                        dropped |= event == zmq.EVENT_DISCONNECTED or (event == zmq.EVENT_CONNECT_RETRIED
                                                                        and bool(self.cred))
                    if dropped:
                        self._confirm_dead()
                now = time.monotonic()
                if now >= next_beat or self._beat_now:
                    # The credential is read before the generation is checked: a retarget and a join
                    # between the two would otherwise send the successor's credential on the socket
                    # to the lost coordinator's address, which the successor may serve too (and
                    # then see that connection close, and count us dead: chaos seed 329).
                    cred = self.cred
                    if generation == self._retarget:
                        self._beat_now = False
                        try:
                            hb.send(sealer.seal(pack({"t": "hb", "name": self.name, "cred": cred})), zmq.NOBLOCK)
                        except zmq.ZMQError:
                            pass
                        next_beat = now + self.heartbeat_interval
                    else:
                        continue  # dial the successor first (top of the loop)
                if hb.poll(max(0.0, min(next_beat - time.monotonic(), 0.02)) * 1000):
                    try:
                        msg = self._open(opener, hb.recv())
                    except Exception:  # noqa: BLE001
                        continue
                    if msg is None:
                        continue
                    self._last_reply = time.monotonic()
                    self._silent = 0.0
                    self.coordinator_dead = False
                    if msg.get("t") == "hb":
                        self.last_status = msg
                        if msg.get("known") is False:
                            newly = self.evicted != msg.get("why")
                            self.evicted = msg.get("why") or "unknown to the coordinator"
                            self.stranger = not msg.get("why")
                            if msg.get("why") and newly and self.on_evicted is not None:
                                try:
                                    self.on_evicted(msg)
                                except Exception:  # noqa: BLE001 - a callback never breaks the heartbeats
                                    log.exception("eviction callback failed")
                    elif msg.get("t") == "abort" and self.on_abort is not None:
                        try:
                            self.on_abort(msg)
                        except Exception:  # noqa: BLE001
                            log.exception("abort callback failed")
        finally:
            hb.disable_monitor()
            monitor.close(0)
            hb.close(0)

    def close(self):
        self._stop.set()
        if self._hb_thread is not None and self._hb_thread is not threading.current_thread():
            self._hb_thread.join(timeout=2)
        with self._lock:
            self._req.close(0)


#: what the heartbeat socket's monitor reports: a connection that dropped, a dial refused
_HB_EVENTS = zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED


def resolve_host(host, port):
    """Raise CoordinatorError at once when ``host`` does not resolve."""
    try:
        socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise CoordinatorError(f"the coordinator address {host!r} (MASTER_ADDR) does not resolve: {exc.strerror or exc}. "
                               "Check MASTER_ADDR (a host name or IP address every rank can reach)") from None


def check_endpoint(host, port, wait=4.0):
    """"zmq", "closed", or CoordinatorError for a port held by something that
    is not a pycoll coordinator. A ZeroMQ socket sends its 10-byte ZMTP
    signature (0xFF ... 0x7F) as soon as a connection opens; other bytes, or
    silence for ``wait`` s, come from another program. A connection closed
    without a word counts as "closed" (a coordinator shutting down does that)."""
    resolve_host(host, port)
    try:
        s = socket.create_connection((host, port), timeout=2.0)
    except socket.timeout:
        return "closed"  # filtered or far away: the join's own timeout speaks
    except OSError:
        return "closed"
    got = b""
    try:
        s.settimeout(0.2)
        deadline = time.monotonic() + wait
        while len(got) < 10 and time.monotonic() < deadline:
            try:
                chunk = s.recv(10 - len(got))
            except socket.timeout:
                continue
            except OSError:
                break
            if not chunk:
                break
            got += chunk
            if got[:1] != b"\xff":
                break
    finally:
        s.close()
    if len(got) == 10 and got[0] == 0xFF and got[9] & 1:
        return "zmq"
    if got:
        what = f"it answered {got[:32]!r}"
    elif time.monotonic() < deadline:
        return "closed"  # closed without a word: a coordinator shutting down (or a program that went away)
    else:
        what = f"it accepted a connection but sent nothing for {wait:.0f} s"
    raise CoordinatorError(f"port {port} on {host} is held by another program, not a pycoll coordinator ({what}). "
                           "Pick a free MASTER_PORT (or stop what listens there)")
