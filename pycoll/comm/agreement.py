"""Collectives the whole group agrees on: ``retry=True`` and ``verify=True``.

A plain collective is best effort per rank: when a peer dies near the end,
a rank whose part already finished returns success while another raises.
An *agreed* collective removes that ambiguity:

1. every rank runs the plan's *body* (all transfers); results stay in the
   engine's scratch and the caller's buffer is untouched;
2. it reports ``done`` (with a digest of the result for ``verify=True``) or
   ``failed`` to the coordinator as round #seq of the epoch: one small
   round trip, the only extra cost of the fast path;
3. the coordinator answers *commit* once every member reported done, or
   *abort* if the epoch was aborted first (a death, a failure anywhere);
4. on commit each rank runs the plan's *tail* (copies out of scratch); on
   abort nothing was written, so the call raises with the input intact, or,
   with ``retry=True`` and a lost member as the cause, every survivor
   re-forms the group and runs the collective again over the survivors.

So every participant agrees whether collective #k happened and over whom
(``comm.last_outcome.contributors``). A member that dies *after* reporting
done still contributed: its data is in every survivor's result.

Everything here works on the communicator's :class:`pycoll.comm.epoch.Epoch`
(``ep``): its members, sequence number, failure state and coordinator client.
"""
import collections
import logging
import time

import numpy as np

from pycoll.comm.failures import ABORTED, failure_error
from pycoll.core import engine
from pycoll import faults
from pycoll.core.native import ffi, lib
from pycoll.errors import CollectiveError, CoordinatorError, InvalidArgument, ParityError, PeerFailure
from pycoll.faults import fault_point
from pycoll.core.hashing import hash_address
from pycoll.observability import Stat

log = logging.getLogger("pycoll")

#: extra seconds a rank waits for the decision beyond the collective timeout
DECISION_MARGIN = 10.0


class Outcome(collections.namedtuple("Outcome", "contributors world_size epoch seq attempts lost digest")):
    """How the last ``retry=``/``verify=`` collective ended: the names of the
    peers whose data is in the result (``contributors``, rank order of the
    epoch it committed in), how many attempts it took, and the names of the
    peers lost along the way."""


def begin(ep):
    """Prepare an agreed operation. Returns True when the current epoch is
    already known to be aborted: the caller reports failure without running,
    so it gets the same decision as the members that were inside."""
    if ep.closed:
        raise CollectiveError("communicator is closed")
    if ep.aborted() and not ep.broken and ep.ccomm is not None:
        return True
    if ep.broken or ep.ccomm is None or ep.client.needs_rejoin:
        ep.sync(rebuild=True)
    return False


def report(ep, kind, seq, timeout, **fields):
    """Round #seq of the epoch: send our report, wait for the decision."""
    msg = {"t": "round", "kind": kind, "epoch": ep.number, "seq": seq, **fields}
    if not fields.get("ok", True):  # a link failed? say which members we cannot reach (Epoch.unreachable)
        unreachable = ep.unreachable(fields.get("status"))
        if unreachable:
            msg["unreachable"] = unreachable
    try:
        # (the client keeps the decision: told to a successor, see Epoch._failover)
        return ep.client.request(msg, timeout=timeout + DECISION_MARGIN)
    except CoordinatorError as exc:
        if not getattr(exc, "timed_out", False):
            # The coordinator was lost while we waited: it may have decided the round and
            # told only some members, which went on to the next call. Its successor knows
            # from them (pycoll.comm.failover), whatever the round's kind.
            decided = ep.decided_elsewhere(seq, kind)
            if decided is not None:
                return decided
            raise
    # No decision in time (a member is stuck without being dead): withdraw,
    # unless the round was decided meanwhile.
    info = ep.report_failure(ep.number, f"no decision on #{seq} within {timeout + DECISION_MARGIN:.0f} s",
                             lib.PC_ERR_TIMEOUT, withdraw=True)
    if "decided" in info:
        return info["decided"]
    return {"decision": "abort", "timed_out": True, **info}


