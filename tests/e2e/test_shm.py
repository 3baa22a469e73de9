"""The shared-memory transport (csrc/transport/transport_shm.c).

In-process tests build comms by hand (socketpairs plus segments from
pc_shm_segment_create) and run them from threads: small rings and small
segments force partial writes, wrap-around and padding, and every result is
compared bit for bit with the plans executed in Python. Process tests check
what only processes can show: a SIGKILLed peer wakes a sleeping waiter, the
survivors' old segments are unmapped, and nothing appears in /dev/shm.
"""
import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import pycoll
import pycoll.testing
from collective_cases import expected, rank_input
from pycoll.plan import planners
from pycoll.core.native import ffi, lib
from pycoll.core.dtypes import DTYPES, OPS as OP_CODES
from pycoll.net.mesh import local_peers, transport_mode
from reference import ALL_DTYPES, OPS, storage_dtype

SHM, TCP = lib.PC_CONN_SHM, lib.PC_CONN_TCP
RING_MIN = 64 << 10
MEMFD = "memfd:pycoll-shm"


def segment(ring=RING_MIN):
    fds = ffi.new("int32_t[3]")
    assert lib.pc_shm_segment_create(ring, fds) == lib.PC_OK
    return list(fds)


def tcp_pair():
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    a = socket.create_connection(lsock.getsockname())
    b, _ = lsock.accept()
    lsock.close()
    return a, b


class Mesh:
    """n comms in this process, fully connected; kind(i, j) picks each pair's transport."""

    def __init__(self, n, stripes=1, ring=RING_MIN, kind=lambda i, j: SHM, sleepy=False, single_copy=None):
        self.n, self.stripes = n, stripes
        kinds = [[TCP] * (n * stripes) for _ in range(n)]
        fds = [[-1] * (n * stripes) for _ in range(n)]
        shm = [[-1] * (3 * n * stripes) for _ in range(n)]
        for i in range(n):
            for j in range(i + 1, n):
                for s in range(stripes):
                    k = kind(i, j)
                    a, b = socket.socketpair() if k == SHM else tcp_pair()
                    for me, peer, sock in ((i, j, a), (j, i, b)):
                        c = peer * stripes + s
                        kinds[me][c] = k
                        fds[me][c] = sock.detach()
                    if k == SHM:
                        seg = segment(ring)
                        shm[i][3 * (j * stripes + s):3 * (j * stripes + s) + 3] = seg
                        shm[j][3 * (i * stripes + s):3 * (i * stripes + s) + 3] = [os.dup(fd) for fd in seg]
        self.comms = []
        for r in range(n):
            out = ffi.new("pc_comm **")
            st = lib.pc_comm_create_mixed(r, n, stripes, kinds[r], fds[r], shm[r], 0, out)
            assert st == lib.PC_OK, st
            if sleepy:  # never spin: every wait goes through the doorbells
                lib.pc_comm_set_spin(out[0], 0)
                lib.pc_comm_set_shm_spin(out[0], 0)
            if single_copy is not None:  # bytes; 1: every payload of 64 KiB or more
                lib.pc_comm_set_single_copy(out[0], single_copy)
            self.comms.append(out[0])
        self.seq = 0

    @classmethod
    def of(cls, comms):
        mesh = cls.__new__(cls)
        mesh.n, mesh.stripes, mesh.seq, mesh.comms = len(comms), 1, 0, list(comms)
        return mesh

    def run(self, plans, bufs, dtype, op, timeout=20.0, only=None):
        """Run one plan per rank concurrently; returns the statuses."""
        self.seq += 1
        ranks = list(range(self.n)) if only is None else only

        def one(r):
            ptrs = ffi.new("void *[2]", [ffi.cast("void *", b.ctypes.data) for b in bufs[r][:2]])
            sizes = ffi.new("uint64_t[2]", [b.nbytes for b in bufs[r][:2]])
            failed = ffi.new("int32_t *")
            return lib.pc_comm_run(self.comms[r], plans[r].ptr, ptrs, sizes, DTYPES[dtype], OP_CODES[op],
                                   self.seq, 0x5eed, timeout, failed)
        with ThreadPoolExecutor(len(ranks)) as ex:
            return list(ex.map(one, ranks))

    def close(self):
        for c in self.comms:
            if c is None:
                continue
            lib.pc_comm_shutdown(c)
            lib.pc_comm_free(c)
        self.comms = []


def run_case(mesh, case, segment_bytes, nrings=1):
    """Run a collective case on the mesh; compare every rank with the reference."""
    coll, dtype, op, count, seed, algorithm = case
    n = mesh.n
    es = storage_dtype(dtype).itemsize
    root = seed % n if coll == "broadcast" else 0
    rings = [list(range(n)), list(range(n))[::-1]][:nrings]

    def plans_for(case, n):
        if planners.effective(algorithm, coll) == "allpairs":
            return [planners.plan_allpairs(coll, n, r, count, es, segment_bytes=segment_bytes, stripes=mesh.stripes,
                                           preserve=True, avg=(op == "avg")) for r in range(n)]
        return [planners.plan_rings(coll, n, r, rings, count, es, root=root, segment_bytes=segment_bytes,
                                    stripes=mesh.stripes, preserve=coll in ("all_reduce", "broadcast"),
                                    avg=(op == "avg")) for r in range(n)]
    plans = plans_for(case, n)
    bufs = []
    for r in range(n):
        x = rank_input(case, r, n)
        if coll in ("all_reduce", "broadcast"):
            bufs.append([x, x])
        elif coll == "all_gather":
            bufs.append([x, np.zeros(count * n, x.dtype)])
        else:
            bufs.append([x, np.zeros(count, x.dtype)])
    statuses = mesh.run(plans, bufs, dtype, op)
    assert statuses == [lib.PC_OK] * n, [ffi.string(lib.pc_comm_last_error(c)) for c in mesh.comms]
    want = expected(case, n, plans_for)
    for r in range(n):
        assert bufs[r][1].tobytes() == want[r], f"rank {r} differs for {case}"


SIZES = [0, 1, 3, 7, 31, 1000, 4099, 16411, 65537, 100003]
cases = st.tuples(st.sampled_from(["all_reduce", "all_gather", "reduce_scatter", "broadcast"]),
                  st.sampled_from(ALL_DTYPES), st.sampled_from(OPS), st.sampled_from(SIZES),
                  st.integers(0, 1000), st.sampled_from(["ring", "allpairs"]))


@pytest.mark.timeout(300)
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(case_list=st.lists(cases, min_size=3, max_size=6), n=st.integers(2, 4), stripes=st.integers(1, 2),
       nrings=st.integers(1, 2), segment_bytes=st.sampled_from([4096, 9000, 1 << 16, 200000]),
       ring=st.sampled_from([RING_MIN, 4 * RING_MIN]), sleepy=st.booleans(), single_copy=st.sampled_from([0, 1]))
def test_small_rings_wrap_and_pad(case_list, n, stripes, nrings, segment_bytes, ring, sleepy, single_copy):
    """Rings of 64 or 256 KiB, segments from 4 KiB: frames of every length
    and alignment wrap around the ring, are cut into partial writes and
    published while being copied; with `sleepy` every wait sleeps and must
    be woken by the peer's doorbell. With `single_copy` every payload of
    64 KiB or more goes as a descriptor, mixed with the inline frames."""
    mesh = Mesh(n, stripes, ring=ring, sleepy=sleepy, single_copy=single_copy)
    try:
        for case in case_list:  # several collectives on one comm: the rings carry over
            run_case(mesh, case, segment_bytes, nrings)
    finally:
        mesh.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sleepy", [False, True])
