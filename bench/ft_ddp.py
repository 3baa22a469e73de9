"""FT-DDP without failures against plain DDP, one run: ms per training step.

    python bench/ft_ddp.py                          # 2 and 4 ranks, MLP 4 x 1024 wide, batch 32
    python bench/ft_ddp.py --ranks 2 --steps 20 --width 256 --json out.json
    python bench/ft_ddp.py --burn 2                 # loaded: two busy-loop processes beside the ranks

Four implementations of the same data-parallel step (zero_grad, forward, MSE loss, backward,
SGD step with momentum), each rank its own process with one torch thread, on loopback:

  ft       pycoll.train.FaultTolerantDDP over a pycoll communicator (pycoll.init, with
           preserve_input=False as the torch backend's): buckets all-reduced (avg) during
           backward, nothing more while nothing fails (on_failure="discard": a sync point only
           after a failure or for a joiner);
  ft-complete  the same with on_failure="complete": every bucket an agreed all-reduce and a
           sync point (update_topology) every step;
  pycoll   torch's DistributedDataParallel on the pycoll torch backend (``backend="pycoll"``);
  gloo     torch's DistributedDataParallel on Gloo.

Both DDPs and FT-DDP use 25 MiB buckets (DDP's default). A step's time is the slowest rank's
(every rank starts each step after a barrier, untimed); a cell is the median over the timed steps.
The implementations alternate (--rounds launches each, in the order A B C, C B A, ...) so that
drift on a shared host hits them alike. The table prints the ratios ft / pycoll (the target:
within 10 %), ft-complete / pycoll and ft / gloo (of the medians over all launches, and, with
--rounds > 1, round by round: the ratio of the two launches of each round, median and range), and the host's load average before the run (a busy host: the
figures are relative, not absolute). Every rank arms an alarm and the driver kills a launch that
overruns --timeout: nothing hangs. ``--burn K`` runs K busy-loop processes (bench/train_step.py's)
for the whole run, as data loaders and other jobs load a training host.
"""
import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.abspath(__file__)
sys.path.insert(0, os.path.dirname(HERE))
import train_step as _ts  # noqa: E402 - bench/ helpers: busy_loops, _killpg
IMPLS = ("ft", "ft-complete", "pycoll", "gloo")


# ---- rank side ---------------------------------------------------------------------------
def rank_main(a):
    signal.alarm(int(a.timeout) + 30)  # dies on its own if the driver is gone
    sys.path.insert(0, ROOT)
    import datetime

    import torch
    from torch import nn

    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = nn.Sequential(*[m for _ in range(a.layers) for m in (nn.Linear(a.width, a.width), nn.ReLU())])
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
    g = torch.Generator().manual_seed(1 + a.rank)
    x, y = torch.randn(a.batch, a.width, generator=g), torch.randn(a.batch, a.width, generator=g)
    if a.impl.startswith("ft"):
        import pycoll
        from pycoll.train import FaultTolerantDDP
        comm = pycoll.init(a.rank, a.n, "127.0.0.1", a.port, timeout=a.timeout, preserve_input=False)
        model = FaultTolerantDDP(net, opt, comm, bucket_cap_mb=25,
                                 on_failure="complete" if a.impl == "ft-complete" else "discard")
        opt = model.optimizer
        barrier, close = comm.barrier, lambda: (model.close(), comm.close())
    else:
        import torch.distributed as dist
        if a.impl == "pycoll":
            import pycoll.torch  # noqa: F401 - registers "pycoll" (the driver turns torch's autoload off)
        dist.init_process_group(a.impl, init_method=f"tcp://127.0.0.1:{a.port}", rank=a.rank, world_size=a.n,
                                timeout=datetime.timedelta(seconds=a.timeout))
        model = nn.parallel.DistributedDataParallel(net, bucket_cap_mb=25)
        barrier, close = dist.barrier, dist.destroy_process_group
    times = []
    for i in range(a.warmup + a.steps):
        barrier()
        t0 = time.perf_counter()
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    barrier()
    close()
    print("RESULT " + json.dumps(times), flush=True)
    os._exit(0)  # (as bench/train_step.py: skip a teardown where Gloo now and then aborts)


