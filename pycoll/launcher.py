"""``pycoll run``: start a coordinator and N workers with torchrun's variables.

Each worker gets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR
and MASTER_PORT; its output lines are prefixed with ``[rank]``. The coordinator
listens on PYCOLL_MASTER_PORT (which ``pycoll.init()`` prefers), so that
MASTER_PORT stays free for torch.distributed's store (``init_process_group``). The launcher
returns the first non-zero exit code, and takes the whole group down on
Ctrl-C or as soon as a worker fails (unless ``keep_going``: then the group
carries on without it, which is what elastic jobs want).

``run(..., elastic=True)`` (``pycoll run --elastic``, :func:`run_elastic`) is for elastic groups
(workers that call ``pycoll.connect``): the survivors keep running when a worker dies, and a
replacement starts, joins the running group and is healed (docs/elastic-launch.md).

Exit code: 0, or for the first worker that failed its own code, or 128 + N if signal N killed it
(what a shell reports); 130 after Ctrl-C. A second Ctrl-C kills the workers at once. Workers
die with the launcher, even if it is SIGKILLed: on Linux the kernel sends them SIGKILL
(``prctl(PR_SET_PDEATHSIG)``); elsewhere a small watchdog process does it. Elastic workers
do not: they go on under a successor coordinator (see :func:`run_elastic`).
"""
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from pycoll.control.coordinator import Coordinator
from pycoll.options import environ
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
        heartbeat_timeout=5.0, elastic=False, **elastic_options):
    """Run ``argv`` (a Python script and its arguments, or ``-m module ...``)
    on ``nprocs`` local ranks; returns the exit code. ``elastic``: see :func:`run_elastic`
    (``elastic_options`` are its keyword arguments)."""
    if elastic:
        return run_elastic(argv, nprocs, master_addr=master_addr, master_port=master_port, env=env,
                           heartbeat_timeout=heartbeat_timeout, **elastic_options)
    if elastic_options:
        raise TypeError(f"options of elastic runs only: {sorted(elastic_options)}")
    port = master_port or free_port()
    torch_port = free_port()
    while torch_port == port:
        torch_port = free_port()
    job_id = (os.environ if env is None else env).get("PYCOLL_JOB_ID") or f"run-{os.urandom(6).hex()}"
    coordinator = Coordinator(master_addr, port, world_size=nprocs, heartbeat_timeout=heartbeat_timeout,
                              job_id=job_id).start()
    procs, pumps, watchdog = [], [], None
    previous_sigint = None
    interrupts = [0]

    def impatient(signum, frame):  # a second Ctrl-C: no more grace, no traceback
        os.write(2, b"pycoll run: interrupted again; killing workers\n")  # (print is not reentrant)
        for p in procs:
            if p.poll() is None:
                p.kill()

    def on_sigint(signum, frame):
        # Installed before the first Ctrl-C, so a second one kills the workers however soon it
        # comes: installing `impatient` in the KeyboardInterrupt handler left a window where a
        # second Ctrl-C on a loaded host interrupted the graceful stop itself.
        interrupts[0] += 1
        if interrupts[0] == 1:
            raise KeyboardInterrupt
        impatient(signum, frame)

    try:
        previous_sigint = signal.signal(signal.SIGINT, on_sigint)
    except ValueError:  # not the main thread: Python's own KeyboardInterrupt, no second chance
        pass
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


# ---- elastic runs: the survivors carry on, a dead worker is replaced --------------------------
RESTART_DELAY_CAP = 30.0  # seconds: the longest wait before a replacement (the wait doubles per rank)
PROGRESS_S = 5.0          # a line this often while the first group forms
_MAX_PARTIAL = 1 << 16    # bytes of a line without its newline kept back before it is shown anyway


def _write(out, data):
    buf = getattr(out, "buffer", None)
    if buf is not None:
        buf.write(data)
    else:
        out.write(data.decode(errors="replace"))
    out.flush()