def test_long_copies_published_while_copying(sleepy):
    """Frames far longer than the publishing step (64 KiB) on a 256 KiB ring:
    the reader reduces the first pieces while the writer copies the rest."""
    mesh = Mesh(3, ring=4 * RING_MIN, sleepy=sleepy)
    try:
        for coll, dtype in [("all_reduce", "float64"), ("reduce_scatter", "bfloat16"), ("all_gather", "int32")]:
            run_case(mesh, (coll, dtype, "sum", 100003, 7, "ring"), 200000)
    finally:
        mesh.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sleepy", [False, True])
def test_allpairs_reads_every_peer_at_once(sleepy):
    """allpairs over single copy: each owner reads its chunk's segments out of all its peers'
    inputs (several descriptors out on every connection at once, read in each segment's
    reduction order), then every finished chunk out of its owner; bit-exact, with the bytes
    really read out of the peers' memory."""
    mesh = Mesh(4, 2, ring=4 * RING_MIN, sleepy=sleepy, single_copy=1)
    try:
        for i, (dtype, op) in enumerate([("float32", "sum"), ("bfloat16", "max"), ("float64", "avg")]):
            run_case(mesh, ("all_reduce", dtype, op, 400003 + i, i, "allpairs"), 1 << 18)
        assert all(b > 0 for b in _single_copied(mesh)), _single_copied(mesh)
    finally:
        mesh.close()


def _single_copied(mesh):
    return [lib.pc_comm_bytes_single_copy(c) for c in mesh.comms]


def _windowed(mesh):
    return [lib.pc_comm_bytes_from_windows(c) for c in mesh.comms]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("stripes", [1, 2])
def test_preserving_allpairs_copies_each_chunk_once_out_of_its_owners_window(stripes):
    """A preserving allpairs all-reduce over single copy: every rank reads its peers' inputs for
    its own chunk (reduce-scatter) and no other chunk during the body; after it, every other
    chunk is copied once, straight out of its owner's result window into the output. Bit-exact;
    the bytes each way counted exactly."""
    n = 4
    mesh = Mesh(n, stripes, ring=4 * RING_MIN, single_copy=1)
    for c in mesh.comms:  # as pycoll.init does: single copy known on every connection before the first call
        lib.pc_comm_probe_single_copy(c)
    try:
        want_windows, want_single = [0] * n, [0] * n
        for i, (dtype, op) in enumerate([("float32", "sum"), ("bfloat16", "max"), ("float64", "avg")]):
            count = 400003 + i
            run_case(mesh, ("all_reduce", dtype, op, count, i, "allpairs"), 1 << 18)
            es = storage_dtype(dtype).itemsize
            for r in range(n):
                mine = count // n + (1 if r < count % n else 0)
                want_windows[r] += (count - mine) * es
                want_single[r] += (n - 1) * mine * es + (count - mine) * es
        assert _windowed(mesh) == want_windows
        assert _single_copied(mesh) == want_single
    finally:
        mesh.close()


def _window_outlives_its_owner(comm):
    """Every rank: a committed allpairs all-reduce (retry=True) whose last rank dies after the
    commit, before its own copy-out; the others copy it out a second later."""
    x = np.arange(4 << 20, dtype=np.float32) * (comm.rank + 1) / 7.0
    inputs = [np.arange(4 << 20, dtype=np.float32) * (r + 1) / 7.0 for r in range(comm.world_size)]
    comm.all_reduce(x, algorithm="allpairs", retry=True)
    n = comm.world_size
    want = np.empty_like(x)
    for p in range(n):  # chunk p reduced at its owner as x_p + x_{p+1} + ... (allpairs' order)
        lo, hi = p * x.size // n, (p + 1) * x.size // n
        acc = inputs[p][lo:hi].copy()
        for k in range(1, n):
            acc += inputs[(p + k) % n][lo:hi]
        want[lo:hi] = acc
    return (x.tobytes() == want.tobytes(), list(comm.last_outcome.contributors), comm.last_outcome.attempts,
            comm.bytes_from_windows)


@pytest.mark.timeout(150)
def test_a_committed_chunk_outlives_its_owner():
    """The owner of a reduced chunk dies after the group committed the all-reduce and before
    the others copied its chunk out: its window's pages live on in their mappings, so every
    survivor's result is the whole group's, bit for bit, as the commit promised."""
    n = 4
    late = {"decided:all_reduce": 1.0}
    res = pycoll.testing.run(_window_outlives_its_owner, n, timeout=120, kill={n - 1: "decided:all_reduce"},
                             delay={r: late for r in range(n - 1)},
                             init_kwargs={"timeout": 30, "transport": "shm", "single_copy_adapt": False})
    assert res[n - 1] == pycoll.testing.KILLED
    for exact, contributors, attempts, windowed in res[:n - 1]:
        assert exact and len(contributors) == n and attempts == 1
        assert windowed == (n - 1) * (4 << 20) * 4 // n  # every other chunk, out of its owner's window


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sleepy", [False, True])
def test_single_copy_reads_the_senders_buffer(sleepy):
    """Payloads of 64 KiB and more go as descriptors and the receiver copies
    (and reduces) them straight out of the sender's memory: every
    collective, odd lengths, several segments per step; results bit-exact,
    and the bytes really went that way (and do not when it is off)."""
    for single_copy in (1, 0):
        mesh = Mesh(3, ring=4 * RING_MIN, sleepy=sleepy, single_copy=single_copy)
        try:
            for i, (coll, dtype, op) in enumerate([("all_reduce", "float32", "sum"), ("all_reduce", "bfloat16", "max"),
                                                   ("reduce_scatter", "float64", "prod"),
                                                   ("all_gather", "int8", "sum"), ("broadcast", "uint16", "sum")]):
                run_case(mesh, (coll, dtype, op, 300007, i, "ring"), 200000)
            copied = _single_copied(mesh)
            assert all(c > 0 for c in copied) if single_copy else copied == [0, 0, 0], copied
        finally:
            mesh.close()


@pytest.mark.timeout(120)
def test_single_copy_threshold_counts_the_whole_buffer():
    """Collectives on buffers under the threshold keep to the ring (there
    the two copies run on two cores, in cache); above it they copy once."""
    mesh = Mesh(2, single_copy=1 << 20)
    try:
        run_case(mesh, ("all_reduce", "float32", "sum", (1 << 18) - 1, 1, "ring"), 1 << 20)  # just under 1 MiB
        assert _single_copied(mesh) == [0, 0]
        run_case(mesh, ("all_reduce", "float32", "sum", 1 << 18, 2, "ring"), 1 << 20)
        # each read half the buffer from the other twice: to reduce it, then the other's result
        assert _single_copied(mesh) == [1 << 20, 1 << 20]
    finally:
        mesh.close()


@pytest.mark.timeout(120)
def test_single_copy_off_on_one_side():
    """A comm that turned single copy off is never sent a descriptor, while
    its peer still may be; results are the same either way."""
    mesh = Mesh(2)
    lib.pc_comm_set_single_copy(mesh.comms[0], 0)
    lib.pc_comm_set_single_copy(mesh.comms[1], 1)
    try:
        for i in range(3):
            run_case(mesh, ("all_reduce", "float32", "sum", 200003 + i, i, "ring"), 1 << 18)
        assert _single_copied(mesh) == [0, 0]  # 0 refuses to read; 1 is never asked to, as 0 never sends
        lib.pc_comm_set_single_copy(mesh.comms[0], 1)
        run_case(mesh, ("all_reduce", "float32", "sum", 200003, 9, "ring"), 1 << 18)
        assert all(c > 0 for c in _single_copied(mesh))
    finally:
        mesh.close()


