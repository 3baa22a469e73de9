"""The C core without Python: csrc/Makefile builds libpycoll.a warning-free,
tests/c/smoke.c (pycoll.h only) links against it and runs, and the Makefile's
SOURCES is the one list of C files (pycoll/_build.py reads the same list)."""
import functools
import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
TIMEOUT = 120


@functools.lru_cache(maxsize=None)
def _build_module():
    """pycoll/_build.py, loaded without importing pycoll (as setup.py's cffi_modules does)."""
    spec = importlib.util.spec_from_file_location("pycoll_build_script", ROOT / "pycoll" / "_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(cmd, **kw):
    # The Makefile's defaults (-O2), not whatever CFLAGS or MAKEFLAGS the caller's shell has.
    env = {k: v for k, v in os.environ.items() if k not in ("CFLAGS", "MAKEFLAGS", "MFLAGS")}
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=TIMEOUT, env=env, **kw)


def _need(tool):
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed")


def make_sources():
    _need("make")
    r = _run(["make", "-s", "--no-print-directory", "-C", CSRC, "print-sources"])
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def test_one_source_list():
    names = make_sources()
    assert names == _build_module().SOURCES
    # Every C file of the core is on it (csrc/tools/ holds separate programs).
    assert sorted(names) == sorted(p.relative_to(CSRC).as_posix() for p in CSRC.rglob("*.c")
                                   if p.parent.name != "tools")


def test_static_library_and_smoke_program(tmp_path):
    _need("make")
    _need("cc")
    build = tmp_path / "build"
    r = _run(["make", "-C", CSRC, f"BUILD={build}", "-j2", "lib"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "warning:" not in r.stdout + r.stderr, r.stdout + r.stderr
    assert re.search(r"(^|\s)-O2(\s|$)", r.stdout), r.stdout
    lib = build / "libpycoll.a"
    assert lib.is_file()
    assert not list(CSRC.rglob("*.o")), "objects belong in BUILD, not csrc/"

    smoke = tmp_path / "smoke"
    r = _run(["cc", "-std=c99", "-O2", "-Wall", "-Wextra", "-Werror", f"-I{CSRC / 'include'}",
              ROOT / "tests" / "c" / "smoke.c", lib, "-pthread", "-lssl", "-lcrypto", "-o", smoke])
    assert r.returncode == 0, r.stdout + r.stderr
    r = _run([smoke], cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "OK", r.stdout + r.stderr


def _write(tmp_path, makefile, files=("a.c", "b.c")):
    for name in files:
        (tmp_path / name).write_text("")
    path = tmp_path / "Makefile"
    path.write_text(makefile)
    return str(path)


def test_source_list_parser_accepts_plain_assignments(tmp_path):
    parse = _build_module().makefile_sources
    assert parse(_write(tmp_path, "X = 1\nSOURCES = a.c \\\n    b.c # the core\n\nall:\n\techo $(SOURCES)\n")) == \
        ["a.c", "b.c"]
    assert parse(_write(tmp_path, "# SOURCES = c.c\nSOURCES := b.c a.c\n")) == ["b.c", "a.c"]
    (tmp_path / "core").mkdir()
    assert parse(_write(tmp_path, "SOURCES = core/e.c a.c\n", files=("a.c", "core/e.c"))) == ["core/e.c", "a.c"]


@pytest.mark.parametrize("makefile", [
    "OTHER = a.c\n",                                # none
    "SOURCES = a.c\nSOURCES = b.c\n",               # two
    "SOURCES = a.c\nSOURCES += b.c\n",              # an addition make would see
    "SOURCES ?= a.c\n",
    "SOURCES = $(wildcard *.c)\n",                  # make syntax
    "SOURCES = a.c ../b.c\n",                       # a path out of the folder
    "SOURCES = a.c /tmp/b.c\n",                     # an absolute path
    "SOURCES = a.c a.c\n",                          # a duplicate
    "SOURCES = a.c c.c\n",                          # a missing file
    "SOURCES = a.c b.h\n",                          # not C
    "SOURCES =\n",                                  # empty
    "define SOURCES\na.c\nendef\n",
])
def test_source_list_parser_refuses_what_make_could_read_otherwise(tmp_path, makefile):
    with pytest.raises(ValueError):
        _build_module().makefile_sources(_write(tmp_path, makefile))


# The C core's rooms and what each may include (its own headers and the public one): planners
# never see a connection, transports never see a plan, kernels see neither.
MAY_INCLUDE = {
    "include": set(),
    "kernels": {"include", "kernels"},
    "plan": {"include", "plan"},
    "transport": {"include", "transport"},
    "core": {"include", "plan", "transport", "kernels"},
}


def _include_violations(csrc):
    home = {p.name: p.parent.name for p in csrc.glob("*/*.h")}
    found = []
    for path in sorted(csrc.glob("*/*.[ch]")):
        room = path.parent.name
        if room == "tools":
            continue
        for header in re.findall(r'^\s*#\s*include\s+"([^"]+)"', path.read_text(), flags=re.M):
            owner = home.get(header)
            if owner is None or (owner != room and owner not in MAY_INCLUDE.get(room, set())):
                found.append((path.relative_to(csrc).as_posix(), header))
    return found


def test_c_rooms_include_only_what_they_may():
    assert set(MAY_INCLUDE) | {"tools"} == {p.name for p in CSRC.iterdir() if p.is_dir()}
    assert _include_violations(CSRC) == []


def test_c_room_rule_bites(tmp_path):
    shutil.copytree(CSRC, tmp_path / "csrc")
    planner = tmp_path / "csrc" / "plan" / "plan_ring.c"
    planner.write_text('#include "transport.h"\n' + planner.read_text())
    assert _include_violations(tmp_path / "csrc") == [("plan/plan_ring.c", "transport.h")]


def _concrete_transport_names(engine_source):
    """The concrete transports' functions (pc_tcp_*, pc_shm_*) named in the engine's code."""
    code = re.sub(r"/\*.*?\*/|//[^\n]*", "", engine_source, flags=re.S)
    return sorted(set(re.findall(r"\bpc_(?:tcp|shm|tls)_\w+", code)))


def test_the_engine_never_names_a_concrete_transport():
    """The engine opens connections by kind (transport/transport.c: pc_conn_open) and drives them
    through the table of functions in transport.h."""
    assert _concrete_transport_names((CSRC / "core" / "engine.c").read_text()) == []
    assert _concrete_transport_names('c = pc_shm_conn(fd, f, 0, &st); /* pc_tcp_conn */') == ["pc_shm_conn"]
