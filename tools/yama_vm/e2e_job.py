"""Run by tools/yama_vm/e2e.sh inside its VM: 3 sibling ranks over shared memory."""
import numpy as np

import pycoll.testing


def job(comm):
    x = np.arange(1 << 20, dtype=np.float32) * (comm.rank + 1)  # 4 MiB: single copy's size
    comm.all_reduce(x)
    want = np.arange(1 << 20, dtype=np.float32) * sum(r + 1 for r in range(comm.world_size))
    return comm.bytes_single_copy, bool(np.array_equal(x, want))


if __name__ == "__main__":
    with open("/proc/self/status") as f:
        caps = [line.split()[1] for line in f if line.startswith(("Uid", "CapEff"))]
    results = pycoll.testing.run(job, 3, timeout=600, init_kwargs={"transport": "shm"})
    print("uid/CapEff", caps, "ranks (bytes single-copied, exact):", results)
    ok = all(copied > 0 and exact for copied, exact in results)
    print("SINGLE COPY UNDER YAMA:", "ok" if ok else "FAILED")
