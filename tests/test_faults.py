"""A peer killed mid-collective: every survivor fails fast with PeerFailure
naming the lost peer, its buffer holds its input again, and the next call
runs on the survivors, over the same transport. For every algorithm (new
ones are picked up from pycoll.planners.ALGORITHMS), over shared memory
(what same-host peers use) and over TCP."""
import time

import numpy as np
import pytest

import pycoll
from collective_cases import run_on
from pycoll import planners
from pycoll.testing import KILLED

COUNT = 4 << 20  # 16 MiB of float32: long enough to be killed inside
ALGORITHMS = [a for a in planners.ALGORITHMS if a != "auto"]


def _survive(comm, coll, algorithm):
    rank0 = comm.rank
    x = np.full(COUNT, rank0 + 1, np.float32)
    original = x.copy()
    t0 = time.monotonic()
    err = None
    for _ in range(20):  # the victim dies inside one of these
        try:
            if coll == "all_reduce":
                comm.all_reduce(x, algorithm=algorithm)
            else:
                comm.broadcast(x, root=0, algorithm=algorithm)
            x[:] = original
        except pycoll.PeerFailure as exc:
            err = (str(exc), exc.lost, exc.lost_names)
            break
    detect = time.monotonic() - t0
    intact = bool(np.array_equal(x, original))
    # the next call runs over the survivors
    y = np.full(8, rank0 + 1, np.float64)
    comm.all_reduce(y, algorithm=algorithm)
    return err, detect, intact, comm.world_size, y[0], comm.lost, comm.peer_transports


@pytest.mark.timeout(120)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("coll", ["all_reduce", "broadcast"])
def test_kill_during_collective(coll, algorithm, transport):
    n, victim = 4, 2
    results = run_on(_survive, n, transport, args=(coll, algorithm), timeout=100, kill={victim: f"during:{coll}"},
                     init_kwargs={"timeout": 30, "heartbeat_timeout": 3.0})
    assert results[victim] == KILLED
    survivors = [r for r in range(n) if r != victim]
    lost_names = {results[r][5][0] for r in survivors}
    assert len(lost_names) == 1  # every survivor saw the same peer go
    for r in survivors:
        err, detect, intact, ws, total, _, transports = results[r]
        assert err is not None, f"rank {r} never saw the failure"
        text, lost, names = err
        assert lost == (victim,) and names == tuple(lost_names), f"rank {r}: {err}"
        assert f"rank {victim}" in text
        assert detect < 10
        assert intact, f"rank {r}: buffer not restored"
        assert ws == n - 1
        assert total == sum(q + 1 for q in survivors)
        assert transports.count(transport) == n - 2, f"rank {r}: the survivors use {transports}"
