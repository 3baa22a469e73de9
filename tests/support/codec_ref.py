"""NumPy mirrors of the wire codecs (csrc/kernels/codec.c), bit for bit, and codec
objects for tests/support/plansim.py: numeric (real bytes) and symbolic (frames)."""
import numpy as np

from reference import bf16_to_f32, f32_to_bf16

NAMES = ("fp16", "bf16", "int8")
BLOCK = 256
_F32 = np.float32


def nbytes(codec, count):
    if codec == "int8":
        return count + 8 * ((count + BLOCK - 1) // BLOCK)
    return count * (4 if codec == "none" else 2)


def _int8_block(x):
    if not np.all(np.isfinite(x)):
        return np.array([np.nan, np.nan], _F32).tobytes() + bytes(x.size)
    lo = x[np.argmin(x)] + _F32(0.0)
    hi = x[np.argmax(x)] + _F32(0.0)
    rng = np.float64(hi) - np.float64(lo)
    step = _F32(rng / 255.0)
    if np.float64(step) * 255.0 < rng:  # round up: 255 steps must span the block
        step = np.nextafter(step, _F32(np.inf))
    with np.errstate(over="ignore"):
        def decodes_finitely(s):
            return np.isfinite(_F32(255.0) * s) and np.isfinite(lo + _F32(255.0) * s)

        # decoding must not overflow: the largest float step <= this one whose code 255 decodes
        # finitely (found directly: stepping one float at a time could take millions of steps)
        if not decodes_finitely(step):
            start = step
            bound = (float(np.finfo(_F32).max) - max(float(lo), 0.0)) / 255.0
            step = min(step, _F32(bound))
            while step > 0 and not decodes_finitely(step):
                step = np.nextafter(step, _F32(0))
            while step < start and decodes_finitely(np.nextafter(step, _F32(np.inf))):
                step = np.nextafter(step, _F32(np.inf))
    if step == 0:
        q = np.zeros(x.size, np.uint8)
    elif step >= np.finfo(_F32).tiny and rng <= 1e38:
        inv = _F32(1.0) / step
        t = (x - lo) * inv + _F32(0.5)
        q = np.minimum(t, _F32(255.0)).astype(np.uint8)
    else:
        inv = 1.0 / np.float64(step)
        t = (x.astype(np.float64) - np.float64(lo)) * inv + 0.5
        q = np.minimum(t, 255.0).astype(np.uint8)
    return np.array([lo, step], _F32).tobytes() + q.tobytes()


def encode(x, codec):
    """bytes on the wire for the float32 array x."""
    x = np.ascontiguousarray(x, dtype=_F32)
    if codec == "none":
        return x.tobytes()
    if codec == "fp16":
        with np.errstate(over="ignore"):
            return x.astype(np.float16).tobytes()
    if codec == "bf16":
        return f32_to_bf16(x).tobytes()
    if codec == "int8":
        return b"".join(_int8_block(x[b:b + BLOCK]) for b in range(0, x.size, BLOCK))
    raise ValueError(codec)


def decode(data, codec, count):
    if codec == "none":
        return np.frombuffer(data, _F32, count).copy()
    if codec == "fp16":
        return np.frombuffer(data, np.float16, count).astype(_F32)
    if codec == "bf16":
        return bf16_to_f32(np.frombuffer(data, np.uint16, count))
    out = np.empty(count, _F32)
    pos = 0
    for b in range(0, count, BLOCK):
        n = min(BLOCK, count - b)
        lo, step = np.frombuffer(data, _F32, 2, pos)
        q = np.frombuffer(data, np.uint8, n, pos + 8)
        with np.errstate(over="ignore", invalid="ignore"):
            out[b:b + n] = lo + q.astype(_F32) * step
        pos += 8 + n
    return out


class NumericCodec:
    """For plansim.simulate over float32 arrays: payloads are real bytes."""

    def __init__(self, name):
        self.name = name

    def nbytes(self, count):
        return nbytes(self.name, count)

    def encode(self, values, frame_id):
        return np.frombuffer(encode(values, self.name), np.uint8)

    def decode(self, payload, count):
        return decode(payload.tobytes(), self.name, count)


class SymbolicCodec:
    """For the symbolic verifier: an encoded frame remembers who made it; a
    decoded element is ("q", frame, index, expression), so two ranks hold
    the same bits only if their values come from the same bytes."""

    def __init__(self, name):
        self.name = name

    def nbytes(self, count):
        return nbytes(self.name, count)

    def encode(self, values, frame_id):
        return Frame(frame_id, list(values))

    def decode(self, frame, count):
        assert len(frame.values) == count, "decoding a frame of a different length"
        out = np.empty(count, dtype=object)
        for i, v in enumerate(frame.values):
            out[i] = ("q", frame.fid, i, v)
        return out


class Frame:
    def __init__(self, fid, values):
        self.fid = fid
        self.values = values

    def __len__(self):
        return len(self.values)