class _Tail:
    """Copies a worker's output file to ``out`` line by line, each line prefixed. Elastic workers
    write to files, not pipes: a worker outlives a launcher that was SIGKILLed (the group
    goes on under a successor coordinator), and a pipe without its reader would break its
    next print."""

    def __init__(self, path, prefix, out):
        self.f = open(path, "rb")
        self.prefix, self.out, self.rest = prefix, out, b""

    def poll(self, final=False):
        data = self.f.read()
        if data:
            lines = (self.rest + data).split(b"\n")
            self.rest = lines.pop()
            if len(self.rest) > _MAX_PARTIAL:
                lines.append(self.rest)
                self.rest = b""
            if lines:
                _write(self.out, b"".join(self.prefix + line + b"\n" for line in lines))
        if final:
            if self.rest:
                _write(self.out, self.prefix + self.rest + b"\n")
                self.rest = b""
            self.f.close()


class _Worker:
    """One process of a rank: the original (``restart`` 0) or its ``restart``-th replacement."""

    def __init__(self, rank, restart, proc, tails):
        self.rank, self.restart, self.proc, self.tails = rank, restart, proc, tails
        self.stopped = False  # stopped by the launcher (not a failure)

    def __str__(self):
        return f"rank {self.rank}" + (f" (replacement {self.restart}, pid {self.proc.pid})" if self.restart
                                      else f" (pid {self.proc.pid})")

    def pump(self, final=False):
        for t in self.tails:
            t.poll(final)


def _members(coordinator):
    """(pids of the coordinator's live members, pids of its current epoch's live members, pids of
    live members that joined with a rank, i.e. with pycoll.init): read from the coordinator
    thread's dicts, which may change meanwhile (then read again)."""
    for _ in range(10):
        try:
            members = [m for m in dict(coordinator.members).values() if m.alive and isinstance(m.info, dict)]
            epoch = set(coordinator.epoch_members)
            return ({m.info.get("pid") for m in members}, {m.info.get("pid") for m in members if m.name in epoch},
                    {m.info.get("pid") for m in members if m.rank_hint is not None})
        except RuntimeError:  # "dictionary changed size during iteration"
            time.sleep(0.001)
    return set(), set(), set()


