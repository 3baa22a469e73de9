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

Same-host peers (equal :func:`host_id`) can use shared memory instead: the
connector dials the acceptor's unix socket in the abstract namespace (bound
to the network namespace, like the TCP port it is named after) and runs the
same handshake; the ack then carries an anonymous shared-memory segment and
two doorbells (a sealed memfd and two eventfds, passed with SCM_RIGHTS). The
unix socket stays open as the connection's liveness signal (see
csrc/transport/transport_shm.c). Nothing is ever named in a filesystem, so nothing can
leak when a process is killed. ``transport``: "auto" uses shared memory for
same-host peers that accept it and TCP otherwise; "shm" requires it for
same-host peers; "tcp" never uses it.
"""
import collections
import errno
import logging
import os
import selectors
import socket
import struct
import threading
import time

from pycoll import auth
from pycoll.core.native import check, ffi, lib
from pycoll.errors import CollectiveError, InvalidArgument, PeerFailure
from pycoll.limits import resolve
from pycoll.options import TRANSPORTS, environ, parse_single_copy, parse_transport  # noqa: F401 - TRANSPORTS: public here too

log = logging.getLogger("pycoll.mesh")

HELLO = struct.Struct("<4sHHIIQ32s8x")  # 64 bytes
HELLO_MAGIC = b"PCHS"
ACK = b"PCOK"
HELLO_VERSION = 2  # 2: challenge-response authentication
HANDSHAKE_TIMEOUT = 5.0  # default of Limits.handshake_timeout
PROBE_EVERY = 0.5  # seconds between probes of the peers that have not connected yet (accept_mesh)
GREETING = HELLO.size + auth.RESPONSE_BYTES  # what the acceptor reads: hello + response
SHM_RING_BYTES = 1 << 20  # per direction and connection; PYCOLL_SHM_RING overrides


def transport_mode(value=None):
    """The transport policy: ``value``, else $PYCOLL_TRANSPORT, else "auto" (checked by
    :func:`pycoll.options.parse_transport`)."""
    if value:
        return parse_transport(value)
    return environ("PYCOLL_TRANSPORT") or "auto"


def shm_ring_bytes():
    """Ring size per direction of a shared-memory connection (a power of two): $PYCOLL_SHM_RING,
    else 1 MiB."""
    return environ("PYCOLL_SHM_RING") or SHM_RING_BYTES


def single_copy_bytes(value=None):
    """Smallest payload sent single-copy to a same-host peer (see
    pc_comm_set_single_copy): ``value`` (checked by :func:`pycoll.options.parse_single_copy`),
    the C default when None; 0 turns single copy off. (The communicator's comes from its
    options: the argument, else $PYCOLL_SINGLE_COPY.)"""
    n = parse_single_copy(value)
    return lib.PC_SINGLE_COPY_DEFAULT if n is None else n


def local_peers(members, rank, mode):
    """Ranks that share this host with ``rank`` (members: [name, addr, host_id,
    group, transport] rows of an epoch) and so use shared memory under
    ``mode``: neither side asked for TCP (every rank decides alike from the
    same rows, so a "tcp" peer gets TCP from everyone)."""
    if mode == "tcp":
        return set()
    mine = members[rank][2] if len(members[rank]) > 2 else ""
    return {p for p, m in enumerate(members)
            if p != rank and mine and len(m) > 2 and m[2] == mine and (len(m) < 5 or m[4] != "tcp")}


def local_name(addr):
    """The abstract unix socket name that goes with a TCP listening address."""
    return f"\0pycoll-mesh/{addr[0]}:{addr[1]}".encode()


def _new_segment():
    """The three fds of a shared-memory connection (segment, two doorbells)."""
    fds = ffi.new("int32_t[3]")
    check(lib.pc_shm_segment_create(shm_ring_bytes(), fds), "creating a shared-memory segment")
    return [int(fd) for fd in fds]


def _close_fds(fds):
    for fd in fds or ():
        if fd >= 0:
            os.close(fd)



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


def reserve_port(bind_host):
    """A TCP port kept for later (bound, not listening: connections to it are refused until its
    owner binds it for real, and nobody else can take it). Returns the bound socket."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((bind_host, 0))
    except OSError:
        s.close()
        raise
    return s


