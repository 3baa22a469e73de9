"""A built package installs and runs anywhere, without the source tree.

Builds the sdist and, from it, the wheel once (``python -m build``), then in
fresh virtual environments outside the tree (no torch, no checkout on
sys.path, cwd a temp dir):

* the wheel: ``pycoll run -n 2`` (and ``python -m pycoll run``) a script that
  all-reduces and checks the result; the package's data (py.typed, the delay
  line source) is there and ``pycoll.emulator`` compiles its delay line into a
  user cache dir; as root (CI), a 2-host emulated network runs from it too;
* the sdist: ``pip install pycoll-*.tar.gz`` compiles the C core, and the same
  2-rank script runs.

Needs a C compiler and pip's package index (for the build backend and
numpy/pyzmq/msgpack/cffi/tqdm; pip's cache makes reruns quick).  About a
minute, most of it pip.
"""
import json
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

WORKER = textwrap.dedent("""
    import os
    import sys
    import numpy as np
    import pycoll

    # The installed package in the fresh venv, not a checkout.
    assert sys.prefix == os.environ["EXPECT_PREFIX"], (sys.prefix, os.environ["EXPECT_PREFIX"])
    assert pycoll.__file__.startswith(sys.prefix) and "site-packages" in pycoll.__file__, pycoll.__file__
    with pycoll.init() as comm:
        x = np.full(1000, comm.rank + 1, dtype=np.float32)
        comm.all_reduce(x, op="sum")
        n = comm.world_size
        assert n == 2 and np.all(x == n * (n + 1) / 2), x[:4]
        comm.barrier()
        print(f"OK rank {comm.rank} sum={x[0]} from {pycoll.__file__}", flush=True)
""")

CHECK_DATA = textwrap.dedent("""
    import json, os, pathlib
    import pycoll
    from pycoll.emulator import _build
    pkg = pathlib.Path(pycoll.__file__).parent
    src = _build.source_path()
    binary = _build.delayline_binary()
    print(json.dumps({"py_typed": (pkg / "py.typed").is_file(), "src": str(src),
                      "binary": binary, "executable": os.access(binary, os.X_OK)}))
""")

EMULATE = textwrap.dedent("""
    import sys
    from pycoll.emulator import Emulator, EmuSpec, available
    ok, why = available()
    if not ok:
        print("UNAVAILABLE", why)
        sys.exit(3)
    with Emulator(EmuSpec.uniform(2, delay_s=0.005)) as emu:
        res = emu.loopback_check(count=3)
    for pair, r in res.items():
        assert 0.009 <= r["rtt"] <= 0.060, (pair, r)
    print("EMU OK", {k: round(v["rtt"], 4) for k, v in res.items()})
""")


def _run(cmd, *, timeout, cwd, env=None, check=True):
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{cmd} exited {r.returncode}\n--- stdout\n{r.stdout[-4000:]}\n"
                             f"--- stderr\n{r.stderr[-4000:]}")
    return r


