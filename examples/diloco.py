"""DiLoCo on pycoll: peers that train a small MLP, survive deaths and admit joiners, no restart.

The task ships here: a fixed random "teacher" network labels random inputs with one of 10
classes, and a student MLP learns it; each peer draws its own batches. Every peer runs the
ordinary loop ``loss.backward(); diloco.step()``; pycoll.train.DiLoCo averages the pseudo-
gradients every --sync-every steps over the peers that contributed and keeps the shared state
(parameters, outer momentum, counters) bit-identical on all of them (docs/diloco.md).

    pycoll master --port 29500 --world-size 3 &
    for i in 0 1 2; do python examples/diloco.py --master-port 29500 --name peer$i & done
    # kill one (kill -9 <pid>): the others go on; start another: it joins at the next outer step
    python examples/diloco.py --master-port 29500 --name late

Options: --mode async (the all-reduce overlaps the next round; try --outer-lr 0.5 --momentum 0.3),
--mode streaming --fragments 2, --compression bf16|int8, --stripes 4.
"""
import argparse
import os
import time
import zlib

import torch

import pycoll
from pycoll.train import DiLoCo

IN, CLASSES, BATCH = 32, 10, 64


def teacher():
    g = torch.Generator().manual_seed(7)
    net = torch.nn.Sequential(torch.nn.Linear(IN, 64), torch.nn.Tanh(), torch.nn.Linear(64, CLASSES))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return net


def batches(seed, label, size=BATCH):
    g = torch.Generator().manual_seed(seed)
    while True:
        x = torch.randn(size, IN, generator=g)
        with torch.no_grad():
            y = label(x).argmax(dim=1)
        yield x, y


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--master-addr", default=os.environ.get("MASTER_ADDR", "127.0.0.1"))
    ap.add_argument("--master-port", type=int, default=int(os.environ.get("MASTER_PORT", "29500")))
    ap.add_argument("--name", default=None)
    ap.add_argument("--mode", choices=["sync", "async", "streaming"], default="sync")
    ap.add_argument("--sync-every", type=int, default=20, help="inner steps per round (H)")
    ap.add_argument("--rounds", type=int, default=30, help="outer rounds to train for")
    ap.add_argument("--fragments", type=int, default=None, help="streaming: parameter fragments")
    ap.add_argument("--outer-lr", type=float, default=0.7)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--compression", default=None, help="the pseudo-gradients' wire codec: bf16, int8, fp16")
    ap.add_argument("--stripes", type=int, default=None, help="connections per peer pair (slow links)")
    args = ap.parse_args()
    torch.set_num_threads(1)  # several peers share this host's cores in the demo

    # Model and optimizer first: a fresh process's first optimizer imports torch's compiler stack
    # (seconds), which a joiner must not do after its admission while the members wait to heal it.
    torch.manual_seed(0)  # the founders start from the same weights (a joiner receives the group's)
    model = torch.nn.Sequential(torch.nn.Linear(IN, 128), torch.nn.ReLU(), torch.nn.Linear(128, CLASSES))
    inner = torch.optim.AdamW(model.parameters(), lr=3e-3)
    comm = pycoll.connect(args.master_addr, args.master_port, name=args.name, stripes=args.stripes,
                          coordinator_wait=60)
    print(f"{comm.name}: admitted as rank {comm.rank} of {comm.world_size}", flush=True)
    diloco = DiLoCo(model, inner, comm, sync_every=args.sync_every, mode=args.mode, fragments=args.fragments,
                    outer_lr=args.outer_lr, momentum=args.momentum, compression=args.compression)
    if diloco.revision:
        print(f"{comm.name}: joined at outer step {diloco.revision}, received {diloco.last_round.fetched}",
              flush=True)
    label = teacher()
    data = batches(zlib.crc32(comm.name.encode()), label)
    x_eval, y_eval = next(batches(12345, label, 2048))
    per_round = args.sync_every // (args.fragments or (4 if args.mode == "streaming" else 1))
    t0 = time.perf_counter()
    while diloco.inner_steps < args.rounds * args.sync_every:
        x, y = next(data)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        done = diloco.step()
        if done is not None and comm.rank == 0 and done.revision % max(1, args.sync_every // per_round) == 0:
            with torch.no_grad():
                acc = (model(x_eval).argmax(dim=1) == y_eval).float().mean().item()
            print(f"outer step {done.revision:4d}  inner step {done.step:5d}  eval accuracy {acc:6.1%}  "
                  f"peers {len(done.contributors) or comm.world_size}  waited {done.seconds * 1e3:6.1f} ms"
                  + (f"  joined {done.joined}" if done.joined else "") + (f"  lost {done.lost}" if done.lost else ""),
                  flush=True)
    diloco.finish()
    with torch.no_grad():
        acc = (model(x_eval).argmax(dim=1) == y_eval).float().mean().item()
    print(f"{comm.name}: done at outer step {diloco.revision} in {time.perf_counter() - t0:.1f} s, "
          f"eval accuracy {acc:.1%}", flush=True)
    comm.close()


if __name__ == "__main__":
    main()