class _ElasticJob:
    """The monitor of :func:`run_elastic` (its docstring says what it does)."""

    def __init__(self, argv, nprocs, base_env, coordinator, log_dir, max_restarts, restart_delay, join_timeout):
        self.argv, self.nprocs, self.base_env = list(argv), nprocs, base_env
        self.coordinator, self.log_dir = coordinator, log_dir
        self.max_restarts, self.restart_delay, self.join_timeout = max_restarts, restart_delay, join_timeout
        self.running, self.pending = [], []  # pending: (monotonic due, rank, restart)
        self.restarts = 0       # replacements started or scheduled, the whole job
        self.finished = False   # a worker exited 0: the script's work is done, nobody is replaced any more
        self.failure = 0        # exit code of a failure that was not replaced (after the others finished)
        self.stop_signal = None
        self.told_init = False  # said that a worker used pycoll.init()

    def say(self, text):
        print(f"pycoll run: {text}", file=sys.stderr, flush=True)

    # ---- processes
    def start(self, rank, restart):
        env = dict(self.base_env, RANK=str(rank), LOCAL_RANK=str(rank), PYCOLL_RESTART_COUNT=str(restart))
        paths = [os.path.join(self.log_dir, f"rank{rank}.{restart}.{kind}") for kind in ("out", "err")]
        with open(paths[0], "wb") as out, open(paths[1], "wb") as err:
            proc = subprocess.Popen([sys.executable] + self.argv, env=env, stdout=out, stderr=err)
        prefix = f"[{rank}] ".encode()
        w = _Worker(rank, restart, proc, [_Tail(paths[0], prefix, sys.stdout), _Tail(paths[1], prefix, sys.stderr)])
        self.running.append(w)
        return w

    def stop_all(self):
        _terminate([w.proc for w in self.running])
        for w in self.running:
            w.pump(final=True)
        self.running = []

    def on_signal(self, signum, frame):
        if self.stop_signal is None:
            self.stop_signal = signum  # the monitor loop stops the job (nothing is forked half-way)
            return
        if signum == signal.SIGINT:  # a second Ctrl-C: no more grace
            os.write(2, b"pycoll run: interrupted again; killing workers\n")  # (print is not reentrant)
            for w in list(self.running):
                if w.proc.poll() is None:
                    w.proc.kill()

    # ---- what the monitor sees
    def forming(self):
        """While the first group forms: "2 of 3 workers connected; not yet rank 2 (pid 7)"."""
        connected, _, _ = _members(self.coordinator)
        absent = [w for w in self.running if w.proc.pid not in connected]
        text = f"{len(self.running) - len(absent)} of {self.nprocs} workers connected"
        if absent:
            text += "; not yet " + ", ".join(str(w) for w in absent)
        return text

    def on_exit(self, w, code, now):
        """A worker ended with ``code``: None to go on, or the job's exit code."""
        if w.stopped or code == 0:
            self.finished = self.finished or code == 0
            return None
        if self.stop_signal is not None:  # (a terminal's Ctrl-C reaches the workers too): no replacement
            return None
        what = describe_exit(w.rank, code) + (f" (replacement {w.restart})" if w.restart else "")
        if self.coordinator.epoch == 0:
            what += f" before the group formed ({self.forming()})"
        if self.finished:
            self.say(f"{what} after others had finished; not replaced")
            self.failure = self.failure or exit_code(code)
            return None
        if self.restarts >= self.max_restarts:
            self.say(f"{what}; no restarts left (--max-restarts {self.max_restarts}, all used): stopping the job")
            return exit_code(code)
        delay = min(RESTART_DELAY_CAP, self.restart_delay * 2 ** w.restart)
        self.restarts += 1
        self.pending.append((now + delay, w.rank, w.restart + 1))
        self.say(f"{what}; the others carry on; its replacement starts in {delay:.1f} s "
                 f"(restart {self.restarts} of {self.max_restarts})")
        return None

    def start_due(self, now):
        if self.stop_signal is not None:
            return  # stopping: the loop's next turn stops the others
        for item in [p for p in self.pending if p[0] <= now]:
            self.pending.remove(item)
            _, rank, restart = item
            if self.finished:
                self.say(f"not starting a replacement for rank {rank}: the others have finished")
                continue
            w = self.start(rank, restart)
            self.say(f"started {w}: it joins the running group (pycoll.connect) and is healed at its first "
                     "sync_shared_state")

    def stop_unadmitted(self):
        """Once the script's work is done (a worker exited 0), a replacement still waiting to be
        admitted would wait for its join timeout (nobody calls update_topology() any more):
        stop it when no member of the group runs."""
        connected, in_epoch, _ = _members(self.coordinator)
        running = {w.proc.pid for w in self.running}
        if running & in_epoch:
            return
        for w in self.running:
            if w.proc.pid in connected and not w.stopped:
                self.say(f"{w} was waiting to be admitted, but the group has finished: stopping it")
                w.stopped = True
                w.proc.terminate()

    def check_init(self):
        """A worker that joined with pycoll.init() (a rank) made a fixed group: say once that its
        replacement could not join it (it would wait for its join timeout)."""
        _, _, ranked = _members(self.coordinator)
        named = [w for w in self.running if w.proc.pid in ranked]
        if named:
            self.told_init = True
            self.say(f"{named[0]} joined with pycoll.init(), which makes a fixed group that a replacement cannot "
                     "join: under --elastic, workers call pycoll.connect() (docs/elastic-launch.md)")

    # ---- the monitor
    def run(self):
        for rank in range(self.nprocs):
            self.start(rank, 0)
        started = time.monotonic()
        next_progress = started + PROGRESS_S
        while True:
            if self.stop_signal is not None:
                interrupted = self.stop_signal == signal.SIGINT
                self.say("interrupted; stopping workers (Ctrl-C again to kill them)" if interrupted
                         else f"got {signal.Signals(self.stop_signal).name}; stopping workers")
                self.stop_all()
                return 128 + self.stop_signal
            now = time.monotonic()
            for w in list(self.running):
                w.pump()
                code = w.proc.poll()
                if code is None:
                    continue
                w.pump(final=True)
                self.running.remove(w)
                result = self.on_exit(w, code, now)
                if result is not None:
                    self.stop_all()
                    return result
            self.start_due(now)
            if not self.running and not self.pending:
                return self.failure
            if self.coordinator.epoch == 0:
                if now - started > self.join_timeout:
                    self.say(f"the group did not form within {self.join_timeout:.0f} s: {self.forming()} "
                             "(does the script call pycoll.connect()? --join-timeout sets this wait)")
                    self.stop_all()
                    return 1
                if now >= next_progress:
                    next_progress = now + PROGRESS_S
                    self.say(f"waiting for the group to form: {self.forming()}")
            elif self.finished:
                self.stop_unadmitted()
            if not self.told_init:
                self.check_init()
            time.sleep(0.05)