def probe_addrs(addrs, timeout):
    """Liveness of the processes listening at ``addrs`` [(host, port)], told by the kernel: per
    address "alive" (it accepted a TCP connection), "dead" (refused or reset: nothing listens
    there any more, the process is gone) or "unknown" (silent for ``timeout`` s: a cut link or a
    hung host, which is not proof of death). All probes run at once; each connection is closed
    without a byte (a mesh listener drops it, see Listener._read_hello)."""
    out = ["unknown"] * len(addrs)
    sel = selectors.DefaultSelector()
    socks = []
    try:
        for i, (host, port) in enumerate(addrs):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            socks.append(s)
            err = s.connect_ex((host, int(port)))
            if err == 0:
                out[i] = "alive"
            elif err in (errno.EINPROGRESS, errno.EALREADY, errno.EWOULDBLOCK):
                sel.register(s, selectors.EVENT_WRITE, i)
            else:
                out[i] = "dead" if err in (errno.ECONNREFUSED, errno.ECONNRESET) else "unknown"
        deadline = time.monotonic() + timeout
        while sel.get_map():
            # (past the deadline, still one look without waiting: a thread that got no CPU for
            # ``timeout`` s must not call a peer whose kernel already answered "unknown")
            left = max(0.0, deadline - time.monotonic())
            ready = sel.select(left)
            if not ready and left <= 0:
                break
            for key, _ in ready:
                err = key.fileobj.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                out[key.data] = "alive" if err == 0 else \
                    "dead" if err in (errno.ECONNREFUSED, errno.ECONNRESET) else "unknown"
                sel.unregister(key.fileobj)
    finally:
        sel.close()
        for s in socks:
            s.close()
    return out


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
        self.local = None  # unix socket for same-host (shared-memory) peers
        # Meshes of one epoch are built one after another (the group's, then its tag
        # channels'); a fast peer may dial the next while we still accept the first.
        # Its connections wait here, authenticated, for the build they belong to.
        self.park_tokens = set()
        self.parked = {}  # token -> {(peer, stripe): (socket, segment fds or None)}

    def enable_local(self):
        """Accept same-host peers over shared memory too. Returns False (and
        stays TCP only) if the name is taken."""
        if self.local is not None:
            return True
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.bind(local_name(self.addr))
        except OSError as exc:
            log.warning("shared memory disabled: cannot bind %r: %s", local_name(self.addr), exc)
            s.close()
            return False
        s.listen(512)
        s.setblocking(False)
        self.local = s
        return True

    def expect_meshes(self, tokens):
        """Park authenticated connections of these other mesh tokens (see
        ``parked``) while accepting; an empty set drops whatever is parked."""
        self.park_tokens = set(tokens)
        for token in [t for t in self.parked if t not in self.park_tokens]:
            for sock, seg in self.parked.pop(token).values():
                sock.close()
                _close_fds(seg)

    def close(self):
        self.expect_meshes(())
        self.sock.close()
        if self.local is not None:
            self.local.close()


    def accept_mesh(self, rank, expected, epoch, token, deadline, key=None, should_abort=None, segs=None,
                    addrs=None):
        """Accept connections until ``expected`` {(peer, stripe)} all arrived.

        Returns {(peer, stripe): socket}. ``key``: the mesh key
        (``auth.derive(secret, "mesh")``); None means no secret.
        ``should_abort()`` returning True (the epoch was aborted: a peer died
        while connecting) stops the wait with PeerFailure. Peers that came
        over the unix socket got a shared segment: its three fds go into
        ``segs[(peer, stripe)]`` (the caller owns them). ``addrs``: the
        peers' listeners, probed while some have not connected: one whose
        listener refuses is gone and will never connect (PeerFailure now,
        not at the deadline).
        """
        segs = {} if segs is None else segs
        key = key if key is not None else auth.derive(None, "mesh")
        timeout = self.limits.handshake_timeout
        got = {}
        sel = selectors.DefaultSelector()
        sel.register(self.sock, selectors.EVENT_READ, None)
        if self.local is not None:
            sel.register(self.local, selectors.EVENT_READ, None)
        partial = {}  # socket -> (bytes so far, started, challenge); insertion order = age
        for peer_stripe, (sock, seg) in self.parked.pop(token, {}).items():  # they came early
            if peer_stripe in expected:
                got[peer_stripe] = sock
                if seg is not None:
                    segs[peer_stripe] = seg
            else:
                sock.close()
                _close_fds(seg)
        next_probe = time.monotonic() + PROBE_EVERY
        try:
            while len(got) < len(expected):
                if addrs is not None and time.monotonic() >= next_probe:
                    self._fail_if_gone(rank, epoch, addrs, {p for p, _ in set(expected) - set(got)})
                    next_probe = time.monotonic() + PROBE_EVERY
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = sorted(set(expected) - set(got))
                    raise PeerFailure(f"rank {rank}: peers {sorted({p for p, _ in missing})} did not connect "
                                      f"in time for epoch {epoch}", peer=missing[0][0])
                if should_abort is not None and should_abort():
                    raise PeerFailure(f"rank {rank}: epoch {epoch} was aborted while connecting")
                for sk, _ in sel.select(timeout=min(left, 0.2)):
                    if sk.fileobj is self.sock or sk.fileobj is self.local:
                        self._accept_some(sk.fileobj, sel, partial)
                    elif sk.fileobj in partial:  # (it may have been dropped this round)
                        self._read_hello(sk.fileobj, sel, partial, got, rank, expected, epoch, token, key, segs)
                now = time.monotonic()
                for s, (_, started, _) in list(partial.items()):
                    if now - started > timeout:
                        self.refusals.warning("slow", "rank %d dropped a connection that sent no valid hello "
                                              "within %.1f s (handshake_timeout)", rank, timeout)
                        self._drop(s, sel, partial)
        except BaseException:
            for s in got.values():
                s.close()
            for fds in segs.values():
                _close_fds(fds)
            segs.clear()
            raise
        finally:
            for s in partial:
                sel.unregister(s)
                s.close()
            sel.close()
        return got

    @staticmethod
    def _fail_if_gone(rank, epoch, addrs, waiting):
        """PeerFailure if a peer in ``waiting`` (ranks that still owe us a connection) is gone."""
        ranks = sorted(waiting)
        for p, seen in zip(ranks, probe_addrs([tuple(addrs[p]) for p in ranks], 0.2)):
            if seen == "dead":
                raise PeerFailure(f"rank {rank}: rank {p} is gone (its listener at {addrs[p][0]}:{addrs[p][1]} "
                                  f"refuses connections) and will not connect for epoch {epoch}", peer=p)

    @staticmethod
    def _drop(s, sel, partial):
        sel.unregister(s)
        del partial[s]
        s.close()

    def _accept_some(self, lsock, sel, partial):
        for _ in range(64):
            try:
                conn, _ = lsock.accept()
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

    def _read_hello(self, s, sel, partial, got, rank, expected, epoch, token, key, segs):
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
        park = None  # the token of another mesh of this epoch this connection belongs to
        try:
            magic, version, stripe, src, dst, ep, tok = HELLO.unpack(hello)
            other = tok.decode(errors="replace")
            if magic != HELLO_MAGIC:
                why = "not a pycoll peer (bad magic)"
            elif version != HELLO_VERSION:
                why = f"hello version {version}"
            elif ep != epoch or dst != rank:
                why = f"hello for epoch {ep} rank {dst}, this is epoch {epoch} rank {rank}"
            elif tok != token.encode()[:32] and other not in self.park_tokens:
                why = (f"hello for epoch {ep} with another mesh's token (a stale connection, or a peer made "
                       "with other tags=)")
            elif not auth.check_response(key, chal, hello, response):
                why = f"authentication failed for a peer claiming rank {src} (wrong or missing PYCOLL_SECRET?)"
            elif tok != token.encode()[:32]:
                park = other
                if (src, stripe) in self.parked.get(park, {}):
                    why = f"duplicate connection from rank {src} stripe {stripe}"
                elif sum(map(len, self.parked.values())) >= self.limits.max_pending:
                    why = f"more than {self.limits.max_pending} early connections waiting (max_pending)"
            elif (src, stripe) not in expected or (src, stripe) in got:
                why = f"unexpected or duplicate connection from rank {src} stripe {stripe}"
        except struct.error:
            why = "malformed hello"
        if why is not None:
            try:
                addr = "%s:%d" % s.getpeername()[:2] if s.family != socket.AF_UNIX else "this host (unix)"
            except OSError:
                addr = "?"
            self.refusals.warning(why.split(" ")[0], "rank %d rejected a connection from %s: %s", rank, addr, why)
            s.close()
            return
        seg = None
        try:
            s.setblocking(True)
            s.settimeout(self.limits.handshake_timeout)
            reply = ACK + auth.proof(key, chal, hello, response)
            if s.family == socket.AF_UNIX:  # a same-host peer: the shared segment goes with the ack
                seg = _new_segment()
                if socket.send_fds(s, [reply], seg) != len(reply):
                    raise OSError("short ack")
            else:
                s.sendall(reply)
        except (OSError, CollectiveError) as exc:
            log.warning("rank %d: handshake with rank %d failed: %s", rank, src, exc)
            _close_fds(seg)
            s.close()
            return
        if park is not None:
            self.parked.setdefault(park, {})[(src, stripe)] = (s, seg)
            return
        got[(src, stripe)] = s
        if seg is not None:
            segs[(src, stripe)] = seg


