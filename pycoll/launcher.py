"""``pycoll run``: start a coordinator and N workers with torchrun's variables.

Each worker gets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR
and MASTER_PORT; its output lines are prefixed with ``[rank]``. The coordinator
listens on PYCOLL_MASTER_PORT (which ``pycoll.init()`` prefers), so that
MASTER_PORT stays free for torch.distributed's store (``init_process_group``). The launcher
returns the first non-zero exit code, and takes the whole group down on
Ctrl-C or as soon as a worker fails (unless ``keep_going``: then the group
carries on without it, which is what elastic jobs want).
"""
import os
import signal
import subprocess
import sys
import threading
import time

from .coordinator import Coordinator
from .testing import free_port


def _pump(stream, prefix, out):
    for line in iter(stream.readline, b""):
        out.buffer.write(prefix + line)
        out.flush()
    stream.close()


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
    coordinator = Coordinator(master_addr, port, world_size=nprocs, heartbeat_timeout=heartbeat_timeout).start()
    procs, pumps = [], []
    try:
        for rank in range(nprocs):
            child_env = dict(os.environ if env is None else env)
            child_env.update(RANK=str(rank), WORLD_SIZE=str(nprocs), LOCAL_RANK=str(rank),
                             LOCAL_WORLD_SIZE=str(nprocs), MASTER_ADDR=master_addr, MASTER_PORT=str(torch_port),
                             PYCOLL_MASTER_PORT=str(port),
                             PYTHONUNBUFFERED="1")
            p = subprocess.Popen([sys.executable] + list(argv), env=child_env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE)
            procs.append(p)
            for stream, out in ((p.stdout, sys.stdout), (p.stderr, sys.stderr)):
                t = threading.Thread(target=_pump, args=(stream, f"[{rank}] ".encode(), out), daemon=True)
                t.start()
                pumps.append(t)
        first_failure = 0
        while True:
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c not in (None, 0)]
            if failed and not first_failure:
                first_failure = failed[0]
                if not keep_going:
                    print(f"pycoll run: a worker exited with code {first_failure}; stopping the others",
                          file=sys.stderr, flush=True)
                    _terminate(procs)
                    break
            if all(c is not None for c in codes):
                break
            time.sleep(0.05)
        for t in pumps:
            t.join(timeout=2)
        return first_failure
    except KeyboardInterrupt:
        print("pycoll run: interrupted; stopping workers", file=sys.stderr, flush=True)
        _terminate(procs)
        return 130
    finally:
        _terminate(procs)
        coordinator.stop()