@pytest.mark.timeout(120)
def test_mixed_kinds_in_one_comm():
    """One comm with shared-memory and TCP connections side by side."""
    mesh = Mesh(4, stripes=2, kind=lambda i, j: SHM if (i + j) % 2 else TCP)
    try:
        for i, dtype in enumerate(["float32", "bfloat16", "int64"]):
            run_case(mesh, ("all_reduce", dtype, "sum", 300007, i, "ring"), 1 << 16)
            run_case(mesh, ("all_gather", dtype, "sum", 70001, i, "ring"), 1 << 16)
    finally:
        mesh.close()


def _fd_targets():
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    return sorted(out)


def _memfd_maps():
    with open("/proc/self/maps") as f:
        return sum(MEMFD in line for line in f)


@pytest.mark.timeout(60)
def test_freeing_releases_every_fd_and_mapping():
    before = _fd_targets()
    mesh = Mesh(3, stripes=2)
    assert _memfd_maps() == 12  # 3 pairs x 2 stripes x 2 ends, all in this process
    run_case(mesh, ("all_reduce", "float32", "sum", 1000, 1, "ring"), 4096)
    pid = os.fork()
    if pid == 0:  # a forked child (think: a data loader worker) maps none of it
        os._exit(0 if _memfd_maps() == 0 else 1)
    assert os.waitpid(pid, 0)[1] == 0
    mesh.close()
    assert _memfd_maps() == 0
    assert _fd_targets() == before


