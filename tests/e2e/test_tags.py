"""Threads and tags: calls with a tag pair across ranks by their order among
calls of that tag, on connections of their own, so threads that each use a
tag may call at once in any interleaving; untagged calls from racing threads
are reported; a peer's death fails every channel's call once, then all work."""
import logging
import threading
import time

import numpy as np
import pytest

import pycoll
from collective_cases import run_on

TAGS = ("grads", "params", 7)


def _expected(tag_index, step, n):
    """Rank r contributes (tag_index * 1000 + step) * (r + 1): the sum over ranks."""
    return (tag_index * 1000 + step) * n * (n + 1) // 2


def _tagged_threads(comm, steps):
    """One thread per tag plus untagged calls on the main thread, all at once;
    each rank starts its threads in a different order and jitters them."""
    n, errors, results = comm.world_size, [], {}
    order = list(enumerate(TAGS))
    if comm.rank % 2:
        order.reverse()

    def worker(i, tag):
        rng = np.random.default_rng(comm.rank * 100 + i)
        got = []
        try:
            for step in range(steps):
                if rng.random() < 0.3:
                    time.sleep(rng.random() * 0.003)
                a = np.full(257 + 64 * i, (i * 1000 + step) * (comm.rank + 1), np.int64)
                comm.all_reduce(a, tag=tag)
                b = np.zeros(n * 3, np.int64)
                comm.all_gather(np.full(3, comm.rank + 10 * i, np.int64), b, tag=tag)
                got.append((int(a[0]), int(a[-1]), b.tolist()))
            comm.barrier(tag=tag)
        except Exception as exc:  # noqa: BLE001 - reported to the parent
            errors.append(f"{tag}: {type(exc).__name__}: {exc}")
        results[tag] = got

    threads = [threading.Thread(target=worker, args=(i, tag), name=f"t-{tag}") for i, tag in order]
    for t in threads:
        t.start()
    main = []
    for step in range(steps):  # untagged calls keep pairing by call order beside the tagged ones
        c = np.full(33, step + comm.rank, np.float64)
        comm.all_reduce(c)
        main.append(float(c[0]))
    for t in threads:
        t.join(60)
    return errors, results, main


@pytest.mark.timeout(180)
def test_tagged_calls_from_racing_threads_pair_by_tag(transport):
    n, steps = 3, 25
    results = run_on(_tagged_threads, n, transport, args=(steps,), timeout=150,
                     init_kwargs={"tags": TAGS, "timeout": 60})
    for rank, (errors, by_tag, main) in enumerate(results):
        assert errors == [], f"rank {rank}: {errors}"
        for i, tag in enumerate(TAGS):
            want_gather = [r + 10 * i for r in range(n) for _ in range(3)]
            assert by_tag[tag] == [(_expected(i, s, n), _expected(i, s, n), want_gather) for s in range(steps)], tag
        assert main == [float(s * n + n * (n - 1) // 2) for s in range(steps)]


def _misuse(comm):
    out = []
    for call in (lambda: comm.all_reduce(np.ones(4), tag="nope"),
                 lambda: comm.all_reduce_async(np.ones(4), tag="grads"),
                 lambda: comm.broadcast(np.ones(4), tag="grads", retry=True)):
        try:
            call()
            out.append("ok")
        except pycoll.InvalidArgument as exc:
            out.append(str(exc))
    return out


@pytest.mark.timeout(60)
def test_undeclared_tags_and_async_tags_are_refused_before_anything_is_sent():
    for msgs in pycoll.testing.run(_misuse, 2, timeout=45, init_kwargs={"tags": TAGS}):
        assert "was not declared" in msgs[0] and "'nope'" in msgs[0]
        assert "blocking calls only" in msgs[1] and "blocking calls only" in msgs[2]


def _racing_untagged(comm):
    """Two threads make untagged calls at once: rank 0 warns, naming both."""
    records = []

    class Grab(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logging.getLogger("pycoll").addHandler(Grab())
    a, b = np.ones(1 << 16, np.float32), np.ones(1 << 16, np.float32)
    if comm.rank == 0:
        def other():
            comm.all_reduce(b)
        t = threading.Thread(target=other, name="second-thread")
        t.start()
        time.sleep(0.2)  # the other thread is inside its call, waiting for rank 1
        comm.all_reduce(a)
        t.join(30)
    else:
        time.sleep(0.5)
        comm.all_reduce(b)
        comm.all_reduce(a)
    return [r for r in records if "untagged collective calls" in r]


@pytest.mark.timeout(60)
def test_racing_untagged_calls_are_reported_naming_both_threads():
    warned, quiet = pycoll.testing.run(_racing_untagged, 2, timeout=45)
    assert len(warned) == 1 and "'second-thread'" in warned[0] and "'MainThread'" in warned[0]
    assert quiet == []


def _die_during_tagged(comm):
    """Rank 2 dies while every rank has a tagged and an untagged call in flight;
    each survivor's channels fail exactly one call each, then all work on the
    survivors, still paired by tag."""
    outcomes, lock = {}, threading.Lock()

    def attempt(key, fn):
        try:
            fn()
            res = "ok"
        except pycoll.CollectiveError as exc:
            res = type(exc).__name__
        with lock:
            outcomes.setdefault(key, []).append(res)

    a = np.ones(1 << 18, np.float32)
    comm.all_reduce(a, tag="grads")  # every channel has run once
    comm.all_reduce(a)
    if comm.rank == 2:
        time.sleep(0.3)
        import os
        os._exit(17)

    def tagged():
        attempt("grads", lambda: comm.all_reduce(np.ones(1 << 18, np.float32), tag="grads"))
        x = np.full(16, comm.rank + 1.0, np.float32)
        attempt("grads", lambda: comm.all_reduce(x, tag="grads"))
        with lock:
            outcomes["grads_sum"] = float(x[0])

    t = threading.Thread(target=tagged)
    t.start()
    attempt("main", lambda: comm.all_reduce(np.ones(1 << 18, np.float32)))
    y = np.full(16, comm.rank + 1.0, np.float32)
    attempt("main", lambda: comm.all_reduce(y))
    t.join(60)
    # the idle tag fails its next call once too, then works
    attempt("params", lambda: comm.all_reduce(np.ones(4, np.float32), tag="params"))
    z = np.full(4, 2.0, np.float32)
    attempt("params", lambda: comm.all_reduce(z, tag="params"))
    return outcomes, float(y[0]), float(z[0]), comm.world_size


@pytest.mark.timeout(120)
def test_a_death_fails_every_channel_once_then_all_work(transport):
    results = run_on(_die_during_tagged, 4, transport, timeout=100, return_exceptions=True,
                     init_kwargs={"tags": TAGS, "timeout": 30})
    survivors = [r for i, r in enumerate(results) if i != 2]
    for outcomes, main_sum, params_sum, world in survivors:
        assert outcomes["main"] == ["PeerFailure", "ok"], outcomes
        assert outcomes["grads"] == ["PeerFailure", "ok"], outcomes
        assert outcomes["params"] == ["PeerFailure", "ok"], outcomes
        assert world == 3
        assert main_sum == outcomes["grads_sum"] == 1.0 + 2.0 + 4.0  # old ranks 0, 1, 3 (values set before)
        assert params_sum == 6.0
