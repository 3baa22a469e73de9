"""Training through faults, end to end: DDP on Gloo, FT-DDP on pycoll and DiLoCo on pycoll train the
same model on the same samples, on loopback with kills and a join, and in an emulated WAN.

    python bench/ft_training.py --json out.json --plot loss.png       # both parts (WAN needs root)
    python bench/ft_training.py --parts loopback --reps 1              # loopback only, one run each
    python bench/ft_training.py --toy --parts loopback --json t.json   # the test's size: seconds

The task is examples/ft_ddp.py's (a student MLP learns a fixed random teacher MLP: regression on
Gaussian inputs), with a hidden width of --hidden (default 512: 1.1 MB of float32 parameters),
AdamW (lr 3e-3, weight decay 0.01) and a cosine schedule over --steps. Every method trains for
--steps steps of a global batch of --batch samples: each peer draws --batch / (peers) samples per
step from a generator of its own, so the group consumes the same samples per step whatever its
size. Methods (--methods):

  gloo          torch DistributedDataParallel on Gloo (25 MiB buckets, as DDP's default).
  ft            pycoll.train.FaultTolerantDDP (on_failure="discard"): buckets all-reduced during
                backward, a sync point after a failure or for a joiner (docs/ft-training.md).
  diloco        pycoll.train.DiLoCo, mode "sync", H = --sync-every inner steps per round (the
                same AdamW as inner optimizer, outer Nesterov lr 0.7, momentum 0.9); a "step" is
                an inner step of the group (diloco.inner_steps).
  diloco-int8   the same with int8 pseudo-gradients on the wire.

Part (a), loopback: --ranks peers (pycoll: TCP between them, as Gloo; not shared memory), each a
process with one torch thread. Every method runs twice per repetition: fault-free, and with
faults at fixed group steps: rank 2 SIGKILLs itself at step A (--kill-at, before its backward),
rank 0 (which hosts pycoll's coordinator) at step B (--kill0-at), and a new peer is started at
step C (--join-at). The pycoll methods go on with no restart (4 -> 3 -> 2 -> 3 peers); a joiner
is healed before its first step. Gloo cannot survive a lost peer: its faulty run is what a user
of torchrun's elastic agent gets. The driver plays the agent: it sees a worker die (polling every
0.1 s, torchrun's --monitor-interval), kills the others and starts the group again with the
peers left, from the last checkpoint (rank 0 saves model, optimizer, scheduler and step every
--ckpt-every steps; the saving is in the timing); a joining node makes the agent restart the
workers too (scale-up), so step C is a third restart, from the checkpoint, with 3 peers. Steps
redone after a restart are work lost. (Rendezvous costs of a real torchrun come on top: this is
a lower bound of Gloo's cost.)

Part (b), WAN (pycoll.emulator, needs root): two sites, ranks 0..n/2-1 behind one router and the
rest behind the other, 1 Gbit/s per direction between the sites (--wan-rate), one-way delay 25 ms
(RTT 50 ms, --wan-delay), no delay inside a site; fault-free. The WAN run with faults is not done.

Per run (a row): wall (the driver's clock from launching the first process to the last exit, so
process start-up, import and connecting are in it, as are restarts); samples (those in the
updates the final model holds: FT-DDP the applied steps' batches of their contributors, DiLoCo the
rounds' contributors' local batches, Gloo steps x global batch); samples/s = samples / wall; lost
(faulty runs: wall minus the median fault-free wall of the same method, and that per failure,
i.e. / 2 kills; the join's cost is in it); steps lost (FT-DDP: discarded steps; Gloo: steps redone
after restarts); MB/rank (bytes sent by all the processes together / --ranks; pycoll: the
communicator's own counter of bytes its connections carried, summed over membership changes,
healing included; Gloo: computed, 2 (n-1)/n x gradient bytes per all-reduce of a ring, times the
all-reduces each rank ran, redone ones included; DDP's start-up broadcast left out); util (compute
time / time: forward, backward and the inner optimizer's step, summed over every process, over
the sum of the processes' lifetimes from launch to exit: start-up, waits, restarts and healing
count as idle; "loop util" the same over the time inside the training loop only; Gloo DDP waits
for its all-reduces inside backward, so there the exposed wait (last bucket done minus last bucket
launched, a comm hook) is taken out of backward); final loss (eval MSE on 2048 held-out inputs of
the final model, on a survivor) and final / fault-free (the method's fault-free median). Ratios:
wall and samples/s against Gloo DDP's fault-free run, of the same part.

Each row is the median over --reps repetitions (the methods alternate within a repetition, so
drift on a shared host hits them alike); the load average is printed before and after. --json
writes every run (events included); --plot FILE.png draws the eval loss against wall time for each
method, faults marked (matplotlib, the `bench` extra; imported only then).
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
sys.path.insert(0, os.path.dirname(HERE))
import train_step as _ts  # noqa: E402 - bench/ helpers: _killpg

METHODS = ("gloo", "ft", "diloco", "diloco-int8")
JOINER = 100  # the joiner's data index (a founder's is its rank)


# ---- rank side --------------------------------------------------------------------------------
def _emit(**ev):
    ev["t"] = time.time()
    print("EV " + json.dumps(ev), flush=True)


def _example():
    """examples/ft_ddp.py (its task: DIM, teacher), by path: bench/ has an ft_ddp.py too."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("ft_ddp_example", os.path.join(ROOT, "examples", "ft_ddp.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def make_net(hidden):
    """examples/ft_ddp.py's student, --hidden wide."""
    import torch
    DIM = _example().DIM
    torch.manual_seed(0)  # every peer starts from the same weights
    return torch.nn.Sequential(torch.nn.Linear(DIM, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, hidden),
                               torch.nn.Tanh(), torch.nn.Linear(hidden, 1))


