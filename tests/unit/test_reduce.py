"""The C reduction kernels against NumPy, bit for bit, for every dtype and op."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from pycoll.core.native import ffi, lib
from pycoll.core.dtypes import DTYPES, OPS
from reference import ALL_DTYPES, INT_DTYPES, bf16_to_f32, f32_to_bf16, make_input, reduce_fn, scale_fn, storage_dtype


def c_reduce(a, b, dtype, op):
    out = np.empty_like(a)
    st_ = lib.pc_reduce(ffi.from_buffer(out), ffi.from_buffer(a), ffi.from_buffer(b), a.size, DTYPES[dtype], OPS[op])
    assert st_ == lib.PC_OK
    return out


@settings(max_examples=60, deadline=None)
@given(dtype=st.sampled_from(ALL_DTYPES), op=st.sampled_from(["sum", "prod", "min", "max"]),
       count=st.sampled_from([0, 1, 2, 3, 7, 16, 31, 33, 64, 257, 1000, 4099]), seed=st.integers(0, 2**16))
def test_kernel_matches_numpy(dtype, op, count, seed):
    a = make_input(dtype, op, count, 0, seed)
    b = make_input(dtype, op, count, 1, seed)
    expected = reduce_fn(dtype, op)(a, b)
    assert c_reduce(a, b, dtype, op).tobytes() == expected.tobytes()


@pytest.mark.parametrize("dtype", INT_DTYPES)
def test_integer_sum_and_prod_wrap(dtype):
    info = np.iinfo(dtype)
    a = np.array([info.max, info.min, info.max, 3], dtype=dtype)
    b = np.array([1, -1 if info.min < 0 else 1, info.max, 5], dtype=dtype)
    for op in ("sum", "prod"):
        assert c_reduce(a, b, dtype, op).tobytes() == reduce_fn(dtype, op)(a, b).tobytes()


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_min_max_propagate_nan(dtype):
    a = np.array([np.nan, 1.0, 2.0, np.inf], dtype=dtype)
    b = np.array([1.0, np.nan, -np.inf, 3.0], dtype=dtype)
    for op, f in (("min", np.minimum), ("max", np.maximum)):
        got = c_reduce(a, b, dtype, op)
        np.testing.assert_array_equal(got, f(a, b))


def test_f16_overflow_and_subnormals_round_like_numpy():
    a = np.array([65504, 6e-8, 1e-7, -3e-5, 0.1, 2049, 1 / 3], dtype=np.float16)
    b = np.array([65504, 6e-8, -5e-8, 1e-5, 0.2, 1, 1 / 3], dtype=np.float16)
    assert c_reduce(a, b, "float16", "sum").tobytes() == (a + b).tobytes()
    assert c_reduce(a, b, "float16", "prod").tobytes() == (a * b).tobytes()


def test_bf16_is_f32_rounded_to_nearest_even():
    f = np.array([1.0, 3.0, 1e30, -2.5, 7.0, np.inf], dtype=np.float32)
    a = f32_to_bf16(f)
    b = f32_to_bf16(np.array([2 ** -8, 2 ** -7, 1e30, 2.5, 3 * 2 ** -8, 1.0], dtype=np.float32))
    got = c_reduce(a, b, "bfloat16", "sum")
    assert got.tobytes() == f32_to_bf16(bf16_to_f32(a) + bf16_to_f32(b)).tobytes()
    assert bf16_to_f32(got)[0] == 1.0  # 1 + 2^-8 rounds to even (1.0)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("n", [1, 3, 4, 7])
def test_scale_is_avg_division(dtype, n):
    x = make_input(dtype, "sum", 101, 0, 5)
    got = x.copy()
    assert lib.pc_scale(ffi.from_buffer(got), got.size, DTYPES[dtype], n) == lib.PC_OK
    assert got.tobytes() == scale_fn(dtype, "avg", n)(x).tobytes()


def test_bad_dtype_and_op_are_rejected():
    a = np.zeros(4, np.float32)
    assert lib.pc_reduce(ffi.from_buffer(a), ffi.from_buffer(a), ffi.from_buffer(a), 4, 99, 0) == lib.PC_ERR_ARG
    assert lib.pc_reduce(ffi.from_buffer(a), ffi.from_buffer(a), ffi.from_buffer(a), 4, 2, 99) == lib.PC_ERR_ARG
    assert lib.pc_scale(ffi.from_buffer(a), 4, 2, 0) == lib.PC_ERR_ARG


@pytest.mark.parametrize("dtype", INT_DTYPES)
@pytest.mark.parametrize("op", ["band", "bor", "bxor"])
def test_bitwise_kernels(dtype, op):
    info = np.iinfo(dtype)
    g = np.random.default_rng(3)
    a = g.integers(info.min, int(info.max) + 1, 1001, dtype=np.dtype(dtype))
    b = g.integers(info.min, int(info.max) + 1, 1001, dtype=np.dtype(dtype))
    fn = {"band": np.bitwise_and, "bor": np.bitwise_or, "bxor": np.bitwise_xor}[op]
    assert c_reduce(a, b, dtype, op).tobytes() == fn(a, b).tobytes()


def test_bool_kernels_take_truth_values_and_return_0_or_1():
    a = np.array([0, 1, 2, 0, 255, 7], dtype=np.uint8)  # any non-zero byte is true
    b = np.array([0, 0, 3, 9, 255, 0], dtype=np.uint8)
    ta, tb = a != 0, b != 0
    want = {"sum": ta | tb, "max": ta | tb, "prod": ta & tb, "min": ta & tb, "band": ta & tb, "bor": ta | tb,
            "bxor": ta ^ tb}
    for op, w in want.items():
        assert c_reduce(a, b, "bool", op).tolist() == w.astype(np.uint8).tolist(), op


@pytest.mark.parametrize("dtype,op", [("float32", "band"), ("float64", "bxor"), ("bfloat16", "bor"),
                                      ("float16", "band"), ("bool", "avg")])
def test_undefined_ops_are_refused(dtype, op):
    assert lib.pc_reduce_check(DTYPES[dtype], OPS[op]) == lib.PC_ERR_ARG
    a = np.zeros(4, np.uint8 if dtype == "bool" else storage_dtype(dtype))
    assert lib.pc_reduce(ffi.from_buffer(a), ffi.from_buffer(a), ffi.from_buffer(a), a.size, DTYPES[dtype],
                         OPS[op]) == lib.PC_ERR_ARG
