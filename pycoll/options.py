"""A communicator's settings: one frozen :class:`Options`, resolved once from arguments and environment.

``pycoll.init(...)`` and ``pycoll.connect(...)`` resolve their keyword arguments with
:meth:`Options.resolve`: an argument wins over its environment variable, which wins over the
default. The communicator reads its settings from that object only (``comm.options``); its
attributes of the same names (``comm.timeout``, ``comm.compression``, ...) read it, and setting
one replaces the object with a checked copy (:meth:`Options.replace`).

:data:`ENVIRONMENT` is the one table of the environment variables pycoll reads, with their
meaning and the module that reads each. The library reads them through :func:`environ` (which
parses and checks a value by the table, naming the variable when it is bad), except the modules
below this one, which keep their own reads and are listed here for the record:
:mod:`pycoll.limits` (:data:`pycoll.limits.ENVIRONMENT`), :mod:`pycoll.faults` (the test
harness's fault points: it imports nothing from pycoll), :mod:`pycoll.auth` (the secret),
:mod:`pycoll.observability` (the log level), the emulator tool and the build script.

This module is at the bottom of the house: it imports only errors, units and limits. Settings
that need a higher layer to be understood stay as given and are checked there: ``compression``
(:func:`pycoll.plan.compression.codec_name`, when a communicator is made or the setting
changes), ``topology`` (loaded by :mod:`pycoll.plan.topology`) and ``stripes="auto"`` (derived
from ``link``/``topology`` by :func:`pycoll.net.links.settle`).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Optional

from pycoll import limits as _limits
from pycoll.errors import InvalidArgument

__all__ = ["Options", "Variable", "ENVIRONMENT", "environ", "DEFAULT_TIMEOUT", "DEFAULT_SEGMENT", "DEFAULT_STALL",
           "TRANSPORTS", "parse_single_copy", "parse_shm_ring", "parse_stripes", "parse_transport", "tag_list"]

DEFAULT_TIMEOUT = 120.0      # seconds a collective may take
DEFAULT_SEGMENT = 1 << 20    # pipeline unit; 1 MiB measured best on loopback
DEFAULT_STALL = 30.0         # seconds before keepalive declares an idle link dead
TRANSPORTS = ("auto", "shm", "tcp")
MAX_STRIPES = 64
_OFF = ("off", "no", "false")


# ---- parsing one value (an argument or an environment variable's text) -----------------------------
# Each parser takes the value and ``what``: how the error names its source and value
# ("timeout=-1", "environment variable PYCOLL_TIMEOUT='soon'"); it returns the checked value.
def _seconds(value, what, positive=False):
    try:
        if isinstance(value, bool):
            raise ValueError
        seconds = float(value)
    except (TypeError, ValueError):
        raise InvalidArgument(f"{what} is not a number of seconds") from None
    if seconds != seconds or seconds < 0 or (positive and seconds == 0):
        raise InvalidArgument(f"{what} must be {'positive' if positive else '>= 0'}")
    return seconds


def _positive_seconds(value, what):
    return _seconds(value, what, positive=True)


def _count(value, what, low=0):
    try:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError
        n = int(value)
    except (TypeError, ValueError):
        raise InvalidArgument(f"{what} is not an integer") from None
    if n < low:
        raise InvalidArgument(f"{what} must be >= {low}")
    return n


def _flag(value, what):
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0",) + _OFF:
            return False
        raise InvalidArgument(f"{what} is not on or off (1/0, true/false, yes/no, on/off)")
    if not isinstance(value, float) and value in (0, 1):  # True, False, 0, 1 (NumPy's too)
        return bool(value)
    raise InvalidArgument(f"{what} is not True or False")


def _text(value, what):
    if not isinstance(value, str):
        raise InvalidArgument(f"{what} is not a string")
    return value


def _port(value, what):
    port = _count(value, what)
    if not 1 <= port <= 65535:
        raise InvalidArgument(f"{what} is not a port (1-65535)")
    return port


def parse_stripes(value, what=None):
    """Connections per peer pair: an integer in [1, 64], or "auto" (derived from the link or
    the topology, see :func:`pycoll.net.links.settle`)."""
    what = what or f"stripes={value!r}"
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        n = _count(value, what, 1)
    except InvalidArgument:
        raise InvalidArgument(f"{what}: stripes must be a positive integer or 'auto'") from None
    if n > MAX_STRIPES:
        raise InvalidArgument(f"{what}: stripes must be in [1, {MAX_STRIPES}]")
    return n


def parse_transport(value, what=None):
    """The transport policy: "auto" (shared memory to same-host peers, TCP to the rest), "shm"
    or "tcp", in any case."""
    what = what or f"transport {value!r}"
    mode = value.lower() if isinstance(value, str) else value
    if mode not in TRANSPORTS:
        raise InvalidArgument(f"{what} is not one of {', '.join(TRANSPORTS)}")
    return mode


def parse_single_copy(value, what=None):
    """Smallest payload a same-host peer copies straight out of our memory, in bytes: an
    integer >= 0, or "off"/"no"/"false" (0, off); None or "" for the C core's default."""
    what = what or f"single copy threshold {value!r}"
    if value is None or value == "":
        return None
    if isinstance(value, str) and value.lower() in _OFF:
        return 0
    try:
        return _count(value, what)
    except InvalidArgument:
        raise InvalidArgument(f"{what} is not a byte count >= 0 (or 0 / off)") from None