class _Task:
    """The teacher, a peer's batches (seeded by (peer, step): a redone step draws the same), the
    eval set, and the compute clock: forward, backward and the inner optimizer's step."""

    def __init__(self, a, idx):
        import torch
        ex = _example()
        self.torch, self.dim, self.f, self.idx = torch, ex.DIM, ex.teacher(), idx
        g = torch.Generator().manual_seed(99)
        self.x_eval = torch.randn(2048, ex.DIM, generator=g)
        self.y_eval = self.f(self.x_eval)
        self.compute = 0.0
        self.t_loop = None

    def batch(self, step, size):
        g = self.torch.Generator().manual_seed(1_000_003 * self.idx + step)
        x = self.torch.randn(size, self.dim, generator=g)
        return x, self.f(x)

    def eval(self, net, n=256):
        with self.torch.no_grad():
            return float(self.torch.nn.functional.mse_loss(net(self.x_eval[:n]), self.y_eval[:n]))

    def time_optimizer(self, opt):
        """The inner optimizer's step joins the compute clock (its own hooks: whoever calls it)."""
        box = {}
        opt.register_step_pre_hook(lambda *_: box.__setitem__("t", time.perf_counter()))
        opt.register_step_post_hook(lambda *_: setattr(self, "compute", self.compute + time.perf_counter() - box["t"]))


class _Bytes:
    """pycoll's sent-bytes counter belongs to the engine's communicator, which a membership change
    may replace: add it up across them (sampled after every step; what one sent after its last
    sample, a failed step's, is left out)."""

    def __init__(self, comm):
        self.comm, self.total, self.key, self.last = comm, 0, None, 0

    def sample(self):
        key, cur = id(self.comm.epoch_state.ccomm), self.comm.bytes_sent
        self.total += cur - self.last if key == self.key and cur >= self.last else cur
        self.key, self.last = key, cur
        return self.total


def _connect(a, joiner):
    import pycoll
    kw = dict(heartbeat_timeout=5, timeout=a.timeout, preserve_input=False, transport="tcp")
    if joiner:  # a spare that is up: it connects when the driver says (the group is at step C)
        deadline = time.monotonic() + a.timeout
        while not os.path.exists(a.joiner) and time.monotonic() < deadline:
            time.sleep(0.01)
        _emit(ev="joining")
        comm = pycoll.connect(a.master, a.port, name=f"joiner{a.rank}", join_timeout=a.timeout, **kw)
        _emit(ev="admitted")  # (then the heal: the wrapper's or DiLoCo's construction)
        return comm
    return pycoll.init(a.rank, a.world, a.master, a.port, **kw)


def _call_joiner(a, comm, step):
    """At step C (once): let the spare connect, and wait until the coordinator has its request, so
    that it is admitted at the next sync point (a fixed step, whatever the host's speed)."""
    if step != a.call_join_at or not a.joinfile or os.path.exists(a.joinfile + ".called"):
        return
    open(a.joinfile, "w").close()
    deadline = time.monotonic() + a.timeout
    while comm.pending_joiners() == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    open(a.joinfile + ".called", "w").close()  # (every member reads it: one call per run)
    _emit(ev="join", step=step)


def _die(step):
    _emit(ev="die", step=step)
    os.kill(os.getpid(), signal.SIGKILL)


