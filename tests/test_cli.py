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