def parse_shm_ring(value, what=None):
    """Bytes of a shared-memory ring per direction: a power of two >= 65536."""
    what = what or f"shared-memory ring size {value!r}"
    n = _count(value, what)
    if n < 65536 or n & (n - 1):
        raise InvalidArgument(f"{what} must be a power of two >= 65536")
    return n


def tag_list(tags):
    """The tags a communicator offers, in a canonical order (every rank must name the same)."""
    if tags is None or tags == ():
        return ()
    if isinstance(tags, (str, bytes, int)):
        tags = (tags,)
    out = []
    for t in tags:
        if not isinstance(t, (str, int)) or isinstance(t, bool):
            raise InvalidArgument(f"tags: {t!r} is not a str or int")
        if t in out:
            raise InvalidArgument(f"tags: {t!r} is named twice")
        out.append(t)
    return tuple(sorted(out, key=repr))


def _lanes(text, what):
    n = _count(text, what)
    if not 1 <= n <= 8:
        raise InvalidArgument(f"{what}: lanes must be 1 to 8")
    return n


# ---- the table -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Variable:
    """One environment variable pycoll reads: ``parse(text, what)`` turns its text into a value
    (raising InvalidArgument that names ``what``), ``field`` is the :class:`Options` field it
    sets (None: read elsewhere), ``reader`` the module that reads it."""

    name: str
    meaning: str
    reader: str
    parse: Optional[Callable[[str, str], Any]] = None
    field: Optional[str] = None


def _limit(name):
    field = next(f for f, n in _limits.ENVIRONMENT.items() if n == name)
    return Variable(name, f"Limits.{field} (see pycoll.limits)", "pycoll.limits")