def rank_ft(a, task, net):
    import torch

    from pycoll.train import FaultTolerantDDP
    # (the optimizer first: a process's first one imports torch._dynamo, seconds, which a joiner
    # would otherwise spend after its admission, holding up the members' heal)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=a.steps)
    task.time_optimizer(opt)
    comm = _connect(a, a.joiner)
    model = FaultTolerantDDP(net, opt, comm, scheduler=sched)
    heal = model.last_heal
    _emit(ev="start", step=model.step, world=comm.world_size, healed=heal.bytes_received if heal.fetched else 0,
          phases=dict(heal.phases) if heal.fetched else {}, heal_s=heal.seconds, attempts=heal.attempts)
    counter, samples, discarded, peers = _Bytes(comm), 0, 0, comm.world_size
    task.t_loop = time.perf_counter()
    for _ in range(2 * a.steps):  # bounded: a discarded step is followed by another
        if model.step >= a.steps:
            break
        _call_joiner(a, comm, model.step)
        t0 = time.perf_counter()
        model.optimizer.zero_grad()
        if model.step == a.die_at:
            _die(model.step)
        b = a.batch // peers  # (the peers of the last step: this step's sync point runs alongside)
        x, y = task.batch(model.step, b)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        task.compute += time.perf_counter() - t0
        rep = model.optimizer.step()
        peers = len(rep.members)
        samples += b if rep.applied else 0
        discarded += not rep.applied
        _emit(ev="step", step=model.step, applied=rep.applied, world=peers, b=b, bytes=counter.sample(),
              samples=samples, compute=task.compute)
        if rep.applied and model.step % a.sync_every == 0:
            _emit(ev="eval", step=model.step, loss=task.eval(net))
    loop = time.perf_counter() - task.t_loop
    _emit(ev="end", step=model.step, final=task.eval(net, 2048), compute=task.compute, loop=loop,
          bytes=counter.sample(), samples=samples, discarded=discarded)
    model.close()
    comm.close()


def rank_diloco(a, task, net):
    import torch

    from pycoll.train import DiLoCo
    inner = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=0.01)  # (before connecting: see rank_ft)
    task.time_optimizer(inner)
    comm = _connect(a, a.joiner)
    diloco = DiLoCo(net, inner, comm, sync_every=a.sync_every, outer_lr=0.7, momentum=0.9,
                    compression="int8" if a.method == "diloco-int8" else None)
    _emit(ev="start", step=diloco.inner_steps, world=comm.world_size, healed=len(diloco.last_round.fetched))
    counter, samples, local = _Bytes(comm), 0, 0
    b = a.batch // comm.world_size
    task.t_loop = time.perf_counter()
    while diloco.inner_steps < a.steps:
        _call_joiner(a, comm, diloco.inner_steps)  # (admitted at the round's end: the next sync point)
        t0 = time.perf_counter()
        if diloco.inner_steps == a.die_at:
            _die(diloco.inner_steps)
        x, y = task.batch(diloco.inner_steps, b)
        torch.nn.functional.mse_loss(net(x), y).backward()
        task.compute += time.perf_counter() - t0
        done = diloco.step()  # (the inner step is timed by its hooks)
        local += b
        if done is None:
            continue
        samples += local if comm.name in done.contributors else 0
        local, b = 0, a.batch // comm.world_size
        _emit(ev="step", step=done.step, applied=True, world=comm.world_size, b=b, bytes=counter.sample(),
              samples=samples, compute=task.compute, contributors=len(done.contributors), waited=done.seconds)
        if done.step % a.sync_every == 0:
            _emit(ev="eval", step=done.step, loss=task.eval(net))
    diloco.finish()
    loop = time.perf_counter() - task.t_loop
    _emit(ev="end", step=diloco.inner_steps, final=task.eval(net, 2048), compute=task.compute, loop=loop,
          bytes=counter.sample(), samples=samples, discarded=0)
    comm.close()