@pytest.mark.timeout(60)
def test_bad_segment_is_refused_and_closed():
    """An unsealed or odd-sized segment is refused (a peer could shrink it
    under our mapping); every fd handed over is closed on that path."""
    for make in ("unsealed", "size"):
        a, b = socket.socketpair()
        if make == "unsealed":
            seg = os.memfd_create("pycoll-test")
            os.ftruncate(seg, 4096 + 2 * RING_MIN)
        else:
            seg = os.memfd_create("pycoll-test", os.MFD_ALLOW_SEALING)
            os.ftruncate(seg, 4096 + 3 * RING_MIN)
            import fcntl
            fcntl.fcntl(seg, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        bells = [os.eventfd(0), os.eventfd(0)]
        given_fds = [a.detach(), seg] + bells
        out = ffi.new("pc_comm **")
        st = lib.pc_comm_create_mixed(0, 2, 1, [0, SHM], [-1, given_fds[0]], [-1, -1, -1, seg] + bells, 0, out)
        assert st == lib.PC_ERR_ARG
        for fd in given_fds:
            with pytest.raises(OSError):
                os.fstat(fd)
        b.close()


def _one_sided_run(mesh, timeout, act=None):
    """Rank 0 runs an all-reduce that rank 1 never joins; ``act`` fires
    after 0.3 s. Returns (status, seconds, error text)."""
    plans = [planners.plan_rings("all_reduce", 2, r, [[0, 1]], 1 << 16, 4, preserve=True) for r in range(2)]
    x = np.ones(1 << 16, np.float32)
    timer = threading.Timer(0.3, act) if act is not None else None
    if timer is not None:
        timer.start()
    t0 = time.monotonic()
    st = mesh.run(plans, [[x, x], [x, x]], "float32", "sum", timeout=timeout, only=[0])[0]
    dt = time.monotonic() - t0
    if timer is not None:
        # the run may end while ``act`` is still inside pc_comm_cancel/pc_comm_shutdown (it saw
        # the effect first): the caller frees the comms next, so wait for ``act`` to return (a
        # full-suite run segfaulted in that window, the test's own use after free)
        timer.join(10)
    assert np.all(x == 1), "a failed all-reduce must leave the input intact"
    return st, dt, ffi.string(lib.pc_comm_last_error(mesh.comms[0])).decode()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("event,timeout,want,earliest", [("deadline", 0.25, "PC_ERR_TIMEOUT", 0.2),
                                                         ("cancel", 30, "PC_ERR_CANCELLED", 0.25),
                                                         ("peer_shutdown", 30, "PC_ERR_PEER", 0.25)])
def test_a_shared_memory_waiter_ends_promptly(event, timeout, want, earliest):
    """A rank waiting on a peer that never sends ends at its deadline, on a
    cancel from another thread, or when the peer shuts down (both 0.3 s in),
    with the matching status and not seconds later."""
    mesh = Mesh(2)
    act = {"deadline": None, "cancel": lambda: lib.pc_comm_cancel(mesh.comms[0]),
           "peer_shutdown": lambda: lib.pc_comm_shutdown(mesh.comms[1])}[event]
    try:
        st, dt, why = _one_sided_run(mesh, timeout=timeout, act=act)
        assert st == getattr(lib, want), why
        assert earliest <= dt < 5, dt
    finally:
        mesh.close()


# Segment layout (csrc/transport/transport_shm.c): a 4 KiB control page holding, for
# ring s (written by side s), head at 256*s, tail at 256*s + 64; then ring 0's
# data, then ring 1's. Here the test plays side 1 by hand against a real comm.
def _hostile_side(ring=RING_MIN):
    import mmap
    a, b = socket.socketpair()
    seg = segment(ring)
    mem = mmap.mmap(seg[0], 4096 + 2 * ring)
    out = ffi.new("pc_comm **")
    assert lib.pc_comm_create_mixed(0, 2, 1, [0, SHM], [-1, a.detach()], [-1, -1, -1] + seg, 0, out) == 0
    return Mesh.of([out[0], None]), mem, b


def _u64(mem, off, value=None):
    import struct
    if value is not None:
        mem[off:off + 8] = struct.pack("<Q", value)
    return struct.unpack("<Q", mem[off:off + 8])[0]


def _first_recv_from_1():
    plan = planners.plan_rings("all_reduce", 2, 0, [[0, 1]], 1 << 16, 4, preserve=True)
    return next(op for op in plan.ops() if op["kind"] in (lib.PC_OP_RECV, lib.PC_OP_RECV_REDUCE) and op["peer"] == 1)


def _send_descriptor(mem, address, length, probe=None, shared=None):
    """Play side 1 sending rank 0 a PC_FRAME_REMOTE frame (the first of the
    all-reduce in _one_sided_run); with ``probe`` (an array in this process,
    which is also the peer's process here) also publish a probe word that
    rank 0's probe will find, so that rank 0 agrees to read us. ``shared``: the (registration,
    fd, address, length) of a shared buffer the bytes are said to lie in."""
    import struct
    if probe is not None:
        probe[0] = 0x5A5A_1234_ABCD_0042
        _u64(mem, 552, int(probe[0]))           # probe_val[1]
        _u64(mem, 536, probe.ctypes.data)       # probe_addr[1]
    op = _first_recv_from_1()
    frame = struct.pack("<IHHIIQQ", 0x4C4F4350, lib.PC_VERSION, 2, op["tag"], 0x5EED, 1, op["len"])
    frame += struct.pack("<QQ", address, op["len"] if length is None else length)
    frame += struct.pack("<QQQQ", *(shared or (0, 0, 0, 0)))  # the shared buffer it lies in (0: none)
    mem[4096 + RING_MIN:4096 + RING_MIN + len(frame)] = frame
    _u64(mem, 256, len(frame))


def _memfd(name, size, seal=True):
    fd = os.memfd_create(name, os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if seal:
        import fcntl
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return fd


def _run_with_shared_descriptor(address, shared, timeout):
    """Rank 0's one-sided run (_one_sided_run) given side 1's descriptor of ``address`` in the
    shared buffer ``shared`` = (registration, fd, base, length), whose fd is closed afterwards:
    (status, error text, bytes rank 0 read out of a mapping of it)."""
    mesh, mem, sock = _hostile_side()
    probe = np.zeros(1, np.uint64)
    try:
        _send_descriptor(mem, address, None, probe=probe, shared=shared)
        st, _, why = _one_sided_run(mesh, timeout=timeout)
        return st, why, lib.pc_comm_bytes_from_shared(mesh.comms[0])
    finally:
        mesh.close()
        mem.close()
        sock.close()
        os.close(shared[1])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("lie", ["too_long", "outside", "wrong_name", "unsealed", "not_a_memfd"])
def test_a_forged_shared_buffer_is_not_mapped(lie):
    """A descriptor may say its bytes lie in a shared buffer (core/shared_peer.h): the receiver
    maps it only if the fd it fetches is that registration's memfd (by name), sealed, as long as
    claimed, with the bytes inside it. Each lie here is refused, and the receive falls back to
    reading the named address the usual way (here: memory the peer does not have, an I/O error):
    nothing is read through a mapping."""
    size = 1 << 20
    fd = {"wrong_name": lambda: _memfd("pycoll-shared-8", size),
          "unsealed": lambda: _memfd("pycoll-shared-7", size, seal=False),
          "not_a_memfd": lambda: os.open("/dev/zero", os.O_RDONLY)}.get(lie, lambda: _memfd("pycoll-shared-7", size))()
    shared = {"too_long": (7, fd, 0, 1 << 41), "outside": (7, fd, 1 << 30, size)}.get(lie, (7, fd, 0, size))
    st, why, mapped = _run_with_shared_descriptor(8, shared, timeout=2.0)
    assert st == lib.PC_ERR_IO, why
    assert mapped == 0


@pytest.mark.timeout(60)
def test_a_true_shared_buffer_is_read_where_it_lies():
    """The control for the lies above: the same descriptor naming a real registration (a sealed
    memfd of the right name, as long as claimed, holding the bytes) is reduced straight out of
    our mapping of it."""
    fd = _memfd("pycoll-shared-9", 1 << 20)
    st, why, mapped = _run_with_shared_descriptor(4096, (9, fd, 0, 1 << 20), timeout=1.0)
    assert mapped == _first_recv_from_1()["len"]
    assert st == lib.PC_ERR_TIMEOUT, why  # (side 1 never acts again: the run stops later)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("attack", ["unasked", "bad_address", "wrong_length"])
def test_a_hostile_descriptor_is_refused(attack):
    """Single copy trusts a descriptor no more than a length off the wire:
    one we never agreed to read, one naming memory the peer does not have,
    and one whose length differs from what the plan expects all fail the
    collective cleanly (protocol error, I/O error), input intact."""
    mesh, mem, sock = _hostile_side()
    probe = np.zeros(1, np.uint64)
    try:
        if attack == "unasked":
            _send_descriptor(mem, probe.ctypes.data, None)  # no probe word published: rank 0 never agreed
        elif attack == "bad_address":
            _send_descriptor(mem, 8, None, probe=probe)
        else:
            _send_descriptor(mem, probe.ctypes.data, _first_recv_from_1()["len"] + 8, probe=probe)
        st, dt, why = _one_sided_run(mesh, timeout=2.0)
        want = {"unasked": lib.PC_ERR_PROTO, "bad_address": lib.PC_ERR_IO, "wrong_length": lib.PC_ERR_PROTO}[attack]
        assert st == want, why
        assert dt < 5
        if attack != "unasked":
            assert _u64(mem, 520) >> 32 == 0 and _u64(mem, 520) & 0xFFFFFFFF == 1, "rank 0 agreed to read us"
    finally:
        mesh.close()
        mem.close()
        sock.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("attack", ["head_past_tail", "tail_past_head", "bad_frame", "short_then_silent"])
def test_a_hostile_peer_cannot_make_us_overrun(attack):
    """The ring counters are read off shared memory and trusted no more than
    a length off the wire: a peer that corrupts them gets an I/O error, one
    that writes a bad frame a protocol error, one that stops a timeout; in
    every case the input is left intact and nothing is read out of bounds."""
    mesh, mem, sock = _hostile_side()
    try:
        if attack == "head_past_tail":
            _u64(mem, 256, 1 << 40)  # claims a terabyte is waiting in ring 1
        elif attack == "tail_past_head":
            _u64(mem, 64, 1 << 40)  # claims we may write far past what was read
        elif attack == "bad_frame":
            mem[4096 + RING_MIN:4096 + RING_MIN + 32] = b"NOPE" + bytes(28)
            _u64(mem, 256, 32)
        elif attack == "short_then_silent":
            mem[4096 + RING_MIN:4096 + RING_MIN + 16] = bytes(16)
            _u64(mem, 256, 16)  # half a header, then nothing
        st, dt, why = _one_sided_run(mesh, timeout=1.0)
        want = {"head_past_tail": lib.PC_ERR_IO, "tail_past_head": lib.PC_ERR_IO, "bad_frame": lib.PC_ERR_PROTO,
                "short_then_silent": lib.PC_ERR_TIMEOUT}[attack]
        assert st == want, why
        assert dt < 5
    finally:
        mesh.close()
        mem.close()
        sock.close()


def _send_from_1(mesh, count, order):
    """Rank 1 sends one frame and shuts down at once; rank 0 receives. ``order``:
    "sender_first" runs rank 1 to the end first, "together" races them."""
    plans = [planners.plan_p2p(2, 0, 1, count * 4, send=False), planners.plan_p2p(2, 1, 0, count * 4, send=True)]
    x = [np.zeros(count, np.float32), np.arange(count, dtype=np.float32)]
    bufs = [[x[0], x[0]], [x[1], x[1]]]

    def sender():
        st = mesh.run(plans, bufs, "float32", "sum", only=[1])[0]
        lib.pc_comm_shutdown(mesh.comms[1])
        return st
    if order == "sender_first":
        assert sender() == lib.PC_OK
        mesh.seq -= 1  # the same collective, now on rank 0
        st = mesh.run(plans, bufs, "float32", "sum", timeout=10, only=[0])[0]
    else:
        with ThreadPoolExecutor(1) as ex:
            fut = ex.submit(sender)
            st = mesh.run(plans, bufs, "float32", "sum", timeout=10, only=[0])[0]
            assert fut.result() == lib.PC_OK
    return st, np.array_equal(x[0], x[1])


@pytest.mark.timeout(120)
def test_bytes_sent_before_a_peer_shuts_down_are_delivered():
    """Like a socket: what a peer sent before it closed arrives in full; only
    then does the connection read as closed (also when the close races our
    look at an empty ring)."""
    mesh = Mesh(2)
    try:
        assert _send_from_1(mesh, 3000, "sender_first") == (lib.PC_OK, True)
    finally:
        mesh.close()
    for i in range(40):
        mesh = Mesh(2, sleepy=i % 2 == 1)
        try:
            st, same = _send_from_1(mesh, 1 + 997 * i, "together")
            assert st == lib.PC_OK, ffi.string(lib.pc_comm_last_error(mesh.comms[0]))
            assert same
        finally:
            mesh.close()


CHILD = textwrap.dedent("""
    import sys, time
    from pycoll.core.native import ffi, lib
    sock, seg, b0, b1 = map(int, sys.argv[1:5])
    out = ffi.new("pc_comm **")
    st = lib.pc_comm_create_mixed(1, 2, 1, [lib.PC_CONN_SHM, 0], [sock, -1], [seg, b0, b1, -1, -1, -1], 0, out)
    print("ready" if st == 0 else f"failed {st}", flush=True)
    time.sleep(60)
""")


@pytest.mark.timeout(60)
def test_sigkilled_peer_wakes_a_sleeping_waiter():
    """The peer process dies while we sleep waiting for its data: the kernel
    closes its socket and we fail at once (no coordinator involved)."""
    a, b = socket.socketpair()
    seg = segment()
    child_fds = [b.fileno()] + [os.dup(fd) for fd in seg]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    child = subprocess.Popen([sys.executable, "-c", CHILD] + [str(fd) for fd in child_fds], pass_fds=child_fds,
                             stdout=subprocess.PIPE, env=env)
    try:
        b.close()
        for fd in child_fds[1:]:
            os.close(fd)
        assert child.stdout.readline().strip() == b"ready"
        out = ffi.new("pc_comm **")
        assert lib.pc_comm_create_mixed(0, 2, 1, [0, SHM], [-1, a.detach()], [-1, -1, -1] + seg, 0, out) == 0
        mesh = Mesh.of([out[0], None])
        st, dt, why = _one_sided_run(mesh, timeout=30, act=lambda: os.kill(child.pid, signal.SIGKILL))
        assert st == lib.PC_ERR_PEER, why
        assert dt < 5, dt
        mesh.close()
        assert _memfd_maps() == 0
    finally:
        child.kill()
        child.wait()


# ---- through the Python layer ---------------------------------------------
def test_transport_choice():
    assert transport_mode(None) in ("auto", "shm", "tcp")
    assert transport_mode("TCP") == "tcp"
    with pytest.raises(pycoll.InvalidArgument):
        transport_mode("rdma")
    members = [["a", ["127.0.0.1", 1], "h1"], ["b", ["127.0.0.1", 2], "h1"], ["c", ["10.0.0.2", 3], "h2"],
               ["d", ["127.0.0.1", 4], "h1"]]
    assert local_peers(members, 0, "auto") == {1, 3}
    assert local_peers(members, 2, "shm") == set()
    assert local_peers(members, 1, "tcp") == set()


def _survive_and_count(comm):
    """Runs on every rank: all-reduces until a peer dies, recovers, then
    reports the shared-memory mappings it holds now and after close()."""
    x = np.full(1 << 20, comm.rank + 1, np.float32)
    first = list(comm.peer_transports)
    err = None
    for _ in range(200):
        try:
            comm.all_reduce(x)
            x[:] = comm.rank + 1
        except pycoll.PeerFailure as exc:
            err = str(exc)
            break
    y = np.ones(8, np.float64)
    comm.all_reduce(y)
    during = (_memfd_maps(), comm.world_size, list(comm.peer_transports))
    comm.close()
    return first, err, during, _memfd_maps(), [t for t in _fd_targets() if MEMFD in t]


def _allpairs_survivor(comm):
    """Runs on every rank: 16 MiB allpairs all-reduces (single copy) until a peer dies; then
    whether our input came through intact (preserve_input) and an all-reduce of the survivors."""
    x = np.full(4 << 20, comm.rank + 1, np.float32)
    for _ in range(100):
        try:
            comm.all_reduce(x, algorithm="allpairs")
            x[:] = comm.rank + 1
        except pycoll.PeerFailure:
            break
    else:
        return "no failure"
    intact = bool((x == comm.rank + 1).all())
    y = np.ones(1 << 20, np.float32)
    comm.all_reduce(y, algorithm="allpairs")
    return intact, comm.world_size, float(y[0]), float(y[-1]), comm.stats[-1].algorithm


@pytest.mark.timeout(150)
def test_allpairs_survivors_fail_cleanly_when_a_peer_dies():
    """A peer SIGKILLed in the middle of an allpairs all-reduce (its peers may be reading its
    memory): every survivor raises PeerFailure with its input intact, and the survivors' next
    allpairs all-reduce is right."""
    res = pycoll.testing.run(_allpairs_survivor, 4, timeout=120, kill={3: "during:all_reduce"},
                             init_kwargs={"timeout": 30, "heartbeat_timeout": 3.0, "transport": "shm"})
    assert res[3] == pycoll.testing.KILLED
    assert res[:3] == [(True, 3, 3.0, 3.0, "allpairs")] * 3


SHM_REPORT = textwrap.dedent("""
    import json, os, sys
    sys.path[:0] = {paths!r}
    import pycoll.testing, test_shm
    before = sorted(os.listdir("/dev/shm"))
    res = pycoll.testing.run(test_shm._survive_and_count, 3, timeout=100, kill={{2: "during:all_reduce"}},
                             init_kwargs={{"timeout": 30, "heartbeat_timeout": 3.0, "transport": "shm"}})
    print(json.dumps({{"before": before, "after": sorted(os.listdir("/dev/shm")), "res": res}}))
""")


@pytest.mark.timeout(150)
def test_sigkill_leaves_nothing_behind():
    """A peer is SIGKILLed mid all-reduce over shared memory: survivors fail
    fast, rebuild over the two of them, hold exactly one segment mapping (the
    new pair's), none after close, and /dev/shm stays empty. The ranks run
    with a private /dev/shm (a fresh tmpfs in their own mount namespace), so
    anything found there is theirs."""
    import json
    support = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "support")
    script = SHM_REPORT.format(paths=[support] + sys.path)
    cmd = [sys.executable, "-c", script]
    private = shutil.which("unshare") and os.geteuid() == 0
    if private:
        cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
               'mount -t tmpfs pycoll-test /dev/shm && exec "$@"', "sh"] + cmd
    out = subprocess.run(cmd, capture_output=True, timeout=140, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    if private:
        assert report["before"] == [] and report["after"] == []
    else:  # shared /dev/shm: nothing new may appear
        assert set(report["after"]) <= set(report["before"])
    res = report["res"]
    assert res[2] == pycoll.testing.KILLED
    for first, err, (maps, ws, transports), maps_after, memfds_after in res[:2]:
        assert first.count("shm") == 2
        assert err is not None
        assert (maps, ws) == (1, 2) and transports.count("shm") == 1
        assert maps_after == 0 and memfds_after == []


def _mixed(comm):
    x = np.arange(1000, dtype=np.float64) * (comm.rank + 1)
    comm.all_reduce(x)
    assert comm.stream_ring(3 << 20) > 0  # the raw ring stream works over either kind
    return comm.peer_transports, x[:3].tolist()


def _rank_with_own_transport(rank, port, transport, conn):
    try:
        comm = pycoll.init(rank=rank, world_size=3, master_addr="127.0.0.1", master_port=port, timeout=30,
                           transport=transport)
        with comm:
            conn.send(("ok", _mixed(comm)))
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        conn.send(("error", repr(exc)))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("modes,want", [
    (["tcp", "auto", "auto"], [["self", "tcp", "tcp"], ["tcp", "self", "shm"], ["tcp", "shm", "self"]]),
    (["auto", "auto", "tcp"], [["self", "shm", "tcp"], ["shm", "self", "tcp"], ["tcp", "tcp", "self"]]),
])
def test_per_peer_choice_with_mixed_settings(modes, want):
    """A peer that asks for TCP gets TCP with everyone; the others still use
    shared memory between themselves."""
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    port = pycoll.testing.free_port()
    pipes, procs = [], []
    for rank, mode in enumerate(modes):
        parent, child = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_rank_with_own_transport, args=(rank, port, mode, child))
        p.start()
        child.close()
        pipes.append(parent)
        procs.append(p)
    try:
        results = []
        for parent in pipes:
            assert parent.poll(90), "a rank did not finish"
            results.append(parent.recv())
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    for rank, (status, value) in enumerate(results):
        assert status == "ok", value
        transports, head = value
        assert transports == want[rank]
        assert head == [0.0, 6.0, 12.0]


