"""Building the full mesh of peer connections for one membership epoch.

Every peer keeps one listening socket for its lifetime. For each epoch the
higher rank of every pair connects to the lower one, ``stripes`` times, and
opens with a fixed 64-byte hello (magic, version, epoch, sender and receiver
rank, stripe, the epoch's token from the coordinator). The acceptor checks
every field before the socket is used and answers with a 4-byte ack; a
stranger, a peer of another epoch, or one that sends its hello too slowly
is dropped and logged and does not count. The finished sockets are handed
to the C core by file descriptor.
"""
import logging
import os
import selectors
import socket
import struct
import threading
import time

from .errors import PeerFailure

log = logging.getLogger("pycoll.mesh")

HELLO = struct.Struct("<4sHHIIQ32s8x")  # 64 bytes
HELLO_MAGIC = b"PCHS"
ACK = b"PCOK"
HELLO_VERSION = 1
HANDSHAKE_TIMEOUT = 5.0


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

    def __init__(self, bind_host="127.0.0.1", advertise_host=None, sockbuf=0):
        self.sockbuf = sockbuf
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        _tune(self.sock, sockbuf)
        self.sock.bind((bind_host, 0))
        self.sock.listen(512)
        self.sock.setblocking(False)
        self.addr = (advertise_host or bind_host, self.sock.getsockname()[1])

    def close(self):
        self.sock.close()

    def accept_mesh(self, rank, expected, epoch, token, deadline, verify=None):
        """Accept connections until ``expected`` {(peer, stripe)} all arrived.

        Returns {(peer, stripe): socket}. ``verify(sock, hello)`` may run an
        extra check (authentication) and return False to reject.
        """
        got = {}
        sel = selectors.DefaultSelector()
        sel.register(self.sock, selectors.EVENT_READ, None)
        partial = {}  # socket -> (bytes so far, started)
        try:
            while len(got) < len(expected):
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = sorted(set(expected) - set(got))
                    raise PeerFailure(f"rank {rank}: peers {sorted({p for p, _ in missing})} did not connect "
                                      f"in time for epoch {epoch}", peer=missing[0][0])
                for key, _ in sel.select(timeout=min(left, 0.2)):
                    if key.fileobj is self.sock:
                        self._accept_some(sel, partial)
                    else:
                        self._read_hello(key.fileobj, sel, partial, got, rank, expected, epoch, token, verify)
                now = time.monotonic()
                for s, (_, started) in list(partial.items()):
                    if now - started > HANDSHAKE_TIMEOUT:
                        log.warning("dropping a connection that sent no valid hello within %.0f s", HANDSHAKE_TIMEOUT)
                        sel.unregister(s)
                        del partial[s]
                        s.close()
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

    def _accept_some(self, sel, partial):
        for _ in range(64):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            conn.setblocking(False)
            sel.register(conn, selectors.EVENT_READ, None)
            partial[conn] = (b"", time.monotonic())

    def _read_hello(self, s, sel, partial, got, rank, expected, epoch, token, verify):
        data, started = partial[s]
        try:
            chunk = s.recv(HELLO.size - len(data))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            sel.unregister(s)
            del partial[s]
            s.close()
            return
        data += chunk
        if len(data) < HELLO.size:
            partial[s] = (data, started)
            return
        sel.unregister(s)
        del partial[s]
        why = None
        try:
            magic, version, stripe, src, dst, ep, tok = HELLO.unpack(data)
            if magic != HELLO_MAGIC:
                why = "not a pycoll peer (bad magic)"
            elif version != HELLO_VERSION:
                why = f"hello version {version}"
            elif ep != epoch or tok != token.encode()[:32] or dst != rank:
                why = f"hello for epoch {ep} rank {dst}, this is epoch {epoch} rank {rank}"
            elif (src, stripe) not in expected or (src, stripe) in got:
                why = f"unexpected or duplicate connection from rank {src} stripe {stripe}"
        except struct.error:
            why = "malformed hello"
        if why is None and verify is not None and not verify(s, data):
            why = "authentication failed"
        if why is not None:
            log.warning("rank %d rejected a connection: %s", rank, why)
            s.close()
            return
        try:
            s.setblocking(True)
            s.settimeout(HANDSHAKE_TIMEOUT)
            s.sendall(ACK)
        except OSError:
            s.close()
            return
        got[(src, stripe)] = s


def connect_peer(addr, rank, peer, stripe, epoch, token, deadline, sockbuf=0, authenticate=None):
    """Open one stripe to a lower-ranked peer and complete the hello."""
    last = None
    while time.monotonic() < deadline:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        _tune(s, sockbuf)
        s.settimeout(max(0.05, min(HANDSHAKE_TIMEOUT, deadline - time.monotonic())))
        try:
            s.connect(tuple(addr))
            s.sendall(HELLO.pack(HELLO_MAGIC, HELLO_VERSION, stripe, rank, peer, epoch, token.encode()[:32]))
            if authenticate is not None:
                authenticate(s)
            ack = b""
            while len(ack) < len(ACK):
                part = s.recv(len(ACK) - len(ack))
                if not part:
                    raise ConnectionError("closed during hello")
                ack += part
            if ack != ACK:
                raise ConnectionError("bad ack")
            s.settimeout(None)
            return s
        except OSError as exc:
            last = exc
            s.close()
            time.sleep(0.02)
    raise PeerFailure(f"rank {rank}: cannot connect to rank {peer} at {addr[0]}:{addr[1]} for epoch {epoch}: {last}",
                      peer=peer)


def build_mesh(listener, rank, addrs, stripes, epoch, token, timeout, sockbuf=0, verify=None, authenticate=None):
    """Connect to every peer; returns a list of n*stripes fds (-1 for self).

    The caller owns the returned fds (they are detached from Python sockets).
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
                                                    authenticate)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    dialer = threading.Thread(target=dial, name="pycoll-dial", daemon=True)
    dialer.start()
    try:
        incoming = listener.accept_mesh(rank, expected, epoch, token, deadline, verify) if expected else {}
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
