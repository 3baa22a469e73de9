"""Fault-tolerant data-parallel training with pycoll.train.FaultTolerantDDP: kill peers, start
new ones, the others keep training (no restart) and newcomers are healed before their first step.

The task ships with the script: a student MLP learns a fixed random teacher MLP (regression on
Gaussian inputs); each peer draws its own batches. The loop is an ordinary torch loop.

With a coordinator of its own (any peer may die, the coordinator too: a member succeeds it):

    pycoll master --port 29500 --world-size 3 &
    for i in 0 1 2; do python examples/ft_ddp.py --master-port 29500 & done
    python examples/ft_ddp.py --master-port 29500        # later: a peer joins, is healed, trains

Or as a fixed group first (rank 0 hosts the coordinator; it may die too), joiners as above:

    for r in 0 1 2 3; do python examples/ft_ddp.py --rank $r --world-size 4 --master-port 29500 & done

``--die-at K`` makes this peer SIGKILL itself at step K (try it on rank 0); ``--checkpoint F``
saves the training state (model, optimizer, scheduler, step) to F every 50 steps on rank 0, and
``--resume F`` starts from such a file: the peers started without it receive it when the group
forms (the highest step wins).
"""
import argparse
import os
import signal
import time
import zlib

import torch

import pycoll
from pycoll.train import FaultTolerantDDP

DIM, HIDDEN = 32, 256


def teacher():
    g = torch.Generator().manual_seed(1234)
    w1, w2 = torch.randn(DIM, 64, generator=g) / DIM ** 0.5, torch.randn(64, 1, generator=g)
    return lambda x: torch.tanh(x @ w1) @ w2


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--master-addr", default=os.environ.get("MASTER_ADDR", "127.0.0.1"))
    ap.add_argument("--master-port", type=int, default=int(os.environ.get("MASTER_PORT", "29500")))
    ap.add_argument("--rank", type=int, default=None, help="with --world-size: a fixed group (pycoll.init)")
    ap.add_argument("--world-size", type=int, default=None)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--die-at", type=int, default=None, help="SIGKILL this peer at that step (a demo)")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--resume", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)

    # Model and optimizer first: a fresh process's first optimizer imports torch's compiler stack
    # (seconds), which a joiner must not do after its admission while the members wait to heal it.
    torch.manual_seed(0)  # the same initial model everywhere (a joiner receives the trained one)
    net = torch.nn.Sequential(torch.nn.Linear(DIM, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, HIDDEN),
                              torch.nn.Tanh(), torch.nn.Linear(HIDDEN, 1))
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
    if args.rank is not None:
        comm = pycoll.init(args.rank, args.world_size, args.master_addr, args.master_port, heartbeat_timeout=5,
                           preserve_input=False)
    else:  # (preserve_input=False: see pycoll.train.ddp, "Speed")
        comm = pycoll.connect(args.master_addr, args.master_port, heartbeat_timeout=5, coordinator_wait=60,
                              preserve_input=False)
    ckpt = torch.load(args.resume) if args.resume else None
    # every member makes it at once (a joiner on arrival): the joiner is healed here
    model = FaultTolerantDDP(net, opt, comm, scheduler=sched, checkpoint=ckpt)
    heal = model.last_heal
    print(f"{comm.name}: rank {comm.rank} of {comm.world_size} at step {model.step}"
          + (f", healed: {heal.bytes_received} bytes from ranks {sorted({r for v in heal.sources.values() for r in v})}"
             if heal.fetched else ""), flush=True)

    f = teacher()
    data = torch.Generator().manual_seed(zlib.crc32(comm.name.encode()))  # this peer's own batches
    g_eval = torch.Generator().manual_seed(99)
    x_eval = torch.randn(1024, DIM, generator=g_eval)
    t0 = time.monotonic()
    while model.step < args.steps:
        model.optimizer.zero_grad()  # the sync point: joiners admitted and healed, the dead dropped
        if args.die_at is not None and model.step == args.die_at:
            print(f"{comm.name}: dying at step {model.step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        x = torch.randn(args.batch, DIM, generator=data)
        loss = torch.nn.functional.mse_loss(model(x), f(x))
        loss.backward()
        report = model.optimizer.step()
        if comm.rank == 0 and (model.step % 50 == 0 or not report.applied):
            with torch.no_grad():
                ev = torch.nn.functional.mse_loss(net(x_eval), f(x_eval)).item()
            print(f"step {model.step:4d}  eval loss {ev:.5f}  peers {comm.world_size}  lr {sched.get_last_lr()[0]:.2e}"
                  f"  {'applied' if report.applied else 'DISCARDED'}  {time.monotonic() - t0:.1f} s", flush=True)
            if args.checkpoint and model.step % 50 == 0:
                torch.save(model.state_dict(), args.checkpoint)
    with torch.no_grad():
        ev = torch.nn.functional.mse_loss(net(x_eval), f(x_eval)).item()
    print(f"{comm.name}: done at step {model.step}, eval loss {ev:.5f}, state digest {model.state.digest():016x}",
          flush=True)
    model.close()
    comm.close()


if __name__ == "__main__":
    main()
