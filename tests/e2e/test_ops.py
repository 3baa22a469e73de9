"""reduce, gather, scatter, all_to_all (equal and uneven), the coalesced forms, the bitwise ops
and bool, and point-to-point transfers, on real processes over shared memory and TCP.

Every result is compared bit for bit with a NumPy reference (reduce: the rank-order chain
the plan runs, tests/unit/test_plans_exchange.py verifies that order symbolically)."""
import numpy as np
import pytest

import pycoll
from collective_cases import run_on
from reference import (ALL_DTYPES, INT_DTYPES, OPS, binomial_order, fold_order, make_input, reduce_fn, scale_fn,
                       storage_dtype)

BITWISE = ["band", "bor", "bxor"]
BIT_FNS = {"band": np.bitwise_and, "bor": np.bitwise_or, "bxor": np.bitwise_xor}
BOOL_FNS = {"sum": np.logical_or, "max": np.logical_or, "prod": np.logical_and, "min": np.logical_and,
            "band": np.logical_and, "bor": np.logical_or, "bxor": np.logical_xor}


def bits_input(dtype, count, rank, seed):
    rng = np.random.default_rng([seed, rank, 7])
    if dtype == "bool":
        return rng.integers(0, 2, count).astype(bool)
    info = np.iinfo(dtype)
    return rng.integers(info.min, int(info.max) + 1, count, dtype=np.dtype(dtype))


def case_input(case, rank, n):
    kind, dtype, op, count, seed = case[:5]
    if dtype == "bool" or op in BITWISE:
        return bits_input(dtype, count, rank, seed)
    return make_input(dtype, op, count, rank, seed)


def algorithm_of(case):
    """A rooted case's plan: its 7th field, else direct (auto's choice depends on the
    measured cost model, and the two reduce in different orders)."""
    return case[6] if len(case) > 6 else "direct"


def reference_reduce(case, n):
    _, dtype, op, count, seed = case[:5]
    xs = [case_input(case, r, n) for r in range(n)]
    if dtype == "bool":
        f = BOOL_FNS[op]
    elif op in BITWISE:
        f = BIT_FNS[op]
    else:
        f = reduce_fn(dtype, op)
    # the plan's order: rank order (direct, all_reduce), or the binomial tree's grouping
    order = list(range(n))
    if case[0] == "reduce" and algorithm_of(case) == "tree":
        acc = fold_order(binomial_order(n, case[5]), lambda r: xs[r], f)
    else:
        acc = xs[0]
        for r in order[1:]:
            acc = f(acc, xs[r])
    if dtype == "bool":
        return acc.astype(bool)
    if op in BITWISE:
        return acc
    scale = scale_fn(dtype, op, n)
    return scale(acc) if scale is not None and n > 1 else acc


def counts_matrix(n, seed):
    rng = np.random.default_rng([seed, 99])
    return rng.integers(0, 5, (n, n)).tolist()


def _run_cases(comm, cases):
    me, n = comm.rank, comm.world_size
    out = []
    for case in cases:
        kind, dtype = case[0], case[1]
        dt = None if dtype in ("bool",) else dtype
        x = case_input(case, me, n)
        if kind == "reduce":
            root = case[5]
            comm.reduce(x, root=root, op=case[2], dtype=dt, algorithm=algorithm_of(case))
            out.append(x.tobytes() if me == root else None)
        elif kind == "all_reduce":
            comm.all_reduce(x, op=case[2], dtype=dt)
            out.append(x.tobytes())
        elif kind == "gather":
            root = case[5]
            recv = np.zeros(n * x.size, x.dtype) if me == root else None
            comm.gather(x, recv, root=root, dtype=dt, algorithm=algorithm_of(case))
            out.append(recv.tobytes() if me == root else None)
        elif kind == "scatter":
            root, count = case[5], case[3]
            full = case_input((kind, dtype, "sum", n * count, case[4]), root, n)
            recv = np.zeros(count, full.dtype)
            comm.scatter(full if me == root else None, recv, root=root, dtype=dt, algorithm=algorithm_of(case))
            out.append(recv.tobytes())
        elif kind == "all_to_all":
            uneven = case[5]
            if uneven:
                cm = counts_matrix(n, case[4])
                send = case_input((kind, dtype, "sum", sum(cm[me]), case[4]), me, n)
                recv = np.zeros(sum(cm[s][me] for s in range(n)), send.dtype)
                comm.all_to_all(send, recv, cm[me], [cm[s][me] for s in range(n)], dtype=dt,
                                algorithm=algorithm_of(case))
            else:
                send = case_input((kind, dtype, "sum", n * case[3], case[4]), me, n)
                recv = np.zeros_like(send)
                comm.all_to_all(send, recv, dtype=dt, algorithm=algorithm_of(case))
            out.append(recv.tobytes())
    return out


