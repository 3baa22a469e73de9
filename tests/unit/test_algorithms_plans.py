"""Symbolic verification of the tree, direct, allpairs, Hamiltonian multi-ring and hierarchical planners.

Every plan set is executed in Python (plansim) with expressions instead of numbers: each output
element must be reduced over every rank exactly once, and all ranks must hold the *same*
expression (same reduction order, so bit-identical floats). No sockets.
"""
import itertools

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from plansim import OUT, SCRATCH, check_plan_races, leaves, simulate, sym_array, sym_reduce, sym_scale
from pycoll.plan import planners
from pycoll.plan.layout import DOUBLE_COVERS, Layout, multiring_cycles

ALL_N = list(range(1, 33))
ANNOUNCE = 0xA0000000  # tag of the empty frames that tree and hierarchical plans open with


def run_allreduce(plans, n, count, avg=False):
    """Simulate in-place all-reduce plans; return the per-rank OUT arrays."""
    bufs = []
    for r, p in enumerate(plans):
        data = sym_array(r, count)
        bufs.append([data, data, np.empty(p.need_bytes(SCRATCH) // 8, dtype=object)])
    simulate(plans, bufs, 8, sym_reduce, sym_scale if avg else None)
    return [b[OUT] for b in bufs]


def check_allreduce(outs, n, count, avg=False):
    for i in range(count):
        exprs = {repr(outs[r][i]) for r in range(n)}
        assert len(exprs) == 1, f"element {i}: ranks disagree on the reduction order"
        e = outs[0][i]
        if avg and n > 1:
            assert e[0] == "scale" and e[1][0] != "scale", "avg must divide exactly once"
        assert sorted(leaves(e)) == [(r, i) for r in range(n)], f"element {i}: {leaves(e)}"


# ---- tree -----------------------------------------------------------------------------------
@pytest.mark.parametrize("n", ALL_N)
def test_trees_span_all_ranks_with_log_depth(n):
    interior = []
    for t in (0, 1):
        links = {r: planners.tree_links(n, t, r) for r in range(n)}
        roots = [r for r, (p, _, _) in links.items() if p < 0]
        assert len(roots) == 1
        for r, (p, c0, c1) in links.items():
            for c in (c0, c1):
                if c >= 0:
                    assert links[c][0] == r, "child and parent links agree"
        depth = 0
        for r in range(n):  # every rank reaches the root, within ~lg n hops
            hops, x = 0, r
            while links[x][0] >= 0:
                x, hops = links[x][0], hops + 1
                assert hops <= n
            depth = max(depth, hops)
        assert depth <= int(np.ceil(np.log2(max(n, 2)))) + 1
        interior.append({r for r, (_, c0, c1) in links.items() if c0 >= 0 or c1 >= 0})
    # complementary trees: a rank is interior in at most one (rank 0 may be in both for odd n)
    assert interior[0] & interior[1] <= ({0} if n % 2 else set())


@pytest.mark.parametrize("n", ALL_N)
@pytest.mark.parametrize("preserve,avg", [(False, False), (True, True)])
def test_tree_all_reduce(n, preserve, avg):
    count = 2 * n + 3
    plans = [planners.plan_tree("all_reduce", n, r, count, 8, segment_bytes=16, preserve=preserve, avg=avg)
             for r in range(n)]
    check_allreduce(run_allreduce(plans, n, count, avg), n, count, avg)


@pytest.mark.parametrize("n", [2, 3, 7, 8])
@pytest.mark.parametrize("count", [0, 1, 3, 100])
@pytest.mark.parametrize("stripes", [1, 2])
def test_tree_all_reduce_many_segments(n, count, stripes):
    plans = [planners.plan_tree("all_reduce", n, r, count, 8, segment_bytes=8, stripes=stripes)
             for r in range(n)]
    check_allreduce(run_allreduce(plans, n, count), n, count)


@pytest.mark.parametrize("n", ALL_N)
@pytest.mark.parametrize("preserve", [False, True])
def test_tree_broadcast(n, preserve):
    count = 9
    for root in sorted({0, n // 2, n - 1}):
        plans = [planners.plan_tree("broadcast", n, r, count, 8, root=root, segment_bytes=16, preserve=preserve)
                 for r in range(n)]
        bufs = []
        for r, p in enumerate(plans):
            data = sym_array(r, count)
            bufs.append([data, data, np.empty(p.need_bytes(SCRATCH) // 8, dtype=object)])
        simulate(plans, bufs, 8, sym_reduce)
        for r in range(n):
            assert list(bufs[r][OUT]) == [(root, i) for i in range(count)]


def test_tree_plans_open_with_the_announcement():
    for r in range(5):
        ops = planners.plan_tree("all_reduce", 5, r, 10, 4).ops()
        assert [(o["kind"], o["peer"], o["tag"]) for o in ops[:2]] == [(0, (r + 1) % 5, ANNOUNCE),
                                                                          (1, (r - 1) % 5, ANNOUNCE)]


@pytest.mark.parametrize("algorithm", ["ring", "tree", "hamiltonian"])
def test_broadcast_plans_open_with_an_empty_frame_to_and_from_every_peer(algorithm):
    """The root of a broadcast receives no data: without these frames it would
    finish even when another rank named another root (see plan_agree)."""
    n, agree = 5, 0xa1000000
    for root in (0, 3):
        for r in range(n):
            if algorithm == "ring":
                plan = planners.plan_rings("broadcast", n, r, [list(range(n))], 10, 4, root=root)
            elif algorithm == "hamiltonian":
                plan = planners.plan_rings("broadcast", n, r, [list(range(n)), list(range(n))[::-1]], 10, 4,
                                           root=root)
            else:
                plan = planners.plan_tree("broadcast", n, r, 10, 4, root=root)
            ops = plan.ops()
            head = [(o["kind"], o["peer"], o["tag"], o["len"]) for o in ops[:2 * (n - 1)]]
            assert head == ([(0, (r + d) % n, agree, 0) for d in range(1, n)]
                            + [(1, (r - d) % n, agree, 0) for d in range(1, n)])
            assert not any(o["tag"] == agree for o in ops[2 * (n - 1):])


def test_tree_rejects_other_collectives():
    for coll in ("all_gather", "reduce_scatter"):
        with pytest.raises(Exception):
            planners.plan_tree(coll, 4, 0, 8, 4)


# ---- direct ---------------------------------------------------------------------------------
@pytest.mark.parametrize("n", ALL_N)
@pytest.mark.parametrize("preserve,avg", [(False, False), (True, True), (False, True)])
def test_direct_all_reduce_reduces_in_rank_order(n, preserve, avg):
    count = 5
    plans = [planners.plan_direct("all_reduce", n, r, count, 8, preserve=preserve, avg=avg) for r in range(n)]
    for r, p in enumerate(plans):  # in place (IN is OUT): nothing may write what a send still reads
        check_plan_races(p.ops(), p.tail_first, aliased=True, rank=r, itemsize=8)
    outs = run_allreduce(plans, n, count, avg)
    check_allreduce(outs, n, count, avg)
    for i in range(count):  # x_0 (op) x_1 (op) ... left to right, the same on every rank
        assert leaves(outs[0][i]) == [(r, i) for r in range(n)]


@pytest.mark.parametrize("n", [2, 3, 8])
@pytest.mark.parametrize("count", [0, 1, 7])
def test_direct_sends_first_one_frame_to_every_peer(n, count):
    for r in range(n):
        ops = planners.plan_direct("all_reduce", n, r, count, 4).ops()
        net = [o for o in ops if o["kind"] in (0, 1, 2)]  # send, recv, recv-reduce
        if count == 0:
            assert net == []  # nothing to move, nothing to wait for
            continue
        sends = [o for o in net if o["kind"] == 0]
        assert ops[:n - 1] == sends and all(o["deps"] == [] for o in sends)  # all on their way at once
        assert sorted(o["peer"] for o in sends) == sorted(set(range(n)) - {r})
        assert sorted(o["peer"] for o in net if o["kind"] != 0) == sorted(set(range(n)) - {r})
        assert all(o["len"] == 4 * count for o in net)


def test_direct_rejects_other_collectives():
    for coll in ("all_gather", "reduce_scatter", "broadcast"):
        with pytest.raises(Exception, match="direct"):
            planners.plan_direct(coll, 4, 0, 8, 4)


# ---- allpairs -----------------------------------------------------------------------------------
@pytest.mark.parametrize("n", ALL_N)
@pytest.mark.parametrize("preserve", [False, True])
@pytest.mark.parametrize("avg", [False, True])
def test_allpairs_all_reduce_each_owner_reduces_its_chunk(n, preserve, avg):
    count = 3 * n + 2  # uneven chunks, several segments each
    for stripes in (1, 2):
        plans = [planners.plan_allpairs("all_reduce", n, r, count, 8, segment_bytes=16, stripes=stripes,
                                        preserve=preserve, avg=avg) for r in range(n)]
        for r, p in enumerate(plans):  # in place: a received chunk must not land on input a peer still reads
            check_plan_races(p.ops(), p.tail_first, aliased=True, rank=r, itemsize=8)
            if preserve and n > 1:  # OUT is written in the tail only
                assert all(o["dst_buf"] != 1 for o in p.ops()[:p.tail_first])
        outs = run_allreduce(plans, n, count, avg)
        check_allreduce(outs, n, count, avg)
        # element i of chunk c: x_c (op) x_{c+1} (op) ... round the ranks, reduced by its owner c alone
        for c in range(n):
            lo = c * (count // n) + min(c, count % n)
            for i in range(lo, lo + count // n + (c < count % n)):
                assert leaves(outs[0][i]) == [((c + k) % n, i) for k in range(n)]


@pytest.mark.parametrize("n", [2, 4, 5])
def test_allpairs_moves_a_rings_bytes_in_two_steps(n):
    count, es = 1000 * n + 3, 4
    for r in range(n):
        ops = planners.plan_allpairs("all_reduce", n, r, count, es, segment_bytes=1 << 20).ops()
        sends = [o for o in ops if o["kind"] == 0]
        rs, ag = sends[:n - 1], sends[n - 1:]
        assert all(o["deps"] == [] for o in rs)  # the reduce-scatter's sends wait for nothing
        assert sorted(o["peer"] for o in rs) == sorted(o["peer"] for o in ag) == sorted(set(range(n)) - {r})
        assert sum(o["len"] for o in sends) in range(2 * (n - 1) * (count // n) * es,
                                                     2 * (n - 1) * (count // n + 1) * es + 1)


def test_allpairs_rejects_other_collectives():
    for coll in ("all_gather", "reduce_scatter", "broadcast"):
        with pytest.raises(Exception, match="allpairs"):
            planners.plan_allpairs(coll, 4, 0, 8, 4)


# ---- Hamiltonian multi-ring -------------------------------------------------------------------
@pytest.mark.parametrize("n", ALL_N)
def test_multiring_cycles_load_every_pair_equally(n):
    cycles = multiring_cycles(n)
    uses = {}
    for c in cycles:
        assert sorted(c) == list(range(n)), "every cycle visits every rank once"
        for i in range(len(c)):
            arc = (c[i], c[(i + 1) % n])
            if n > 1:
                uses[arc] = uses.get(arc, 0) + 1
    pairs = [(u, v) for u in range(n) for v in range(n) if u != v]
    if n == 2:
        assert uses == {(0, 1): 1, (1, 0): 1}
    elif n > 2:
        fold = 2 if n in DOUBLE_COVERS else 1
        assert len(cycles) == fold * (n - 1)
        assert sorted(uses) == pairs and set(uses.values()) == {fold}


@pytest.mark.parametrize("n", [4, 6])
def test_double_covers_are_distinct_cycles(n):
    canon = set()
    for c in DOUBLE_COVERS[n]:
        at = c.index(0)
        canon.add(tuple(c[at:] + c[:at]))
    assert len(canon) == len(DOUBLE_COVERS[n])


def ham_plans(coll, n, count, **kw):
    cycles = multiring_cycles(n)
    return [planners.plan_rings(coll, n, r, cycles, count, 8, **kw) for r in range(n)]


@pytest.mark.parametrize("n", list(range(1, 13)) + [16, 17, 31, 32])
def test_hamiltonian_all_reduce(n):
    count = max(1, len(multiring_cycles(n))) * n + 3
    avg = n % 2 == 0
    plans = ham_plans("all_reduce", n, count, segment_bytes=16, preserve=n % 3 == 0, avg=avg)
    check_allreduce(run_allreduce(plans, n, count, avg), n, count, avg)


@pytest.mark.parametrize("n", list(range(1, 13)) + [16, 32])
def test_hamiltonian_all_gather(n):
    count = 2 * n + 1
    plans = ham_plans("all_gather", n, count, segment_bytes=16)
    bufs = []
    for r, p in enumerate(plans):
        bufs.append([sym_array(r, count), np.empty(n * count, dtype=object),
                     np.empty(p.need_bytes(SCRATCH) // 8, dtype=object)])
    simulate(plans, bufs, 8, sym_reduce)
    for r in range(n):
        assert list(bufs[r][OUT]) == [(q, i) for q in range(n) for i in range(count)]
    if n > 2:  # every ordered pair of ranks carries all-gather traffic
        pairs = {(r, op["peer"]) for r, p in enumerate(plans) for op in p.ops() if op["kind"] == 0 and op["len"]}
        assert len(pairs) == n * (n - 1)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 9])
def test_hamiltonian_reduce_scatter_and_broadcast(n):
    count = 2 * n + 1
    plans = ham_plans("reduce_scatter", n, count, segment_bytes=16, avg=True)
    bufs = []
    for r, p in enumerate(plans):
        bufs.append([sym_array(r, n * count), np.empty(count, dtype=object),
                     np.empty(p.need_bytes(SCRATCH) // 8, dtype=object)])
    simulate(plans, bufs, 8, sym_reduce, sym_scale)
    for r in range(n):
        for i in range(count):
            assert sorted(leaves(bufs[r][OUT][i])) == [(q, r * count + i) for q in range(n)]
    root = n - 1
    plans = ham_plans("broadcast", n, count, root=root, segment_bytes=16, preserve=True)
    bufs = []
    for r, p in enumerate(plans):
        data = sym_array(r, count)
        bufs.append([data, data, np.empty(p.need_bytes(SCRATCH) // 8, dtype=object)])
    simulate(plans, bufs, 8, sym_reduce)
    assert all(list(b[OUT]) == [(root, i) for i in range(count)] for b in bufs)


def test_shared_connections_interleave_rings():
    """n=4: two rings share each connection; their segments alternate on it."""
    plans = ham_plans("all_gather", 4, 600, segment_bytes=800)
    sends = [op["tag"] >> 24 for op in plans[0].ops() if op["kind"] == 0 and op["peer"] == 1]
    rings = sorted(set(sends))
    assert len(rings) == 2
    # both rings appear in the first few frames, not one ring's whole stream first
    assert set(sends[:4]) == set(rings)


# ---- hierarchical ---------------------------------------------------------------------------
def layout_for(n, groups, aggregated):
    """A Layout-like object from explicit groups (list of rank lists) and aggregator flags."""
    agg_of = list(range(n))
    for ranks, on in zip(groups, aggregated):
        if on:
            for r in ranks:
                agg_of[r] = min(ranks)
    ring = [r for g in groups for r in g]
    return agg_of, [r for r in ring if agg_of[r] == r]


def hier_check(n, agg_of, agg_rings, count, preserve=False, avg=False, segment_bytes=16):
    plans = [planners.plan_hier("all_reduce", n, r, agg_of, agg_rings, count, 8, segment_bytes=segment_bytes,
                                preserve=preserve, avg=avg) for r in range(n)]
    check_allreduce(run_allreduce(plans, n, count, avg), n, count, avg)
    return plans


def patterns(n):
    """(name, groups, aggregated flags) layouts to try for n ranks."""
    ranks = list(range(n))
    threes = [ranks[i:i + 3] for i in range(0, n, 3)]
    yield "one group", [ranks], [True]
    yield "groups of 3", threes, [True] * len(threes)
    yield "mixed deployment", threes, [i % 2 == 0 for i in range(len(threes))]
    yield "no aggregators", threes, [False] * len(threes)
    pairs = [ranks[i::2] for i in range(2)] if n > 1 else [ranks]
    yield "interleaved groups", [p for p in pairs if p], [True] * len([p for p in pairs if p])


@pytest.mark.parametrize("n", ALL_N)
def test_hier_all_reduce_layouts(n):
    count = 2 * n + 5
    for i, (name, groups, flags) in enumerate(patterns(n)):
        agg_of, ring = layout_for(n, groups, flags)
        hier_check(n, agg_of, [ring], count, preserve=i % 2 == 1, avg=i % 3 == 2)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.integers(1, 12).flatmap(lambda n: st.tuples(
    st.just(n), st.lists(st.integers(0, 3), min_size=n, max_size=n), st.lists(st.booleans(), min_size=4, max_size=4),
    st.integers(0, 3 * n + 7), st.booleans(), st.integers(1, 3))))
def test_hier_random_groups(args):
    n, group_ids, flags, count, avg, nrings = args
    groups = [[r for r in range(n) if group_ids[r] == g] for g in range(4)]
    keep = [i for i, g in enumerate(groups) if g]
    agg_of, ring = layout_for(n, [groups[i] for i in keep], [flags[i] for i in keep])
    rng = np.random.default_rng(n + count)
    rings = [ring] + [list(rng.permutation(ring)) for _ in range(nrings - 1)]
    hier_check(n, agg_of, rings, count, avg=avg, segment_bytes=8 * rng.integers(1, 5))


def test_hier_members_talk_only_to_their_aggregator():
    n = 8
    agg_of, ring = layout_for(n, [[0, 1, 2, 3], [4, 5, 6, 7]], [True, True])
    plans = hier_check(n, agg_of, [ring], 40)
    for r in range(n):
        ops = plans[r].ops()
        # the announcement (empty frames to rank+1, from rank-1) comes first, then data
        assert [(o["kind"], o["peer"], o["len"], o["tag"]) for o in ops[:2]] == [
            (0, (r + 1) % n, 0, ANNOUNCE), (1, (r - 1) % n, 0, ANNOUNCE)]
        peers = {op["peer"] for op in ops[2:] if op["peer"] >= 0}
        if agg_of[r] != r:
            assert peers == {agg_of[r]}
        else:
            assert peers == {m for m in range(n) if agg_of[m] == r and m != r} | ({4} if r == 0 else {0})


def test_hier_segments_are_an_eighth_of_a_chunk_within_bounds():
    """plan_hier's pipeline unit: chunk / 8, not below 64 KiB, never above the caller's."""
    MiB = 1 << 20
    assert planners.hier_segment(MiB, MiB, 2) == 64 << 10          # 512 KiB chunks
    assert planners.hier_segment(MiB, 4 * MiB, 2) == 256 << 10
    assert planners.hier_segment(MiB, 16 * MiB, 2) == MiB          # capped: large payloads as before
    assert planners.hier_segment(MiB, 1000, 2) == 64 << 10         # the floor (one piece per chunk)
    assert planners.hier_segment(16, 1 << 20, 2) == 16             # a small caller's unit wins
    assert planners.hier_segment(MiB, MiB, 0) == 128 << 10         # no ring: the whole buffer is the chunk


def test_hier_plan_cuts_a_small_all_reduce_into_pieces():
    """1 MiB over 2 racks of 4 with 1 MiB segments asked: the members send their input to the
    aggregator in pieces of at most 64 KiB (one per ring chunk before; the C planner sizes a
    chunk one element up, so 9 pieces of it), so the aggregator's ring starts after the first
    piece and the members get the result back piece by piece."""
    n, count = 8, (1 << 20) // 4
    agg_of, ring = layout_for(n, [[0, 1, 2, 3], [4, 5, 6, 7]], [True, True])
    plans = [planners.plan_hier("all_reduce", n, r, agg_of, [ring], count, 4, segment_bytes=1 << 20)
             for r in range(n)]
    sends = [op["len"] for op in plans[1].ops() if op["kind"] == 0 and op["peer"] == 0 and op["len"]]
    assert len(sends) == 18 and max(sends) <= 64 << 10 and sum(sends) == 1 << 20


def test_hier_rejects_bad_layouts():
    with pytest.raises(Exception):  # 1's aggregator 2 is not its own aggregator
        planners.plan_hier("all_reduce", 3, 0, [0, 2, 1], [[0]], 8, 4)
    with pytest.raises(Exception):  # ring must hold exactly the ring ranks
        planners.plan_hier("all_reduce", 3, 0, [0, 0, 2], [[0, 1, 2]], 8, 4)
    with pytest.raises(Exception):
        planners.plan_hier("all_gather", 3, 0, [0, 0, 2], [[0, 2]], 8, 4)


# ---- layouts from topologies ------------------------------------------------------------------
def test_layout_from_topology_groups():
    from pycoll.plan.topology import parse_topology
    topo = parse_topology("""
[[group]]
name = "a"
count = 3
aggregator = "agent"
[[group]]
name = "b"
count = 2
[[group]]
name = "c"
count = 2
aggregator = "switch"
""")
    lay = Layout(7, topo)
    assert lay.agg_of == [0, 0, 0, 3, 4, 5, 5]
    assert sorted(lay.agg_ring) == [0, 3, 4, 5]
    assert sorted(lay.ring) == list(range(7))
    assert Layout(6, topo).topology is None  # world size differs: defaults
    assert Layout(4, None, hosts=["x", "y", "x", "y"]).agg_of == [0, 1, 0, 1]


@pytest.mark.parametrize("algorithm", ["ring", "hamiltonian", "tree", "innetwork", "direct"])
@pytest.mark.parametrize("coll", ["all_reduce", "all_gather", "reduce_scatter", "broadcast"])
def test_build_dispatch_for_every_pair(algorithm, coll):
    n = 5
    lay = Layout(n, None, hosts=["h0", "h0", "h1", "h1", "h1"])
    eff = planners.effective(algorithm, coll)
    for r in range(n):
        p = planners.build(eff, coll, lay, r, 12, 4, root=1)
        assert p.nops > 0
    assert eff == algorithm or coll not in planners.SUPPORTS[algorithm]


def test_every_size_has_a_schedule_for_uneven_counts():
    for n, count in itertools.product([3, 5], [0, 1, 2, 7]):
        cycles = multiring_cycles(n)
        plans = [planners.plan_rings("all_reduce", n, r, cycles, count, 8, segment_bytes=8) for r in range(n)]
        check_allreduce(run_allreduce(plans, n, count), n, count)


def test_emulator_spec_from_a_topology():
    """The emulator reads link caps and the NIC cap of every rank's host from a topology."""
    from pycoll.emulator import EmuSpec
    from pycoll.plan.topology import parse_topology
    topo = parse_topology('[defaults]\nbandwidth = "100mbit"\nlatency = "1ms"\nhost_nic = "1gbit"\n'
                          '[[group]]\nname = "m"\ncount = 3\n')
    spec = EmuSpec.from_topology(topo)
    assert spec.link_spec(0, 2).rate_bps == pytest.approx(100e6) and spec.link_spec(2, 1).delay_s == 0.001
    assert spec.nic_bps(1) == pytest.approx(1e9)
    assert topo.host_nic_Bps(2) == topo.host_nic_Bps(topo.host_of(2))


# ---- standalone aggregators (PC_PLAN_SWITCH) -------------------------------------------------
@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.integers(1, 10).flatmap(lambda n: st.tuples(
    st.just(n), st.lists(st.integers(0, 3), min_size=n, max_size=n),
    st.lists(st.sampled_from(["switch", "agent", None]), min_size=4, max_size=4),
    st.integers(0, 3 * n + 7), st.booleans(), st.integers(1, 4))))
def test_switch_plans_reduce_every_worker_once(args):
    """Workers 0..n-1 plus one data-less switch per "switch" group (engine ranks n..): every
    worker ends with the same expression over all workers' data; switches never touch IN/OUT."""
    n, group_ids, kinds, count, preserve, seg = args
    groups = [[r for r in range(n) if group_ids[r] == g] for g in range(4)]
    agg_of, switches = list(range(n)), []
    for g, kind in zip(groups, kinds):
        if g and kind == "switch":
            e = n + len(switches)
            switches.append(e)
            for r in g:
                agg_of[r] = e
        elif g and kind == "agent":
            for r in g:
                agg_of[r] = min(g)
    agg_of += switches
    e_n = len(agg_of)
    ring = []
    for r in range(n):
        if agg_of[agg_of[r]] == agg_of[r] and agg_of[r] not in ring:
            ring.append(agg_of[r])
    plans = [planners.plan_hier("all_reduce", e_n, r, agg_of, [ring], count, 8, segment_bytes=8 * seg,
                                preserve=preserve and r < n, switch=r >= n) for r in range(e_n)]
    bufs = []
    for r, p in enumerate(plans):
        if r >= n:
            assert p.need_bytes(0) == 0 and p.need_bytes(1) == 0, "a switch has no IN/OUT"
            data = np.empty(0, dtype=object)
        else:
            data = sym_array(r, count)
        bufs.append([data, data, np.empty(p.need_bytes(SCRATCH) // 8, dtype=object)])
    simulate(plans, bufs, 8, sym_reduce)
    check_allreduce([b[OUT] for b in bufs[:n]], n, count)


def test_switch_flag_rejects_what_a_switch_cannot_do():
    agg_of = [2, 2, 2]  # ranks 0, 1 handed to switch 2
    planners.plan_hier("all_reduce", 3, 2, agg_of, [[2]], 8, 4, switch=True)
    with pytest.raises(Exception):  # a member cannot be a switch
        planners.plan_hier("all_reduce", 3, 0, agg_of, [[2]], 8, 4, switch=True)
    with pytest.raises(Exception):  # avg divides by the plan's ranks, switches included
        planners.plan_hier("all_reduce", 3, 2, agg_of, [[2]], 8, 4, switch=True, avg=True)
    with pytest.raises(Exception):  # a switch with no members has no data to give the ring
        planners.plan_hier("all_reduce", 3, 2, [0, 1, 2], [[0, 1, 2]], 8, 4, switch=True)


def test_descriptor_frame_plans():
    send = planners.plan_p2p(3, 0, 2, 64, True).ops()
    recv = planners.plan_p2p(3, 2, 0, 64, False).ops()
    assert [(o["kind"], o["peer"], o["len"]) for o in send] == [(0, 2, 64)]
    assert [(o["kind"], o["peer"], o["len"]) for o in recv] == [(1, 0, 64)]
    assert send[0]["tag"] == recv[0]["tag"]
    with pytest.raises(Exception):
        planners.plan_p2p(3, 1, 1, 64, True)
