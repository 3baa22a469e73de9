"""Turning NumPy arrays and torch CPU tensors into (pointer, size, dtype)
without copying.

A copy is never made: arrays must be C-contiguous, and outputs writeable.
bfloat16 works from torch tensors, from NumPy arrays of ml_dtypes.bfloat16,
or from a uint16/int16 array with ``dtype="bfloat16"`` given explicitly.
"""
from dataclasses import dataclass

import numpy as np

from ._native import ffi
from .dtypes import DTYPES, ITEMSIZE, dtype_name
from .errors import InvalidArgument


@dataclass
class Buffer:
    """A view of caller memory handed to the C core."""

    address: int
    nbytes: int
    count: int
    dtype: str
    owner: object  # keeps the memory alive while C uses it

    @property
    def code(self):
        return DTYPES[self.dtype]


def _is_torch(x):
    return type(x).__module__.startswith("torch") and hasattr(x, "data_ptr")


def as_buffer(x, *, writable, what="buffer", dtype=None):
    """Describe ``x`` for the C core; raises InvalidArgument with the reason."""
    if _is_torch(x):
        if x.device.type != "cpu":
            raise InvalidArgument(f"{what}: only CPU tensors are supported (got {x.device})")
        if not x.is_contiguous():
            raise InvalidArgument(f"{what}: tensor is not contiguous; call .contiguous() first")
        name = dtype_name(dtype or x.dtype)
        if ITEMSIZE[name] != x.element_size():
            raise InvalidArgument(f"{what}: dtype {name} does not match tensor element size")
        return Buffer(x.data_ptr(), x.numel() * x.element_size(), x.numel(), name, x)
    if not isinstance(x, np.ndarray):
        raise InvalidArgument(f"{what}: expected a NumPy array or torch CPU tensor, got {type(x).__name__}")
    if not x.flags.c_contiguous:
        raise InvalidArgument(f"{what}: array is not C-contiguous; use np.ascontiguousarray first")
    if writable and not x.flags.writeable:
        raise InvalidArgument(f"{what}: array is read-only")
    name = dtype_name(dtype or x.dtype)
    if ITEMSIZE[name] != x.itemsize:
        raise InvalidArgument(f"{what}: dtype {name} does not match the array's item size {x.itemsize}")
    return Buffer(_address(x), x.nbytes, x.size, name, x)


def _address(x):
    try:  # ~3x cheaper than __array_interface__, which builds a dict per call
        return int(ffi.cast("uintptr_t", ffi.from_buffer(x)))
    except (TypeError, ValueError, BufferError):  # dtypes the buffer protocol cannot describe
        return x.__array_interface__["data"][0]
