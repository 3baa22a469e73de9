"""The C core's 64-bit hash (pycoll.h: ``pc_hash64``, ``pc_hash64_many``) over arrays and addresses.

Computed with the GIL released, on several threads for large inputs; the value does not depend on
the thread count. Agreed collectives (``verify=True``, :mod:`pycoll.comm.agreement`) digest their
results with it and :mod:`pycoll.comm.shared_state` compares peers' states with it, so every peer must
use the same :data:`SEED`.
"""
from pycoll.core.native import ffi, lib, status_error
from pycoll.core.buffers import as_buffer

__all__ = ["SEED", "BLOCK", "hash_address", "hash_arrays", "fold"]

SEED = 0x70636F6C6C  # any fixed value: every peer must use the same
BLOCK = lib.PC_HASH_BLOCK  # the hash digests blocks of this many bytes, then folds them in order


def blocks(nbytes):
    """How many block digests a buffer of ``nbytes`` bytes has."""
    return -(-nbytes // BLOCK)


def fold(digests, nbytes):
    """The hash of ``nbytes`` bytes from their block digests (a cffi ``uint64_t *``, in order):
    what a receiver that hashed the blocks as they landed compares with the sender's hash."""
    out = ffi.new("uint64_t *")
    st = lib.pc_hash64_fold(digests, nbytes, SEED, out)
    if st != lib.PC_OK:
        raise status_error(st, "hashing failed")
    return int(out[0])


def hash_address(address, nbytes, threads=0):
    """64-bit hash of ``nbytes`` bytes at ``address`` (GIL released)."""
    out = ffi.new("uint64_t *")
    st = lib.pc_hash64(ffi.cast("void *", address), nbytes, SEED, out) if threads == 1 else \
        lib.pc_hash64_many(ffi.new("void *[1]", [ffi.cast("void *", address)]), ffi.new("uint64_t[1]", [nbytes]),
                           1, SEED, threads, out)
    if st != lib.PC_OK:
        raise status_error(st, "hashing failed")
    return int(out[0])


def hash_arrays(arrays, threads=0):
    """Hashes of several arrays (NumPy or torch CPU, contiguous), in one C
    call: blocks of all arrays are spread over ``threads`` threads (0 = one
    per CPU). The value does not depend on the thread count."""
    bufs = [as_buffer(a, writable=False, what="hashed array") for a in arrays]
    return hash_buffers(bufs, threads)


def hash_buffers(bufs, threads=0):
    """Hashes of several :func:`pycoll.core.buffers.as_buffer` buffers, in one C call."""
    n = len(bufs)
    if n == 0:
        return []
    ptrs = ffi.new("void *[]", [ffi.cast("void *", b.address) for b in bufs])
    lens = ffi.new("uint64_t[]", [b.nbytes for b in bufs])
    out = ffi.new("uint64_t[]", n)
    st = lib.pc_hash64_many(ptrs, lens, n, SEED, threads, out)
    if st != lib.PC_OK:
        raise status_error(st, "hashing failed")
    return [int(out[i]) for i in range(n)]
