"""Exceptions raised by pycoll.

Everything pycoll raises for a failed collective is a :class:`CollectiveError`.
Recoverable faults (a peer lost, a timeout, a cancelled call) are separated
from usage errors so that retry logic can catch exactly what it may retry.
"""


class CollectiveError(RuntimeError):
    """A collective or membership operation failed.

    ``status`` is the C core's status code (0 when raised from Python),
    ``peer`` the rank that caused it when known (else ``None``).
    """

    def __init__(self, message, status=0, peer=None):
        super().__init__(message)
        self.status = status
        self.peer = peer


class InvalidArgument(CollectiveError, ValueError):
    """The call itself is wrong: dtype, shape, op, buffer layout, root."""


class PeerFailure(CollectiveError):
    """A peer died, left, or broke the connection during the call.

    The communicator re-forms over the survivors before the next call.
    ``lost`` lists the ranks (in the failed epoch) the coordinator declared
    dead, when known, and ``lost_names`` the same peers by name (names stay
    the same when ranks are reassigned). ``retryable`` is True when the
    group failed because a member was lost (the coordinator's final cause),
    so running it again over the survivors is what every survivor does.
    """

    def __init__(self, message, status=0, peer=None, lost=(), lost_names=(), retryable=False):
        super().__init__(message, status, peer)
        self.lost = tuple(lost)
        self.lost_names = tuple(lost_names)
        self.retryable = retryable


class ProtocolError(CollectiveError):
    """A peer sent a frame that failed validation, or the ranks called
    mismatched collectives (different sizes, dtypes, ops or order)."""


class CollectiveTimeout(CollectiveError, TimeoutError):
    """The call did not complete before its deadline."""


class Cancelled(CollectiveError):
    """The call was cancelled (another thread, or the coordinator aborted
    the membership epoch because a peer failed)."""


class CoordinatorError(CollectiveError):
    """The coordinator could not be reached, vanished, or refused us.

    ``evicted`` is True when the coordinator no longer counts this peer as a
    member (it was declared dead, e.g. after a long stall); such a peer must
    join again with ``pycoll.connect()``.
    """

    def __init__(self, message, status=0, peer=None, evicted=False):
        super().__init__(message, status, peer)
        self.evicted = evicted


class ParityError(CollectiveError):
    """Peers that should hold identical bytes do not (``verify=True`` found
    different result digests). ``differ`` lists the ranks outside the
    majority. A collective that raises it left the caller's buffer as it was.
    """

    def __init__(self, message, status=0, peer=None, differ=()):
        super().__init__(message, status, peer)
        self.differ = tuple(differ)
