"""A peer for the cut-link tests (tests/e2e/test_cut_links.py), run as a script:

    python netcut_peer.py HOST PORT NAME LOGFILE HEARTBEAT

Loops all_reduce(retry=True) of its own value (from its name) and update_topology(), logging one
JSON line per step (world, members, the result, whether it is exact over the contributors) until
LOGFILE + ".stop" exists, or the coordinator excludes it (logged as "excluded"). Its data address
comes from PYCOLL_ADDR."""
import json
import os
import sys
import time

import numpy as np


def value(name):
    return float(sum(map(ord, name)) % 97 + 1)


def main():
    host, port, name, path, hb = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], float(sys.argv[5])
    import pycoll
    comm = pycoll.connect(host, port, name=name, heartbeat_timeout=hb, timeout=60, transport="tcp", join_timeout=60)
    with open(path, "a", buffering=1) as log:
        log.write(json.dumps({"event": "ready", "t": time.time()}) + "\n")
        while not os.path.exists(path + ".stop"):
            x = np.full(1 << 14, value(name))
            try:
                comm.all_reduce(x, retry=True)
                who = list(comm.last_outcome.contributors)
                comm.update_topology()
            except pycoll.CollectiveError as exc:
                log.write(json.dumps({"event": "excluded", "t": time.time(), "why": str(exc)[:500],
                                      "kind": type(exc).__name__}) + "\n")
                os._exit(0)  # (close() would wait for a coordinator we cannot reach)
            log.write(json.dumps({"event": "step", "t": time.time(), "world": comm.world_size, "contributors": who,
                                  "exact": bool(np.all(x == sum(value(n) for n in who)))}) + "\n")
            time.sleep(0.01)
    comm.close()


if __name__ == "__main__":
    main()
