"""All-reduce a NumPy array across the group and check the result.

    pycoll run -n 4 examples/allreduce_numpy.py
"""
import numpy as np

import pycoll

with pycoll.init() as comm:  # RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT from `pycoll run`
    n = comm.world_size
    grad = np.full(1_000_000, comm.rank + 1, dtype=np.float32)
    comm.all_reduce(grad, op="avg")
    expected = (n + 1) / 2
    assert np.all(grad == expected), grad[:4]

    blocks = np.zeros(3 * n, dtype=np.int64)
    comm.all_gather(np.full(3, comm.rank, dtype=np.int64), blocks)

    works = [comm.all_reduce_async(np.ones(1000, np.float64) * i) for i in range(4)]
    totals = [float(w.wait()[0]) for w in works]

    comm.barrier()
    print(f"rank {comm.rank}/{n}: avg={grad[0]} gathered={blocks.tolist()} async={totals}")