def rank_gloo(a, task, net):
    import datetime

    import torch
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://{a.master}:{a.port}", rank=a.rank, world_size=a.world,
                            timeout=datetime.timedelta(seconds=a.timeout))
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=a.steps)
    step = 0
    if a.ckpt and os.path.exists(a.ckpt):  # a restart: every rank loads rank 0's last checkpoint
        ck = torch.load(a.ckpt)
        net.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        step = ck["step"]
    task.time_optimizer(opt)
    model = torch.nn.parallel.DistributedDataParallel(net)
    clock = {"launch": 0.0, "done": 0.0}

    def hook(state, bucket):  # DDP's allreduce_hook, with the times of the last bucket
        clock["launch"] = time.perf_counter()
        fut = dist.all_reduce(bucket.buffer().div_(a.world), async_op=True).get_future()

        def done(f):
            clock["done"] = time.perf_counter()
            return f.value()[0]
        return fut.then(done)
    model.register_comm_hook(None, hook)
    nbytes = sum(p.numel() for p in net.parameters()) * 4
    per_allreduce = 2 * (a.world - 1) / a.world * nbytes
    _emit(ev="start", step=step, world=a.world, healed=0)
    sent, b = 0, a.batch // a.world
    task.t_loop = time.perf_counter()
    while step < a.steps:
        t0 = time.perf_counter()
        opt.zero_grad()
        if step == a.die_at:
            _die(step)
        x, y = task.batch(step, b)
        torch.nn.functional.mse_loss(model(x), y).backward()
        exposed = max(0.0, clock["done"] - clock["launch"])  # the wait DDP's backward ends with
        task.compute += time.perf_counter() - t0 - exposed
        opt.step()
        sched.step()
        step += 1
        sent += per_allreduce
        _emit(ev="step", step=step, applied=True, world=a.world, b=b, bytes=sent, samples=a.batch * step,
              compute=task.compute)
        if a.rank == 0 and a.ckpt and step % a.ckpt_every == 0 and step < a.steps:
            tmp = a.ckpt + ".tmp"
            torch.save({"model": net.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "step": step}, tmp)
            os.replace(tmp, a.ckpt)
            _emit(ev="ckpt", step=step)
        if step % a.sync_every == 0:
            _emit(ev="eval", step=step, loss=task.eval(net))
    loop = time.perf_counter() - task.t_loop
    _emit(ev="end", step=step, final=task.eval(net, 2048), compute=task.compute, loop=loop, bytes=sent,
          samples=a.batch * step, discarded=0)
    dist.destroy_process_group()


def rank_main(a):
    signal.alarm(int(a.timeout) + 60)  # dies on its own if the driver is gone
    sys.path.insert(0, ROOT)
    import torch
    torch.set_num_threads(1)
    task = _Task(a, JOINER + a.rank if a.joiner else a.rank)
    net = make_net(a.hidden)
    {"gloo": rank_gloo, "ft": rank_ft, "diloco": rank_diloco, "diloco-int8": rank_diloco}[a.method](a, task, net)
    sys.stdout.flush()
    os._exit(0)  # (as bench/ft_ddp.py: skip a teardown where Gloo now and then aborts)


# ---- driver: processes ------------------------------------------------------------------------
class _Proc:
    """One rank process and the events it printed so far."""

    def __init__(self, popen, path, label, t_launch, group):
        self.p, self.path, self.label, self.t_launch, self.group = popen, path, label, t_launch, group
        self.out = open(path)  # our own offset (the child writes through another file description)
        self.events, self._buf, self.t_exit = [], "", None

    def poll_events(self):
        chunk = self.out.read()
        if chunk:
            self._buf += chunk
            *lines, self._buf = self._buf.split("\n")
            for ln in lines:
                if ln.startswith("EV "):
                    self.events.append(json.loads(ln[3:]))
        if self.t_exit is None and self.p.poll() is not None:
            self.t_exit = time.time()
        return self.p.returncode

    def last(self, kind):
        return next((e for e in reversed(self.events) if e["ev"] == kind), None)

    def text(self):
        with open(self.path) as f:
            return f.read()


