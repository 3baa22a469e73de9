"""The command line: launcher, coordinator, help."""
import os
import subprocess
import sys
import textwrap
import time

import pytest

import pycoll
from pycoll.testing import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pycoll_cmd(*args, timeout=90, **kw):
    return subprocess.run([sys.executable, "-m", "pycoll", *args], capture_output=True, text=True,
                          timeout=timeout, **kw)


@pytest.mark.timeout(120)
def test_run_launches_workers_with_rank_prefixes():
    r = pycoll_cmd("run", "-n", "3", os.path.join(ROOT, "examples", "allreduce_numpy.py"))
    assert r.returncode == 0, r.stderr
    for rank in range(3):
        assert f"[{rank}] rank {rank}/3: avg=2.0" in r.stdout


@pytest.mark.timeout(120)
def test_run_returns_first_failure_and_stops_the_group(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text(textwrap.dedent("""
        import os, sys, time
        if os.environ["RANK"] == "1":
            sys.exit(3)
        time.sleep(60)
    """))
    t0 = time.monotonic()
    r = pycoll_cmd("run", "-n", "3", str(script))
    assert r.returncode == 3
    assert time.monotonic() - t0 < 30, "the sleeping workers must be stopped"
    assert "stopping the others" in r.stderr


@pytest.mark.timeout(60)
def test_run_sets_torchrun_variables(tmp_path):
    script = tmp_path / "env.py"
    script.write_text("import os\nprint(*(os.environ[k] for k in ('RANK','WORLD_SIZE','LOCAL_RANK','MASTER_ADDR')))\n")
    r = pycoll_cmd("run", "-n", "2", str(script))
    assert r.returncode == 0
    assert "[0] 0 2 0 127.0.0.1" in r.stdout and "[1] 1 2 1 127.0.0.1" in r.stdout


def _sum(comm):
    import numpy as np
    a = np.full(3, comm.rank, np.int64)
    return comm.all_reduce(a).tolist()


@pytest.mark.timeout(90)
def test_standalone_master_serves_a_group():
    port = free_port()
    master = subprocess.Popen([sys.executable, "-m", "pycoll", "master", "--port", str(port)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert "coordinator" in master.stdout.readline()
        results = pycoll.testing.run(_sum, 3, port=port, timeout=60)
        assert results == [[3, 3, 3]] * 3
    finally:
        master.terminate()
        master.wait(timeout=10)


def test_help_lists_commands():
    r = pycoll_cmd("--help")
    assert r.returncode == 0
    for cmd in ("master", "run"):
        assert cmd in r.stdout


def test_every_command_has_help():
    r = pycoll_cmd("--help")
    for cmd in ("demo", "bench", "topology"):
        assert cmd in r.stdout
    for cmd, option in (("demo", "--peers"), ("run", "--keep-going"), ("master", "--world-size"),
                        ("bench", "--plot"), ("topology", "--no-cycles")):
        r = pycoll_cmd(cmd, "--help")
        assert r.returncode == 0 and option in r.stdout, (cmd, r.stderr)


def test_helpful_errors():
    r = pycoll_cmd("demo", "--peers", "2")
    assert r.returncode == 2 and "at least 3" in r.stderr
    r = pycoll_cmd("demo", "--algorithms", "nonsense")
    assert r.returncode == 2 and "unknown algorithm 'nonsense'" in r.stderr and "ring" in r.stderr
    r = pycoll_cmd("bench", "--sizes", "12Q")
    assert r.returncode == 2 and "bad size" in r.stderr
    r = pycoll_cmd("run", "-n", "2")
    assert r.returncode == 2 and "give a script" in r.stderr
    r = pycoll_cmd("--log-level", "chatty", "demo")
    assert r.returncode == 2 and "unknown level" in r.stderr
    r = pycoll_cmd("frobnicate")
    assert r.returncode == 2 and "invalid choice" in r.stderr


@pytest.mark.timeout(200)
def test_demo_runs_every_algorithm_survives_a_kill_and_a_join():
    t0 = time.monotonic()
    r = pycoll_cmd("demo", "--quiet", "--size", "1M", timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    for algorithm in (a for a in pycoll.planners.ALGORITHMS if a != "auto"):
        for coll in ("all_reduce", "all_gather", "reduce_scatter", "broadcast"):
            row = [line for line in out.splitlines() if line.startswith(algorithm) and f" {coll} " in line]
            assert len(row) == 2, (algorithm, coll, out)  # 64 KiB and 1 MiB
            assert "64 KiB" in row[0] and "1 MiB" in row[1]
            assert all(x.rstrip().endswith(" ok") or " n/a" in x for x in row), row
    assert "killed peer 2 (SIGKILL)" in out
    assert "survivors re-formed as 3 peers" in out
    assert "new peer admitted: 4 peers again" in out
    assert "parity: all 4 peers hold identical parameters" in out
    assert "identical (" in out and "DIFFERENT" not in out
    assert time.monotonic() - t0 < 150


@pytest.mark.timeout(300)
def test_bench_table_json_and_plot(tmp_path):
    png, js = tmp_path / "busbw.png", tmp_path / "r.json"
    r = pycoll_cmd("bench", "-n", "2", "--sizes", "4K,256K", "--iters", "4", "--quiet", "--plot", str(png),
                   "--json", str(js), timeout=240)
    assert r.returncode == 0, r.stderr
    import json
    rows = json.loads(js.read_text())
    labels = {(x["impl"], x["algorithm"], x["nbytes"]) for x in rows}
    want = {("gloo", "-", s) for s in (4096, 262144)}
    want |= {("pycoll", a, s) for a in pycoll.planners.ALGORITHMS for s in (4096, 262144)}
    assert labels == want
    for x in rows:
        assert x["world_size"] == 2 and x["iters"] == 4 and x["seconds"] > 0
        assert abs(x["busbw"] - x["nbytes"] / x["seconds"]) < 1e-6 * x["busbw"]  # 2 ranks: busbw = algbw
        assert f"{x['busbw'] / 1e9:.3f}" in r.stdout
    gloo = {x["nbytes"]: x["busbw"] for x in rows if x["impl"] == "gloo"}
    ring = [x for x in rows if x["algorithm"] == "ring"]
    for x in ring:
        assert f"{x['busbw'] / gloo[x['nbytes']]:.2f}x" in r.stdout
    import matplotlib.image
    img = matplotlib.image.imread(str(png))
    assert img.shape[0] > 300 and img.shape[1] > 400
    assert img.std() > 0.05  # not a blank canvas


@pytest.mark.timeout(120)
def test_log_level_from_environment_shows_every_collective():
    env = dict(os.environ, PYCOLL_LOG="debug")
    r = pycoll_cmd("run", "-n", "2", os.path.join(ROOT, "examples", "allreduce_numpy.py"), env=env)
    assert r.returncode == 0, r.stderr
    lines = [x for x in r.stderr.splitlines() if "all_reduce ring 4000000 B" in x]
    assert len(lines) == 2 and "[0]" in "".join(lines) and "[1]" in "".join(lines), r.stderr[-3000:]
    assert "rank 0/2 epoch 1" in r.stderr and "GB/s" in lines[0]


def test_topology_shows_groups_links_ring_and_cycles():
    r = pycoll_cmd("topology", os.path.join(ROOT, "topologies", "two-racks.toml"))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "8 peers, 2 group(s)" in out
    assert "rack0: ranks 0-3 = r0p0 r0p1 r0p2 r0p3; aggregator switch" in out
    assert "1 Gbit/s / 200 us" in out and "100 Gbit/s / 5 us" in out
    assert "ring bottleneck: 1 Gbit/s" in out
    assert "7 arc-disjoint directed cycles on 8 peers (56 of 56 ordered pairs carry traffic)" in out
    # the printed cycles are Hamiltonian and arc-disjoint: check them here, from the text
    from pycoll.topology import load_topology
    names = list(load_topology(os.path.join(ROOT, "topologies", "two-racks.toml")).peers)
    cycles = [[names.index(p) for p in line.split(": ", 1)[1].split(" -> ")]
              for line in out.splitlines() if line.strip()[:2].rstrip(":").isdigit() and "->" in line]
    assert len(cycles) == 7
    arcs = [(c[i], c[(i + 1) % 8]) for c in cycles for i in range(8)]
    assert all(sorted(c) == list(range(8)) for c in cycles) and len(set(arcs)) == 56


def test_topology_for_a_peer_count_names_the_unused_pairs():
    r = pycoll_cmd("topology", "--peers", "4")
    assert r.returncode == 0, r.stderr
    assert "2 arc-disjoint directed cycles on 4 peers (8 of 12 ordered pairs" in r.stdout
    assert "unused pairs (no full decomposition exists for 4 peers): 0->2, 1->3, 2->0, 3->1" in r.stdout


def test_topology_rejects_an_invalid_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[[group]]\nname = "a"\npeers = ["x", "x"]\n')
    r = pycoll_cmd("topology", str(bad))
    assert r.returncode == 2
    assert "invalid" in r.stderr and "bad.toml" in r.stderr and "duplicate" in r.stderr
    r = pycoll_cmd("topology")
    assert r.returncode == 2 and "--peers" in r.stderr
