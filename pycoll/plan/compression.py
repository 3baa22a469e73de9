"""Compression on the wire: codec names, and compressing any plan.

Opt-in per communicator (``pycoll.init(..., compression="bf16")``) or per
call (``comm.all_reduce(x, compression="int8")``). It applies to float32
data of all_reduce, all_gather and reduce_scatter; other dtypes and
collectives travel as they are. Every rank still ends with the same bits:
a value is encoded once where it is made, forwarders forward those bytes,
and the maker keeps their decoded form (see csrc/plan/plan_codec.c).

Codecs and their error per encoding (x finite; csrc/kernels/codec.c has the details):

========  =====  =============================================================
name      bytes  error of one round trip
========  =====  =============================================================
``fp16``  2      <= 2^-11 |x| for 2^-14 <= |x| <= 65504, <= 2^-25 below;
                 beyond 65504 a value becomes inf
``bf16``  2      <= 2^-8 |x| (float32's range)
``int8``  ~1.03  <= (hi - lo)/510 * (1 + 2^-10) + 2^-22 max(|lo|, |hi|) + 2^-149 per
                 block of 256 values with minimum lo and maximum hi (plus
                 hi - lo - FLT_MAX if that range exceeds FLT_MAX); a block
                 with inf or NaN becomes NaN
========  =====  =============================================================

A reduction encodes every partial result once per hop, so an all-reduce
over n ranks adds up to n such errors (each relative to the partial sum of
that hop): for a sum, ``|result - exact| <= n * (u + 2^-24) * sum_r |x_r|``
with u = 2^-11 (fp16) or 2^-8 (bf16), plus n * 2^-25 for fp16's
subnormals. tests/e2e/test_compression.py checks these bounds.
"""
from pycoll.core.native import ffi, lib
from pycoll.errors import InvalidArgument

CODECS = {"none": lib.PC_CODEC_NONE, "fp16": lib.PC_CODEC_FP16, "bf16": lib.PC_CODEC_BF16,
          "int8": lib.PC_CODEC_INT8}
_ALIASES = {None: "none", False: "none", "float16": "fp16", "half": "fp16", "bfloat16": "bf16"}
#: collectives that may be compressed
COMPRESSIBLE = ("all_reduce", "all_gather", "reduce_scatter")
INT8_BLOCK = lib.PC_CODEC_INT8_BLOCK


def codec_name(compression):
    """Normalise ``None``/"none"/"fp16"/"bf16"/"int8" (and aliases) to a name."""
    name = _ALIASES.get(compression, compression)
    if not isinstance(name, str) or name.lower() not in CODECS:
        raise InvalidArgument(f"unknown compression {compression!r}; choose one of {', '.join(CODECS)}")
    return name.lower()


def encoded_bytes(codec, count):
    """Bytes on the wire for ``count`` float32 values."""
    return int(lib.pc_codec_bytes(CODECS[codec_name(codec)], count))


def compress(plan, codec):
    """The compressed version of a :class:`pycoll.plan.planners.Plan`."""
    from pycoll.plan.planners import Plan
    code = CODECS[codec_name(codec)]
    if code == lib.PC_CODEC_NONE:
        return plan
    out = ffi.new("pc_plan **")
    st = lib.pc_plan_compress(plan.ptr, code, out)
    if st != lib.PC_OK:
        raise InvalidArgument(f"cannot compress this plan with {codec} (status {st})")
    return Plan(out[0])


def encode(values, codec):
    """Encode a float32 NumPy array the way the wire does (bytes)."""
    import numpy as np
    x = np.ascontiguousarray(values, dtype=np.float32)
    out = bytearray(encoded_bytes(codec, x.size))
    if x.size:
        lib.pc_codec_encode(CODECS[codec_name(codec)], ffi.from_buffer(out), ffi.cast("float *", x.ctypes.data), x.size)
    return bytes(out)


def decode(data, codec, count):
    """Decode ``count`` float32 values encoded with :func:`encode`."""
    import numpy as np
    if len(data) != encoded_bytes(codec, count):
        raise InvalidArgument(f"{len(data)} bytes do not hold {count} values encoded with {codec}")
    out = np.empty(count, np.float32)
    if count:
        lib.pc_codec_decode(CODECS[codec_name(codec)], ffi.cast("float *", out.ctypes.data), ffi.from_buffer(data),
                            count)
    return out
