"""Shared state with bit parity: the hash, the majority/fetch planning, and
real syncs (divergent peers, stale peers, newcomers, a source dying in the
middle of a transfer, torch tensors, layout mismatches)."""
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import pycoll
from elastic_util import Cluster, arm
from pycoll.control import parity
from pycoll.core.native import ffi, lib
from pycoll.comm.shared_state import SEED, hash_address, hash_arrays
from pycoll.testing import KILLED

BLOCK = 64 * 1024


# ---- the hash -----------------------------------------------------------------
def _h(b, threads=0):
    a = np.frombuffer(bytes(b), np.uint8) if not isinstance(b, np.ndarray) else b
    return hash_arrays([a], threads=threads)[0]


@settings(max_examples=200, deadline=None)
@given(data=st.binary(min_size=1, max_size=3000), bit=st.integers(0, 1 << 30))
def test_flipping_any_bit_changes_the_hash(data, bit):
    a = np.frombuffer(data, np.uint8).copy()
    before = _h(a)
    assert _h(a.copy()) == before  # deterministic, content only
    pos = bit % (8 * a.size)
    a[pos // 8] ^= np.uint8(1 << (pos % 8))
    assert _h(a) != before


@pytest.mark.parametrize("n", [0, 1, 7, 8, 31, 32, 33, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 5])
def test_lengths_and_block_boundaries(n):
    rng = np.random.default_rng(n)
    a = rng.integers(0, 256, n, dtype=np.uint8)
    h = _h(a)
    if n:
        b = a.copy()
        b[-1] ^= 1  # the last byte of the last (partial) block counts
        assert _h(b) != h
    assert _h(np.zeros(n + 1, np.uint8)) != _h(np.zeros(n, np.uint8))  # zero padding is not free
    single = ffi.new("uint64_t *")
    lib.pc_hash64(ffi.cast("void *", a.ctypes.data), a.nbytes, SEED, single)
    assert single[0] == h


def test_value_does_not_depend_on_threads_or_batching():
    rng = np.random.default_rng(1)
    arrays = [rng.standard_normal(n) for n in (3, 1 << 20, 700001, 0, 5)]  # 8 MiB: parallel path
    together = {t: hash_arrays(arrays, threads=t) for t in (1, 2, 4, 0)}
    assert len({tuple(v) for v in together.values()}) == 1
    assert together[1] == [_h(a, threads=1) for a in arrays]
    assert together[1][1] == hash_address(arrays[1].ctypes.data, arrays[1].nbytes, threads=3)


def test_hashes_bytes_not_types():
    a = np.arange(100, dtype=np.float32)
    assert _h(a) == _h(a.view(np.uint8)) == _h(a.view(np.int32))
    torch = pytest.importorskip("torch")
    assert _h(a) == hash_arrays([torch.from_numpy(a.copy())])[0]


# ---- planning: majority, fetchers, striping ---------------------------------------
reports_strategy = st.integers(1, 9).flatmap(lambda n: st.tuples(
    st.lists(st.integers(0, 3), min_size=n, max_size=n),                               # revision per rank
    st.lists(st.lists(st.integers(0, 2), min_size=3, max_size=3), min_size=n, max_size=n),  # hash id per tensor
    st.lists(st.integers(0, 3 << 20), min_size=3, max_size=3)))                       # bytes per tensor


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=reports_strategy)
def test_plan_sync_invariants(case):
    revisions, hash_ids, sizes = case
    names = ["t0", "t1", "t2"]
    reports = {r: {"revision": revisions[r],
                   "tensors": [[names[i], ["uint8", sizes[i], sizes[i]], 1000 + hash_ids[r][i]] for i in range(3)]}
               for r in range(len(revisions))}
    plan = parity.plan_sync(reports)
    top = max(revisions)
    assert plan["revision"] == top
    current = [r for r in reports if revisions[r] == top]
    served = {}
    for i, name in enumerate(names):
        counts = {}
        for r in current:
            counts[hash_ids[r][i]] = counts.get(hash_ids[r][i], 0) + 1
        best = max(counts.values())
        want = 1000 + min((hash_ids[r][i] for r in current if counts[hash_ids[r][i]] == best),
                          key=lambda h: min(r for r in current if hash_ids[r][i] == h))
        assert plan["majority"][name] == want
        holders = {r for r in reports if 1000 + hash_ids[r][i] == want}
        fetchers = {r for r in reports if r not in holders}
        assert set(plan["fetchers"].get(name, [])) == fetchers
        for r in reports:
            entries = [pieces for idx, pieces in plan["fetch"][r] if idx == i]
            if r not in fetchers:
                assert not entries
                continue
            (pieces,) = entries
            covered = sorted((off, length) for _, off, length in pieces)
            pos = 0
            for off, length in covered:  # pieces tile the tensor exactly
                assert off == pos and length > 0
                pos += length
            assert pos == sizes[i]
            assert all(src in holders for src, _, _ in pieces)
            if sizes[i] >= 2 * parity.MIN_PIECE and len(holders) >= 2:
                assert len({src for src, _, _ in pieces}) >= 2, "large fetches are striped across holders"
            for src, off, length in pieces:
                served.setdefault((src, i), []).append([r, off, length])
    mirrored = {(src, idx): sorted(map(tuple, items)) for src in reports for idx, items in plan["serve"][src]}
    assert mirrored == {k: sorted(map(tuple, v)) for k, v in served.items()}


