"""Elastic data-parallel training that survives churn (NumPy, DiLoCo-style).

Each peer trains a linear model on its own data for a few local steps, then
the group averages the parameter change (the "pseudo-gradient") with
``retry=True`` and applies an outer Nesterov step. Peers may crash, be
killed or join at any time:

* a peer lost inside the all-reduce makes the group redo it over the
  survivors (the average is over whoever contributed);
* joiners are admitted at ``update_topology()`` and receive the model and
  the optimizer state from the majority in ``sync_shared_state``;
* if the coordinator is restarted at the same address, peers re-register
  and carry on (``coordinator_wait``).

Run a coordinator, then start and kill peers as you like:

    pycoll master --port 29500 &
    for i in 0 1 2; do python examples/elastic_numpy.py --master-port 29500 & done
    python examples/elastic_numpy.py --master-port 29500   # joins the running group

Or let ``pycoll run`` start them and replace the ones that die (kill one: its replacement
joins and is healed; docs/elastic-launch.md):

    pycoll run --elastic -n 3 examples/elastic_numpy.py --pause 0.05

Or let ``examples/elastic_demo.py`` do the churn for you.
"""
import argparse
import os
import time
import zlib

import numpy as np

import pycoll

DIM = 256


def make_problem():
    """A fixed regression problem every peer knows (its data shard differs)."""
    rng = np.random.default_rng(0)
    w_true = rng.standard_normal(DIM)
    x_eval = rng.standard_normal((512, DIM))
    return w_true, x_eval, x_eval @ w_true


def batch(rng, w_true, size=64):
    x = rng.standard_normal((size, DIM))
    return x, x @ w_true + 0.1 * rng.standard_normal(size)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--master-addr", default=os.environ.get("MASTER_ADDR", "127.0.0.1"))
    # `pycoll run` puts its coordinator on PYCOLL_MASTER_PORT (MASTER_PORT is torch.distributed's)
    ap.add_argument("--master-port", type=int,
                    default=int(os.environ.get("PYCOLL_MASTER_PORT") or os.environ.get("MASTER_PORT") or 29500))
    ap.add_argument("--steps", type=int, default=100, help="outer steps (all-reduces) to train for")
    ap.add_argument("--inner", type=int, default=5, help="local SGD steps per outer step")
    ap.add_argument("--name", default=None, help="peer name (default under `pycoll run --elastic`: "
                    "rank<RANK>.<PYCOLL_RESTART_COUNT>, else random)")
    ap.add_argument("--pause", type=float, default=0.0, help="seconds of extra 'compute' per step")
    args = ap.parse_args()

    w_true, x_eval, y_eval = make_problem()
    name = args.name
    if name is None and "PYCOLL_RESTART_COUNT" in os.environ:  # a worker of `pycoll run --elastic`
        name = f"rank{os.environ['RANK']}.{os.environ['PYCOLL_RESTART_COUNT']}"  # unique: a replacement's differs
    comm = pycoll.connect(args.master_addr, args.master_port, name=name, coordinator_wait=60)
    data = np.random.default_rng(zlib.crc32(comm.name.encode()))
    state = {"w": np.zeros(DIM), "momentum": np.zeros(DIM)}
    revision = -1  # nothing yet: the group's state wins
    print(f"{comm.name}: admitted as rank {comm.rank} of {comm.world_size}", flush=True)
    while True:
        try:
            res = comm.sync_shared_state(state, revision)
            if res.fetched:
                print(f"{comm.name}: received {res.fetched} ({res.bytes_received} bytes) "
                      f"at step {res.revision}", flush=True)
            revision = res.revision
            if revision >= args.steps:
                break
            w = state["w"].copy()
            for _ in range(args.inner):
                x, y = batch(data, w_true)
                w -= 0.02 * x.T @ (x @ w - y) / len(y)
            time.sleep(args.pause)
            delta = state["w"] - w  # this peer's pseudo-gradient
            comm.all_reduce(delta, op="avg", retry=True)
            # Outer Nesterov step: identical inputs on every peer give identical bits.
            state["momentum"] *= 0.9
            state["momentum"] += delta
            state["w"] -= 0.7 * (delta + 0.9 * state["momentum"])
            revision = max(revision, 0) + 1
            if comm.rank == 0 and revision % 10 == 0:
                loss = float(np.mean((x_eval @ state["w"] - y_eval) ** 2))
                out = comm.last_outcome
                print(f"step {revision:4d}  loss {loss:10.5f}  peers {len(out.contributors)}"
                      + (f"  (retried without {list(out.lost)})" if out.lost else ""), flush=True)
            comm.update_topology()
        except pycoll.CoordinatorError as exc:
            print(f"{comm.name}: {exc}; waiting for a coordinator to come back", flush=True)
    loss = float(np.mean((x_eval @ state["w"] - y_eval) ** 2))
    print(f"{comm.name}: done at step {revision}, loss {loss:.5f}", flush=True)
    comm.close()


if __name__ == "__main__":
    main()
