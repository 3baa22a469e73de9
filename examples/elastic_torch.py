"""Elastic DiLoCo-style training with torch that survives churn.

The same loop as elastic_numpy.py with a torch model: an inner AdamW on the
peer's own data for a few steps, then the pseudo-gradient (the change of
each parameter) is averaged with ``retry=True`` and an outer Nesterov SGD
step is applied. The model and the outer optimizer's momentum are the
shared state: newcomers receive both, bit for bit, in ``sync_shared_state``.

    pycoll master --port 29500 &
    for i in 0 1 2; do python examples/elastic_torch.py --master-port 29500 & done
"""
import argparse
import os
import zlib

import torch

import pycoll


def make_problem():
    g = torch.Generator().manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    for p in teacher.parameters():
        p.data = torch.randn(p.shape, generator=g)
    x_eval = torch.randn(512, 32, generator=g)
    with torch.no_grad():
        return teacher, x_eval, teacher(x_eval)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--master-addr", default=os.environ.get("MASTER_ADDR", "127.0.0.1"))
    ap.add_argument("--master-port", type=int, default=int(os.environ.get("MASTER_PORT", "29500")))
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--inner", type=int, default=8)
    ap.add_argument("--name", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)  # every peer starts from the same weights
    teacher, x_eval, y_eval = make_problem()
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    params = [p.data for p in model.parameters()]
    outer = torch.optim.SGD(model.parameters(), lr=0.7, momentum=0.9, nesterov=True)
    for p in model.parameters():  # materialize the momentum buffers so they can be shared
        outer.state[p]["momentum_buffer"] = torch.zeros_like(p)
    state = {f"param{i}": t for i, t in enumerate(params)}
    state.update({f"momentum{i}": outer.state[p]["momentum_buffer"] for i, p in enumerate(model.parameters())})

    comm = pycoll.connect(args.master_addr, args.master_port, name=args.name, coordinator_wait=60)
    g = torch.Generator().manual_seed(zlib.crc32(comm.name.encode()))
    print(f"{comm.name}: admitted as rank {comm.rank} of {comm.world_size}", flush=True)
    revision = -1
    while True:
        try:
            res = comm.sync_shared_state(state, revision)
            if res.fetched:
                print(f"{comm.name}: received {len(res.fetched)} tensors ({res.bytes_received} bytes) "
                      f"at step {res.revision}", flush=True)
            revision = res.revision
            if revision >= args.steps:
                break
            start = [t.clone() for t in params]
            inner = torch.optim.AdamW(model.parameters(), lr=3e-3)
            for _ in range(args.inner):
                x = torch.randn(64, 32, generator=g)
                with torch.no_grad():
                    y = teacher(x)
                loss = torch.nn.functional.mse_loss(model(x), y)
                inner.zero_grad()
                loss.backward()
                inner.step()
            deltas = [s - t for s, t in zip(start, params)]  # pseudo-gradients
            for t, s in zip(params, start):
                t.copy_(s)  # back to the shared weights before the outer step
            flat = torch.cat([d.flatten() for d in deltas])
            comm.all_reduce(flat, op="avg", retry=True)
            for p, d in zip(model.parameters(), torch.split(flat, [d.numel() for d in deltas])):
                p.grad = d.view_as(p).clone()
            outer.step()
            revision = max(revision, 0) + 1
            if comm.rank == 0 and revision % 10 == 0:
                with torch.no_grad():
                    ev = torch.nn.functional.mse_loss(model(x_eval), y_eval).item()
                print(f"step {revision:4d}  eval loss {ev:10.5f}  peers {len(comm.last_outcome.contributors)}",
                      flush=True)
            comm.update_topology()
        except pycoll.CoordinatorError as exc:
            print(f"{comm.name}: {exc}; waiting for a coordinator to come back", flush=True)
    with torch.no_grad():
        ev = torch.nn.functional.mse_loss(model(x_eval), y_eval).item()
    print(f"{comm.name}: done at step {revision}, eval loss {ev:.5f}", flush=True)
    comm.close()


if __name__ == "__main__":
    main()
