"""Runs tests of torch's own distributed suite (``distributed_test.py``, the one PyTorch runs
for Gloo) on a given backend, one test per request; tests/e2e/test_torch_suite.py drives it.

    python tests/support/torch_suite.py list            # JSON {world size: [test names]}
    python tests/support/torch_suite.py serve N         # JSON lines in: {"test", "backend"}; out: results

The shim, all of it: the suite decides its skips when it is imported, from ``BACKEND`` (and
``WORLD_SIZE``), so it is imported with ``BACKEND=gloo``: the test list is exactly Gloo's. Then
the module's ``BACKEND`` (and the environment's) is set to the backend under test for each run:
the groups are made with that backend and the test bodies see its name, as they would if torch
ran the suite for it. One exception, ``CPU_PATH_NAMED_GLOO``: a test body that picks its CPU code
path by the names "mpi"/"gloo" and has none for other names sees "gloo" while it runs (the group is
still the backend under test, which the runner checks before the body starts).

Speed: torch's runner spawns fresh interpreters for the ranks (~2 s each to import torch). This
server imports torch and the suite once, stays single-threaded, and forks the ranks from
itself (the start method ``MultiProcessTestCase`` offers besides spawn), so a test costs its
own run time plus a fork.
"""
import json
import os
import sys
import time
import unittest

SUITE = "torch.testing._internal.distributed.distributed_test"


def _import_suite(world_size):
    os.environ["BACKEND"] = "gloo"  # the skip decisions are Gloo's: the same list for every backend
    os.environ["WORLD_SIZE"] = str(world_size)
    os.environ.setdefault("TEMP_DIR", os.environ.get("TMPDIR", "/tmp"))
    import importlib
    module = sys.modules.get(SUITE)
    if module is None:
        return importlib.import_module(SUITE)
    return importlib.reload(module)  # WORLD_SIZE changed: re-decide the world-size skips


def test_names(module):
    """The suite's tests that are not skipped at import time (for Gloo)."""
    base = module.DistributedTest._DistTestBase
    return sorted(n for n in dir(base)
                  if n.startswith("test_") and not getattr(getattr(base, n), "__unittest_skip__", False))


# distributed_test.py's _test_accumulate_gradients_no_sync: `if BACKEND == "mpi" or BACKEND == "gloo":`
# builds the CPU model, `if BACKEND == "nccl":` the GPU one, and nothing else.
CPU_PATH_NAMED_GLOO = {
    "test_accumulate_gradients_no_sync",
    "test_accumulate_gradients_no_sync_allreduce_hook",
    "test_accumulate_gradients_no_sync_allreduce_with_then_hook",
    "test_accumulate_gradients_no_sync_grad_is_view",
}


def _case_class(module):
    import multiprocessing

    import torch.distributed as dist

    class TestDistBackendWithFork(module.TestDistBackend, module.DistributedTest._DistTestBase):
        def setUp(self):
            super().setUp()
            self._start_processes(multiprocessing.get_context("fork").Process)

        def run_test(self, test_name, parent_pipe):
            # in a rank, after init_process_group: only this forked process sees the change
            if test_name in CPU_PATH_NAMED_GLOO:
                if dist.get_backend() != module.BACKEND:
                    raise AssertionError(f"the group is {dist.get_backend()}, not {module.BACKEND}")
                module.BACKEND = "gloo"
            super().run_test(test_name, parent_pipe)
    return TestDistBackendWithFork


def _outcome(result):
    if result.errors or result.failures:
        return "failed", "\n".join(text for _, text in result.errors + result.failures)
    if result.skipped:
        return "skipped", "; ".join(reason for _, reason in result.skipped)
    if result.unexpectedSuccesses:
        return "passed", "unexpected success"
    if result.expectedFailures:
        return "failed", "torch marks it an expected failure"
    return "passed", ""


def serve(world_size):
    import torch.distributed as dist  # noqa: F401 - before the suite, as torch's runner does
    import pycoll.torch  # noqa: F401 - registers "pycoll" (torch's plugin autoload is off in the tests)
    module = _import_suite(world_size)
    cls = _case_class(module)
    out = sys.stdout
    sys.stdout = sys.stderr  # the suite prints; only results go to the driver
    for line in sys.stdin:
        req = json.loads(line)
        module.BACKEND = os.environ["BACKEND"] = req["backend"]
        start = time.monotonic()
        result = unittest.TestResult()
        cls(req["test"]).run(result)
        outcome, detail = _outcome(result)
        out.write(json.dumps({"test": req["test"], "backend": req["backend"], "outcome": outcome,
                              "detail": detail[-6000:], "seconds": time.monotonic() - start}) + "\n")
        out.flush()


def list_tests(sizes=(2, 3)):
    return {n: test_names(_import_suite(n)) for n in sizes}


if __name__ == "__main__":
    if sys.argv[1] == "list":
        print(json.dumps(list_tests()))
    elif sys.argv[1] == "serve":
        serve(int(sys.argv[2]))
    else:
        raise SystemExit(__doc__)