ENVIRONMENT = {v.name: v for v in (
    # The communicator's settings: Options.resolve reads these once (an argument wins).
    Variable("PYCOLL_TIMEOUT", "seconds a collective may take (timeout=; default 120)", "pycoll.options",
             _positive_seconds, "timeout"),
    Variable("PYCOLL_STALL_TIMEOUT", "seconds after which keepalive declares an idle link dead, 0: off "
             "(stall_timeout=; default 30)", "pycoll.options", _seconds, "stall_timeout"),
    Variable("PYCOLL_STRIPES", "connections per peer pair, or auto (stripes=; default auto when a link or "
             "topology is known, else 1)", "pycoll.options", parse_stripes, "stripes"),
    Variable("PYCOLL_LINK", "the links' bandwidth and round trip, e.g. 2gbit/50ms, for stripes=auto (link=)",
             "pycoll.options", _text, "link"),
    Variable("PYCOLL_TOPOLOGY", "topology file: groups, ring order, cost model, stripes; measure: probe the "
             "network when a group forms (topology=)",
             "pycoll.options", _text, "topology"),
    Variable("PYCOLL_TRANSPORT", "auto (shared memory to same-host peers, TCP to the rest), shm or tcp "
             "(transport=)", "pycoll.options", parse_transport, "transport"),
    Variable("PYCOLL_SINGLE_COPY", "bytes from which a same-host peer copies a payload straight out of our "
             "memory; 0 or off: never (single_copy=; default: the C core's)", "pycoll.options",
             parse_single_copy, "single_copy"),
    Variable("PYCOLL_SINGLE_COPY_ADAPT", "1: each communicator times single copy against the rings now and then "
             "and keeps the faster per size (single copy waits for the peer to run: slower where other jobs "
             "hold the cores); 0: always single copy from PYCOLL_SINGLE_COPY (single_copy_adapt=; default 1)",
             "pycoll.options", _flag, "single_copy_adapt"),
    Variable("PYCOLL_COMPRESSION", "default wire codec of float32 payloads: none, fp16, bf16, int8 "
             "(compression=)", "pycoll.options", _text, "compression"),
    Variable("PYCOLL_PROBE_SECONDS", "seconds each pair's bandwidth flow lasts in the topology=\"measure\" "
             "probe (probe_seconds=; default 0.3)", "pycoll.options", _positive_seconds, "probe_seconds"),
    Variable("PYCOLL_ENCRYPT", "1: encrypt the coordinator channel (ZeroMQ CURVE) and the data plane's TCP "
             "connections (TLS 1.3), keys derived from PYCOLL_SECRET; the same on every peer and the "
             "coordinator; shared memory between same-host peers stays as it is (default 0)",
             "pycoll.control, pycoll.net", _flag),
    Variable("PYCOLL_FAILOVER", "0: a lost coordinator is not succeeded by a member; the group waits for it "
             "(coordinator_wait=) or fails (failover=; default 1)", "pycoll.options", _flag, "failover"),
    Variable("PYCOLL_CALIBRATE", "0: do not measure the cost model when an epoch is installed (calibrate=; "
             "default 1)", "pycoll.options", _flag, "calibrate"),
    # Making a group (pycoll.init / pycoll.connect, the torch backend).
    Variable("PYCOLL_JOIN_TIMEOUT", "seconds to wait for the group to form or admit us (join_timeout=; "
             "default 120 for init, 300 for connect)", "pycoll.group", _positive_seconds),
    Variable("PYCOLL_MASTER_PORT", "the coordinator's port (set by `pycoll run`; preferred to MASTER_PORT)",
             "pycoll.group, pycoll.cli", _port),
    Variable("MASTER_PORT", "the coordinator's port (torchrun's)", "pycoll.group, pycoll.cli", _port),
    Variable("MASTER_ADDR", "the coordinator's host (torchrun's; default 127.0.0.1)",
             "pycoll.group, pycoll.torch.backend, pycoll.cli", _text),
    Variable("RANK", "this process's rank (torchrun's)", "pycoll.group", _count),
    Variable("WORLD_SIZE", "the number of ranks (torchrun's)", "pycoll.group", _count),
    Variable("PYCOLL_ADDR", "the address peers reach this one at (default: the one towards the coordinator)",
             "pycoll.bootstrap", _text),
    Variable("PYCOLL_JOB_ID", "the job id a coordinator checks joiners against (two jobs on one port)",
             "pycoll.bootstrap, pycoll.launcher", _text),
    Variable("PYCOLL_RESTART_COUNT", "set by `pycoll run --elastic` for its workers: 0 for an original "
             "worker, k for the k-th replacement of its RANK (read by scripts, e.g. to name the peer)",
             "pycoll.launcher", _count),
    Variable("TORCHELASTIC_RUN_ID", "torchrun's job id, used when PYCOLL_JOB_ID is not set", "pycoll.bootstrap",
             _text),
    Variable("PYCOLL_TORCH_OVERLAP", "lanes of a torch process group's async collectives, 1 to 8: that many "
             "run at once, each on connections of its own (default 1: one at a time, in call order; see "
             "pycoll.torch.lanes)", "pycoll.torch.backend", _lanes),
    Variable("PYCOLL_SHM_RING", "bytes of a shared-memory ring per direction, a power of two >= 65536 "
             "(default 1 MiB)", "pycoll.net.mesh", parse_shm_ring),
    # Read by the modules below this one, in their own way (listed for the record).
    *(_limit(name) for name in _limits.ENVIRONMENT.values()),
    Variable("PYCOLL_SECRET", "the group's shared secret (token=)", "pycoll.auth"),
    Variable("PYCOLL_SECRET_FILE", "a file holding the group's shared secret", "pycoll.auth"),
    Variable("PYCOLL_LOG", "log level: debug, info, warning, error", "pycoll.observability"),
    Variable("PYCOLL_FAULT", "test harness: JSON [point, nth], die at the nth hit of a fault point", "pycoll.faults"),
    Variable("PYCOLL_FAULT_DELAY", "test harness: seconds to sleep at every fault point, or JSON {point: seconds}",
             "pycoll.faults"),
    Variable("PYCOLL_DELAYLINE_BIN", "the WAN emulator's delay line program", "pycoll.emulator"),
    Variable("PYCOLL_DELAYLINE_SRC", "the WAN emulator's delay line source", "pycoll.emulator"),
    Variable("PYCOLL_CACHE_DIR", "where the WAN emulator builds its delay line", "pycoll.emulator"),
    Variable("PYCOLL_SHARED_BUFFERS", "0: a reused single-copy buffer is never moved onto shared memory "
             "for same-host peers to map (default: moved; process-wide)", "the C core (core/shared_buffers.c)"),
    Variable("PYCOLL_SANITIZE", "build the C core with sanitizers", "pycoll._build (setup.py)"),
    Variable("PYCOLL_CFLAGS", "extra C compiler flags for the C core", "pycoll._build (setup.py)"),
)}


