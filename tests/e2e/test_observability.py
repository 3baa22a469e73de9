"""Per-collective stats on the communicator, their summary, and PYCOLL_LOG."""
import logging

import numpy as np
import pytest

import pycoll
import pycoll.testing
from pycoll.observability import configure_logging, format_stats, summarize


def _some_collectives(comm):
    comm.stats.clear()
    comm.all_reduce(np.ones(1000, np.float32), algorithm="ring")
    comm.all_reduce(np.ones(10, np.float64), op="max", algorithm="ring")
    out = np.zeros(2 * comm.world_size, np.int32)
    comm.all_gather(np.ones(2, np.int32), out, algorithm="ring")
    comm.broadcast(np.ones(7, np.int8), root=1, algorithm="ring")
    comm.barrier()
    stats = [tuple(s) for s in comm.stats]
    comm.all_reduce(np.ones(5, np.float32))  # auto: the stat names the algorithm it chose
    return stats, summarize(list(comm.stats)[:5]), format_stats(list(comm.stats)[:5]), comm.stats[-1].algorithm


@pytest.mark.timeout(60)
def test_stats_record_every_collective():
    stats, summary, table, chosen = pycoll.testing.run(_some_collectives, 3, timeout=50)[1]
    assert chosen in pycoll.plan.planners.ALGORITHMS and chosen != "auto"
    assert [(s[0], s[1], s[2], s[4], s[6]) for s in stats] == [
        ("all_reduce", "ring", 4000, 3, True), ("all_reduce", "ring", 80, 3, True),
        ("all_gather", "ring", 24, 3, True), ("broadcast", "ring", 7, 3, True), ("barrier", "ring", 0, 3, True)]
    assert all(s[3] > 0 and s[5] == 1 for s in stats)  # seconds, epoch
    by = {(r["op"], r["algorithm"]): r for r in summary}
    assert by[("all_reduce", "ring")]["calls"] == 2 and by[("all_reduce", "ring")]["bytes"] == 4080
    assert by[("barrier", "ring")]["failed"] == 0
    row = [x for x in table.splitlines() if x.startswith("all_reduce")][0].split()
    assert row[:5] == ["all_reduce", "ring", "2", "0", "4.0"]


def _fail(comm):
    comm.stats.clear()
    x = np.ones(1 << 20, np.float32)
    for _ in range(20):
        try:
            comm.all_reduce(x)
        except pycoll.PeerFailure:
            break
    return [(s.op, s.ok, s.world_size) for s in comm.stats]


@pytest.mark.timeout(90)
def test_a_failed_collective_is_recorded():
    out = pycoll.testing.run(_fail, 3, timeout=80, kill={2: ("before:all_reduce", 3)},
                             init_kwargs={"heartbeat_timeout": 3.0, "timeout": 30})
    for r in (0, 1):
        assert out[r][:2] == [("all_reduce", True, 3)] * 2
        assert out[r][-1] == ("all_reduce", False, 3)


def test_configure_logging(monkeypatch):
    logger = logging.getLogger("pycoll")
    old = logger.level
    try:
        assert configure_logging("debug") == logging.DEBUG and logger.level == logging.DEBUG
        monkeypatch.setenv("PYCOLL_LOG", "error")
        assert configure_logging() == logging.ERROR and logger.level == logging.ERROR
        monkeypatch.delenv("PYCOLL_LOG")
        assert configure_logging() is None
        with pytest.raises(ValueError, match="PYCOLL_LOG"):
            configure_logging("loud")
    finally:
        logger.setLevel(old)
