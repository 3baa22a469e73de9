"""The torch ProcessGroup's new operations on pycoll's C plans: reduce, gather, scatter,
all_to_all (list, single with equal and uneven splits), the coalesced forms, all_gather into
separate tensors, the bitwise ops
and bool tensors, and point-to-point (send/recv with tags, isend/irecv, batch_isend_irecv),
each compared with Gloo on the same inputs in the same run (bit for bit where the bytes are
only moved or the op is exact; a float reduce is compared bit for bit with the rank-order
NumPy chain the plan runs, and with Gloo up to rounding)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is an optional extra (pip install -e '.[torch]')")
import torch.distributed as dist  # noqa: E402

import pycoll  # noqa: E402
import pycoll.testing  # noqa: E402


def _raw(t):
    return t.contiguous().numpy().tobytes()


def _x(rank, count, dtype=torch.float32, seed=0):
    g = np.random.default_rng([seed, rank])
    if dtype == torch.bool:
        return torch.tensor(g.integers(0, 2, count).astype(bool))
    if dtype.is_floating_point:
        return torch.tensor(g.normal(0, 10, count), dtype=dtype)
    return torch.tensor(g.integers(-100, 100, count)).to(dtype)


def _ops(group):
    """Every new operation once on ``group`` (None: the default, pycoll); raw outputs."""
    rank, n = dist.get_rank(), dist.get_world_size()
    out = {}
    # reduce: every op, every root
    for i, (op, dtype) in enumerate([("SUM", torch.float32), ("PRODUCT", torch.int64), ("MIN", torch.float64),
                                     ("MAX", torch.int32), ("BAND", torch.int64), ("BOR", torch.uint8),
                                     ("BXOR", torch.int16), ("SUM", torch.bool), ("MAX", torch.bool)]):
        if dtype == torch.int16 and group is not None:
            dtype = torch.int32  # (Gloo lacks int16)
        x = _x(rank, 1000 + i, dtype, seed=i)
        dist.reduce(x, dst=i % n, op=getattr(dist.ReduceOp, op), group=group)
        out[f"reduce {op} {dtype}"] = _raw(x) if rank == i % n else None
    # all_reduce with the bitwise ops and bool
    for op in ("BAND", "BOR", "BXOR"):
        x = _x(rank, 333, torch.int32, seed=7)
        dist.all_reduce(x, op=getattr(dist.ReduceOp, op), group=group)
        out[f"all_reduce {op}"] = _raw(x)
    x = _x(rank, 101, torch.bool, seed=8)
    dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    out["all_reduce bool"] = _raw(x)
    # gather and scatter (separate tensors on the root)
    x = _x(rank, 17, torch.float32, seed=9)
    outs = [torch.zeros(17) for _ in range(n)] if rank == n - 1 else None
    dist.gather(x, outs, dst=n - 1, group=group)
    out["gather"] = b"".join(_raw(o) for o in outs) if outs else None
    y = torch.zeros(5, dtype=torch.int64)
    ins = [torch.arange(5) * 10 + r for r in range(n)] if rank == 0 else None
    dist.scatter(y, ins, src=0, group=group)
    out["scatter"] = _raw(y)
    # all_to_all: list (uneven sizes), single (equal, and uneven rows of a 2-D tensor)
    ins = [torch.full((3,), float(rank * 10 + r)) for r in range(n)]
    outs = [torch.zeros(3) for r in range(n)]
    dist.all_to_all(outs, ins, group=group)
    out["all_to_all"] = b"".join(_raw(o) for o in outs)
    if group is None:  # sizes that differ per pair (Gloo refuses them): checked against the sender's values
        ins = [torch.full((rank + r + 1,), float(rank * 10 + r)) for r in range(n)]
        outs = [torch.zeros(r + rank + 1) for r in range(n)]
        dist.all_to_all(outs, ins, group=group)
        out["all_to_all uneven ok"] = all(bool((o == s * 10 + rank).all()) for s, o in enumerate(outs))
        # the same with inputs and outputs consecutive slices of one buffer each (no copies)
        ins = list(torch.cat(ins).split([rank + r + 1 for r in range(n)]))
        buf = torch.zeros(sum(r + rank + 1 for r in range(n)))
        outs = list(buf.split([r + rank + 1 for r in range(n)]))
        dist.all_to_all(outs, ins, group=group)
        out["all_to_all uneven ok"] &= all(bool((o == s * 10 + rank).all()) for s, o in enumerate(outs))
    x = torch.arange(4 * n, dtype=torch.float64) + 100 * rank
    y = torch.zeros(4 * n, dtype=torch.float64)
    dist.all_to_all_single(y, x, group=group)
    out["all_to_all_single"] = _raw(y)
    in_splits = [(rank + r) % 3 for r in range(n)]
    out_splits = [(r + rank) % 3 for r in range(n)]
    x = torch.arange(sum(in_splits) * 2, dtype=torch.int32).reshape(-1, 2) + 1000 * rank
    y = torch.zeros(sum(out_splits), 2, dtype=torch.int32)
    dist.all_to_all_single(y, x, out_splits, in_splits, group=group)
    out["all_to_all_single uneven"] = _raw(y)
    # coalesced
    ts = [_x(rank, c, torch.int64, seed=c) for c in (3, 50, 1, 0, 9)]  # (one dtype: torch requires it)
    dist.all_reduce_coalesced(ts, group=group)
    out["all_reduce_coalesced"] = [_raw(t) for t in ts]
    ins = [torch.full((c,), float(rank + c)) for c in (1, 4, 9)]
    outs = [[torch.zeros(c) for c in (1, 4, 9)] for _ in range(n)]
    dist.all_gather_coalesced(outs, ins, group=group)
    out["all_gather_coalesced"] = [_raw(t) for o in outs for t in o]
    # all_gather into separate tensors: small, and large (a ring whose plan runs straight into them)
    for c in (5, 300001):
        x = _x(rank, c, torch.float32, seed=c)
        outs = [torch.zeros(c) for _ in range(n)]
        dist.all_gather(outs, x, group=group)
        out[f"all_gather list {c}"] = [_raw(t) for t in outs]
    # point-to-point: tags, a ring of isend/irecv posted receive-first, a batch
    right, left = (rank + 1) % n, (rank - 1) % n
    if rank == 0:
        for d in range(1, n):
            dist.send(torch.full((7,), float(d)), d, group=group, tag=d)
    else:
        r = torch.zeros(7)
        dist.recv(r, 0, group=group, tag=rank)
        out["recv tag"] = _raw(r)
    r = torch.zeros(300000)  # larger than a connection's buffer
    w1 = dist.irecv(r, left, group=group)
    w2 = dist.isend(torch.full((300000,), float(rank)), right, group=group)
    w1.wait()
    w2.wait()
    out["ring"] = _raw(r)
    r = torch.zeros(11, dtype=torch.int64)
    reqs = dist.batch_isend_irecv([dist.P2POp(dist.irecv, r, left, group=group, tag=3),
                                   dist.P2POp(dist.isend, torch.arange(11) + rank, right, group=group, tag=3)])
    for q in reqs:
        q.wait()
    out["batch"] = _raw(r)
    # receive from any source, as torch's own test: rank 0 takes 2(n-1) frames from whoever comes
    if rank == 0:
        senders = []
        for k in range(2 * (n - 1)):
            t = torch.zeros(10)
            if k % 2:
                w = dist.irecv(t, group=group)
                w.wait()
                src = w._source_rank()
            else:
                src = dist.recv(t, group=group)
            assert bool((t == src).all()), (src, t)
            senders.append(src)
        out["any source"] = sorted(senders)
    else:
        for _ in range(2):
            dist.send(torch.full((10,), float(rank)), 0, group=group)
    return out


def _both():
    gloo = dist.new_group(backend="gloo")
    mine, theirs = _ops(None), _ops(gloo)
    dist.barrier()
    return mine, theirs


def _rank_order_sum(n, count, seed):
    acc = _x(0, count, torch.float32, seed).numpy()
    for r in range(1, n):
        acc = (acc + _x(r, count, torch.float32, seed).numpy()).astype(np.float32)
    return acc.tobytes()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("n", [2, 3])
def test_new_operations_equal_gloo(n):
    results = pycoll.testing.run(_both, n, init="torch:pycoll", timeout=240)
    for r, (mine, theirs) in enumerate(results):
        for key, value in mine.items():
            if key.startswith("reduce SUM torch.float32"):
                if value is not None:
                    assert value == _rank_order_sum(n, 1000, 0), f"rank {r}: {key} is not the rank-order sum"
                    np.testing.assert_allclose(np.frombuffer(value, np.float32),
                                               np.frombuffer(theirs[key], np.float32), rtol=1e-5, atol=1e-4)
                continue
            if key == "all_to_all uneven ok":
                assert value is True, f"rank {r}: uneven all_to_all"
                continue
            key_gloo = key.replace("torch.int16", "torch.int32")
            if key_gloo != key:  # pycoll ran int16, Gloo int32: compare the values
                if value is not None:
                    assert np.array_equal(np.frombuffer(value, np.int16), np.frombuffer(theirs[key_gloo], np.int32))
                continue
            if "bool" in key and value is not None:
                # the same truth values; pycoll's bytes are 0 or 1, Gloo adds bool bytes (2 reads as True)
                mine_b, theirs_b = np.frombuffer(value, np.uint8), np.frombuffer(theirs[key], np.uint8)
                assert set(np.unique(mine_b)) <= {0, 1}
                assert np.array_equal(mine_b != 0, theirs_b != 0), f"rank {r}: {key} differs from Gloo"
                continue
            assert value == theirs[key], f"rank {r}: {key} differs from Gloo"


def _dead_peer(victim):
    """A peer dies while the others gather from it: every survivor's call raises."""
    rank, n = dist.get_rank(), dist.get_world_size()
    x = torch.full((3 << 18,), float(rank))
    try:
        for _ in range(30):
            outs = [torch.zeros_like(x) for _ in range(n)] if rank == 0 else None
            dist.gather(x, outs, dst=0)
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        return type(exc).__name__
    return None


@pytest.mark.timeout(150)
def test_peer_death_in_gather_fails_every_survivor():
    n, victim = 3, 2
    results = pycoll.testing.run(_dead_peer, n, args=(victim,), init="torch:pycoll", timeout=120,
                                 kill={victim: "during:gather"}, return_exceptions=True)
    assert results[victim] == pycoll.testing.KILLED
    for r in (0, 1):
        assert results[r] == "PeerFailure", f"rank {r}: {results[r]}"
