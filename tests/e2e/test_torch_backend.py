"""The "pycoll" torch.distributed backend: results equal Gloo's on the same inputs (bit for bit for
integers), errors, async works and futures, failures, the compression hook, DDP under both
launchers, and registration through torch's plugin entry point."""
import datetime
import os
import subprocess
import sys
import textwrap
from typing import List

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

torch = pytest.importorskip("torch", reason="torch is an optional extra (pip install -e '.[torch]')")
import torch.distributed as dist  # noqa: E402

import pycoll  # noqa: E402
import pycoll.testing  # noqa: E402
from pycoll.testing import KILLED  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DDP_EXAMPLE = os.path.join(ROOT, "examples", "ddp_train.py")

GLOO_DTYPES = ["float16", "bfloat16", "float32", "float64", "int8", "int32", "int64", "uint8"]
OTHER_DTYPES = ["int16", "uint16", "uint32", "uint64"]  # Gloo lacks them: compared with NumPy
OPS = {"sum": "SUM", "prod": "PRODUCT", "min": "MIN", "max": "MAX", "avg": "AVG"}
COLLECTIVES = ["all_reduce", "all_gather", "all_gather_list", "all_gather_single", "reduce_scatter",
               "reduce_scatter_list", "broadcast"]


# ---- rank side -------------------------------------------------------------
def _input(dtype, op, count, rank, seed):
    """A rank's input, the same for both backends: small values so products stay exact."""
    g = np.random.default_rng([seed, rank])
    if dtype.startswith(("float", "bfloat")):
        x = g.uniform(0.5, 1.5, count) if op == "prod" else g.normal(0, 10, count)
        return torch.tensor(x, dtype=getattr(torch, dtype))
    if op == "prod":
        x = g.integers(-2 if not dtype.startswith("u") else 0, 3, count)
    else:
        x = g.integers(-100 if not dtype.startswith("u") else 0, 100, count)
    return torch.tensor(x).to(getattr(torch, dtype))


def _raw(t):
    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def _one(case, group):
    """Run one case on ``group`` (None: the default pycoll group); return the raw output."""
    coll, dtype, op, count, seed = case
    rank, n = dist.get_rank(), dist.get_world_size()
    gloo = group is not None
    reduce_op = getattr(dist.ReduceOp, OPS[op])
    emulate_avg = gloo and op == "avg" and not dtype.startswith(("float", "bfloat"))
    if emulate_avg:  # Gloo has no integer AVG: sum, then truncate toward zero as pycoll does
        reduce_op = dist.ReduceOp.SUM

    def finish(t):
        return torch.div(t, n, rounding_mode="trunc") if emulate_avg else t

    if coll == "all_reduce":
        x = _input(dtype, op, count, rank, seed)
        dist.all_reduce(x, op=reduce_op, group=group)
        return _raw(finish(x))
    if coll in ("all_gather", "all_gather_list"):
        x = _input(dtype, op, count, rank, seed)
        if coll == "all_gather":  # consecutive slices of one buffer: no copy
            outs = list(torch.empty(n * count, dtype=x.dtype).chunk(n))
        else:  # separate tensors (reversed allocation order): one copy out
            outs = [torch.empty(count, dtype=x.dtype) for _ in range(n)][::-1]
        dist.all_gather(outs, x, group=group)
        return b"".join(_raw(o) for o in outs)
    if coll == "all_gather_single":
        x = _input(dtype, op, count, rank, seed)
        out = torch.empty(n * count, dtype=x.dtype)
        dist.all_gather_single(out, x, group=group)
        return _raw(out)
    if coll in ("reduce_scatter", "reduce_scatter_list"):
        x = _input(dtype, op, n * count, rank, seed)
        out = torch.empty(count, dtype=x.dtype)
        if coll == "reduce_scatter":
            dist.reduce_scatter_single(out, x, op=reduce_op, group=group)
        else:
            dist.reduce_scatter(out, [c.clone() for c in x.chunk(n)], op=reduce_op, group=group)
        return _raw(finish(out))
    if coll == "broadcast":
        x = _input(dtype, op, count, rank, seed)
        dist.broadcast(x, src=seed % n, group=group)
        return _raw(x)
    raise AssertionError(coll)


