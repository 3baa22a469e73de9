"""Building the full mesh of peer connections for one membership epoch.

Every peer keeps one listening socket for its lifetime. For each epoch the
higher rank of every pair connects to the lower one, ``stripes`` times. The
acceptor opens with a 32-byte random challenge; the connector answers with a
fixed 64-byte hello (magic, version, epoch, sender and receiver rank, stripe,
the epoch's token from the coordinator) followed by its HMAC response to the
challenge (``pycoll.auth``: a key from the shared secret, bound to the
hello). The acceptor checks every field and the MAC before the socket is
used and answers with a 4-byte ack and its own proof, which the connector
checks in turn. A stranger, a peer without the secret, a peer of another
epoch, or one that is too slow (``handshake_timeout``) is dropped and logged
and does not count; at most ``max_pending`` handshakes wait at once (the
oldest is dropped first). The finished sockets are handed to the C core by
file descriptor.
"""
import logging
import os
import selectors
import socket
import struct
import threading
import time

from . import auth
from .errors import PeerFailure
from .limits import resolve

log = logging.getLogger("pycoll.mesh")

HELLO = struct.Struct("<4sHHIIQ32s8x")  # 64 bytes
HELLO_MAGIC = b"PCHS"
ACK = b"PCOK"
HELLO_VERSION = 2  # 2: challenge-response authentication
HANDSHAKE_TIMEOUT = 5.0  # default of Limits.handshake_timeout
GREETING = HELLO.size + auth.RESPONSE_BYTES  # what the acceptor reads: hello + response