@pytest.mark.timeout(120)
def test_shm_ring_size_setting(monkeypatch):
    """PYCOLL_SHM_RING sets the ring size (here the smallest): multi-MiB
    collectives still come out right through the Python layer."""
    monkeypatch.setenv("PYCOLL_SHM_RING", str(RING_MIN))
    from test_collectives import check
    check([("all_reduce", "float32", "sum", (1 << 20) + 3, 1, "ring"),
           ("broadcast", "int8", "sum", (1 << 20) + 1, 2, "ring")], 3, transport="shm")


def _can_read_a_peer(comm):
    """Whether this host lets a rank read another rank's memory (ptrace rules:
    Yama, seccomp, capabilities), found out with the same system call single
    copy uses, on a word the peer publishes; where it cannot, single copy
    must fall back to the rings."""
    import ctypes
    word = np.array([0x1234_5678_9ABC_DEF0 + comm.rank], np.uint64)
    me = np.array([os.getpid(), word.ctypes.data], np.int64)
    everyone = np.zeros(2 * comm.world_size, np.int64)
    comm.all_gather(me, everyone)
    peer = (comm.rank + 1) % comm.world_size
    pid, addr = int(everyone[2 * peer]), int(everyone[2 * peer + 1])

    class IoVec(ctypes.Structure):
        _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
    got = np.zeros(1, np.uint64)
    local, remote = IoVec(got.ctypes.data, 8), IoVec(addr, 8)
    libc = ctypes.CDLL(None, use_errno=True)
    n = libc.process_vm_readv(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    ok = n == 8 and int(got[0]) == 0x1234_5678_9ABC_DEF0 + peer
    comm.barrier()  # the peer keeps its word until everyone has looked
    return ok


def _single_copy_job(comm):
    allowed = _can_read_a_peer(comm)
    x = np.arange(1 << 20, dtype=np.float32) * (comm.rank + 1)  # 4 MiB
    comm.all_reduce(x)
    want = np.arange(1 << 20, dtype=np.float32) * sum(r + 1 for r in range(comm.world_size))
    return comm.single_copy, comm.bytes_single_copy, bool(np.array_equal(x, want)), allowed


@pytest.mark.timeout(120)
@pytest.mark.parametrize("setting,env,want", [(None, None, lib.PC_SINGLE_COPY_DEFAULT), (None, "off", 0),
                                              (1 << 20, None, 1 << 20), (0, "65536", 0)])
def test_single_copy_setting(monkeypatch, setting, env, want):
    """single_copy= (else PYCOLL_SINGLE_COPY) sets the threshold; 0 or "off"
    keeps every byte in the rings. A 4 MiB all-reduce over 3 ranks copies
    once whenever it is on (above the default threshold too) and the host
    lets ranks read each other's memory; results are right either way."""
    if env is None:
        monkeypatch.delenv("PYCOLL_SINGLE_COPY", raising=False)
    else:
        monkeypatch.setenv("PYCOLL_SINGLE_COPY", env)
    kw = {"transport": "shm"} if setting is None else {"transport": "shm", "single_copy": setting}
    results = pycoll.testing.run(_single_copy_job, 3, timeout=90, init_kwargs=kw)
    for threshold, copied, ok, allowed in results:
        assert ok and threshold == want
        # where the host forbids reading a peer, the bytes go through the rings instead
        assert (copied > 0) == (want > 0 and allowed), (copied, allowed)


def _adaptive_single_copy_job(comm, calls):
    allowed = _can_read_a_peer(comm)
    exact = True
    for i in range(calls):  # integer values: any reduction order gives NumPy's bits
        inputs = [np.random.default_rng([i, r]).integers(-1000, 1000, 1 << 20).astype(np.float32)
                  for r in range(comm.world_size)]
        x = inputs[comm.rank].copy()
        comm.all_reduce(x)
        exact &= bool(np.array_equal(x, np.sum(inputs, axis=0, dtype=np.float32)))
    return comm.single_copy_runs, comm.bytes_single_copy, exact, allowed, comm.single_copy_adapt


@pytest.mark.timeout(120)
@pytest.mark.parametrize("adapt,preserve", [(None, True), (None, False), ("0", True)])
def test_single_copy_or_rings_is_learned_per_size(monkeypatch, adapt, preserve):
    """Each comm times single copy against the rings on the same calls on every rank (its first
    probe: calls 5-7) and keeps the faster per size; every call, probes included, returns NumPy's
    bits. PYCOLL_SINGLE_COPY_ADAPT=0 (single_copy_adapt=False) sends every run single-copy."""
    if adapt is None:
        monkeypatch.delenv("PYCOLL_SINGLE_COPY_ADAPT", raising=False)
    else:
        monkeypatch.setenv("PYCOLL_SINGLE_COPY_ADAPT", adapt)
    calls = 12
    results = pycoll.testing.run(_adaptive_single_copy_job, 3, args=(calls,), timeout=90,
                                 init_kwargs={"transport": "shm", "preserve_input": preserve})
    for runs, copied, exact, allowed, on in results:
        assert exact
        assert on == (adapt is None)
        if not allowed:  # the host forbids reading a peer: nothing to choose
            assert runs == {"single_copy": 0, "rings": 0} and copied == 0, runs
            continue
        assert runs["single_copy"] + runs["rings"] == calls, runs
        assert runs["rings"] >= (3 if on else 0) and (on or runs["rings"] == 0), runs
        assert copied > 0


def _admitted_job(comm):
    err = ffi.new("int32_t *")
    pid = lib.pc_readers_admitted(err)
    return pid, err[0], os.getppid(), _can_read_a_peer(comm)


@pytest.mark.timeout(120)
def test_sibling_ranks_name_their_launcher_as_ptracer():
    """Ranks started side by side (as torchrun starts them) are siblings:
    under Yama's ptrace_scope 1 none could read another's buffers. Every
    rank's shared-memory connections name their common parent, the
    launcher; where the kernel takes it (Yama present) the ranks can then
    read each other, which single copy's probe relies on."""
    for pid, err, parent, can_read in pycoll.testing.run(_admitted_job, 3, timeout=90,
                                                          init_kwargs={"transport": "shm"}):
        assert pid == parent
        assert err in (0, errno.EINVAL), os.strerror(err)  # EINVAL: this kernel has no Yama
        if err == 0:
            assert can_read


def _drop_ptrace_capability():
    """Clear CAP_SYS_PTRACE from this process's effective set (root reads any process with it,
    which is how these tests run), via capget/capset."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = (ctypes.c_uint32 * 6)()                # {effective, permitted, inheritable} x 2
    assert libc.capget(header, data) == 0, os.strerror(ctypes.get_errno())
    data[0] &= ~(1 << 19)                         # CAP_SYS_PTRACE
    assert libc.capset(header, data) == 0, os.strerror(ctypes.get_errno())


def _refused_job():
    """Rank 0 gives up CAP_SYS_PTRACE and rank 1 makes itself non-dumpable, before the group
    forms: the kernel then refuses rank 0's reads of rank 1 (not the other way round)."""
    import ctypes
    import logging
    if int(os.environ["RANK"]) == 0:
        _drop_ptrace_capability()
    else:
        assert ctypes.CDLL(None).prctl(4, 0, 0, 0, 0) == 0  # PR_SET_DUMPABLE 0
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logging.getLogger("pycoll").addHandler(handler)
    with pycoll.init(transport="shm") as comm:
        x = np.arange(1 << 20, dtype=np.float32) * (comm.rank + 1)  # 4 MiB: single copy's size
        comm.all_reduce(x)
        exact = bool(np.array_equal(x, np.arange(1 << 20, dtype=np.float32) * 3))
        return comm.single_copy_refused, comm.bytes_single_copy, exact, [m for m in seen if "does not let" in m]


@pytest.mark.timeout(120)
def test_a_refused_single_copy_is_told_and_the_ring_carries_the_bytes():
    """Where the kernel refuses a rank reads of a peer's memory (ptrace rules: Yama's
    ptrace_scope 2, a non-dumpable peer read without CAP_SYS_PTRACE), results are still exact
    (the ring), comm.single_copy_refused names the peer and why, and the first call big enough
    for single copy logs it once; the peer that may read still single-copies."""
    (refused0, copied0, exact0, said0), (refused1, copied1, exact1, said1) = pycoll.testing.run(
        _refused_job, 2, init=None, timeout=90)
    assert exact0 and exact1
    assert refused0 == {1: os.strerror(errno.EPERM)} and copied0 == 0
    assert len(said0) == 1 and "rank(s) [1]" in said0[0] and "Operation not permitted" in said0[0], said0
    assert refused1 == {} and copied1 > 0 and said1 == []


def test_single_copy_setting_is_checked():
    from pycoll.net.mesh import single_copy_bytes
    assert single_copy_bytes("off") == 0 and single_copy_bytes("4096") == 4096
    for bad in ("lots", -1):
        with pytest.raises(pycoll.InvalidArgument, match="single copy"):
            single_copy_bytes(bad)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sleepy", [False, True])
def test_a_peer_that_finishes_and_leaves_at_once_is_not_a_failure(sleepy):
    """Rank 1 completes a barrier and shuts its comm down straight away (as a
    process does when it exits after its last collective). Its frame is in
    the ring before it leaves, so rank 0 must complete too, never report the
    peer lost: a reader that looks at the ring, then at the peer, can see
    "empty" and then "gone" for a peer that wrote its frame and left in
    between. Many rounds to give that window a chance."""
    plans = [planners.plan_rings("barrier", 2, r, [[0, 1]], 0, 1) for r in range(2)]
    failures = []
    for i in range(150):
        mesh = Mesh(2, sleepy=sleepy)
        try:
            def leave_after(r):
                st = lib.pc_comm_run(mesh.comms[r], plans[r].ptr, ffi.new("void *[2]"), ffi.new("uint64_t[2]"),
                                     DTYPES["uint8"], OP_CODES["sum"], 1, 0x5eed, 20.0, ffi.new("int32_t *"))
                if r == 1:
                    lib.pc_comm_shutdown(mesh.comms[1])
                return st
            with ThreadPoolExecutor(2) as ex:
                statuses = list(ex.map(leave_after, [0, 1]))
            if statuses != [lib.PC_OK, lib.PC_OK]:
                failures.append((i, statuses, ffi.string(lib.pc_comm_last_error(mesh.comms[0])).decode()))
        finally:
            mesh.close()
    assert not failures, failures[:3]


def _rank_with_transport(rank, world, port, transport, conn):
    try:
        comm = pycoll.init(rank=rank, world_size=world, master_addr="127.0.0.1", master_port=port, timeout=30,
                           join_timeout=8, transport=transport)
        with comm:
            conn.send(("ok", comm.peer_transports))
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        conn.send(("error", f"{type(exc).__name__}: {exc}"))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("modes", [["shm", "tcp"], ["tcp", "shm"]])
def test_shm_and_tcp_on_one_host_is_refused_at_the_join(modes):
    """One peer requires shared memory, a same-host peer refuses it: the
    coordinator refuses the second to join with an error naming both
    settings, instead of a group that silently runs TCP or blames a healthy
    peer. No rank runs a collective."""
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    port = pycoll.testing.free_port()
    pipes, procs = [], []
    for rank, mode in enumerate(modes):
        parent, child = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_rank_with_transport, args=(rank, 2, port, mode, child))
        p.start()
        child.close()
        pipes.append(parent)
        procs.append(p)
        time.sleep(0.5)  # rank 0 hosts the coordinator
    try:
        results = []
        for parent in pipes:
            assert parent.poll(60), "a rank did not finish"
            results.append(parent.recv())
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    assert all(status == "error" for status, _ in results), results
    assert any("conflicts with member" in text and "transport=shm" in text and "transport=tcp" in text
               for _, text in results), results


