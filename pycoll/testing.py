"""Test distributed code on N local ranks, with faults on demand.

    import pycoll.testing

    def step(comm, scale):                      # runs on every rank
        a = np.full(4, comm.rank * scale, np.float32)
        return comm.all_reduce(a)

    results = pycoll.testing.run(step, world_size=4, args=(2.0,), timeout=60)

Each rank is a fresh process (spawned, so ``fn`` must be defined at module level, importable by the
children, and its arguments and result picklable; :func:`preload` starts them from a fork server
that imported heavy modules such as torch once, instead of once per rank). The results come back in rank order. If a rank
raises, :class:`RankError` carries its rank and traceback (and what every other rank did); a rank
that is still running at ``timeout`` prints every thread's stack to stderr, is killed and reported,
so a bug shows as a failure, never as a hang, and the failure shows where it waited. Every process
is cleaned up, whatever happens.

What a rank runs (``init``):

* ``"pycoll"`` (default): ``fn(comm, *args)`` with ``comm = pycoll.init(...)``, closed afterwards.
* ``"torch:<backend>"``, e.g. ``"torch:pycoll"`` or ``"torch:gloo"``: ``fn(*args)`` after
  ``torch.distributed.init_process_group(<backend>)``; the group is destroyed afterwards.
* ``None``: ``fn(*args)`` with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT set, as
  torchrun sets them; the function makes its own group.

Faults, per rank:

* ``kill={2: "before:all_reduce"}``: SIGKILL rank 2 the first time it reaches that *fault point*;
  ``kill={2: ("before:all_reduce", 3)}``: the third time. pycoll calls the points
  ``before:<collective>`` (just before it sends anything) and ``during:<collective>`` (fired from
  a background thread while the collective runs), for ``all_reduce``, ``all_gather``,
  ``reduce_scatter``, ``broadcast`` and ``barrier``; your code adds its own with
  :func:`fault_point` (``fault_point("after-optimizer-step")``).
* ``kill={2: 1.5}``: SIGKILL rank 2 1.5 s after its group was initialised.
* ``delay={1: 0.2}``: rank 1 sleeps 0.2 s at every fault point (a straggler);
  ``delay={1: {"before:all_reduce": 0.5, "start": 2.0}}``: per point, where ``"start"`` delays the
  rank's start (it joins late).

A killed rank's result is :data:`KILLED`; the others carry on (or fail, as your code decides).
"""
import faulthandler
import multiprocessing as mp
import os
import pickle
import signal
import socket
import sys
import threading
import time
import traceback
import types

from pycoll import faults
from pycoll.faults import fault_armed, fault_point  # noqa: F401 - public here too (the harness's API)

__all__ = ["run", "preload", "process_context", "fault_point", "fault_armed", "free_port", "RankError", "KILLED"]

#: The result of a rank that the harness killed on purpose.
KILLED = "<killed>"


class _TestingModule(types.ModuleType):
    """``pycoll.testing.FAULTS_ARMED`` reads and sets :data:`pycoll.faults.FAULTS_ARMED`, the flag
    the core reads at each fault point (code that arms a process by hand sets it here)."""

    @property
    def FAULTS_ARMED(self):  # noqa: N802 - the public name
        return faults.FAULTS_ARMED

    @FAULTS_ARMED.setter
    def FAULTS_ARMED(self, value):  # noqa: N802
        faults.FAULTS_ARMED = bool(value)


sys.modules[__name__].__class__ = _TestingModule


class RankError(AssertionError):
    """A rank failed; ``rank`` and ``remote_traceback`` say where and why."""

    def __init__(self, rank, message, remote_traceback=""):
        super().__init__(f"rank {rank}: {message}\n{remote_traceback}")
        self.rank = rank
        self.remote_traceback = remote_traceback


def free_port():
    """A TCP port that was free a moment ago, outside the ephemeral range."""
    for _ in range(100):
        port = 20000 + int.from_bytes(os.urandom(2), "little") % 12000
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", port))
            return port
        except OSError:
            continue
        finally:
            s.close()
    raise RuntimeError("no free port found")


_arm_faults = faults.arm  # (fault, delay) -> kill-after seconds

_preloaded = set()  # modules the fork server imports (see preload); empty: ranks are spawned


