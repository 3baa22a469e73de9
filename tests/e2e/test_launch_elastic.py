"""``pycoll run --elastic``: a worker that dies does not stop the others (same processes), a
replacement joins the running group and is healed bit for bit, every step is exact over its
contributors; the restart budget, Ctrl-C while a worker dies, a busy port, a rank that never
comes, a replacement that comes after the end, and the launcher itself SIGKILLed (the workers
go on under a successor coordinator). Worker: tests/support/elastic_launch_worker.py."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from elastic_launch_worker import contribution, digest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKER = os.path.join(ROOT, "tests", "support", "elastic_launch_worker.py")


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("PYCOLL_MASTER_PORT", "PYCOLL_JOB_ID",
                                                              "PYCOLL_JOIN_TIMEOUT")}
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    env["TORCH_DEVICE_BACKEND_AUTOLOAD"] = "0"
    env.update(extra)
    return env


def _launch(args, timeout, env=None):
    """`pycoll run --elastic ARGS` to its end: (CompletedProcess, seconds)."""
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "pycoll", "run", "--elastic", *args], capture_output=True, text=True,
                       timeout=timeout, env=_env(**(env or {})))
    return r, time.monotonic() - t0


def _records(out_dir):
    """{process name: [its JSON records]} of the workers' logs."""
    found = {}
    for f in sorted(os.listdir(out_dir)):
        if f.endswith(".jsonl"):
            with open(os.path.join(out_dir, f)) as fh:
                found[f[:-len(".jsonl")]] = [json.loads(line) for line in fh if line.strip()]
    return found


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def _running_with(marker):
    """Pids of live processes whose command line mentions ``marker`` (a test's own tmp path)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if marker.encode() in cmdline and _alive(int(entry)):
            found.append(int(entry))
    return found


def _kill_all(pids):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _replay(results):
    """The hash of the state the worker's loop makes of these step results."""
    state = {"total": np.zeros(1024, np.int64), "ema": np.zeros(1024, np.float64)}
    for x in results:
        x = np.array(x, np.int64)
        state["total"] += x
        state["ema"] = 0.9 * state["ema"] + 0.1 * np.sqrt(x.astype(np.float64))
    return digest(state)


