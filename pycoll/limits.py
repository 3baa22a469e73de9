"""Resource limits that keep hostile or broken peers from exhausting a process.

Every limit has a safe default and an environment variable; a
:class:`Limits` object can also be passed explicitly (``pycoll.init(...,
limits=Limits(max_peers=64))``, ``Coordinator(..., limits=...)``).

=====================  ==========================  =======  ==============================================
field                  environment variable        default  what it bounds
=====================  ==========================  =======  ==============================================
max_message_bytes      PYCOLL_MAX_MESSAGE_BYTES    1 MiB    one coordinator message, either direction;
                                                            larger ones are dropped by the socket
max_peers              PYCOLL_MAX_PEERS            1024     live members (joined, admitted or waiting)
connect_timeout        PYCOLL_CONNECT_TIMEOUT      30 s     building the peer mesh of one epoch
handshake_timeout      PYCOLL_HANDSHAKE_TIMEOUT    5 s      one connection's hello and authentication,
                                                            and the coordinator's ZMTP greeting
max_pending            PYCOLL_MAX_PENDING          128      half-open handshakes a listener holds; past
                                                            it the oldest is dropped
replay_window          PYCOLL_REPLAY_WINDOW        300 s    how old (or far in the future) a signed
                                                            coordinator message may be
=====================  ==========================  =======  ==============================================

The data plane has no size limit to configure: the C engine sizes and
places every received byte from its own plan (the caller's buffer), never
from a length read off the wire.
"""
import dataclasses
import os

from pycoll.errors import InvalidArgument

#: field -> the environment variable that sets it
ENVIRONMENT = {
    "max_message_bytes": "PYCOLL_MAX_MESSAGE_BYTES",
    "max_peers": "PYCOLL_MAX_PEERS",
    "connect_timeout": "PYCOLL_CONNECT_TIMEOUT",
    "handshake_timeout": "PYCOLL_HANDSHAKE_TIMEOUT",
    "max_pending": "PYCOLL_MAX_PENDING",
    "replay_window": "PYCOLL_REPLAY_WINDOW",
}


@dataclasses.dataclass(frozen=True)
class Limits:
    """Bounds on what a peer or the coordinator accepts (see the module doc)."""

    max_message_bytes: int = 1 << 20
    max_peers: int = 1024
    connect_timeout: float = 30.0
    handshake_timeout: float = 5.0
    max_pending: int = 128
    replay_window: float = 300.0

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                raise InvalidArgument(f"limit {f.name} must be a positive number, got {v!r}")
        if self.max_message_bytes < 4096:
            raise InvalidArgument("limit max_message_bytes must be at least 4096")

    @classmethod
    def from_env(cls, **overrides):
        """Defaults, overridden by the environment, overridden by ``overrides``."""
        values = {}
        for f in dataclasses.fields(cls):
            raw = os.environ.get(ENVIRONMENT[f.name])
            if raw is not None:
                try:
                    values[f.name] = type(f.default)(raw)
                except ValueError:
                    raise InvalidArgument(f"environment variable {ENVIRONMENT[f.name]}={raw!r} is not a number") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def resolve(limits):
    """``limits`` if given, else the defaults adjusted by the environment."""
    return limits if limits is not None else Limits.from_env()