def test_plan_sync_rejects_layout_mismatch():
    ok = {"tensors": [["a", ["float32", 4, 16], 1]], "revision": 0}
    bad = {"tensors": [["a", ["float64", 4, 32], 1]], "revision": 0}
    with pytest.raises(parity.LayoutMismatch, match="rank 2"):
        parity.plan_sync({0: ok, 1: ok, 2: bad})
    with pytest.raises(parity.LayoutMismatch, match="missing"):
        parity.plan_sync({0: ok, 1: ok, 2: {"tensors": [], "revision": 0}})


# ---- real syncs -------------------------------------------------------------------
def _model(seed=0):
    rng = np.random.default_rng(seed)
    return {"w": rng.standard_normal(300_000).astype(np.float32),       # 1.2 MB: striped
            "step": np.array([12345], np.int64),
            "h": rng.standard_normal(7).astype(np.float16)}


def _sync_divergent(comm, role):
    state = _model()
    revision = 5
    if role == "flipped":
        state["w"].view(np.uint32)[123_456] ^= 1  # one bit
    elif role == "stale":
        state = {k: np.zeros_like(v) for k, v in state.items()}
        revision = 2
    before = comm.verify_parity(state, revision)
    res = comm.sync_shared_state(state, revision)
    after = comm.verify_parity(state, res.revision)
    return ({k: v.tobytes() for k, v in state.items()}, res.revision, sorted(res.fetched), res.bytes_received,
            res.sources, res.fetchers, before.ok, before.differ, before.behind, after.ok, res.bytes_sent,
            list(comm.members))


@pytest.mark.timeout(90)
def test_sync_repairs_divergent_and_stale_peers_from_the_majority():
    roles = {"s0": "good", "s1": "good", "s2": "stale", "s3": "flipped", "s4": "good"}
    with Cluster(min_world_size=5) as c:
        for n, role in roles.items():
            c.spawn(n, _sync_divergent, role)
        res = dict(zip(roles, c.results(list(roles), timeout=80)))
    want = {k: v.tobytes() for k, v in _model().items()}
    sizes = {k: len(v) for k, v in want.items()}
    rank = {n: i for i, n in enumerate(res["s0"][11])}
    for n, r in res.items():
        state, revision, fetched, received, sources, fetchers, ok0, differ0, behind0, ok1, _, _ = r
        assert state == want, f"{n} does not hold the majority bytes"
        assert revision == 5 and ok1 and not ok0
        expect = {"good": [], "stale": ["h", "step", "w"], "flipped": ["w"]}[roles[n]]
        assert fetched == expect and received == sum(sizes[k] for k in expect)
        if roles[n] == "stale":
            assert len(sources["w"]) >= 2, "a large tensor comes from several holders at once"
        # before: the check without fixing saw exactly the damage
        assert behind0 == [rank["s2"]]
        assert differ0 == {"w": sorted([rank["s2"], rank["s3"]]), "step": [rank["s2"]], "h": [rank["s2"]]}
        assert fetchers == differ0, "the group-wide list of who fetched what"
    assert sum(r[10] for r in res.values()) == sum(r[3] for r in res.values()), "bytes sent = bytes received"


