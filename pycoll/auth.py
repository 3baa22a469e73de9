"""Authentication with a shared secret (HMAC-SHA256).

The secret comes from the ``token=`` argument, else ``PYCOLL_SECRET``, else
the contents of the file named by ``PYCOLL_SECRET_FILE``. Every party derives
one key per purpose from it, so a key seen in one place is useless in another.
Without a secret the same protocols run with a publicly known key: nothing is
authenticated then, which is fine on loopback and is logged loudly anywhere
else (:func:`warn_if_exposed`).

Two mechanisms:

* **Coordinator messages** (:class:`Sealer`, :class:`Opener`). Every message,
  in both directions, is wrapped as ``PCA1 | session(8) | counter(8) |
  time(8) | mac(32) | payload``; the MAC covers everything before it and the
  payload, under a key per direction (a peer's message cannot be reflected
  back to it as the coordinator's). The receiver checks the MAC in constant
  time before it parses anything, then refuses a message older or newer than
  the replay window and any message whose counter is not above the last one
  seen from that session: a recorded message cannot be replayed.
* **Peer connections** (the data mesh, and any other TCP service such as an
  aggregator): a challenge-response. The acceptor sends 32 random bytes; the
  connector answers with its own 32 random bytes and
  ``HMAC(key, "connect" | challenge | nonce | context)``; the acceptor checks
  it and proves itself with ``HMAC(key, "accept" | ...)``. ``context`` binds
  the exchange to what the connector claims (the mesh hello: epoch, ranks,
  stripe, the epoch's token).

Nothing here encrypts: the secret gates who may take part, it does not hide
tensors in transit (use a private network or a VPN for that).
"""
import hashlib
import hmac
import ipaddress
import logging
import os
import socket
import struct
import time

from pycoll.errors import InvalidArgument

log = logging.getLogger("pycoll.auth")

ENVELOPE_MAGIC = b"PCA1"
REFUSED = b"PCAR"  # unsigned notice sent back to a pycoll peer whose message failed authentication
_ENV_HDR = struct.Struct("<4s8sQd")  # magic, session, counter, unix time
MAC_BYTES = 32
ENVELOPE_OVERHEAD = _ENV_HDR.size + MAC_BYTES
CHALLENGE_BYTES = 32
RESPONSE_BYTES = 64   # nonce + mac
PROOF_BYTES = 32


class AuthError(Exception):
    """A message or connection failed authentication; ``str()`` says why."""


# ---- the secret and derived keys ------------------------------------------
def load_secret(token=None):
    """The shared secret as bytes, or None when none is configured."""
    if token is None:
        token = os.environ.get("PYCOLL_SECRET")
    if token is None and os.environ.get("PYCOLL_SECRET_FILE"):
        path = os.environ["PYCOLL_SECRET_FILE"]
        try:
            with open(path, "rb") as f:
                token = f.read().strip()
        except OSError as exc:
            raise InvalidArgument(f"PYCOLL_SECRET_FILE={path!r} cannot be read: {exc}") from None
    if token is None:
        return None
    if isinstance(token, str):
        token = token.encode()
    if not isinstance(token, (bytes, bytearray)):
        raise InvalidArgument(f"the secret must be str or bytes, got {type(token).__name__}")
    return bytes(token) or None


def derive(secret, purpose):
    """The key for one purpose ("to-coordinator", "mesh", ...)."""
    return hmac.new(secret or b"", b"pycoll/1 " + purpose.encode(), hashlib.sha256).digest()


def subkey(key, purpose):
    """A key for one purpose derived from another key (e.g. the data plane's TLS key from the
    mesh key)."""
    return hmac.new(key, b"pycoll/1 " + purpose.encode(), hashlib.sha256).digest()


def _mac(key, *parts):
    h = hmac.new(key, digestmod=hashlib.sha256)
    for p in parts:
        h.update(p)
    return h.digest()


# ---- coordinator messages ---------------------------------------------------
class Sealer:
    """Signs outgoing messages of one sender (one session, rising counter)."""

    def __init__(self, key):
        self.key = key
        self.session = os.urandom(8)
        self.counter = 0

    def seal(self, payload, now=None):
        """The signed message; ``now`` (unix time) only for tests."""
        self.counter += 1
        head = _ENV_HDR.pack(ENVELOPE_MAGIC, self.session, self.counter, time.time() if now is None else now)
        return head + _mac(self.key, head, payload) + payload


