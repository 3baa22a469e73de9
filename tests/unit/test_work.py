"""Async handles: Work over a concurrent.futures.Future, and the one-thread CallOrderExecutor."""
import asyncio
import concurrent.futures
import logging
import subprocess
import sys
import threading
import time

import pytest

from pycoll.comm.work import CallOrderExecutor, Work
from pycoll.errors import CollectiveError, CollectiveTimeout


def test_calls_run_one_at_a_time_in_submission_order_on_one_thread():
    ex = CallOrderExecutor()
    seen, threads, running = [], set(), []

    def call(i):
        running.append(i)
        assert len(running) == 1, running  # never two at once
        threads.add(threading.get_ident())
        time.sleep(0.001)
        seen.append(i)
        running.pop()
        return i * i

    works = [Work(f"call {i}", ex.submit(call, i)) for i in range(50)]
    assert [w.wait(10) for w in works] == [i * i for i in range(50)]
    assert seen == list(range(50)) and len(threads) == 1 and threading.get_ident() not in threads
    ex.shutdown()


def test_work_carries_the_failure_and_its_future_is_a_real_one():
    ex = CallOrderExecutor()

    def fail():
        raise CollectiveError("boom")

    w = Work("all_reduce", ex.submit(fail))
    with pytest.raises(CollectiveError, match="boom"):
        w.wait(10)
    assert w.done() and isinstance(w.exception(), CollectiveError)
    assert isinstance(w.future, concurrent.futures.Future)
    ok = Work("x", ex.submit(lambda: 7))

    async def main():
        return await asyncio.wrap_future(ok.future)
    assert asyncio.run(main()) == 7
    ex.shutdown()


def test_wait_with_a_timeout_raises_collective_timeout_and_the_work_goes_on():
    ex = CallOrderExecutor()
    gate = threading.Event()
    w = Work("slow", ex.submit(gate.wait, 10))
    with pytest.raises(CollectiveTimeout, match="slow not finished after 0.05 s"):
        w.wait(0.05)
    assert not w.done() and w.exception() is None
    gate.set()
    assert w.wait(10) is True
    ex.shutdown()


def test_shutdown_lets_the_running_call_finish_and_fails_the_queued_ones():
    ex = CallOrderExecutor()
    gate = threading.Event()
    done = []
    running = Work("running", ex.submit(lambda: gate.wait(10) and done.append(1)))
    time.sleep(0.05)
    queued = [Work(f"queued {i}", ex.submit(done.append, i)) for i in range(3)]
    threading.Timer(0.1, gate.set).start()
    ex.shutdown(wait=True, timeout=10)
    running.wait(1)
    for w in queued:
        with pytest.raises(CollectiveError, match="communicator is closed"):
            w.wait(1)
    assert done == [1]
    with pytest.raises(RuntimeError):
        ex.submit(print)


def test_on_done_runs_before_the_waiter_wakes_also_for_dropped_calls():
    order = []
    ex = CallOrderExecutor(on_done=lambda: order.append("done"))
    w = Work("x", ex.submit(lambda: order.append("ran")))
    w.wait(10)
    assert order == ["ran", "done"]
    gate = threading.Event()
    ex.submit(gate.wait, 10)
    time.sleep(0.05)
    ex.submit(order.append, "never")
    threading.Timer(0.05, gate.set).start()
    ex.shutdown(wait=True, timeout=10)
    assert order == ["ran", "done", "done", "done"]


def test_a_failing_callback_is_logged_and_does_not_reach_the_worker(caplog):
    ex = CallOrderExecutor()
    w = Work("cb", ex.submit(lambda: 1))
    calls = []

    def bad(work):
        calls.append(work)
        raise ValueError("bad callback")
    with caplog.at_level(logging.ERROR, logger="pycoll"):
        w.add_done_callback(bad)
        w.wait(10)
        time.sleep(0.05)
        w.add_done_callback(bad)  # already done: runs here, still only logged
    assert calls == [w, w] and "a done callback" in caplog.text
    assert Work("after", ex.submit(lambda: 2)).wait(10) == 2  # the worker lives on
    ex.shutdown()


def test_a_stuck_queued_call_never_blocks_interpreter_exit():
    """Unlike ThreadPoolExecutor, whose thread is joined at exit after every queued item ran."""
    code = ("import threading, time\n"
            "from pycoll.comm.work import CallOrderExecutor\n"
            "ex = CallOrderExecutor()\n"
            "for _ in range(3): ex.submit(time.sleep, 60)\n"
            "time.sleep(0.1)\n"
            "print('exiting', flush=True)\n")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and "exiting" in proc.stdout, proc.stderr
    assert time.monotonic() - t0 < 20


def test_many_submitters_lose_no_wake_up_and_keep_each_ones_order():
    """The worker sleeps on an eventfd between items (pycoll.comm.work._WakeQueue): items put from
    several threads while it sleeps, runs or is about to sleep all run, each thread's in order."""
    ex = CallOrderExecutor()
    ran = []
    futures = []

    def submitter(t):
        for i in range(400):
            futures.append(ex.submit(ran.append, (t, i)))
            if i % 50 == 0:
                time.sleep(0.002)  # let the worker drain and go to sleep now and then
    threads = [threading.Thread(target=submitter, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    concurrent.futures.wait(futures, timeout=30)
    assert all(f.done() for f in futures)
    assert len(ran) == 1600
    for t in range(4):
        assert [i for s, i in ran if s == t] == list(range(400))
    ex.shutdown()


def _open_fds():
    import os
    return len(os.listdir("/proc/self/fd"))


def test_shutdown_releases_the_wake_up_descriptor():
    before = _open_fds()
    for used in (True, False) * 25:
        ex = CallOrderExecutor()
        if used:
            assert ex.submit(lambda: 7).result(timeout=10) == 7
        ex.shutdown(wait=True, timeout=10)
    assert _open_fds() == before


def test_shutdown_while_the_worker_is_awake_rings_before_the_descriptor_closes(monkeypatch):
    """shutdown() queues None, then rings the eventfd; a worker that is awake (finishing a call)
    can take the None in between and close the eventfd. The ring must not reach the descriptor
    after that: it raised EBADF (once in seven suites: the first test of this file), and could
    have written into whatever file took the number. The ring is slowed here (the real call
    releases the GIL at the same place) so that the worker always gets there first."""
    import os
    real_write = os.eventfd_write

    def slow_write(fd, value):
        time.sleep(0.005)
        return real_write(fd, value)
    monkeypatch.setattr(os, "eventfd_write", slow_write)
    for _ in range(10):
        ex = CallOrderExecutor()
        running = threading.Event()
        done = ex.submit(lambda: (running.set(), time.sleep(0.002)))
        running.wait(10)
        ex.shutdown(wait=True, timeout=10)  # raised OSError(EBADF) every time before the fix
        assert done.result(timeout=10) == (None, None)  # it ran to the end
        assert ex._queue._fd is None  # the worker closed it