def _run_cases(cases):
    gloo = dist.new_group(backend="gloo")
    out = []
    for case in cases:
        out.append((_one(case, None), _one(case, gloo) if case[1] in GLOO_DTYPES else None))
    dist.barrier()
    return out


# ---- parent side -----------------------------------------------------------
def _decode(raw, dtype):
    t = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(getattr(torch, dtype))
    return t.to(torch.float64).numpy() if dtype.startswith(("float", "bfloat")) else t.numpy()


def _numpy_reference(case, n):
    """Integer reference for the dtypes Gloo lacks (wrapping arithmetic)."""
    coll, dtype, op, count, seed = case
    size = n * count if coll.startswith("reduce_scatter") else count
    xs = [_input(dtype, op, size, r, seed).numpy() for r in range(n)]
    fn = {"sum": np.add, "prod": np.multiply, "min": np.minimum, "max": np.maximum, "avg": np.add}[op]
    red = xs[0].copy()
    for x in xs[1:]:
        red = fn(red, x, dtype=red.dtype)
    if op == "avg":  # truncated toward zero
        red = np.array([abs(v) // n * (1 if v >= 0 else -1) for v in red.tolist()], dtype=red.dtype)
    if coll == "all_reduce":
        return [red.tobytes()] * n
    if coll.startswith("all_gather"):
        return [np.concatenate(xs).tobytes()] * n
    if coll.startswith("reduce_scatter"):
        return [red[r * count:(r + 1) * count].tobytes() for r in range(n)]
    return [xs[seed % n].tobytes()] * n


def check(cases, n):
    results = pycoll.testing.run(_run_cases, n, args=(cases,), init="torch:pycoll", timeout=240)
    for i, case in enumerate(cases):
        coll, dtype = case[0], case[1]
        mine = [results[r][i][0] for r in range(n)]
        if coll in ("all_reduce", "broadcast") or coll.startswith("all_gather"):
            assert len(set(mine)) == 1, f"ranks differ on {case}"
        if dtype in GLOO_DTYPES:
            theirs = [results[r][i][1] for r in range(n)]
        else:
            theirs = _numpy_reference(case, n)
        for r in range(n):
            if not dtype.startswith(("float", "bfloat")) or coll.startswith(("all_gather", "broadcast")):
                assert mine[r] == theirs[r], f"rank {r}: {case} differs from the reference"
            else:  # floats reduced in another order: equal up to rounding
                tol = {"float16": 1e-2, "bfloat16": 4e-2, "float32": 1e-5, "float64": 1e-12}[dtype]
                np.testing.assert_allclose(_decode(mine[r], dtype), _decode(theirs[r], dtype), rtol=tol,
                                           atol=tol * 10, err_msg=f"rank {r}: {case}")


cases = st.lists(st.tuples(st.sampled_from(COLLECTIVES), st.sampled_from(GLOO_DTYPES + OTHER_DTYPES),
                           st.sampled_from(list(OPS)), st.sampled_from([1, 3, 17, 1000, 70001]),
                           st.integers(0, 1000)), min_size=15, max_size=25)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("n", [2, 3])
@settings(max_examples=2, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(cases=cases)
def test_collectives_equal_gloo(n, cases):
    check(cases, n)


@pytest.mark.timeout(300)
def test_every_op_and_dtype():
    every = [("all_reduce", d, o, 33, i) for i, (d, o) in enumerate(
        (d, o) for d in GLOO_DTYPES + OTHER_DTYPES for o in OPS)]
    every += [("reduce_scatter", d, o, 5, i) for i, (d, o) in enumerate(
        (d, o) for d in ("bfloat16", "int32", "uint16") for o in OPS)]
    every += [(c, "bfloat16", "sum", 9, 1) for c in COLLECTIVES]
    check(every, 3)


# ---- errors, async, futures -------------------------------------------------
def _errors():
    t = torch.ones(4, 4)
    out = {}
    for name, fn in {
        "device": lambda: dist.all_reduce(t.to("meta")),  # non-contiguous ones: test_torch_staging.py
        "band": lambda: dist.all_reduce(torch.ones(3, dtype=torch.float32), op=dist.ReduceOp.BAND),
        "bool": lambda: dist.all_reduce(torch.ones(3, dtype=torch.bool), op=dist.ReduceOp.AVG),
        "gather_size": lambda: dist.all_gather_single(torch.empty(5), torch.ones(2)),
        "send": lambda: dist.group.WORLD.send([torch.ones(1)], dist.get_rank(), 0),  # to itself
        "all_to_all": lambda: dist.all_to_all_single(torch.empty(3), torch.ones(3)),
    }.items():
        try:
            fn()
            out[name] = None
        except Exception as exc:  # noqa: BLE001 - the message is what we check
            out[name] = (type(exc).__name__, str(exc))
    z = torch.full((3,), 1 + 2j * dist.get_rank(), dtype=torch.complex64)
    dist.broadcast(z, src=1)  # torch hands complex tensors over as float pairs
    out["complex"] = z.tolist()
    x = torch.ones(3)
    dist.all_reduce(x)  # nothing was sent by the bad calls: the group still works
    out["after"] = x.tolist()
    return out


@pytest.mark.timeout(120)
def test_clear_errors_and_the_group_survives_them():
    for out in pycoll.testing.run(_errors, 2, init="torch:pycoll", timeout=100):
        assert "meta" in out["device"][1] and "CPU and CUDA" in out["device"][1]
        assert "band" in out["band"][1] and "not defined on float32" in out["band"][1]
        assert "avg" in out["bool"][1] and "not defined on bool" in out["bool"][1]
        assert out["complex"] == [1 + 2j] * 3
        assert "world size" in out["gather_size"][1]
        assert out["send"][0] == "InvalidArgument" and "another rank" in out["send"][1]
        assert out["all_to_all"][0] == "InvalidArgument" and "multiple of world size" in out["all_to_all"][1]
        assert out["after"] == [2.0, 2.0, 2.0]


def _async_and_futures():
    rank, n = dist.get_rank(), dist.get_world_size()
    tensors = [torch.full((1000 + i,), float(rank + i)) for i in range(6)]
    works = [dist.all_reduce(t, async_op=True) for t in tensors]
    for w in reversed(works):  # wait in any order
        w.wait()
    # a chained future, and a callback that itself waits for another collective
    # (PowerSGD does this): must not deadlock
    base = torch.ones(4) * (rank + 1)
    inner = torch.ones(2) * (rank + 1)

    def then(fut):
        dist.all_reduce(inner, async_op=True).get_future().wait()
        return fut.value()[0] * 10

    chained = dist.all_reduce(base, async_op=True).get_future().then(then)
    value = chained.wait()
    work = dist.all_reduce(torch.ones(1), async_op=True)
    work.wait()
    comm = pycoll.torch.backend.communicator()
    stats = comm.stats
    return ([t[0].item() for t in tensors], value.tolist(), inner.tolist(), work.is_completed(),
            work.is_success(), work.result()[0].tolist(), stats[-1].op, stats[-1].nbytes, n, comm.preserve_input)


@pytest.mark.timeout(120)
def test_async_works_and_futures():
    for sums, value, inner, done, ok, result, op, nbytes, n, preserve in pycoll.testing.run(
            _async_and_futures, 3, init="torch:pycoll", timeout=100):
        assert preserve is False  # no scratch copy per bucket: a failed group is never used again
        assert sums == [float(sum(r + i for r in range(n))) for i in range(6)]
        assert value == [60.0] * 4 and inner == [6.0, 6.0]
        assert done and ok and result == [3.0]
        assert (op, nbytes) == ("all_reduce", 4)


def _fail_then_unusable():
    seen = []
    for step in range(6):
        x = torch.ones(10_000)
        try:
            dist.all_reduce(x)
            seen.append("ok")
        except pycoll.PeerFailure as exc:
            seen.append("unusable" if "unusable" in str(exc) else "failed")
    return seen


@pytest.mark.timeout(120)
def test_a_lost_peer_fails_the_process_group():
    out = pycoll.testing.run(_fail_then_unusable, 3, init="torch:pycoll", timeout=100,
                             kill={1: ("before:all_reduce", 3)})
    assert out[1] == KILLED
    for r in (0, 2):
        assert out[r] == ["ok", "ok", "failed", "unusable", "unusable", "unusable"], out[r]


def test_consecutive_slices_are_not_copied():
    from pycoll.torch.backend import _consecutive
    base = torch.arange(12, dtype=torch.float32)
    flat = _consecutive(list(base.chunk(3)))
    assert flat is not None and flat.data_ptr() == base.data_ptr() and flat.numel() == 12
    assert _consecutive(list(base.chunk(3))[::-1]) is None
    assert _consecutive([torch.zeros(4), torch.zeros(4)]) is None
    assert _consecutive(list(base[2:].chunk(2))).data_ptr() == base[2:].data_ptr()
    uneven = _consecutive(list(base.split([1, 5, 6])))  # all_to_all's lists may differ in size
    assert uneven is not None and uneven.data_ptr() == base.data_ptr() and uneven.numel() == 12
    assert _consecutive([base[:4], base[5:]]) is None  # a gap
    rows = torch.arange(12, dtype=torch.float32).reshape(4, 3)  # chunks of a whole tensor: that tensor, flat
    flat = _consecutive(list(rows.chunk(2)))
    assert flat.shape == (12,) and flat.data_ptr() == rows.data_ptr()
    flat[5] = -1.0
    assert rows[1, 2] == -1.0
    assert _consecutive(list(rows[1:].chunk(3))).numel() == 9  # part of it: a view over the storage
    assert _consecutive(list(rows.view(torch.int32).chunk(2))).dtype == torch.int32


# ---- DDP ---------------------------------------------------------------------
def _launch(launcher, n, out, *extra, backend="pycoll"):
    # PYCOLL_CALIBRATE=0: `auto` then follows the cost model's fixed defaults. A timed calibration
    # may pick another (equally exact) algorithm from run to run, and with it another summation
    # order, which would make two launches differ in the last bits.
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), PYCOLL_CALIBRATE="0")
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n),
               "--master-port", str(pycoll.testing.free_port())]
    else:
        cmd = [sys.executable, "-m", "pycoll", "run", "-n", str(n)]
    r = subprocess.run(cmd + [DDP_EXAMPLE, "--backend", backend, "--steps", "25", "--out", str(out), *extra],
                       capture_output=True, text=True, timeout=240, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    runs = [torch.load(os.path.join(out, f"rank{rank}.pt")) for rank in range(n)]
    assert all(x["world_size"] == n and x["backend"] == backend for x in runs)
    return runs, r.stdout


def _bits(run):
    return run["params"].numpy().tobytes()


@pytest.mark.timeout(600)
def test_ddp_under_both_launchers_matches_gloo(tmp_path):
    n = 3
    pyrun, stdout = _launch("pycoll", n, tmp_path / "pycoll-run")
    torchrun, _ = _launch("torchrun", n, tmp_path / "torchrun")
    gloo, _ = _launch("torchrun", n, tmp_path / "gloo", backend="gloo")
    for runs in (pyrun, torchrun, gloo):
        assert len({_bits(x) for x in runs}) == 1, "parameters differ across ranks"
    assert _bits(pyrun[0]) == _bits(torchrun[0]), "the launcher changed the result"
    mine, theirs = pyrun[0]["params"], gloo[0]["params"]
    assert not torch.equal(mine, make_initial_params()), "the model did not train"
    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)  # only the summation order differs
    assert pyrun[0]["losses"][-1] < pyrun[0]["losses"][0]
    assert "[2] rank 2/3 pycoll" in stdout