def expected(case, n):
    kind, dtype = case[0], case[1]
    if kind in ("reduce", "all_reduce"):
        want = reference_reduce(case, n).tobytes()
        if kind == "reduce":
            return [want if r == case[5] else None for r in range(n)]
        return [want] * n
    if kind == "gather":
        full = np.concatenate([case_input(case, r, n) for r in range(n)]).tobytes()
        return [full if r == case[5] else None for r in range(n)]
    if kind == "scatter":
        full = case_input((kind, dtype, "sum", n * case[3], case[4]), case[5], n)
        return [full[r * case[3]:(r + 1) * case[3]].tobytes() for r in range(n)]
    if kind == "all_to_all":
        if case[5]:
            cm = counts_matrix(n, case[4])
            sends = [case_input((kind, dtype, "sum", sum(cm[s]), case[4]), s, n) for s in range(n)]
            return [np.concatenate([sends[s][sum(cm[s][:r]):sum(cm[s][:r + 1])] for s in range(n)]).tobytes()
                    for r in range(n)]
        sends = [case_input((kind, dtype, "sum", n * case[3], case[4]), s, n) for s in range(n)]
        c = case[3]
        return [np.concatenate([sends[s][r * c:(r + 1) * c] for s in range(n)]).tobytes() for r in range(n)]
    raise AssertionError(kind)