# ---- 1. a worker SIGKILLed: the others go on, a replacement joins and is healed --------------
@pytest.mark.timeout(90)
@pytest.mark.parametrize("kill", ["--kill-rank=1", "--kill-group-rank=0"])  # RANK 1; the group's rank 0
def test_a_killed_worker_is_replaced_while_the_others_carry_on_and_every_step_is_exact(tmp_path, kill):
    steps, kill_step = 30, 8
    r, took = _launch(["-n", "3", "--restart-delay", "0.2", "--log-dir", str(tmp_path / "logs"), WORKER,
                       str(tmp_path), "--steps", str(steps), kill, "--kill-step", str(kill_step)], timeout=75)
    assert r.returncode == 0, (r.returncode, r.stderr[-3000:])
    recs = _records(tmp_path)
    dead = [n for n, rs in recs.items() if rs[-1]["event"] != "done"]
    assert len(dead) == 1 and dead[0].endswith(".0"), sorted(recs)
    dead = dead[0]
    slot = int(dead[1:-2])
    new, others = f"w{slot}.1", sorted(n for n in recs if not n.startswith(f"w{slot}."))
    if kill == "--kill-rank=1":
        assert slot == 1
    else:  # the group's rank 0 at that step (it is not RANK 0: the coordinator numbers peers by joining)
        assert [x["rank"] for x in recs[dead] if x["event"] == "sync"][-1] == 0
    assert f"rank {slot} was killed by SIGKILL; the others carry on" in r.stderr, r.stderr
    assert f"started rank {slot} (replacement 1, pid" in r.stderr, r.stderr
    # one process per rank but the dead one's two: the survivors were not restarted
    assert sorted(recs) == sorted(others + [dead, new]) and len(others) == 2, sorted(recs)
    for name, rs in recs.items():
        assert len({x["pid"] for x in rs}) == 1, (name, "more than one pid")
    # the replacement sees its predecessor's RANK, WORLD_SIZE the job's size, one restart more
    assert recs[new][0]["env"] == {"RANK": str(slot), "WORLD_SIZE": "3", "PYCOLL_RESTART_COUNT": "1"}
    assert f"[{slot}] {new} admitted as rank" in r.stdout and f"[{slot}] {dead} admitted as rank" in r.stdout
    # everyone but the killed one got to the end, with the same bytes
    done = {n: rs[-1] for n, rs in recs.items() if rs[-1]["event"] == "done"}
    assert sorted(done) == sorted(others + [new]) and {d["rev"] for d in done.values()} == {steps}, done
    assert len({d["hash"] for d in done.values()}) == 1, done
    # at every sync point every peer holds the same bytes (hash per revision), the replacement too
    by_rev = {}
    for name, rs in recs.items():
        for x in rs:
            if x["event"] == "sync":
                by_rev.setdefault(x["rev"], {})[name] = x["hash"]
    for rev, hashes in by_rev.items():
        assert len(set(hashes.values())) == 1, (rev, hashes)
    first = next(x for x in recs[new] if x["event"] == "sync")
    assert first["rev"] > kill_step and first["fetched"] == ["ema", "total"], first
    assert first["hash"] == by_rev[first["rev"]][others[0]]
    # every step: the exact sum over its contributors, the same on every peer that ran it
    steps_seen = {}
    for name, rs in recs.items():
        for x in rs:
            if x["event"] == "step":
                steps_seen.setdefault(x["step"], []).append(x)
    assert sorted(steps_seen) == list(range(steps)), sorted(steps_seen)
    for step, xs in steps_seen.items():
        contributors = xs[0]["contributors"]
        expect = sum(contribution(c, step) for c in contributors)
        for x in xs:
            assert x["contributors"] == contributors and x["result"] == expect.tolist(), (step, x["name"])
            assert x["name"] in contributors
    assert sorted(steps_seen[kill_step][0]["contributors"]) == others  # the dead one died before it
    assert new in steps_seen[steps - 1][0]["contributors"]
    # the final state is what the steps make of it, bit for bit
    results = [steps_seen[s][0]["result"] for s in range(steps)]
    assert _replay(results) == done[others[0]]["hash"]
    assert took < 75, took


# ---- 2. the restart budget -------------------------------------------------------------------
_CRASHER = """
import os, sys, time
open(os.path.join(sys.argv[1], "pid-%s.%s" % (os.environ["RANK"], os.environ["PYCOLL_RESTART_COUNT"])), "w").write(
    str(os.getpid()))
if os.environ["RANK"] == "1":
    sys.exit(3)
time.sleep(60)
"""


@pytest.mark.timeout(60)
def test_a_spent_restart_budget_stops_the_job_with_a_clear_message_and_the_workers_code(tmp_path):
    script = tmp_path / "crash.py"
    script.write_text(_CRASHER)
    r, took = _launch(["-n", "3", "--max-restarts", "2", "--restart-delay", "0.1", "--log-dir", str(tmp_path / "logs"),
                       str(script), str(tmp_path)], timeout=45)
    assert r.returncode == 3, (r.returncode, r.stderr)
    err = r.stderr
    assert "rank 1 exited with code 3" in err and "restart 1 of 2" in err and "restart 2 of 2" in err, err
    assert "in 0.1 s" in err and "in 0.2 s" in err, err  # the wait doubles per replacement of a rank
    assert "rank 1 exited with code 3 (replacement 2)" in err and "no restarts left (--max-restarts 2" in err, err
    assert f"the workers' output is kept in {tmp_path / 'logs'}" in err, err
    pids = [int((tmp_path / f).read_text()) for f in os.listdir(tmp_path) if f.startswith("pid-")]
    assert len(pids) == 5 and not any(_alive(p) for p in pids), pids  # 3 originals + 2 replacements, all gone
    assert took < 30, took


