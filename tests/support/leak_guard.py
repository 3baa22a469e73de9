"""Suite-level check that the tests leave no shared memory behind.

pycoll's shared-memory transport uses anonymous segments (memfd), so a
correct run adds nothing to /dev/shm and, once every comm is closed, holds
no segment or same-host listener in the test process. tests/conftest.py
calls :func:`start` when the session starts and fails the session if
:func:`finish` reports anything.

/dev/shm is shared with everything else on the host, so an entry that
appeared during the session counts only if it is still there after a short
settle and either no live process holds it (it was left behind) or one of
ours does. "Ours" is the test process and every process started under it:
they inherit a per-session marker in their environment.
(tests/e2e/test_shm.py separately checks the SIGKILL case in a private /dev/shm.)
"""
import os
import time
import uuid

SHM_DIR = "/dev/shm"
MARKER_ENV = "PYCOLL_TEST_SESSIONS"  # ':'-separated markers of the test sessions above a process
SETTLE = 2.0  # seconds a new entry may take to go away (another process's temporary semaphore)

_state = {}


def _listing():
    try:
        return set(os.listdir(SHM_DIR))
    except OSError:
        return set()


def _own_fds():
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            out[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    return out


def _pycoll_listeners():
    """Inodes of unix sockets bound to pycoll's abstract names (pycoll.net.mesh.local_name)."""
    try:
        with open("/proc/net/unix") as f:
            rows = [line.split() for line in f.readlines()[1:]]
    except OSError:
        return set()
    return {row[6] for row in rows if len(row) > 7 and row[7].startswith("@pycoll-mesh/")}


def _moved_memory(text):
    """A shared buffer (core/shared_buffers.h): the process's own memory, moved onto a memfd so
    that same-host peers can map it. It stays moved while the memory is the process's (a heap
    buffer freed to malloc still is), fd and all, whether or not a comm is left, so it is no
    leaked segment; tests/e2e/test_shared_buffers.py checks that memory freed back to the kernel
    lets its memfd go."""
    return "memfd:pycoll-shared-" in text


def own_handles():
    """This process's pycoll shared-memory handles: segment fds and
    mappings, and same-host listener sockets, as readable strings."""
    fds = _own_fds()
    listeners = _pycoll_listeners()
    out = [f"fd {fd} -> {t}" for fd, t in fds.items() if "memfd:pycoll" in t and not _moved_memory(t)]
    out += [f"fd {fd} -> {t} (a pycoll same-host listener)" for fd, t in fds.items()
            if t.startswith("socket:[") and t[8:-1] in listeners]
    with open("/proc/self/maps") as f:
        out += [f"mapping {line.split()[0]} of {line.split(None, 5)[-1].strip()}" for line in f
                if "memfd:pycoll" in line and not _moved_memory(line)]
    return sorted(out)


def _holders(name):
    """(pid, ours) for every live process that has /dev/shm/name open or mapped."""
    path = os.path.join(SHM_DIR, name)
    names = {path, path + " (deleted)"}
    marker = _state["marker"]
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            held = any(os.readlink(f"/proc/{pid}/fd/{fd}") in names for fd in os.listdir(f"/proc/{pid}/fd"))
            if not held:
                with open(f"/proc/{pid}/maps") as f:
                    held = any(line.split(None, 5)[-1].strip() in names for line in f)
            if not held:
                continue
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        except OSError:  # gone, or not ours to read
            continue
        # /proc/PID/environ is the environment a process started with: ours has no marker
        markers = env.get(MARKER_ENV.encode(), b"").decode(errors="replace").split(":")
        found.append((int(pid), int(pid) == os.getpid() or marker in markers))
    return found


def start():
    """Record the state before any test runs; mark this process and its children as ours."""
    marker = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    prior = os.environ.get(MARKER_ENV)
    os.environ[MARKER_ENV] = f"{prior}:{marker}" if prior else marker
    _state.update(marker=marker, shm=_listing(), handles=own_handles(), fds=len(_own_fds()))


def finish():
    """Problems found since :func:`start`, as lines for the report (empty: clean)."""
    if "marker" not in _state:
        return []
    problems = [f"still open in the test process: {h}" for h in own_handles() if h not in _state["handles"]]
    new = _listing() - _state["shm"]
    deadline = time.monotonic() + SETTLE
    while new and time.monotonic() < deadline:
        time.sleep(0.1)
        new &= _listing()
    for name in sorted(new):
        holders = _holders(name)
        ours = [pid for pid, mine in holders if mine]
        if ours:
            problems.append(f"{SHM_DIR}/{name} is held by processes of this session: {ours}")
        elif not holders:
            problems.append(f"{SHM_DIR}/{name} was created during the session and left behind")
    if problems:
        problems.append(f"(the test process has {len(_own_fds())} open fds, {_state['fds']} at the start)")
    return problems
