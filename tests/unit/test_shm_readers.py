"""Which process a rank names as its ptracer (csrc/transport/shm_readers.c):
under Yama's ptrace_scope 1, sibling ranks may read each other's memory
(single copy) only if each names an ancestor of the others. These check the
choice on real process trees; the prctl itself needs a Yama kernel (this one
may have none: then it fails with EINVAL, which the tests accept)."""
import errno
import json
import os
import subprocess
import sys
import textwrap

import pytest

from pycoll.core.native import lib

TIMEOUT = 60


def _sleeper():
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


@pytest.fixture
def children():
    procs = []
    yield procs
    for p in procs:
        p.kill()
        p.wait()


def _in_initial_pid_namespace():
    return os.readlink("/proc/self/ns/pid") == "pid:[4026531836]"


@pytest.mark.timeout(TIMEOUT)
def test_common_ancestor_of_relatives(children):
    """The nearest process both descend from, a process being its own."""
    me = os.getpid()
    a, b = _sleeper(), subprocess.Popen(["sh", "-c", "sleep 60 & echo $!; wait"], stdout=subprocess.PIPE)
    children += [a, b]
    grandchild = int(b.stdout.readline())
    children.append(type("Pid", (), {"kill": lambda self: os.kill(grandchild, 9), "wait": lambda self: None})())
    assert lib.pc_common_ancestor(me, me) == me
    assert lib.pc_common_ancestor(me, os.getppid()) == os.getppid()
    assert lib.pc_common_ancestor(a.pid, b.pid) == me          # siblings: their launcher
    assert lib.pc_common_ancestor(a.pid, grandchild) == me     # an uncle and a nephew
    assert lib.pc_common_ancestor(grandchild, b.pid) == b.pid  # a parent is its child's ancestor
    assert lib.pc_common_ancestor(me, 1) == 1
    gone = _sleeper()
    gone.kill()
    gone.wait()
    assert lib.pc_common_ancestor(me, gone.pid) == 0           # no /proc entry: unknown, not a guess


# Runs in a process of its own: the admitted ptracer is process-wide state.
_ADMIT = textwrap.dedent("""
    import json, os, subprocess, sys
    from pycoll.core.native import ffi, lib
    def admitted():
        err = ffi.new("int32_t *")
        pid = lib.pc_readers_admitted(err)
        return [pid, err[0]]
    steps = {"none yet": admitted()}
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lib.pc_readers_admit(child.pid)
        steps["own child"] = admitted()
        lib.pc_readers_admit(int(sys.argv[1]))
        steps["sibling"] = admitted()
        lib.pc_readers_admit(child.pid)
        steps["own child again"] = admitted()
        lib.pc_readers_admit(1)
        steps["pid 1"] = admitted()
        pid = os.fork()
        if pid == 0:
            os.write(1, json.dumps(admitted()).encode() + b"\\n")
            os._exit(0)
        os.waitpid(pid, 0)
    finally:
        child.kill()
    print(json.dumps(steps))
""")


@pytest.mark.timeout(TIMEOUT)
def test_admitted_ptracer_widens_to_cover_every_peer(children):
    """A peer that is our own child needs only us; a sibling widens the
    choice to our common parent, and nothing narrows it again; pid 1 (every
    process on the host) is never named outside a container's pid namespace;
    a forked child starts with nothing named."""
    sibling = _sleeper()
    children.append(sibling)
    out = subprocess.run([sys.executable, "-c", _ADMIT, str(sibling.pid)], capture_output=True, text=True,
                         timeout=TIMEOUT)
    assert out.returncode == 0, out.stderr
    forked, steps = out.stdout.splitlines()
    steps = json.loads(steps)
    me = os.getpid()
    assert steps["none yet"] == [0, 0]
    child_proc = steps["own child"][0]
    assert child_proc not in (0, me)                   # the script's process itself
    assert steps["sibling"][0] == me
    assert steps["own child again"][0] == me
    assert steps["pid 1"][0] == (me if _in_initial_pid_namespace() else 1)
    for pid, err in steps.values():
        assert err in (0, errno.EINVAL), os.strerror(err)  # EINVAL: no Yama in this kernel
    assert json.loads(forked) == [0, 0]
