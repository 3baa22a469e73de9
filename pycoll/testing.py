"""Run a function on N local ranks, with faults on demand.

    def step(comm, scale):
        a = np.full(4, comm.rank * scale, np.float32)
        return comm.all_reduce(a)

    results = pycoll.testing.run(step, world_size=4, args=(2.0,), timeout=60)

Each rank is a fresh process (spawned, so the function must be importable at
module level) that calls ``pycoll.init`` and then ``fn(comm, *args)``; the
return values come back in rank order. If a rank raises, :class:`RankError`
carries its traceback; a rank that exceeds ``timeout`` is killed and
reported, so a bug shows as a failure, never as a hang.

Faults: ``kill={rank: "point"}`` kills that rank with SIGKILL the first time
its code calls ``pycoll.testing.fault_point("point")`` (pycoll itself calls
fault points named ``before:<collective>`` and ``during:<collective>``; the
latter fires from a background thread while the collective runs);
``kill={rank: 1.5}`` kills it 1.5 s after start; ``delay={rank: 0.2}`` makes
every fault point of that rank sleep 0.2 s. A killed rank's result is the
:data:`KILLED` marker.
"""
import multiprocessing as mp
import os
import pickle
import signal
import socket
import threading
import time
import traceback

KILLED = "<killed>"

_FAULT_ENV = "PYCOLL_FAULT"       # "point" or "after:<seconds>" for this process
_DELAY_ENV = "PYCOLL_FAULT_DELAY"

#: True when this process may hit a fault (lets pycoll skip fault points, which
#: sit on the hot path, at no cost otherwise). Set from the environment at
#: import, or by the harness.
FAULTS_ARMED = bool(os.environ.get(_FAULT_ENV) or os.environ.get(_DELAY_ENV))


class RankError(AssertionError):
    """A rank failed; ``rank`` and ``remote_traceback`` say where and why."""

    def __init__(self, rank, message, remote_traceback=""):
        super().__init__(f"rank {rank}: {message}\n{remote_traceback}")
        self.rank = rank
        self.remote_traceback = remote_traceback


def fault_point(name):
    """Call at a named point in your code; the harness may kill or delay here.
    (Set PYCOLL_FAULT=<name> / PYCOLL_FAULT_DELAY=<s> to arm it by hand.)"""
    delay = os.environ.get(_DELAY_ENV)
    if delay:
        time.sleep(float(delay))
    if os.environ.get(_FAULT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def fault_armed(name):
    """True if this process is set to die at ``name`` (lets pycoll arm a
    background killer for ``during:*`` points only when needed)."""
    return os.environ.get(_FAULT_ENV) == name


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


def _rank_main(fn, args, rank, world_size, port, init_kwargs, fault, delay, conn):
    global FAULTS_ARMED
    if fault is not None or delay:
        FAULTS_ARMED = True
    if fault is not None:
        if isinstance(fault, (int, float)):
            threading.Timer(float(fault), lambda: os.kill(os.getpid(), signal.SIGKILL)).start()
        else:
            os.environ[_FAULT_ENV] = str(fault)
    if delay:
        os.environ[_DELAY_ENV] = str(delay)
    try:
        import pycoll
        comm = pycoll.init(rank=rank, world_size=world_size, master_addr="127.0.0.1", master_port=port,
                           **init_kwargs)
        try:
            result = fn(comm, *args)
        finally:
            comm.close()
        payload = ("ok", result)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        payload = ("error", f"{type(exc).__name__}: {exc}", traceback.format_exc())
    try:
        conn.send_bytes(pickle.dumps(payload))
    except Exception as exc:  # noqa: BLE001 - unpicklable result
        conn.send_bytes(pickle.dumps(("error", f"result not picklable: {exc}", "")))
    conn.close()


def run(fn, world_size, *, args=(), timeout=60.0, kill=None, delay=None, init_kwargs=None, port=None,
        return_exceptions=False):
    """Run ``fn(comm, *args)`` on ``world_size`` local ranks; return results.

    Raises :class:`RankError` for the first rank that failed (unless
    ``return_exceptions``, then that rank's entry is the RankError), and
    always cleans up every process it started.
    """
    kill = kill or {}
    delay = delay or {}
    port = port or free_port()
    ctx = mp.get_context("spawn")
    procs, pipes = [], []
    for rank in range(world_size):
        parent, child = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_rank_main, name=f"pycoll-rank{rank}",
                        args=(fn, args, rank, world_size, port, init_kwargs or {}, kill.get(rank),
                              delay.get(rank), child))
        p.start()
        child.close()
        procs.append(p)
        pipes.append(parent)
    results = [None] * world_size
    deadline = time.monotonic() + timeout
    try:
        pending = set(range(world_size))
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                break
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
    finally:
        for p in procs:
            if p.is_alive():
                p.join(timeout=max(0.0, min(2.0, deadline - time.monotonic())))
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        for c in pipes:
            c.close()
    out = []
    for rank, res in enumerate(results):
        if res is None:
            code = procs[rank].exitcode
            if code == -signal.SIGKILL and rank in kill:
                out.append(KILLED)
                continue
            err = RankError(rank, f"process died with exit code {code}")
        elif res[0] == "ok":
            out.append(res[1])
            continue
        else:
            err = RankError(rank, res[1], res[2])
        if not return_exceptions:
            raise err
        out.append(err)
    return out
