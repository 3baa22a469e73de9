"""A peer killed mid-collective: every survivor fails fast with PeerFailure
naming the lost peer, its buffer holds its input again, and the next call
runs on the survivors, over the same transport. For every algorithm (new
ones are picked up from pycoll.plan.planners.ALGORITHMS), over shared memory
(what same-host peers use) and over TCP."""
import time

import numpy as np
import pytest

import pycoll
from collective_cases import run_on
from pycoll.plan import planners
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


# ---- a peer lost while an epoch is being installed (its cost model measured) -------------------
CALIBRATION_CALLS = 14  # costmodel.calibrate: 1 warm-up, 10 tiny, 2 of 1 MiB, 1 to agree


def _loss_while_calibrating(comm):
    out = []
    for _ in range(6):
        x = np.ones(4, np.float32)
        try:
            comm.all_reduce(x)
            out.append(float(x[0]))
        except pycoll.PeerFailure:
            out.append("failed")
    return out, comm.world_size, comm.epoch, comm.epoch_state.selector().model().source


@pytest.mark.timeout(120)
def test_a_peer_lost_while_the_epoch_calibrates():
    """Rank 3 dies at its third call; the survivors re-form, and rank 2 dies in the middle of
    the new epoch's calibration (which runs when the epoch is installed): like a death while
    the mesh is built, the epoch is reported failed and the group syncs again, so the call
    that re-formed it runs over the last two ranks, with a measured cost model."""
    results = pycoll.testing.run(_loss_while_calibrating, 4, timeout=100,
                                 kill={3: ("before:all_reduce", 3), 2: ("calibrate", CALIBRATION_CALLS + 5)},
                                 init_kwargs={"timeout": 30, "heartbeat_timeout": 3.0})
    assert results[2] == KILLED and results[3] == KILLED
    for r in (0, 1):
        out, ws, epoch, source = results[r]
        assert out == [4.0, 4.0, "failed", 2.0, 2.0, 2.0], f"rank {r}: {out}"
        assert ws == 2 and epoch >= 3 and source == "measured", results[r]