def make_initial_params():
    sys.path.insert(0, os.path.dirname(DDP_EXAMPLE))
    try:
        from ddp_train import make_model
    finally:
        sys.path.pop(0)
    return torch.cat([p.detach().reshape(-1) for p in make_model(seed=100).parameters()])


def _hook_bytes(wires):
    from torch import nn
    from pycoll.torch.backend import communicator, compression_hook
    out = {}
    for wire in wires:  # one DDP model per wire dtype, in one process group
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(nn.Linear(64, 64))
        if wire is not None:
            model.register_comm_hook(None, compression_hook(getattr(torch, wire)))
        stats = communicator().stats
        stats.clear()
        g = torch.Generator().manual_seed(dist.get_rank())
        model(torch.randn(8, 64, generator=g)).square().sum().backward()
        grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        out[wire] = ([s.nbytes for s in stats if s.op == "all_reduce"], grads.numpy().tobytes())
    return out


@pytest.mark.timeout(180)
def test_compression_hook_halves_the_wire_bytes():
    wires = [None, "bfloat16", "float16"]
    results = pycoll.testing.run(_hook_bytes, 2, args=(wires,), init="torch:pycoll", timeout=150)
    nparams = 64 * 64 + 64
    plain_bytes, plain = results[0][None]
    assert sum(plain_bytes) == 4 * nparams
    g_plain = np.frombuffer(plain, np.float32)
    for wire in wires[1:]:
        packed_bytes, packed = results[0][wire]
        assert sum(packed_bytes) == 2 * nparams, wire
        assert packed == results[1][wire][1], f"{wire}: ranks disagree on the gradients"
        g_packed = np.frombuffer(packed, np.float32)
        assert not np.array_equal(g_plain, g_packed)  # it really went through the narrow type
        np.testing.assert_allclose(g_packed, g_plain, rtol=2e-2, atol=2e-2 * np.abs(g_plain).max())