# ---- 3. Ctrl-C while a worker dies --------------------------------------------------------------
_CHURN = """
import os, signal, sys, time
open(os.path.join(sys.argv[1], "pid-%s.%s" % (os.environ["RANK"], os.environ["PYCOLL_RESTART_COUNT"])), "w").write(
    str(os.getpid()))
if os.environ["RANK"] == "1":
    os.kill(os.getpid(), signal.SIGKILL)
time.sleep(60)
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM", "terminal"])  # terminal: Ctrl-C to the process group
def test_ctrl_c_while_workers_die_and_are_replaced_leaves_no_process_behind(tmp_path, how):
    script = tmp_path / "churn.py"
    script.write_text(_CHURN)
    p = subprocess.Popen([sys.executable, "-m", "pycoll", "run", "--elastic", "-n", "3", "--max-restarts", "1000",
                          "--restart-delay", "0", "--log-dir", str(tmp_path / "logs"), str(script), str(tmp_path)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                         start_new_session=how == "terminal")
    try:
        deadline = time.monotonic() + 30
        while len([f for f in os.listdir(tmp_path) if f.startswith("pid-1.")]) < 4:  # rank 1 keeps dying
            assert time.monotonic() < deadline and p.poll() is None, "no churn"
            time.sleep(0.02)
        if how == "terminal":
            os.killpg(p.pid, signal.SIGINT)
        else:
            p.send_signal(getattr(signal, how))
        out, err = p.communicate(timeout=20)
    finally:
        p.kill()
        p.wait()
        leftovers = _running_with(str(tmp_path))
        _kill_all(leftovers)
    sig = signal.SIGTERM if how == "SIGTERM" else signal.SIGINT
    assert p.returncode == 128 + sig, (p.returncode, err[-2000:])
    assert ("got SIGTERM; stopping workers" if how == "SIGTERM" else "interrupted; stopping workers") in err
    assert not [line for line in err.splitlines() if line.startswith("Traceback")], err  # (workers' are [r]-prefixed)
    stop = err.index("stopping workers")
    assert "starts in" not in err[stop:] and "started rank" not in err[stop:], err[stop:]  # nobody replaced
    assert leftovers == [], leftovers
    pids = [int((tmp_path / f).read_text()) for f in os.listdir(tmp_path) if f.startswith("pid-")]
    assert not any(_alive(pid) for pid in pids)


# ---- 4. launch mistakes ----------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_a_busy_port_is_a_one_line_error(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r, took = _launch(["--master-port", str(port), "-n", "2", WORKER, str(tmp_path)], timeout=30)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"cannot listen on 127.0.0.1:{port} (--master-port)" in r.stderr and "in use" in r.stderr, r.stderr
    assert os.listdir(tmp_path) == [] and took < 20  # no worker started


_ABSENT = """
import os, sys, time
open(os.path.join(sys.argv[1], "pid-" + os.environ["RANK"]), "w").write(str(os.getpid()))
if os.environ["RANK"] == "2":
    time.sleep(60)  # busy elsewhere: never connects