def _huge_kb(addr):
    """AnonHugePages (kB) of the mapping of this process that holds addr."""
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and head == "AnonHugePages:":
                return int(line.split()[1])
    return 0


def _all_reduce_on_small_pages(comm):
    # a bytearray's memory comes from malloc's own mmap: 4 KiB pages (NumPy would ask for huge ones)
    buf = np.frombuffer(bytearray(10 << 20), np.float32)
    huge, exact = [_huge_kb(buf.ctypes.data)], True
    for _ in range(3):  # a buffer used again, as DDP's buckets are
        buf[:] = comm.rank + 1
        comm.all_reduce(buf)
        exact &= bool(np.all(buf == sum(r + 1 for r in range(comm.world_size))))
        huge.append(_huge_kb(buf.ctypes.data))
    return huge, exact, comm.bytes_single_copy, comm.peer_transports, _in_shared_buffer(buf.ctypes.data + buf.nbytes // 2)


def _in_shared_buffer(addr):
    """Whether addr lies in a shared buffer's mapping (core/shared_buffers.h)."""
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(v, 16) for v in line.split()[0].split("-"))
            if lo <= addr < hi:
                return "memfd:pycoll-shared-" in line and line.split()[1].endswith("s")
    return False


def _thp_madvise():
    """THP granted only where asked for ("[madvise]", this machine and CI): plain anonymous memory
    starts on small pages, and MADV_COLLAPSE works. ("[always]" would give the test's buffers huge
    pages at their first touch, "[never]" would refuse the collapse.)"""
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
        return "[madvise]" in f.read()


