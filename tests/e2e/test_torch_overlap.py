"""Overlap (pycoll.torch.lanes): a torch group's async collectives on several lanes at once
(PYCOLL_TORCH_OVERLAP). Results are exact and bit-identical to one lane; calls that touch the same
bytes stay ordered; the engine is seen running several plans at once (one lane: never); a peer's
death with buckets in flight fails every one of them on every survivor, then the group."""
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is an optional extra (pip install -e '.[torch]')")
import torch.distributed as dist  # noqa: E402

import pycoll  # noqa: E402
import pycoll.testing  # noqa: E402
from pycoll.testing import KILLED  # noqa: E402

SIZES = (1, 1000, 70_001, 300_000, 5, 131_072)  # elements: tiny to 1.2 MiB, odd sizes included


def _data(rank, i, n):
    g = np.random.default_rng(1000 * rank + i)
    return torch.from_numpy(g.standard_normal(n).astype(np.float32))


def _ints(rank, i, n):
    return torch.from_numpy(np.arange(n, dtype=np.int64) * (i + 1) + rank * 7 - i)


def _in_flight():
    """Many async collectives at once, mixed kinds, then wait for all."""
    from pycoll.core import engine
    r, n = dist.get_rank(), dist.get_world_size()
    engine.peak_running(reset=True)
    floats = [_data(r, i, s) for i, s in enumerate(SIZES)]
    ints = [_ints(r, i, s) for i, s in enumerate(SIZES)]
    gathered = torch.zeros(n * 4096, dtype=torch.int64)
    scattered = torch.zeros(3001, dtype=torch.int64)
    rs_in = torch.arange(n * 3001, dtype=torch.int64) * (r + 1)
    bcast = torch.full((9000,), float(r))
    twice = torch.full((5000,), float(r + 1), dtype=torch.float64)  # reduced twice: the calls stay ordered
    a2a_in = torch.arange(n * 6, dtype=torch.int32) + 100 * r
    a2a_out = torch.zeros(n * 6, dtype=torch.int32)
    works = []
    for f, i in zip(floats, ints):
        works.append(dist.all_reduce(f, async_op=True))
        works.append(dist.all_reduce(i, op=dist.ReduceOp.MAX if len(works) % 3 else dist.ReduceOp.SUM,
                                     async_op=True))
    works.append(dist.all_reduce(twice, async_op=True))
    works.append(dist.all_gather_into_tensor(gathered, torch.arange(4096, dtype=torch.int64) + r, async_op=True))
    works.append(dist.all_to_all_single(a2a_out, a2a_in, async_op=True))  # lane 0, untagged
    works.append(dist.reduce_scatter_tensor(scattered, rs_in, async_op=True))
    works.append(dist.broadcast(bcast, src=n - 1, async_op=True))
    works.append(dist.all_reduce(twice, async_op=True))
    for w in works:
        w.wait()
    dist.barrier()
    peak = engine.peak_running()
    x = torch.ones(4)
    dist.all_reduce(x)  # a blocking call after them
    return ([f.numpy().tobytes() for f in floats], [i.tolist() for i in ints], gathered.tolist(), scattered.tolist(),
            bcast.tolist(), twice.tolist(), a2a_out.tolist(), x.tolist(), peak)


def _expected_ints(n):
    out = []
    for k, s in enumerate(SIZES):
        each = [_ints(r, k, s).numpy() for r in range(n)]
        # works[2k + 1]: MAX unless its index (2k + 1) is a multiple of 3 (the list had 2k + 1 items then)
        op_max = (2 * k + 1) % 3 != 0
        out.append((np.max(each, axis=0) if op_max else np.sum(each, axis=0)).tolist())
    return out