# ---- registration ----------------------------------------------------------------
@pytest.mark.timeout(120)
def test_torch_plugin_entry_point_registers_the_backend(tmp_path):
    """With pycoll installed, only the backend name changes: torch loads the entry point."""
    info = tmp_path / "pycoll_entry-0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: pycoll-entry\nVersion: 0.0\n")
    (info / "entry_points.txt").write_text("[torch.backends]\npycoll = pycoll._torch_plugin:autoload\n")
    script = textwrap.dedent(f"""
        import sys
        import torch
        import torch.distributed as dist
        assert "pycoll" in dist.Backend.backend_list
        assert "pycoll.torch.backend" not in sys.modules  # loaded only when a group is made
        dist.init_process_group("pycoll", init_method="tcp://127.0.0.1:{pycoll.testing.free_port()}",
                                rank=0, world_size=1)
        t = torch.arange(4.0)
        dist.all_reduce(t)
        print(dist.get_backend(), t.tolist())
        dist.destroy_process_group()
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), ROOT, os.environ.get("PYTHONPATH", "")]))
    env.pop("TORCH_DEVICE_BACKEND_AUTOLOAD", None)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=100, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "pycoll [0.0, 1.0, 2.0, 3.0]"


def _subgroups():
    import pycoll.torch.backend  # noqa: F401 - registers "pycoll" (the default group here is Gloo)
    rank = dist.get_rank()
    evens = dist.new_group(ranks=[0, 2], backend="pycoll")  # every rank calls new_group
    everyone = dist.new_group(backend="pycoll")
    out = {}
    if rank in (0, 2):
        t = torch.tensor([rank + 1], dtype=torch.int64)
        dist.all_reduce(t, group=evens)
        out["evens"] = (t.item(), dist.get_world_size(evens), dist.get_rank(evens))
    t = torch.tensor([rank + 1], dtype=torch.int64)
    dist.all_reduce(t, group=everyone)
    out["everyone"] = t.item()
    dist.barrier(group=everyone)
    return out


@pytest.mark.timeout(120)
def test_new_group_with_the_pycoll_backend():
    """Each group gets its own coordinator through the (prefixed) store; default group is Gloo."""
    out = pycoll.testing.run(_subgroups, 3, init="torch:gloo", timeout=100)
    assert out[0]["evens"] == (4, 2, 0) and out[2]["evens"] == (4, 2, 1) and "evens" not in out[1]
    assert [o["everyone"] for o in out] == [6, 6, 6]


@pytest.mark.timeout(300)  # three fresh interpreters importing torch: 60 s was too short at load 20
def test_import_registers_the_backend_without_the_plugin_loader():
    env = dict(os.environ, TORCH_DEVICE_BACKEND_AUTOLOAD="0",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    check = "import torch.distributed as d; print('pycoll' in d.Backend.backend_list)"
    r = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=90, env=env)
    assert r.stdout.strip() == "False", r.stderr  # nothing registers it behind our back
    for module in ("pycoll.torch", "pycoll.torch.backend"):
        r = subprocess.run([sys.executable, "-c", f"import {module}; {check}"], capture_output=True, text=True,
                           timeout=90, env=env)
        assert r.stdout.strip() == "True", r.stderr


# ---- failures through futures (DDP's reducer reads them from C++) ---------------
def _ddp_lost_peer():
    """DDP training until a peer dies in an all_reduce; a survivor must get a Python exception
    (the reducer used to read the failed future's value as tensors and crash)."""
    from torch import nn
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(512, 512), nn.Linear(512, 512)))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(16, 512, generator=torch.Generator().manual_seed(dist.get_rank()))
    for step in range(200):
        try:
            model(x).square().mean().backward()
        except Exception as exc:  # noqa: BLE001 - what we check
            return ("raised", step, type(exc).__name__, str(exc))
        opt.step()
        opt.zero_grad()
    return ("no failure", step, "", "")