def abort_error(ep, what, reply, status=None, local="", failed_peer=-1):
    """The exception for an abort decision (the same kind on every rank; see pycoll.comm.failures)."""
    return failure_error(ABORTED, reply, rank=ep.rank, epoch=ep.number, what=what, status=status, peer=failed_peer,
                         message=local)


class Agreement:
    """One attempt of an agreed collective (see the module docstring)."""

    def __init__(self, verify=False, root_name=None):
        self.verify = verify
        self.root_name = root_name
        self.skip = False

    def root(self, ep):
        """The broadcast root's rank in the current epoch (it may have moved)."""
        if self.root_name not in ep.members:
            raise PeerFailure(f"rank {ep.rank}: the broadcast root {self.root_name} was lost; nothing to retry",
                              lost_names=(self.root_name,))
        return ep.members.index(self.root_name)

    def run(self, ep, coll, algorithm, plan, bufs, sizes, inbuf, outbuf, opc, desc, timeout, ccomm=None,
            announce=None):
        """``ccomm``: the C communicator the plan runs on (the switch mesh for
        innetwork with standalone aggregators); ``announce()``: sends the
        aggregators their descriptor first, returns (status, failed peer)."""
        seq = ep.seq
        ccomm = ccomm if ccomm is not None else ep.ccomm
        nbytes = max(inbuf.nbytes, outbuf.nbytes)
        t0 = time.perf_counter()
        if self.skip:
            why = f"epoch {ep.number} was aborted before this call ({ep.abort_reason})"
            ep.mark_broken()
            reply = report(ep, "collective", seq, timeout, ok=False, why=why, status=lib.PC_ERR_CANCELLED)
            raise abort_error(ep, f"{coll} #{seq}", reply, None, "this call did not run")
        failed = ffi.new("int32_t *")
        st = lib.PC_OK
        if announce is not None:
            st, failed[0] = announce()
        if st == lib.PC_OK:
            st = engine.run_body(ccomm, plan.ptr, bufs, sizes, inbuf.code, opc, seq, desc, timeout, failed)
        if st != lib.PC_OK:
            message = engine.last_error(ccomm)
            ep.mark_broken()
            reply = report(ep, "collective", seq, timeout, ok=False, why=message, status=int(st))
            ep.stats.append(_stat(ep, coll, algorithm, nbytes, t0, False))
            if st == lib.PC_ERR_ARG:
                raise engine.error(None, st, coll, message=message)
            raise abort_error(ep, f"{coll} #{seq}", reply, st, message, int(failed[0]))
        if faults.FAULTS_ARMED:  # test hook: die between the body and the report
            fault_point(f"agreed:{coll}")
        digest = self._digest(ccomm, plan, bufs, sizes, inbuf, outbuf, opc, desc, seq) if self.verify else None
        fields = {"ok": True}
        if digest is not None:
            fields["digest"] = digest
        reply = report(ep, "collective", seq, timeout, **fields)
        decision = reply.get("decision")
        if faults.FAULTS_ARMED:  # test hook: die after the decision, before copying out
            fault_point(f"decided:{coll}")
        if decision == "commit":
            st = engine.run_tail(ccomm, plan.ptr, bufs, sizes, inbuf.code, opc, seq, desc, timeout, failed)
            if st != lib.PC_OK:  # only a malformed plan gets here
                raise engine.error(ccomm, st, f"{coll} #{seq}")
            ep.last_outcome = Outcome(tuple(reply.get("members", ep.members)), ep.world_size, ep.number, seq,
                                      1, (), digest)
            ep.stats.append(_stat(ep, coll, algorithm, nbytes, t0, True))
            return algorithm
        ep.stats.append(_stat(ep, coll, algorithm, nbytes, t0, False))
        if decision == "parity":
            differ = list(reply.get("differ", []))
            raise ParityError(f"rank {ep.rank} {coll} #{seq} (epoch {ep.number}): result digests differ on "
                              f"ranks {differ} (digests by rank: {[f'{d:016x}' for d in reply['digests']]}); "
                              "the buffer was left as it was", differ=differ)
        ep.mark_broken()
        raise abort_error(ep, f"{coll} #{seq}", reply)

    @staticmethod
    def _digest(ccomm, plan, bufs, sizes, inbuf, outbuf, opc, desc, seq):
        """Digest of what OUT will hold after the tail, computed before it."""
        if plan.tail_first >= plan.nops:
            return hash_address(outbuf.address, outbuf.nbytes)  # OUT already holds the result
        tmp = np.empty(outbuf.nbytes, np.uint8)
        tmp_addr = tmp.__array_interface__["data"][0]
        if outbuf.nbytes:
            ffi.memmove(ffi.cast("char *", tmp_addr), ffi.cast("char *", outbuf.address), outbuf.nbytes)
        tbufs = ffi.new("void *[2]", [bufs[0], ffi.cast("void *", tmp_addr)])
        failed = ffi.new("int32_t *")
        st = engine.run_tail(ccomm, plan.ptr, tbufs, sizes, inbuf.code, opc, seq, desc, 0, failed)
        if st != lib.PC_OK:
            raise engine.error(ccomm, st, f"digest of #{seq}")
        return hash_address(tmp_addr, tmp.nbytes)


