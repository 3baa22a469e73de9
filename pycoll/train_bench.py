"""A DDP (or FSDP2) training step on loopback: pycoll vs torch.distributed Gloo, one run.

    pycoll bench --train                                  # 2 and 4 ranks, comm- and compute-bound
    pycoll bench --train --burn 2                         # the same next to 2 busy-looping processes
    pycoll bench --train --ranks 2 --shapes comm --steps 10 --json out.json
    pycoll bench --train --overlap 2 --bucket-mb 8        # also pycoll with 2 lanes (pycoll.torch.lanes)
    pycoll bench --train --wrap fsdp2                     # the model sharded by FSDP2 instead of DDP

(`python bench/train_step.py ...` in a checkout runs the same with that checkout's pycoll.)

The model is an MLP of --layers (8) blocks Linear(--width, --width) + ReLU: 1024 wide that is
32 MiB of float32 gradients per step. "comm" trains it at batch 4 (the all-reduce dominates),
"compute" at batch 64 (the matmuls dominate). Every rank is a local process with one torch thread;
a step is zero_grad + forward + MSE loss + backward + SGD step, DDP with default settings
(25 MiB buckets), the way a user would write it.

Each timed iteration runs four things, each after a barrier, so they see the same load:
  step     the DDP step;
  floor    the same DDP step with a comm hook that communicates nothing (it hands DDP its bucket
           back at once): DDP's own work (bucket copies, hooks) and the ranks' skew, no
           communication; the fastest a backend could make this step;
  compute  the same step on a plain copy of the model (no DDP, so no communication);
  comm     the gradients' all-reduce alone: one async all_reduce per DDP bucket (the sizes DDP
           uses after its first-step rebuild, 4 + 28 MiB for the default model), over a flat
           copy of this step's gradients, then wait for all.
A time is the slowest rank's (the one the next step waits for); the table gives the median over
the timed steps, and exposed comm = median step - median compute (what the communication adds
to a step after what DDP overlaps with backward), and over floor = median step - median floor
(what the backend's communication adds to the step: the part a backend can change). CPU is
user+sys of all rank processes (every
thread) during the DDP step, per step: on 2 cores with 4 ranks the wall time can't show what a
spinning progress thread costs, the CPU column does.

--wrap fsdp2 shards the model with FSDP2 instead (fully_shard on each Linear, then on the model,
torch's defaults: parameters all-gathered before each unit's forward and again before its
backward, gradients reduce-scattered, every collective a blocking call on CPU); "comm" is then
those collectives alone, over buffers of the same sizes, in the same order (and no floor: FSDP2's
collectives run inside forward and backward, with no hook to skip them).

--sessions says which scheduler groups the ranks and busy loops share. Where the kernel groups
tasks by session (autogroups: on when /proc/sys/kernel/sched_autogroup_enabled is 1 and the tasks
are in the root cpu cgroup), it shares the CPUs fairly between sessions first. "each" (the
default) puts every rank and busy loop in a session of its own; "job" keeps them all in this
command's session, as a rank's data-loader workers are; "apart" keeps the ranks together, as
torchrun's workers are, and gives each busy loop its own session, as another user's job has.

--overlap K adds a third implementation, ``pycoll-lK``: pycoll with PYCOLL_TORCH_OVERLAP=K (its
async collectives, DDP's buckets, on K lanes that run at once); its columns come last, with its
ratio to Gloo and to one-lane pycoll. --bucket-mb sets DDP's bucket_cap_mb (default 25, DDP's).

The backends alternate: each cell is --rounds launches per backend, in the order AB, BA, ...,
so that drift on a shared host hits both alike; the --steps timed steps are split over them, and
every launch first runs --warmup untimed iterations. --burn K starts K busy-loop processes at
normal priority for the whole measurement (a loaded training host); a comma list (0,2) gives one
table row per load. They, and the ranks, are killed on exit, Ctrl-C or error. A launch that does
not finish in --timeout seconds is killed (every rank also arms its own alarm) and reported.
"""
import argparse
import contextlib
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