def _clean_env(home, **extra):
    """The environment for the venv's programs: nothing that points back at the checkout."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")
           and not k.startswith("PYCOLL_")}
    env["PYTHONNOUSERSITE"] = "1"
    env["XDG_CACHE_HOME"] = str(home / "cache")  # the delay line's cache, not the user's
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    """(sdist, wheel), built once: the wheel from the sdist, as `python -m build` does."""
    pytest.importorskip("build", reason="the `build` package (pip install -e '.[test]')")
    out = tmp_path_factory.mktemp("dist")
    # A copy of the tree, so the build's own build/ and egg-info never touch the checkout.
    src = tmp_path_factory.mktemp("src") / "pycoll"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", "*.so", "*.o", ".hypothesis",
        ".pytest_cache", ".venv"))
    _run([sys.executable, "-m", "build", "--outdir", out, src], timeout=600, cwd=out)
    sdists, wheels = sorted(out.glob("pycoll-*.tar.gz")), sorted(out.glob("pycoll-*.whl"))
    assert len(sdists) == 1 and len(wheels) == 1, os.listdir(out)
    return sdists[0], wheels[0]


def _venv(path):
    venv.EnvBuilder(with_pip=True, clear=True).create(path)
    return path / "bin" / "python"


def _install(py, target, cwd, home):
    # Dependencies come from the index (or pip's cache); torch stays out.
    _run([py, "-m", "pip", "install", "--disable-pip-version-check", "--no-input", target],
         timeout=600, cwd=cwd, env=_clean_env(home))


def _run_two_ranks(py, work, home):
    script = work / "allreduce_check.py"
    script.write_text(WORKER)
    pycoll_cli = py.parent / "pycoll"
    assert pycoll_cli.is_file(), "console script `pycoll` was not installed"
    prefix = _run([py, "-c", "import sys; print(sys.prefix)"], timeout=60, cwd=work).stdout.strip()
    env = _clean_env(home, EXPECT_PREFIX=prefix)
    r = _run([pycoll_cli, "run", "-n", "2", script], timeout=120, cwd=work, env=env)
    oks = [line for line in r.stdout.splitlines() if "OK rank" in line]
    assert len(oks) == 2, r.stdout + r.stderr
    assert all(str(ROOT) not in line for line in oks), oks
    # `python -m pycoll` too.
    r = _run([py, "-m", "pycoll", "run", "-n", "2", script], timeout=120, cwd=work, env=env)
    assert r.stdout.count("OK rank") == 2, r.stdout + r.stderr


def test_sdist_contents(dists):
    sdist, wheel = dists
    with tarfile.open(sdist) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    for need in ("csrc/include/pycoll.h", "csrc/plan/plan.h", "csrc/transport/transport.h", "csrc/transport/wire.h",
                 "csrc/kernels/floatconv.h",
                 "csrc/core/engine.c", "csrc/tools/delayline.c", "pycoll/_build.py", "pycoll/py.typed",
                 "setup.py", "pyproject.toml", "MANIFEST.in", "LICENSE", "README.md", "tests/conftest.py"):
        assert need in names, f"{need} missing from {sdist.name}"
    assert not [n for n in names if n.endswith((".so", ".o", ".pyc"))], names
    # Every C file _build.py compiles is in the sdist.
    sys.path.insert(0, str(ROOT / "pycoll"))
    try:
        import _build as core_build  # noqa: E402  (pycoll/_build.py, without importing pycoll)
    finally:
        sys.path.pop(0)
    assert {f"csrc/{s}" for s in core_build.SOURCES} <= names

    with zipfile.ZipFile(wheel) as zf:
        wnames = set(zf.namelist())
        meta = zf.read(next(n for n in wnames if n.endswith(".dist-info/METADATA"))).decode()
    for need in ("pycoll/py.typed", "pycoll/emulator/delayline.c", "pycoll/emulator/README.md"):
        assert need in wnames, f"{need} missing from {wheel.name}"
    assert any(n.startswith("pycoll/core/_core") and n.endswith(".so") for n in wnames), wnames
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in wnames), wnames
    assert "License-Expression: MIT" in meta
    assert not [n for n in wnames if n.startswith(("tests/", "csrc/"))]


@pytest.fixture(scope="module")
def wheel_venv(dists, tmp_path_factory):
    """(python, work dir, home) of a fresh venv with the wheel installed."""
    _sdist, wheel = dists
    home = tmp_path_factory.mktemp("wheel")
    work = home / "work"
    work.mkdir()
    py = _venv(home / "venv")
    _install(py, wheel, work, home)
    return py, work, home


def test_wheel_installs_and_runs_outside_the_tree(wheel_venv):
    py, work, home = wheel_venv
    r = _run([py, "-c", "import importlib.util as u; print(u.find_spec('torch') is None)"],
             timeout=60, cwd=work, env=_clean_env(home))
    assert r.stdout.strip() == "True", "torch must not come with the plain package"
    _run_two_ranks(py, work, home)


def test_wheel_package_data_and_delayline_build(wheel_venv):
    """py.typed is installed; the emulator finds its C source inside the installed
    package and compiles it into the user's cache dir (no root needed)."""
    py, work, home = wheel_venv
    r = _run([py, "-c", CHECK_DATA], timeout=180, cwd=work, env=_clean_env(home))
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info["py_typed"], info
    assert info["src"].startswith(str(home / "venv")), info
    assert info["src"].endswith("site-packages/pycoll/emulator/delayline.c"), info
    assert info["binary"].startswith(str(home / "cache" / "pycoll")) and info["executable"], info


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root (CI runs as root)")
def test_wheel_emulator_runs_a_network(wheel_venv):
    """As root (CI): a 2-host emulated network from the installed package."""
    py, work, home = wheel_venv
    r = _run([py, "-c", EMULATE], timeout=120, cwd=work, env=_clean_env(home), check=False)
    if r.returncode == 3:  # same rule as tests/e2e/test_emulator.py: only when available() says no
        pytest.skip(f"network emulation unavailable here: {r.stdout.strip()}")
    assert r.returncode == 0 and "EMU OK" in r.stdout, r.stdout + r.stderr


def test_sdist_installs_and_runs_outside_the_tree(dists, tmp_path):
    sdist, _wheel = dists
    work = tmp_path / "work"
    work.mkdir()
    py = _venv(tmp_path / "venv")
    # pip builds the wheel from the sdist (compiling the C core) in its own build env.
    _install(py, sdist, work, tmp_path)
    _run_two_ranks(py, work, tmp_path)