def _stat(ep, coll, algorithm, nbytes, t0, ok):
    return Stat(coll, algorithm, nbytes, time.perf_counter() - t0, ep.world_size, ep.number, ok, 0)


def attempts_for(ep, retry):
    """retry=False: 1 attempt; True: 1 + the options' max_retries; an int n: 1 + n."""
    if isinstance(retry, bool):
        return 1 + (ep.options.max_retries if retry else 0)
    if int(retry) < 0:
        raise InvalidArgument(f"retry must be a bool or a number of retries >= 0, not {retry!r}")
    return 1 + int(retry)


def under_successor(ep, exc, n, tries):
    """Whether attempt #n (of ``tries``) that failed with ``exc`` runs again under a successor
    coordinator: the coordinator was lost (its host died with the failure, or it alone died)
    before it decided the attempt, so nobody committed it (pycoll.comm.failover)."""
    if not ((ep.can_fail_over() or ep.failover_pending()) and n + 1 < tries):
        return False
    log.info("rank %d: retrying under a successor coordinator (attempt %d): %s", ep.rank, n + 2, exc)
    ep.mark_broken()
    return True


def run_agreed(ep, attempt, retry=False, verify=False, root=None):
    """Run ``attempt(agreement)`` until it commits; re-run over the survivors
    after a retryable failure (a member was lost), at most as ``retry``
    allows. Sets ``comm.last_outcome`` and returns attempt's result.

    A PeerFailure before the round (re-forming the group, or the internal
    collectives ``auto`` runs to calibrate) is retryable on the same terms:
    the coordinator's final cause of the abort names a lost member, and every
    survivor gets that same answer, wherever it was when it failed."""
    tries = attempts_for(ep, retry)
    root_name = None
    if root is not None:
        if not 0 <= root < len(ep.members):
            raise InvalidArgument(f"root {root} is not a rank of this group (world size {ep.world_size})")
        root_name = ep.members[root]
    lost = []
    for n in range(tries):
        try:
            result = attempt(Agreement(verify, root_name))
        except PeerFailure as exc:
            if under_successor(ep, exc, n, tries):
                continue
            if not exc.retryable or n + 1 >= tries:
                raise
            lost.extend(x for x in exc.lost_names if x not in lost)
            log.info("rank %d: retrying over the survivors (attempt %d): %s", ep.rank, n + 2, exc)
            continue
        except CoordinatorError as exc:
            if not under_successor(ep, exc, n, tries):
                raise
            continue
        ep.last_outcome = ep.last_outcome._replace(attempts=n + 1, lost=tuple(lost))
        return result
    raise AssertionError("unreachable")