# Where the pycoll that runs this lives: every rank is started with it first on its path, so a
# checkout's bench/train_step.py measures that checkout, an installed pycoll itself.
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKENDS = ("pycoll", "gloo")
SHAPES = {"comm": 4, "compute": 64}  # shape name -> batch size


# ---- rank side (each rank is its own process) ----------------------------------------------
def rank_main(a):
    # Die on our own if the driver is gone or stuck: SIGALRM's default action ends the process;
    # and with the driver, where the kernel can say so (a SIGKILLed driver cleans nothing up).
    signal.alarm(int(a.timeout) + 30)
    _die_with_parent()
    import copy
    import datetime
    import resource

    import torch
    import torch.distributed as dist
    from torch import nn

    torch.set_num_threads(1)
    if a.backend == "pycoll":
        import pycoll.torch  # noqa: F401 - registers "pycoll" (the driver turns torch's autoload off)
    dist.init_process_group(a.backend, init_method=f"tcp://127.0.0.1:{a.port}", rank=a.rank,
                            world_size=a.n, timeout=datetime.timedelta(seconds=a.timeout))

    torch.manual_seed(0)  # same initial model on every rank and backend
    model = nn.Sequential(*[m for _ in range(a.layers) for m in (nn.Linear(a.width, a.width), nn.ReLU())])
    plain = copy.deepcopy(model)
    if a.wrap == "fsdp2":
        from torch.distributed.fsdp import fully_shard
        for m in model:  # one FSDP unit per Linear, then the root: FSDP2's usual wrapping
            if isinstance(m, nn.Linear):
                fully_shard(m)
        ddp = fully_shard(model)
    else:
        ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=a.bucket_mb)
    opt_ddp = torch.optim.SGD(ddp.parameters(), lr=1e-3)
    opt_plain = torch.optim.SGD(plain.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1 + a.rank)  # fixed data: loading is not what we measure
    x = torch.randn(a.batch, a.width, generator=g)
    y = torch.randn(a.batch, a.width, generator=g)

    floor = None
    if a.wrap != "fsdp2":  # DDP without communication (see the module doc)
        floor = nn.parallel.DistributedDataParallel(copy.deepcopy(plain), bucket_cap_mb=a.bucket_mb)
        floor.register_comm_hook(None, _no_communication)
        opt_floor = torch.optim.SGD(floor.parameters(), lr=1e-3)

    def train_step(net, opt):
        opt.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        opt.step()

    floor_calls = []  # pycoll: the collectives each floor step ran (none, by its definition)
    if floor is not None:  # DDP broadcasts the bucket order it rebuilt after its first step in its second
        for _ in range(2):
            train_step(floor, opt_floor)

    def floor_step():
        if a.backend != "pycoll":
            return train_step(floor, opt_floor)
        stats = pycoll.torch.communicator().stats
        last = stats[-1] if stats else None
        train_step(floor, opt_floor)
        # (timed()'s barrier may land after `last`: barriers do not count)
        floor_calls.append(sum(op != "barrier" for op in _ops_since(stats, last)))

    def cpu():
        r = resource.getrusage(resource.RUSAGE_SELF)  # all threads, ns-precise on Linux
        return r.ru_utime + r.ru_stime

    def timed(fn):
        dist.barrier()
        c, t = cpu(), time.perf_counter()
        fn()
        return time.perf_counter() - t, cpu() - c

    def ddp_buckets():
        """The buckets (elements, in launch order) DDP all-reduces once it has rebuilt them after
        its first step. DDP's logging data only has the initial ones (one 32 MiB bucket here,
        later 4 + 28 MiB), so a throwaway DDP copy records them with a comm hook that sends nothing."""
        probe = nn.parallel.DistributedDataParallel(copy.deepcopy(plain), bucket_cap_mb=a.bucket_mb)
        seen = []

        def record(state, bucket):
            seen.append(bucket.buffer().numel())
            fut = torch.futures.Future()
            fut.set_result(bucket.buffer())
            return fut
        probe.register_comm_hook(None, record)
        for _ in range(2):
            seen.clear()
            nn.functional.mse_loss(probe(x), y).backward()
        return seen

    def fsdp2_comm():
        """FSDP2's collectives of one step with reshard_after_forward (its default), blocking as
        it calls them on CPU: each unit's parameters all-gathered in forward, again in backward
        (last unit first), and its gradients reduce-scattered."""
        units = [sum(p.numel() for p in m.parameters()) for m in plain if isinstance(m, nn.Linear)]
        shards = [-(-k // a.n) for k in units]  # FSDP2 pads each unit to a multiple of the ranks
        mine = [torch.zeros(k) for k in shards]
        full = [torch.zeros(k * a.n) for k in shards]
        grads = [torch.zeros(k * a.n) for k in shards]

        def comm():
            for i in range(len(units)):
                dist.all_gather_into_tensor(full[i], mine[i])
            for i in reversed(range(len(units))):
                dist.all_gather_into_tensor(full[i], mine[i])
                dist.reduce_scatter_tensor(mine[i], grads[i])
        return comm, [4 * k * a.n for k in shards]

    if a.wrap == "fsdp2":
        comm, sizes = fsdp2_comm()
    else:
        buckets = ddp_buckets()
        assert sum(buckets) == sum(p.numel() for p in plain.parameters()), buckets
        sizes = [4 * b for b in buckets]
    res = {k: [] for k in ("step", "step_cpu", "floor", "floor_cpu", "compute", "compute_cpu", "comm", "comm_cpu")}
    for i in range(a.warmup + a.steps):
        st = timed(lambda: train_step(ddp, opt_ddp))
        ft = timed(lambda: floor_step()) if floor is not None else (0.0, 0.0)
        ct = timed(lambda: train_step(plain, opt_plain))
        if a.wrap != "fsdp2":
            flat = torch.cat([p.grad.reshape(-1) for p in plain.parameters()])  # untimed copy

            def comm():
                works = [dist.all_reduce(b, async_op=True) for b in flat.split(buckets)]
                for w in works:
                    w.wait()
        mt = timed(comm)
        if i >= a.warmup:
            for name, (wall, c) in (("step", st), ("floor", ft), ("compute", ct), ("comm", mt)):
                res[name].append(wall)
                res[name + "_cpu"].append(c)
    res["buckets_bytes"] = sizes
    if floor_calls:
        res["floor_collectives"] = sum(floor_calls)
    if a.backend == "pycoll":  # which way its big same-host payloads went (single_copy_adapt)
        runs = pycoll.torch.communicator().single_copy_runs
        res["single_copy_runs"] = [runs["single_copy"], runs["rings"]]
    dist.barrier()
    dist.destroy_process_group()
    print("RESULT " + json.dumps(res), flush=True)
    sys.stderr.flush()
    # Skip interpreter teardown (both backends alike): there, with torch 2.13, Gloo's rank 0 now
    # and then aborts ("terminate called without an active exception", ~1 in 15 launches here)
    # after destroy_process_group has returned, failing a launch whose results are complete.
    os._exit(0)


def _ops_since(stats, last):
    """The ops of the collectives recorded in ``stats`` (newest last) after ``last``."""
    ops = []
    for st in reversed(stats):
        if st is last:
            break
        ops.append(st.op)
    return ops


def _no_communication(state, bucket):
    """A DDP comm hook that communicates nothing: the bucket back as it is, at once."""
    import torch
    fut = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


def _die_with_parent():
    """SIGKILL this process when the one that started it ends (Linux: PR_SET_PDEATHSIG)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it ended before the request took effect
        os._exit(1)


# ---- driver ---------------------------------------------------------------------------------
class LaunchError(RuntimeError):
    pass


# Which scheduler group the processes land in (--sessions). Where the kernel has autogroups
# (sched_autogroup_enabled, a cgroup-v1 or root cpu cgroup), CPU time is shared fairly between
# sessions first, then between the threads inside one; torchrun's workers share its session, a
# rank's data loaders share the rank's, another user's job has its own.
SESSIONS = ("each", "job", "apart")


def _group_of_its_own(new_session):
    """Popen arguments: the child leads a process group (so _killpg takes it and its children),
    in a session of its own or in ours."""
    if new_session:
        return {"start_new_session": True}
    return {"preexec_fn": os.setpgrp}


def _killpg(p):
    try:
        os.killpg(p.pid, signal.SIGKILL)  # each child leads its own process group
    except (ProcessLookupError, PermissionError):
        pass
    p.wait()


def launch(impl, n, shape, steps, a, tmp):
    """n ranks of one implementation (pycoll, pycoll-lK: K lanes, gloo); every rank's RESULT
    dict, in rank order."""
    from pycoll.testing import free_port
    port = free_port()
    backend, _, lanes = impl.partition("-l")
    # Torch's plugin autoload off: a Gloo rank then never registers pycoll's backend (it imports
    # the package to run this module, which starts no thread), and a pycoll rank does explicitly.
    path = os.pathsep.join(p for p in (PACKAGE_PARENT, os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PYTHONUNBUFFERED="1", TORCH_DEVICE_BACKEND_AUTOLOAD="0", OMP_NUM_THREADS="1",
               PYCOLL_TORCH_OVERLAP=lanes or "1", PYTHONPATH=path)
    procs, files = [], []
    try:
        for r in range(n):
            out = open(os.path.join(tmp, f"{impl}-{n}-{shape}-{r}.out"), "w+")
            err = open(os.path.join(tmp, f"{impl}-{n}-{shape}-{r}.err"), "w+")
            files.append((out, err))
            cmd = [sys.executable, "-m", "pycoll.train_bench", "--worker", backend, "--rank", str(r), "--n", str(n),
                   "--port", str(port),
                   "--batch", str(SHAPES[shape]), "--width", str(a.width), "--layers", str(a.layers),
                   "--steps", str(steps), "--warmup", str(a.warmup), "--timeout", str(a.timeout),
                   "--bucket-mb", str(a.bucket_mb), "--wrap", a.wrap]
            procs.append(subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env,
                                          **_group_of_its_own(a.sessions == "each")))
        deadline, failed_at = time.monotonic() + a.timeout, None
        while any(p.poll() is None for p in procs):
            now = time.monotonic()
            if failed_at is None and any(p.returncode not in (None, 0) for p in procs):
                failed_at = now  # the others are likely stuck in a collective: short grace
            if now > deadline or (failed_at is not None and now > failed_at + 15):
                break
            time.sleep(0.1)
        timed_out = [r for r, p in enumerate(procs) if p.poll() is None]
    finally:
        for p in procs:
            if p.poll() is None:
                _killpg(p)
    results, problems = [], []
    for r, (p, (out, err)) in enumerate(zip(procs, files)):
        out.seek(0)
        err.seek(0)
        lines = [ln for ln in out.read().splitlines() if ln.startswith("RESULT ")]
        tail = err.read()[-1500:].strip()
        out.close()
        err.close()
        if r in timed_out:
            problems.append(f"rank {r}: killed (no result after the others failed or after --timeout "
                            f"{a.timeout:.0f} s)")
        elif p.returncode != 0 or not lines:
            problems.append(f"rank {r}: exit status {p.returncode}" + (f"\n    {tail}".replace("\n", "\n    ")
                                                                       if tail else ""))
        else:
            results.append(json.loads(lines[-1][7:]))
    if problems:
        raise LaunchError(f"{impl}, {n} ranks, {shape}:\n  " + "\n  ".join(problems))
    return results


def summarize(runs):
    """Pool the launches of one backend and cell: medians (ms) of the slowest rank per step."""
    per_step = {k: [] for k in ("step", "floor", "compute", "comm")}
    cpu = {k: 0.0 for k in per_step}
    count = 0
    for ranks in runs:
        for k in per_step:
            per_step[k] += [max(vals) for vals in zip(*(r[k] for r in ranks))]
            cpu[k] += sum(sum(r[k + "_cpu"]) for r in ranks)  # all ranks, all threads
        count += len(ranks[0]["step"])
    med = {k: 1e3 * statistics.median(v) for k, v in per_step.items()}
    return {"step_ms": med["step"], "compute_ms": med["compute"], "comm_ms": med["comm"],
            "exposed_ms": med["step"] - med["compute"], "floor_ms": med["floor"] or None,
            "over_floor_ms": med["step"] - med["floor"] if med["floor"] else None,
            "step_cpu_ms": 1e3 * cpu["step"] / count, "floor_cpu_ms": 1e3 * cpu["floor"] / count or None,
            "compute_cpu_ms": 1e3 * cpu["compute"] / count, "steps": count,
            "step_ms_all": [1e3 * t for t in per_step["step"]], "buckets_bytes": runs[0][0]["buckets_bytes"],
            "single_copy_runs": [sum(r.get("single_copy_runs", (0, 0))[k] for ranks in runs for r in ranks)
                                 for k in (0, 1)],
            "floor_collectives": sum(r.get("floor_collectives", 0) for ranks in runs for r in ranks)}


@contextlib.contextmanager
def busy_loops(k, own_sessions=True):
    """k busy-loop processes at normal priority (start_burners) for the length of the block:
    killed on the way out, error or Ctrl-C included."""
    procs = start_burners(k, own_sessions)
    try:
        yield procs
    finally:
        for p in procs:
            _killpg(p)


def start_burners(k, own_sessions=True):
    # Each checks every few ms whether its parent is gone, so none outlives a killed driver.
    code = ("import os\nppid = os.getppid()\nwhile os.getppid() == ppid:\n"
            "    for _ in range(100000):\n        pass\n")
    return [subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, **_group_of_its_own(own_sessions)) for _ in range(k)]


def mib(nbytes):
    return f"{nbytes / 2**20:.1f} MiB" if nbytes >= 2**20 else f"{nbytes / 2**10:.1f} KiB"


def ints(text):
    return [int(x) for x in text.split(",") if x.strip()]


def build_parser(prog=None):
    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", default="2,4", help="comma-separated world sizes (default 2,4)")
    ap.add_argument("--shapes", default="comm,compute",
                    help="comm (batch 4) and/or compute (batch 64); default comm,compute")
    ap.add_argument("--burn", default="0", help="busy-loop processes next to the ranks; a comma list gives "
                    "one row per load (default 0)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per backend and cell (default 20)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed iterations per launch (default 3)")
    ap.add_argument("--rounds", type=int, default=2,
                    help="launches per backend and cell, alternating which goes first (default 2)")
    ap.add_argument("--width", type=int, default=1024, help="MLP width (default 1024)")
    ap.add_argument("--layers", type=int, default=8, help="MLP blocks (default 8)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per launch before it is killed")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--overlap", type=int, default=0,
                    help="also run pycoll with this many lanes (PYCOLL_TORCH_OVERLAP; default 0: not)")
    ap.add_argument("--bucket-mb", type=float, default=25.0, help="DDP's bucket_cap_mb (default 25)")
    ap.add_argument("--sessions", choices=SESSIONS, default="each",
                    help="each (default): every rank and busy loop in a session of its own; job: all in this "
                         "command's session (busy loops as the ranks' data loaders); apart: the ranks in this "
                         "command's session, as torchrun's, each busy loop in its own (other jobs)")
    ap.add_argument("--wrap", choices=("ddp", "fsdp2"), default="ddp",
                    help="ddp (default) or fsdp2: the model sharded with FSDP2's fully_shard per Linear")
    # worker mode
    ap.add_argument("--worker", choices=("pycoll", "gloo"), help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    return ap


def _sigterm(signum, frame):
    raise SystemExit(128 + signum)  # run the finally blocks that kill burners and ranks


def main(argv=None, prog=None):
    """The benchmark's command line (``prog``: its name in messages; ``pycoll bench --train``
    passes the arguments after ``--train``)."""
    prog = prog or "pycoll bench --train"
    a = build_parser(prog).parse_args(argv)
    if a.worker:
        a.backend = a.worker
        return rank_main(a)
    shapes = [s.strip() for s in a.shapes.split(",") if s.strip()]
    problems = [f"unknown shape {s!r} (comm, compute)" for s in shapes if s not in SHAPES]
    problems += [f"{flag} must be at least {low}" for flag, value, low in (
        ("--steps", a.steps, 1), ("--warmup", a.warmup, 0), ("--rounds", a.rounds, 1), ("--width", a.width, 1),
        ("--layers", a.layers, 1)) if value < low]
    for flag, text, low in (("--ranks", a.ranks, 1), ("--burn", a.burn, 0)):
        try:
            values = ints(text)
        except ValueError:
            values = None
        if not values or min(values) < low:
            problems.append(f"{flag} takes a comma list of integers of at least {low}, not {text!r}")
    if problems:
        print(f"{prog}: " + "; ".join(problems), file=sys.stderr)
        return 2
    if importlib.util.find_spec("torch") is None:
        print(f"{prog}: needs torch (pip install torch==2.13.0)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _sigterm)
    impls = BACKENDS + ((f"pycoll-l{a.overlap}",) if a.overlap > 1 else ())
    extra = impls[2:]
    rounds = min(a.rounds, a.steps)
    split = [a.steps // rounds + (k < a.steps % rounds) for k in range(rounds)]
    grad = mib(a.layers * (a.width * a.width + a.width) * 4)
    print(f"# MLP {a.layers} x Linear({a.width}, {a.width}) + ReLU, {grad} float32 gradients; "
          f"{a.steps} timed steps per cell and backend in {rounds} launch(es), {a.warmup} warm-up each; "
          f"1 torch thread per rank; {os.cpu_count()} CPUs; sessions: {a.sessions}", flush=True)

    rows, failures = [], []
    with tempfile.TemporaryDirectory(prefix="train-step-") as tmp:
        for load in ints(a.burn):
            with busy_loops(load, a.sessions != "job"):
                for n in ints(a.ranks):
                    for shape in shapes:
                        runs = {b: [] for b in impls}
                        try:
                            for k, steps in enumerate(split):
                                for b in (impls if k % 2 == 0 else impls[::-1]):
                                    print(f"# {n} ranks, {shape}, burn {load}: {b} launch {k + 1}/{rounds}",
                                          file=sys.stderr, flush=True)
                                    runs[b].append(launch(b, n, shape, steps, a, tmp))
                        except LaunchError as e:
                            print(f"ERROR: {e}", file=sys.stderr, flush=True)
                            failures.append(str(e))
                            rows.append({"ranks": n, "shape": shape, "burn": load, "failed": str(e)})
                            continue
                        rows.append({"ranks": n, "shape": shape, "burn": load, "batch": SHAPES[shape],
                                     **{b: summarize(runs[b]) for b in impls}})

    print(f"\n## {a.wrap.upper()} train step, {grad} gradients, loopback (medians; ms; ratio = gloo/pycoll, "
          ">1: pycoll faster; CPU = user+sys of all ranks per step)")
    head = ("| ranks | shape | load | pycoll step | gloo step | ratio | pycoll compute | gloo compute "
            "| pycoll exposed comm | gloo exposed comm | pycoll comm alone | gloo comm alone "
            "| pycoll CPU/step | gloo CPU/step | DDP floor pycoll/gloo | over floor pycoll | over floor gloo |"
            + "".join(f" {x} step | gloo/{x} | pycoll/{x} | {x} exposed comm | {x} comm alone | {x} CPU/step |"
                      for x in extra))
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for row in rows:
        lead = f"| {row['ranks']} | {row['shape']} (batch {SHAPES[row['shape']]}) | " + \
               (f"burn {row['burn']}" if row["burn"] else "idle")
        if "failed" in row:
            print(lead + " | FAILED" + " |" * (15 + 6 * len(extra)))
            continue
        p, g = row["pycoll"], row["gloo"]
        print(lead + f" | {p['step_ms']:.1f} | {g['step_ms']:.1f} | {g['step_ms'] / p['step_ms']:.2f}x"
              f" | {p['compute_ms']:.1f} | {g['compute_ms']:.1f} | {p['exposed_ms']:.1f} | {g['exposed_ms']:.1f}"
              f" | {p['comm_ms']:.1f} | {g['comm_ms']:.1f} | {p['step_cpu_ms']:.0f} | {g['step_cpu_ms']:.0f} |"
              + (f" {p['floor_ms']:.1f} / {g['floor_ms']:.1f} | {p['over_floor_ms']:.1f} | {g['over_floor_ms']:.1f} |"
                 if p["floor_ms"] and g["floor_ms"] else " - | - | - |")
              + "".join(f" {row[x]['step_ms']:.1f} | {g['step_ms'] / row[x]['step_ms']:.2f}x"
                        f" | {p['step_ms'] / row[x]['step_ms']:.2f}x | {row[x]['exposed_ms']:.1f}"
                        f" | {row[x]['comm_ms']:.1f} | {row[x]['step_cpu_ms']:.0f} |" for x in extra))
    done = [r for r in rows if "failed" not in r]
    if done:
        sizes = ", ".join(mib(b) for b in done[0]["pycoll"]["buckets_bytes"])
        what = (f"FSDP2's collectives of a step, blocking: an all_gather_into_tensor per unit ({sizes} "
                "gathered) in forward, another per unit in backward with a reduce_scatter_tensor of its "
                "gradients" if a.wrap == "fsdp2" else
                f"one async all_reduce per DDP bucket ({sizes}), then wait")
        print(f"\ncomm alone = {what}; exposed comm = step - compute (can be negative within noise)"
              + ("." if a.wrap == "fsdp2" else "; DDP floor = the DDP step with a comm hook that communicates "
                 "nothing (DDP's own work and the ranks' skew), measured in each backend's launches; over floor = "
                 "step - floor: what the backend's communication adds to the step."))
        ways = [f"{r['ranks']} ranks {r['shape']} {'burn ' + str(r['burn']) if r['burn'] else 'idle'}: "
                f"{r['pycoll']['single_copy_runs'][1]} of {sum(r['pycoll']['single_copy_runs'])}"
                for r in done if sum(r["pycoll"]["single_copy_runs"])]
        if ways:
            print("pycoll's collectives big enough for single copy that went through the shared-memory rings "
                  "instead (single_copy_adapt: timed faster here, or a probe), all ranks: " + "; ".join(ways) + ".")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(a).items() if k not in ("worker", "rank", "n", "port",
                                                                              "batch")}, "rows": rows}, f, indent=1)
    if failures:
        print(f"\n{len(failures)} cell(s) failed; see the errors above", file=sys.stderr)
        return 1
    return 0


def run(argv=None, prog=None):
    """main() with Ctrl-C reported as such (exit status 130)."""
    try:
        return main(argv, prog)
    except KeyboardInterrupt:  # the finally blocks have killed the ranks and burners
        print(f"{prog or 'pycoll bench --train'}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # the ranks: python -m pycoll.train_bench --worker ...
    sys.exit(run())