@pytest.mark.timeout(120)
def test_single_copy_buffers_are_moved_to_huge_pages():
    """A peer's process_vm_readv pins the sender's pages one by one: over 4 KiB pages a 28 MiB
    all-reduce took 16-35 ms, over huge pages 5 ms. So the engine collapses the 2 MiB-aligned
    interior of a single-copy buffer that is used again into huge pages (MADV_COLLAPSE): a torch
    bucket, whose allocator never asks for them, ends up on huge pages, its contents intact.
    Not at once: the first call may be the buffer's only one; the second collapses it. Found
    still on them at the third, the buffer is proven reused and moves on to shared memory
    (core/shared_buffers.h), where peers need no pinning at all."""
    for huge, exact, copied, transports, shared in _huge_page_run(_all_reduce_on_small_pages):
        assert exact and copied > 0, (copied, transports)
        if _thp_madvise():
            assert huge[0] == huge[1] == 0, huge  # before, and after the first call
            assert huge[2] >= 4 * 2048, huge  # 10 MiB hold four aligned 2 MiB pages
            if lib.pc_shared_buffers_available():
                assert shared and huge[3] == 0, huge  # moved onto (small-paged) shared memory
            else:
                assert not shared and huge[3] == huge[2], huge


def _libc():
    """libc with mmap and mprotect typed: the tests below place buffers on mappings of their own."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def _compact_memory():
    """Ask the kernel to compact memory (root only; harmless): for the tests that need a free
    2 MiB page, which the suite's other worker may have fragmented away (the host's state, not
    what they are about)."""
    try:
        with open("/proc/sys/vm/compact_memory", "w") as f:
            f.write("1")
    except OSError:
        pass


_RW, _ANON = 0x3, 0x02 | 0x20  # PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS
_MAP_FIXED = 0x10


def _float_view(addr, nbytes):
    import ctypes
    return np.frombuffer((ctypes.c_char * nbytes).from_address(addr), np.float32)


def _all_reduce_exact(comm, buf):
    """All-reduce rank + 1 in buf; whether every element came back as the sum."""
    buf[:] = comm.rank + 1
    comm.all_reduce(buf)
    return bool(np.all(buf == sum(r + 1 for r in range(comm.world_size))))


def _huge_page_run(job, args=(), sizes=lambda result: result[0], attempts=3):
    """pycoll.testing.run(job, 2 ranks), run again (after asking the kernel to compact memory) while
    a rank saw a buffer only partly on huge pages (``sizes(result)``: its AnonHugePages readings,
    kB): a collapse the kernel could not finish, for want of a free 2 MiB page at that moment (the
    suite's other worker fragments memory; seen once: 3 of a buffer's 4 pages), which also stops
    collapses for a while. That is the host's state, not what these tests are about; a rule that
    is wrong shows on every attempt. Every call goes single-copy (single_copy_adapt off): these
    tests count collapses call by call, and only a single-copy run collapses its buffers."""
    for _ in range(attempts):
        results = pycoll.testing.run(job, 2, args=args, timeout=30, init_kwargs={"single_copy_adapt": False})
        if not any(0 < kb < 4 * 2048 for result in results for kb in sizes(result)):
            break
        _compact_memory()
    return results


def _huge_pages_alone():
    """In a rank: no buffer moves on to shared memory (core/shared_buffers.h), which a buffer
    proven reused otherwise does, leaving huge pages: the tests that call this judge the
    huge-page policy by its pages alone."""
    lib.pc_shared_buffers_enable(0)


def _all_reduce_on_pages_mapped_anew(comm, phases):
    """All-reduces of one 10 MiB range: for each entry of ``phases``, fresh small pages are mapped at
    the same address (what malloc does for a tensor freed and allocated again) and used that many
    times. The range's AnonHugePages after each call, and whether every result was exact."""
    _huge_pages_alone()
    libc, n = _libc(), 10 << 20
    addr = libc.mmap(None, n, _RW, _ANON, -1, 0)
    buf = _float_view(addr, n)
    huge, exact = [], True
    for calls in phases:
        assert libc.mmap(addr, n, _RW, _ANON | _MAP_FIXED, -1, 0) == addr  # new pages, same address
        for _ in range(calls):
            exact &= _all_reduce_exact(comm, buf)
            huge.append(_huge_kb(addr))
    return huge, exact


