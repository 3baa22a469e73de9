"""DiLoCo's outer step on loopback: pycoll.train.DiLoCo (sync, async, int8) vs the same loop on Gloo.

    python bench/diloco.py                          # 3 ranks, a 4-layer 1024-wide MLP (16 MiB of float32)
    python bench/diloco.py --ranks 4 --width 2048 --rounds 10 --json out.json

Every rank is a local process with one torch thread; it trains an MLP of --layers Linear(--width,
--width) + ReLU blocks on random regression batches of --batch rows with AdamW for --sync-every
inner steps per round, then takes an outer step (Nesterov SGD on the averaged pseudo-gradients).
The variants:
  gloo          the loop by hand on torch.distributed Gloo: all_reduce(SUM) of the flat
                pseudo-gradient, divide, outer step (pycoll.train.outer.nesterov_), load;
  pycoll-sync   pycoll.train.DiLoCo(mode="sync"): the same, with all_reduce(retry=True) over the
                contributors, then the sync point (update_topology + sync_shared_state: hashes of
                the shared state compared through the coordinator; nothing moves when they agree);
  pycoll-async  mode="async": the all-reduce runs during the next round's inner steps;
  pycoll-int8   mode="sync" with int8 pseudo-gradients on the wire.
"inner" is a round's inner steps, "blocking" the time a rank spends outside them per outer step,
"round" the wall time per round (each the slowest rank's, median over the rounds after the first). Ratios are to Gloo.
The variants run one after another, in the order given, on the same host and load.
"""
import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.abspath(__file__)
VARIANTS = ("gloo", "pycoll-sync", "pycoll-async", "pycoll-int8")


def rank_main(a):
    signal.alarm(int(a.timeout) + 30)  # die on our own if the driver is gone or stuck
    sys.path.insert(0, ROOT)
    import torch
    torch.set_num_threads(1)
    torch.manual_seed(0)
    layers = []
    for _ in range(a.layers):
        layers += [torch.nn.Linear(a.width, a.width), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers[:-1])
    inner = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(a.rank)
    target = torch.nn.Linear(a.width, a.width)

    def inner_steps(step_fn):
        for _ in range(a.sync_every):
            x = torch.randn(a.batch, a.width, generator=g)
            with torch.no_grad():
                y = target(x)
            torch.nn.functional.mse_loss(model(x), y).backward()
            step_fn()

    blocking, rounds, inner_only = [], [], []
    if a.variant == "gloo":
        import datetime

        import torch.distributed as dist

        from pycoll.train.outer import nesterov_
        dist.init_process_group("gloo", rank=a.rank, world_size=a.ranks, init_method=f"tcp://127.0.0.1:{a.port}",
                                timeout=datetime.timedelta(seconds=a.timeout))
        params = list(model.parameters())
        shared = torch.cat([p.detach().reshape(-1) for p in params])
        momentum, delta = torch.zeros_like(shared), torch.zeros_like(shared)

        def step():
            inner.step()
            inner.zero_grad()
        dist.barrier()
        for _ in range(a.rounds):
            t0 = time.perf_counter()
            inner_steps(step)
            t1 = time.perf_counter()
            with torch.no_grad():
                torch.cat([p.detach().reshape(-1) for p in params], out=delta)
                torch.sub(shared, delta, out=delta)
                dist.all_reduce(delta)
                delta.div_(a.ranks)
                nesterov_(shared, momentum, delta, 0.7, 0.9)
                offset = 0
                for p in params:
                    p.copy_(shared[offset:offset + p.numel()].view_as(p))
                    offset += p.numel()
            t2 = time.perf_counter()
            blocking.append(t2 - t1)
            rounds.append(t2 - t0)
            inner_only.append(t1 - t0)
        dist.destroy_process_group()
    else:
        import pycoll
        from pycoll.train import DiLoCo
        comm = pycoll.init(a.rank, a.ranks, "127.0.0.1", a.port, timeout=a.timeout)
        mode = "async" if a.variant == "pycoll-async" else "sync"
        diloco = DiLoCo(model, inner, comm, sync_every=a.sync_every, mode=mode,
                        compression="int8" if a.variant == "pycoll-int8" else None)
        comm.barrier()
        for _ in range(a.rounds):
            t0 = time.perf_counter()
            done = []
            inner_steps(lambda: done.append(diloco.step()))
            t1 = time.perf_counter()
            blocking.append(done[-1].seconds)
            rounds.append(t1 - t0)
            inner_only.append(t1 - t0 - done[-1].seconds)
        diloco.finish()
        comm.close()
    with open(a.out, "w") as f:
        json.dump({"blocking": blocking, "rounds": rounds, "inner": inner_only}, f)


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_variant(a, variant, tmp):
    port = _free_port()
    outs = [os.path.join(tmp, f"{variant}-{r}.json") for r in range(a.ranks)]
    env = dict(os.environ, TORCH_DEVICE_BACKEND_AUTOLOAD="0", PYTHONPATH=ROOT)
    procs = [subprocess.Popen([sys.executable, HERE, "--rank-main", "--variant", variant, "--rank", str(r),
                               "--port", str(port), "--out", outs[r]] + _shared_args(a), env=env)
             for r in range(a.ranks)]
    try:
        deadline = time.monotonic() + a.timeout
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        return None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if any(p.returncode for p in procs):
        return None
    per_rank = [json.load(open(o)) for o in outs]
    blocking = [max(r["blocking"][i] for r in per_rank) for i in range(1, a.rounds)]
    rounds = [max(r["rounds"][i] for r in per_rank) for i in range(1, a.rounds)]
    inner = [max(r["inner"][i] for r in per_rank) for i in range(1, a.rounds)]
    return {"blocking": statistics.median(blocking), "round": statistics.median(rounds),
            "inner": statistics.median(inner)}


def _shared_args(a):
    return ["--ranks", str(a.ranks), "--width", str(a.width), "--layers", str(a.layers), "--batch", str(a.batch),
            "--sync-every", str(a.sync_every), "--rounds", str(a.rounds), "--timeout", str(a.timeout)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, default=3)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--sync-every", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--rank-main", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.rank_main:
        return rank_main(a)
    mib = a.layers * (a.width * a.width + a.width) * 4 / 2**20
    print(f"{a.ranks} ranks, {mib:.1f} MiB of float32 parameters, H={a.sync_every}, {a.rounds} rounds "
          f"(medians over rounds 2..{a.rounds}, slowest rank)")
    results = {}
    with tempfile.TemporaryDirectory(prefix="pycoll-diloco-") as tmp:
        for variant in a.variants.split(","):
            results[variant] = run_variant(a, variant, tmp)
    base = results.get("gloo")
    print(f"{'variant':14s} {'inner ms':>9s} {'blocking ms':>12s} {'round ms':>10s} {'blocking/gloo':>14s} "
          f"{'round/gloo':>11s}")
    for variant, r in results.items():
        if r is None:
            print(f"{variant:14s} failed or timed out")
            continue
        ratio = (lambda k: f"{r[k] / base[k]:.2f}" if base else "-")
        print(f"{variant:14s} {r['inner'] * 1e3:9.1f} {r['blocking'] * 1e3:12.1f} {r['round'] * 1e3:10.1f} {ratio('blocking'):>14s} "
              f"{ratio('round'):>11s}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
