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

import pycoll
import pycoll.testing

from pycoll.core.native import ffi, lib
from pycoll.plan import planners
from test_shm import Mesh, RING_MIN, _compact_memory, _in_shared_buffer, _libc


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


def _calls(mesh, bufs, count, calls):
    """`calls` in-place all-reduces of bufs, new values each call, each checked bit for bit."""
    for call in calls:
        _fill(bufs, call)
        want = _allpairs_want([b.copy() for b in bufs])
        _run(mesh, bufs, count)
        for r, b in enumerate(bufs):
            assert b.tobytes() == want.tobytes(), f"call {call}, rank {r}"


def _until_moved(n, make, count, calls=range(4)):
    """A mesh and buffers (``make()``: the buffers and how to free them) after ``calls`` whose
    buffers lie in shared memory, every rank's (its peers read out of their mappings): up to
    three attempts (compacting memory between them: the proof of reuse needs huge pages, which the
    suite's other worker may have fragmented away; a rule that is wrong shows on every attempt)."""
    for attempt in range(3):
        mesh, (bufs, free) = _mesh(n), make()
        try:
            _calls(mesh, bufs, count, calls)
        except BaseException:
            mesh.close()
            free()
            raise
        if all(_in_shared_memory(b) for b in bufs) and all(lib.pc_comm_bytes_from_shared(c) > 0
                                                           for c in mesh.comms):
            return mesh, bufs, free
        mesh.close()
        free()
        _compact_memory()
    raise AssertionError(f"the buffers of {n} ranks did not move in 3 attempts")


def _in_shared_memory(buf):
    """The middle of buf lies in a shared buffer's shared mapping (core/shared_buffers.h)."""
    return _in_shared_buffer(buf.ctypes.data + buf.nbytes // 2)


def _numpy_bufs(n, count):
    return lambda: ([np.empty(count, np.float32) for _ in range(n)], lambda: None)


@needs_moves
@pytest.mark.timeout(120)
@pytest.mark.parametrize("n", [2, 4])
def test_reused_buffers_move_and_are_reduced_where_they_lie(n):
    """In-place allpairs all-reduces of the same buffers, new values each call: from the third
    call on (the huge-page policy's proof of reuse) the buffers lie in shared memory and the peers
    reduce (and gather) straight out of their mappings; every call is bit-exact."""
    count = (6 << 20) // 4 + 3
    mesh, bufs, free = _until_moved(n, _numpy_bufs(n, count), count)
    try:
        _calls(mesh, bufs, count, range(4, 6))
        assert all(_in_shared_memory(b) for b in bufs)  # (a move of memory reused may hold several)
        read = [lib.pc_comm_bytes_from_shared(c) for c in mesh.comms]
        assert all(x > 0 for x in read), read
    finally:
        mesh.close()


libc = _libc()
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
    maps = []

    def make():
        maps[:] = [_mapped_array(nbytes) for _ in range(n)]
        return [a for _, a in maps], lambda: [libc.munmap(addr, nbytes) for addr, _ in maps]
    mesh, bufs, free = _until_moved(n, make, count)
    try:
        _, dropped0, _ = _stats()
        addr = maps[0][0]
        maps[0] = _mapped_array(nbytes, at=addr)  # new private memory over the moved range
        _calls(mesh, [a for _, a in maps], count, range(4, 6))
        assert _stats()[1] - dropped0 >= 1
    finally:
        mesh.close()
        free()


def _shared_fds():
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if "memfd:pycoll-shared-" in target:
            out.add(target)
    return out


@needs_moves
@pytest.mark.timeout(120)
def test_memory_freed_to_the_kernel_lets_its_move_go():
    """A move lasts while its memory is ours: once the buffers are unmapped, the next comm's
    creation or free drops their moves, and with them the memfds (no fd, no mapping left)."""
    n, nbytes = 2, 8 << 20
    maps = []
    before = _shared_fds()

    def make():
        maps[:] = [_mapped_array(nbytes) for _ in range(n)]
        return [a for _, a in maps], lambda: [libc.munmap(addr, nbytes) for addr, _ in maps]
    mesh, bufs, free = _until_moved(n, make, nbytes // 4)
    ours = {t.split("memfd:")[1].split(" ")[0] for t in _shared_fds() - before}  # pycoll-shared-<gen>
    assert len(ours) >= n
    mesh.close()
    free()
    Mesh(2, ring=4 * RING_MIN).close()  # a comm's creation and free look at every move
    with open("/proc/self/maps") as f:
        left = [t for t in list(_shared_fds()) + f.read().splitlines() if any(f"{g} " in t for g in ours)]
    assert left == []


@needs_moves
@pytest.mark.timeout(120)
def test_a_forked_child_does_not_share_a_moved_buffer():
    """A child forked after a move (a data loader) sees the buffer's bytes as they were, and its
    writes stay its own: the fork handler maps moved ranges privately in the child."""
    n, count = 2, (6 << 20) // 4
    mesh, bufs, free = _until_moved(n, _numpy_bufs(n, count), count)
    try:
        before = bufs[0].copy()
        pid = os.fork()
        if pid == 0:  # the child: checks what it sees, then writes over all of it
            ok = bufs[0].tobytes() == before.tobytes()
            bufs[0][:] = -1.0
            os._exit(0 if ok else 3)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "the child saw other bytes"
        assert bufs[0].tobytes() == before.tobytes(), "the child's writes reached the parent"
        _calls(mesh, bufs, count, [9])  # and the moved buffers still work after the fork
    finally:
        mesh.close()


def _moved_then_a_peer_dies(comm):
    """Every rank: in-place all-reduces without preserve_input (the torch backend's setting) of one
    buffer, so that it moves and peers read it through their mappings, until a peer dies; then the
    survivors' next all-reduce."""
    x = np.empty(6 << 20 >> 2, np.float32)
    read = 0
    for call in range(100):
        x[:] = comm.rank + 1 + call
        try:
            comm.all_reduce(x, algorithm="allpairs")
        except pycoll.PeerFailure:
            break
        if not (x == sum(r + 1 + call for r in range(comm.world_size))).all():
            return "wrong result"
        read = comm.bytes_from_shared
    else:
        return "no failure"
    y = np.ones(1 << 20, np.float32)
    comm.all_reduce(y, algorithm="allpairs")
    return read > 0, comm.world_size, float(y[0]), float(y[-1])


@needs_moves
@pytest.mark.timeout(150)
def test_a_peer_killed_while_its_moved_buffer_is_read():
    """The rank whose moved buffer its peers map is SIGKILLed in the middle of an all-reduce, after
    its buffer moved (the sixth call): every survivor raises PeerFailure (our mapping keeps the
    dead rank's pages, and the read is not acknowledged as done: the peer is gone), and the
    survivors' next all-reduce is right."""
    for attempt in range(3):
        res = pycoll.testing.run(_moved_then_a_peer_dies, 3, timeout=120, kill={2: ("during:all_reduce", 6)},
                                 init_kwargs={"timeout": 30, "heartbeat_timeout": 3.0, "transport": "shm",
                                              "preserve_input": False, "single_copy_adapt": False})
        if all(r[0] for r in res[:2]) or attempt == 2:
            break
        _compact_memory()  # no move: the host had no huge page to give
    assert res[2] == pycoll.testing.KILLED
    assert res[:2] == [(True, 2, 2.0, 2.0)] * 2