def _recv_exact(s, n, what, should_abort=None, limit=HANDSHAKE_TIMEOUT, fds=None):
    """n bytes from s within ``limit`` seconds; with ``should_abort`` the wait
    is cut into short slices so that an aborted epoch stops it. With ``fds``
    (a list), the fds that come with the bytes are appended to it (and
    closed again if this fails)."""
    buf = b""
    end = time.monotonic() + limit
    if should_abort is not None:
        s.settimeout(0.1)
    try:
        while len(buf) < n:
            try:
                if fds is not None:
                    part, got, _, _ = socket.recv_fds(s, n - len(buf), 3)
                    fds.extend(got)
                else:
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
    except BaseException:
        if fds:
            _close_fds(fds)
            fds.clear()
        raise
    return buf


def _handshake(s, rank, peer, addr, hello, key, local, should_abort, limit):
    """Run the connector's side of the hello on a connected socket; over a
    unix socket the ack carries the shared segment: returns its three fds
    (else None)."""
    chal = _recv_exact(s, auth.CHALLENGE_BYTES, "challenge", should_abort, limit)
    response = auth.respond(key, chal, hello)
    s.sendall(hello + response)
    fds = [] if local else None
    reply = _recv_exact(s, len(ACK) + auth.PROOF_BYTES, "ack", should_abort, limit, fds)
    try:
        if reply[:len(ACK)] != ACK:
            raise ConnectionError("bad ack")
        if not auth.check_proof(key, chal, hello, response, reply[len(ACK):]):
            # not retried: the listener at this address is not our peer
            s.close()
            raise PeerFailure(f"rank {rank}: the listener at {addr[0]}:{addr[1]} failed to prove it holds "
                              f"the secret (not rank {peer}?)", peer=peer)
        if local and len(fds) != 3:
            raise ConnectionError("the shared segment did not come with the ack")
    except BaseException:
        _close_fds(fds)
        raise
    return fds


