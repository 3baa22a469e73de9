"""pycoll.options: one frozen Options, resolved once from arguments and environment (an argument
wins over its variable, which wins over the default), and the one table of the environment
variables pycoll reads."""
import ast
import dataclasses
import re
from pathlib import Path

import pytest

import pycoll
from pycoll import options as opts
from pycoll.options import ENVIRONMENT, Options, environ

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "pycoll"


def test_defaults_without_arguments_or_environment():
    o = Options.resolve(env={})
    assert o == Options()
    assert (o.timeout, o.stall_timeout, o.progress_timeout, o.stripes, o.segment_bytes, o.spin_us) == \
        (120.0, 30.0, 0.0, 1, 1 << 20, 200)
    assert (o.transport, o.single_copy, o.compression, o.topology, o.calibrate, o.tags, o.max_retries) == \
        ("auto", None, None, None, True, (), 8)
    assert o.single_copy_adapt is True


def test_the_environment_sets_what_no_argument_gives():
    env = {"PYCOLL_TIMEOUT": "7.5", "PYCOLL_STALL_TIMEOUT": "0", "PYCOLL_STRIPES": "3", "PYCOLL_TRANSPORT": "TCP",
           "PYCOLL_SINGLE_COPY": "off", "PYCOLL_COMPRESSION": "bf16", "PYCOLL_CALIBRATE": "0",
           "PYCOLL_TOPOLOGY": "sites.toml", "PYCOLL_LINK": "2gbit/50ms", "PYCOLL_SINGLE_COPY_ADAPT": "0"}
    o = Options.resolve(env=env)
    assert o.single_copy_adapt is False
    assert (o.timeout, o.stall_timeout, o.stripes, o.transport, o.single_copy) == (7.5, 0.0, 3, "tcp", 0)
    assert (o.compression, o.calibrate, o.topology, o.link) == ("bf16", False, "sites.toml", "2gbit/50ms")


def test_an_argument_wins_over_the_environment_which_wins_over_the_default():
    env = {"PYCOLL_TIMEOUT": "7", "PYCOLL_TRANSPORT": "shm", "PYCOLL_SINGLE_COPY": "4096"}
    o = Options.resolve(env=env, timeout=3, single_copy=0)
    assert (o.timeout, o.transport, o.single_copy) == (3.0, "shm", 0)  # argument, environment, argument
    assert Options.resolve(env=env, timeout=None).timeout == 7.0  # None: not given
    assert Options.resolve(env={}, timeout=None).timeout == 120.0


def test_empty_variables_count_as_unset(monkeypatch):
    monkeypatch.setenv("PYCOLL_TIMEOUT", "")
    monkeypatch.setenv("PYCOLL_STRIPES", "")
    assert Options.resolve().timeout == 120.0 and Options.resolve().stripes == 1
    monkeypatch.setenv("PYCOLL_TIMEOUT", "9")  # os.environ by default
    assert Options.resolve().timeout == 9.0


def test_stripes_default_to_auto_when_a_link_or_topology_is_known():
    assert Options.resolve(env={}).stripes == 1
    assert Options.resolve(env={}, link="1gbit/10ms").stripes == "auto"
    assert Options.resolve(env={"PYCOLL_TOPOLOGY": "t.toml"}).stripes == "auto"
    assert Options.resolve(env={"PYCOLL_TOPOLOGY": "t.toml", "PYCOLL_STRIPES": "2"}).stripes == 2
    assert Options.resolve(env={"PYCOLL_TOPOLOGY": "t.toml"}, stripes=4).stripes == 4


@pytest.mark.parametrize("name, value", [
    ("PYCOLL_TIMEOUT", "soon"), ("PYCOLL_TIMEOUT", "-1"), ("PYCOLL_TIMEOUT", "0"), ("PYCOLL_STALL_TIMEOUT", "x"),
    ("PYCOLL_STRIPES", "many"), ("PYCOLL_STRIPES", "65"), ("PYCOLL_TRANSPORT", "rdma"),
    ("PYCOLL_SINGLE_COPY", "lots"), ("PYCOLL_SINGLE_COPY", "-5"), ("PYCOLL_CALIBRATE", "maybe"),
    ("PYCOLL_SINGLE_COPY_ADAPT", "sometimes"),
])
def test_a_bad_variable_raises_invalid_argument_naming_it(name, value):
    with pytest.raises(pycoll.InvalidArgument, match=f"environment variable {name}={value!r}"):
        Options.resolve(env={name: value})
    if name != "PYCOLL_TIMEOUT":  # an argument given instead: the variable is not read
        field = ENVIRONMENT[name].field
        Options.resolve(env={name: value}, **{field: getattr(Options(), field) or 1})


@pytest.mark.parametrize("name, value", [
    ("timeout", -1), ("timeout", "soon"), ("stall_timeout", -0.5), ("stripes", 0), ("stripes", "lots"),
    ("segment_bytes", 0), ("spin_us", 1.5), ("transport", "rdma"), ("single_copy", -1), ("tags", [1, 1]),
    ("tags", [1.5]), ("preserve_input", "perhaps"), ("max_retries", -1), ("mesh_timeout", 0),
    ("single_copy_adapt", "sometimes"),
])
def test_a_bad_argument_raises_invalid_argument_naming_it(name, value):
    with pytest.raises(pycoll.InvalidArgument, match=re.escape(name if name != "tags" else "tags:")):
        Options.resolve(env={}, **{name: value})


