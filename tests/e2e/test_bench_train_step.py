"""bench/train_step.py end to end at toy size: both backends run DDP steps and the table reports
sane numbers. (Tier e2e: tests/conftest.py marks a test by its folder.)"""
import contextlib
import json
import os
import re
import signal
import sys
import time

import pytest
from bench_run import run_bench

pytest.importorskip("torch", reason="torch is an optional extra (pip install -e '.[torch]')")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(ROOT, "bench", "train_step.py")

pytestmark = pytest.mark.timeout(180)


def test_train_step_table(tmp_path):
    out_json = tmp_path / "out.json"
    cmd = [sys.executable, BENCH, "--ranks", "2", "--shapes", "comm", "--steps", "3", "--warmup", "1",
           "--width", "64", "--layers", "2", "--json", str(out_json)]
    env = dict(os.environ, TMPDIR=str(tmp_path))
    out, _ = run_bench(cmd, 120, env)

    header = next(line for line in out.splitlines() if line.startswith("| ranks"))
    assert "pycoll step" in header and "gloo step" in header
    rows = [line for line in out.splitlines() if re.match(r"\| 2 \| comm", line)]
    assert len(rows) == 1, out
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[2] == "idle"
    step_p, step_g = float(cells[3]), float(cells[4])
    ratio = float(cells[5].rstrip("x"))
    compute_p, compute_g = float(cells[6]), float(cells[7])
    cpu_p, cpu_g = float(cells[12]), float(cells[13])
    for v in (step_p, step_g, compute_p, compute_g):
        assert 0 < v < 10_000, rows[0]
    assert cpu_p >= 0 and cpu_g >= 0
    floor_p, floor_g = (float(v) for v in cells[14].split(" / "))
    over_p, over_g = float(cells[15]), float(cells[16])
    assert over_p == pytest.approx(step_p - floor_p, abs=0.11) and over_g == pytest.approx(step_g - floor_g, abs=0.11)

    data = json.loads(out_json.read_text())
    (row,) = data["rows"]
    for backend in ("pycoll", "gloo"):
        r = row[backend]
        assert r["steps"] == 3
        assert all(t > 0 for t in r["step_ms_all"])
        assert r["comm_ms"] > 0 and r["step_cpu_ms"] > 0
        assert sum(r["buckets_bytes"]) == 2 * (64 * 64 + 64) * 4  # every gradient byte, in DDP's buckets
        # DDP with a comm hook that communicates nothing: its own work, timed like the step
        assert 0 < r["floor_ms"] < 10_000 and r["over_floor_ms"] == pytest.approx(r["step_ms"] - r["floor_ms"])
    assert row["pycoll"]["floor_collectives"] == 0  # counted on pycoll's ranks: the floor step sent nothing
    assert ratio == pytest.approx(row["gloo"]["step_ms"] / row["pycoll"]["step_ms"], abs=0.006)


def test_train_step_fsdp2(tmp_path):
    """--wrap fsdp2: the same table for FSDP2's step; "comm alone" is its all-gathers and
    reduce-scatters, one unit per Linear."""
    out_json = tmp_path / "out.json"
    cmd = [sys.executable, BENCH, "--wrap", "fsdp2", "--ranks", "2", "--shapes", "comm", "--steps", "2",
           "--warmup", "1", "--rounds", "1", "--width", "64", "--layers", "2", "--json", str(out_json)]
    out, _ = run_bench(cmd, 150, dict(os.environ, TMPDIR=str(tmp_path)))
    assert "## FSDP2 train step" in out, out
    assert "all_gather_into_tensor per unit" in out, out
    (row,) = json.loads(out_json.read_text())["rows"]
    for backend in ("pycoll", "gloo"):
        r = row[backend]
        assert r["steps"] == 2 and all(t > 0 for t in r["step_ms_all"]) and r["comm_ms"] > 0, r
        assert r["buckets_bytes"] == [(64 * 64 + 64) * 4] * 2  # each unit gathered whole (2 ranks: no padding)
        assert r["floor_ms"] is None and r["over_floor_ms"] is None  # FSDP2 has no hook to skip its collectives


def _parent_of(pid):
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])  # field 4: the parent's pid