@pytest.mark.timeout(200)
@pytest.mark.parametrize("transport,victim", [("shm", 2), ("tcp", 2), ("tcp", 0)])
def test_ddp_survivors_raise_when_a_peer_dies_in_all_reduce(transport, victim):
    """Rank 0 too: it hosts the coordinator, which a survivor succeeds (pycoll.comm.failover)."""
    out = pycoll.testing.run(_ddp_lost_peer, 4, init="torch:pycoll", timeout=180,
                             kill={victim: ("during:all_reduce", 30)}, env={"PYCOLL_TRANSPORT": transport},
                             return_exceptions=True)
    assert out[victim] == KILLED, out
    for r in sorted({0, 1, 2, 3} - {victim}):
        assert not isinstance(out[r], Exception), f"rank {r}: {out[r]}"  # e.g. died with SIGSEGV
        what, step, kind, message = out[r]
        assert what == "raised", out[r]
        assert "PeerFailure" in kind + message or "pycoll" in message, out[r]


def _wait_tensors(fut: torch.jit.Future[List[torch.Tensor]]) -> List[torch.Tensor]:
    return torch.jit.wait(fut)


def _cpp_wait(fut):
    """Wait as C++ code does (DDP's reducer): TorchScript's wait reads the future's value without
    the Python wrapper's unwrapping, so a failure stored as a value comes back as that value."""
    return torch.jit.script(_wait_tensors)(fut)


