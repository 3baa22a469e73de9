"""The check every test on emulated hosts starts with (network namespaces stand in for machines,
pycoll.emulator; root, ip and tc needed): one place for its words and its skip."""
import pytest


def require_emulator():
    """Skip the calling test, with the reason, where the network emulator cannot run."""
    from pycoll.emulator import available  # (here: conftest loads this module for every tier)
    ok, why = available()
    if not ok:
        print(f"SKIP emulator tests: {why}")  # (seen in -s runs: which environment lacks what)
        pytest.skip(f"network emulation unavailable: {why}")


@pytest.fixture(scope="module")
def emu_ok():
    """A module's tests on emulated hosts: checked once per module."""
    require_emulator()
    return True
