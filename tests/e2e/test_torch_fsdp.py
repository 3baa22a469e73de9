"""The "pycoll" backend under torch's higher layers, each run once on pycoll and once on Gloo and
compared: FSDP2 (fully_shard over init_device_mesh, so DTensor and its functional collectives),
FSDP1 (FullyShardedDataParallel) on CPU, torch.distributed.checkpoint, the object collectives, and the collectives these need (the coalesced
forms, gather, scatter)."""
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


def _fsdp2(backend, steps, ckpt):
    import torch.distributed.checkpoint as dcp
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
    # the sharded state dict through DCP, into a fresh sharded model with other values
    dcp.save(model.state_dict(), checkpoint_id=f"{ckpt}/{backend}")
    fresh = _sharded(1, mesh)
    state = fresh.state_dict()
    dcp.load(state, checkpoint_id=f"{ckpt}/{backend}")
    fresh.load_state_dict(state)
    reloaded = {k: _raw(v.full_tensor()) for k, v in fresh.state_dict().items()}
    return {"full": full, "local": local, "losses": losses, "reloaded": reloaded,
            "mesh": (mesh.get_group().group_name, dist.get_backend(mesh.get_group()))}


@pytest.mark.timeout(300)
def test_fsdp2_trains_bit_identical_to_gloo(tmp_path):
    runs = _both(_fsdp2, 2, 4, str(tmp_path))
    mine, gloo = runs["pycoll"], runs["gloo"]
    initial = {k: _raw(v) for k, v in _mlp(0).state_dict().items()}
    for r in range(2):
        assert mine[r]["mesh"] == ("0", "pycoll") and gloo[r]["mesh"] == ("0", "gloo")
        assert mine[r]["full"] == gloo[r]["full"], f"rank {r}: parameters differ from Gloo's"
        assert mine[r]["local"] == gloo[r]["local"], f"rank {r}: shards differ from Gloo's"
        assert mine[r]["losses"] == gloo[r]["losses"]
        assert mine[r]["reloaded"] == mine[r]["full"], f"rank {r}: DCP did not restore the sharded model"
    assert mine[0]["full"] == mine[1]["full"]
    assert mine[0]["local"] != mine[1]["local"]  # really sharded
    assert all(mine[0]["full"][k] != initial[k] for k in initial), "the model did not train"
    assert mine[0]["losses"][-1] < mine[0]["losses"][0]


# ---- FSDP1 (FullyShardedDataParallel) on CPU ----------------------------------------
def _fsdp1(backend, steps):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    # each Linear its own flat parameter (all_gather_into_tensor before use, reduce_scatter_tensor
    # of its gradients), the root wrapping the rest
    model = FullyShardedDataParallel(_mlp(0), device_id=torch.device("cpu"),
                                     auto_wrap_policy=ModuleWrapPolicy({torch.nn.Linear}))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(dist.get_rank()))
    losses = []
    for _ in range(steps):
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {"full": {k: _raw(v) for k, v in full.items()}, "local": [_raw(p) for p in model.parameters()],
            "losses": losses}


@pytest.mark.timeout(300)
def test_fsdp1_on_cpu_trains_bit_identical_to_gloo():
    runs = _both(_fsdp1, 2, 4)
    mine, gloo = runs["pycoll"], runs["gloo"]
    initial = {k: _raw(v) for k, v in _mlp(0).state_dict().items()}
    for r in range(2):
        assert mine[r]["full"] == gloo[r]["full"], f"rank {r}: parameters differ from Gloo's"
        assert mine[r]["local"] == gloo[r]["local"], f"rank {r}: shards differ from Gloo's"
        assert mine[r]["losses"] == gloo[r]["losses"]
    assert mine[0]["full"] == mine[1]["full"]
    assert mine[0]["local"] != mine[1]["local"]  # really sharded
    assert set(mine[0]["full"]) == set(initial)
    assert all(mine[0]["full"][k] != initial[k] for k in initial), "the model did not train"
    assert mine[0]["losses"][-1] < mine[0]["losses"][0]


# ---- torch.distributed.checkpoint and the object collectives --------------------------
def _dcp(backend, ckpt):
    import torch.distributed.checkpoint as dcp
    rank = dist.get_rank()
    model = _mlp(0)
    dcp.save(model.state_dict(), checkpoint_id=f"{ckpt}/{backend}")
    dist.barrier()
    out = {"saved": {k: _raw(v) for k, v in model.state_dict().items()}}
    for source in ("pycoll", "gloo") if backend == "gloo" else ("pycoll",):
        other = _mlp(1)  # other values, overwritten by the load
        state = other.state_dict()
        dcp.load(state, checkpoint_id=f"{ckpt}/{source}")  # Gloo also reads what pycoll wrote
        other.load_state_dict(state)
        out[f"loaded {source}"] = {k: _raw(v) for k, v in other.state_dict().items()}
    n = dist.get_world_size()
    gathered = [None] * n
    dist.all_gather_object(gathered, {"rank": rank, "text": "x" * (rank * 37)})
    at_dst = [None] * n if rank == 1 else None
    dist.gather_object(("from", rank, list(range(rank * 5))), at_dst, dst=1)
    mine = [None]
    dist.scatter_object_list(mine, [{"part": i, "pad": "y" * (i * 11)} for i in range(n)] if rank == 0 else None,
                             src=0)
    objs = [rank, "only rank 1's survives"] if rank == 1 else [None, None]
    dist.broadcast_object_list(objs, src=1)
    out["objects"] = (gathered, at_dst, mine, objs)
    return out


