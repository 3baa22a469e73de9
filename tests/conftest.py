import os
import pathlib
import sys

import pytest

import leak_guard  # tests/support is on the path (pyproject: pythonpath)
from collective_cases import TRANSPORTS

# Hosts that set PYTHONDONTWRITEBYTECODE (this one and CI do) make every process a test starts
# compile pycoll and the test helpers anew: ~0.3 s of CPU per rank, minutes over the suite. The
# suite writes them once (next to the sources; __pycache__ is ignored by git). Before xdist starts
# its workers, so they and every rank inherit it.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False

pytest_plugins = ["emu_fixtures"]  # emu_ok: the check of the tests on emulated hosts


# Tiers are folders, and each test gets its folder's marker: `unit` needs no sockets or processes
# (seconds: `pytest -m unit` is the quick loop), `e2e` runs processes on loopback, `chaos` kills and
# starts peers at random, `fuzz` feeds hostile input. The README's test command runs every tier.
TIERS = ("unit", "e2e", "chaos", "fuzz")


def pytest_collection_modifyitems(config, items):
    for item in items:
        tier = pathlib.Path(str(item.fspath)).parent.name
        if tier not in TIERS:
            raise pytest.UsageError(f"{item.nodeid}: a test lives in one of tests/{{{','.join(TIERS)}}}/")
        item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture(params=TRANSPORTS)
def transport(request):
    """A test that takes ``transport`` runs once over shared memory and once
    over loopback TCP (pass it as ``transport=`` to pycoll.init/connect)."""
    return request.param


# Ranks start from a fork server that imported these once per test process (pycoll.testing.preload):
# a spawned rank paid ~1.5 s of CPU for torch and ~0.45 s for numpy, pytest and hypothesis (the
# test module it runs imports them), hundreds of times over the suite.
PRELOAD = ("numpy", "pytest", "hypothesis", "torch", "torch.distributed")


def _start_fork_server():
    import importlib.util
    import multiprocessing.forkserver
    import pycoll.testing
    pycoll.testing.preload(*[m for m in PRELOAD if importlib.util.find_spec(m.split(".")[0]) is not None])
    # now, not at a test's first rank: the server holds a descriptor of this process for good,
    # which a test that compares its descriptors before and after would call a leak
    multiprocessing.forkserver.ensure_running()


def pytest_sessionstart(session):
    leak_guard.start()
    xdist_controller = getattr(session.config.option, "numprocesses", None) and not hasattr(session.config,
                                                                                           "workerinput")
    if not xdist_controller and not os.environ.get("PYCOLL_TEST_SPAWN"):
        _start_fork_server()


def pytest_sessionfinish(session, exitstatus):
    """Fail the run (exit status 1) if the suite left shared memory behind."""
    problems = leak_guard.finish()
    if not problems:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        print("\n".join(["leak guard: the test session left shared memory behind:"] + problems), file=sys.stderr)
    else:
        reporter.write_line("")  # ends the progress line
        reporter.write_sep("=", "leak guard: the test session left shared memory behind", red=True)
        for line in problems:
            reporter.write_line(line, red=True)
    if session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
