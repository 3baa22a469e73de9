"""What healing fast rests on, without sockets: the hash taken in blocks that arrive in any order
folds to the hash of the whole buffer; the sync planner cuts pieces on those blocks and spreads a
state of many small tensors over the holders; buffer plans accept only what they can run."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from pycoll.control import parity
from pycoll.core.hashing import BLOCK, SEED, blocks, fold, hash_arrays
from pycoll.core.native import ffi, lib


@pytest.mark.parametrize("n", [0, 1, 7, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 5, 40 * BLOCK])
def test_block_digests_in_any_order_fold_to_the_hash(n):
    a = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8)
    base = ffi.cast("uint8_t *", a.ctypes.data)
    digests = ffi.new("uint64_t[]", max(1, blocks(n)))
    order = np.random.default_rng(1).permutation(blocks(n))
    for k in order:  # as pieces from several sources land
        digests[k] = lib.pc_hash64_block(base + int(k) * BLOCK, min(BLOCK, n - int(k) * BLOCK), SEED)
    assert fold(digests, n) == hash_arrays([a])[0]
    if n:  # one flipped byte: re-digesting its block alone gives the new hash, not the old one
        before = fold(digests, n)
        a[n // 2] ^= 1
        k = (n // 2) // BLOCK
        digests[k] = lib.pc_hash64_block(base + k * BLOCK, min(BLOCK, n - k * BLOCK), SEED)
        assert fold(digests, n) == hash_arrays([a])[0] != before


def _reports(sizes, holders, fetchers):
    names = [f"t{i:04d}" for i in range(len(sizes))]
    reports = {}
    for r in range(holders + fetchers):
        good = r < holders
        reports[r] = {"revision": 1 if good else 0,
                      "tensors": [[n, ["uint8", s, s], 7 if good else 8] for n, s in zip(names, sizes)]}
    return reports


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.integers(0, 5 << 20), min_size=1, max_size=12), holders=st.integers(1, 6),
       fetchers=st.integers(1, 3))
def test_pieces_start_on_hash_blocks_and_tile_each_tensor(sizes, holders, fetchers):
    plan = parity.plan_sync(_reports(sizes, holders, fetchers))
    for r in range(holders, holders + fetchers):
        assert [idx for idx, _ in plan["fetch"][r]] == list(range(len(sizes)))
        for idx, pieces in plan["fetch"][r]:
            pos = 0
            for src, off, length in sorted(pieces, key=lambda p: p[1]):
                assert off == pos and off % BLOCK == 0 and length > 0 and src < holders
                pos += length
            assert pos == sizes[idx]
            if sizes[idx] >= 2 * parity.MIN_PIECE and holders >= 2:
                assert len({p[0] for p in pieces}) >= 2


def test_many_small_tensors_are_spread_evenly_over_the_holders():
    sizes = [1000 + 37 * i for i in range(400)]  # none big enough to cut
    plan = parity.plan_sync(_reports(sizes, 4, 1))
    served = [sum(x[2] for _, items in plan["serve"][r] for x in items) for r in range(4)]
    assert sum(served) == sum(sizes)
    assert max(served) - min(served) <= max(sizes), served


def test_a_big_tensor_after_small_ones_still_uses_every_holder():
    plan = parity.plan_sync(_reports([5000] * 10 + [64 << 20], 4, 1))
    (pieces,) = [p for idx, p in plan["fetch"][4] if idx == 10]
    assert sorted(p[0] for p in pieces) == [0, 1, 2, 3]


def _op(kind, peer, src_buf, dst_buf, length=8):
    op = ffi.new("pc_op *")
    op.kind, op.peer, op.stripe, op.tag = kind, peer, 0, 0
    op.src_buf, op.src_off, op.dst_buf, op.dst_off, op.len = src_buf, 0, dst_buf, 0, length
    return op


def test_buffer_plans_take_sends_receives_and_copies_over_their_buffers_only():
    out = ffi.new("pc_plan **")
    assert lib.pc_plan_create_buffers(2, 0, 0, out) == lib.PC_ERR_ARG
    assert lib.pc_plan_create_buffers(2, 0, 5, out) == lib.PC_OK
    plan = out[0]
    try:
        assert lib.pc_plan_append(plan, _op(lib.PC_OP_SEND, 1, 4, -1), ffi.NULL, 0, ffi.NULL) == lib.PC_OK
        assert lib.pc_plan_append(plan, _op(lib.PC_OP_RECV, 1, -1, 3), ffi.NULL, 0, ffi.NULL) == lib.PC_OK
        assert lib.pc_plan_append(plan, _op(lib.PC_OP_COPY, -1, 0, 1), ffi.NULL, 0, ffi.NULL) == lib.PC_OK
        assert lib.pc_plan_append(plan, _op(lib.PC_OP_SEND, 1, 5, -1), ffi.NULL, 0, ffi.NULL) == lib.PC_ERR_ARG
        assert lib.pc_plan_append(plan, _op(lib.PC_OP_RECV_REDUCE, 1, 0, 0), ffi.NULL, 0, ffi.NULL) == lib.PC_ERR_ARG
        assert lib.pc_plan_append(plan, _op(lib.PC_OP_REDUCE, -1, 0, 1), ffi.NULL, 0, ffi.NULL) == lib.PC_ERR_ARG
        assert lib.pc_plan_nops(plan) == 3
    finally:
        lib.pc_plan_free(plan)
    plain = ffi.new("pc_plan **")
    assert lib.pc_plan_create(2, 0, plain) == lib.PC_OK
    try:  # an ordinary plan still names IN / OUT / SCRATCH only
        assert lib.pc_plan_append(plain[0], _op(lib.PC_OP_SEND, 1, 3, -1), ffi.NULL, 0, ffi.NULL) == lib.PC_ERR_ARG
    finally:
        lib.pc_plan_free(plain[0])
