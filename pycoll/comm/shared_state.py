"""Shared state with bit parity: ``sync_shared_state`` and ``verify_parity``.

``state`` maps names to arrays (NumPy or torch CPU, C-contiguous). Every
peer hashes each array with the C core's 64-bit hash (pycoll.h,
``pc_hash64_many``: computed with the GIL released, on several threads for
large states) and reports the hashes and its ``revision`` to the
coordinator as one round of the epoch. The coordinator decides per tensor
(pycoll.control.parity): the highest revision reported is the target, the most
common hash among the peers at that revision is the majority, and every
peer whose hash differs fetches that tensor from the peers holding the
majority, in pieces striped across up to 8 of them.

The bytes move peer to peer over the group's own connections, the whole
state in one plan (a buffer plan over all the tensors, pycoll.h
``pc_comm_run_buffers``), so that every source sends at once. A fetcher
receives straight into its own arrays (no temporary copy) and, with
``verify`` (the default), hashes the bytes as they land: pieces start on the
hash's 64 KiB blocks, the C engine digests each block while it is still in
cache (on a same-host peer: after each chunk it copied out of the source's
memory, on several threads for long pieces), and the block digests fold
into the tensor's hash, compared with the majority's. A mismatch (a source
whose memory no longer holds what it hashed, a corrupted link) fails the
sync on every rank with :class:`ParityError` on the fetcher. The group
agrees that every transfer succeeded before anyone returns. If a peer dies
meanwhile, the group re-forms and the sync starts over (``retry``). A
failed sync may leave a fetcher's fetched arrays partly overwritten: they
did not hold the majority's bytes anyway, and the next sync fetches them
again. A source's arrays are only read.

``SyncResult.phases`` says where the time went on this peer (hashing its
state, the coordinator's round, the transfer and check, the agreement).

The functions here take the communicator's :class:`pycoll.comm.epoch.Epoch`
(``ep``): rounds and transfers are numbered by its sequence, run on its
connections under its lock.
"""
import dataclasses
import time
import zlib


from pycoll.comm import agreement as consensus
from pycoll.core import engine
from pycoll import faults
from pycoll.core.native import ffi, lib, status_error
from pycoll.core.buffers import as_buffer
from pycoll.errors import CollectiveError, CoordinatorError, InvalidArgument, ParityError, PeerFailure
from pycoll.faults import fault_armed, fault_point
from pycoll.core.hashing import SEED, hash_address, hash_arrays  # noqa: F401 - public here too (pycoll.shared_state)
from pycoll.core.hashing import blocks, fold
from pycoll.core.hashing import hash_buffers as _hash_buffers


@dataclasses.dataclass
class SyncResult:
    """What ``sync_shared_state`` did on this peer."""

    revision: int                 # the revision every peer now holds
    fetched: list                 # names of the tensors this peer received (in any attempt of the call)
    bytes_received: int
    sent: list                    # names of tensors this peer served (to anyone)
    bytes_sent: int
    sources: dict                 # name -> ranks this peer fetched it from
    fetchers: dict                # name -> ranks that fetched it (group-wide)
    attempts: int
    seconds: float
    phases: dict = dataclasses.field(default_factory=dict)  # phase -> seconds of the last attempt

    @property
    def changed(self):
        """True if this peer's state was modified."""
        return bool(self.fetched)


@dataclasses.dataclass
class ParityReport:
    """Result of ``verify_parity``: ``ok`` when every peer holds the majority
    bytes of every tensor at the same revision."""

    ok: bool
    revision: int
    differ: dict                  # name -> ranks whose bytes differ from the majority
    behind: list                  # ranks whose revision is lower than the highest
    hashes: dict                  # name -> majority hash


def _describe(state):
    if not isinstance(state, dict) or not state:
        raise InvalidArgument("shared state must be a non-empty dict of name -> array")
    names = sorted(state)
    bufs, tensors = [], []
    for name in names:
        if not isinstance(name, str):
            raise InvalidArgument(f"shared state names must be strings, not {name!r}")
        b = as_buffer(state[name], writable=True, what=f"shared state {name!r}")
        shape = [int(x) for x in getattr(state[name], "shape", ())]
        bufs.append(b)
        tensors.append([name, [b.dtype] + shape + [b.nbytes]])
    return names, bufs, tensors


def _round(ep, kind, revision, tensors, hashes, timeout):
    skip = consensus.begin(ep)
    if kind == "state" and not skip and ep.ccomm is not None:
        engine.probe_single_copy(ep.ccomm)  # before the round: done on every peer once anyone sends
    seq = ep.next_seq()
    if skip:
        ep.mark_broken()
        reply = consensus.report(ep, kind, seq, timeout, ok=False, why="epoch aborted before this call",
                                 status=lib.PC_ERR_CANCELLED)
    else:
        reply = consensus.report(ep, kind, seq, timeout, revision=int(revision),
                                 tensors=[t + [h] for t, h in zip(tensors, hashes)])
    if reply.get("decision") == "error":
        raise InvalidArgument(f"rank {ep.rank}: {reply.get('why')}")
    if reply.get("decision") == "abort":
        ep.mark_broken()
        raise consensus.abort_error(ep, f"{kind} round #{seq}", reply)
    return seq, reply