def run_elastic(argv, nprocs, *, master_addr="127.0.0.1", master_port=None, env=None, heartbeat_timeout=5.0,
                max_restarts=3, restart_delay=1.0, join_timeout=None, log_dir=None):
    """``pycoll run --elastic``: ``nprocs`` workers of an elastic group (each calls
    ``pycoll.connect()``); returns the exit code.

    The first group forms when all ``nprocs`` have connected (within ``join_timeout`` s:
    default PYCOLL_JOIN_TIMEOUT, else 300). A worker that fails does not stop the others: they
    go on without it (their next collective with ``retry=True`` is redone over the survivors),
    and after ``restart_delay`` s (doubled for each earlier replacement of that rank, at most
    30 s) a replacement starts with the same RANK and PYCOLL_RESTART_COUNT one higher; it joins
    at the group's next ``update_topology()`` and its first ``sync_shared_state`` heals it.
    At most ``max_restarts`` replacements in all: the next failure stops the job with that
    worker's exit code. Once a worker exits 0 the work is done: nobody is replaced any more, and
    the job ends when every worker has; its code is 0 unless a worker failed after that.

    Workers write to files in ``log_dir`` (default: a new temporary folder, removed after a
    job that succeeded), which the launcher copies to its own output prefixed with ``[rank]``.
    They are not tied to the launcher's life: if the launcher is SIGKILLed, the group loses its
    coordinator and goes on under a successor (pycoll.comm.failover), with nobody to replace the
    dead. Ctrl-C (SIGINT) or SIGTERM stops every worker (exit 130 or 143); Ctrl-C again kills them.
    """
    base = dict(os.environ if env is None else env)
    if join_timeout is None:
        join_timeout = environ("PYCOLL_JOIN_TIMEOUT", base) or 300.0
    port = master_port or free_port()
    torch_port = free_port()
    while torch_port == port:
        torch_port = free_port()
    job_id = base.get("PYCOLL_JOB_ID") or f"run-{os.urandom(6).hex()}"
    base.update(WORLD_SIZE=str(nprocs), LOCAL_WORLD_SIZE=str(nprocs), MASTER_ADDR=master_addr,
                MASTER_PORT=str(torch_port), PYCOLL_MASTER_PORT=str(port), PYCOLL_JOB_ID=job_id,
                PYTHONUNBUFFERED="1")
    # the first epoch waits for all nprocs (min_world_size); later ones admit whoever joins
    coordinator = Coordinator(master_addr, port, min_world_size=nprocs, heartbeat_timeout=heartbeat_timeout,
                              job_id=job_id).start()
    own_dir = log_dir is None
    try:
        log_dir = tempfile.mkdtemp(prefix="pycoll-run-") if own_dir else log_dir
        os.makedirs(log_dir, exist_ok=True)
    except OSError:
        coordinator.stop()
        raise
    job = _ElasticJob(argv, nprocs, base, coordinator, log_dir, max_restarts, restart_delay, join_timeout)
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            handlers[sig] = signal.signal(sig, job.on_signal)
    code = 1
    try:
        code = job.run()
        return code
    finally:
        job.stop_all()
        coordinator.stop()
        for sig, previous in handlers.items():
            signal.signal(sig, previous)
        if own_dir and code == 0:
            shutil.rmtree(log_dir, ignore_errors=True)
        elif code != 0:
            job.say(f"the workers' output is kept in {log_dir}")
