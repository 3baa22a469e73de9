"""NumPy mirrors of the C reduction semantics (see csrc/kernels/reduce.c), so tests
can compute expected results bit for bit."""
import numpy as np

INT_DTYPES = ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"]
FLOAT_DTYPES = ["float16", "bfloat16", "float32", "float64"]
ALL_DTYPES = FLOAT_DTYPES + INT_DTYPES
OPS = ["sum", "prod", "min", "max", "avg"]


def storage_dtype(name):
    """NumPy dtype that holds the bits (bf16 lives in uint16)."""
    return np.dtype(np.uint16) if name == "bfloat16" else np.dtype(name)


def bf16_to_f32(u16):
    return (u16.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(f):
    u = np.ascontiguousarray(f, dtype=np.float32).view(np.uint32)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(nan, ((u >> 16) | 0x40).astype(np.uint16), rounded)


def _binop(op):
    return {"sum": np.add, "avg": np.add, "prod": np.multiply, "min": np.minimum, "max": np.maximum}[op]


def reduce_fn(dtype, op):
    """f(a, b) -> a (op) b with pycoll's semantics, on storage arrays."""
    f = _binop(op)
    if dtype == "bfloat16":
        return lambda a, b: f32_to_bf16(f(bf16_to_f32(a), bf16_to_f32(b)))
    if dtype in INT_DTYPES:
        def wrap(a, b):
            with np.errstate(over="ignore"):
                return f(a, b).astype(a.dtype)
        return wrap
    return lambda a, b: f(a, b).astype(a.dtype)


def scale_fn(dtype, op, n):
    """The final division of avg (None for other ops)."""
    if op != "avg":
        return None
    if dtype == "bfloat16":
        return lambda a: f32_to_bf16(bf16_to_f32(a) / np.float32(n))
    if dtype in INT_DTYPES:
        def trunc_div(a):
            wide = a.astype(np.int64) if np.dtype(dtype).kind == "i" else a.astype(np.uint64)
            q = wide // n
            if np.dtype(dtype).kind == "i":
                q = q + ((wide % n != 0) & (wide < 0))
            return q.astype(a.dtype)
        return trunc_div
    return lambda a: (a / np.dtype(dtype).type(n)).astype(a.dtype)


def make_input(dtype, op, count, rank, seed):
    """Deterministic test data for one rank: small values so products and
    sums stay meaningful, never -0.0 (min/max ties between +-0 are
    implementation-defined in NumPy's SIMD loops)."""
    rng = np.random.default_rng([seed, rank])
    if dtype in INT_DTYPES:
        info = np.iinfo(dtype)
        if op == "prod":
            vals = rng.integers(1, 4, count)
        else:
            vals = rng.integers(max(info.min, -100), min(info.max, 100) + 1, count)
        return vals.astype(dtype)
    vals = rng.integers(-8, 9, count).astype(np.float64) / 4.0 + 0.25  # never exactly 0
    if op == "prod":
        vals = rng.uniform(0.5, 1.5, count)
    if dtype == "bfloat16":
        return f32_to_bf16(vals.astype(np.float32))
    return vals.astype(dtype)


def binomial_order(n, root, v=0):
    """The grouping a binomial-tree reduce (csrc/plan/plan_binomial.c) combines ranks in: a
    rank, or a pair (left, right) for left (op) right. Node v (relative to the root) folds its
    children v+1, v+2, v+4, ... into its own value, left to right."""
    span = n if v == 0 else v & -v
    expr, d = (v + root) % n, 1
    while d < span and v + d < n:
        expr = (expr, binomial_order(n, root, v + d))
        d *= 2
    return expr


def fold_order(order, value, op):
    """Evaluates a :func:`binomial_order` grouping: ``value(rank)`` at the leaves, ``op`` at the pairs."""
    if isinstance(order, tuple):
        return op(fold_order(order[0], value, op), fold_order(order[1], value, op))
    return value(order)