def connect_peer(addr, rank, peer, stripe, epoch, token, deadline, sockbuf=0, key=None,
                 handshake_timeout=HANDSHAKE_TIMEOUT, should_abort=None, local=None):
    """Open one stripe to a lower-ranked peer and complete the authenticated hello.

    ``local``: None for TCP; "auto" or "shm" to try shared memory first (the
    peer shares our host), falling back to TCP under "auto" when the peer
    does not accept it. Returns (socket, the segment's three fds or None).
    """
    key = key if key is not None else auth.derive(None, "mesh")
    hello = HELLO.pack(HELLO_MAGIC, HELLO_VERSION, stripe, rank, peer, epoch, token.encode()[:32])
    last = None
    shm = local is not None
    refused = 0
    while time.monotonic() < deadline:
        if should_abort is not None and should_abort():
            raise PeerFailure(f"rank {rank}: epoch {epoch} was aborted while connecting to rank {peer}", peer=peer)
        if shm:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        else:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            _tune(s, sockbuf)
        s.settimeout(max(0.05, min(handshake_timeout, deadline - time.monotonic())))
        try:
            try:
                s.connect(local_name(addr) if shm else tuple(addr))
            except (ConnectionRefusedError, FileNotFoundError) as exc:
                if not shm:
                    raise
                s.close()
                if local == "shm":
                    raise PeerFailure(f"rank {rank}: rank {peer} does not accept shared-memory connections "
                                      f"(transport=shm here; is it running with transport=tcp?): {exc}",
                                      peer=peer) from None
                shm = False  # nobody there: the peer runs TCP only
                continue
            limit = max(0.05, min(handshake_timeout, deadline - time.monotonic()))
            seg = _handshake(s, rank, peer, addr, hello, key, shm, should_abort, limit)
            s.settimeout(None)
            return s, seg
        except OSError as exc:
            last = exc
            s.close()
            # Every peer listens from its join to its close: a refusal is the kernel answering
            # for a process that is gone (or closed). Three in a row (~40 ms apart) settle it,
            # instead of retrying until the mesh timeout.
            refused = refused + 1 if isinstance(exc, ConnectionRefusedError) else 0
            if refused >= 3:
                raise PeerFailure(f"rank {rank}: rank {peer} at {addr[0]}:{addr[1]} refuses connections for epoch "
                                  f"{epoch} (its process is gone)", peer=peer) from None
            time.sleep(0.02)
    raise PeerFailure(f"rank {rank}: cannot connect to rank {peer} at {addr[0]}:{addr[1]} for epoch {epoch}: {last}",
                      peer=peer)


