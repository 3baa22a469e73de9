"""Compression on the wire: codecs bit for bit against NumPy, their error
bounds, compressed plans verified symbolically (every rank the same bits,
every rank's data exactly once, no races), and real multi-process runs
against a reference that executes the same compressed plans in NumPy."""
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, example, given, settings, strategies as st

import pycoll.testing
from codec_ref import NAMES, NumericCodec, SymbolicCodec, decode as ref_decode, encode as ref_encode
from plansim import IN, OUT, SCRATCH, check_plan_races, leaves, quantised, simulate, sym_array, sym_reduce, sym_scale
from pycoll.plan import compression
from pycoll.plan import planners
from pycoll.comm.communicator import DEFAULT_SEGMENT
from pycoll.errors import InvalidArgument
from reference import reduce_fn, scale_fn

F32 = np.float32
FLT_MAX = float(np.finfo(F32).max)
U = {"fp16": 2.0 ** -11, "bf16": 2.0 ** -8}


# ---- codecs ---------------------------------------------------------------
def finite_f32(lo=-3e38, hi=3e38):
    return st.floats(float(F32(lo)), float(F32(hi)), width=32, allow_nan=False, allow_infinity=False)


arrays = st.one_of(
    st.lists(finite_f32(), min_size=0, max_size=700),
    st.lists(finite_f32(-1e3, 1e3), min_size=1, max_size=700),
    st.lists(finite_f32(-1e-30, 1e-30), min_size=1, max_size=300),  # tiny ranges
    st.lists(st.sampled_from([0.0, 1.0, -2.5, np.inf, -np.inf, np.nan, 65504.0, 65520.0, 1e-8, 3e38]),
             min_size=1, max_size=600),
)


@settings(max_examples=150, deadline=None)
@given(values=arrays, codec=st.sampled_from(NAMES))
# A block spanning most of the float range: its step must shrink by millions of floats before code
# 255 decodes finitely (encoding once stepped there one float at a time: minutes in the reference).
@example(values=[2.2975092e38, 30.0, -2.7565498e38, 1.1, -7.0158875e16, 1.0964497e38], codec="int8")
def test_codec_matches_numpy_bit_for_bit(values, codec):
    x = np.array(values, F32)
    data = compression.encode(x, codec)
    assert data == ref_encode(x, codec)
    assert len(data) == compression.encoded_bytes(codec, x.size)
    got = compression.decode(data, codec, x.size)
    assert got.tobytes() == ref_decode(data, codec, x.size).tobytes()


def rel_bound(x, codec):
    if codec == "fp16":
        return np.maximum(U["fp16"] * np.abs(x), 2.0 ** -25)
    return np.maximum(U["bf16"] * np.abs(x), 2.0 ** -134)


@settings(max_examples=150, deadline=None)
@given(values=arrays, codec=st.sampled_from(NAMES))
def test_codec_error_bounds(values, codec):
    x = np.array(values, F32)
    y = compression.decode(compression.encode(x, codec), codec, x.size).astype(np.float64)
    xd = x.astype(np.float64)
    if codec == "int8":
        for b in range(0, x.size, 256):
            blk, got = xd[b:b + 256], y[b:b + 256]
            if not np.all(np.isfinite(blk)):
                assert np.all(np.isnan(got)), "a block with inf/NaN decodes to NaN"
                continue
            lo, hi = blk.min(), blk.max()
            bound = (hi - lo) / 510 * (1 + 2 ** -10) + 2 ** -22 * max(abs(lo), abs(hi)) + 2 ** -149
            bound += max(0.0, hi - lo - FLT_MAX) * (1 + 2 ** -10)  # a range float32 cannot hold
            assert np.all(np.abs(got - blk) <= bound)
        return
    nan = np.isnan(xd)
    assert np.all(np.isnan(y[nan]))
    inf = np.isinf(xd)
    assert np.all(y[inf] == xd[inf])
    fin = ~nan & ~inf
    if codec == "fp16":
        over = np.abs(xd) > 65504
        assert np.all(np.isinf(y[fin & over]) | (np.abs(y[fin & over]) == 65504))
        fin &= ~over
    err = np.abs(y[fin] - xd[fin])
    assert np.all(err <= rel_bound(xd[fin], codec))