def host_id():
    """Identifies this host *and* network namespace (same-host transports
    must not trust an IP address alone)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = socket.gethostname()
    try:
        ns = os.stat("/proc/self/ns/net").st_ino
    except OSError:
        ns = 0
    return f"{boot}:{ns}"


def local_address_towards(host):
    """The local IP this machine would use to reach ``host`` (no packet is sent)."""
    if host in ("127.0.0.1", "localhost", "::1") or host.startswith("127."):
        return "127.0.0.1"
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect((host, 9))
        return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"
    finally:
        s.close()


def _tune(sock, sockbuf):
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if sockbuf:
        # before listen()/connect() so the window scale is negotiated for it
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sockbuf)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, sockbuf)


class Listener:
    """The peer's data-plane listening socket."""

    def __init__(self, bind_host="127.0.0.1", advertise_host=None, sockbuf=0, limits=None):
        self.sockbuf = sockbuf
        self.limits = resolve(limits)
        self.refusals = auth.QuietLog(log)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        _tune(self.sock, sockbuf)
        self.sock.bind((bind_host, 0))
        self.sock.listen(512)
        self.sock.setblocking(False)
        self.addr = (advertise_host or bind_host, self.sock.getsockname()[1])

    def close(self):
        self.sock.close()

    def accept_mesh(self, rank, expected, epoch, token, deadline, key=None, should_abort=None):
        """Accept connections until ``expected`` {(peer, stripe)} all arrived.

        Returns {(peer, stripe): socket}. ``key``: the mesh key
        (``auth.derive(secret, "mesh")``); None means no secret.
        ``should_abort()`` returning True (the epoch was aborted: a peer died
        while connecting) stops the wait with PeerFailure.
        """
        key = key if key is not None else auth.derive(None, "mesh")
        timeout = self.limits.handshake_timeout
        got = {}
        sel = selectors.DefaultSelector()
        sel.register(self.sock, selectors.EVENT_READ, None)
        partial = {}  # socket -> (bytes so far, started, challenge); insertion order = age
        try:
            while len(got) < len(expected):
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = sorted(set(expected) - set(got))
                    raise PeerFailure(f"rank {rank}: peers {sorted({p for p, _ in missing})} did not connect "
                                      f"in time for epoch {epoch}", peer=missing[0][0])
                if should_abort is not None and should_abort():
                    raise PeerFailure(f"rank {rank}: epoch {epoch} was aborted while connecting")
                for sk, _ in sel.select(timeout=min(left, 0.2)):
                    if sk.fileobj is self.sock:
                        self._accept_some(sel, partial)
                    elif sk.fileobj in partial:  # (it may have been dropped this round)
                        self._read_hello(sk.fileobj, sel, partial, got, rank, expected, epoch, token, key)
                now = time.monotonic()
                for s, (_, started, _) in list(partial.items()):
                    if now - started > timeout:
                        self.refusals.warning("slow", "rank %d dropped a connection that sent no valid hello "
                                              "within %.1f s (handshake_timeout)", rank, timeout)
                        self._drop(s, sel, partial)
        except BaseException:
            for s in got.values():
                s.close()
            raise
        finally:
            for s in partial:
                sel.unregister(s)
                s.close()
            sel.close()
        return got

    @staticmethod
    def _drop(s, sel, partial):
        sel.unregister(s)
        del partial[s]
        s.close()

    def _accept_some(self, sel, partial):
        for _ in range(64):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. out of file descriptors: the next round retries
                self.refusals.warning("accept", "accept failed: %s", exc)
                return
            if len(partial) >= self.limits.max_pending:
                oldest = next(iter(partial))
                self.refusals.warning("pending", "more than %d handshakes pending (max_pending): dropping the "
                                      "oldest", self.limits.max_pending)
                self._drop(oldest, sel, partial)
            chal = auth.challenge()
            try:
                conn.setblocking(False)
                conn.send(chal)  # 32 bytes into an empty socket buffer: never blocks
            except OSError:
                conn.close()
                continue
            sel.register(conn, selectors.EVENT_READ, None)
            partial[conn] = (b"", time.monotonic(), chal)

    def _read_hello(self, s, sel, partial, got, rank, expected, epoch, token, key):
        data, started, chal = partial[s]
        try:
            chunk = s.recv(GREETING - len(data))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._drop(s, sel, partial)
            return
        data += chunk
        if len(data) < GREETING:
            partial[s] = (data, started, chal)
            return
        sel.unregister(s)
        del partial[s]
        hello, response = data[:HELLO.size], data[HELLO.size:]
        why = None
        try:
            magic, version, stripe, src, dst, ep, tok = HELLO.unpack(hello)
            if magic != HELLO_MAGIC:
                why = "not a pycoll peer (bad magic)"
            elif version != HELLO_VERSION:
                why = f"hello version {version}"
            elif ep != epoch or tok != token.encode()[:32] or dst != rank:
                why = f"hello for epoch {ep} rank {dst}, this is epoch {epoch} rank {rank}"
            elif not auth.check_response(key, chal, hello, response):
                why = f"authentication failed for a peer claiming rank {src} (wrong or missing PYCOLL_SECRET?)"
            elif (src, stripe) not in expected or (src, stripe) in got:
                why = f"unexpected or duplicate connection from rank {src} stripe {stripe}"
        except struct.error:
            why = "malformed hello"
        if why is not None:
            try:
                addr = "%s:%d" % s.getpeername()[:2]
            except OSError:
                addr = "?"
            self.refusals.warning(why.split(" ")[0], "rank %d rejected a connection from %s: %s", rank, addr, why)
            s.close()
            return
        try:
            s.setblocking(True)
            s.settimeout(self.limits.handshake_timeout)
            s.sendall(ACK + auth.proof(key, chal, hello, response))
        except OSError:
            s.close()
            return
        got[(src, stripe)] = s


def _recv_exact(s, n, what, should_abort=None, limit=HANDSHAKE_TIMEOUT):
    """n bytes from s within ``limit`` seconds; with ``should_abort`` the wait
    is cut into short slices so that an aborted epoch stops it."""
    buf = b""
    end = time.monotonic() + limit
    if should_abort is not None:
        s.settimeout(0.1)
    while len(buf) < n:
        try:
            part = s.recv(n - len(buf))
        except socket.timeout:
            if should_abort is None or time.monotonic() > end:
                raise
            if should_abort():
                raise ConnectionError(f"epoch aborted while waiting for the {what}") from None
            continue
        if not part:
            raise ConnectionError(f"closed during the hello ({what}): wrong PYCOLL_SECRET or epoch?")
        buf += part
    return buf


