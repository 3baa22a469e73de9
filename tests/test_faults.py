"""A peer killed mid-collective: every survivor fails fast with PeerFailure,
its buffer holds its input again, and the next call runs on the survivors."""
import time

import numpy as np
import pytest

import pycoll
import pycoll.testing
from pycoll.testing import KILLED

COUNT = 4 << 20  # 16 MiB of float32: long enough to be killed inside


def _survive(comm, coll):
    rank0 = comm.rank
    x = np.full(COUNT, rank0 + 1, np.float32)
    original = x.copy()
    t0 = time.monotonic()
    err = None
    for _ in range(20):  # the victim dies inside one of these
        try:
            if coll == "all_reduce":
                comm.all_reduce(x)
                x[:] = original
            else:
                comm.broadcast(x, root=0 if rank0 != 0 else 0)
                x[:] = original
        except pycoll.PeerFailure as exc:
            err = str(exc)
            break
    detect = time.monotonic() - t0
    intact = bool(np.array_equal(x, original))
    # the next call runs over the survivors
    y = np.full(8, rank0 + 1, np.float64)
    comm.all_reduce(y)
    return err, detect, intact, comm.world_size, y[0]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("coll", ["all_reduce", "broadcast"])
def test_kill_during_collective(coll):
    n, victim = 4, 2
    results = pycoll.testing.run(_survive, n, args=(coll,), timeout=100, kill={victim: f"during:{coll}"},
                                 init_kwargs={"timeout": 30, "heartbeat_timeout": 3.0})
    assert results[victim] == KILLED
    survivors = [r for r in range(n) if r != victim]
    for r in survivors:
        err, detect, intact, ws, total = results[r]
        assert err is not None, f"rank {r} never saw the failure"
        assert detect < 10
        assert intact, f"rank {r}: buffer not restored"
        assert ws == n - 1
        assert total == sum(q + 1 for q in survivors)