def test_int8_constant_block_is_exact_and_layout():
    x = np.full(300, 7.25, F32)
    data = compression.encode(x, "int8")
    assert len(data) == 300 + 2 * 8
    lo, step = np.frombuffer(data[:8], F32)
    assert lo == 7.25 and step == 0
    assert compression.decode(data, "int8", 300).tolist() == x.tolist()


def test_unknown_codec_is_rejected():
    with pytest.raises(InvalidArgument):
        compression.codec_name("zstd")
    with pytest.raises(InvalidArgument):
        compression.decode(b"\0" * 3, "bf16", 2)


# ---- compressed plans, symbolically ---------------------------------------
def ring_plans(coll, n, count, codec, rings=None, **kw):
    rings = rings or [list(range(n))]
    return [compression.compress(planners.plan_rings(coll, n, r, rings, count, 4, **kw), codec) for r in range(n)]


def run_symbolic(coll, n, count, codec, inplace=True, avg=False, **kw):
    plans = ring_plans(coll, n, count, codec, avg=avg, **kw)
    for r, p in enumerate(plans):
        check_plan_races(p.ops(), p.tail_first, SymbolicCodec(codec), aliased=inplace and coll == "all_reduce",
                         rank=r)
    bufs = []
    for r, p in enumerate(plans):
        if coll == "all_reduce":
            data = sym_array(r, count)
            ins, out = data, (data if inplace else np.empty(count, dtype=object))
        elif coll == "all_gather":
            ins, out = sym_array(r, count), np.empty(n * count, dtype=object)
        else:
            ins, out = sym_array(r, n * count), np.empty(count, dtype=object)
        bufs.append([ins, out, np.empty(p.need_bytes(SCRATCH) // 4, dtype=object)])
    simulate(plans, bufs, 4, sym_reduce, sym_scale if avg else None, codec=SymbolicCodec(codec))
    return plans, bufs


WORLDS = [1, 2, 3, 4, 5, 7, 8, 12, 16]


@pytest.mark.parametrize("codec", NAMES)
@pytest.mark.parametrize("n", WORLDS)
@pytest.mark.parametrize("preserve", [False, True])
@pytest.mark.parametrize("avg", [False, True])
def test_compressed_all_reduce_plans(codec, n, preserve, avg):
    count = 3 * n + 2
    plans, bufs = run_symbolic("all_reduce", n, count, codec, avg=avg, segment_bytes=8, preserve=preserve)
    for i in range(count):
        exprs = {repr(bufs[r][OUT][i]) for r in range(n)}
        assert len(exprs) == 1, f"element {i}: ranks hold different bits"
        e = bufs[0][OUT][i]
        assert sorted(leaves(e)) == [(r, i) for r in range(n)]
        if n > 1:
            assert e[0] == "q", "every rank holds the decoded bytes of one encoding"
            assert quantised(e) <= n, "one encoding per hop at most"
    if n > 1:
        wire = [op for p in plans for op in p.ops() if op["kind"] in (0, 1, 2)]
        assert all(op["kind"] != 2 for op in wire), "receives land in scratch; reduction is local"


@pytest.mark.parametrize("codec", NAMES)
@pytest.mark.parametrize("n", WORLDS)
def test_compressed_all_gather_plans(codec, n):
    count = 5
    plans, bufs = run_symbolic("all_gather", n, count, codec, segment_bytes=8)
    for i in range(n * count):
        assert len({repr(bufs[r][OUT][i]) for r in range(n)}) == 1, f"element {i}: ranks differ"
    for r in range(n):
        assert [leaves(e)[0] for e in bufs[r][OUT]] == [(q, i) for q in range(n) for i in range(count)]
        if n > 1:
            assert all(quantised(e) == 1 for e in bufs[r][OUT]), "encoded once at the source"


@pytest.mark.parametrize("codec", NAMES)
@pytest.mark.parametrize("n", WORLDS)
@pytest.mark.parametrize("avg", [False, True])
def test_compressed_reduce_scatter_plans(codec, n, avg):
    count = 4
    plans, bufs = run_symbolic("reduce_scatter", n, count, codec, inplace=False, avg=avg, segment_bytes=8)
    for r in range(n):
        for i in range(count):
            assert sorted(leaves(bufs[r][OUT][i])) == [(q, r * count + i) for q in range(n)]
        assert list(bufs[r][IN]) == list(sym_array(r, n * count))


@pytest.mark.parametrize("codec", ["bf16", "int8"])
@pytest.mark.parametrize("n", [2, 3, 5, 8])
@pytest.mark.parametrize("stripes", [1, 2, 3, 8])
def test_compressed_multi_ring_and_stripes(codec, n, stripes):
    rng = np.random.default_rng(n)
    rings = [list(range(n)), list(rng.permutation(n))]
    count = 11 * n + 3
    for coll in ("all_reduce", "all_gather"):
        plans, bufs = run_symbolic(coll, n, count, codec, rings=rings, segment_bytes=24, stripes=stripes,
                                   preserve=True)
        for i in range(len(bufs[0][OUT])):
            assert len({repr(bufs[r][OUT][i]) for r in range(n)}) == 1


def test_compress_rejects_compressed_and_odd_plans():
    p = planners.plan_rings("all_reduce", 2, 0, [[0, 1]], 10, 4)
    c = compression.compress(p, "bf16")
    assert c.codec == compression.CODECS["bf16"] and p.codec == 0
    with pytest.raises(InvalidArgument):
        compression.compress(c, "int8")
    with pytest.raises(InvalidArgument):  # 2-byte elements: not float32 ranges
        compression.compress(planners.plan_rings("all_reduce", 2, 0, [[0, 1]], 11, 2), "bf16")
    single = compression.compress(planners.plan_rings("all_reduce", 1, 0, [[0]], 10, 4), "int8")
    assert single.codec == 0, "nothing on the wire: nothing to encode"


# ---- numeric error of a compressed all-reduce -----------------------------
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(n=st.integers(2, 9), count=st.integers(1, 300), codec=st.sampled_from(["fp16", "bf16"]),
       seed=st.integers(0, 2 ** 16), scale=st.sampled_from([1e-3, 1.0, 100.0]))
def test_all_reduce_sum_error_bound(n, count, codec, seed, scale):
    rng = np.random.default_rng(seed)
    xs = [(rng.standard_normal(count) * scale).astype(F32) for _ in range(n)]
    plans = ring_plans("all_reduce", n, count, codec, segment_bytes=64)
    bufs = []
    for r, p in enumerate(plans):
        data = xs[r].copy()
        bufs.append([data, data, np.zeros(p.need_bytes(SCRATCH) // 4, F32)])
    simulate(plans, bufs, 4, reduce_fn("float32", "sum"), codec=NumericCodec(codec))
    exact = np.sum([x.astype(np.float64) for x in xs], axis=0)
    mag = np.sum([np.abs(x.astype(np.float64)) for x in xs], axis=0)
    bound = n * (U[codec] + 2.0 ** -24) * mag * (1 + 1e-6) + n * 2.0 ** -25
    for r in range(n):
        assert bufs[r][OUT].tobytes() == bufs[0][OUT].tobytes()
        assert np.all(np.abs(bufs[r][OUT] - exact) <= bound)


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(n=st.integers(2, 6), count=st.integers(1, 1000), seed=st.integers(0, 2 ** 16))
def test_all_reduce_int8_error_bound(n, count, seed):
    """int8: each hop adds at most its block's range / 510 (plus rounding);
    a partial sum's range is at most the sum of the inputs' ranges."""
    rng = np.random.default_rng(seed)
    xs = [rng.uniform(-1, 1, count).astype(F32) for _ in range(n)]
    plans = ring_plans("all_reduce", n, count, "int8", segment_bytes=1024)
    bufs = []
    for r, p in enumerate(plans):
        data = xs[r].copy()
        bufs.append([data, data, np.zeros(p.need_bytes(SCRATCH) // 4, F32)])
    simulate(plans, bufs, 4, reduce_fn("float32", "sum"), codec=NumericCodec("int8"))
    exact = np.sum([x.astype(np.float64) for x in xs], axis=0)
    # partial sums stay within [-(k+err), k+err] for k inputs in [-1, 1]
    bound = sum(2 * (k + 1) / 510 * 1.01 + 2 ** -21 * (k + 1) for k in range(1, n + 1))
    assert np.max(np.abs(bufs[0][OUT] - exact)) <= bound
    assert all(bufs[r][OUT].tobytes() == bufs[0][OUT].tobytes() for r in range(n))


# ---- real processes ---------------------------------------------------------
def _rank_cases(comm, cases, algorithm="ring"):
    out = []
    for coll, codec, op, count, seed in cases:
        n, r = comm.world_size, comm.rank
        rng = np.random.default_rng([seed, r])
        if coll == "all_reduce":
            x = rng.standard_normal(count).astype(F32)
            comm.all_reduce(x, op=op, algorithm=algorithm, compression=codec)
            out.append(x.tobytes())
        elif coll == "all_gather":
            x = rng.standard_normal(count).astype(F32)
            y = np.zeros(n * count, F32)
            comm.all_gather(x, y, algorithm="ring", compression=codec)
            out.append(y.tobytes())
        elif coll == "all_gather_in_place":  # the send block is this rank's block of recv
            y = np.zeros(n * count, F32)
            y[r * count:(r + 1) * count] = rng.standard_normal(count).astype(F32)
            comm.all_gather(y[r * count:(r + 1) * count], y, algorithm="ring", compression=codec)
            out.append(y.tobytes())
        else:
            x = rng.standard_normal(n * count).astype(F32)
            y = np.zeros(count, F32)
            comm.reduce_scatter(x, y, op=op, algorithm="ring", compression=codec)
            out.append(y.tobytes())
    return out


def expected_bytes(case, n, stripes, segment=DEFAULT_SEGMENT, preserve=True, algorithm="ring"):
    coll, codec, op, count, seed = case
    coll = "all_gather" if coll == "all_gather_in_place" else coll
    if algorithm == "direct" and coll == "all_reduce":
        plans = [compression.compress(planners.plan_direct(coll, n, r, count, 4, stripes=stripes, preserve=preserve,
                                                           avg=op == "avg"), codec) for r in range(n)]
    else:
        plans = [compression.compress(planners.plan_rings(coll, n, r, [list(range(n))], count, 4,
                                                          segment_bytes=segment, stripes=stripes,
                                                          preserve=preserve and coll == "all_reduce",
                                                          avg=op == "avg"), codec) for r in range(n)]
    bufs = []
    for r, p in enumerate(plans):
        rng = np.random.default_rng([seed, r])
        scratch = np.zeros(p.need_bytes(SCRATCH) // 4 + 1, F32)
        if coll == "all_reduce":
            x = rng.standard_normal(count).astype(F32)
            bufs.append([x, x, scratch])
        elif coll == "all_gather":
            bufs.append([rng.standard_normal(count).astype(F32), np.zeros(n * count, F32), scratch])
        else:
            bufs.append([rng.standard_normal(n * count).astype(F32), np.zeros(count, F32), scratch])
    simulate(plans, bufs, 4, reduce_fn("float32", op), scale_fn("float32", op, n), codec=NumericCodec(codec))
    return [b[OUT].tobytes() for b in bufs]


def check_cases(cases, n, stripes=1, algorithm="ring", **init_kwargs):
    results = pycoll.testing.run(_rank_cases, n, args=(cases, algorithm), timeout=150,
                                 init_kwargs={"timeout": 60, "stripes": stripes, **init_kwargs})
    for i, case in enumerate(cases):
        want = expected_bytes(case, n, stripes, algorithm=algorithm)
        for r in range(n):
            assert results[r][i] == want[r], f"rank {r} differs from the reference for {case}"
        if case[0] != "reduce_scatter":
            assert len({results[r][i] for r in range(n)}) == 1, f"ranks disagree on {case}"


@pytest.mark.timeout(200)
@pytest.mark.parametrize("n", [2, 3])
def test_compressed_collectives_match_reference(n):
    cases = [(c, codec, op, count, 10 * i + j)
             for i, codec in enumerate(NAMES)
             for j, (c, op, count) in enumerate([("all_reduce", "sum", 1000), ("all_reduce", "avg", 77),
                                                 ("all_reduce", "max", 513), ("all_gather", "sum", 300),
                                                 ("all_gather_in_place", "sum", 1000),
                                                 ("reduce_scatter", "sum", 257)])]
    check_cases(cases, n)


@pytest.mark.timeout(200)
@pytest.mark.parametrize("n", [2, 4])
def test_compressed_direct_all_reduce_matches_reference(n):
    """direct reduces every contribution on every rank: each must use what the others received of its
    own data (the decoded bytes), or the ranks would end with different bits."""
    cases = [("all_reduce", codec, op, count, 10 * i + j) for i, codec in enumerate(NAMES)
             for j, (op, count) in enumerate([("sum", 1000), ("avg", 77), ("max", 5)])]
    check_cases(cases, n, algorithm="direct")


@pytest.mark.timeout(200)
def test_compressed_multi_segment_with_stripes():
    # 2.5 MiB: several 1 MiB segments per chunk, spread over 3 connections
    cases = [("all_reduce", "bf16", "sum", (5 << 20) // 8, 1), ("all_reduce", "int8", "sum", (5 << 20) // 8 + 3, 2),
             ("all_gather", "fp16", "sum", (3 << 20) // 4, 3)]
    check_cases(cases, 3, stripes=3)


def _default_and_override(comm):
    x = np.full(1000, 1.0 + 2 ** -12, F32) * (comm.rank + 1)
    a = x.copy()
    comm.all_reduce(a)                      # the communicator's default: bf16
    b = x.copy()
    comm.all_reduce(b, compression="none")  # explicitly plain
    i = np.arange(10, dtype=np.int32)
    comm.all_reduce(i)                      # ints travel plain under a default codec
    try:
        comm.all_reduce(i, compression="int8")
        err = None
    except InvalidArgument as exc:
        err = str(exc)
    return a.tobytes(), b.tobytes(), i.tolist(), err


@pytest.mark.timeout(120)
def test_communicator_default_and_per_call_compression():
    res = pycoll.testing.run(_default_and_override, 2, timeout=90, init_kwargs={"compression": "bf16"})
    for a, b, i, err in res:
        exact = (np.full(1000, 1.0 + 2 ** -12, np.float64) * 3).astype(F32)
        assert np.frombuffer(b, F32).tolist() == exact.tolist()
        got = np.frombuffer(a, F32)
        assert not np.array_equal(got, exact) and np.allclose(got, exact, rtol=2 ** -7)
        assert i == [2 * v for v in range(10)]
        assert err and "float32" in err
    assert res[0][0] == res[1][0]


# ---- every algorithm's plans compress ---------------------------------------
def algorithm_plans(alg, coll, n, count, codec, avg):
    """Compressed plans of ``alg`` as the communicator builds them (ranks on
    hosts of two, so the in-network planner has groups to aggregate)."""
    kw = dict(segment_bytes=16, stripes=2, preserve=coll == "all_reduce", avg=avg)
    if hasattr(planners, "build"):
        from pycoll.plan.layout import Layout
        layout = Layout(n, None, [r // 2 for r in range(n)])
        alg = planners.effective(alg, coll)
        return [compression.compress(planners.build(alg, coll, layout, r, count, 4, **kw), codec) for r in range(n)]
    return [compression.compress(planners.plan_rings(coll, n, r, [list(range(n))], count, 4, **kw), codec)
            for r in range(n)]


@pytest.mark.parametrize("alg", [a for a in planners.ALGORITHMS if a != "auto"])
@pytest.mark.parametrize("n", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("coll", ["all_reduce", "all_gather", "reduce_scatter"])
def test_every_algorithm_compresses(alg, n, coll):
    for codec, avg in (("bf16", False), ("int8", coll != "all_gather")):
        count = 7 * n + 3
        plans = algorithm_plans(alg, coll, n, count, codec, avg)
        bufs = []
        for r, p in enumerate(plans):
            check_plan_races(p.ops(), p.tail_first, SymbolicCodec(codec), aliased=coll == "all_reduce", rank=r)
            scratch = np.empty(p.need_bytes(SCRATCH) // 4, dtype=object)
            if coll == "all_reduce":
                d = sym_array(r, count)
                bufs.append([d, d, scratch])
            elif coll == "all_gather":
                bufs.append([sym_array(r, count), np.empty(n * count, dtype=object), scratch])
            else:
                bufs.append([sym_array(r, n * count), np.empty(count, dtype=object), scratch])
        simulate(plans, bufs, 4, sym_reduce, sym_scale if avg else None, codec=SymbolicCodec(codec))
        for i in range(len(bufs[0][OUT])):
            if coll != "reduce_scatter":
                assert len({repr(bufs[r][OUT][i]) for r in range(n)}) == 1, f"{alg} {codec}: element {i} differs"
            if coll == "all_reduce":
                assert sorted(leaves(bufs[0][OUT][i])) == [(r, i) for r in range(n)]
        if coll == "reduce_scatter":
            for r in range(n):
                assert [sorted(leaves(e)) for e in bufs[r][OUT]] == [[(q, r * count + i) for q in range(n)]
                                                                     for i in range(count)]
