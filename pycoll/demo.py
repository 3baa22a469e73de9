"""``pycoll demo``: the whole library in about half a minute on one machine.

A coordinator and 4 local peers (processes on this machine; peers talk over shared memory where
they can, else over loopback TCP, and the demo prints which):

1. every algorithm in :data:`pycoll.plan.planners.ALGORITHMS` runs every collective; each result is
   checked exactly against what it must be, and its bandwidth measured;
2. the peers train a toy model (data-parallel SGD on a 4 MiB parameter vector, gradients averaged
   with ``all_reduce``); the demo SIGKILLs one peer mid-training; the survivors notice, re-form
   the group and carry on;
3. a new peer joins with :func:`pycoll.connect`; the members admit it at their next
   ``update_topology()`` and hand it the model with a ``broadcast``;
4. parity: every peer hashes its parameters and the hashes are all-gathered: they must be equal;
5. a summary: bandwidth per algorithm and collective, and what the fault cost.

The peers report to the driver (this process) through a queue; the driver hosts the coordinator,
kills the victim, starts the joiner and prints the tables. :func:`run_demo` returns the summary,
and raises :class:`DemoError` if a check failed or the demo ran past its time limit.
"""
import hashlib
import multiprocessing as mp
import sys
import time
from dataclasses import dataclass, field

import numpy as np

__all__ = ["run_demo", "DemoError", "DemoSummary", "main"]

COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "broadcast")
KILL_STEP = 8          # the victim dies when it reaches this step
STEPS_AFTER_JOIN = 8   # training steps on the full group after the joiner came in
LR = 0.25


class DemoError(RuntimeError):
    """A check of the demo failed (or it ran out of time)."""


@dataclass
class DemoSummary:
    """What the demo measured and checked."""

    peers: int
    nbytes: int
    bench: list = field(default_factory=list)   # dicts: algorithm, collective, nbytes, seconds, busbw, check
    events: list = field(default_factory=list)  # (seconds since start, text)
    detect_s: float = None    # kill -> survivors re-formed
    join_s: float = None      # joiner started -> admitted
    steps: int = 0
    parity_ok: bool = False
    digest: str = ""
    seconds: float = 0.0


def busbw(collective, nbytes, seconds, n):
    """nccl-tests bus bandwidth (nbytes: the whole buffer, output for gathers)."""
    if seconds <= 0 or n < 2:
        return 0.0
    factor = {"all_reduce": 2 * (n - 1) / n, "all_gather": (n - 1) / n, "reduce_scatter": (n - 1) / n,
              "broadcast": 1.0}[collective]
    return nbytes / seconds * factor


# ---- peer side ---------------------------------------------------------------
def _report(events, *msg):
    # One pipe per peer, not a shared queue: a peer killed while writing to a
    # shared queue would leave its lock held and silence everyone else.
    events.send((time.monotonic(),) + msg)


_TRANSPORT_NAMES = {"shm": "shared memory", "tcp": "TCP (loopback)"}


def describe_transports(by_rank):
    """What connects the peers, from every rank's ``comm.peer_transports``: e.g.
    'full mesh: 6 pairs over shared memory' (a pair counted once, by the lower rank's view)."""
    counts = {}
    for r, row in enumerate(by_rank):
        for p, kind in enumerate(row):
            if p > r:
                counts[kind] = counts.get(kind, 0) + 1
    parts = [f"{k} pair{'s' if k != 1 else ''} over {_TRANSPORT_NAMES.get(kind, kind)}"
             for kind, k in sorted(counts.items(), key=lambda kv: (kv[0] != "shm", kv[0]))]
    return "full mesh: " + (", ".join(parts) if parts else "no pairs")


