"""Element types and reduction ops: names, NumPy/torch types, C constants.

The tables are built from the C core's own enum constants, so they cannot
drift from csrc/include/pycoll.h.
"""
import numpy as np

from pycoll.core.native import lib
from pycoll.errors import InvalidArgument

#: pycoll dtype name -> C constant
DTYPES = {
    "float16": lib.PC_F16, "bfloat16": lib.PC_BF16, "float32": lib.PC_F32, "float64": lib.PC_F64,
    "int8": lib.PC_I8, "int16": lib.PC_I16, "int32": lib.PC_I32, "int64": lib.PC_I64,
    "uint8": lib.PC_U8, "uint16": lib.PC_U16, "uint32": lib.PC_U32, "uint64": lib.PC_U64,
    "bool": lib.PC_BOOL,
}
_ALIASES = {"f16": "float16", "half": "float16", "bf16": "bfloat16", "f32": "float32",
            "float": "float32", "f64": "float64", "double": "float64"}

#: op name -> C constant
OPS = {"sum": lib.PC_SUM, "prod": lib.PC_PROD, "min": lib.PC_MIN, "max": lib.PC_MAX, "avg": lib.PC_AVG,
       "band": lib.PC_BAND, "bor": lib.PC_BOR, "bxor": lib.PC_BXOR}
#: ops defined on integer and bool dtypes only
BITWISE_OPS = ("band", "bor", "bxor")

ITEMSIZE = {name: lib.pc_dtype_size(code) for name, code in DTYPES.items()}


_NAME_CACHE = {}


def dtype_name(dtype):
    """Normalise a NumPy dtype, torch dtype or string to a pycoll dtype name."""
    try:
        return _NAME_CACHE[dtype]
    except (KeyError, TypeError):
        pass
    name = _dtype_name(dtype)
    try:
        _NAME_CACHE[dtype] = name
    except TypeError:  # unhashable: fine, just not cached
        pass
    return name


def _dtype_name(dtype):
    if isinstance(dtype, str):
        name = _ALIASES.get(dtype, dtype)
    else:
        name = str(dtype).replace("torch.", "")
        if name not in DTYPES:
            try:
                name = np.dtype(dtype).name
            except TypeError:
                pass
        name = _ALIASES.get(name, name)
    if name not in DTYPES:
        raise InvalidArgument(f"unsupported dtype {dtype!r}; supported: {', '.join(DTYPES)}")
    return name


def op_code(op):
    """C constant for an op name (or a torch ReduceOp-like object with a name)."""
    code = OPS.get(op) if isinstance(op, str) else None
    if code is not None:
        return code
    if not isinstance(op, str):
        op = getattr(op, "name", str(op)).lower()
        op = {"product": "prod", "average": "avg"}.get(op, op)
    op = {"bitwise_and": "band", "bitwise_or": "bor", "bitwise_xor": "bxor"}.get(op.lower(), op)
    code = OPS.get(op.lower())
    if code is None:
        raise InvalidArgument(f"unsupported op {op!r}; supported: {', '.join(OPS)}")
    return code


_CODE_NAMES = {code: name for name, code in DTYPES.items()}
_OP_NAMES = {code: name for name, code in OPS.items()}


def check_op(dtype_code, opc):
    """Raise InvalidArgument unless the C kernels define op ``opc`` on ``dtype_code`` (the
    bitwise ops on integers and bool only; avg not on bool)."""
    if lib.pc_reduce_check(dtype_code, opc) != lib.PC_OK:
        raise InvalidArgument(f"op {_OP_NAMES.get(opc, opc)!r} is not defined on {_CODE_NAMES.get(dtype_code, dtype_code)}"
                              f" (band, bor and bxor take integer and bool dtypes; avg is not defined on bool)")