FUTURE_CASES = ["all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
                "broadcast", "barrier"]


def _failed_future(case):
    n = dist.get_world_size()
    x = torch.ones(10_000)
    if case == "all_reduce":
        work = dist.all_reduce(x, async_op=True)
    elif case == "all_gather":
        work = dist.all_gather([torch.empty_like(x) for _ in range(n)], x, async_op=True)
    elif case == "all_gather_into_tensor":
        work = dist.all_gather_into_tensor(torch.empty(n * x.numel()), x, async_op=True)
    elif case == "reduce_scatter":
        work = dist.reduce_scatter(torch.empty_like(x), [torch.ones_like(x) for _ in range(n)], async_op=True)
    elif case == "reduce_scatter_tensor":
        work = dist.reduce_scatter_tensor(torch.empty_like(x), torch.ones(n * x.numel()), async_op=True)
    elif case == "broadcast":
        work = dist.broadcast(x, src=0, async_op=True)
    else:
        work = dist.barrier(async_op=True)
    fut = work.get_future()
    out = {}
    ways = {
        "work.wait": work.wait,
        "fut.wait": fut.wait,
        "fut.value": fut.value,
        "then": lambda: fut.then(lambda f: f.value()).wait(),
        # C++'s view of the future (what DDP's reducer reads): collect_all hands back the
        # future itself, without the Python wrapper's unwrapping
        "collect_all": lambda: torch.futures.collect_all([fut]).wait()[0].wait(),
        "wait_all": lambda: torch.futures.wait_all([fut]),
        "torchscript_wait": lambda: _cpp_wait(fut),
    }
    for how, get in ways.items():
        try:
            value = get()
            out[how] = ("returned", repr(value)[:200])
        except Exception as exc:  # noqa: BLE001 - what we check
            out[how] = ("raised", type(exc).__name__, str(exc))
    out["done"] = (fut.done(), work.is_completed(), work.is_success())
    return out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", FUTURE_CASES)