def _newcomer(comm, initial):
    state = _model() if initial else {k: np.zeros_like(v) for k, v in _model().items()}
    revision = 9 if initial else -1
    if initial:
        res = comm.sync_shared_state(state, revision)  # nothing to do among the initial members
        assert not res.fetched and not res.bytes_sent
        for _ in range(1000):
            flag = np.array([comm.pending_joiners()], np.int64)
            comm.all_reduce(flag, op="min")
            if flag[0]:
                break
            time.sleep(0.01)
        comm.update_topology()
    res = comm.sync_shared_state(state, revision)
    return {k: v.tobytes() for k, v in state.items()}, res.revision, sorted(res.fetched), res.sources


@pytest.mark.timeout(90)
def test_newcomer_receives_the_model_striped_across_holders():
    with Cluster(min_world_size=3) as c:
        for n in ("m0", "m1", "m2"):
            c.spawn(n, _newcomer, True)
        while c.coordinator.epoch < 1:
            time.sleep(0.01)
        c.spawn("new", _newcomer, False)
        res = dict(zip(["m0", "m1", "m2", "new"], c.results(["m0", "m1", "m2", "new"], timeout=80)))
    want = {k: v.tobytes() for k, v in _model().items()}
    for n, (state, revision, fetched, sources) in res.items():
        assert state == want and revision == 9
        assert fetched == (["h", "step", "w"] if n == "new" else [])
    assert len(res["new"][3]["w"]) == 3  # 1.2 MB from all three holders


def _source_dies(comm, victim):
    state = _model()
    big = np.random.default_rng(5).standard_normal(4 << 20)  # 32 MiB: long enough to die inside
    state["big"] = big if comm.name != "fetcher" else np.zeros_like(big)
    if comm.name == "fetcher":
        state["w"][:] = 0
    if comm.name == victim:
        arm("during:state_transfer")
    res = comm.sync_shared_state(state, 1)
    digest = hash_arrays([state[k] for k in sorted(state)])
    return digest, res.attempts, sorted(res.fetched), comm.world_size


@pytest.mark.timeout(120)
def test_sync_restarts_over_the_survivors_when_a_source_dies_mid_transfer():
    names = ["a0", "a1", "a2", "fetcher"]
    with Cluster(min_world_size=4) as c:
        for n in names:
            c.spawn(n, _source_dies, "a1")
        res = dict(zip(names, c.results(names, timeout=110)))
    assert res["a1"] == KILLED
    digests = {tuple(res[n][0]) for n in ("a0", "a2", "fetcher")}
    assert len(digests) == 1, "survivors are not bit-identical"
    # the second attempt fetches what the first left unfinished (bytes land in place, so a tensor
    # that arrived whole before the source died already matches the majority); the call reports
    # both, everything it received
    assert res["fetcher"][1] == 2 and res["fetcher"][2] == ["big", "w"] and res["fetcher"][3] == 3


def _layout(comm):
    state = _model()
    if comm.rank == 0:
        state["extra"] = np.ones(3)
    try:
        comm.sync_shared_state(state, 0)
    except pycoll.InvalidArgument as exc:
        return str(exc)
    return None


@pytest.mark.timeout(60)
def test_layout_mismatch_is_reported_on_every_peer():
    names = ["l0", "l1", "l2"]
    with Cluster(min_world_size=3) as c:
        for n in names:
            c.spawn(n, _layout)
        res = c.results(names, timeout=50)
    assert all(r is not None and "layout" in r and "extra" in r for r in res), res


def _torch_state(comm):
    import torch
    g = torch.Generator().manual_seed(3)
    state = {"weight": torch.randn(64, 33, generator=g), "bias": torch.randn(33, generator=g).to(torch.bfloat16)}
    if comm.rank == 1:
        state["weight"][5, 7] += 1.0
    res = comm.sync_shared_state(state, 0)
    return {k: v.view(torch.uint8).numpy().tobytes() if v.dtype != torch.bfloat16 else
            v.view(torch.int16).numpy().tobytes() for k, v in state.items()}, res.fetched


@pytest.mark.timeout(60)
def test_torch_tensors_sync_in_place():
    pytest.importorskip("torch")
    names = ["t0", "t1", "t2"]
    # a peer importing torch can hold the GIL past the 2 s default heartbeat limit on a loaded host
    with Cluster(heartbeat_timeout=10.0, min_world_size=3) as c:
        for n in names:
            c.spawn(n, _torch_state)
        res = c.results(names, timeout=50)
    assert len({tuple(sorted(r[0].items())) for r in res}) == 1
    assert sorted(len(r[1]) for r in res) == [0, 0, 1]
