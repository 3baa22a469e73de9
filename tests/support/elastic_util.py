"""A test harness for elastic groups: a coordinator in this process and
peers in spawned processes that join with ``pycoll.connect`` at any time.

    with Cluster(heartbeat_timeout=2.0, min_world_size=3) as c:
        for name in "abc":
            c.spawn(name, step_fn, arg)
        results = c.results("abc", timeout=60)

``fn(comm, *args)`` runs in the peer (it must be importable at module
level); its return value comes back through a pipe. ``env`` sets
environment variables in the peer before it connects (e.g. PYCOLL_FAULT
for pycoll.testing fault points). Every process is killed and reaped on
exit, so a bug shows as a failure, never as a hang or a leak.
"""
import faulthandler
import os
import pickle
import signal
import subprocess
import sys
import time
import traceback

from pycoll.control.coordinator import Coordinator
import pycoll.testing
from pycoll.testing import KILLED, RankError, free_port


def arm(point):
    """Make this process SIGKILL itself at pycoll.testing fault point ``point``."""
    import pycoll.testing
    os.environ["PYCOLL_FAULT"] = point
    pycoll.testing.FAULTS_ARMED = True


def _peer_main(fn, args, port, name, connect_kwargs, env, conn):
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 <pid>`: where a stuck peer waits
    os.environ.update(env or {})
    if env and "PYCOLL_FAULT" in env:
        arm(env["PYCOLL_FAULT"])
    try:
        import pycoll
        comm = pycoll.connect("127.0.0.1", port, name=name, **connect_kwargs)
        try:
            result = fn(comm, *args)
        finally:
            comm.close()
        payload = ("ok", result)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        payload = ("error", f"{type(exc).__name__}: {exc}", traceback.format_exc())
    try:
        conn.send_bytes(pickle.dumps(payload))
    except Exception as exc:  # noqa: BLE001
        conn.send_bytes(pickle.dumps(("error", f"result not picklable: {exc}", "")))
    conn.close()


class Cluster:
    """``standalone``: the coordinator runs as its own process (``pycoll master``, ``master``),
    so a test can kill it (:meth:`kill_coordinator`); ``coordinator`` is then None."""

    def __init__(self, heartbeat_timeout=2.0, min_world_size=1, cause_grace=0.5, connect_kwargs=None,
                 standalone=False):
        self.connect_kwargs = dict({"timeout": 30, "join_timeout": 60}, **(connect_kwargs or {}))
        self.port = free_port()
        self.coordinator = self.master = None
        if standalone:
            self.master = subprocess.Popen([sys.executable, "-m", "pycoll", "master", "--port", str(self.port),
                                            "--heartbeat-timeout", str(heartbeat_timeout),
                                            "--world-size", str(min_world_size)], stdout=subprocess.DEVNULL)
        else:
            self.coordinator = Coordinator("127.0.0.1", self.port, min_world_size=min_world_size,
                                           heartbeat_timeout=heartbeat_timeout, cause_grace=cause_grace).start()
        self.ctx = pycoll.testing.process_context()  # spawn, or the suite's fork server (tests/conftest.py)
        self.procs, self.pipes, self.done = {}, {}, {}

    def spawn(self, name, fn, *args, env=None, **connect_kwargs):
        parent, child = self.ctx.Pipe(duplex=False)
        kw = dict(self.connect_kwargs, **connect_kwargs)
        p = self.ctx.Process(target=_peer_main, name=f"pycoll-{name}",
                             args=(fn, args, self.port, name, kw, env, child), daemon=True)
        p.start()
        child.close()
        self.procs[name], self.pipes[name] = p, parent
        return p

    def kill(self, name, sig=signal.SIGKILL):
        """Signal a peer. One already gone is left be: from the fork server (pycoll.testing.preload)
        a dead peer is reaped at once (a spawned one stays a zombie until joined, so the kill used to
        land), and its pid may already be another process's."""
        p = self.procs[name]
        if not p.is_alive():
            return
        try:
            os.kill(p.pid, sig)
        except ProcessLookupError:
            pass

    def kill_coordinator(self):
        """SIGKILL the standalone coordinator's process."""
        self.master.kill()
        self.master.wait()

    def _collect(self, name):
        if name in self.done:
            return True
        pipe = self.pipes[name]
        if pipe.poll(0):
            try:
                self.done[name] = pickle.loads(pipe.recv_bytes())
            except EOFError:
                self.done[name] = None
            return True
        if not self.procs[name].is_alive():
            self.procs[name].join()
            if pipe.poll(0):
                return self._collect(name)
            self.done[name] = None
            return True
        return False

    def results(self, names, timeout):
        """Results in order of ``names``; KILLED for a peer that died by
        SIGKILL; raises RankError for a peer that failed or overran."""
        deadline = time.monotonic() + timeout
        pending = list(names)
        while pending and time.monotonic() < deadline:
            pending = [n for n in pending if not self._collect(n)]
            time.sleep(0.01)
        out = []
        for name in names:
            if name not in self.done:
                raise RankError(name, f"did not finish within {timeout} s")
            res = self.done[name]
            if res is None:
                self.procs[name].join(timeout=5)
                code = self.procs[name].exitcode
                if code in (-signal.SIGKILL,):
                    out.append(KILLED)
                    continue
                raise RankError(name, f"process died with exit code {code}")
            if res[0] != "ok":
                raise RankError(name, res[1], res[2])
            out.append(res[1])
        return out

    def close(self):
        for p in self.procs.values():
            if p.is_alive():
                try:
                    os.kill(p.pid, signal.SIGCONT)  # a stopped process cannot die of SIGTERM
                except ProcessLookupError:
                    pass
                p.kill()
            p.join(timeout=5)
            if p.exitcode is not None:
                p.close()  # releases the pipes multiprocessing keeps per process
        for c in self.pipes.values():
            c.close()
        if self.coordinator is not None:
            self.coordinator.stop()
        if self.master is not None and self.master.poll() is None:
            self.kill_coordinator()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def peer_results(pipes, limit=90.0):
    """The results ``_peer_main`` peers sent down ``pipes``, in order; each must answer within
    ``limit`` seconds and have ended "ok"."""
    results = []
    for pipe in pipes:
        assert pipe.poll(limit), "a peer hung"
        status, *rest = pickle.loads(pipe.recv_bytes())
        assert status == "ok", rest
        results.append(rest[0])
    return results