def environ(name, env=None):
    """The value of environment variable ``name`` (one of :data:`ENVIRONMENT`), parsed and
    checked as the table says; None when it is unset or empty. A bad value raises
    InvalidArgument naming the variable. ``env``: the mapping to read (default os.environ)."""
    var = ENVIRONMENT[name]
    raw = (os.environ if env is None else env).get(name)
    if raw is None or raw == "":
        return None
    if var.parse is None:
        return raw
    return var.parse(raw, f"environment variable {name}={raw!r}")


# ---- the options ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Options:
    """Every setting of a communicator, checked (see the module doc). Make one with
    :meth:`resolve`; change one with :meth:`replace`."""

    timeout: float = DEFAULT_TIMEOUT            # seconds a collective may take
    stall_timeout: float = DEFAULT_STALL        # dead links noticed by keepalive (0: off)
    progress_timeout: float = 0.0               # fail a collective idle this long (0: off)
    stripes: Any = 1                            # connections per peer pair, or "auto" (until settled)
    link: Any = None                            # "2gbit/50ms" or (bytes/s, rtt s): what stripes="auto" uses
    sockbuf: Optional[int] = None               # socket buffer bytes; None: not given (0, or what "auto" derives)
    segment_bytes: int = DEFAULT_SEGMENT        # pipeline unit of the planners
    spin_us: int = 200                          # how long the engine spins before it sleeps in poll
    preserve_input: bool = True                 # a failed call leaves the input as it was
    transport: str = "auto"                     # "auto": shared memory to same-host peers, TCP to the rest
    single_copy: Optional[int] = None           # bytes from which same-host payloads copy once (None: C default)
    single_copy_adapt: bool = True              # learn per size whether single copy or the rings is faster
    compression: Any = None                     # default wire codec of float32 payloads (checked by plan.compression)
    topology: Any = None                        # as given: a path, TOML file name or Topology (loaded by plan.topology)
    calibrate: bool = True                      # measure the cost model when an epoch is installed
    probe_seconds: float = 0.3                  # topology="measure": each probe flow's duration
    coordinator_wait: float = 0.0               # seconds to wait for a lost coordinator to come back
    failover: bool = True                       # a lost coordinator is succeeded by a member (pycoll.comm.failover)
    sync_timeout: float = 120.0                 # seconds a sync point (forming an epoch) may take
    mesh_timeout: Optional[float] = None        # seconds to connect an epoch's mesh (None: Limits.connect_timeout)
    tags: tuple = ()                            # the tags whose calls run beside each other (canonical order)
    max_retries: int = 8                        # attempts of a retry=True collective beyond the first

    def __post_init__(self):
        def check(name, parse, *args):
            value = getattr(self, name)
            object.__setattr__(self, name, parse(value, f"{name}={value!r}", *args))  # (frozen: canonical values)
        check("timeout", _positive_seconds)
        for name in ("stall_timeout", "progress_timeout", "coordinator_wait"):
            check(name, _seconds)
        check("sync_timeout", _positive_seconds)
        if self.mesh_timeout is not None:
            check("mesh_timeout", _positive_seconds)
        check("stripes", parse_stripes)
        if self.sockbuf is not None:
            check("sockbuf", _count)
        check("segment_bytes", _count, 1)
        check("spin_us", _count)
        check("preserve_input", _flag)
        check("calibrate", _flag)
        check("probe_seconds", _positive_seconds)
        check("failover", _flag)
        check("transport", parse_transport)
        check("single_copy", parse_single_copy)
        check("single_copy_adapt", _flag)
        check("max_retries", _count)
        object.__setattr__(self, "tags", tag_list(self.tags))

    @classmethod
    def resolve(cls, *, env=None, **arguments):
        """The options from ``arguments`` (None: not given), else the environment (the
        variables of :data:`ENVIRONMENT` that name a field), else the defaults. A bad value
        raises InvalidArgument naming the argument or the variable; an unknown argument, a
        TypeError. ``env``: the mapping to read instead of os.environ."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(arguments) - fields)
        if unknown:
            raise TypeError(f"unexpected communicator option{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)}")
        values = {}
        for var in ENVIRONMENT.values():
            if var.field is not None and arguments.get(var.field) is None:
                value = environ(var.name, env)
                if value is not None:
                    values[var.field] = value
        values.update({k: v for k, v in arguments.items() if v is not None})
        if "stripes" not in values:  # default: from the links when we know them, else one connection
            # (topology="measure" is known only once the group formed: one connection until then)
            values["stripes"] = "auto" if (values.get("link") or values.get("topology") not in (None, "", "measure")) \
                else 1
        return cls(**values)

    def replace(self, **changes):
        """A copy with ``changes``, checked as :meth:`resolve` checks (InvalidArgument)."""
        return dataclasses.replace(self, **changes)