import pycoll
comm = pycoll.connect()
comm.close()
"""


@pytest.mark.timeout(60)
def test_a_rank_that_never_connects_is_named_and_the_job_ends_at_the_join_timeout(tmp_path):
    script = tmp_path / "absent.py"
    script.write_text(_ABSENT)
    r, took = _launch(["-n", "3", "--join-timeout", "8", "--log-dir", str(tmp_path / "logs"), str(script),
                       str(tmp_path)], timeout=45)
    assert r.returncode == 1, (r.returncode, r.stderr)
    pid2 = int((tmp_path / "pid-2").read_text())
    last = [line for line in r.stderr.splitlines() if "did not form within 8 s" in line]
    assert last and f"not yet rank 2 (pid {pid2})" in last[0] and "pycoll.connect()" in last[0], r.stderr
    assert "--join-timeout" in last[0], last
    assert "waiting for the group to form" in r.stderr, r.stderr  # progress lines meanwhile
    pids = [int((tmp_path / f).read_text()) for f in os.listdir(tmp_path) if f.startswith("pid-")]
    assert len(pids) == 3 and not any(_alive(p) for p in pids)
    assert 8 <= took < 25, took


_INIT = """
import time, pycoll
comm = pycoll.init()
time.sleep(1.0)  # (the launcher looks every 50 ms)
comm.close()
"""


@pytest.mark.timeout(60)
def test_a_worker_that_calls_init_is_told_that_its_replacement_could_not_join(tmp_path):
    script = tmp_path / "init.py"
    script.write_text(_INIT)
    r, took = _launch(["-n", "2", "--log-dir", str(tmp_path / "logs"), str(script)], timeout=45)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("joined with pycoll.init(), which makes a fixed group") == 1, r.stderr
    assert "workers call pycoll.connect()" in r.stderr


@pytest.mark.timeout(60)
def test_elastic_options_need_elastic_and_keep_going_excludes_it():
    for args, text in ((["--max-restarts", "2"], "--max-restarts is an option of elastic runs: add --elastic"),
                       (["--elastic", "--keep-going"], "choose one"),
                       (["--elastic", "--max-restarts", "-1"], "--max-restarts must not be negative")):
        r = subprocess.run([sys.executable, "-m", "pycoll", "run", "-n", "2", *args, "x.py"], capture_output=True,
                           text=True, timeout=30, env=_env())
        assert r.returncode == 2 and text in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)


# ---- 5. the end of the job -------------------------------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("linger", [0.0, 3.0])
def test_a_worker_lost_at_the_end_is_not_waited_for(tmp_path, linger):
    # killed at the last step: its replacement comes after the others finished, or (linger) while they
    # stay without admitting anyone; either way nobody admits it and the job must not wait for it
    steps = 6
    (tmp_path / "tmp").mkdir()  # where the default log folder goes (TMPDIR), removed after a success
    r, took = _launch(["-n", "3", "--restart-delay", "0.2", WORKER, str(tmp_path), "--steps", str(steps),
                       "--kill-rank", "0", "--kill-step", str(steps - 1), "--pause", "0.05", "--linger", str(linger)],
                      timeout=45, env={"TMPDIR": str(tmp_path / "tmp")})
    assert r.returncode == 0, (r.returncode, r.stderr[-3000:])
    if linger:
        assert "rank 0 (replacement 1, pid" in r.stderr and "the group has finished: stopping it" in r.stderr, \
            r.stderr
    else:
        assert ("the group has finished: stopping it" in r.stderr
                or "not starting a replacement for rank 0: the others have finished" in r.stderr), r.stderr
    done = [rs[-1] for rs in _records(tmp_path).values() if rs[-1]["event"] == "done"]
    assert len(done) == 2 and {d["rev"] for d in done} == {steps}, done
    assert took < 30, took  # not the replacement's join timeout
    assert os.listdir(tmp_path / "tmp") == [] and "output is kept" not in r.stderr


# ---- 6. the launcher SIGKILLed: the coordinator it hosts is lost, the workers go on ---------------
def _environ_of(pid, name):
    with open(f"/proc/{pid}/environ", "rb") as f:
        return dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)[name.encode()].decode()


@pytest.mark.timeout(90)
def test_the_workers_go_on_when_the_launcher_is_sigkilled(tmp_path):
    steps = 60
    p = subprocess.Popen([sys.executable, "-m", "pycoll", "run", "--elastic", "-n", "3", "--heartbeat-timeout", "1",
                          "--log-dir", str(tmp_path / "logs"), WORKER, str(tmp_path), "--steps", str(steps),
                          "--pause", "0.1", "--heartbeat-timeout", "1"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    pids, joiner = [], None
    try:
        deadline = time.monotonic() + 40
        while True:  # wait for step 5 on every worker
            recs = _records(tmp_path)
            if len(recs) == 3 and all(any(x["event"] == "step" and x["step"] >= 5 for x in rs)
                                      for rs in recs.values()):
                break
            assert time.monotonic() < deadline and p.poll() is None, "the job did not get going"
            time.sleep(0.05)
        pids = [rs[0]["pid"] for rs in recs.values()]
        port = _environ_of(pids[0], "PYCOLL_MASTER_PORT")
        p.send_signal(signal.SIGKILL)
        p.wait()
        killed_at = max(x["step"] for rs in _records(tmp_path).values() for x in rs if x["event"] == "step")
        # a peer started by hand at the launcher's address finds the group under its successor
        joiner = subprocess.Popen([sys.executable, WORKER, str(tmp_path), "--steps", str(steps)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                  env=_env(RANK="3", PYCOLL_RESTART_COUNT="0", MASTER_ADDR="127.0.0.1",
                                           MASTER_PORT=port))
        assert joiner.wait(timeout=50) == 0, joiner.stderr.read()[-3000:]
        deadline = time.monotonic() + 30
        while any(_alive(pid) for pid in pids):
            assert time.monotonic() < deadline, "the workers did not finish"
            time.sleep(0.1)
        recs = _records(tmp_path)
    finally:
        p.kill()
        _kill_all(pids)
        if joiner is not None:
            joiner.kill()
            joiner.wait()
    done = [rs[-1] for rs in recs.values()]
    assert [d["event"] for d in done] == ["done"] * 4 and {d["rev"] for d in done} == {steps}, done
    assert len({d["hash"] for d in done}) == 1, done
    # after the launcher's death the same three processes went on together, then with the joiner
    later = [x for x in recs["w0.0"] if x["event"] == "step" and x["step"] > killed_at]
    assert later and all(set(x["contributors"]) >= {"w0.0", "w1.0", "w2.0"} for x in later)
    assert "w3.0" in later[-1]["contributors"]
    first = next(x for x in recs["w3.0"] if x["event"] == "sync")
    assert first["fetched"] == ["ema", "total"] and first["rev"] > killed_at, first
    assert all(len({x["pid"] for x in rs}) == 1 for rs in recs.values())
    with open(tmp_path / "logs" / "rank0.0.out") as f:  # output went on into the log files
        assert "admitted as rank" in f.read()


# ---- 7. the other way: each peer its own process (any scheduler), `pycoll master` + pycoll.connect ----
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(90)
def test_each_peer_as_its_own_process_with_pycoll_master_and_a_replacement_started_by_hand(tmp_path):
    steps, port = 25, _free_port()
    master = subprocess.Popen([sys.executable, "-m", "pycoll", "master", "--port", str(port), "--world-size", "3",
                               "--heartbeat-timeout", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              env=_env())
    procs = {}

    def start(rank, restart):  # what a scheduler does: a process with an identity of its choosing
        procs[(rank, restart)] = subprocess.Popen(
            [sys.executable, WORKER, str(tmp_path), "--steps", str(steps), "--kill-rank", "1", "--kill-step", "6"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            env=_env(RANK=str(rank), PYCOLL_RESTART_COUNT=str(restart), MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(port)))
    try:
        for rank in range(3):
            start(rank, 0)
        assert procs[(1, 0)].wait(timeout=40) == -signal.SIGKILL, procs[(1, 0)].stderr.read()[-3000:]
        start(1, 1)  # a spot instance coming back
        codes = {key: p.wait(timeout=50) for key, p in procs.items() if key != (1, 0)}
    finally:
        for p in list(procs.values()) + [master]:
            p.kill()
            p.wait()
    assert codes == {(0, 0): 0, (2, 0): 0, (1, 1): 0}, {k: procs[k].stderr.read()[-2000:] for k in codes}
    recs = _records(tmp_path)
    done = [recs[n][-1] for n in ("w0.0", "w2.0", "w1.1")]
    assert {d["event"] for d in done} == {"done"} and {d["rev"] for d in done} == {steps}, done
    assert len({d["hash"] for d in done}) == 1, done
    first = next(x for x in recs["w1.1"] if x["event"] == "sync")
    assert first["fetched"] == ["ema", "total"] and first["rev"] > 6, first


_CONNECT = """
import time, pycoll
t0 = time.monotonic()
try:
    pycoll.connect()
except pycoll.CollectiveError as exc:
    print(f"{time.monotonic() - t0:.1f} {type(exc).__name__}: {exc}")
"""


@pytest.mark.timeout(60)
def test_a_peer_given_a_wrong_port_is_told_promptly(tmp_path):
    with socket.socket() as s:  # another program on the port
        s.bind(("127.0.0.1", 0))
        s.listen()
        r = subprocess.run([sys.executable, "-c", _CONNECT], capture_output=True, text=True, timeout=40,
                           env=_env(MASTER_PORT=str(s.getsockname()[1])))
    took, text = r.stdout.split(" ", 1)
    assert "not a pycoll coordinator" in text and float(took) < 10, r.stdout + r.stderr
    port = _free_port()  # nobody there: told at the join timeout, naming the port and what to check
    r = subprocess.run([sys.executable, "-c", _CONNECT], capture_output=True, text=True, timeout=40,
                       env=_env(MASTER_PORT=str(port), PYCOLL_JOIN_TIMEOUT="3"))
    took, text = r.stdout.split(" ", 1)
    assert f"127.0.0.1:{port}" in text and "no coordinator answers" in text and "MASTER_PORT" in text, text
    assert 3 <= float(took) < 15, r.stdout