def _ranks_with_timeout(marker, parent=None):
    """pids of training-step ranks whose --timeout is ``marker`` (one test's own); with ``parent``,
    only its children (a process a rank forks keeps the rank's command line for a while)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if b"pycoll.train_bench" in args and b"--timeout" in args and marker.encode() in args:
            try:
                if parent is None or _parent_of(pid) == parent:
                    found.append(int(pid))
            except OSError:
                continue
    return found


def test_pycoll_bench_train_runs_the_training_step(tmp_path):
    """The installed entry point (`pycoll bench --train`, not a checkout's bench/ script): every
    argument after --train is the training-step benchmark's."""
    cmd = [sys.executable, "-m", "pycoll", "bench", "--train", "--ranks", "2", "--shapes", "comm", "--steps", "2",
           "--warmup", "1", "--rounds", "1", "--width", "64", "--layers", "2"]
    out, _ = run_bench(cmd, 150, dict(os.environ, TMPDIR=str(tmp_path)))
    assert "## DDP train step" in out, out
    assert len([line for line in out.splitlines() if re.match(r"\| 2 \| comm \(batch 4\) \| idle \|", line)]) == 1, out


@contextlib.contextmanager
def _training(cmd, marker, tmp_path):
    """Start the benchmark ``cmd`` (long: it trains until stopped) in a session of its own and
    wait for its two ranks, found by their --timeout ``marker``; yields (process, rank pids).
    On the way out the benchmark's process group is killed if it is still there, and every rank
    of this test: in the layouts that keep the ranks in the benchmark's session they have process
    groups of their own (a suite run once left two such pairs training for an hour, after an
    assertion failed before the Ctrl-C, and the load failed six other tests)."""
    import subprocess
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                         env=dict(os.environ, TMPDIR=str(tmp_path)))
    try:
        deadline = time.monotonic() + 60
        while len(_ranks_with_timeout(marker, p.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        ranks = _ranks_with_timeout(marker, p.pid)
        assert len(ranks) == 2, f"the ranks did not start: {ranks}"
        yield p, ranks
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        for pid in _ranks_with_timeout(marker):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def _interrupt(p):
    """Ctrl-C to the benchmark; its stderr once it exited."""
    p.send_signal(signal.SIGINT)
    return p.communicate(timeout=30)[1]


def test_pycoll_bench_train_ctrl_c_leaves_no_rank_behind(tmp_path):
    marker = "4321.5"
    cmd = [sys.executable, "-m", "pycoll", "bench", "--train", "--ranks", "2", "--shapes", "comm", "--steps",
           "100000", "--warmup", "1", "--rounds", "1", "--width", "64", "--layers", "2", "--timeout", marker]
    with _training(cmd, marker, tmp_path) as (p, _):
        time.sleep(2)  # they are training now
        err = _interrupt(p)
    assert p.returncode == 130, err
    assert "pycoll bench --train: interrupted" in err, err
    assert _ranks_with_timeout(marker) == [], "a rank outlived the benchmark"


def test_ranks_end_with_a_killed_benchmark(tmp_path):
    """SIGKILL to the benchmark alone (no Ctrl-C handler runs): its ranks, in process groups of
    their own, end with it instead of training on until their --timeout."""
    marker = "4325.5"
    cmd = [sys.executable, BENCH, "--ranks", "2", "--shapes", "comm", "--steps", "100000", "--warmup", "1",
           "--rounds", "1", "--width", "64", "--layers", "2", "--sessions", "job", "--timeout", marker]
    with _training(cmd, marker, tmp_path) as (p, ranks):
        time.sleep(1)
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        deadline = time.monotonic() + 20
        while _ranks_with_timeout(marker) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = _ranks_with_timeout(marker)
    assert left == [], f"ranks {left} outlived their benchmark"


def _session_of(pid):
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[3])  # field 6: the session id


def _children(pid):
    kids = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                kids += [int(k) for k in f.read().split()]
        except OSError:
            pass
    return kids


@pytest.mark.parametrize("layout", ["each", "job", "apart"])
def test_sessions_place_ranks_and_busy_loops(layout, tmp_path):
    """--sessions: each rank and busy loop in a session of its own (each), all in the benchmark's
    session (job), or the ranks in it and each busy loop in its own (apart)."""
    marker = {"each": "4322.5", "job": "4323.5", "apart": "4324.5"}[layout]
    cmd = [sys.executable, BENCH, "--ranks", "2", "--shapes", "comm", "--steps", "100000", "--warmup", "1",
           "--rounds", "1", "--width", "64", "--layers", "2", "--burn", "1", "--sessions", layout,
           "--timeout", marker]
    with _training(cmd, marker, tmp_path) as (p, ranks):
        loops = [k for k in _children(p.pid) if k not in ranks]
        assert len(loops) == 1, loops
        ours = _session_of(p.pid)
        rank_sessions = [_session_of(r) for r in ranks]
        loop_session = _session_of(loops[0])
        _interrupt(p)
    assert rank_sessions == (ranks if layout == "each" else [ours, ours])
    assert loop_session == (ours if layout == "job" else loops[0])
    assert p.returncode == 130