def test_the_future_of_a_failed_collective_raises(case):
    coll = {"all_gather_into_tensor": "all_gather", "reduce_scatter_tensor": "reduce_scatter"}.get(case, case)
    out = pycoll.testing.run(_failed_future, 2, args=(case,), init="torch:pycoll", timeout=100,
                             kill={1: f"before:{coll}"})
    assert out[1] == KILLED
    res = out[0]
    assert res["done"] == (True, True, False), res
    for how, got in res.items():
        if how == "done":
            continue
        assert got[0] == "raised", f"{case}: {how} returned {got[1]}"
        assert "PeerFailure" in got[1] + got[2], f"{case}: {how}: {got}"


def _future_values():
    x = torch.ones(5)
    work = dist.all_reduce(x, async_op=True)
    cpp = _cpp_wait(work.get_future())  # as DDP's reducer reads it
    barrier = _cpp_wait(dist.barrier(async_op=True).get_future())
    out = torch.empty(5 * dist.get_world_size())
    gathered = _cpp_wait(dist.all_gather_into_tensor(out, x, async_op=True).get_future())
    return ([t.tolist() for t in cpp], cpp[0].data_ptr() == x.data_ptr(), barrier,
            gathered[0].data_ptr() == out.data_ptr())


@pytest.mark.timeout(60)
def test_the_future_of_a_collective_holds_its_output_tensors():
    for value, same, barrier, gathered in pycoll.testing.run(_future_values, 2, init="torch:pycoll", timeout=50):
        assert value == [[2.0] * 5] and same and barrier == [] and gathered


def test_completions_after_the_completion_thread_stopped_still_run():
    from pycoll.torch.backend import _Completer
    c = _Completer()
    c.stop()
    done = []
    c.submit(lambda: done.append(1))  # e.g. a work that finished while its group shut down
    assert done == [1]


# ---- a torch group: name, get_backend, DeviceMesh, destroy_process_group ---------------------
def _group_identity(backend):
    import pycoll.torch  # noqa: F401 - registers "pycoll" (the default group may be Gloo's)
    from torch.distributed.device_mesh import DeviceMesh
    c10d = dist.distributed_c10d
    world = dist.group.WORLD
    out = {"world": (world.group_name, dist.get_backend(world), dist.get_backend())}
    sub = dist.new_group(backend=backend)
    out["sub"] = (sub.group_name, dist.get_backend(sub), c10d._resolve_process_group(sub.group_name) is sub)
    out["mesh"] = DeviceMesh.from_group(sub, "cpu").get_group() is sub
    t = torch.tensor([dist.get_rank() + 1])
    dist.all_reduce(t, group=sub)
    out["sub all_reduce"] = t.item()
    dist.destroy_process_group(sub)
    out["sub destroyed"] = (sub in c10d._world.pg_map, sub.group_name in c10d._world.pg_names.values())
    try:
        dist.all_reduce(t, group=sub)
        out["destroyed group"] = "ran"
    except Exception as exc:  # noqa: BLE001 - torch refuses it as unregistered
        out["destroyed group"] = type(exc).__name__
    if backend == "pycoll":  # and the group itself is shut: its communicator has left
        try:
            sub.allreduce([t]).wait()
            out["shut"] = "ran"
        except Exception as exc:  # noqa: BLE001 - what we check
            out["shut"] = str(exc)
    t = torch.tensor([dist.get_rank() + 1])
    dist.all_reduce(t)  # the default group is untouched
    out["world all_reduce"] = t.item()
    again = dist.new_group(backend=backend)  # a name is not reused
    out["again"] = again.group_name
    dist.destroy_process_group()  # every group, the default one included
    out["after"] = (dist.is_initialized(), again in c10d._world.pg_map)
    return out