class Opener:
    """Checks incoming messages: MAC, age, and no replay per session.

    Keeps the last counter of each session it accepted for ``window`` s;
    entries older than that are forgotten (their messages are refused as
    too old anyway), so only authentic senders can grow the table.
    """

    def __init__(self, key, window=300.0, max_sessions=4096):
        self.key = key
        self.window = window
        self.max_sessions = max_sessions
        self._last = {}  # session -> (counter, monotonic time seen)

    def open(self, data):
        """The payload of an authentic, fresh message; raises AuthError."""
        if len(data) < ENVELOPE_OVERHEAD:
            raise AuthError(f"message too short ({len(data)} bytes) to be signed")
        head = bytes(data[:_ENV_HDR.size])
        magic, session, counter, stamp = _ENV_HDR.unpack(head)
        if magic != ENVELOPE_MAGIC:
            raise AuthError("not a pycoll message (bad magic)")
        mac = bytes(data[_ENV_HDR.size:ENVELOPE_OVERHEAD])
        payload = bytes(data[ENVELOPE_OVERHEAD:])
        if not hmac.compare_digest(mac, _mac(self.key, head, payload)):
            raise AuthError("bad signature (wrong or missing PYCOLL_SECRET?)")
        if not abs(time.time() - stamp) <= self.window:  # also refuses NaN
            raise AuthError(f"message signed {time.time() - stamp:.0f} s ago, outside the replay window "
                            f"of {self.window:.0f} s (replayed, or clocks differ?)")
        now = time.monotonic()
        last = self._last.get(session)
        if last is not None and counter <= last[0]:
            raise AuthError(f"replayed message (counter {counter}, already saw {last[0]})")
        self._last[session] = (counter, now)
        if len(self._last) > self.max_sessions:
            self._prune(now)
        return payload

    def _prune(self, now):
        for s in [s for s, (_, seen) in self._last.items() if now - seen > self.window]:
            del self._last[s]
        if len(self._last) > self.max_sessions:  # many live senders: forget the quietest half
            for s, _ in sorted(self._last.items(), key=lambda kv: kv[1][1])[:len(self._last) // 2]:
                del self._last[s]


# ---- challenge-response for peer connections --------------------------------
def challenge():
    """The acceptor's random challenge."""
    return os.urandom(CHALLENGE_BYTES)


def respond(key, chal, context):
    """The connector's answer: its nonce and a MAC over both nonces and ``context``."""
    nonce = os.urandom(32)
    return nonce + _mac(key, b"connect", chal, nonce, context)


def check_response(key, chal, context, response):
    """True if ``response`` proves the connector holds ``key``."""
    if len(response) != RESPONSE_BYTES:
        return False
    nonce, mac = response[:32], response[32:]
    return hmac.compare_digest(mac, _mac(key, b"connect", chal, nonce, context))


def proof(key, chal, context, response):
    """The acceptor's proof that it holds ``key`` too."""
    return _mac(key, b"accept", chal, response[:32], context)


def check_proof(key, chal, context, response, got):
    return len(got) == PROOF_BYTES and hmac.compare_digest(got, proof(key, chal, context, response))


def _recv_exact(sock, n):
    buf = b""
    while len(buf) < n:
        part = sock.recv(n - len(buf))
        if not part:
            raise ConnectionError("connection closed during authentication")
        buf += part
    return buf


def server_handshake(sock, key, timeout, context=b""):
    """Authenticate a freshly accepted blocking socket (for services such as
    aggregators). Raises AuthError or OSError; the caller closes on failure."""
    sock.settimeout(timeout)
    chal = challenge()
    sock.sendall(chal)
    resp = _recv_exact(sock, RESPONSE_BYTES)
    if not check_response(key, chal, context, resp):
        raise AuthError("peer failed the challenge (wrong or missing PYCOLL_SECRET?)")
    sock.sendall(proof(key, chal, context, resp))


def client_handshake(sock, key, timeout, context=b""):
    """The connector's side of :func:`server_handshake`; also checks the server."""
    sock.settimeout(timeout)
    chal = _recv_exact(sock, CHALLENGE_BYTES)
    resp = respond(key, chal, context)
    sock.sendall(resp)
    if not check_proof(key, chal, context, resp, _recv_exact(sock, PROOF_BYTES)):
        raise AuthError("server failed to prove it holds the secret")


# ---- exposure warning and quiet logging ---------------------------------------
def is_loopback(host):
    """True for 127.0.0.0/8, ::1 and localhost."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
        except (OSError, ValueError):
            return False


def warn_if_exposed(host, secret, what):
    """Log a loud warning when ``what`` listens beyond loopback without a secret.
    Returns True if it warned."""
    if secret or is_loopback(host):
        return False
    log.warning("!!! SECURITY: %s listens on %s without a shared secret: anyone who can reach this address "
                "can join the group, read its membership and disturb it. Set PYCOLL_SECRET (the same on "
                "every peer) or bind to 127.0.0.1. !!!", what, host or "all interfaces")
    return True


class QuietLog:
    """Logs refusals at most once per ``interval`` s per reason, counting the
    rest, so a flood of hostile input cannot flood the log."""

    def __init__(self, logger, interval=1.0):
        self.logger = logger
        self.interval = interval
        self._last = {}  # reason -> (time logged, suppressed since)
        self.count = 0

    def warning(self, reason, fmt, *args):
        self.count += 1
        now = time.monotonic()
        logged, suppressed = self._last.get(reason, (-1e9, 0))
        if now - logged < self.interval:
            self._last[reason] = (logged, suppressed + 1)
            return
        if len(self._last) > 1024:
            self._last.clear()
        self._last[reason] = (now, 0)
        if suppressed:
            fmt += " (%d similar refusals not logged)"
            args += (suppressed,)
        self.logger.warning(fmt, *args)
