import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tests import their helpers (plansim, reference)

import leak_guard  # noqa: E402 - needs the path above
from collective_cases import TRANSPORTS  # noqa: E402


# Tiers (markers): `unit` needs no sockets or processes (seconds: `pytest -m unit` is the quick
# loop), `e2e` runs processes on loopback, `chaos` kills and starts peers at random, `fuzz` feeds
# hostile input. A module not named here is e2e. The README's test command runs every tier.
TIERS = {
    "unit": {"test_algorithms_plans", "test_hamiltonian", "test_plans", "test_reduce", "test_topology",
             "test_units", "test_cbuild", "test_architecture", "test_options"},
    "chaos": {"test_chaos"},
    "fuzz": {"test_fuzz"},
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module is not None else ""
        tier = next((t for t, modules in TIERS.items() if module in modules), "e2e")
        item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture(params=TRANSPORTS)
def transport(request):
    """A test that takes ``transport`` runs once over shared memory and once
    over loopback TCP (pass it as ``transport=`` to pycoll.init/connect)."""
    return request.param


def pytest_sessionstart(session):
    leak_guard.start()


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
