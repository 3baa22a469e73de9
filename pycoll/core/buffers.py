"""Turning NumPy arrays and torch CPU tensors into (pointer, size, dtype)
without copying.

A copy is never made: arrays must be C-contiguous, and outputs writeable.
bfloat16 works from torch tensors, from NumPy arrays of ml_dtypes.bfloat16,
or from a uint16/int16 array with ``dtype="bfloat16"`` given explicitly.

A Buffer also pins its memory until :meth:`Buffer.release` (the communicator
releases it when the collective finished, async calls included): a NumPy
array cannot be resized meanwhile (NumPy raises ValueError: it refuses to
resize an array that has weak references), and a torch tensor's storage is
kept alive even if the tensor drops it (``set_``, ``.data =``). torch cannot
refuse ``resize_`` on a storage in use; :meth:`Buffer.check` reports a tensor
whose memory moved while the collective ran.
"""
import weakref
from dataclasses import dataclass, field

import numpy as np

from pycoll.core.native import ffi
from pycoll.core.dtypes import DTYPES, ITEMSIZE, dtype_name
from pycoll.errors import InvalidArgument


@dataclass
class Buffer:
    """A view of caller memory handed to the C core."""

    address: int
    nbytes: int
    count: int
    dtype: str
    owner: object  # keeps the memory alive while C uses it
    pin: object = field(default=None, repr=False)  # holds the memory in place until release()
    what: str = "buffer"

    @property
    def code(self):
        return DTYPES[self.dtype]

    def check(self):
        """Raise InvalidArgument if a tensor's memory moved while pinned (torch
        allows ``resize_`` of a storage in use): the result is not in it."""
        x = self.owner
        if self.pin is not None and _is_torch(x) and self.nbytes and (
                x.data_ptr() != self.address or x.untyped_storage().data_ptr() != self.pin.data_ptr()):
            raise InvalidArgument(f"{self.what}: the tensor's storage was resized or replaced while the collective "
                                  "ran; its result is not in the tensor (do not resize_/set_ a tensor until the "
                                  "call finished)")

    def release(self):
        """The collective finished: the caller may resize or drop the memory again."""
        self.pin = None


def _is_torch(x):
    return type(x).__module__.startswith("torch") and hasattr(x, "data_ptr")


def as_buffer(x, *, writable, what="buffer", dtype=None):
    """Describe ``x`` for the C core; raises InvalidArgument with the reason."""
    if _is_torch(x):
        if not x.is_cpu:  # (x.device would build a device object per call)
            raise InvalidArgument(f"{what}: only CPU tensors are supported (got {x.device})")
        if not x.is_contiguous():
            raise InvalidArgument(f"{what}: tensor is not contiguous; call .contiguous() first")
        name = dtype_name(dtype or x.dtype)
        if ITEMSIZE[name] != x.element_size():
            raise InvalidArgument(f"{what}: dtype {name} does not match tensor element size")
        # the storage itself: the tensor may drop it (set_) while C still uses its memory
        return Buffer(x.data_ptr(), x.numel() * x.element_size(), x.numel(), name, x, x.untyped_storage(), what)
    if not isinstance(x, np.ndarray):
        raise InvalidArgument(f"{what}: expected a NumPy array or torch CPU tensor, got {type(x).__name__}")
    if not x.flags.c_contiguous:
        raise InvalidArgument(f"{what}: array is not C-contiguous; use np.ascontiguousarray first")
    if writable and not x.flags.writeable:
        raise InvalidArgument(f"{what}: array is read-only")
    name = dtype_name(dtype or x.dtype)
    if ITEMSIZE[name] != x.itemsize:
        raise InvalidArgument(f"{what}: dtype {name} does not match the array's item size {x.itemsize}")
    # NumPy refuses to resize (reallocate) an array that has weak references, even with
    # refcheck=False (it does not count buffer exports): hold one while C uses the memory.
    return Buffer(_address(x), x.nbytes, x.size, name, x, weakref.ref(x), what)


def _address(x):
    try:  # ~3x cheaper than __array_interface__, which builds a dict per call
        return int(ffi.cast("uintptr_t", ffi.from_buffer(x)))
    except (TypeError, ValueError, BufferError):  # dtypes the buffer protocol cannot describe
        return x.__array_interface__["data"][0]


def byte_view(buf):
    """A writable NumPy uint8 array over a Buffer's memory (no copy), for the local packing
    of coalesced calls and batched point-to-point transfers."""
    if not buf.nbytes:
        return np.empty(0, np.uint8)
    return np.frombuffer(ffi.buffer(ffi.cast("char *", buf.address), buf.nbytes), dtype=np.uint8)


def scratch_like(buf, count):
    """A new NumPy array of ``count`` elements of ``buf``'s item size (a temporary buffer the C
    core can take with ``dtype=buf.dtype``: unsigned integers of that width, as bfloat16 has no
    NumPy type)."""
    return np.empty(count, dtype=_UINT_OF_SIZE[ITEMSIZE[buf.dtype]])


_UINT_OF_SIZE = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