@pytest.mark.timeout(240)
@pytest.mark.parametrize("n", [2, 3])
def test_results_are_exact_and_bit_identical_to_one_lane(n):
    # PYCOLL_CALIBRATE=0: the same algorithm on every launch, so the same summation order
    runs = {lanes: pycoll.testing.run(_in_flight, n, init="torch:pycoll", timeout=100,
                                      env={"PYCOLL_TORCH_OVERLAP": str(lanes), "PYCOLL_CALIBRATE": "0"})
            for lanes in (1, 3)}
    want_ints = _expected_ints(n)
    for lanes, res in runs.items():
        for r, (floats, ints, gathered, scattered, bcast, twice, a2a, x, peak) in enumerate(res):
            assert floats == runs[1][0][0], f"{lanes} lanes, rank {r}: float sums differ from one lane's"
            for k, s in enumerate(SIZES):
                want = np.sum([_data(q, k, s).numpy().astype(np.float64) for q in range(n)], axis=0)
                np.testing.assert_allclose(np.frombuffer(floats[k], np.float32), want, rtol=1e-5, atol=1e-5)
            assert ints == want_ints
            assert gathered == [v + q for q in range(n) for v in range(4096)]
            assert scattered == [(r * 3001 + j) * n * (n + 1) // 2 for j in range(3001)]
            assert bcast == [float(n - 1)] * 9000
            total = n * (n + 1) // 2
            assert twice == [float(total * n)] * 5000  # (sum over ranks) then that sum n times
            assert a2a == [100 * q + r * 6 + j for q in range(n) for j in range(6)]
            assert x == [float(n)] * 4
            if lanes == 1:
                assert peak == 1, "one lane runs one plan at a time"


def _held_back():
    """Rank 0 issues four buckets while rank 1 is still busy: on rank 0 every lane sits inside the
    engine, waiting for rank 1, at the same time."""
    from pycoll.core import engine
    r = dist.get_rank()
    dist.barrier()
    engine.peak_running(reset=True)
    if r == 1:
        time.sleep(1.5)
    ts = [torch.full((1 << 16,), float(r + i)) for i in range(4)]
    works = [dist.all_reduce(t, async_op=True) for t in ts]
    for w in works:
        w.wait()
    return engine.peak_running(), [float(t[0]) for t in ts]


@pytest.mark.timeout(200)
def test_buckets_in_flight_run_in_the_engine_at_once_not_one_after_another():
    for lanes in (1, 2, 4):
        res = pycoll.testing.run(_held_back, 2, init="torch:pycoll", timeout=60,
                                 env={"PYCOLL_TORCH_OVERLAP": str(lanes)})
        for peak, sums in res:
            assert sums == [1.0, 3.0, 5.0, 7.0]
        # rank 0 waited 1.5 s for rank 1 with all four issued: each lane was inside the engine
        assert res[0][0] == lanes, f"{lanes} lane(s): {res[0][0]} plans ran at once on rank 0"


def _death_in_flight():
    """Rank 2 is killed 2 ms into its 3rd all_reduce (fault point), with 4 buckets in flight on every
    rank over 2 or 4 lanes; on each survivor a bucket that every rank finished before that is done,
    the others fail, then the group is unusable. (Which buckets finish depends on the lanes' timing:
    with 4 MiB buckets, no longer moved to huge pages on every call, the 3rd could finish within the
    2 ms.)"""
    r = dist.get_rank()
    ts = [torch.full((1 << 21,), float(r + 1)) for _ in range(4)]
    start = time.monotonic()
    works = []
    for t in ts:  # a slow rank may learn of the death before it issues its last buckets: they raise at once
        try:
            works.append(dist.all_reduce(t, async_op=True))
        except pycoll.CollectiveError as exc:
            works.append(exc)
    outcome = []
    for w in works:
        try:
            if isinstance(w, Exception):
                raise w
            w.wait()
            outcome.append("ok")
        except pycoll.CollectiveError as exc:
            outcome.append(type(exc).__name__)
    waited = time.monotonic() - start
    try:
        dist.all_reduce(torch.ones(4))
        after = "ok"
    except pycoll.PeerFailure as exc:
        after = "unusable" if "unusable" in str(exc) else "failed"
    return outcome, after, waited


@pytest.mark.timeout(200)
@pytest.mark.parametrize("lanes", [2, 4])
def test_a_death_with_buckets_in_flight_fails_them_on_every_survivor(lanes):
    out = pycoll.testing.run(_death_in_flight, 4, init="torch:pycoll", timeout=120, return_exceptions=True,
                             kill={2: ("during:all_reduce", 3)},
                             env={"PYCOLL_TORCH_OVERLAP": str(lanes), "PYCOLL_TIMEOUT": "60"})
    assert out[2] == KILLED, out
    for r in (0, 1, 3):
        assert not isinstance(out[r], Exception), f"rank {r}: {out[r]!r}"
        outcome, after, waited = out[r]
        # every bucket finished or raised PeerFailure (no hang, no other error); the one rank 2 died
        # in (an 8 MiB all-reduce of 4 ranks takes longer than the 2 ms) failed
        assert set(outcome) <= {"ok", "PeerFailure"} and "PeerFailure" in outcome, (r, outcome)
        assert after == "unusable", (r, after)
        assert waited < 45, f"rank {r}: the failures took {waited:.1f} s (the timeout is 60 s)"


def test_overlap_lanes_are_read_from_the_environment(monkeypatch):
    from pycoll.torch import backend
    monkeypatch.delenv("PYCOLL_TORCH_OVERLAP", raising=False)
    assert backend.overlap_lanes() == backend.DEFAULT_LANES
    monkeypatch.setenv("PYCOLL_TORCH_OVERLAP", "3")
    assert backend.overlap_lanes() == 3
    for bad in ("0", "9", "two"):
        monkeypatch.setenv("PYCOLL_TORCH_OVERLAP", bad)
        with pytest.raises(pycoll.InvalidArgument, match="PYCOLL_TORCH_OVERLAP"):
            backend.overlap_lanes()


def test_spans_see_shared_bytes_of_views():
    from pycoll.torch.lanes import _overlap, spans
    base = torch.zeros(100)
    a, b, c = base[:50], base[50:], base[40:60]
    assert not _overlap(spans(a), spans(b))
    assert _overlap(spans(a), spans(c)) and _overlap(spans([[b]]), spans(c))
    strided = base.view(10, 10)[:, 0]  # every 10th element: spans 0..90
    assert _overlap(spans(strided), spans(base[90:91])) and not _overlap(spans(strided), spans(base[91:]))
    assert spans(torch.zeros(0)) == []


def _ddp_steps():
    """A few DDP steps with small buckets (several in flight per backward; 3 ranks: the
    summation order shows)."""
    from torch import nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 8))
    ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.1)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(dist.get_rank())
    for _ in range(4):
        opt.zero_grad()
        x, y = torch.randn(16, 64, generator=g), torch.randn(16, 8, generator=g)
        nn.functional.mse_loss(ddp(x), y).backward()
        opt.step()
    return [p.detach().numpy().tobytes() for p in model.parameters()]


@pytest.mark.timeout(200)
def test_ddp_on_lanes_trains_bit_identically_to_one_lane():
    runs = [pycoll.testing.run(_ddp_steps, 3, init="torch:pycoll", timeout=90,
                               env={"PYCOLL_TORCH_OVERLAP": str(lanes), "PYCOLL_CALIBRATE": "0"})
            for lanes in (1, 4)]
    for res in runs:
        assert res[0] == res[1] == res[2], "ranks hold different parameters"
    assert runs[0][0] == runs[1][0], "4 lanes trained other parameters than one lane"
