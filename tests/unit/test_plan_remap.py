"""pc_plan_remap (pycoll.plan.remap): a plan re-addressed onto stretches of several buffers
computes, element for element and in the same reduction order, what the plan computes on the
packed buffer. Checked symbolically (tests/support/plansim.py) for every algorithm, world sizes
1-5, uneven and empty arrays, cuts that fall inside segments and chunks."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pycoll.plan import planners, remap
from pycoll.plan.layout import Layout
from plansim import IN, OUT, SCRATCH, SEND, RECV, RECV_REDUCE, simulate, sym_array, sym_reduce, sym_scale

ES = 8  # plansim's elements stand for 8-byte items
BLOCKS = {"all_reduce": lambda n: (1, 1), "all_gather": lambda n: (1, n), "reduce_scatter": lambda n: (n, 1)}
CASES = [(coll, alg) for alg in planners.ALGORITHMS if alg != "auto"
         for coll in sorted(planners.SUPPORTS[alg]) if coll in BLOCKS]


def _virtual(bufs, stretches):
    """The virtual buffer the stretches make of ``bufs`` (elements), in order."""
    return [x for b, off, n in stretches for x in bufs[b][off // ES:(off + n) // ES]]


def _uses_scratch_on_the_wire(plan):
    return any(o["kind"] in (SEND, RECV, RECV_REDUCE) and o["len"] and SCRATCH in (o["src_buf"], o["dst_buf"])
               for o in plan.ops())


@settings(max_examples=150, deadline=None)
@given(case=st.sampled_from(CASES), n=st.integers(1, 5), sizes=st.lists(st.integers(0, 23), min_size=1, max_size=5),
       segment=st.sampled_from([16, 40, 1 << 19]), stripes=st.sampled_from([1, 2]), avg=st.booleans())
def test_a_remapped_plan_computes_what_the_packed_plan_computes(case, n, sizes, segment, stripes, avg):
    coll, algorithm = case
    total = sum(sizes)
    if total == 0:
        return
    in_blocks, out_blocks = BLOCKS[coll](n)
    layout = Layout(n, None, hosts=[f"h{r // 2}" for r in range(n)])
    plans = [planners.build(algorithm, coll, layout, r, total, ES, segment_bytes=segment, stripes=stripes,
                            avg=avg and coll != "all_gather") for r in range(n)]
    in_sizes = [c * in_blocks * ES for c in sizes]
    out_sizes = [c * out_blocks * ES for c in sizes]
    k = len(sizes)
    in_place = coll == "all_reduce"
    ins = remap.stretches(in_sizes, in_blocks)
    outs = ins if in_place else remap.stretches(out_sizes, out_blocks, k)
    nbufs = k if in_place else 2 * k
    remapped = [remap.remap(p, nbufs, ins, outs) for p in plans]
    if any(m is None for m in remapped):  # refused: only where a transfer touches scratch, on every rank alike
        assert all(m is None for m in remapped)
        assert any(_uses_scratch_on_the_wire(p) for p in plans)
        return
    # the packed run
    packed = []
    for r, p in enumerate(plans):
        data = sym_array(r, total * in_blocks)
        out = data if in_place else np.empty(total * out_blocks, dtype=object)
        packed.append([data, out, np.empty(p.need_bytes(SCRATCH) // ES, dtype=object)])
    simulate(plans, packed, ES, sym_reduce, sym_scale)
    # the remapped run: the same inputs, cut into the arrays
    runs = []
    for r, p in enumerate(remapped):
        arrays = [np.empty(c // ES, dtype=object) for c in in_sizes]
        virtual, at = sym_array(r, total * in_blocks), 0
        for b, off, nb in ins:
            arrays[b][off // ES:(off + nb) // ES] = virtual[at:at + nb // ES]
            at += nb // ES
        if not in_place:
            arrays += [np.empty(c // ES, dtype=object) for c in out_sizes]
        runs.append([None, None, np.empty(p.need_bytes(SCRATCH) // ES, dtype=object)] + arrays)
    simulate(remapped, runs, ES, sym_reduce, sym_scale)
    for r in range(n):
        got = _virtual(runs[r][3:], outs)
        assert [repr(x) for x in got] == [repr(x) for x in packed[r][OUT]], f"rank {r}: {coll} {algorithm}"
        if not in_place:  # the input is never written
            assert _virtual(runs[r][3:], ins) == list(sym_array(r, total * in_blocks))


def test_every_op_is_cut_where_an_array_ends():
    plan = planners.build("ring", "all_reduce", Layout(2), 0, 10, ES, segment_bytes=1 << 19)
    ins = remap.stretches([3 * ES, 7 * ES], 1)
    m = remap.remap(plan, 2, ins, ins)
    for o in m.ops():
        for b, off in ((o["src_buf"], o["src_off"]), (o["dst_buf"], o["dst_off"])):
            if b >= 3 and o["len"]:
                assert off + o["len"] <= (3, 7)[b - 3] * ES  # inside its array
    assert m.nops > plan.nops  # the chunk that straddles arrays 0 and 1 became two ops on each side


def test_a_plan_that_moves_data_through_scratch_is_refused():
    """The direct all-reduce receives every peer's data into scratch (what the sender reads
    from its input): the two ends could cut that transfer differently, so it is not remapped."""
    plan = planners.build("direct", "all_reduce", Layout(3), 1, 12, ES)
    assert _uses_scratch_on_the_wire(plan)
    ins = remap.stretches([5 * ES, 7 * ES], 1)
    assert remap.remap(plan, 2, ins, ins) is None


def test_stretches_that_hold_less_than_the_plan_are_refused():
    plan = planners.build("ring", "all_reduce", Layout(2), 0, 10, ES)
    short = remap.stretches([3 * ES, 6 * ES], 1)
    assert remap.remap(plan, 2, short, short) is None
    whole = remap.stretches([3 * ES, 7 * ES], 1)
    assert remap.remap(plan, 1, whole, whole) is None  # a stretch names buffer 1 of 1


def test_a_remapped_plan_is_not_compressed():
    """A compressed plan runs through pc_comm_run, which knows only IN, OUT and scratch: the
    caller buffers a remapped plan addresses would be read past that table."""
    from pycoll.errors import InvalidArgument
    from pycoll.plan import compression
    plan = planners.build("ring", "all_reduce", Layout(2), 0, 10, 4)
    ins = remap.stretches([12, 28], 1)
    with pytest.raises(InvalidArgument):
        compression.compress(remap.remap(plan, 2, ins, ins), "bf16")
    assert compression.compress(plan, "bf16") is not None  # (the plan itself compresses)


def test_a_remapped_plan_runs_over_the_arrays_and_not_as_a_plain_plan():
    """On a one-rank C communicator: the remapped run reduces in place over two arrays (a
    copy onto itself); pc_comm_run, which would address the IN and OUT the plan no longer
    has, refuses it, as does a remapped run given fewer or shorter buffers."""
    from pycoll.core import engine
    from pycoll.core.native import ffi, lib
    plan = planners.build("ring", "all_reduce", Layout(1), 0, 5, 4, avg=True)
    ins = remap.stretches([8, 12], 1)
    m = remap.remap(plan, 2, ins, ins)
    comm = engine.create_tcp(0, 1, 1, ffi.new("int32_t[]", [-1]))
    try:
        a, b = np.arange(2, dtype=np.float32), np.arange(3, dtype=np.float32) + 5
        ptrs = ffi.new("void *[]", [ffi.cast("void *", a.ctypes.data), ffi.cast("void *", b.ctypes.data)])
        sizes = ffi.new("uint64_t[]", [8, 12])
        failed = ffi.new("int32_t *")
        assert engine.run_remapped(comm, m.ptr, 2, ptrs, sizes, lib.PC_F32, lib.PC_AVG, 1, 0, 5.0, failed) == lib.PC_OK
        assert a.tolist() == [0, 1] and b.tolist() == [5, 6, 7]
        assert engine.run(comm, m.ptr, ptrs, sizes, lib.PC_F32, lib.PC_SUM, 2, 0, 5.0, failed) == lib.PC_ERR_ARG
        assert "remapped" in engine.last_error(comm)
        assert engine.run_remapped(comm, m.ptr, 1, ptrs, sizes, lib.PC_F32, lib.PC_SUM, 3, 0, 5.0,
                                   failed) == lib.PC_ERR_ARG
        short = ffi.new("uint64_t[]", [8, 8])
        assert engine.run_remapped(comm, m.ptr, 2, ptrs, short, lib.PC_F32, lib.PC_SUM, 4, 0, 5.0,
                                   failed) == lib.PC_ERR_ARG
        assert "reaches past buffer 1" in engine.last_error(comm)
    finally:
        engine.close(comm)


@pytest.mark.parametrize("algorithm", ["ring", "hamiltonian"])
@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_an_all_gather_into_a_list_cuts_no_transfer(algorithm, n):
    """Its cuts fall between the ranks' blocks, which no transfer crosses: the frames are the
    plan's own (so a rank gathering into one array pairs with one gathering into a list),
    while an all-reduce over arrays that end inside a chunk cuts transfers."""
    from pycoll.core.native import lib
    count = 100003
    for r in range(n):
        plan = planners.build(algorithm, "all_gather", Layout(n), r, count, 4, segment_bytes=1 << 16)
        m = remap.remap(plan, n + 1, [(0, 0, count * 4)], remap.stretches([count * 4] * n, 1, 1))
        assert lib.pc_plan_cut_transfers(m.ptr) == 0
        assert m.nops == plan.nops
    plan = planners.build(algorithm, "all_reduce", Layout(n), 0, count, 4, segment_bytes=1 << 16)
    ins = remap.stretches([12345 * 4, (count - 12345) * 4], 1)
    assert lib.pc_plan_cut_transfers(remap.remap(plan, 2, ins, ins).ptr) > 0
