"""Long-haul links: striping over k = 1..8 connections (TCP and shared
memory), stripes and buffers from the bandwidth-delay product, stall
detection (both transports), and one short run over an emulated lossy,
jittery WAN (skipped, with the reason printed, only where network
namespaces cannot be created)."""
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

import pycoll
import pycoll.testing
from codec_ref import NumericCodec
from collective_cases import rank_input, run_cases, run_on
from emu_fixtures import require_emulator
from plansim import simulate
from pycoll.plan import compression
from pycoll.plan import planners
from pycoll.net import links as wan
from reference import reduce_fn, scale_fn, storage_dtype

ROOT = Path(__file__).resolve().parents[2]
SEGMENT = 64 << 10  # small segments: small arrays still spread over every stripe


def expected(case, n, stripes, segment=SEGMENT, codec="none"):
    """Output bytes per rank: the communicator's plans run in NumPy."""
    coll, dtype, op, count, seed, _ = case
    sd = storage_dtype(dtype)
    plans = [compression.compress(planners.plan_rings(coll, n, r, [list(range(n))], count, sd.itemsize,
                                                      segment_bytes=segment, stripes=stripes,
                                                      preserve=coll == "all_reduce", avg=op == "avg"), codec)
             for r in range(n)]
    bufs = []
    for r, p in enumerate(plans):
        x = rank_input(case, r, n).copy()
        scratch = np.zeros(p.need_bytes(2) // sd.itemsize + 1, dtype=sd)
        out = x if coll == "all_reduce" else np.zeros(count * n if coll == "all_gather" else count, dtype=sd)
        bufs.append([x, out, scratch])
    simulate(plans, bufs, sd.itemsize, reduce_fn(dtype, op), scale_fn(dtype, op, n),
             codec=NumericCodec(codec) if codec != "none" else None)
    return [b[1].tobytes() for b in bufs]


def _stripes_used(comm):
    return comm.stripes


# ---- striping on loopback --------------------------------------------------
CASES = [("all_reduce", "float32", "sum", 150_001, 1, "ring"),
         ("all_reduce", "bfloat16", "avg", 70_003, 2, "ring"),
         ("all_reduce", "int64", "max", 40_000, 3, "ring"),
         ("all_gather", "float64", "sum", 30_011, 4, "ring"),
         ("reduce_scatter", "float32", "sum", 50_000, 5, "ring"),
         ("all_reduce", "float32", "sum", 3, 6, "ring")]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("stripes", range(1, 9))
def test_striping_is_exact_for_k_1_to_8(stripes, transport):
    n = 2 + stripes % 3  # 2, 3 and 4 ranks across the k values
    res = run_on(run_cases, n, transport, args=(CASES,), timeout=150,
                 init_kwargs={"timeout": 60, "stripes": stripes, "segment_bytes": SEGMENT})
    for i, case in enumerate(CASES):
        want = expected(case, n, stripes)
        for r in range(n):
            assert res[r][i] == want[r], f"rank {r}, {case}, {stripes} stripes"


def _compressed_striped(comm):
    out = []
    for codec in ("bf16", "int8"):
        x = rank_input(("all_reduce", "float32", "sum", 200_003, 7, "ring"), comm.rank, comm.world_size)
        comm.all_reduce(x, algorithm="ring", compression=codec)
        out.append(x.tobytes())
    return out, comm.stripes


@pytest.mark.timeout(200)
@pytest.mark.parametrize("stripes", range(1, 9))
def test_striping_with_compression(stripes):
    res = pycoll.testing.run(_compressed_striped, 3, timeout=150,
                             init_kwargs={"timeout": 60, "stripes": stripes, "segment_bytes": SEGMENT})
    case = ("all_reduce", "float32", "sum", 200_003, 7, "ring")
    for j, codec in enumerate(("bf16", "int8")):
        want = expected(case, 3, stripes, codec=codec)
        assert [r[0][j] for r in res] == want
    assert all(r[1] == stripes for r in res)


def _auto(comm):
    return comm.stripes, comm.sockbuf


@pytest.mark.timeout(120)
def test_stripes_auto_from_link_and_topology():
    lim = wan.kernel_limits()
    res = pycoll.testing.run(_auto, 2, timeout=90, init_kwargs={"stripes": "auto", "link": "2gbit/50ms"})
    plan = wan.link_plan(2e9 / 8, 0.05, limits=lim)
    assert res == [(plan.stripes, plan.sockbuf)] * 2
    topo = ROOT / "topologies" / "three-sites-wan.toml"
    want = wan.comm_options(topology=str(topo), limits=lim)
    res = pycoll.testing.run(_auto, 2, timeout=90, init_kwargs={"topology": str(topo)})  # the default: auto
    assert res == [(want["stripes"], want["sockbuf"])] * 2
    assert wan.resolve_stripes(None, {})[0] == int(os.environ.get("PYCOLL_STRIPES", 1))  # nothing known: 1
    assert wan.resolve_stripes(3, {"link": "2gbit/50ms"}) == (3, {})
    with pytest.raises(pycoll.InvalidArgument):
        pycoll.init(rank=0, world_size=1, master_port=1, stripes="auto")  # nothing to derive it from


# ---- stripes and buffers from the bandwidth-delay product ------------------
LIMITS = {"rmem_max": 4 << 20, "wmem_max": 4 << 20, "tcp_rmem_max": 6 << 20, "tcp_wmem_max": 4 << 20}


def test_link_plan_covers_the_bdp():
    seen = set()
    for gbit in (0.1, 0.5, 1, 2, 5, 10, 40):
        for rtt in (0.001, 0.01, 0.025, 0.05, 0.1, 0.2):
            bw = gbit * 1e9 / 8
            p = wan.link_plan(bw, rtt, limits=LIMITS)
            # the fewest windows that cover the headroom'd BDP, at least one, at most the cap
            fewest = max(1, math.ceil(wan.HEADROOM * bw * rtt / p.window))
            assert p.stripes == min(fewest, wan.MAX_STRIPES), (gbit, rtt, p)
            seen.add("one" if p.stripes == 1 else "capped" if fewest > wan.MAX_STRIPES else "between")
            assert p.bdp == pytest.approx(bw * rtt)
            if p.stripes < wan.MAX_STRIPES:
                assert p.stripes * p.window >= wan.HEADROOM * p.bdp, (gbit, rtt, p)
            if p.stripes > 1:  # no more connections than needed
                assert (p.stripes - 1) * p.window < wan.HEADROOM * p.bdp
            assert p.sockbuf in (0, 4 << 20)
    assert seen == {"one", "between", "capped"}  # the grid reaches all three regimes


def test_link_plan_examples():
    assert wan.link_plan(10e9 / 8, 0.0005, limits=LIMITS).stripes == 1  # a LAN: one autotuned stream
    assert wan.link_plan(10e9 / 8, 0.0005, limits=LIMITS).sockbuf == 0
    p = wan.link_plan(2e9 / 8, 0.05, limits=LIMITS)  # 12.5 MB in flight, 5.9 MB per connection
    assert (p.stripes, p.sockbuf) == (5, 4 << 20)
    assert wan.link_plan(100e9 / 8, 0.1, limits=LIMITS).stripes == wan.MAX_STRIPES
    # buffers the kernel would cap below autotuning's: stay autotuned, more stripes
    small = dict(LIMITS, rmem_max=1 << 20, wmem_max=1 << 20)
    p = wan.link_plan(2e9 / 8, 0.05, limits=small)
    assert p.sockbuf == 0 and p.stripes == 9
    assert wan.parse_link("2gbit/50ms") == (250e6, 0.05)
    with pytest.raises(ValueError):
        wan.parse_link("fast")


def test_topology_plans_per_link():
    from pycoll.plan.topology import load_topology
    topo = load_topology(ROOT / "topologies" / "three-sites-wan.toml")
    plans = wan.topology_plans(topo, limits=LIMITS)
    assert plans[(0, 1)].stripes == 1  # inside a site: 10 Gbit/s over 200 us
    eu_us = plans[(0, 4)]               # 1 Gbit/s, RTT 50 ms
    assert eu_us.bdp == pytest.approx(125e6 * 0.05)
    assert eu_us.stripes == wan.link_plan(125e6, 0.05, limits=LIMITS).stripes >= 2
    opts = wan.comm_options(topology=topo, limits=LIMITS)
    assert opts["stripes"] == max(p.stripes for p in plans.values())


# ---- stalls ------------------------------------------------------------------
def _stop_one(comm, stopped):
    import numpy as np
    x = np.ones(1 << 20, np.float32)
    comm.all_reduce(x)
    if comm.rank == stopped:
        # resume in 5 s (by a process that outlives our stop), then stop
        subprocess.Popen(["sh", "-c", f"sleep 5; kill -CONT {os.getpid()}"])
        os.kill(os.getpid(), signal.SIGSTOP)
    t = time.monotonic()
    try:
        comm.all_reduce(np.ones(8 << 20, np.float32))
        outcome = "ok"
    except pycoll.CollectiveError as exc:
        outcome = type(exc).__name__
    return outcome, time.monotonic() - t


@pytest.mark.timeout(120)
def test_progress_timeout_fails_a_hung_collective(transport):
    res = run_on(_stop_one, 3, transport, args=(2,), timeout=90, return_exceptions=True,
                 init_kwargs={"timeout": 60, "progress_timeout": 1.5, "heartbeat_timeout": 30})
    for r in (0, 1):
        outcome, secs = res[r]
        assert outcome in ("CollectiveTimeout", "PeerFailure"), res
        assert secs < 6.0, f"rank {r} took {secs:.1f} s to give up (progress timeout 1.5 s)"
    assert any(res[r][0] == "CollectiveTimeout" for r in (0, 1))


def _straggler(comm):
    import numpy as np
    if comm.rank == 1:
        time.sleep(5.0)  # longer than the stall timeout: a slow peer is not a dead link
    x = np.ones(4 << 20, np.float32)
    comm.all_reduce(x)
    return float(x[0])


@pytest.mark.timeout(120)
def test_slow_peer_is_not_a_stall(transport):
    res = run_on(_straggler, 3, transport, init_kwargs={"stall_timeout": 2.0, "timeout": 60})
    assert res == [3.0] * 3


# ---- the emulated WAN ---------------------------------------------------------
def _run_workers(emu, n, cfg, timeout):
    env = {"PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests' / 'support'}", "PYTHONUNBUFFERED": "1"}
    procs = [emu.run_python(r, [str(ROOT / "tests" / "support" / "wan_worker.py"), json.dumps(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env) for r in range(n)]
    return procs


def _collect(procs, timeout):
    results = []
    for r, p in enumerate(procs):
        out, err = p.communicate(timeout=timeout)
        lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
        assert p.returncode == 0 and lines, f"rank {r} failed (exit {p.returncode}):\n{err[-3000:]}"
        results.append(json.loads(lines[-1][7:]))
    return results


@pytest.mark.timeout(180)
def test_emulated_wan_with_loss_and_jitter_is_exact():
    """3 sites, 20 ms one way (+-5 ms jitter), 1 % loss, 200 Mbit/s links:
    striped and compressed collectives give the reference's exact bytes."""
    require_emulator()
    from pycoll.emulator import Emulator, EmuSpec
    n, stripes = 3, 4
    cases = [("all_reduce", "float32", "sum", 400_003, 1, "ring", "none"),
             ("all_reduce", "float32", "avg", 300_001, 2, "ring", "bf16"),
             ("all_reduce", "float32", "sum", 300_007, 3, "ring", "int8"),
             ("all_gather", "float32", "sum", 100_003, 4, "ring", "fp16"),
             ("reduce_scatter", "float64", "sum", 60_001, 5, "ring", "none")]
    cfg = {"port": 29611, "cases": cases,
           "init": {"stripes": stripes, "segment_bytes": SEGMENT, "timeout": 90, "stall_timeout": 10}}
    spec = EmuSpec.uniform(n, rate_bps=200e6, delay_s=0.02, loss=0.01, jitter_s=0.005)
    with Emulator(spec, seed=7) as emu:
        results = _collect(_run_workers(emu, n, cfg, 120), 120)
        stats = emu.stats()
    for i, case in enumerate(cases):
        want = expected(tuple(case[:6]), n, stripes, codec=case[6])
        for r in range(n):
            assert bytes.fromhex(results[r][i]) == want[r], f"rank {r} differs on {case}"
    lost = sum(link["loss_drops"] for link in stats["links"])
    assert lost > 0, "the run saw no packet loss: the test did not test what it says"
    print(f"emulated WAN: {lost} packets lost of {sum(link['in_pkts'] for link in stats['links'])}")


def _cut_link(emu, u, v):
    """The link between peers u and v goes silent both ways (a blackhole route
    on each side drops packets without telling anyone); every other link,
    the coordinator's included, stays up."""
    for a, b in ((u, v), (v, u)):
        r = subprocess.run(["ip", "-n", emu.netns_name(a), "route", "add", "blackhole", f"{emu.peer_ip(b)}/32"],
                           capture_output=True, text=True, timeout=20)
        assert r.returncode == 0, r.stderr


@pytest.mark.timeout(180)
def test_emulated_dead_link_fails_cleanly():
    """The link between two peers goes silent mid-run (links to the
    coordinator stay up): keepalive notices within about the stall timeout
    and every rank fails fast instead of waiting out the 120 s deadline."""
    require_emulator()
    from pycoll.emulator import Emulator, EmuSpec
    n, port = 3, 29631
    with tempfile.TemporaryDirectory() as tmp:
        go = os.path.join(tmp, "go")
        cfg = {"port": port, "stall": True, "go_file": go,
               "init": {"stripes": 2, "timeout": 120, "stall_timeout": 3, "heartbeat_timeout": 60}}
        with Emulator(EmuSpec.uniform(n, rate_bps=500e6, delay_s=0.005)) as emu:
            procs = _run_workers(emu, n, cfg, 120)
            for p in procs:  # every rank finished its first all-reduce
                line = p.stdout.readline()
                assert line.startswith("READY"), p.stderr.read()[-2000:] if p.poll() is not None else line
            _cut_link(emu, 1, 2)
            Path(go).touch()
            results = _collect(procs, 100)
    for r, res in enumerate(results):
        assert res["outcome"] != "ok", f"rank {r} finished an all-reduce over a dead link"
        assert res["seconds"] < 40, f"rank {r} needed {res['seconds']:.0f} s to notice (collective timeout 120 s)"
