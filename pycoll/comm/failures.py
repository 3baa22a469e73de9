"""Which exception a failed collective raises: :func:`failure_error`, the one place that decides.

A failure of an epoch is seen differently on each rank (one saw a mismatched frame, another only
the connection it closed), but every rank must raise the same kind for the same call. The rank
that fails reports to the coordinator, which names the cause (a lost member, a mismatch, a
timeout) and whether running again over the survivors is what everyone does (``retry``). The
exception follows that word. Three situations reach here:

``FAILED``
    this rank's call ran and failed in the engine (:meth:`pycoll.comm.epoch.Epoch.failure`);
``NOT_RUN``
    the epoch failed before this rank's call, which therefore did not run (the late-call rule,
    see docs/fault-model.md);
``ABORTED``
    an agreed call or shared-state round (``retry=``/``verify=``, :mod:`pycoll.comm.agreement`)
    got the coordinator's *abort* decision.
"""
from pycoll.core import engine
from pycoll.core.native import lib
from pycoll.errors import Cancelled, PeerFailure

__all__ = ["FAILED", "NOT_RUN", "ABORTED", "CAUSE_STATUSES", "failure_error"]

FAILED = "failed"
NOT_RUN = "not run"
ABORTED = "aborted"

#: Failures every rank must raise as what they are, wherever they were detected.
CAUSE_STATUSES = (lib.PC_ERR_PROTO, lib.PC_ERR_TIMEOUT)
#: Connection-level statuses: the echo, on this rank, of a failure elsewhere.
_LINK_STATUSES = (lib.PC_ERR_CANCELLED, lib.PC_ERR_PEER, lib.PC_ERR_IO)


def failure_error(situation, info, *, rank, epoch, what="", status=None, peer=-1, message="", aborted=False,
                  why="", lost=(), members=()):
    """The exception for a collective that failed in ``situation`` (see the module doc).

    ``info``: the coordinator's word on the failure (``lost`` names, ``lost_ranks``, ``status``:
    the cause's C status, ``why``, ``retry``, ``timed_out``; {} when it could not be reached).
    ``rank``/``epoch``: where it happened; ``what``: the call, as messages name it.
    ``status``/``peer``/``message``: this rank's own C status, failed peer (-1: none) and detail
    (FAILED: the engine's last error; ABORTED: None when this rank's part ran or did not run).
    ``aborted``: the epoch is known to be aborted here (FAILED). ``why``/``lost``: what the
    coordinator's abort push said, used where ``info`` is silent (FAILED, NOT_RUN).
    ``members``: the current epoch's names, to give ``lost`` names their ranks (NOT_RUN).

    The rules:

    1. A mismatch or a timeout elsewhere, and no member lost (the cause is in
       :data:`CAUSE_STATUSES`): every rank raises the cause's kind, ProtocolError or
       CollectiveTimeout (FAILED, NOT_RUN; an abort decision does not carry the cause).
    2. A member lost, or this rank saw only the echo of the failure (a connection-level status
       in an epoch known to be aborted; for ABORTED also no status of its own, or ``retry``):
       :class:`PeerFailure`, naming the lost ranks and names, retryable on the coordinator's
       word (NOT_RUN: when it said nothing, retryable when a member was lost).
    3. Otherwise this rank's own status decides the kind (ABORTED: a round that was not decided
       in time is a CollectiveTimeout).
    """
    if situation == ABORTED:
        lost_names = list(info.get("lost") or [])
        lost_ranks = list(info.get("lost_ranks") or [])
        text = f"rank {rank} {what} (epoch {epoch}) did not complete: {info.get('why', 'aborted')}"
        if message:
            text += f" [here: {message}]"
        retry = bool(info.get("retry"))
        if retry or lost_names or status in (None,) + _LINK_STATUSES:  # rule 2
            first = lost_ranks[0] if lost_ranks else (peer if peer >= 0 else None)
            return PeerFailure(text, status or lib.PC_ERR_PEER, first, lost=lost_ranks, lost_names=lost_names,
                               retryable=retry)
        if info.get("timed_out"):  # rule 3
            return engine.error(None, lib.PC_ERR_TIMEOUT, None, message=text)
        return engine.error(None, status, None, peer if peer >= 0 else None, text)

    if situation == NOT_RUN:
        lost_names = info.get("lost") or list(lost)
        why = info.get("why") or why
        cause = info.get("status")
        if not lost_names and cause in CAUSE_STATUSES:  # rule 1: the call we missed failed by mismatch or timeout
            return engine.error(None, cause, None, message=f"rank {rank}: epoch {epoch} was aborted ({why}); this "
                                "call did not run; the next call re-forms the group")
        return PeerFailure(f"rank {rank}: epoch {epoch} was aborted ({why}); this call did not run; the next "  # rule 2
                           "call runs on the survivors",
                           lost=[members.index(n) for n in lost_names if n in members],
                           lost_names=lost_names, retryable=bool(info.get("retry", lost_names)))

    if situation != FAILED:
        raise ValueError(f"unknown failure situation {situation!r}")
    lost_names = info.get("lost") or []
    cause = info.get("status")
    st = status
    if not lost_names and cause in CAUSE_STATUSES and st != cause:  # rule 1
        # Mismatched calls or a timeout elsewhere; we saw its echo (an aborted or
        # closed connection): every rank raises the cause's kind in this same call.
        message = f"{message}; coordinator: {info.get('why') or why}"
        st = cause
    elif lost_names or (aborted and st in _LINK_STATUSES):  # rule 2
        message = f"{message}; coordinator: {info.get('why') or why}"
        st = lib.PC_ERR_PEER
    exc = engine.error(None, st, f"rank {rank} {what} (epoch {epoch})", peer, message)  # rule 3 (and 1, 2: the kind)
    if isinstance(exc, Cancelled) and aborted:
        exc = PeerFailure(str(exc), st, peer)
    if isinstance(exc, PeerFailure) and lost_names:
        exc.lost, exc.lost_names = tuple(info.get("lost_ranks", ())), tuple(lost_names)
        exc.peer = exc.lost[0] if exc.lost else peer
    if isinstance(exc, PeerFailure):
        exc.retryable = bool(info.get("retry"))  # the coordinator's final word
    return exc
