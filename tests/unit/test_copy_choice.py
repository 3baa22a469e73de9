"""The engine's choice between single copy and the shared-memory rings (csrc/core/copy_choice.c),
fed synthetic run times by tests/c/copy_choice.c: it keeps single copy where that is faster,
moves a size class to the rings where they are clearly faster, comes back, ignores near ties
and outliers, learns each size apart, and probes on the same calls on every rank whatever they
measured. (The same choice over real transfers, bit for bit: tests/e2e/test_shm.py.)"""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_copy_choice_learner(tmp_path):
    if shutil.which("cc") is None:
        pytest.skip("cc is not installed")
    exe = tmp_path / "copy_choice"
    core = ROOT / "csrc" / "core"
    r = subprocess.run(["cc", "-std=gnu99", "-O2", "-Wall", "-Wextra", "-Werror", f"-I{core}",
                        str(ROOT / "tests" / "c" / "copy_choice.c"), str(core / "copy_choice.c"), "-o", str(exe)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "OK", r.stdout + r.stderr
