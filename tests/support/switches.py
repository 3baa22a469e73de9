"""Standalone aggregators for the tests: two racks of two workers, each rack behind its own
software switch (``pycoll aggregator``), run as real processes over loopback."""
import contextlib
import multiprocessing as mp
import subprocess
import sys
import time

import pycoll.testing
from pycoll import aggregator

TOPOLOGY = """
[[group]]
name = "rack0"
count = 2
aggregator = "switch"

[[group]]
name = "rack1"
count = 2
aggregator = "switch"
"""


def _switch_main(group, port, topology):
    agg = aggregator.start(group, "127.0.0.1", port, topology=topology, join_timeout=60)
    agg.serve()


def start_switches(port, path, cli=False):
    """Two switches; with ``cli`` rack1's is the real ``pycoll aggregator`` command."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_switch_main, args=("rack0", port, str(path)), daemon=True)]
    procs[0].start()
    if cli:
        procs.append(subprocess.Popen([sys.executable, "-m", "pycoll", "aggregator", "--group", "rack1",
                                       "--topology", str(path), "--master-port", str(port)]))
    else:
        procs.append(ctx.Process(target=_switch_main, args=("rack1", port, str(path)), daemon=True))
        procs[1].start()
    return procs


def stop(procs):
    for p in procs:
        if isinstance(p, subprocess.Popen):
            p.kill()
            p.wait(timeout=5)
        else:
            if p.is_alive():
                p.kill()
            p.join(timeout=5)


@contextlib.contextmanager
def two_switches(tmp_path, cli=False):
    """``(port, topology path, switch processes)``; the switches are killed on exit."""
    path = tmp_path / "racks.toml"
    path.write_text(TOPOLOGY)
    port = pycoll.testing.free_port()
    procs = start_switches(port, path, cli)
    try:
        yield port, path, procs
    finally:
        stop(procs)


def run_workers(fn, port, path, args=()):
    """``fn`` on the 4 workers of :data:`TOPOLOGY` (a coordinator on ``port``)."""
    return pycoll.testing.run(fn, 4, args=args, timeout=150, port=port,
                              init_kwargs={"timeout": 30, "topology": str(path)})


def wait_for_switches(comm, want):
    """Bounded: until ``comm`` sees the switches of ``want`` (60 s), then its epoch."""
    deadline = time.monotonic() + 60
    while comm.aggregators != want and time.monotonic() < deadline:
        comm.update_topology()
        time.sleep(0.05)
    assert comm.aggregators == want, comm.aggregators
    return comm.epoch