# ---- driver --------------------------------------------------------------------------------
def launch(impl, n, a, tmp):
    """n ranks of ``impl``; every rank's per-step times, in rank order."""
    sys.path.insert(0, ROOT)
    from pycoll.testing import free_port
    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1", TORCH_DEVICE_BACKEND_AUTOLOAD="0", OMP_NUM_THREADS="1")
    procs, outs = [], []
    try:
        for r in range(n):
            out = open(os.path.join(tmp, f"{impl}-{n}-{r}.out"), "w+")
            outs.append(out)
            cmd = [sys.executable, HERE, "--worker", impl, "--rank", str(r), "--n", str(n), "--port", str(port),
                   "--width", str(a.width), "--layers", str(a.layers), "--batch", str(a.batch),
                   "--steps", str(a.steps), "--warmup", str(a.warmup), "--timeout", str(a.timeout)]
            procs.append(subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                          env=env, start_new_session=True))
        deadline = time.monotonic() + a.timeout
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.returncode not in (None, 0) for p in procs):
                break
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                _ts._killpg(p)
    results = []
    for r, (p, out) in enumerate(zip(procs, outs)):
        out.seek(0)
        text = out.read()
        out.close()
        lines = [ln for ln in text.splitlines() if ln.startswith("RESULT ")]
        if not lines:
            raise RuntimeError(f"{impl} n={n} rank {r} gave no result (exit {p.returncode}):\n{text[-1500:]}")
        results.append(json.loads(lines[-1][7:]))
    return results


def run_all(a, impls, rows, dump):
    """Every world size's launches, alternating the implementations round by round."""
    import tempfile
    with tempfile.TemporaryDirectory(prefix="ftd-bench-") as tmp:
        for n in [int(x) for x in a.ranks.split(",")]:
            per = {impl: [] for impl in impls}
            by_round = {impl: [] for impl in impls}  # each launch's median
            for rnd in range(a.rounds):
                order = impls if rnd % 2 == 0 else tuple(reversed(impls))
                for impl in order:
                    res = launch(impl, n, a, tmp)
                    steps = [max(step) for step in zip(*res)]  # the slowest rank's
                    per[impl].extend(steps)
                    by_round[impl].append(statistics.median(steps))
            med = {impl: statistics.median(v) * 1e3 for impl, v in per.items()}
            dump[str(n)] = {impl: [t * 1e3 for t in v] for impl, v in per.items()}
            rows.append((n, med, by_round))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", choices=IMPLS)
    ap.add_argument("--impls", default=",".join(IMPLS), help="comma list, from " + ", ".join(IMPLS))
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--n", type=int, default=2)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--ranks", default="2,4", help="comma list of world sizes")
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=30, help="timed steps per launch")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2, help="launches per implementation and world size")
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--burn", type=int, default=0, help="busy-loop processes beside the ranks (loaded host)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.worker:
        a.impl = a.worker
        return rank_main(a)
    load = os.getloadavg()
    rows, dump = [], {}
    impls = tuple(a.impls.split(","))
    if not {"ft", "pycoll"} <= set(impls) or not set(impls) <= set(IMPLS):
        ap.error(f"--impls: a comma list of {IMPLS} with ft and pycoll in it")
    mib = a.layers * (a.width * a.width + a.width) * 4 / 2 ** 20
    print(f"MLP {a.layers} x Linear({a.width}, {a.width}) ({mib:.1f} MiB of gradients), batch {a.batch}, "
          f"{a.steps} timed steps x {a.rounds} launches; load average before: {load[0]:.1f} {load[1]:.1f} "
          f"{load[2]:.1f} on {os.cpu_count()} CPUs; busy loops beside the ranks: {a.burn}", flush=True)
    with _ts.busy_loops(a.burn):
        run_all(a, impls, rows, dump)
    print()
    names = {"ft": "ft", "ft-complete": "ft-complete", "pycoll": "pycoll DDP", "gloo": "gloo DDP"}
    ratios = [(x, y) for x, y in (("ft", "pycoll"), ("ft-complete", "pycoll"), ("ft", "gloo"), ("pycoll", "gloo"))
              if x in impls and y in impls]
    head = [f"{names[i]} ms/step" for i in impls] + [f"{x} / {y}" for x, y in ratios]
    print("| ranks | " + " | ".join(head) + " |")
    print("|---" * (len(head) + 1) + "|")
    for n, m, by_round in rows:
        cells = [f"{m[i]:.2f}" for i in impls] + [f"{m[x] / m[y]:.3f}" for x, y in ratios]
        print(f"| {n} | " + " | ".join(cells) + " |")
    if a.rounds > 1:
        # A shared host's speed drifts between launches by more than the effects measured here:
        # the ratio of the two launches of the same round (next to each other), then its median.
        print("\nratios round by round (the two launches of a round ran next to each other): median (min-max)")
        print("| ranks | " + " | ".join(f"{x} / {y}" for x, y in ratios) + " |")
        print("|---" * (len(ratios) + 1) + "|")
        for n, m, by_round in rows:
            cells = []
            for x, y in ratios:
                r = [bx / by for bx, by in zip(by_round[x], by_round[y])]
                cells.append(f"{statistics.median(r):.3f} ({min(r):.2f}-{max(r):.2f})")
            print(f"| {n} | " + " | ".join(cells) + " |")
    print(f"\nload average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"load_before": load, "medians_ms": {str(n): m for n, m, _ in rows}, "steps_ms": dump,
                       "launch_medians_ms": {str(n): {i: [t * 1e3 for t in v] for i, v in br.items()}
                                             for n, _, br in rows}}, f)


if __name__ == "__main__":
    main()
