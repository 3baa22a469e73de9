"""The torch backend's staging (pycoll/torch/staging.py) and the tensors it lets in: non-contiguous
tensors (one temporary contiguous copy, as Gloo makes), device tensors through pooled host buffers
(the CUDA path, run here on the fake device of tests/support/fake_device.py: no GPU needed), and
sparse all_reduce (as Gloo: every rank's indices and values gathered, summed, coalesced)."""
import pytest

torch = pytest.importorskip("torch", reason="torch is an optional extra (pip install -e '.[torch]')")
import torch.distributed as dist  # noqa: E402

import pycoll.testing  # noqa: E402


def _raw(t):
    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


# ---- non-contiguous tensors -------------------------------------------------------------------
def _noncontiguous():
    gloo = dist.new_group(backend="gloo")
    r, n = dist.get_rank(), dist.get_world_size()
    out = {}
    for name, g in (("pycoll", None), ("gloo", gloo)):
        g_ = torch.Generator().manual_seed(r)
        t = torch.randint(-99, 99, (6, 4), generator=g_).float().t()  # non-contiguous; exact sums
        before = t.data_ptr()
        dist.all_reduce(t, group=g)
        b = torch.arange(40.).reshape(4, 10)[:, ::3] * (r + 1)  # strided columns
        dist.broadcast(b, src=1, group=g)
        w = dist.all_reduce(c := torch.randint(-99, 99, (5, 3), generator=g_).double().t(), async_op=True, group=g)
        fut = w.get_future().wait()
        x = (torch.arange(6.).reshape(2, 3) + 10 * r).t()
        outs = [torch.empty(2, 3).t() for _ in range(n)]
        dist.all_gather(outs, x, group=g)
        same_tensor = fut[0] is c or fut[0].data_ptr() == c.data_ptr()
        out[name] = (_raw(t), t.data_ptr() == before, _raw(b), _raw(c), same_tensor, [_raw(o) for o in outs])
    return out


@pytest.mark.timeout(90)
def test_non_contiguous_tensors_give_gloos_results_in_the_callers_tensor():
    for res in pycoll.testing.run(_noncontiguous, 3, init="torch:pycoll", timeout=80):
        mine, gloo = res["pycoll"], res["gloo"]
        assert mine[1] and mine[4], "the result lands in the caller's tensor (and the future holds it)"
        assert mine == gloo


# ---- sparse all_reduce ------------------------------------------------------------------------
def _sparse():
    gloo = dist.new_group(backend="gloo")
    r = dist.get_rank()
    out = {}
    for name, g in (("pycoll", None), ("gloo", gloo)):
        gen = torch.Generator().manual_seed(100 + r)
        nnz = [5, 0, 9][r]  # different nnz per rank, one rank empty; duplicate indices on purpose
        idx = torch.randint(0, 7, (2, nnz), generator=gen)
        s = torch.sparse_coo_tensor(idx, torch.randint(-9, 9, (nnz, 3), generator=gen).float(), (7, 6, 3))
        dist.all_reduce(s, group=g)
        ints = torch.sparse_coo_tensor(torch.tensor([[r, 2]]), torch.tensor([r + 1, 7], dtype=torch.int64), (4,))
        dist.all_reduce(ints, group=g)
        out[name] = (_raw(s.indices()), _raw(s.values()), s.is_coalesced(), ints.to_dense().tolist())
    try:
        dist.all_reduce(torch.sparse_coo_tensor(torch.tensor([[0]]), torch.tensor([1.0]), (2,)), op=dist.ReduceOp.MAX)
        out["max"] = "no error"
    except ValueError as exc:
        out["max"] = str(exc)
    return out


@pytest.mark.timeout(90)
def test_sparse_all_reduce_is_gloos_sum_bit_for_bit():
    for res in pycoll.testing.run(_sparse, 3, init="torch:pycoll", timeout=80):
        assert res["pycoll"] == res["gloo"]
        assert res["pycoll"][3] == [1, 2, 3 + 21, 0]
        assert "SUM only" in res["max"]


