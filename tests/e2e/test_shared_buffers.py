"""Shared buffers (core/shared_buffers.h): a caller's buffer that comes back run after run is
moved onto shared memory that same-host peers map, and read there with plain loads. These
tests check the results bit for bit against NumPy, that the moves and mapped reads happen, and
the hazards of moving a caller's memory: memory freed and replaced under a moved range, and a
forked child."""
import ctypes
import mmap
import os

import numpy as np
import pytest

from pycoll.core.native import ffi, lib
from pycoll.plan import planners
from test_shm import Mesh, RING_MIN


def _stats():
    moved, dropped, live = ffi.new("uint64_t *"), ffi.new("uint64_t *"), ffi.new("int32_t *")
    lib.pc_shared_buffers_stats(moved, dropped, live)
    return int(moved[0]), int(dropped[0]), int(live[0])


def _thp_madvise():
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


# Moves follow the huge-page policy's proof that a buffer is reused (found on huge pages in two
# runs); a host without transparent huge pages or PROCMAP_QUERY (Linux 6.11) never moves.
needs_moves = pytest.mark.skipif(not (_thp_madvise() and lib.pc_shared_buffers_available()),
                                 reason="no transparent huge pages or no PROCMAP_QUERY on this host")


def _allpairs_want(inputs):
    """Chunk p of an allpairs all-reduce is reduced at its owner p as x_p + x_{p+1} + ... ."""
    n = len(inputs)
    want = np.empty_like(inputs[0])
    bounds = np.array_split(np.arange(want.size), n)
    for p in range(n):
        lo, hi = bounds[p][0], bounds[p][-1] + 1
        acc = inputs[p][lo:hi].copy()
        for k in range(1, n):
            acc += inputs[(p + k) % n][lo:hi]
        want[lo:hi] = acc
    return want


def _run(mesh, bufs, count):
    n = mesh.n
    plans = [planners.plan_allpairs("all_reduce", n, r, count, 4, segment_bytes=1 << 19) for r in range(n)]
    statuses = mesh.run(plans, [[b, b] for b in bufs], "float32", "sum")
    assert statuses == [lib.PC_OK] * n, [ffi.string(lib.pc_comm_last_error(c)) for c in mesh.comms]


def _mesh(n):
    mesh = Mesh(n, ring=4 * RING_MIN, single_copy=1)
    for c in mesh.comms:
        lib.pc_comm_probe_single_copy(c)
        lib.pc_comm_set_single_copy_adapt(c, 0)  # always single copy: the path under test
    return mesh


def _fill(bufs, call):
    rng = np.random.default_rng(call)
    for r, b in enumerate(bufs):
        b[:] = rng.standard_normal(b.size, dtype=np.float32) * (r + 1)


@needs_moves
@pytest.mark.timeout(120)
@pytest.mark.parametrize("n", [2, 4])
def test_reused_buffers_move_and_are_reduced_where_they_lie(n):
    """In-place allpairs all-reduces of the same buffers, new values each call: from the second
    call on the buffers lie in shared memory and the peers reduce (and gather) straight out of
    their mappings; every call is bit-exact."""
    count = (6 << 20) // 4 + 3
    mesh = _mesh(n)
    try:
        bufs = [np.empty(count, np.float32) for _ in range(n)]
        moved0, _, _ = _stats()
        for call in range(4):
            _fill(bufs, call)
            want = _allpairs_want([b.copy() for b in bufs])
            _run(mesh, bufs, count)
            for r in range(n):
                assert bufs[r].tobytes() == want.tobytes(), f"call {call}, rank {r}"
        moved, _, live = _stats()
        assert moved - moved0 == n and live >= n
        read = [lib.pc_comm_bytes_from_shared(c) for c in mesh.comms]
        assert all(x > 0 for x in read), read
    finally:
        mesh.close()


libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
MAP_FIXED, MADV_HUGEPAGE = 0x10, 14


def _mapped_array(nbytes, at=None):
    """A float32 array on its own anonymous mapping (at `at`: replacing what is there)."""
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | (MAP_FIXED if at else 0)
    addr = libc.mmap(at, nbytes, mmap.PROT_READ | mmap.PROT_WRITE, flags, -1, 0)
    assert addr not in (None, ctypes.c_void_p(-1).value)
    libc.madvise(addr, nbytes, MADV_HUGEPAGE)
    buf = (ctypes.c_float * (nbytes // 4)).from_address(addr)
    return addr, np.frombuffer(buf, np.float32)


@needs_moves
@pytest.mark.timeout(120)
def test_memory_replaced_under_a_moved_buffer_is_never_read_stale():
    """After rank 0's buffer moved, its range is given new memory at the same address (what a
    free and a new allocation of the same size do): the next run notices (the mapping there is
    no longer ours), drops the move, and reads the new bytes; bit-exact every call."""
    n, nbytes = 2, 8 << 20
    count = nbytes // 4
    mesh = _mesh(n)
    maps = [_mapped_array(nbytes) for _ in range(n)]
    try:
        bufs = [a for _, a in maps]
        for call in range(3):
            _fill(bufs, call)
            want = _allpairs_want([b.copy() for b in bufs])
            _run(mesh, bufs, count)
            assert all(b.tobytes() == want.tobytes() for b in bufs)
        _, dropped0, _ = _stats()
        addr = maps[0][0]
        maps[0] = _mapped_array(nbytes, at=addr)  # new private memory over the moved range
        bufs = [a for _, a in maps]
        for call in range(3, 5):
            _fill(bufs, call)
            want = _allpairs_want([b.copy() for b in bufs])
            _run(mesh, bufs, count)
            assert all(b.tobytes() == want.tobytes() for b in bufs), f"call {call}"
        _, dropped, _ = _stats()
        assert dropped - dropped0 >= 1
    finally:
        mesh.close()
        for addr, _ in maps:
            libc.munmap(addr, nbytes)


@needs_moves
@pytest.mark.timeout(120)
def test_a_forked_child_does_not_share_a_moved_buffer():
    """A child forked after a move (a data loader) sees the buffer's bytes as they were, and its
    writes stay its own: the fork handler maps moved ranges privately in the child."""
    n, count = 2, (6 << 20) // 4
    mesh = _mesh(n)
    try:
        bufs = [np.empty(count, np.float32) for _ in range(n)]
        for call in range(3):
            _fill(bufs, call)
            _run(mesh, bufs, count)
        assert _stats()[2] >= n
        before = bufs[0].copy()
        pid = os.fork()
        if pid == 0:  # the child: checks what it sees, then writes over all of it
            ok = bufs[0].tobytes() == before.tobytes()
            bufs[0][:] = -1.0
            os._exit(0 if ok else 3)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "the child saw other bytes"
        assert bufs[0].tobytes() == before.tobytes(), "the child's writes reached the parent"
        _fill(bufs, 9)  # and the moved buffers still work after the fork
        want = _allpairs_want([b.copy() for b in bufs])
        _run(mesh, bufs, count)
        assert all(b.tobytes() == want.tobytes() for b in bufs)
    finally:
        mesh.close()