class _Launcher:
    """Starts rank processes on loopback or inside an emulated network."""

    def __init__(self, a, tmp, emu=None):
        self.a, self.tmp, self.emu, self.count = a, tmp, emu, 0
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", TORCH_DEVICE_BACKEND_AUTOLOAD="0", OMP_NUM_THREADS="1",
                        PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        if emu is not None:
            self.env["GLOO_SOCKET_IFNAME"] = "emu0"

    def master(self):
        return self.emu.peer_ip(0) if self.emu is not None else "127.0.0.1"

    def start(self, method, rank, world, port, *, joiner="", die_at=-1, ckpt="", group=0, joinfile="", join_at=-1):
        a = self.a
        self.count += 1
        path = os.path.join(self.tmp, f"{method}-{self.count}-{rank}.out")
        out = open(path, "w")
        argv = [HERE, "--worker", method, "--rank", str(rank), "--world", str(world), "--port", str(port),
                "--master", self.master(), "--steps", str(a.steps), "--batch", str(a.batch), "--hidden",
                str(a.hidden), "--sync-every", str(a.sync_every), "--die-at", str(die_at), "--ckpt", ckpt,
                "--ckpt-every", str(a.ckpt_every), "--joinfile", joinfile, "--call-join-at", str(join_at), "--timeout", str(a.timeout)] + (["--joiner", joiner] if joiner else [])
        kw = dict(stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        t = time.time()
        if self.emu is not None:  # (a joiner would run in its rank's namespace: no WAN faults here)
            p = self.emu.run_python(rank, argv, env=self.env, **kw)
        else:
            p = subprocess.Popen([sys.executable] + argv, env=self.env, start_new_session=True, **kw)
        out.close()
        return _Proc(p, path, f"{method} rank {rank}{' (joiner)' if joiner else ''}", t, group)


def _port():
    sys.path.insert(0, ROOT)
    from pycoll.testing import free_port
    return free_port()


def _watch(procs, deadline, on_poll=None):
    """Poll until every process exited (on_poll(procs) may add more); returns procs."""
    while True:
        for q in list(procs):
            q.poll_events()
        if on_poll is not None:
            on_poll(procs)
        if all(q.t_exit is not None for q in procs):
            return procs
        if time.time() > deadline:
            raise TimeoutError("run overran --timeout")
        time.sleep(0.02)


def run_pycoll(method, launcher, a, faults):
    """pycoll methods: one group, faults injected in place; returns (procs, t0, fault times)."""
    n, port = a.ranks, _port()
    go = os.path.join(launcher.tmp, f"join-{time.monotonic_ns()}") if faults else ""
    t0 = time.time()
    procs = [launcher.start(method, r, n, port, die_at=(a.kill_at if r == 2 else a.kill0_at if r == 0 else -1)
                            if faults else -1, joinfile=go, join_at=a.join_at if faults else -1) for r in range(n)]
    marks = []
    # the spare: started with the others, it connects when a member calls it in at step C
    joiner = launcher.start(method, n, n, port, joiner=go) if faults else None

    def on_poll(ps):
        for q in ps:
            for kind in ("die", "join"):
                d = q.last(kind)
                m = ("kill" if kind == "die" else "join", d["t"]) if d else None
                if m and m not in marks and not (kind == "join" and any(k == "join" for k, _ in marks)):
                    marks.append(m)
            j = q.last("joining")
            if j and q.t_launch < j["t"]:
                q.t_launch = j["t"]  # (its start-up is not on the clock: a spare that was up)
        founders = [q.t_exit for q in ps if q is not joiner]
        if joiner and None not in founders and joiner.t_exit is None and time.time() > max(founders) + 15:
            raise RuntimeError(f"{method}: the joiner was never admitted (the group finished without it):\n"
                               + joiner.text()[-1500:])
    if joiner:
        procs.append(joiner)
    try:
        _watch(procs, t0 + a.timeout, on_poll)
    finally:
        for q in procs:
            if q.p.poll() is None:
                _ts._killpg(q.p)
    return procs, t0, sorted(marks, key=lambda m: m[1])


def run_gloo(launcher, a, faults, tmp):
    """Gloo DDP; with faults, the driver restarts the group as torchrun's elastic agent would."""
    ckpt = os.path.join(tmp, f"gloo-ckpt-{time.monotonic_ns()}.pt")
    t0 = time.time()
    allprocs, marks = [], []
    # (world, the rank that dies in this launch and when, or the step a joiner forces a restart at)
    plan = [(a.ranks, 2, a.kill_at, None), (a.ranks - 1, 0, a.kill0_at, None), (a.ranks - 2, None, -1, a.join_at),
            (a.ranks - 1, None, -1, None)] if faults else [(a.ranks, None, -1, None)]
    for group, (world, victim, die_at, join_at) in enumerate(plan):
        port = _port()
        procs = [launcher.start("gloo", r, world, port, die_at=die_at if r == victim else -1, ckpt=ckpt,
                                group=group) for r in range(world)]
        allprocs += procs
        state = {}

        def on_poll(ps):
            if state:
                return
            dead = [q for q in ps if q.p.returncode not in (None, 0)]
            joined = join_at is not None and any(e["ev"] == "step" and e["step"] >= join_at
                                                 for q in ps for e in q.events)
            if dead or joined:  # the agent: stop every worker, restart from the checkpoint
                state["restart"] = True
                d = next((q.last("die") for q in dead if q.last("die")), None)
                marks.append(("kill", d["t"]) if d else ("join", time.time()))
                for q in ps:
                    if q.p.poll() is None:
                        _ts._killpg(q.p)
        try:
            _watch(procs, t0 + a.timeout, on_poll)
        finally:
            for q in procs:
                if q.p.poll() is None:
                    _ts._killpg(q.p)
        if not state and all(q.p.returncode == 0 for q in procs):
            break
        if not state:
            raise RuntimeError("gloo: a worker failed:\n" + "\n".join(q.text()[-1500:] for q in procs))
        time.sleep(0.1)  # (torchrun's monitor interval: the agent sees the exit this late)
    return allprocs, t0, marks


def _ratio(x):
    return "-" if x is None else f"{x:.2f}"  # (no Gloo run to compare with: --methods without gloo)


# ---- driver: one run's figures --------------------------------------------------------------------
def summarize(method, procs, t0, marks, a):
    ends = [(q, q.last("end")) for q in procs]
    finished = [(q, e) for q, e in ends if e is not None]
    if not finished:
        raise RuntimeError(f"{method}: no process finished:\n" + "\n".join(q.text()[-1500:] for q in procs))
    bad = [q for q in procs if q.last("die") is None and q.p.returncode not in (0, -9) and q.last("end") is None]
    if bad and method != "gloo":
        raise RuntimeError(f"{method}: a process failed:\n" + "\n".join(q.text()[-2000:] for q in bad))
    t_end = max(q.t_exit for q in procs)
    wall = t_end - t0
    # a process that did not finish (killed, or stopped by the Gloo driver): its figures up to
    # its last step
    partial = [_last_step(q) for q, e in ends if e is None]
    compute = sum(e["compute"] for _, e in finished) + sum(s["compute"] for s in partial if s)
    held = sum(q.t_exit - q.t_launch for q in procs)
    loop = sum(e["loop"] for _, e in finished) + sum(_partial_loop(q) for q, e in ends if e is None)
    if method == "gloo":  # the lineage the final model comes from: steps x global batch
        samples = a.steps * a.batch
        run = {}  # per launch: steps taken (the furthest rank) since its start
        for q in procs:
            s0, last = q.last("start"), _last_step(q)
            if s0 and last:
                run[q.group] = max(run.get(q.group, 0), last["step"] - s0["step"])
        lost_steps = sum(run.values()) - a.steps
    else:
        samples = sum(e["samples"] for _, e in finished) + sum(s["samples"] for s in partial if s)
        lost_steps = max((e["discarded"] for _, e in finished), default=0)
    curve = _curve(procs, t0)
    final = statistics.median(e["final"] for _, e in finished)
    return {"method": method, "wall": wall, "samples": samples, "samples_per_s": samples / wall,
            "steps": max(e["step"] for _, e in finished), "steps_lost": lost_steps,
            "mb_per_rank": sum(e["bytes"] for e in (q.last("end") or _last_step(q) or {"bytes": 0}
                                                      for q in procs)) / a.ranks / 1e6,
            "util": compute / held, "loop_util": compute / loop if loop else 0.0, "final_loss": final,
            "survivors": len(finished), "processes": len(procs), "marks": [(k, t - t0) for k, t in marks],
            "curve": curve, "events": {q.label + f" @{q.t_launch - t0:.2f}": q.events for q in procs}}


def _last_step(q):
    return q.last("step")


def _partial_loop(q):
    """The time in the loop of a process that did not finish: from its start event to its end."""
    s = q.last("start")
    return (q.t_exit - s["t"]) if s else 0.0


def _curve(procs, t0):
    """(wall time, step, eval loss) of the group: one point per eval step and launch (a Gloo
    restart goes back to its checkpoint's loss), the first process to report it."""
    seen = {}
    for q in procs:
        for e in q.events:
            key = (q.group, e.get("step"))
            if e["ev"] == "eval" and (key not in seen or e["t"] < seen[key][0]):
                seen[key] = (e["t"], e["loss"])
    return sorted((t - t0, k[1], v, k[0]) for k, (t, v) in seen.items())


# ---- driver: parts, table, plot -------------------------------------------------------------------
def run_part(part, methods, a, tmp):
    """Every method (fault-free and, on loopback, with faults) --reps times; returns the runs."""
    runs = []
    emu_ctx = None
    if part == "wan":
        from pycoll.emulator import Emulator, EmuSpec, SiteSpec, parse_rate, parse_time
        half = a.ranks // 2
        base = EmuSpec.uniform(a.ranks, delay_s=parse_time(a.wan_delay))
        rate = parse_rate(a.wan_rate)
        spec = EmuSpec(a.ranks, link=base.link,
                       sites=[SiteSpec(tuple(range(half)), rate), SiteSpec(tuple(range(half, a.ranks)), rate)])
        emu_ctx = Emulator(spec)
    kinds = [False, True] if part == "loopback" and not a.no_faults else [False]
    try:
        emu = emu_ctx.__enter__() if emu_ctx is not None else None
        launcher = _Launcher(a, tmp, emu)
        for rep in range(a.reps):
            order = methods if rep % 2 == 0 else tuple(reversed(methods))
            for faults in kinds:
                for method in order:
                    if faults and method not in a.faults_for.split(","):
                        continue
                    load = os.getloadavg()[0]
                    if method == "gloo":
                        procs, t0, marks = run_gloo(launcher, a, faults, tmp)
                    else:
                        procs, t0, marks = run_pycoll(method, launcher, a, faults)
                    r = summarize(method, procs, t0, marks, a)
                    r.update(part=part, faults=faults, rep=rep, load=load)
                    runs.append(r)
                    for q in procs:
                        q.out.close()
                    print(f"# {part} {method}{' faults' if faults else ''} rep {rep}: wall {r['wall']:.1f} s, "
                          f"final loss {r['final_loss']:.4f}, survivors {r['survivors']}, load {load:.1f}",
                          flush=True)
    finally:
        if emu_ctx is not None:
            emu_ctx.__exit__(None, None, None)
    return runs


def table(runs, part, a):
    """Median rows per (method, faults) and their ratios; prints a markdown table, returns rows."""
    rows = []
    keys = sorted({(r["method"], r["faults"]) for r in runs if r["part"] == part},
                  key=lambda k: (k[1], METHODS.index(k[0])))
    med = lambda xs: statistics.median(xs)  # noqa: E731
    clean = {m: med([r["wall"] for r in runs if r["part"] == part and r["method"] == m and not r["faults"]])
             for m, _ in keys}
    clean_loss = {m: med([r["final_loss"] for r in runs if r["part"] == part and r["method"] == m
                          and not r["faults"]]) for m, _ in keys}
    for method, faults in keys:
        rs = [r for r in runs if r["part"] == part and r["method"] == method and r["faults"] == faults]
        row = {k: med([r[k] for r in rs]) for k in ("wall", "samples", "samples_per_s", "steps_lost", "mb_per_rank",
                                                     "util", "loop_util", "final_loss", "load")}
        row.update(method=method, faults=faults, n=len(rs), walls=[r["wall"] for r in rs],
                   survivors=rs[0]["survivors"], processes=rs[0]["processes"])
        row["lost"] = row["wall"] - clean[method] if faults else 0.0
        row["loss_vs_clean"] = row["final_loss"] / clean_loss[method]
        rows.append(row)
    gloo = next((r for r in rows if r["method"] == "gloo" and not r["faults"]), None)
    for r in rows:
        r["wall_vs_gloo"] = r["wall"] / gloo["wall"] if gloo else None
        r["speed_vs_gloo"] = r["samples_per_s"] / gloo["samples_per_s"] if gloo else None
    names = {"gloo": "DDP, Gloo", "ft": "FT-DDP, pycoll", "diloco": "DiLoCo, pycoll",
             "diloco-int8": "DiLoCo int8, pycoll"}
    print(f"\n## {part}: {a.ranks} ranks, {a.steps} steps x {a.batch} samples, MLP 32-{a.hidden}-{a.hidden}-1, "
          f"DiLoCo H={a.sync_every}" + (f"; faults: rank 2 killed at step {a.kill_at}, rank 0 at {a.kill0_at}, "
                                        f"a peer joins at {a.join_at}" if part == "loopback" and not a.no_faults
                                        else f"; two sites, {a.wan_rate}, one-way {a.wan_delay}, fault-free"))
    print("| method | faults | wall s | samples | samples/s | lost s (per failure) | steps lost | MB sent/rank | "
          "util | loop util | final loss | / fault-free | wall / Gloo | samples/s / Gloo |")
    print("|---" * 14 + "|")
    for r in rows:
        fault = ("kill, kill, join" + (": 3 restarts" if r["method"] == "gloo" else ": no restart")) \
            if r["faults"] else "none"
        lost = f"{r['lost']:.1f} ({r['lost'] / 2:.1f})" if r["faults"] else "-"
        print(f"| {names[r['method']]} | {fault} | {r['wall']:.1f} | {r['samples']:.0f} | {r['samples_per_s']:.0f} | "
              f"{lost} | {r['steps_lost']:.0f} | {r['mb_per_rank']:.1f} | {r['util']:.0%} | {r['loop_util']:.0%} | "
              f"{r['final_loss']:.4f} | {r['loss_vs_clean']:.3f} | {_ratio(r['wall_vs_gloo'])} | "
              f"{_ratio(r['speed_vs_gloo'])} |")
    return rows


def plot(runs, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    parts = list(dict.fromkeys(r["part"] for r in runs))  # (in the order they ran)
    fig, axes = plt.subplots(1, len(parts), figsize=(7 * len(parts), 4.8), squeeze=False)
    colors = {"gloo": "tab:red", "ft": "tab:blue", "diloco": "tab:green", "diloco-int8": "tab:olive"}
    for ax, part in zip(axes[0], parts):
        for r in runs:
            if r["part"] != part or r["rep"] != 0:
                continue
            ys = [c[2] for c in r["curve"]]
            label = f"{r['method']}{' + faults' if r['faults'] else ''}"
            for g in sorted({c[3] for c in r["curve"]}):  # a Gloo restart: a new segment, the gap dead time
                seg = [c for c in r["curve"] if c[3] == g]
                ax.plot([c[0] for c in seg], [c[2] for c in seg], color=colors[r["method"]],
                        linestyle="-" if r["faults"] else ":", label=label if g == r["curve"][0][3] else None)
            for kind, t in r["marks"]:
                y = next((c[2] for c in r["curve"] if c[0] >= t), ys[-1] if ys else 0)
                ax.plot([t], [y], marker="x" if kind == "kill" else "^", color=colors[r["method"]], markersize=9,
                        linestyle="none")
            ax.axvline(r["wall"], color=colors[r["method"]], linestyle="-" if r["faults"] else ":", alpha=0.3)
        ax.set_yscale("log")
        ax.set_xlabel("wall time (s), from launching the first process")
        ax.set_ylabel("eval loss (MSE)")
        ax.set_title(f"{part}: x = a peer killed, ^ = a peer joins (Gloo: a restart); "
                     "faint line = done", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default="loopback,wan", help="loopback, wan or both (wan needs root)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=192, help="global batch (divisible by 2, 3 and 4)")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--sync-every", type=int, default=20, help="DiLoCo's H")
    ap.add_argument("--kill-at", type=int, default=70)
    ap.add_argument("--kill0-at", type=int, default=130)
    ap.add_argument("--join-at", type=int, default=190)
    ap.add_argument("--ckpt-every", type=int, default=25, help="Gloo's checkpoints, in steps")
    ap.add_argument("--no-faults", action="store_true", help="loopback fault-free only")
    ap.add_argument("--faults-for", default=",".join(METHODS), help="the methods run with faults too (loopback)")
    ap.add_argument("--wan-rate", default="1gbit")
    ap.add_argument("--wan-delay", default="25ms", help="one way")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--toy", action="store_true", help="the test's size: 60 steps, hidden 64, faults at 12/24/36")
    ap.add_argument("--timeout", type=float, default=300.0, help="per run")
    ap.add_argument("--keep", default="", help="a folder to keep the ranks' output in")
    ap.add_argument("--json")
    ap.add_argument("--plot")
    ap.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--world", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--master", default="127.0.0.1", help=argparse.SUPPRESS)
    ap.add_argument("--die-at", type=int, default=-1, help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", default="", help=argparse.SUPPRESS)
    ap.add_argument("--joiner", default="", help=argparse.SUPPRESS)
    ap.add_argument("--joinfile", default="", help=argparse.SUPPRESS)
    ap.add_argument("--call-join-at", type=int, default=-1, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        a.method = a.worker
        return rank_main(a)
    if a.toy:
        a.steps, a.hidden, a.sync_every, a.kill_at, a.kill0_at, a.join_at, a.ckpt_every = 60, 64, 6, 12, 24, 36, 10
    methods = tuple(a.methods.split(","))
    if not set(methods) <= set(METHODS) or a.batch % 12 or a.ranks < 3 or a.steps % a.sync_every:
        ap.error(f"--methods from {METHODS}; --batch divisible by 12; --ranks >= 3; --steps a multiple of H")
    if not a.kill_at < a.kill0_at < a.join_at < a.steps:
        ap.error("faults: --kill-at < --kill0-at < --join-at < --steps")
    parts = a.parts.split(",")
    if "wan" in parts:
        from pycoll.emulator import available
        ok, why = available()
        if not ok:
            print(f"# no WAN part: cannot emulate a network here: {why}")
            parts.remove("wan")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # (a killed driver still stops its ranks)
    load0 = os.getloadavg()
    print(f"# load average before: {' '.join(f'{x:.1f}' for x in load0)} on {os.cpu_count()} CPUs", flush=True)
    runs, tables = [], {}
    with tempfile.TemporaryDirectory(prefix="ftt-bench-") as tmp:
        for part in parts:
            runs += run_part(part, methods, a, a.keep or tmp)
    for part in parts:
        tables[part] = table(runs, part, a)
    load1 = os.getloadavg()
    print(f"\n# load average after: {' '.join(f'{x:.1f}' for x in load1)}; medians of {a.reps} run(s) per row")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(a).items()}, "load_before": load0, "load_after": load1,
                       "tables": tables, "runs": runs}, f)
    if a.plot:
        plot(runs, a.plot)
        print(f"# plot: {a.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
