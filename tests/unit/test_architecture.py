"""The house in layers: ``lint-imports`` checks the contracts in ``.importlinter`` (imports only go
down, only the tools import pycoll.testing, planning never reaches the network), and a broken
copy of the package proves that the contracts bite. One engine boundary: only pycoll.core.engine calls
the C communicator (``lib.pc_comm_*``). No module reads or writes another object's underscore
attributes (the communicator's state is its Epoch's, reached through the Epoch's public interface)."""
import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / ".importlinter"
LAYERS = "pycoll in layers: imports only go down"
TESTING = "only the tools import pycoll.testing"
PLANNING = "planning never reaches the network"  # pycoll.plan never imports net, control or comm
COMM_ROOM = "pycoll.comm in layers"


def _lint_imports(cwd, pythonpath=None):
    exe = Path(sys.executable).with_name("lint-imports")
    exe = str(exe) if exe.exists() else shutil.which("lint-imports")
    assert exe, "lint-imports is missing: pip install -e '.[test]' (import-linter)"
    env = dict(os.environ, COLUMNS="200")
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    # --no-cache: nothing written into the tree; the config is given, since cwd may be a copy
    proc = subprocess.run([exe, "--no-cache", "--no-logo", str(CONFIG)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)
    return proc.returncode, proc.stdout + proc.stderr


def _says(out, name, verdict):
    """``out`` reports contract ``name`` as ``verdict`` (KEPT/BROKEN), however the lines were wrapped."""
    return re.sub(r"\s+", "", name + verdict) in re.sub(r"\s+", "", out)


def test_contracts_are_kept():
    rc, out = _lint_imports(ROOT, ROOT)
    assert rc == 0, out
    for name in (LAYERS, TESTING, PLANNING, COMM_ROOM, "pycoll.core in layers", "pycoll.plan in layers",
                 "pycoll.net in layers", "pycoll.control in layers"):
        assert _says(out, name, "KEPT"), out


@pytest.mark.parametrize("module, line, broken", [
    ("faults.py", "from pycoll.comm import communicator", [LAYERS]),        # the bottom reaching up
    ("comm/agreement.py", "from pycoll import testing", [LAYERS, TESTING]),  # the core importing the harness
    ("plan/planners.py", "from pycoll.net import mesh", [LAYERS, PLANNING]),  # planning reaching the network
    ("errors.py", "def f():\n    from pycoll import group", [LAYERS]),     # a lazy import counts too
    ("comm/work.py", "from pycoll.comm import agreement", [COMM_ROOM]),      # upward inside a room
    ("group.py", "from pycoll import wan", [LAYERS]),                        # an old flat name, used inside
])
def test_contracts_bite(tmp_path, module, line, broken):
    """An upward import injected into a copy of the package fails the named contracts."""
    shutil.copytree(ROOT / "pycoll", tmp_path / "pycoll", ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.c"))
    target = tmp_path / "pycoll" / module
    target.write_text(target.read_text() + "\n" + line + "\n")
    rc, out = _lint_imports(tmp_path, tmp_path)
    assert rc != 0, out
    for name in broken:
        assert _says(out, name, "BROKEN"), out
    dotted = "pycoll." + module[:-3].replace("/", ".")
    assert f"{dotted} -> " in out, out  # the chain names the broken module


# The C communicator's functions are named only here (and where the C core is built and loaded).
ENGINE_ONLY = {"core/engine.py", "_build.py", "core/native.py"}


def _c_communicator_uses(package):
    """[(file, line, name)] for every ``pc_comm_*`` named in code (an attribute, a name, or a
    string that is exactly such a name, as for getattr) outside ENGINE_ONLY; comments and
    docstrings that mention one do not count."""
    found = []
    for path in sorted(Path(package).rglob("*.py")):
        rel = path.relative_to(package).as_posix()
        if rel in ENGINE_ONLY:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            name = (node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name)
                    else node.value if isinstance(node, ast.Constant) and isinstance(node.value, str)
                    and re.fullmatch(r"pc_comm_\w+", node.value) else None)
            if name and name.startswith("pc_comm_"):
                found.append((rel, node.lineno, name))
    return found


def test_only_the_engine_calls_the_c_communicator():
    """pycoll.core.engine is the one module that calls lib.pc_comm_* (mentions in prose are fine)."""
    assert _c_communicator_uses(ROOT / "pycoll") == []


@pytest.mark.parametrize("module, line, name", [
    ("comm/agreement.py", "def f(c):\n    return lib.pc_comm_last_error(c)", "pc_comm_last_error"),  # a call
    ("comm/communicator.py", "_stop = getattr(lib, 'pc_comm_shutdown')", "pc_comm_shutdown"),              # by name
    ("emulator/core.py", "from pycoll.core.native import lib\nrun = lib.pc_comm_run", "pc_comm_run"),  # a subpackage
])
def test_the_engine_boundary_bites(tmp_path, module, line, name):
    """A C-communicator call injected into a copy of the package outside pycoll.core.engine is found."""
    shutil.copytree(ROOT / "pycoll", tmp_path / "pycoll", ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.c"))
    target = tmp_path / "pycoll" / module
    target.write_text(target.read_text() + "\n" + line + "\n")
    assert [(f, n) for f, _, n in _c_communicator_uses(tmp_path / "pycoll")] == [(module, name)]


def test_planning_loads_without_the_network():
    """``import pycoll.plan.planners`` (or the cost model) loads neither ZeroMQ nor the communicator:
    ``import pycoll`` keeps the group and the communicator for first use (``pycoll.init``)."""
    code = ("import sys\n"
            "class NoZmq:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'zmq' or name.startswith('zmq.'): raise ImportError('zmq is blocked')\n"
            "sys.meta_path.insert(0, NoZmq())\n"
            "import pycoll.plan.planners, pycoll.plan.costmodel\n"
            "loaded = [m for m in ('pycoll.comm.communicator', 'pycoll.control.client', 'pycoll.net.mesh')"
            " if m in sys.modules]\n"
            "assert not loaded, loaded\n"
            "import pycoll\n"
            "assert callable(pycoll.CollectiveError) and 'init' in dir(pycoll)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr


def test_the_lazy_names_are_the_real_ones():
    import pycoll
    from pycoll.comm.communicator import Communicator
    from pycoll.group import connect, init
    assert (pycoll.init, pycoll.connect, pycoll.Communicator) == (init, connect, Communicator)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        pycoll.nope  # noqa: B018


# ---- no module reaches into another object's private state ------------------------------------
# ``X._name`` is allowed only for these, each for a reason (the standard library's and cffi's
# public API spelled with an underscore, or a third party's private name with no public one).
PRIVATE_ALLOWED = {
    ("os", "_exit"): "leave a forked child without running the parent's cleanup (pycoll.launcher)",
    (None, "_replace"): "namedtuple's public API (agreement.Outcome)",
    (None, "_fields"): "namedtuple's public API",
    (None, "_asdict"): "namedtuple's public API",
}


def _private_uses(package):
    """[(file, line, text)] for every ``X._name`` (read, write or call; not ``__dunder__``) where X
    is not ``self`` or ``cls`` and the use is not in PRIVATE_ALLOWED (``None``: any object), plus
    ``getattr``/``setattr``/``hasattr``/``delattr`` with such a name on such an object."""
    found = []
    for path in sorted(Path(package).rglob("*.py")):
        rel = path.relative_to(package).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute):
                target, attr = node.value, node.attr
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                  and node.func.id in ("getattr", "setattr", "hasattr", "delattr") and len(node.args) >= 2
                  and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
                target, attr = node.args[0], node.args[1].value
            else:
                continue
            if not attr.startswith("_") or (attr.startswith("__") and attr.endswith("__")):
                continue
            owner = target.id if isinstance(target, ast.Name) else None
            if owner in ("self", "cls") or (owner, attr) in PRIVATE_ALLOWED or (None, attr) in PRIVATE_ALLOWED:
                continue
            found.append((rel, node.lineno, ast.unparse(node)))
    return found


def test_no_module_reads_another_objects_private_attributes():
    assert _private_uses(ROOT / "pycoll") == []


@pytest.mark.parametrize("module, line, text", [
    ("comm/shared_state.py", "def f(comm):\n    comm._seq += 1", "comm._seq"),               # the old way, a write
    ("group.py", "def f(comm):\n    return comm._epoch.seq", "comm._epoch"),                 # a read
    ("comm/agreement.py", "def f(ep):\n    return ep.client._sock", "ep.client._sock"),      # deeper down
    ("torch/backend.py", "def f(comm):\n    return getattr(comm, '_epoch')", "getattr(comm, '_epoch')"),  # by name
    ("comm/communicator.py", "def f(self):\n    return self._epoch._owed", "self._epoch._owed"),  # self's own, another's
])
def test_the_private_attribute_scan_bites(tmp_path, module, line, text):
    """An underscore attribute of another object, injected into a copy of the package, is found."""
    shutil.copytree(ROOT / "pycoll", tmp_path / "pycoll", ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.c"))
    target = tmp_path / "pycoll" / module
    target.write_text(target.read_text() + "\n" + line + "\n")
    assert [(f, t) for f, _, t in _private_uses(tmp_path / "pycoll")] == [(module, text)]