def _transfer(ep, names, bufs, reply, seq, timeout, verify, threads):
    """Move the pieces this peer serves and fetches, all tensors in one buffer plan, the received
    bytes straight into the state and, with ``verify``, hashed as they land. Returns
    ({index: hash of what arrived} (empty without verify), None) or (None, (status, message,
    failed peer))."""
    fetch = {idx: pieces for idx, pieces in reply["fetch"]}
    serve = {idx: items for idx, items in reply["serve"]}
    failed = ffi.new("int32_t *")
    die_midway = False
    if faults.FAULTS_ARMED:
        fault_point("before:state_transfer")
        # test harness: die while the bytes move. Serving half of the first piece and then dying
        # is a death inside the transfer on any machine (a timer lost the race on a fast one).
        die_midway = fault_armed("during:state_transfer")
        if die_midway and serve:
            first_idx = min(serve)
            peer, off, length = min(serve[first_idx], key=lambda x: (x[1], x[0]))
            serve, fetch = {first_idx: [(peer, off, max(1, length // 2))]}, {}
    n = len(bufs)
    addrs = ffi.new("void *[]", [ffi.cast("void *", b.address) for b in bufs])
    sizes = ffi.new("uint64_t[]", [b.nbytes for b in bufs])
    first = [0]
    for b in bufs:
        first.append(first[-1] + blocks(b.nbytes))
    digests = ffi.new("uint64_t[]", max(1, first[-1])) if verify and fetch else ffi.NULL
    desc = zlib.crc32(f"state:{n}:{first[-1]}:{sum(b.nbytes for b in bufs)}".encode())
    plan = _p2p_plan(ep, n, fetch, serve)
    try:
        st = engine.run_buffers(ep.ccomm, plan, n, addrs, sizes, seq, desc, timeout, SEED, digests, threads, failed)
    finally:
        lib.pc_plan_free(plan)
    if die_midway:
        fault_point("during:state_transfer")
    if st != lib.PC_OK:
        return None, (st, engine.last_error(ep.ccomm), int(failed[0]))
    if digests == ffi.NULL:
        return {}, None
    return {idx: fold(digests + first[idx], bufs[idx].nbytes) for idx in fetch}, None


def _p2p_plan(ep, nbufs, fetch, serve):
    """A buffer plan of this peer's sends (from the tensors it serves) and receives (into the
    tensors it fetches); both sides list a connection's pieces in the same order (by tensor,
    then offset), which is all the engine needs. The tag of a piece is its tensor's index."""
    out = ffi.new("pc_plan **")
    st = lib.pc_plan_create_buffers(ep.world_size, ep.rank, nbufs, out)
    if st != lib.PC_OK:
        raise status_error(st, "cannot create a transfer plan")
    plan = out[0]
    op = ffi.new("pc_op *")
    try:
        for idx in sorted(serve):
            for peer, off, length in sorted(serve[idx], key=lambda x: (x[1], x[0])):
                _set(op, lib.PC_OP_SEND, peer, idx, idx, off, -1, 0, length)
                _check(lib.pc_plan_append(plan, op, ffi.NULL, 0, ffi.NULL))
        for idx in sorted(fetch):
            for peer, off, length in sorted(fetch[idx], key=lambda x: (x[1], x[0])):
                _set(op, lib.PC_OP_RECV, peer, idx, -1, 0, idx, off, length)
                _check(lib.pc_plan_append(plan, op, ffi.NULL, 0, ffi.NULL))
        _check(lib.pc_plan_seal(plan))
    except BaseException:
        lib.pc_plan_free(plan)
        raise
    return plan


def _set(op, kind, peer, tag, src_buf, src_off, dst_buf, dst_off, length):
    op.kind, op.peer, op.stripe, op.tag = kind, peer, 0, tag & 0xFFFFFFFF
    op.src_buf, op.src_off, op.dst_buf, op.dst_off, op.len = src_buf, src_off, dst_buf, dst_off, length


def _check(st):
    if st != lib.PC_OK:
        raise status_error(st, f"bad transfer plan (status {st})")


def sync_shared_state(ep, state, revision, *, timeout=None, retry=True, threads=0, verify=True):
    """Make ``state`` bit-identical on every peer; returns a SyncResult.

    Every member must call it at the same point. Peers whose bytes differ
    from the majority, or whose ``revision`` is behind, receive the majority
    bytes in place (see the module docstring). Afterwards every peer holds
    ``result.revision``. A lost peer restarts the sync over the survivors
    (``retry``, as for collectives). Raises InvalidArgument when peers
    disagree on names, dtypes or shapes. ``verify=False`` skips hashing
    what arrives (the majority is still decided by hashes): faster by the
    hash's share, and a source whose bytes differ from what it reported goes
    unnoticed.
    """
    timeout = timeout if timeout is not None else ep.options.timeout
    names, bufs, tensors = _describe(state)
    t0 = time.perf_counter()
    tries = consensus.attempts_for(ep, retry)
    # What earlier attempts planned to send us: their bytes land in place, so one that failed may
    # have brought a tensor whole, and the retry then finds it matching and fetches nothing. It was
    # still received by this call (name -> (bytes, sources)).
    planned = {}
    for attempt in range(tries):
        try:
            with ep.exec_lock:
                result = _sync_once(ep, names, bufs, tensors, revision, timeout, threads, verify, planned)
            for name in [n for n in names if n in planned and n not in result.fetched]:
                result.fetched.append(name)
                result.bytes_received += planned[name][0]
                result.sources[name] = planned[name][1]
            result.fetched.sort(key=names.index)
            result.attempts = attempt + 1
            result.seconds = time.perf_counter() - t0
            return result
        except PeerFailure as exc:
            if consensus.under_successor(ep, exc, attempt, tries):
                continue
            if not exc.retryable or attempt + 1 >= tries:
                raise
        except CoordinatorError as exc:
            if not consensus.under_successor(ep, exc, attempt, tries):
                raise
    raise AssertionError("unreachable")


def _sync_once(ep, names, bufs, tensors, revision, timeout, threads, verify, planned):
    clock = [time.perf_counter()]
    phases = {}

    def lap(name):
        now = time.perf_counter()
        phases[name] = now - clock[0]
        clock[0] = now
    hashes = _hash_buffers(bufs, threads)
    lap("hash")
    seq, plan = _round(ep, "state", revision, tensors, hashes, timeout)
    lap("plan")
    result = SyncResult(int(plan["revision"]), [], 0, [], 0, {}, dict(plan.get("fetchers", {})), 1, 0.0, phases)
    if not plan.get("transfer"):
        return result  # everyone already holds the majority bytes: one round trip, nothing else
    for idx, pieces in plan["fetch"]:  # (see sync_shared_state: kept if this attempt fails)
        planned[names[idx]] = (sum(p[2] for p in pieces), sorted({p[0] for p in pieces}))
    got, failure = _transfer(ep, names, bufs, plan, seq, timeout, verify, threads)
    lap("transfer")
    fields = {"ok": True}
    if failure is not None:
        ep.mark_broken()
        fields = {"ok": False, "why": failure[1], "status": int(failure[0])}
    else:
        majority = plan["majority"]
        bad = [names[i] for i in sorted(got) if got[i] != majority[i]]
        if bad:
            fields = {"ok": False, "why": f"received bytes of {bad[:4]} do not match the majority hash",
                      "status": lib.PC_ERR_PROTO}
    reply = consensus.report(ep, "collective", ep.next_seq(), timeout, **fields)
    lap("agree")
    if reply.get("decision") != "commit":
        ep.mark_broken()
        if failure is None and not fields["ok"]:
            raise ParityError(f"rank {ep.rank}: {fields['why']}")
        raise consensus.abort_error(ep, "sync_shared_state transfer", reply,
                                    failure[0] if failure else None, failure[1] if failure else "")
    for idx, pieces in plan["fetch"]:
        result.fetched.append(names[idx])
        result.bytes_received += sum(p[2] for p in pieces)
        result.sources[names[idx]] = sorted({p[0] for p in pieces})
    for idx, items in plan["serve"]:
        result.sent.append(names[idx])
        result.bytes_sent += sum(x[2] for x in items)
    return result


def verify_parity(ep, state, revision=0, *, timeout=None, threads=0):
    """Check, without fixing, that every peer holds the same bytes: returns
    a ParityReport (``report.ok``). Every member must call it together."""
    timeout = timeout if timeout is not None else ep.options.timeout
    names, bufs, tensors = _describe(state)
    with ep.exec_lock:
        hashes = _hash_buffers(bufs, threads)
        _, reply = _round(ep, "parity", revision, tensors, hashes, timeout)
    differ = {k: list(v) for k, v in reply["differ"].items()}
    majority = dict(reply["majority"])
    behind = list(reply["behind"])
    return ParityReport(not differ and not behind, int(reply["revision"]), differ, behind, majority)


__all__ = ["sync_shared_state", "verify_parity", "hash_arrays", "SyncResult", "ParityReport", "CollectiveError"]
