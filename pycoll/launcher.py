"""``pycoll run``: start a coordinator and N workers with torchrun's variables.

Each worker gets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR
and MASTER_PORT; its output lines are prefixed with ``[rank]``. The coordinator
listens on PYCOLL_MASTER_PORT (which ``pycoll.init()`` prefers), so that
MASTER_PORT stays free for torch.distributed's store (``init_process_group``). The launcher
returns the first non-zero exit code, and takes the whole group down on
Ctrl-C or as soon as a worker fails (unless ``keep_going``: then the group
carries on without it, which is what elastic jobs want).

Exit code: 0, or for the first worker that failed its own code, or 128 + N if signal N killed it
(what a shell reports); 130 after Ctrl-C. A second Ctrl-C kills the workers at once. Workers
die with the launcher, even if it is SIGKILLed: on Linux the kernel sends them SIGKILL
(``prctl(PR_SET_PDEATHSIG)``); elsewhere a small watchdog process does it.
"""
import os
import signal
import subprocess
import sys
import threading
import time

from pycoll.control.coordinator import Coordinator
from pycoll.testing import free_port


def _pump(stream, prefix, out):
    for line in iter(stream.readline, b""):
        out.buffer.write(prefix + line)
        out.flush()
    stream.close()


def _load_prctl():
    """libc's prctl, or None where there is none (not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes
        import ctypes.util
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl
    except (OSError, AttributeError):
        return None


_PDEATHSIG = _load_prctl()  # resolved here, in the parent: the child only calls it
_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid):
    """A preexec_fn: the kernel kills this child with SIGKILL when its parent dies."""
    prctl = _PDEATHSIG

    def preexec():
        if prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            return  # the watchdog (started when prctl is missing) is not there: nothing more to do
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)
    return preexec


_WATCHDOG = """\
import os, signal, sys, time
parent, pids = int(sys.argv[1]), [int(p) for p in sys.argv[2:]]
while os.getppid() == parent:
    time.sleep(0.2)
for pid in pids:
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
"""


def _start_watchdog(procs):
    """Where prctl is missing: a process that outlives a SIGKILLed launcher (it is reparented)
    and then kills the workers. The launcher stops it when it exits normally."""
    return subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid())] + [str(p.pid) for p in procs],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def describe_exit(rank, code):
    """'rank 2 was killed by SIGKILL' or 'rank 1 exited with code 3' (``code`` as Popen reports it)."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"rank {rank} was killed by {name}"
    return f"rank {rank} exited with code {code}"


def exit_code(code):
    """The launcher's exit code for a worker's Popen return code: 128 + N for signal N."""
    return 128 - code if code < 0 else code


def _terminate(procs, grace=3.0):
    for p in procs:
        if p.poll() is None:
            try:
                p.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def run(argv, nprocs, *, master_addr="127.0.0.1", master_port=None, keep_going=False, env=None,
        heartbeat_timeout=5.0):
    """Run ``argv`` (a Python script and its arguments, or ``-m module ...``)
    on ``nprocs`` local ranks; returns the exit code."""
    port = master_port or free_port()
    torch_port = free_port()
    while torch_port == port:
        torch_port = free_port()
    job_id = (os.environ if env is None else env).get("PYCOLL_JOB_ID") or f"run-{os.urandom(6).hex()}"
    coordinator = Coordinator(master_addr, port, world_size=nprocs, heartbeat_timeout=heartbeat_timeout,
                              job_id=job_id).start()
    procs, pumps, watchdog = [], [], None
    previous_sigint = None

    def impatient(signum, frame):  # a second Ctrl-C: no more grace, no traceback
        os.write(2, b"pycoll run: interrupted again; killing workers\n")  # (print is not reentrant)
        for p in procs:
            if p.poll() is None:
                p.kill()
    try:
        for rank in range(nprocs):
            child_env = dict(os.environ if env is None else env)
            child_env.update(RANK=str(rank), WORLD_SIZE=str(nprocs), LOCAL_RANK=str(rank),
                             LOCAL_WORLD_SIZE=str(nprocs), MASTER_ADDR=master_addr, MASTER_PORT=str(torch_port),
                             PYCOLL_MASTER_PORT=str(port), PYCOLL_JOB_ID=job_id,
                             PYTHONUNBUFFERED="1")
            p = subprocess.Popen([sys.executable] + list(argv), env=child_env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE,
                                 preexec_fn=_die_with_parent(os.getpid()) if _PDEATHSIG else None)
            procs.append(p)
        for rank, p in enumerate(procs):  # threads after the forks: preexec_fn runs in a thread-free parent
            for stream, out in ((p.stdout, sys.stdout), (p.stderr, sys.stderr)):
                t = threading.Thread(target=_pump, args=(stream, f"[{rank}] ".encode(), out), daemon=True)
                t.start()
                pumps.append(t)
        if _PDEATHSIG is None:
            watchdog = _start_watchdog(procs)
        first_failure = 0
        while True:
            codes = [p.poll() for p in procs]
            failed = [(rank, c) for rank, c in enumerate(codes) if c not in (None, 0)]
            if failed and not first_failure:
                rank, code = failed[0]
                first_failure = exit_code(code)
                what = describe_exit(rank, code)
                if not keep_going:
                    print(f"pycoll run: {what}; stopping the others", file=sys.stderr, flush=True)
                    _terminate(procs)
                    break
                print(f"pycoll run: {what}; the others carry on (--keep-going)", file=sys.stderr, flush=True)
            if all(c is not None for c in codes):
                break
            time.sleep(0.05)
        for t in pumps:
            t.join(timeout=2)
        return first_failure
    except KeyboardInterrupt:
        try:
            previous_sigint = signal.signal(signal.SIGINT, impatient)
        except ValueError:  # not the main thread: no second chance to be impatient
            pass
        print("pycoll run: interrupted; stopping workers (Ctrl-C again to kill them)", file=sys.stderr,
              flush=True)
        _terminate(procs)
        return 130
    finally:
        _terminate(procs)
        if watchdog is not None:
            watchdog.kill()
            watchdog.wait()
        coordinator.stop()
        if previous_sigint is not None:
            signal.signal(signal.SIGINT, previous_sigint)