def preload(*modules):
    """Start the ranks of later :func:`run` calls (and processes made from :func:`process_context`)
    from a fork server that has imported ``modules`` once, e.g. ``preload("torch")``: a rank then
    starts in tens of milliseconds instead of paying torch's import (~1.5 s of CPU) itself.

    A rank still sees the caller's environment and working directory as they are at :func:`run`
    (as a spawned one does); what the preloaded modules read from the environment at import is
    the caller's at the first :func:`run` after this call. Call it before the first run; the
    server lives as long as this process."""
    for name in modules:
        if not isinstance(name, str) or not name:
            raise TypeError(f"preload: module names are strings, not {name!r}")
    _preloaded.update(modules)
    mp.get_context("forkserver").set_forkserver_preload(sorted(_preloaded))


class _ProcessContext:
    """A multiprocessing context whose processes start as spawned ones do: from the fork server
    when modules are preloaded, each child first takes the parent's environment and working
    directory of the moment it was started (the server's are those of its own start)."""

    def __init__(self, ctx, forked):
        self._ctx = ctx
        self._forked = forked

    def Pipe(self, duplex=True):  # noqa: N802 - multiprocessing's name
        return self._ctx.Pipe(duplex)

    def Process(self, target, args=(), **kw):  # noqa: N802 - multiprocessing's name
        if self._forked:
            args = (dict(os.environ), os.getcwd(), _ParentStdio(), target, args)
            target = _as_if_spawned
        return self._ctx.Process(target=target, args=args, **kw)


class _ParentStdio:
    """Pickles, when the process starts, as the parent's stdout and stderr descriptors of that
    moment (sent along to the child), where a spawned rank's output goes: a test reading its
    captured stderr sees a hung rank's stacks there."""

    def __reduce__(self):
        from multiprocessing import reduction
        return _detach_fds, (reduction.DupFd(1), reduction.DupFd(2))


def _detach_fds(*fds):
    return tuple(fd.detach() for fd in fds)


def _as_if_spawned(environ, cwd, stdio, target, args):
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    for fd, std in zip(stdio, (1, 2)):
        os.dup2(fd, std)
        os.close(fd)
    os.environ.clear()
    os.environ.update(environ)
    os.chdir(cwd)
    # what pycoll read from the environment at import, the fork server's: read again
    faults.rearm_from_environment()
    from pycoll.observability import configure_logging
    configure_logging()
    target(*args)


def process_context():
    """The context :func:`run` starts ranks with: spawn, or the fork server after :func:`preload`
    (``ctx.Process(target=..., args=...)`` and ``ctx.Pipe()``), for harnesses that start their own."""
    if _preloaded:
        return _ProcessContext(mp.get_context("forkserver"), True)
    return _ProcessContext(mp.get_context("spawn"), False)


def _kill_after(seconds):
    if seconds is not None:
        t = threading.Timer(seconds, os.kill, (os.getpid(), signal.SIGKILL))
        t.daemon = True
        t.start()


def _send(conn, payload):
    try:
        data = pickle.dumps(payload)
    except Exception as exc:  # noqa: BLE001 - unpicklable result
        data = pickle.dumps(("error", f"result not picklable: {exc}", ""))
    conn.send_bytes(data)
    conn.close()


def _rank_main(fn, args, rank, world_size, port, init, init_kwargs, fault, delay, env, conn):
    # On SIGUSR1 print every thread's stack: the parent sends it to a rank that overran its time
    # before killing it, so a hang in CI shows where each thread was waiting.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    os.environ.update(env)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    after = _arm_faults(fault, delay)
    start_delay = delay.get("start", 0.0) if isinstance(delay, dict) else 0.0
    if start_delay:
        time.sleep(float(start_delay))
    close = None
    try:
        if init == "pycoll":
            import pycoll
            comm = pycoll.init(rank=rank, world_size=world_size, master_addr="127.0.0.1", master_port=port,
                               **init_kwargs)
            close = comm.close
        elif init is not None and init.startswith("torch:"):
            import torch.distributed as dist
            backend = init.split(":", 1)[1]
            if backend == "pycoll":
                import pycoll.torch.backend  # noqa: F401 - registers the backend
            dist.init_process_group(backend, rank=rank, world_size=world_size, **init_kwargs)
            close = dist.destroy_process_group
        _kill_after(after)
        result = fn(comm, *args) if init == "pycoll" else fn(*args)
        payload = ("ok", result)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        payload = ("error", f"{type(exc).__name__}: {exc}", traceback.format_exc())
    # Report first: a rank that finished is not blamed for waiting on a hung one while it leaves.
    _send(conn, payload)
    if close is not None:
        try:
            close()
        except Exception:  # noqa: BLE001 - the result is already reported
            pass