def test_an_unknown_option_is_a_type_error():
    with pytest.raises(TypeError, match="stripez"):
        Options.resolve(env={}, stripez=2)


def test_options_are_frozen_and_replace_checks():
    o = Options.resolve(env={}, tags=("b", 2, "a"))
    assert o.tags == tuple(sorted(("b", 2, "a"), key=repr))  # canonical: every rank names them alike
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.timeout = 5
    assert o.replace(timeout=5).timeout == 5.0 and o.timeout == 120.0
    with pytest.raises(pycoll.InvalidArgument, match="timeout"):
        o.replace(timeout=0)


def test_other_variables_parse_by_the_table(monkeypatch):
    assert environ("PYCOLL_JOIN_TIMEOUT", {"PYCOLL_JOIN_TIMEOUT": "7"}) == 7.0
    assert environ("PYCOLL_SHM_RING", {"PYCOLL_SHM_RING": "65536"}) == 65536
    assert environ("MASTER_PORT", {}) is None
    for name, value in (("PYCOLL_JOIN_TIMEOUT", "0"), ("PYCOLL_SHM_RING", "1000"), ("MASTER_PORT", "99999"),
                        ("RANK", "first")):
        with pytest.raises(pycoll.InvalidArgument, match=f"{name}={value!r}"):
            environ(name, {name: value})
    monkeypatch.setenv("PYCOLL_SECRET", "s3cret")  # read by pycoll.auth: listed, returned as it is
    assert environ("PYCOLL_SECRET") == "s3cret"


def test_the_communicator_settings_are_options_fields():
    """Every field of Options reads (and sets) as a Communicator attribute of the same name."""
    names = {f.name for f in dataclasses.fields(Options)} - {"link"}  # (link only ever fed stripes="auto")
    for name in names:
        assert isinstance(getattr(pycoll.Communicator, name, None), property), name


def _pycoll_names_in_source():
    """{PYCOLL_* name: files} as string constants in pycoll's code (docstrings and comments
    count too: a variable documented anywhere must be in the table)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for name in re.findall(r"\bPYCOLL_[A-Z0-9_]*[A-Z0-9]\b", path.read_text()):
            found.setdefault(name, set()).add(path.relative_to(PACKAGE).as_posix())
    return found


def test_the_table_names_every_variable_pycoll_reads():
    missing = {n: sorted(f) for n, f in _pycoll_names_in_source().items() if n not in ENVIRONMENT}
    assert missing == {}
    for var in ENVIRONMENT.values():
        assert var.meaning and var.reader, var
        assert var.field is None or var.field in {f.name for f in dataclasses.fields(Options)}, var
    from pycoll import faults, limits
    assert {faults.FAULT_ENV, faults.DELAY_ENV} | set(limits.ENVIRONMENT.values()) <= set(ENVIRONMENT)


# The modules that may read os.environ themselves: pycoll.options (the table), those below it
# (which may not import it), the build script, and the tools, which set up their children's
# environments (pycoll run, the test harness, the training-step benchmark's ranks) or only show a
# default in --help.
OWN_READERS = {"options.py", "faults.py", "limits.py", "auth.py", "observability.py", "emulator/core.py",
               "emulator/_build.py", "_build.py", "cli.py", "launcher.py", "testing.py", "train_bench.py"}


def _environ_uses(package):
    """[(file, line)] of every ``os.environ``/``os.getenv`` outside OWN_READERS."""
    found = []
    for path in sorted(Path(package).rglob("*.py")):
        rel = path.relative_to(package).as_posix()
        if rel in OWN_READERS:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv")
                    and isinstance(node.value, ast.Name) and node.value.id == "os"):
                found.append((rel, node.lineno))
    return found


def test_the_library_reads_the_environment_through_the_table():
    assert _environ_uses(PACKAGE) == []


def test_the_environment_scan_bites(tmp_path):
    import shutil
    shutil.copytree(PACKAGE, tmp_path / "pycoll", ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.c"))
    target = tmp_path / "pycoll" / "net" / "mesh.py"
    target.write_text(target.read_text() + "\nRING = os.environ.get('PYCOLL_SHM_RING')\n")
    assert [f for f, _ in _environ_uses(tmp_path / "pycoll")] == ["net/mesh.py"]


def test_defaults_are_exported_where_they_were():
    from pycoll.comm import communicator
    assert communicator.DEFAULT_SEGMENT == opts.DEFAULT_SEGMENT == Options().segment_bytes
    assert communicator.DEFAULT_TIMEOUT == Options().timeout


def test_failover_is_on_by_default_and_pycoll_failover_turns_it_off():
    assert Options.resolve(env={}).failover is True
    assert Options.resolve(env={"PYCOLL_FAILOVER": "0"}).failover is False
    assert Options.resolve(env={"PYCOLL_FAILOVER": "0"}, failover=True).failover is True
    with pytest.raises(pycoll.InvalidArgument, match="PYCOLL_FAILOVER"):
        Options.resolve(env={"PYCOLL_FAILOVER": "sometimes"})
