"""Elastic DiLoCo with torch that survives churn, on pycoll.train.DiLoCo.

The loop of elastic_numpy.py with a torch model, written the way a torch user would: an inner
AdamW on the peer's own data, ``diloco.step()`` after each backward; every --inner steps DiLoCo
averages the pseudo-gradients over the peers that contributed (``all_reduce(retry=True)``),
takes the outer Nesterov step and admits joiners, which receive the model and the outer
momentum bit for bit (``sync_shared_state``). docs/diloco.md; examples/diloco.py has more options.

    pycoll master --port 29500 &
    for i in 0 1 2; do python examples/elastic_torch.py --master-port 29500 & done
"""
import argparse
import os
import zlib

import torch

import pycoll
from pycoll.train import DiLoCo


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
    ap.add_argument("--steps", type=int, default=100, help="outer steps")
    ap.add_argument("--inner", type=int, default=8, help="inner steps per outer step")
    ap.add_argument("--name", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)  # every peer starts from the same weights
    teacher, x_eval, y_eval = make_problem()
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))

    comm = pycoll.connect(args.master_addr, args.master_port, name=args.name, coordinator_wait=60)
    print(f"{comm.name}: admitted as rank {comm.rank} of {comm.world_size}", flush=True)
    diloco = DiLoCo(model, torch.optim.AdamW(model.parameters(), lr=3e-3), comm, sync_every=args.inner,
                    outer_lr=0.7, momentum=0.9)
    if diloco.revision:
        print(f"{comm.name}: received {len(diloco.last_round.fetched)} tensors at step {diloco.revision}", flush=True)
    g = torch.Generator().manual_seed(zlib.crc32(comm.name.encode()))
    while diloco.revision < args.steps:
        x = torch.randn(64, 32, generator=g)
        with torch.no_grad():
            y = teacher(x)
        torch.nn.functional.mse_loss(model(x), y).backward()
        done = diloco.step()
        if done is not None and comm.rank == 0 and done.revision % 10 == 0:
            with torch.no_grad():
                ev = torch.nn.functional.mse_loss(model(x_eval), y_eval).item()
            print(f"step {done.revision:4d}  eval loss {ev:10.5f}  peers {len(done.contributors)}", flush=True)
    diloco.finish()
    with torch.no_grad():
        ev = torch.nn.functional.mse_loss(model(x_eval), y_eval).item()
    print(f"{comm.name}: done at step {diloco.revision}, eval loss {ev:.5f}", flush=True)
    comm.close()


if __name__ == "__main__":
    main()