def _dump_stacks(procs):
    """Ask each still-running rank to print its threads' stacks (to stderr,
    which the test output keeps), so a hang can be read after the fact."""
    live = [p for p in procs if p.is_alive()]
    for p in live:
        try:
            os.kill(p.pid, signal.SIGUSR1)
        except (ProcessLookupError, PermissionError):
            pass
    if live:
        time.sleep(0.5)  # faulthandler writes from the signal handler: give it a moment


def _check_faults(world_size, kill, delay):
    for what, table in (("kill", kill), ("delay", delay)):
        for rank in table:
            if not isinstance(rank, int) or not 0 <= rank < world_size:
                raise ValueError(f"{what}: {rank!r} is not a rank of a world of size {world_size}")
    for rank, fault in kill.items():
        ok = (isinstance(fault, (int, float)) and not isinstance(fault, bool) and fault >= 0) or isinstance(fault, str) \
            or (isinstance(fault, tuple) and len(fault) == 2 and isinstance(fault[0], str)
                and isinstance(fault[1], int) and fault[1] >= 1)
        if not ok:
            raise ValueError(f"kill[{rank}] = {fault!r}: give seconds, a point name, or (point name, n >= 1)")


def run(fn, world_size, *, args=(), timeout=60.0, kill=None, delay=None, init="pycoll", init_kwargs=None,
        env=None, port=None, return_exceptions=False):
    """Run ``fn`` on ``world_size`` local ranks and return their results in rank order.

    ``init`` chooses what each rank sets up before calling ``fn`` (see the module docstring);
    ``init_kwargs`` go to ``pycoll.init`` (or ``init_process_group``); ``env`` is added to every
    rank's environment; ``kill`` and ``delay`` inject faults. Raises :class:`RankError` for the
    first rank that failed (unless ``return_exceptions``: then that rank's entry is the
    RankError), and always cleans up every process it started.
    """
    kill = dict(kill or {})
    delay = dict(delay or {})
    _check_faults(world_size, kill, delay)
    if init is not None and init != "pycoll" and not str(init).startswith("torch:"):
        raise ValueError(f"init={init!r}: use 'pycoll', 'torch:<backend>' or None")
    try:
        pickle.dumps((fn, args))
    except Exception as exc:  # noqa: BLE001 - say what to do instead
        raise TypeError(f"pycoll.testing.run: fn and args must be picklable (fn defined at module level, "
                        f"not a lambda or a local function): {exc}") from exc
    port = port or free_port()
    ctx = process_context()
    procs, pipes = [], []
    results = [None] * world_size
    deadline = time.monotonic() + timeout
    try:
        for rank in range(world_size):
            parent, child = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_rank_main, name=f"pycoll-rank{rank}",
                            args=(fn, args, rank, world_size, port, init, init_kwargs or {}, kill.get(rank),
                                  delay.get(rank), dict(env or {}), child))
            p.start()
            child.close()
            procs.append(p)
            pipes.append(parent)
        pending = set(range(world_size))
        while pending and time.monotonic() < deadline:
            for rank in list(pending):
                if pipes[rank].poll(0):
                    try:
                        results[rank] = pickle.loads(pipes[rank].recv_bytes())
                    except EOFError:
                        results[rank] = None
                    pending.discard(rank)
                elif not procs[rank].is_alive() and not pipes[rank].poll(0):
                    results[rank] = None
                    pending.discard(rank)
            time.sleep(0.005)
        for rank in pending:
            results[rank] = ("error", f"did not finish within {timeout} s (killed)", "")
        _dump_stacks([procs[rank] for rank in sorted(pending)])
    finally:
        for p in procs:
            if p.is_alive():
                p.join(timeout=max(0.0, min(2.0, deadline - time.monotonic())))
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        for c in pipes:
            c.close()
    out, outcomes, first = [], [], None
    for rank, res in enumerate(results):
        if res is None:
            code = procs[rank].exitcode
            if code == -signal.SIGKILL and rank in kill:
                out.append(KILLED)
                outcomes.append("killed as asked")
                continue
            message, remote = f"process died with exit code {code}", ""
        elif res[0] == "ok":
            out.append(res[1])
            outcomes.append("ok")
            continue
        else:
            message, remote = res[1], res[2]
        out.append(RankError(rank, message, remote))
        outcomes.append(message.split("\n", 1)[0])
        if first is None:
            first = (rank, message, remote)
    if first is not None and not return_exceptions:
        # the first failure, with what every rank did: a hang on one rank reads differently
        # when the others finished than when one of them crashed first
        rank, message, remote = first
        raise RankError(rank, message + "\nall ranks: " + "; ".join(f"rank {r}: {o}" for r, o in enumerate(outcomes)),
                        remote)
    return out