@pytest.mark.timeout(300)
def test_dcp_save_and_load_and_object_collectives_equal_gloo(tmp_path):
    runs = _both(_dcp, 2, str(tmp_path))
    for r in range(2):
        mine, gloo = runs["pycoll"][r], runs["gloo"][r]
        assert mine["saved"] == gloo["saved"]
        assert mine["loaded pycoll"] == mine["saved"], f"rank {r}: DCP on pycoll did not restore the model"
        assert gloo["loaded pycoll"] == gloo["saved"], f"rank {r}: Gloo cannot read pycoll's checkpoint"
        assert mine["objects"] == gloo["objects"]
    gathered, at_dst, mine0, objs = runs["pycoll"][1]["objects"]
    assert at_dst == [("from", 0, []), ("from", 1, [0, 1, 2, 3, 4])] and objs == [1, "only rank 1's survives"]
    assert runs["pycoll"][0]["objects"][2] == [{"part": 0, "pad": ""}] and mine0 == [{"part": 1, "pad": "y" * 11}]


# ---- the collectives underneath ------------------------------------------------------------
def _values(dtype, count, rank, salt):
    g = torch.Generator().manual_seed(1000 * salt + rank)
    x = torch.randint(-100, 100, (count,), generator=g)
    return x.to(getattr(torch, dtype))


def _collectives(backend):
    """gather, scatter (root 0 and the last rank; lists that are and are not consecutive
    slices of one buffer), the coalesced forms and the functional collectives."""
    import torch.distributed._functional_collectives as funcol
    rank, n = dist.get_rank(), dist.get_world_size()
    out = {}
    for root in (0, n - 1):
        for dtype, count in (("float32", 5), ("int64", 1), ("uint8", 300), ("bfloat16", 7)):
            x = _values(dtype, count, rank, root)
            for layout in ("consecutive", "separate"):
                if rank == root:
                    gl = (list(torch.empty(n * count, dtype=x.dtype).chunk(n)) if layout == "consecutive"
                          else [torch.empty(count, dtype=x.dtype) for _ in range(n)][::-1])
                else:
                    gl = None
                dist.gather(x, gl, dst=root)
                out[("gather", root, dtype, layout)] = [_raw(t) for t in gl] if gl is not None else None
                y = torch.full((count,), 7).to(x.dtype)
                if rank == root:
                    parts = [_values(dtype, count, 50 + i, root) for i in range(n)]
                    sl = (list(torch.cat(parts).chunk(n)) if layout == "consecutive" else parts)
                else:
                    sl = None
                dist.scatter(y, sl, src=root)
                out[("scatter", root, dtype, layout)] = _raw(y)
    work = dist.scatter(y := torch.empty(3), [torch.full((3,), float(i)) for i in range(n)] if rank == 0 else None,
                        src=0, async_op=True)
    work.wait()
    out["scatter async"] = (y.tolist(), [t.tolist() for t in work.get_future().wait()])
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
def test_gather_scatter_and_coalesced_collectives_equal_gloo():
    runs = _both(_collectives, 3)
    for r in range(3):
        mine, gloo = runs["pycoll"][r], runs["gloo"][r]
        assert mine.keys() == gloo.keys()
        for key in mine:
            assert mine[key] == gloo[key], f"rank {r}: {key} differs from Gloo"
    assert runs["pycoll"][2]["scatter async"] == ([2.0] * 3, [[2.0] * 3])
    assert runs["pycoll"][0][("gather", 0, "float32", "separate")] is not None
    assert runs["pycoll"][1][("gather", 0, "float32", "separate")] is None


def _bad_gather_scatter():
    rank = dist.get_rank()
    out = {}
    # refused on every rank alike (a refusal on one rank only would leave the others waiting)
    for name, fn in {
        "gather": lambda: dist.gather(torch.ones(4, 4, device="meta"),
                                      [torch.ones(4, 4)] * 2 if rank == 0 else None, dst=0),
        "scatter": lambda: dist.scatter(torch.ones(3).to(torch.float8_e4m3fn),  # (bool is supported now)
                                        [torch.ones(3).to(torch.float8_e4m3fn)] * 2 if rank == 0 else None, src=0),
    }.items():
        try:
            fn()
            out[name] = None
        except Exception as exc:  # noqa: BLE001 - the message is what we check
            out[name] = (type(exc).__name__, str(exc))
    x = torch.ones(2)
    dist.all_reduce(x)  # nothing was sent by the bad calls
    out["after"] = x.tolist()
    return out


@pytest.mark.timeout(120)
def test_bad_gather_and_scatter_arguments_are_refused_before_sending():
    for out in pycoll.testing.run(_bad_gather_scatter, 2, init="torch:pycoll", timeout=100):
        assert "gather input" in out["gather"][1] and "meta" in out["gather"][1]
        assert "scatter output" in out["scatter"][1] and "float8_e4m3fn" in out["scatter"][1]
        assert out["after"] == [2.0, 2.0]
