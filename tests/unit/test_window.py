"""Result windows (csrc/core/window.c), driven by tests/c/window.c through a fake peer
connection: our window is sealed and only replaced when it must grow; a peer's is mapped once
per generation, shows the owner's bytes (shared, not copied), and every lie about it is refused
(a length past the memfd's end, an unsealed memfd, a range outside it or wrapping around, an fd
that cannot be fetched) without being tried again. (The windows over real transfers, bit for bit
and through a peer's death: tests/e2e/test_shm.py.)"""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_window_mapping_and_checks(tmp_path):
    if shutil.which("cc") is None:
        pytest.skip("cc is not installed")
    exe = tmp_path / "window"
    csrc = ROOT / "csrc"
    r = subprocess.run(["cc", "-std=gnu99", "-O2", "-Wall", "-Wextra", "-Werror", f"-I{csrc / 'core'}",
                        f"-I{csrc / 'include'}", f"-I{csrc / 'transport'}", str(ROOT / "tests" / "c" / "window.c"),
                        str(csrc / "core" / "window.c"), "-o", str(exe)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "OK", r.stdout + r.stderr
