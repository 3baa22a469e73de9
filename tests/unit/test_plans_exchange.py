"""Symbolic verification of the one-step planners (csrc/plan/plan_exchange.c): reduce to a
root, gather, scatter, all_to_all (equal and uneven splits) and point-to-point lists, at
every world size, without sockets. Every output element is checked for who contributed it
(and, for reduce, the order: rank order, as the direct all-reduce), and that the plans never
deadlock nor race (plansim)."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from pycoll.errors import InvalidArgument
from pycoll.plan import exchange, planners
from plansim import IN, OUT, SCRATCH, PlanDeadlock, leaves, simulate, sym_array, sym_reduce, sym_scale

WORLD_SIZES = list(range(1, 10)) + [16, 17]
ES = 8  # plansim's element size here: one object per 8 bytes


def bufs_for(plans, ins, out_count):
    out = []
    for r, p in enumerate(plans):
        o = np.empty(out_count, dtype=object)
        out.append([ins[r], o, np.empty(p.need_bytes(SCRATCH) // ES, dtype=object)])
    return out


def rank_order(expr):
    """The leaves' ranks in the order the reduction combined them."""
    return [leaf[0] for leaf in leaves(expr)]


@pytest.mark.parametrize("n", WORLD_SIZES)
@pytest.mark.parametrize("avg", [False, True])
def test_reduce(n, avg):
    count = 2 * n + 3
    for root in sorted({0, n // 2, n - 1}):
        # 16-byte segments: several per payload, pipelined per segment
        plans = [exchange.reduce(r, n, root, count, ES, segment_bytes=16, avg=avg) for r in range(n)]
        ins = [sym_array(r, count) for r in range(n)]
        bufs = []
        for r, p in enumerate(plans):
            data = ins[r].copy()  # in place, as the communicator runs it
            bufs.append([data, data, np.empty(p.need_bytes(SCRATCH) // ES, dtype=object)])
        simulate(plans, bufs, ES, sym_reduce, sym_scale if avg else None, check_races=True, aliased=True)
        for i in range(count):
            e = bufs[root][OUT][i]
            if avg and n > 1:
                assert e[0] == "scale"
            assert rank_order(e) == list(range(n)), f"root {root} element {i}: {e}"
            assert sorted(leaves(e)) == [(r, i) for r in range(n)]
        for r in range(n):
            if r != root:  # the others' buffers are never written
                assert list(bufs[r][IN]) == list(sym_array(r, count))


@pytest.mark.parametrize("n", WORLD_SIZES)
def test_gather_and_scatter(n):
    count = 3
    for root in sorted({0, n - 1}):
        plans = [exchange.gather(r, n, root, count * ES) for r in range(n)]
        ins = [sym_array(r, count) for r in range(n)]
        bufs = bufs_for(plans, ins, n * count)
        simulate(plans, bufs, ES, sym_reduce, check_races=True)
        assert list(bufs[root][OUT]) == [(q, i) for q in range(n) for i in range(count)]
        for r in range(n):
            if r != root:
                assert all(x is None for x in bufs[r][OUT])

        plans = [exchange.scatter(r, n, root, count * ES) for r in range(n)]
        ins = [sym_array(r, n * count) if r == root else np.empty(0, dtype=object) for r in range(n)]
        bufs = bufs_for(plans, ins, count)
        simulate(plans, bufs, ES, sym_reduce, check_races=True)
        for r in range(n):
            assert list(bufs[r][OUT]) == [(root, r * count + i) for i in range(count)]


@pytest.mark.parametrize("n", WORLD_SIZES)
@pytest.mark.parametrize("uneven", [False, True])
def test_all_to_all(n, uneven):
    # counts[s][d]: elements rank s sends rank d (uneven: zeros included)
    counts = [[((s * 7 + d * 3) % 4 if uneven else 2) for d in range(n)] for s in range(n)]
    plans = [exchange.all_to_all(r, n, [c * ES for c in counts[r]], [counts[s][r] * ES for s in range(n)])
             for r in range(n)]
    ins = [sym_array(r, sum(counts[r])) for r in range(n)]
    bufs = bufs_for(plans, ins, 0)
    for r in range(n):
        bufs[r][OUT] = np.empty(sum(counts[s][r] for s in range(n)), dtype=object)
    simulate(plans, bufs, ES, sym_reduce, check_races=True)
    for r in range(n):
        want = []
        for s in range(n):
            start = sum(counts[s][:r])
            want += [(s, start + i) for i in range(counts[s][r])]
        assert list(bufs[r][OUT]) == want


def test_all_to_all_mismatch_is_an_error():
    with pytest.raises(InvalidArgument):
        exchange.all_to_all(0, 2, [8, 8], [16, 8])  # rank 0 sends itself 8 bytes, expects 16


def test_all_to_all_large_payloads_use_every_stripe():
    n, nbytes = 3, 4 << 20
    plans = [exchange.all_to_all(r, n, [nbytes] * n, [nbytes] * n, stripes=4) for r in range(n)]
    stripes = {op["stripe"] for op in plans[0].ops() if op["kind"] == 0}
    assert stripes == {0, 1, 2, 3}


def test_p2p_pairs_in_order_and_ring_exchange_does_not_deadlock():
    n = 5
    # every rank: two sends to the right, one receive from the left, one more to the right and
    # two receives from the left, in this order; tags 1, 2, 3 in order on each pair
    plans = []
    for r in range(n):
        right, left = (r + 1) % n, (r - 1) % n
        plans.append(exchange.p2p(r, n, [(1, right, 0, 8, 1), (1, right, 8, 8, 2), (0, left, 0, 8, 1),
                                         (1, right, 16, 8, 3), (0, left, 8, 8, 2), (0, left, 16, 8, 3)]))
    ins = [sym_array(r, 3) for r in range(n)]
    bufs = bufs_for(plans, ins, 3)
    simulate(plans, bufs, ES, sym_reduce, check_races=True)
    for r in range(n):
        assert list(bufs[r][OUT]) == [((r - 1) % n, i) for i in range(3)]


def test_p2p_tags_must_match():
    plans = [exchange.p2p(0, 2, [(1, 1, 0, 8, 5)]), exchange.p2p(1, 2, [(0, 0, 0, 8, 6)])]
    bufs = bufs_for(plans, [sym_array(0, 1), sym_array(1, 1)], 1)
    with pytest.raises(AssertionError, match="tag"):
        simulate(plans, bufs, ES, sym_reduce)


def test_p2p_to_self_or_outside_is_refused():
    with pytest.raises(InvalidArgument):
        exchange.p2p(0, 2, [(1, 0, 0, 8, 0)])
    with pytest.raises(InvalidArgument):
        exchange.p2p(0, 2, [(1, 2, 0, 8, 0)])


def _first_frames_pair_up(plans, n):
    """Every rank sends, without waiting for anything, at least one frame on stripe 0 to every
    other rank and receives at least one from it: the first frames of every ordered pair meet."""
    for a in range(n):
        ops = plans[a].ops()
        for b in range(n):
            if a == b:
                continue
            sends = [o for o in ops if o["kind"] == 0 and o["peer"] == b and o["stripe"] == 0]
            recvs = [o for o in ops if o["kind"] in (1, 2) and o["peer"] == b and o["stripe"] == 0]
            assert sends and recvs, (a, b)
            assert not sends[0]["deps"]


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_direct_rooted_plans_check_the_root_in_their_data_frames(n):
    """Direct gather, scatter and reduce send no separate agree frame where data flows (2 frames
    per root pair instead of 3) and yet, whatever root each rank names, every ordered pair's
    first frames meet: a rank that names another root fails the header check at once on every
    rank (the simulator: a tag or length mismatch on the first frame, never a deadlock)."""
    import itertools
    builders = {"gather": lambda r, root: exchange.gather(r, n, root, 2 * ES),
                "scatter": lambda r, root: exchange.scatter(r, n, root, 2 * ES),
                "reduce": lambda r, root: exchange.reduce(r, n, root, 2, ES)}
    for coll, build in builders.items():
        same = [build(r, 0) for r in range(n)]
        empties = sum(1 for p in same for o in p.ops() if o["kind"] == 0 and o["len"] == 0)
        assert empties == (n - 1) * (n - 1), coll  # a plan_agree would send n(n-1)
        for roots in itertools.islice(itertools.product(range(n), repeat=n), 40):
            plans = [build(r, roots[r]) for r in range(n)]
            _first_frames_pair_up(plans, n)
            if len(set(roots)) == 1:
                continue
            ins = [sym_array(r, 2 * n) for r in range(n)]
            bufs = []
            for r, p in enumerate(plans):
                bufs.append([ins[r], np.empty(2 * n, dtype=object), np.empty(p.need_bytes(SCRATCH) // ES, dtype=object)])
            with pytest.raises(AssertionError) as err:
                simulate(plans, bufs, ES, sym_reduce)
            assert not isinstance(err.value, PlanDeadlock), (coll, roots)


def test_gather_with_different_roots_fails_instead_of_waiting():
    """Ranks that disagree on the root exchange agree frames first: the plans still run to
    the end in the simulator (the engine's header check then fails them), never deadlock."""
    n = 3
    plans = [exchange.gather(r, n, r % 2, ES) for r in range(n)]  # roots 0, 1, 0
    ins = [sym_array(r, 1) for r in range(n)]
    bufs = bufs_for(plans, ins, n)
    with pytest.raises((PlanDeadlock, AssertionError)):
        simulate(plans, bufs, ES, sym_reduce)


def test_reduce_segments_cap():
    plan = planners.plan_reduce(2, 0, 0, 1 << 20, 1, segment_bytes=1)  # 1 MiB in 1-byte segments: capped at 8 segments
    recvs = [op for op in plan.ops() if op["kind"] in (1, 2) and op["len"]]  # (not the empty agree frame)
    assert len(recvs) <= 8
    assert sum(op["len"] for op in recvs) == 1 << 20


def test_ranges_that_wrap_around_are_refused():
    """An offset plus a length past 2^64 must not wrap to a small buffer size (the plan would
    then pass the engine's buffer check and send from far outside IN)."""
    huge = (1 << 64) - 2  # not NO_FRAME
    with pytest.raises(InvalidArgument):
        planners.plan_exchange(2, 0, [0, 5], [8, huge], [0, 0], [8, 8])
    with pytest.raises(InvalidArgument):
        planners.plan_exchange(2, 0, [0, 0], [8, 8], [0, 5], [8, huge])
    with pytest.raises(InvalidArgument):
        exchange.p2p(0, 2, [(1, 1, 5, huge, 0)])


# ---- binomial-tree plans (csrc/plan/plan_binomial.c) -----------------------------------------
def _tree_expr(order, i):
    """The symbolic expression a reduce in grouping ``order`` gives for element i."""
    from reference import fold_order
    return fold_order(order, lambda r: (r, i), lambda a, b: ("op", a, b))


@pytest.mark.parametrize("n", WORLD_SIZES)
@pytest.mark.parametrize("avg", [False, True])
def test_tree_reduce(n, avg):
    from reference import binomial_order
    count = 2 * n + 3
    for root in sorted({0, n // 2, n - 1}):
        plans = [exchange.reduce(r, n, root, count, ES, segment_bytes=16, avg=avg, algorithm="tree")
                 for r in range(n)]
        bufs = []
        for r, p in enumerate(plans):
            data = sym_array(r, count)  # in place
            bufs.append([data, data, np.empty(p.need_bytes(SCRATCH) // ES, dtype=object)])
        simulate(plans, bufs, ES, sym_reduce, sym_scale if avg else None, check_races=True, aliased=True)
        order = binomial_order(n, root)
        for i in range(count):
            want = _tree_expr(order, i)
            if avg and n > 1:
                want = ("scale", want)
            assert bufs[root][OUT][i] == want, f"root {root} element {i}"
        for r in range(n):
            if r != root:  # the others' buffers are never written
                assert list(bufs[r][IN]) == list(sym_array(r, count))
        # the root receives from lg n ranks, not n - 1
        peers = {op["peer"] for op in plans[root].ops() if op["kind"] == 2}
        assert len(peers) == (n - 1).bit_length()


@pytest.mark.parametrize("n", WORLD_SIZES)
def test_tree_gather_and_scatter(n):
    count = 3
    for root in sorted({0, 1 % n, n // 2, n - 1}):
        plans = [exchange.gather(r, n, root, count * ES, algorithm="tree") for r in range(n)]
        ins = [sym_array(r, count) for r in range(n)]
        bufs = bufs_for(plans, ins, n * count)
        simulate(plans, bufs, ES, sym_reduce, check_races=True)
        assert list(bufs[root][OUT]) == [(q, i) for q in range(n) for i in range(count)]
        for r in range(n):
            if r != root:
                assert all(x is None for x in bufs[r][OUT])
                assert list(bufs[r][IN]) == list(sym_array(r, count))

        plans = [exchange.scatter(r, n, root, count * ES, algorithm="tree") for r in range(n)]
        ins = [sym_array(r, n * count) if r == root else np.empty(0, dtype=object) for r in range(n)]
        bufs = bufs_for(plans, ins, count)
        simulate(plans, bufs, ES, sym_reduce, check_races=True)
        for r in range(n):
            assert list(bufs[r][OUT]) == [(root, r * count + i) for i in range(count)]
        assert list(bufs[root][IN]) == list(sym_array(root, n * count))
        # lg n rounds: the root sends to lg n ranks
        peers = {op["peer"] for op in plans[root].ops() if op["kind"] == 0 and op["len"]}
        assert len(peers) == (n - 1).bit_length()


def test_tree_rooted_refuses_other_collectives_and_algorithms():
    with pytest.raises(InvalidArgument):
        planners.plan_binomial_rooted("all_to_all", 2, 0, 0, 8)
    with pytest.raises(InvalidArgument):
        exchange.gather(0, 2, 0, 8, algorithm="ring")
    with pytest.raises(InvalidArgument):
        planners.plan_binomial_reduce(2, 0, 2, 1, 4)  # root outside the group


# ---- the cost model's choice for rooted collectives and all_to_all -----------------------------
def test_rooted_choice_follows_the_bottleneck():
    from pycoll.plan.costmodel import CostModel
    big, small = 64 << 20, 4 << 10
    for n in (2, 3):  # the binomial tree of 2 or 3 ranks is the direct plan
        assert CostModel(n).choose_rooted("reduce", big)[0] == "direct"
    # one host: the senders do the copying, the host's work is the same, the tree only adds depth
    one = CostModel(4)
    for coll in ("reduce", "gather", "scatter"):
        for nbytes in (small, 1 << 20, big):
            assert one.choose_rooted(coll, nbytes)[0] == "direct", (coll, nbytes)
    # a host per rank behind a NIC: the direct root receives n-1 payloads, the tree's lg n
    nic = CostModel(8, host_of=range(8), nic_Bps=1.25e9)
    alg, times = nic.choose_rooted("reduce", big)
    assert alg == "tree" and times["tree"] < 0.6 * times["direct"]
    assert nic.choose_rooted("gather", big)[0] == "direct"  # the same bytes reach the root either way
    # many ranks, small blocks: lg n steps beat a root handling n-1 messages
    assert CostModel(16).choose_rooted("gather", small)[0] == "tree"
    assert CostModel(16).choose_rooted("scatter", small)[0] == "tree"


def test_staged_all_to_all_same_frames_as_direct():
    """The staged exchange sends and receives the same frames as the direct one (so ranks that
    choose differently still pair up) and delivers the same blocks at every world size."""
    for n in (2, 3, 5, 8):
        counts = [[(s * 5 + d * 3) % 4 for d in range(n)] for s in range(n)]
        for r in range(n):
            send, recv = [c * ES for c in counts[r]], [counts[s][r] * ES for s in range(n)]
            frames = {}
            for alg in ("direct", "staged"):
                ops = exchange.all_to_all(r, n, send, recv, algorithm=alg).ops()
                frames[alg] = sorted((o["kind"], o["peer"], o["tag"], o["len"]) for o in ops if o["kind"] in (0, 1))
            assert frames["staged"] == frames["direct"]
        plans = [exchange.all_to_all(r, n, [c * ES for c in counts[r]], [counts[s][r] * ES for s in range(n)],
                                     algorithm="staged" if r % 2 else "direct") for r in range(n)]  # mixed
        bufs = bufs_for(plans, [sym_array(r, sum(counts[r])) for r in range(n)], 0)
        for r in range(n):
            bufs[r][OUT] = np.empty(sum(counts[s][r] for s in range(n)), dtype=object)
        simulate(plans, bufs, ES, sym_reduce, check_races=True)
        for r in range(n):
            want = []
            for s in range(n):
                start = sum(counts[s][:r])
                want += [(s, start + i) for i in range(counts[s][r])]
            assert list(bufs[r][OUT]) == want


def test_staged_all_to_all_has_one_payload_in_flight():
    """Step d's send waits for step d-1's receive: at most one send is ready at any time."""
    n = 6
    ops = exchange.all_to_all(0, n, [8] * n, [8] * n, algorithm="staged").ops()
    sends = [o for o in ops if o["kind"] == 0]
    assert [o["peer"] for o in sends] == [1, 2, 3, 4, 5]
    assert not sends[0]["deps"] and all(len(o["deps"]) == 1 for o in sends[1:])
    for o in sends[1:]:
        dep = ops[o["deps"][0]]
        assert dep["kind"] == 1 and dep["peer"] == (0 - (o["peer"] - 1)) % n


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.integers(1, 20).flatmap(lambda n: st.tuples(
    st.just(n), st.integers(0, n - 1), st.integers(0, 3 * n + 9), st.integers(1, 6), st.integers(1, 3),
    st.booleans())))
def test_tree_plans_random(args):
    """Random world sizes, roots, counts, segment sizes and stripes: the tree reduce's grouping
    and the tree gather/scatter's blocks, without deadlock or race."""
    from reference import binomial_order
    n, root, count, seg_elems, stripes, avg = args
    plans = [exchange.reduce(r, n, root, count, ES, segment_bytes=seg_elems * ES, stripes=stripes, avg=avg,
                             algorithm="tree") for r in range(n)]
    bufs = []
    for r, p in enumerate(plans):
        data = sym_array(r, count)
        bufs.append([data, data, np.empty(p.need_bytes(SCRATCH) // ES, dtype=object)])
    simulate(plans, bufs, ES, sym_reduce, sym_scale if avg else None, check_races=True, aliased=True)
    order = binomial_order(n, root)
    for i in range(count):
        want = _tree_expr(order, i)
        assert bufs[root][OUT][i] == (("scale", want) if avg and n > 1 else want)
    block = count % 5
    plans = [exchange.gather(r, n, root, block * ES, algorithm="tree") for r in range(n)]
    bufs = bufs_for(plans, [sym_array(r, block) for r in range(n)], n * block)
    simulate(plans, bufs, ES, sym_reduce, check_races=True)
    assert list(bufs[root][OUT]) == [(q, i) for q in range(n) for i in range(block)]
    plans = [exchange.scatter(r, n, root, block * ES, algorithm="tree") for r in range(n)]
    ins = [sym_array(r, n * block) if r == root else np.empty(0, dtype=object) for r in range(n)]
    bufs = bufs_for(plans, ins, block)
    simulate(plans, bufs, ES, sym_reduce, check_races=True)
    for r in range(n):
        assert list(bufs[r][OUT]) == [(root, r * block + i) for i in range(block)]