# ---- device tensors through the fake device ------------------------------------------------------
def _fake_device():
    from fake_device import FakeCopier, on_device
    from pycoll.torch import staging
    copier = FakeCopier()
    staging.install_copier(copier)
    staging.SEGMENT_BYTES = 4096  # so a 40 KB tensor goes in 10 segments (plus a short one)
    r, n = dist.get_rank(), dist.get_world_size()
    res = {}
    count = 10 * 1024 + 7
    x = torch.arange(count, dtype=torch.float32) * (r + 1)
    dev = on_device(x.clone())
    dist.all_reduce(dev)  # segmented
    res["sum"] = torch.equal(dev, torch.arange(count, dtype=torch.float32) * (n * (n + 1) // 2))
    moves = [k for k, _ in copier.log if k != "sync"]
    res["segments"] = (moves.count("to_host"), moves.count("to_device"))
    # floats: staging never changes the bits of the same all_reduces on host memory (a segmented
    # all_reduce is one all_reduce per segment: at 3+ ranks the float sums may round differently
    # from one whole-tensor all_reduce, the same on every rank)
    g = torch.Generator().manual_seed(r)
    plain = torch.randn(count, generator=g)
    staged = on_device(plain.clone())
    for piece in plain.split(4096 // 4):
        dist.all_reduce(piece)
    dist.all_reduce(staged)
    res["bits"] = torch.equal(plain.view(torch.int32), staged.view(torch.int32))
    # the pool: repeated calls reuse the buffers of the first
    made = staging.pool_for(copier).made
    for _ in range(5):
        w = dist.all_reduce(on_device(torch.ones(count)), async_op=True)
        w.wait()
    small = on_device(torch.full((3,), float(r)))
    fut = dist.all_reduce(small, async_op=True).get_future()
    res["future"] = fut.wait()[0] is small and small.tolist() == [float(sum(range(n)))] * 3
    res["reused"] = staging.pool_for(copier).made == made
    # broadcast (segmented), all_gather / reduce_scatter (whole tensors), lists, a non-contiguous device tensor
    b = on_device(torch.arange(count, dtype=torch.int64) + 1000 * r)
    dist.broadcast(b, src=n - 1)
    res["broadcast"] = torch.equal(b, torch.arange(count, dtype=torch.int64) + 1000 * (n - 1))
    inp = on_device(torch.full((5,), r, dtype=torch.int32))
    out = on_device(torch.empty(5 * n, dtype=torch.int32))
    dist.all_gather_into_tensor(out, inp)
    res["all_gather"] = out.tolist() == [i for i in range(n) for _ in range(5)]
    outs = [on_device(torch.empty(5, dtype=torch.int32)) for _ in range(n)]
    got = dist.all_gather(outs, inp, async_op=True).get_future().wait()
    res["all_gather_list"] = [o.tolist() for o in outs] == [[i] * 5 for i in range(n)]
    res["all_gather_future"] = all(a is b for a, b in zip(got[0], outs))  # the caller's tensors
    rs_out = on_device(torch.empty(4, dtype=torch.int64))
    dist.reduce_scatter_tensor(rs_out, on_device(torch.arange(4 * n, dtype=torch.int64)))
    res["reduce_scatter"] = rs_out.tolist() == [n * v for v in range(4 * r, 4 * r + 4)]
    nc = on_device(torch.ones(6, 4).t())
    dist.all_reduce(nc)
    res["non_contiguous"] = bool((nc == n).all())
    return res


def _p2p_staged():
    from fake_device import FakeCopier, on_device
    from pycoll.torch import staging
    copier = FakeCopier()
    staging.install_copier(copier)
    r = dist.get_rank()
    out = {}
    for _ in range(3):  # the pool's buffers come back after each transfer
        if r == 0:
            dist.send(on_device(torch.arange(10, dtype=torch.int64)), dst=1)
            dist.send(torch.arange(12.).reshape(3, 4), dst=1)
        else:
            dev = on_device(torch.zeros(10, dtype=torch.int64))
            work = dist.irecv(dev, src=0)
            work.wait()
            nc = torch.zeros(4, 3).t()  # non-contiguous
            dist.recv(nc, src=0)
            out["recv"] = (dev.tolist(), nc.tolist())
    out["made"] = staging.pool_for(copier).made
    return out


@pytest.mark.timeout(90)
def test_point_to_point_stages_device_and_non_contiguous_tensors():
    sent, got = pycoll.testing.run(_p2p_staged, 2, init="torch:pycoll", timeout=80)
    assert got["recv"] == (list(range(10)), torch.arange(12.).reshape(3, 4).tolist())
    assert sent["made"] == 1 and got["made"] == 1


@pytest.mark.timeout(120)
def test_device_tensors_are_staged_through_reused_host_buffers_in_segments():
    for res in pycoll.testing.run(_fake_device, 3, init="torch:pycoll", timeout=110):
        segments = res.pop("segments")
        assert segments == (11, 11), "10 full segments and a short one, each copied out and back"
        assert all(res.values()), res


def test_the_backend_is_registered_for_cpu_and_cuda():
    import pycoll.torch  # noqa: F401 - registers "pycoll"
    assert dist.Backend.backend_capability["pycoll"] == ["cpu", "cuda"]
    # registering for CUDA does not take the default from NCCL (torch keeps the first one)
    assert dist.Backend.default_device_backend_map.get("cuda") in ("nccl", None, "pycoll")