@pytest.mark.timeout(180)
def test_the_group_has_a_name_and_destroy_process_group_works_as_on_gloo():
    runs = {backend: pycoll.testing.run(_group_identity, 2, args=(backend,), init=f"torch:{backend}", timeout=100)
            for backend in ("pycoll", "gloo")}
    for r in range(2):
        mine, gloo = runs["pycoll"][r], runs["gloo"][r]
        assert mine["world"] == ("0", "pycoll", "pycoll") and gloo["world"] == ("0", "gloo", "gloo")
        assert mine["sub"] == ("1", "pycoll", True) and gloo["sub"] == ("1", "gloo", True)
        assert "shut down" in mine.pop("shut")
        # a destroyed pycoll group refuses collectives (its communicator has left; torch's logging
        # wrapper turns that into its "not initialized" ValueError); a destroyed Gloo group still runs them
        assert mine.pop("destroyed group") == "ValueError" and gloo.pop("destroyed group") == "ran"
        for key in ("mesh", "sub all_reduce", "sub destroyed", "world all_reduce", "again", "after"):
            assert mine[key] == gloo[key], f"rank {r}: {key}: pycoll {mine[key]} != gloo {gloo[key]}"
        assert mine["mesh"] and mine["sub destroyed"] == (False, False) and mine["after"] == (False, False)


def _posted_then_destroyed():
    import pycoll.torch  # noqa: F401 - registers "pycoll" (the default group is Gloo's)
    sub = dist.new_group(backend="pycoll")
    peer = 1 - dist.get_rank()
    w = dist.irecv(torch.zeros(3), peer, group=sub)  # posted, never waited on: it never ran
    dist.destroy_process_group(sub)
    out = {"completed": w.is_completed()}
    try:
        w.wait()
        out["wait"] = "ran"
    except Exception as exc:  # noqa: BLE001 - what we check
        out["wait"] = str(exc)
    dist.destroy_process_group()
    return out


@pytest.mark.timeout(120)
def test_a_posted_transfer_fails_with_its_name_when_the_group_is_destroyed():
    """A torch irecv's Work is the transfer's own completion (Communicator.post_transfer): the
    group's shutdown completes it with the error, naming the transfer."""
    out = pycoll.testing.run(_posted_then_destroyed, 2, init="torch:gloo", timeout=90)
    for r in range(2):
        assert out[r]["completed"], out[r]
        assert out[r]["wait"].startswith(f"recv from rank {1 - r}: communicator closed before the transfer ran"), \
            out[r]


# ---- timeouts in torch's words -------------------------------------------------------
TORCH_TIMEOUT_RE = " (Timed out|closed|timeout) "  # torch/testing/_internal/distributed/distributed_test.py


def _timeout(secs):
    """Rank 0 alone calls the collectives (torch's _test_barrier_timeout); rank 1 stays away."""
    import time
    out = []
    store = dist.distributed_c10d._get_default_store()
    if dist.get_rank() == 0:
        for what in ("barrier", "work.wait(0.5 s)", "all_reduce"):
            start = time.time()
            try:
                if what == "barrier":
                    dist.barrier()
                elif what == "all_reduce":
                    dist.all_reduce(torch.ones(3))
                else:
                    dist.all_reduce(torch.ones(3), async_op=True).wait(datetime.timedelta(seconds=0.5))
                out.append((what, None, None, time.time() - start))
            except Exception as exc:  # noqa: BLE001 - what we check
                out.append((what, type(exc).__name__, str(exc), time.time() - start))
        store.set("timeout test done", "1")
    else:  # away (but alive: a rank that left would fail the group sooner) until rank 0 is done
        store.wait(["timeout test done"], datetime.timedelta(seconds=60))
    return out


@pytest.mark.timeout(180)
def test_a_timeout_says_so_in_torchs_words():
    import re
    secs = 2
    for backend in ("pycoll", "gloo"):  # the same checks pass on Gloo
        out = pycoll.testing.run(_timeout, 2, args=(secs,), init=f"torch:{backend}", timeout=100,
                                 init_kwargs={"timeout": datetime.timedelta(seconds=secs)})
        barrier, wait, later = out[0]
        for what, kind, message, took in out[0]:
            assert message is not None and re.search(TORCH_TIMEOUT_RE, message), (backend, what, message)
        assert barrier[3] >= secs - 0.1, f"{backend}: the barrier gave up after {barrier[3]:.2f} s"  # as torch's test
        if backend == "pycoll":
            assert barrier[1] == wait[1] == "CollectiveTimeout", out[0]
            assert barrier[2].startswith("pycoll backend: Timed out waiting for barrier: "), out[0]
            assert wait[2].startswith("pycoll backend: Timed out waiting 0.5 s for all_reduce"), out[0]
            assert 0.4 < wait[3] < secs, out[0]