def check(cases, n, transport, timeout=180):
    results = run_on(_run_cases, n, transport, args=(cases,), timeout=timeout, init_kwargs={"timeout": 60})
    for i, case in enumerate(cases):
        want = expected(case, n)
        for r in range(n):
            assert results[r][i] == want[r], f"rank {r} differs for {case}"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_reduce_every_dtype_and_op(n, transport):
    cases = [("reduce", d, o, 13 + i, i, i % n) for i, (d, o) in enumerate((d, o) for d in ALL_DTYPES for o in OPS)]
    cases += [("reduce", "float32", "sum", (3 << 20) // 4 + 1, 7, n - 1),  # several segments
              ("reduce", "bfloat16", "avg", 100003, 8, 0), ("reduce", "int64", "max", 0, 9, 0)]
    check(cases, n, transport)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_gather_scatter_all_to_all(n, transport):
    cases = []
    for i, d in enumerate(ALL_DTYPES):
        cases += [("gather", d, "sum", 7 + i, i, i % n), ("scatter", d, "sum", 5 + i, i, (i + 1) % n),
                  ("all_to_all", d, "sum", 3 + i, i, False), ("all_to_all", d, "sum", 0, i, True)]
    cases += [("gather", "float32", "sum", 1 << 20, 1, n - 1), ("scatter", "uint8", "sum", (3 << 20) + 1, 2, 0),
              ("all_to_all", "float64", "sum", 1 << 18, 3, False), ("gather", "int8", "sum", 0, 4, 0),
              ("all_to_all", "int16", "sum", 0, 5, False)]
    check(cases, n, transport)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("n", [4, 5])
def test_tree_rooted_collectives_and_staged_all_to_all(n, transport):
    """The binomial-tree plans against NumPy: reduce in the tree's grouping (bit for bit),
    gather and scatter with roots whose subtrees wrap around rank 0; the staged all_to_all."""
    cases = [("reduce", d, o, 11 + i, 70 + i, (i + 1) % n, "tree")
             for i, (d, o) in enumerate(((d, o) for d in ("float32", "float64", "bfloat16", "int32", "float16")
                                         for o in ("sum", "avg", "max", "prod")))]
    cases += [("reduce", "float32", "sum", (3 << 20) // 4 + 1, 90, n - 1, "tree"),  # several segments
              ("reduce", "bool", "bxor", 301, 91, 2, "tree"), ("reduce", "int64", "sum", 0, 92, 0, "tree")]
    for i, root in enumerate(range(n)):
        cases += [("gather", "float32", "sum", 7 + i, 93 + i, root, "tree"),
                  ("scatter", "int16", "sum", 5 + i, 99 + i, root, "tree")]
    cases += [("gather", "uint8", "sum", (1 << 20) + 3, 110, 1, "tree"), ("scatter", "int8", "sum", 0, 111, 3, "tree")]
    cases += [("all_to_all", "float64", "sum", 1 << 17, 112, False, "staged"),
              ("all_to_all", "int32", "sum", 0, 113, True, "staged"),
              ("all_to_all", "bool", "sum", 5, 114, True, "staged")]
    # prod's float inputs round differently in another order: the tree's grouping is checked
    # (the sums of quarters are exact in any order)
    assert any(reference_reduce(c, n).tobytes() != reference_reduce(c[:6], n).tobytes() for c in cases[:20])
    check(cases, n, transport)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("n", [2, 3])
def test_bitwise_ops_and_bool(n, transport):
    cases = [("all_reduce", d, o, 1000 + i, i) for i, (d, o) in enumerate(
        (d, o) for d in INT_DTYPES for o in BITWISE)]
    cases += [(c, "bool", o, 777, 40 + i) + ((i % n,) if c == "reduce" else ())
              for i, (c, o) in enumerate((c, o) for c in ("all_reduce", "reduce")
                                         for o in ["sum", "prod", "min", "max"] + BITWISE)]
    cases += [("reduce", "int32", "bxor", 3001, 60, n - 1), ("gather", "bool", "sum", 9, 61, 0),
              ("all_to_all", "bool", "sum", 4, 62, False)]
    check(cases, n, transport)


def _refused(comm):
    errors = []
    for call in (lambda: comm.all_reduce(np.ones(4, np.float32), op="band"),
                 lambda: comm.reduce(np.ones(4, np.float64), op="bxor"),
                 lambda: comm.all_reduce(np.ones(4, bool), op="avg")):
        try:
            call()
            errors.append(None)
        except pycoll.InvalidArgument as exc:
            errors.append(str(exc))
    x = np.arange(4, dtype=np.int32)
    comm.all_reduce(x, op="bor")  # the group is intact afterwards
    return errors, x.tolist()


@pytest.mark.timeout(120)
def test_bitwise_op_on_floats_is_refused_before_anything_is_sent():
    results = run_on(_refused, 2, "shm")
    for errors, x in results:
        assert all(e is not None and "not defined" in e for e in errors), errors
        assert x == [0, 1, 2, 3]


# ---- coalesced ---------------------------------------------------------------------------------
def _coalesced(comm):
    me, n = comm.rank, comm.world_size
    arrays = [np.arange(c, dtype=np.float32) * (me + 1) for c in (5, 0, 1000, 3)]
    comm.all_reduce_coalesced(arrays)
    sends = [np.full(c, me + 10 * i, np.int64) for i, c in enumerate((3, 0, 7))]
    recvs = [np.zeros(n * s.size, np.int64) for s in sends]
    comm.all_gather_coalesced(sends, recvs)
    rs_sends = [np.arange(n * c, dtype=np.float64) + me for c in (2, 5)]
    rs_recvs = [np.zeros(c, np.float64) for c in (2, 5)]
    comm.reduce_scatter_coalesced(rs_sends, rs_recvs, op="max")
    work = comm.all_reduce_coalesced([np.ones(3, np.int32) * me], async_op=True)
    w = work.wait(timeout=30)
    before = len(comm.stats)
    comm.all_reduce_coalesced([np.ones(10, np.float32) for _ in range(20)])
    calls = len(comm.stats) - before  # one collective for 20 arrays
    return ([a.tolist() for a in arrays], [r.tolist() for r in recvs], [r.tolist() for r in rs_recvs],
            w[0].tolist(), calls)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("n", [2, 3])
def test_coalesced(n, transport):
    results = run_on(_coalesced, n, transport)
    total = sum(range(1, n + 1))
    for r, (arrays, recvs, rs_recvs, w, calls) in enumerate(results):
        assert arrays == [(np.arange(c, dtype=np.float32) * total).tolist() for c in (5, 0, 1000, 3)]
        assert recvs == [[q + 10 * i for q in range(n) for _ in range(c)] for i, c in enumerate((3, 0, 7))]
        assert rs_recvs == [(np.arange(n * c, dtype=np.float64)[r * c:(r + 1) * c] + n - 1).tolist() for c in (2, 5)]
        assert w == [sum(range(n))] * 3
        assert calls == 1


def _count_remaps():
    """In this rank: a list that records, per pycoll.plan.remap.remap call from here on,
    whether the plan was remapped (True) or refused, so the caller packs (False)."""
    import pycoll.plan.remap as remap_mod
    remapped, real = [], remap_mod.remap

    def counting(*args):
        plan = real(*args)
        remapped.append(plan is not None)
        return plan
    remap_mod.remap = counting
    return remapped


def _coalesced_remapped(comm, sizes):
    """The coalesced forms on a communicator without preserve_input: one plan straight over
    the arrays (pycoll.plan.remap) wherever the plan for the total allows it. Each result
    against the same collective over the packed arrays, run with the algorithm the coalesced
    call ran (the same plan, so the same bits)."""
    remapped = _count_remaps()
    me, n = comm.rank, comm.world_size
    rng = np.random.default_rng([me, 11])
    out = {}
    arrays = [rng.standard_normal(c).astype(np.float32) for c in sizes]
    packed = np.concatenate(arrays)
    comm.all_reduce_coalesced(arrays)
    algorithm = comm.stats[-1].algorithm
    comm.all_reduce(packed, algorithm=algorithm)
    out["all_reduce"] = (np.concatenate(arrays).tobytes() == packed.tobytes(), algorithm)
    sends = [rng.standard_normal(c).astype(np.float32) for c in sizes]
    recvs = [np.full(n * c, np.nan, np.float32) for c in sizes]
    comm.all_gather_coalesced(sends, recvs)
    out["all_gather"] = all(np.array_equal(r.reshape(n, -1)[me], s) for r, s in zip(recvs, sends))
    gathered = [r.copy() for r in recvs]
    rs_sends = [rng.standard_normal(n * c).astype(np.float32) for c in sizes]
    rs_recvs = [np.full(c, np.nan, np.float32) for c in sizes]
    comm.reduce_scatter_coalesced(rs_sends, rs_recvs)
    whole = [np.empty(n * c, np.float32) for c in sizes]
    for s, w in zip(rs_sends, whole):
        w[:] = s
        comm.all_reduce(w, algorithm="ring")
    return out, remapped, [g.tobytes() for g in gathered], [r.tolist() for r in rs_recvs], [
        w.reshape(n, -1)[me].tolist() for w in whole], [s.tobytes() for s in sends]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("n", [2, 3])
def test_coalesced_runs_one_plan_over_the_arrays_themselves(n, transport):
    sizes = (5, 70001, 0, 200003, 1)  # ~1 MiB: ring or allpairs; cuts inside segments and chunks
    results = run_on(_coalesced_remapped, n, transport, args=(sizes,), init_kwargs=dict(preserve_input=False))
    for r, (out, remapped, gathered, rs, rs_ref, _) in enumerate(results):
        # all_reduce and all_gather: no packing; reduce_scatter's ring keeps its partial sums in
        # scratch from 3 ranks on and sends them from there: packed (pycoll.plan.remap)
        assert remapped == [True, True, n == 2], remapped
        assert out["all_reduce"][0], f"rank {r}: coalesced all_reduce ({out['all_reduce'][1]}) differs from the packed one"
        assert out["all_gather"]
        np.testing.assert_allclose(np.concatenate([np.asarray(x) for x in rs]),
                                   np.concatenate([np.asarray(x) for x in rs_ref]), rtol=1e-5, atol=1e-5)
        for q in range(n):  # every rank received every rank's sends
            sent = [np.frombuffer(b, np.float32) for b in results[q][5]]
            for g, s in zip(gathered, sent):
                assert np.array_equal(np.frombuffer(g, np.float32).reshape(n, -1)[q], s)


def _all_gather_into_a_list(comm, count, as_list_on):
    """all_gather into a list of arrays on the ranks in ``as_list_on``, into one array on the
    others (the frames are the same: the two forms pair); every rank's result against NumPy."""
    remapped = _count_remaps()
    me, n = comm.rank, comm.world_size
    send = (np.arange(count, dtype=np.float64) + 1000 * me) * 0.5
    if me in as_list_on:
        recv = [np.full(count, np.nan) for _ in range(n)]
        comm.all_gather(send, recv)
        got = np.concatenate(recv)
    else:
        got = np.full(n * count, np.nan)
        comm.all_gather(send, got)
    want = np.concatenate([(np.arange(count, dtype=np.float64) + 1000 * q) * 0.5 for q in range(n)])
    return got.tobytes() == want.tobytes(), remapped


@pytest.mark.timeout(120)
@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("count", [3, 300001])
def test_all_gather_into_a_list_of_arrays(n, count, transport):
    results = run_on(_all_gather_into_a_list, n, transport, args=(count, {0}))
    for r, (exact, remapped) in enumerate(results):
        assert exact, f"rank {r}"
        if r == 0 and count > 1000:  # large: the ring's plan runs straight over the list (no copy out)
            assert remapped == [True], remapped


def _all_gather_list_misuse(comm):
    errors = []
    for recv in ([np.zeros(4)], [np.zeros(3) for _ in range(comm.world_size)],
                 [np.zeros(4, np.float32) for _ in range(comm.world_size)]):
        try:
            comm.all_gather(np.ones(4), recv)
        except pycoll.InvalidArgument as exc:
            errors.append(str(exc))
    comm.all_gather(np.ones(4), [np.zeros(4) for _ in range(comm.world_size)])  # the group still works
    return errors


@pytest.mark.timeout(60)
def test_all_gather_into_a_list_of_the_wrong_arrays_is_refused():
    [errors, _] = run_on(_all_gather_list_misuse, 2, "tcp")
    assert len(errors) == 3 and all("all_gather" in e for e in errors), errors


def _coalesced_split_differently(comm):
    total = 300000
    arrays = [np.ones(total, np.float32)] if comm.rank == 0 else [np.ones(1000, np.float32),
                                                                   np.ones(total - 1000, np.float32)]
    try:
        comm.all_reduce_coalesced(arrays, timeout=20)
    except pycoll.CollectiveError as exc:
        return type(exc).__name__, str(exc)
    return "returned", ""


@pytest.mark.timeout(120)
def test_coalesced_arrays_split_differently_across_ranks_fail_on_every_rank(transport):
    """The same total cut differently: the stretches' lengths are in every frame's argument
    digest, so both ranks fail the first frame's check (no transfer pairs cuts that differ)."""
    results = run_on(_coalesced_split_differently, 2, transport, init_kwargs=dict(preserve_input=False),
                     return_exceptions=True)
    for r, res in enumerate(results):
        assert not isinstance(res, Exception), res
        kind, why = res
        assert kind != "returned", f"rank {r} returned from a call whose arrays differ across ranks"


# ---- point-to-point -----------------------------------------------------------------------------
def _p2p(comm, big):
    me, n = comm.rank, comm.world_size
    right, left = (me + 1) % n, (me - 1) % n
    out = {}
    # ring exchange posted receive-first, larger than any connection buffer: one plan, no deadlock
    recv = np.zeros(big, np.float32)
    w1 = comm.irecv(recv, left, tag=5)
    w2 = comm.isend(np.full(big, me, np.float32), right, tag=5)
    w1.wait(timeout=60)
    w2.wait(timeout=60)
    out["ring"] = bool((recv == left).all())
    # blocking send/recv with tags, rank 0 to everyone and back
    if me == 0:
        for d in range(1, n):
            comm.send(np.arange(10, dtype=np.int64) + d, d, tag=d)
        back = []
        for s in range(1, n):
            b = np.zeros(3, np.float64)
            comm.recv(b, s, tag=100 + s)
            back.append(b.tolist())
        out["back"] = back
    else:
        got = comm.recv(np.zeros(10, np.int64), 0, tag=me)
        out["got"] = got.tolist()
        comm.send(np.full(3, me * 1.5), 0, tag=100 + me)
    # a batch: two sends to the right in order, two receives from the left
    a, b = np.zeros(4, np.int32), np.zeros(6, np.int32)
    works = comm.batch_isend_irecv([("recv", a, left, 1), ("send", np.full(4, me, np.int32), right, 1),
                                    ("send", np.full(6, me + 100, np.int32), right, 2), ("recv", b, left, 2)])
    for w in works:
        w.wait(timeout=30)
    out["batch"] = (a.tolist(), b.tolist())
    # transfers posted, then a collective: the collective runs them first
    c = np.zeros(2, np.int8)
    comm.irecv(c, left, tag=9)
    comm.isend(np.full(2, me, np.int8), right, tag=9)
    total = comm.all_reduce(np.ones(1, np.int64))
    out["after"] = (c.tolist(), int(total[0]))
    # a mismatched tag fails on both ends (ProtocolError) and the next call works again
    return out


@pytest.mark.timeout(180)
@pytest.mark.parametrize("n", [2, 3, 4])
def test_point_to_point(n, transport):
    big = (8 << 20) // 4  # 8 MiB each way
    results = run_on(_p2p, n, transport, args=(big,), timeout=150)
    for r, out in enumerate(results):
        left = (r - 1) % n
        assert out["ring"]
        if r == 0:
            assert out["back"] == [[s * 1.5] * 3 for s in range(1, n)]
        else:
            assert out["got"] == list(range(r, r + 10))
        assert out["batch"] == ([left] * 4, [left + 100] * 6)
        assert out["after"] == ([left] * 2, n)


def _p2p_errors(comm):
    me = comm.rank
    errors = {}
    for name, call in (("self", lambda: comm.send(np.zeros(1), me)), ("outside", lambda: comm.isend(np.zeros(1), 5)),
                       ("tag", lambda: comm.isend(np.zeros(1), 1 - me, tag="x"))):
        try:
            call()
        except pycoll.InvalidArgument as exc:
            errors[name] = str(exc)
    # mismatched tags: the receiver fails on the frame's tag, and the sender (whose small send
    # completed) fails at its next call; nobody hangs
    try:
        if me == 0:
            comm.send(np.zeros(4, np.float32), 1, tag=1)
        else:
            comm.recv(np.zeros(4, np.float32), 0, tag=2)
        comm.barrier()
        errors["mismatch"] = None
    except pycoll.CollectiveError as exc:
        errors["mismatch"] = str(exc)
    return errors


@pytest.mark.timeout(120)
def test_point_to_point_errors():
    results = run_on(_p2p_errors, 2, "tcp", init_kwargs={"timeout": 20})
    for r, errors in enumerate(results):
        assert set(errors) == {"self", "outside", "tag", "mismatch"}, errors
        assert "another rank" in errors["self"] and "another rank" in errors["outside"]
        assert errors["mismatch"] is not None
    assert "frame tag 00000001, expected 00000002" in results[1]["mismatch"]  # the receiver checks the tag


# ---- faults: a peer dies mid-call ---------------------------------------------------------------
def _survive(comm, coll, algorithm="direct"):
    me, n = comm.rank, comm.world_size
    x = np.full(3 << 18, me + 1, np.float32)  # 3 MiB per rank (a multiple of world size)
    original = x.copy()
    err = None
    for _ in range(30):
        try:
            if coll == "reduce":
                comm.reduce(x, root=0, algorithm=algorithm)
            elif coll == "gather":
                comm.gather(x, np.zeros(n * x.size, x.dtype) if me == 0 else None, root=0, algorithm=algorithm)
            elif coll == "scatter":
                comm.scatter(np.zeros(n * x.size, x.dtype) if me == 0 else None, np.zeros_like(x), root=0,
                             algorithm=algorithm)
            elif coll == "all_to_all":
                comm.all_to_all(x, np.zeros_like(x), algorithm=algorithm if algorithm == "staged" else "auto")
            elif coll == "p2p":
                r = np.zeros_like(x)
                w = comm.irecv(r, (me - 1) % n)
                comm.isend(x, (me + 1) % n)
                w.wait()
            x[:] = original  # (a reduce's root holds the result)
        except pycoll.PeerFailure as exc:
            err = (type(exc).__name__, exc.lost)
            break
    return err, bool(np.array_equal(x, original))


@pytest.mark.timeout(150)
@pytest.mark.parametrize("coll", ["reduce", "gather", "scatter", "all_to_all", "p2p"])
def test_peer_death_mid_call_fails_every_survivor(coll, transport):
    n, victim = 3, 2
    results = run_on(_survive, n, transport, args=(coll,), timeout=120, kill={victim: f"during:{coll}"},
                     init_kwargs={"timeout": 30, "heartbeat_timeout": 3.0})
    assert results[victim] == pycoll.testing.KILLED
    for r in range(n):
        if r == victim:
            continue
        err, intact = results[r]
        assert err is not None and err[0] == "PeerFailure", f"rank {r}: {err}"
        assert intact, f"rank {r}: the input changed"


@pytest.mark.timeout(150)
@pytest.mark.parametrize("coll", ["reduce", "gather", "scatter", "all_to_all"])
def test_peer_death_mid_tree_call_fails_every_survivor(coll, transport):
    """On the binomial tree, a rank that forwards for others dies: rank 2 of 4 relays rank
    3's data (reduce, gather) or receives it for rank 3 (scatter); all_to_all: staged."""
    n, victim = 4, 2
    algorithm = "staged" if coll == "all_to_all" else "tree"
    results = run_on(_survive, n, transport, args=(coll, algorithm), timeout=120, kill={victim: f"during:{coll}"},
                     init_kwargs={"timeout": 30, "heartbeat_timeout": 3.0})
    assert results[victim] == pycoll.testing.KILLED
    for r in range(n):
        if r == victim:
            continue
        err, intact = results[r]
        assert err is not None and err[0] == "PeerFailure", f"rank {r}: {err}"
        assert intact, f"rank {r}: the input changed"


def _survive_coalesced(comm):
    """Remapped coalesced all-reduces until a peer dies in one; then one more in the re-formed
    group, checked against NumPy (its arrays are refilled: a failed call on a communicator
    without preserve_input leaves them undefined)."""
    me = comm.rank
    sizes = (70001, 3, 200003)
    err = None
    for _ in range(30):
        arrays = [np.full(c, me + 1, np.float32) for c in sizes]
        try:
            comm.all_reduce_coalesced(arrays)
        except pycoll.PeerFailure as exc:
            err = (type(exc).__name__, exc.lost)
            break
    arrays = [np.full(c, me + 1, np.float32) for c in sizes]
    comm.all_reduce_coalesced(arrays)
    return err, comm.world_size, [float(a[0]) for a in arrays] + [float(a[-1]) for a in arrays]


@pytest.mark.timeout(150)
def test_peer_death_mid_remapped_coalesced_call_fails_every_survivor(transport):
    n, victim = 3, 2
    results = run_on(_survive_coalesced, n, transport, timeout=120, kill={victim: "during:all_reduce"},
                     init_kwargs={"timeout": 30, "heartbeat_timeout": 3.0, "preserve_input": False})
    assert results[victim] == pycoll.testing.KILLED
    for r in range(n):
        if r == victim:
            continue
        err, size, values = results[r]
        assert err is not None and err[0] == "PeerFailure", f"rank {r}: {err}"
        assert size == 2 and values == [3.0] * 6, (size, values)  # ranks 0 and 1: 1 + 2


# ---- receive from any source --------------------------------------------------------------------
def _any_source(comm):
    me, n = comm.rank, comm.world_size
    senders = []
    if me == 0:
        for _ in range(2 * (n - 1)):  # every other rank sends twice; whoever comes first is taken
            buf = np.zeros(1000, np.float32)
            w = comm.irecv(buf, None)
            w.wait(timeout=60)
            assert (buf == w.source).all(), (w.source, buf[:3])
            senders.append(w.source)
    else:
        comm.send(np.full(1000, me, np.float32), 0)
        comm.send(np.full(1000, me, np.float32), 0)
    comm.barrier()
    return sorted(senders)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("n", [2, 4])
def test_receive_from_any_source(n, transport):
    results = run_on(_any_source, n, transport)
    assert results[0] == sorted(list(range(1, n)) * 2)


def _any_source_dies(comm):
    try:
        if comm.rank == 0:
            comm.recv(np.zeros(4, np.float32), None)
        else:
            comm.barrier()  # rank 1 dies here; nobody ever sends to rank 0
    except pycoll.PeerFailure as exc:
        return type(exc).__name__
    return None


@pytest.mark.timeout(120)
def test_receive_from_any_source_fails_when_a_peer_dies():
    results = run_on(_any_source_dies, 3, "tcp", kill={1: "before:barrier"},
                     init_kwargs={"timeout": 30, "heartbeat_timeout": 3.0})
    assert results[0] == "PeerFailure" and results[2] == "PeerFailure"
