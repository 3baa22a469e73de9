"""A rank for tests/e2e/test_wan.py, run inside an emulated peer's namespace.

    python wan_worker.py JSON   (env: PEER_RANK, PEER_WORLD_SIZE, PEER_IPS from the emulator)

JSON: {"port", "init": {pycoll.init options}, "cases": [...], "go_file", "stall": bool}.
Cases are tests/support/collective_cases.py cases plus a compression name; the
rank prints one line ``RESULT <json>`` with the hex of every output, or, in
stall mode, runs one all-reduce, prints READY, waits for ``go_file`` and
times a second all-reduce that is expected to fail.
"""
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from collective_cases import rank_input  # noqa: E402


def main():
    cfg = json.loads(sys.argv[1])
    import pycoll
    rank, n = int(os.environ["PEER_RANK"]), int(os.environ["PEER_WORLD_SIZE"])
    master = os.environ["PEER_IPS"].split(",")[0]
    comm = pycoll.init(rank=rank, world_size=n, master_addr=master, master_port=cfg["port"], **cfg["init"])
    try:
        if cfg.get("stall"):
            comm.all_reduce(np.ones(1 << 16, np.float32))
            print("READY", flush=True)
            deadline = time.monotonic() + 60
            while not os.path.exists(cfg["go_file"]) and time.monotonic() < deadline:
                time.sleep(0.05)
            x = np.ones(4 << 20, np.float32)
            t = time.monotonic()
            try:
                comm.all_reduce(x)
                outcome = "ok"
            except pycoll.CollectiveError as exc:
                outcome = f"{type(exc).__name__}: {exc}"
            print("RESULT " + json.dumps({"outcome": outcome, "seconds": time.monotonic() - t}), flush=True)
            return
        out = []
        for case in cfg["cases"]:
            coll, dtype, op, count, seed, algorithm, codec = case
            c = tuple(case[:6])
            x = rank_input(c, comm.rank, comm.world_size)
            kw = {"dtype": dtype, "algorithm": algorithm, "compression": codec}
            if coll == "all_reduce":
                comm.all_reduce(x, op=op, **kw)
                res = x
            elif coll == "all_gather":
                res = np.zeros(count * n, dtype=x.dtype)
                comm.all_gather(x, res, **kw)
            else:
                res = np.zeros(count, dtype=x.dtype)
                comm.reduce_scatter(x, res, op=op, **kw)
            out.append(res.tobytes().hex())
        print("RESULT " + json.dumps(out), flush=True)
    finally:
        comm.close()


if __name__ == "__main__":
    main()
