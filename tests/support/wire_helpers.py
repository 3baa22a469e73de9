"""In-process helpers for the security and fuzz tests: C communicators over
socket pairs, valid frame streams, and a tampering relay between two ranks."""
import selectors
import socket
import struct
import threading

import numpy as np

from pycoll.plan import planners
from pycoll.core.native import ffi, lib

HDR = struct.Struct("<IHHIIQQ")  # magic, version, kind, tag, desc, seq, len
MAGIC = 0x4C4F4350
DESC = 0x5EED1234
SEQ = 7
COLLS = ("all_reduce", "all_gather", "reduce_scatter", "broadcast")
COUNTS = (0, 1, 3, 16, 100, 257)
SEGMENTS = (64, 256, 1 << 20)


def header(tag, length, *, magic=MAGIC, version=None, kind=1, desc=DESC, seq=SEQ):
    return HDR.pack(magic, lib.PC_VERSION if version is None else version, kind, tag, desc, seq, length)


def plan(coll, n, rank, count, segment, itemsize=4):
    preserve = coll in ("all_reduce", "broadcast")
    return planners.plan_rings(coll, n, rank, [list(range(n))], count, itemsize, segment_bytes=segment,
                               preserve=preserve)


def valid_stream(coll, count, segment, src=1, dst=0, n=2):
    """The bytes rank ``src`` sends rank ``dst`` for this collective (payload arbitrary)."""
    out = bytearray()
    for op in plan(coll, n, src, count, segment).ops():
        if op["kind"] == lib.PC_OP_SEND and op["peer"] == dst:
            out += header(op["tag"], op["len"])
            out += bytes((i * 13 + 5) & 0xFF for i in range(op["len"]))
    return bytes(out)


def frame_offsets(stream):
    """Where each frame header of a valid stream starts."""
    out, at = [], 0
    while at + 32 <= len(stream):
        out.append(at)
        at += 32 + HDR.unpack_from(stream, at)[6]
    return out


def make_comm(rank, n, fds):
    """A pc_comm owning ``fds`` (n entries, -1 for self)."""
    out = ffi.new("pc_comm **")
    arr = ffi.new("int32_t[]", list(fds))
    st = lib.pc_comm_create(rank, n, 1, arr, 0, out)
    assert st == lib.PC_OK, st
    return ffi.gc(out[0], lambda c: (lib.pc_comm_shutdown(c), lib.pc_comm_free(c)))


def buffers(coll, p, count, rank, dtype=np.float32):
    """(in array, out array) sized for plan ``p``; in-place collectives share one."""
    es = np.dtype(dtype).itemsize
    if coll in ("all_reduce", "broadcast"):
        n_in = max(p.need_bytes(0), p.need_bytes(1), count * es) // es
        a = np.arange(n_in, dtype=dtype) * 3 + rank + 1
        return a, a
    n_in = max(p.need_bytes(0) // es, 1)
    n_out = max(p.need_bytes(1) // es, 1)
    return np.arange(n_in, dtype=dtype) + 10 * rank + 1, np.zeros(n_out, dtype=dtype)


def run(comm, p, inb, outb, *, dtype_code=None, op=None, seq=SEQ, desc=DESC, timeout=5.0):
    """Run plan ``p``; returns (status, failed peer, last error)."""
    dtype_code = lib.PC_F32 if dtype_code is None else dtype_code
    op = lib.PC_SUM if op is None else op
    bufs = ffi.new("void *[2]", [ffi.cast("void *", inb.ctypes.data), ffi.cast("void *", outb.ctypes.data)])
    sizes = ffi.new("uint64_t[2]", [inb.nbytes, outb.nbytes])
    failed = ffi.new("int32_t *")
    st = lib.pc_comm_run(comm, p.ptr, bufs, sizes, dtype_code, op, seq, desc, timeout, failed)
    return st, int(failed[0]), ffi.string(lib.pc_comm_last_error(comm)).decode(errors="replace")


def feed_rank0(coll, count, segment, stream, timeout=5.0):
    """Rank 0 of 2 runs ``coll`` while ``stream`` is all that rank 1 sent.
    Returns (status, failed peer, error, input intact)."""
    p = plan(coll, 2, 0, count, segment)
    a, b = socket.socketpair()
    for s in (a, b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    try:
        b.sendall(stream)
        b.shutdown(socket.SHUT_WR)
        comm = make_comm(0, 2, [-1, a.detach()])
        inb, outb = buffers(coll, p, count, 0)
        before = inb.copy()
        st, failed, err = run(comm, p, inb, outb, timeout=timeout)
        return st, failed, err, bool(np.array_equal(inb, before))
    finally:
        a.close()
        b.close()


class Relay:
    """Forwards bytes between rank 0 and rank 1 over two socket pairs, and
    tampers with what rank 1 sends rank 0: ``patch`` {stream offset: byte}
    rewrites bytes, ``cut_at`` closes both sides once that many bytes went
    through, ``hold_at`` stops forwarding from there on (a stalled peer)."""

    def __init__(self, patch=None, cut_at=None, hold_at=None):
        self.r0, self.a = socket.socketpair()
        self.b, self.r1 = socket.socketpair()
        self.patch = dict(patch or {})
        self.cut_at, self.hold_at = cut_at, hold_at
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def fds(self):
        """(rank 0's fd, rank 1's fd); both now owned by the caller."""
        return self.r0.detach(), self.r1.detach()

    def start(self):
        self.thread.start()
        return self

    def _forward_from_rank1(self, data, offset):
        data = bytearray(data)
        for at, val in self.patch.items():
            if offset <= at < offset + len(data):
                data[at - offset] = val
        for limit in (self.cut_at, self.hold_at):
            if limit is not None and offset + len(data) > limit:
                data = data[:max(0, limit - offset)]
        return bytes(data)

    def _loop(self):
        sel = selectors.DefaultSelector()
        sel.register(self.a, selectors.EVENT_READ)
        sel.register(self.b, selectors.EVENT_READ)
        offset = 0
        try:
            while not self.stop.is_set():
                for key, _ in sel.select(0.05):
                    data = key.fileobj.recv(1 << 16)
                    if not data:
                        return
                    if key.fileobj is self.a:  # rank 0 -> rank 1: untouched
                        self.b.sendall(data)
                        continue
                    out = self._forward_from_rank1(data, offset)
                    offset += len(data)
                    self.a.sendall(out)
                    if self.cut_at is not None and offset >= self.cut_at:
                        return
        except OSError:
            pass
        finally:
            sel.close()
            self.a.close()
            self.b.close()

    def close(self):
        self.stop.set()
        self.thread.join(timeout=5)


def run_pair(comms, plans, bufs, timeout=5.0):
    """Run both ranks at once (threads; the C call releases the GIL).
    ``timeout``: seconds, or one per rank."""
    results = [None, None]
    timeouts = timeout if isinstance(timeout, (list, tuple)) else (timeout, timeout)
    timeout = max(timeouts)

    def go(r):
        results[r] = run(comms[r], plans[r], bufs[r][0], bufs[r][1], timeout=timeouts[r])
    threads = [threading.Thread(target=go, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 10)
    return results
