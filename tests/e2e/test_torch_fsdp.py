"""The "pycoll" backend under torch's higher layers, each run once on pycoll and once on Gloo and
compared: FSDP2 (fully_shard over init_device_mesh, so DTensor and its functional collectives),
and the collectives it needs (the coalesced forms)."""
import pytest

torch = pytest.importorskip("torch", reason="torch is an optional extra (pip install -e '.[torch]')")
import torch.distributed as dist  # noqa: E402

import pycoll.testing  # noqa: E402


def _both(fn, n, *args, timeout=120):
    """``fn(backend, *args)`` on ``n`` ranks under pycoll, then under Gloo."""
    return {backend: pycoll.testing.run(fn, n, args=(backend,) + args, init=f"torch:{backend}", timeout=timeout)
            for backend in ("pycoll", "gloo")}


def _raw(t):
    return t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()


# ---- FSDP2 -------------------------------------------------------------------------
def _mlp(seed):
    torch.manual_seed(seed)
    # 33 rows: the first layer's weight and bias do not split evenly over 2 ranks (FSDP2 pads)
    return torch.nn.Sequential(torch.nn.Linear(16, 33), torch.nn.ReLU(), torch.nn.Linear(33, 8))


def _sharded(seed, mesh):
    from torch.distributed.fsdp import fully_shard
    model = _mlp(seed)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _fsdp2(backend, steps):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = _sharded(0, mesh)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(dist.get_rank()))  # each rank its own batch
    losses = []
    for _ in range(steps):
        loss = model(x).square().mean()
        loss.backward()  # reduce-scatter of the gradients (AVG)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    full = {k: _raw(v.full_tensor()) for k, v in model.state_dict().items()}  # functional all_gather
    local = {k: _raw(v.to_local()) for k, v in model.state_dict().items()}
    return {"full": full, "local": local, "losses": losses,
            "mesh": (mesh.get_group().group_name, dist.get_backend(mesh.get_group()))}


@pytest.mark.timeout(300)
def test_fsdp2_trains_bit_identical_to_gloo():
    runs = _both(_fsdp2, 2, 4)
    mine, gloo = runs["pycoll"], runs["gloo"]
    initial = {k: _raw(v) for k, v in _mlp(0).state_dict().items()}
    for r in range(2):
        assert mine[r]["mesh"] == ("0", "pycoll") and gloo[r]["mesh"] == ("0", "gloo")
        assert mine[r]["full"] == gloo[r]["full"], f"rank {r}: parameters differ from Gloo's"
        assert mine[r]["local"] == gloo[r]["local"], f"rank {r}: shards differ from Gloo's"
        assert mine[r]["losses"] == gloo[r]["losses"]
    assert mine[0]["full"] == mine[1]["full"]
    assert mine[0]["local"] != mine[1]["local"]  # really sharded
    assert all(mine[0]["full"][k] != initial[k] for k in initial), "the model did not train"
    assert mine[0]["losses"][-1] < mine[0]["losses"][0]


# ---- the collectives underneath ------------------------------------------------------------
def _values(dtype, count, rank, salt):
    g = torch.Generator().manual_seed(1000 * salt + rank)
    x = torch.randint(-100, 100, (count,), generator=g)
    return x.to(getattr(torch, dtype))


def _collectives(backend):
    """The coalesced forms and the functional collectives (DTensor's)."""
    import torch.distributed._functional_collectives as funcol
    rank, n = dist.get_rank(), dist.get_world_size()
    out = {}
    xs = [_values("int64", 6, rank, 1), _values("int32", 4, rank, 2)]
    world = dist.group.WORLD
    out["funcol all_gather coalesced"] = [_raw(t) for t in funcol.all_gather_single_coalesced(xs, world)]
    out["funcol reduce_scatter coalesced"] = [
        _raw(t) for t in funcol.reduce_scatter_single_coalesced([xs[0], xs[0] * 3], "sum", [0, 0], world)]
    out["funcol all_reduce coalesced"] = [_raw(t) for t in funcol.all_reduce_coalesced([xs[0], xs[0] + 1], "sum",
                                                                                        world)]
    out["funcol all_gather"] = _raw(funcol.all_gather_single(xs[1], 0, world))
    out["funcol reduce_scatter"] = _raw(funcol.reduce_scatter_single(xs[0], "sum", 0, world))
    out["funcol broadcast"] = _raw(funcol.broadcast(xs[1], n - 1, world))
    ts = [xs[0].clone(), (xs[0] * 2).clone()]
    dist.all_reduce_coalesced(ts)
    out["all_reduce_coalesced"] = [_raw(t) for t in ts]
    outs = [torch.empty(n * 6, dtype=torch.int64), torch.empty(n * 4, dtype=torch.int32)]
    with dist._coalescing_manager(async_ops=True) as cm:  # torch's own batching of all_gather_into_tensor
        for o, i in zip(outs, xs):
            dist.all_gather_into_tensor(o, i)
    cm.wait()
    out["coalescing manager"] = [_raw(o) for o in outs]
    return out


@pytest.mark.timeout(300)
def test_coalesced_and_functional_collectives_equal_gloo():
    runs = _both(_collectives, 3)
    for r in range(3):
        mine, gloo = runs["pycoll"][r], runs["gloo"][r]
        assert mine.keys() == gloo.keys()
        for key in mine:
            assert mine[key] == gloo[key], f"rank {r}: {key} differs from Gloo"