def _check(comm, coll, algorithm):
    """Run ``coll`` on small integers; True if the result is exactly right."""
    n, r, k = comm.world_size, comm.rank, 1000
    if coll == "all_reduce":
        x = np.arange(k, dtype=np.int32) + r
        comm.all_reduce(x, algorithm=algorithm)
        return np.array_equal(x, n * np.arange(k, dtype=np.int32) + n * (n - 1) // 2)
    if coll == "all_gather":
        out = np.zeros(k * n, np.int32)
        comm.all_gather(np.full(k, r, np.int32), out, algorithm=algorithm)
        return np.array_equal(out, np.repeat(np.arange(n, dtype=np.int32), k))
    if coll == "reduce_scatter":
        out = np.zeros(k, np.int32)
        comm.reduce_scatter(np.arange(k * n, dtype=np.int32) + r, out, algorithm=algorithm)
        return np.array_equal(out, n * np.arange(r * k, (r + 1) * k, dtype=np.int32) + n * (n - 1) // 2)
    x = np.arange(k, dtype=np.int32) * (r == n - 1)
    comm.broadcast(x, root=n - 1, algorithm=algorithm)
    return np.array_equal(x, np.arange(k, dtype=np.int32))


def _time(comm, coll, algorithm, nbytes, iters):
    n = comm.world_size
    count = nbytes // 4
    if coll == "all_reduce":
        a = np.ones(count, np.float32)
        op = lambda: comm.all_reduce(a, algorithm=algorithm)  # noqa: E731
    elif coll == "all_gather":
        a, out = np.ones(count // n, np.float32), np.zeros(count // n * n, np.float32)
        op = lambda: comm.all_gather(a, out, algorithm=algorithm)  # noqa: E731
    elif coll == "reduce_scatter":
        a, out = np.ones(count // n * n, np.float32), np.zeros(count // n, np.float32)
        op = lambda: comm.reduce_scatter(a, out, algorithm=algorithm)  # noqa: E731
    else:
        a = np.ones(count, np.float32)
        op = lambda: comm.broadcast(a, root=0, algorithm=algorithm)  # noqa: E731
    op()  # warm-up: plans, buffers
    times = np.zeros(iters)
    for i in range(iters):
        comm.barrier()
        t0 = time.perf_counter()
        op()
        times[i] = time.perf_counter() - t0
    comm.all_reduce(times, op="max")
    return float(np.median(times))


def _bench_phase(comm, events, algorithms, sizes, iters):
    import pycoll
    for algorithm in algorithms:
        for coll in COLLECTIVES:
            try:
                ok = _check(comm, coll, algorithm)
                ok = bool(comm.all_reduce(np.array([0 if ok else 1], np.int32))[0] == 0)  # all ranks
                times, ran = [], []
                for nbytes in sizes:
                    times.append(_time(comm, coll, algorithm, nbytes, iters if nbytes >= 1 << 20 else 4 * iters))
                    ran.append(comm.stats[-2].algorithm)  # [-1] is the all_reduce of the timings
                note = "ok" if ok else "WRONG"
            except pycoll.InvalidArgument as exc:  # this algorithm does not do this collective
                times, ran, note = [None] * len(sizes), [algorithm] * len(sizes), f"n/a: {exc}"
            if comm.rank == 0:
                _report(events, "bench", algorithm, coll, list(zip(sizes, times, ran)), note, comm.world_size)


class _Model:
    """Data-parallel least squares: every member pulls the parameters toward
    its own target; the average of the gradients pulls toward their mean."""

    def __init__(self, nbytes):
        self.params = np.zeros(nbytes // 4, np.float32)
        self.meta = np.zeros(4, np.int64)  # step, failures seen, joins seen, step of the last join

    def gradient(self, identity, step):
        rng = np.random.default_rng([identity, step % 4])
        return (self.params - rng.standard_normal(self.params.size, dtype=np.float32)) * np.float32(2.0)


def _train(comm, events, model, identity, total_peers, deadline, victim, just_joined=False):
    """Train until the group is whole again and has run STEPS_AFTER_JOIN more
    steps (or the shared deadline passed). Everyone takes the same decisions
    because they come from collective results. A joiner enters where the
    members are when update_topology() admitted it: at the state broadcast."""
    import pycoll
    world = comm.world_size
    grad = np.zeros(model.params.size + 1, np.float32)
    for _ in range(2000):  # bounded; the deadline vote ends it much earlier
        changed, just_joined = just_joined or comm.update_topology(), False  # dead out, joiners in
        if changed:
            if comm.rank == 0:
                if comm.world_size < world:
                    model.meta[1] += 1
                elif comm.world_size > world:
                    model.meta[2] += 1
                    model.meta[3] = model.meta[0]
            comm.broadcast(model.meta, root=0)      # everyone takes rank 0's state: survivors
            comm.broadcast(model.params, root=0)    # that finished the failed step and those that
            world = comm.world_size                 # did not agree again, and the joiner gets it
            _report(events, "membership", comm.rank, comm.epoch, world, int(model.meta[0]))
        step = int(model.meta[0])
        if identity == victim and step == KILL_STEP:
            _report(events, "victim", step)
            time.sleep(10)  # the driver kills us here (SIGKILL); bounded if it does not
        grad[:-1] = model.gradient(identity, step)
        grad[-1] = 1.0 if time.monotonic() > deadline else 0.0  # the stop vote rides along
        try:
            comm.all_reduce(grad, op="avg")
        except pycoll.PeerFailure as exc:
            _report(events, "failure", comm.rank, str(exc).splitlines()[0][:200])
            continue  # the step is retried on the survivors
        model.params -= np.float32(LR) * grad[:-1]
        model.meta[0] += 1
        joined = model.meta[2] > 0 and world == total_peers and model.meta[0] - model.meta[3] >= STEPS_AFTER_JOIN
        if joined or grad[-1] > 0:
            return bool(joined)
    return False


def _parity(comm, model):
    """Hash the parameters on every rank and all-gather the hashes."""
    digest = hashlib.sha256(model.params.tobytes()).digest()
    mine = np.frombuffer(digest[:8], np.uint64).copy()
    every = np.zeros(comm.world_size, np.uint64)
    comm.all_gather(mine, every)
    return bool(np.all(every == every[0])), digest.hex()[:16], every.tolist()


def _peer(role, rank, port, events, options):
    """A demo peer process: ``role`` is 'member' (starts with the group) or 'joiner'."""
    try:
        import pycoll
        t0 = time.monotonic()
        kw = dict(master_addr="127.0.0.1", master_port=port, heartbeat_timeout=2.0, timeout=30.0)
        if role == "member":
            comm = pycoll.init(rank=rank, world_size=options["peers"], **kw)
            _report(events, "ready", rank, list(comm.peer_transports))
            _bench_phase(comm, events, options["algorithms"], options["sizes"], options["iters"])
        else:
            comm = pycoll.connect(**kw)  # admitted at the members' next update_topology()
            _report(events, "admitted", comm.rank, comm.world_size, time.monotonic() - t0)
        model = _Model(options["nbytes"])
        complete = _train(comm, events, model, rank, options["peers"], options["deadline"], options["victim"],
                          just_joined=role == "joiner")
        ok, digest, hashes = _parity(comm, model)
        _report(events, "parity", comm.rank, ok, digest, comm.world_size, int(model.meta[0]), complete)
        comm.close()
    except Exception as exc:  # noqa: BLE001 - the driver prints it
        import traceback
        _report(events, "error", role, rank, f"{type(exc).__name__}: {exc}", traceback.format_exc())


def _next_event(pipes, timeout):
    """The next message from any peer, or None after ``timeout``."""
    from multiprocessing.connection import wait
    for conn in wait([c for c in pipes if not c.closed], timeout):
        try:
            return conn.recv()
        except (EOFError, OSError):  # that peer is gone
            pipes.remove(conn)
            conn.close()
    return None


# ---- driver ----------------------------------------------------------------------
def run_demo(peers=4, nbytes=4 << 20, algorithms=None, iters=5, time_limit=90.0, progress=True, out=None):
    """Run the demo; returns a :class:`DemoSummary` or raises :class:`DemoError`."""
    from tqdm import tqdm

    from pycoll.plan import planners
    from pycoll.control.coordinator import Coordinator
    from pycoll.testing import free_port

    out = out or sys.stdout
    if peers < 3:
        raise DemoError("the demo needs at least 3 peers (one is killed, two must survive)")
    algorithms = list(algorithms or [a for a in planners.ALGORITHMS if a != "auto"] or ["auto"])
    for a in algorithms:
        planners.check_algorithm(a)
    start = time.monotonic()
    summary = DemoSummary(peers, nbytes)
    import logging
    quiet_logs = logging.getLogger("pycoll.coordinator")
    if quiet_logs.getEffectiveLevel() >= logging.WARNING:  # the kill is on purpose: no warning about it
        quiet_logs.setLevel(logging.ERROR)
    victim = peers - 2
    sizes = sorted({min(64 << 10, nbytes), nbytes})  # a latency-bound and a bandwidth-bound size
    options = {"peers": peers, "nbytes": nbytes, "sizes": sizes, "algorithms": algorithms, "iters": iters,
               "victim": victim,
               "deadline": start + time_limit * 0.6}
    port = free_port()
    coordinator = Coordinator("127.0.0.1", port, world_size=peers, heartbeat_timeout=2.0).start()
    ctx = mp.get_context("spawn")
    procs, pipes = {}, []

    def spawn(role, rank):
        recv, send = ctx.Pipe(duplex=False)
        procs[rank] = ctx.Process(target=_peer, args=(role, rank, port, send, options), name=f"demo-{role}{rank}")
        procs[rank].start()
        send.close()
        pipes.append(recv)

    total = 1 + len(algorithms) * len(COLLECTIVES) + 4 + 1
    bar = tqdm(total=total, desc="starting peers", unit="step", disable=None if progress else True, leave=False,
               file=sys.stderr, bar_format="{desc:<44}{bar:20}| {n_fmt}/{total_fmt} [{elapsed}]")

    def say(text):
        summary.events.append((time.monotonic() - start, text))
        (bar.write if progress else print)(f"  {time.monotonic() - start:5.1f}s  {text}", file=out)

    def advance(desc):
        bar.set_description_str(desc)
        bar.update(1)

    try:
        for r in range(peers):
            spawn("member", r)
        say(f"coordinator on 127.0.0.1:{port}; started {peers} peers")
        ready, kill_time, parity, epochs = {}, None, {}, {}
        joiner_started = None
        while len(parity) < peers:
            left = start + time_limit - time.monotonic()
            if left <= 0:
                raise DemoError(f"the demo did not finish within {time_limit:.0f} s")
            ev = _next_event(pipes, min(left, 0.5))
            if ev is None:
                dead = [r for r, p in procs.items() if not p.is_alive() and p.exitcode not in (0, None)
                        and r != victim]
                if dead:
                    raise DemoError(f"peer {dead[0]} exited with code {procs[dead[0]].exitcode}")
                continue
            t, kind, rest = ev[0], ev[1], ev[2:]
            if kind == "error":
                raise DemoError(f"{rest[0]} {rest[1]} failed: {rest[2]}\n{rest[3]}")
            if kind == "ready":
                ready[rest[0]] = rest[1]
                if len(ready) == peers:
                    say(f"{peers} peers connected ({describe_transports([ready[r] for r in sorted(ready)])})")
                    advance("checking every algorithm")
            elif kind == "bench":
                algorithm, coll, timed, note, n = rest
                for size, secs, ran in timed:
                    summary.bench.append({"algorithm": algorithm, "ran": ran, "collective": coll, "nbytes": size,
                                          "seconds": secs, "busbw": busbw(coll, size, secs, n) if secs else None,
                                          "check": note})
                if note not in ("ok",) and not note.startswith("n/a"):
                    raise DemoError(f"{algorithm} {coll} gave a wrong result")
                advance(f"{algorithm} {coll}")
            elif kind == "victim":
                procs[victim].kill()  # SIGKILL: no goodbye, sockets torn down by the kernel
                kill_time = time.monotonic()
                say(f"killed peer {victim} (SIGKILL) at training step {rest[0]}")
                advance("waiting for the survivors")
            elif kind == "failure":
                if kill_time is not None and "failure" not in epochs:
                    epochs["failure"] = t
                    say(f"rank {rest[0]} saw PeerFailure {1000 * (t - kill_time):.0f} ms after the kill")
            elif kind == "membership":
                rank, epoch, world, step = rest
                if epoch in epochs:
                    continue
                epochs[epoch] = world
                if kill_time is not None and world == peers - 1 and joiner_started is None:
                    summary.detect_s = t - kill_time
                    say(f"survivors re-formed as {world} peers (epoch {epoch}) {1000 * summary.detect_s:.0f} ms "
                        f"after the kill; training goes on from step {step}")
                    advance("a new peer joins")
                    joiner_started = time.monotonic()
                    spawn("joiner", peers)
                elif joiner_started is not None and world == peers:
                    summary.join_s = t - joiner_started
                    say(f"new peer admitted: {world} peers again (epoch {epoch}) {summary.join_s:.2f} s after it "
                        f"was started; it got the model by broadcast at step {step}")
                    advance("training on the full group")
            elif kind == "admitted":
                pass
            elif kind == "parity":
                rank, ok, digest, world, step, complete = rest
                parity[rank] = (ok, digest, world, step, complete)
                if len(parity) == 1:
                    advance("parity check")
        oks = {v[0] for v in parity.values()}
        digests = {v[1] for v in parity.values()}
        summary.steps = max(v[3] for v in parity.values())
        summary.parity_ok = oks == {True} and len(digests) == 1
        summary.digest = digests.pop() if len(digests) == 1 else ""
        advance("done")
        if not all(v[4] for v in parity.values()):
            raise DemoError("training stopped at its deadline before the group was whole again")
        if not summary.parity_ok:
            raise DemoError(f"parity check failed: {parity}")
        say(f"parity: all {peers} peers hold identical parameters (sha256 {summary.digest}) "
            f"after {summary.steps} steps")
        for p in procs.values():
            p.join(timeout=10)
    finally:
        bar.close()
        for p in procs.values():
            if p.is_alive():
                p.join(timeout=max(0.0, min(5.0, start + time_limit + 10 - time.monotonic())))
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        coordinator.stop()
        for c in pipes:
            c.close()
    summary.seconds = time.monotonic() - start
    return summary


def format_summary(summary):
    """The summary tables as text."""
    from pycoll.benchmark import human_size, render_table

    rows = []
    for b in summary.bench:
        t = b["seconds"]
        name = b["algorithm"] if b.get("ran", b["algorithm"]) == b["algorithm"] else f"{b['algorithm']} (ran {b['ran']})"
        rows.append([name, b["collective"], human_size(b["nbytes"]),
                     "-" if t is None else (f"{t * 1e3:.2f} ms"),
                     "-" if b["busbw"] is None else f"{b['busbw'] / 1e9:.2f}", b["check"]])
    lines = [f"Collectives on {summary.peers} peers (float32, median of timed calls; busbw as nccl-tests "
             "defines it; \"ran\": the algorithm that served a collective its own does not implement):", "",
             render_table(["algorithm", "collective", "size", "time", "busbw GB/s", "check"], rows), ""]
    fault = [["peer killed (SIGKILL) -> survivors re-formed",
              "-" if summary.detect_s is None else f"{summary.detect_s * 1e3:.0f} ms"],
             ["new peer started -> admitted and given the model",
              "-" if summary.join_s is None else f"{summary.join_s:.2f} s"],
             ["training steps (all peers agree)", str(summary.steps)],
             ["parity (sha256 of the parameters on every peer)",
              f"identical ({summary.digest})" if summary.parity_ok else "DIFFERENT"],
             ["demo wall time", f"{summary.seconds:.1f} s"]]
    lines += ["Faults:", "", render_table(["what", "result"], fault, align_numbers=False)]
    return "\n".join(lines)


def main(peers=4, nbytes=4 << 20, algorithms=None, iters=5, time_limit=90.0, progress=True):
    """``pycoll demo``: run, print the summary; exit code 0 if every check passed."""
    print(f"pycoll demo: a coordinator and {peers} local peers; every algorithm, a peer killed, "
          "one joining, a parity check", flush=True)
    try:
        summary = run_demo(peers, nbytes, algorithms, iters, time_limit, progress)
    except DemoError as exc:
        print(f"\npycoll demo FAILED: {exc}", file=sys.stderr)
        return 1
    print()
    print(format_summary(summary))
    return 0
