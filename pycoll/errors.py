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
    ``lost`` lists the ranks the coordinator declared dead, when known.
    """

    def __init__(self, message, status=0, peer=None, lost=()):
        super().__init__(message, status, peer)
        self.lost = tuple(lost)


class ProtocolError(CollectiveError):
    """A peer sent a frame that failed validation, or the ranks called
    mismatched collectives (different sizes, dtypes, ops or order)."""


class CollectiveTimeout(CollectiveError, TimeoutError):
    """The call did not complete before its deadline."""


class Cancelled(CollectiveError):
    """The call was cancelled (another thread, or the coordinator aborted
    the membership epoch because a peer failed)."""


class CoordinatorError(CollectiveError):
    """The coordinator could not be reached, vanished, or refused us."""
