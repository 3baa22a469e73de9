"""Running a bench/ script as a test: in a session of its own, so that on a timeout the whole
process group goes (the benchmark's own ranks and busy loops too), and its exit status checked."""
import os
import signal
import subprocess

import pytest


def run_bench(cmd, limit, env=None):
    """``cmd``'s ``(stdout, stderr)`` once it exited 0; the test fails if it did not finish in
    ``limit`` seconds or exited otherwise."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        pytest.fail(f"{os.path.relpath(cmd[1])} did not finish in {limit} s\n{out}\n{err}")
    assert p.returncode == 0, f"exit {p.returncode}\n{out}\n{err}"
    return out, err
