"""torch's own distributed suite on pycoll: ``DistributedTest._DistTestBase`` with
``TestDistBackend`` from ``torch/testing/_internal/distributed/distributed_test.py``, the suite
PyTorch runs for Gloo, at world sizes 2 and 3, with exactly Gloo's test list.

tests/support/torch_suite.py holds the shim (import the suite with ``BACKEND=gloo``, so the skips
it decides at import time are Gloo's; then run each test with the backend named "pycoll") and a
server that forks the ranks of each test from one process that imported torch once.

Each torch test is one test here. It passes when torch's test passes on pycoll. When torch's
test skips itself at run time (it needs GPUs this machine lacks), the same test is run on Gloo
and must skip there too, for the same reason: pycoll never skips what Gloo runs. The tests
torch itself refuses for any backend but Gloo (``GLOO_ONLY_IN_TORCH``: the check is quoted there)
must fail on pycoll, and with torch's refusal in the failure: nothing else may break them.
"""
import json
import os
import pathlib
import select
import signal
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
RUNNER = ROOT / "tests" / "support" / "torch_suite.py"
SIZES = (2, 3)
RANK_TIMEOUT_S = 60  # torch's own join kills a test's ranks after this (DISTRIBUTED_TESTS_DEFAULT_TIMEOUT)
HARD_TIMEOUT_S = 240  # the driver kills the whole server after this (torch overrides a few tests to 200 s)

# torch/distributed/distributed_c10d.py refuses these for every backend but Gloo:
#   monitored_barrier: `if get_backend(group) != Backend.GLOO: raise ValueError("monitored_barrier
#   is only implemented for GLOO backend.")`
GLOO_ONLY_IN_TORCH = {
    "test_monitored_barrier_gloo": "monitored_barrier is only implemented for GLOO backend",
    "test_monitored_barrier_gloo_subgroup": "monitored_barrier is only implemented for GLOO backend",
}


def _env(tmp):
    env = dict(os.environ)
    env.update(TORCH_DEVICE_BACKEND_AUTOLOAD="0", TMPDIR=str(tmp), TEMP_DIR=str(tmp),
               DISTRIBUTED_TESTS_DEFAULT_TIMEOUT=str(RANK_TIMEOUT_S),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))
    return env


def _list_tests():
    """{world size: names}: run once at collection, in a subprocess (importing the suite
    changes global torch settings this process should keep)."""
    env = _env(os.environ.get("TMPDIR", "/tmp"))
    out = subprocess.run([sys.executable, str(RUNNER), "list"], env=env, capture_output=True, text=True,
                         timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"listing torch's distributed suite failed:\n{out.stderr[-3000:]}")
    return {int(k): v for k, v in json.loads(out.stdout).items()}


TESTS = _list_tests()


class _Server:
    """One runner process for one world size; restarted after a hang."""

    def __init__(self, world_size, tmp):
        self.world_size, self.tmp, self.proc = world_size, tmp, None

    def _start(self):
        self.log = open(self.tmp / f"server-{self.world_size}.log", "ab")
        self.proc = subprocess.Popen([sys.executable, str(RUNNER), "serve", str(self.world_size)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     env=_env(self.tmp), start_new_session=True)

    def run(self, test, backend):
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        self.proc.stdin.write((json.dumps({"test": test, "backend": backend}) + "\n").encode())
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], HARD_TIMEOUT_S)
        line = self.proc.stdout.readline() if ready else b""
        if not line:
            self.stop()
            pytest.fail(f"{test} on {backend}: no result within {HARD_TIMEOUT_S} s (server killed); "
                        f"log: {self.log.name}")
        return json.loads(line)

    def stop(self):
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(20)
        else:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # ranks left behind by a server that died
            except ProcessLookupError:
                pass
        self.proc.stdout.close()
        self.log.close()
        self.proc = None


def _check(server, test):
    start = time.monotonic()
    mine = server.run(test, "pycoll")
    if test in GLOO_ONLY_IN_TORCH:
        assert mine["outcome"] == "failed" and GLOO_ONLY_IN_TORCH[test] in mine["detail"], (
            f"{test} is refused by torch for any backend but Gloo; on pycoll: {mine['outcome']}: "
            f"{mine['detail'][-2000:]}")
        return
    if mine["outcome"] == "passed":
        return
    if mine["outcome"] == "skipped":
        gloo = server.run(test, "gloo")
        assert (gloo["outcome"], gloo["detail"]) == ("skipped", mine["detail"]), (
            f"torch skipped {test} on pycoll ({mine['detail']}) but Gloo's outcome is {gloo['outcome']}: "
            f"{gloo['detail'][-2000:]}")
        return
    pytest.fail(f"{test} fails on pycoll after {time.monotonic() - start:.1f} s:\n{mine['detail']}", pytrace=False)


@pytest.fixture(scope="class")
def server(request, tmp_path_factory):
    s = _Server(request.cls.WORLD_SIZE, tmp_path_factory.mktemp(f"torch-suite-{request.cls.WORLD_SIZE}"))
    yield s
    s.stop()


# Two classes per world size (each test list split in half), each with its own server: xdist
# (--dist loadscope) hands out classes, so the four balance with the rest of the suite.
def _suite_class(world_size, half):
    class Suite:
        WORLD_SIZE = world_size

        @pytest.mark.parametrize("test", TESTS[world_size][half::2])
        def test_torch_suite(self, server, test):
            _check(server, test)

    Suite.__name__ = Suite.__qualname__ = f"TestWorldSize{world_size}{'ab'[half]}"
    return Suite


TestWorldSize2a, TestWorldSize2b = _suite_class(2, 0), _suite_class(2, 1)
TestWorldSize3a, TestWorldSize3b = _suite_class(3, 0), _suite_class(3, 1)