def connect_peer(addr, rank, peer, stripe, epoch, token, deadline, sockbuf=0, key=None,
                 handshake_timeout=HANDSHAKE_TIMEOUT, should_abort=None):
    """Open one stripe to a lower-ranked peer and complete the authenticated hello."""
    key = key if key is not None else auth.derive(None, "mesh")
    hello = HELLO.pack(HELLO_MAGIC, HELLO_VERSION, stripe, rank, peer, epoch, token.encode()[:32])
    last = None
    while time.monotonic() < deadline:
        if should_abort is not None and should_abort():
            raise PeerFailure(f"rank {rank}: epoch {epoch} was aborted while connecting to rank {peer}", peer=peer)
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        _tune(s, sockbuf)
        s.settimeout(max(0.05, min(handshake_timeout, deadline - time.monotonic())))
        try:
            s.connect(tuple(addr))
            limit = max(0.05, min(handshake_timeout, deadline - time.monotonic()))
            chal = _recv_exact(s, auth.CHALLENGE_BYTES, "challenge", should_abort, limit)
            response = auth.respond(key, chal, hello)
            s.sendall(hello + response)
            reply = _recv_exact(s, len(ACK) + auth.PROOF_BYTES, "ack", should_abort, limit)
            if reply[:len(ACK)] != ACK:
                raise ConnectionError("bad ack")
            if not auth.check_proof(key, chal, hello, response, reply[len(ACK):]):
                # not retried: the listener at this address is not our peer
                s.close()
                raise PeerFailure(f"rank {rank}: the listener at {addr[0]}:{addr[1]} failed to prove it holds "
                                  f"the secret (not rank {peer}?)", peer=peer)
            s.settimeout(None)
            return s
        except OSError as exc:
            last = exc
            s.close()
            time.sleep(0.02)
    raise PeerFailure(f"rank {rank}: cannot connect to rank {peer} at {addr[0]}:{addr[1]} for epoch {epoch}: {last}",
                      peer=peer)


def build_mesh(listener, rank, addrs, stripes, epoch, token, timeout, sockbuf=0, key=None, should_abort=None):
    """Connect to every peer; returns a list of n*stripes fds (-1 for self).

    ``key``: the mesh key (``auth.derive(secret, "mesh")``, None without a
    secret). The caller owns the returned fds (they are detached from Python
    sockets).
    """
    n = len(addrs)
    deadline = time.monotonic() + timeout
    expected = {(p, s) for p in range(rank + 1, n) for s in range(stripes)}
    outgoing = {}
    errors = []

    def dial():
        try:
            for p in range(rank):
                for s in range(stripes):
                    outgoing[(p, s)] = connect_peer(addrs[p], rank, p, s, epoch, token, deadline, sockbuf,
                                                    key, listener.limits.handshake_timeout, should_abort)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    dialer = threading.Thread(target=dial, name="pycoll-dial", daemon=True)
    dialer.start()
    try:
        incoming = (listener.accept_mesh(rank, expected, epoch, token, deadline, key, should_abort)
                    if expected else {})
    except BaseException:
        dialer.join(timeout=max(0.0, deadline - time.monotonic()) + 1)
        for s in outgoing.values():
            s.close()
        raise
    dialer.join(timeout=max(0.0, deadline - time.monotonic()) + 1)
    if errors or dialer.is_alive():
        for s in list(outgoing.values()) + list(incoming.values()):
            s.close()
        if errors:
            raise errors[0]
        raise PeerFailure(f"rank {rank}: connecting to peers timed out for epoch {epoch}")
    fds = [-1] * (n * stripes)
    for (p, s), sock in list(outgoing.items()) + list(incoming.items()):
        fds[p * stripes + s] = sock.detach()
    return fds