class MeshLinks(collections.namedtuple("MeshLinks", "kinds fds shm_fds")):
    """Connections of one epoch for pc_comm_create_mixed: kinds and fds have
    n*stripes entries (self: PC_CONN_TCP, -1), shm_fds three per connection
    (-1 for TCP)."""

    def channel(self, i, k, stripes):
        """Channel i of a mesh built with k channels of ``stripes`` connections
        per pair (peer p's connection j of channel i is p*k*stripes + i*stripes + j).
        Takes those fds: each belongs to exactly one channel."""
        idx = [p * k * stripes + i * stripes + j for p in range(len(self.fds) // (k * stripes)) for j in range(stripes)]
        return MeshLinks([self.kinds[x] for x in idx], [self.fds[x] for x in idx],
                         [f for x in idx for f in self.shm_fds[3 * x:3 * x + 3]])

    def dup_prefix(self, n):
        """Duplicates of the first n connections' fds (for a second comm)."""
        fds = [os.dup(fd) if fd >= 0 else -1 for fd in self.fds[:n]]
        return MeshLinks(list(self.kinds[:n]), fds, [os.dup(fd) if fd >= 0 else -1 for fd in self.shm_fds[:3 * n]])


KIND_TCP, KIND_SHM, KIND_TLS = lib.PC_CONN_TCP, lib.PC_CONN_SHM, lib.PC_CONN_TLS


def data_plane_key(mesh_key):
    """The TLS key of the data plane's TCP connections when PYCOLL_ENCRYPT is on (derived from
    the mesh key, so from the group secret), else None."""
    if not environ("PYCOLL_ENCRYPT"):
        return None
    if mesh_key is None:
        raise InvalidArgument("PYCOLL_ENCRYPT=1 needs a shared secret (PYCOLL_SECRET or token=): the data "
                              "plane's key comes from it")
    return auth.derive(mesh_key, "data-plane-tls")


def build_mesh(listener, rank, addrs, stripes, epoch, token, timeout, sockbuf=0, key=None, should_abort=None):
    """Connect to every peer over TCP; returns a list of n*stripes fds (-1 for self).

    ``key``: the mesh key (``auth.derive(secret, "mesh")``, None without a
    secret). The caller owns the returned fds (they are detached from Python
    sockets).
    """
    return connect_mesh(listener, rank, addrs, stripes, epoch, token, timeout, sockbuf, key, should_abort).fds


def connect_mesh(listener, rank, addrs, stripes, epoch, token, timeout, sockbuf=0, key=None, should_abort=None,
                 local=(), mode="auto", encrypt=False):
    """Connect to every peer: shared memory to the ranks in ``local`` (under
    ``mode``, see the module docstring), TCP to the rest. Returns
    :class:`MeshLinks`; the caller owns every fd in it. ``encrypt``: the TCP
    connections are of kind TLS (the C core runs their TLS 1.3 handshakes,
    keyed from the group secret, when the comm is created); shared memory
    never leaves the host and stays as it is.
    """
    n = len(addrs)
    deadline = time.monotonic() + timeout
    expected = {(p, s) for p in range(rank + 1, n) for s in range(stripes)}
    outgoing = {}
    errors = []
    stop = threading.Event()  # one side failed: the other stops too (the mesh cannot be built)

    def abort():
        return stop.is_set() or bool(errors) or (should_abort is not None and should_abort())

    def dial():
        try:
            for p in range(rank):
                for s in range(stripes):
                    outgoing[(p, s)] = connect_peer(addrs[p], rank, p, s, epoch, token, deadline, sockbuf,
                                                    key, listener.limits.handshake_timeout, abort,
                                                    mode if p in local else None)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def close_outgoing():
        for sock, seg in outgoing.values():
            sock.close()
            _close_fds(seg)

    dialer = threading.Thread(target=dial, name="pycoll-dial", daemon=True)
    dialer.start()
    segs = {}
    try:
        incoming = (listener.accept_mesh(rank, expected, epoch, token, deadline, key, abort, segs, addrs)
                    if expected else {})
    except BaseException:
        dial_failed = bool(errors)  # (then the accepting stopped for it: the dialer's error says why)
        stop.set()
        dialer.join(timeout=max(0.0, deadline - time.monotonic()) + 1)
        close_outgoing()
        if dial_failed:
            raise errors[0] from None
        raise
    dialer.join(timeout=max(0.0, deadline - time.monotonic()) + 1)
    if errors or dialer.is_alive():
        close_outgoing()
        for sock in incoming.values():
            sock.close()
        for fds in segs.values():
            _close_fds(fds)
        if errors:
            raise errors[0]
        raise PeerFailure(f"rank {rank}: connecting to peers timed out for epoch {epoch}")
    links = MeshLinks([KIND_TCP] * (n * stripes), [-1] * (n * stripes), [-1] * (3 * n * stripes))
    conns = {key_: (sock, segs.get(key_)) for key_, sock in incoming.items()}
    conns.update(outgoing)
    for (p, s), (sock, seg) in conns.items():
        i = p * stripes + s
        links.fds[i] = sock.detach()
        if seg is not None:
            links.shm_fds[3 * i:3 * i + 3] = seg
            links.kinds[i] = KIND_SHM
        elif encrypt:
            links.kinds[i] = KIND_TLS
    return links