@pytest.mark.timeout(120)
def test_memory_allocated_anew_each_call_is_not_collapsed():
    """A buffer allocated for each call (a fresh tensor per all-reduce) never pays back a collapse,
    which copies every page (70-100 ms a call at 28 MiB where the call itself takes 11-13): the
    engine collapses a range the second time it sees it; finding new small pages there at the
    third, it leaves that address alone for 16 runs, so the 3rd, 4th and 5th calls' pages stay small."""
    for huge, exact in _huge_page_run(_all_reduce_on_pages_mapped_anew, ((1, 1, 1, 1, 1),)):
        assert exact
        if _thp_madvise():
            assert huge[0] == 0 and huge[1] >= 4 * 2048, huge  # seen, then collapsed
            assert huge[2:] == [0, 0, 0], huge  # not again: new memory each call stays on small pages


def _pagemap_scan_works():
    """Whether this kernel answers PAGEMAP_SCAN (Linux 6.7), which the engine asks whether a
    buffer it collapsed is still on huge pages."""
    import ctypes
    import fcntl

    class _Arg(ctypes.Structure):
        _fields_ = [(name, ctypes.c_uint64) for name in (
            "size flags start end walk_end vec vec_len max_pages category_inverted category_mask "
            "category_anyof_mask return_mask").split()]
    page = ctypes.create_string_buffer(4096)
    arg = _Arg(size=ctypes.sizeof(_Arg), start=ctypes.addressof(page) & ~4095,
               end=(ctypes.addressof(page) & ~4095) + 4096, return_mask=1 << 6)
    request = (3 << 30) | (ctypes.sizeof(_Arg) << 16) | (ord("f") << 8) | 16  # _IOWR('f', 16, ...)
    try:
        with open("/proc/self/pagemap", "rb") as f:
            fcntl.ioctl(f.fileno(), request, arg)
        return True
    except OSError:
        return False


def _buffers_used_twice_then_again(comm, n_buffers):
    """n_buffers 10 MiB buffers (mappings of their own: small pages), each all-reduced twice in a
    row; then each all-reduced once more. The AnonHugePages of each after the first pass and after
    the second, and whether every result was exact."""
    _huge_pages_alone()
    libc, n = _libc(), 10 << 20
    bufs = []
    for _ in range(n_buffers):  # each its own mapping, a guard page after it (or the kernel merges them)
        addr = libc.mmap(None, n + 4096, _RW, _ANON, -1, 0)
        assert libc.mprotect(addr + n, 4096, 0) == 0
        bufs.append(_float_view(addr, n))
    exact = all([_all_reduce_exact(comm, buf) & _all_reduce_exact(comm, buf) for buf in bufs])  # used twice
    first = [_huge_kb(b.ctypes.data) for b in bufs]
    exact &= all([_all_reduce_exact(comm, buf) for buf in bufs])
    return first, [_huge_kb(b.ctypes.data) for b in bufs], exact


@pytest.mark.timeout(120)
def test_collapses_not_yet_paid_back_are_bounded():
    """A collapse copies every page; what a buffer that is never seen again cost is bounded: at
    most 8 collapses are out before one of them is seen again, still on huge pages (a buffer used
    again). So of 12 buffers each used twice, 8 are collapsed at their second call and 4 wait;
    the third pass sees the 8 again (their credits come back) and collapses the other 4."""
    for first, second, exact in _huge_page_run(_buffers_used_twice_then_again, (12,), lambda r: r[0] + r[1]):
        assert exact
        if _thp_madvise():
            collapsed = [kb >= 4 * 2048 for kb in first]
            assert collapsed == [True] * 8 + [False] * 4, first
            assert all(kb >= 4 * 2048 for kb in second), second


@pytest.mark.timeout(120)
def test_new_memory_where_a_kept_buffer_was_is_judged_again():
    """A buffer that proved it is used again, then freed, and a new one allocated at its address
    (malloc's heap reuses addresses): the new one may be used again too, so it is collapsed at its
    second call. Where that happens once more (new memory at the address every time), the address
    is left alone (for 16 runs: see the next test). 3 calls, then new pages and 2 calls, twice.
    Without PAGEMAP_SCAN (kernels before 6.7) the engine cannot see that the memory changed, and
    an address is collapsed once, ever."""
    scan = _pagemap_scan_works()
    for huge, exact in _huge_page_run(_all_reduce_on_pages_mapped_anew, ((3, 2, 2),)):
        assert exact
        if _thp_madvise():
            big = [kb >= 4 * 2048 for kb in huge]
            assert big[:3] == [False, True, True], huge  # seen, collapsed, kept
            if scan:
                assert big[3:5] == [False, True], huge  # new memory: seen, collapsed again
            else:
                assert big[3:5] == [False, False], huge
            assert big[5:] == [False, False], huge  # new memory again


@pytest.mark.timeout(120)
def test_an_address_found_replaced_is_tried_again_after_a_backoff():
    """An address where new memory was found is left alone for 16 runs, not for good: a buffer
    that stays may come to live there later (DDP's buckets where its start-up broadcasts' fresh
    tensors were). So a buffer kept at such an address is collapsed at the first call after the
    backoff (the 19th run: the replacement was found at the 3rd), and stays on huge pages. 2 calls,
    then new pages kept for 19 calls."""
    scan = _pagemap_scan_works()
    for huge, exact in _huge_page_run(_all_reduce_on_pages_mapped_anew, ((2, 19),)):
        assert exact
        if _thp_madvise():
            big = [kb >= 4 * 2048 for kb in huge]
            assert big[:2] == [False, True], huge  # seen, collapsed
            assert not any(big[2:18]), huge  # new memory found at the 3rd run, then the backoff
            if scan:
                assert all(big[18:]), huge  # tried again at the 19th, and kept
            else:
                assert not any(big[18:]), huge  # without PAGEMAP_SCAN: collapsed once, ever
