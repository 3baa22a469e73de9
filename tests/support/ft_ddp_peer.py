"""Peers for tests/e2e/test_ft_ddp.py: a training loop with pycoll.train.FaultTolerantDDP that
reports every step down a pipe (so the steps of a peer that is killed reach the test too), and
dies by SIGKILL at a step of the test's choosing; plus the problem (teacher, data) and a
fault-free reference run in one process.

Peer ``idx``'s batch at step ``s`` comes from a generator seeded with (idx, s): any process
(the reference run, the test) can draw it again.
"""
import os
import pickle
import signal
import time

import torch

HB = 5.0  # heartbeat timeout (s); SIGKILL is seen sooner (connections drop): 5 s spares a loaded host
DIM, HIDDEN, BATCH = 16, 384, 16  # HIDDEN^2 floats: a tensor big enough (576 KiB) to be striped


def make_net():
    torch.manual_seed(0)  # every peer starts from the same weights
    return torch.nn.Sequential(torch.nn.Linear(DIM, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, HIDDEN),
                               torch.nn.Tanh(), torch.nn.Linear(HIDDEN, 1))


def make_opt(net):
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.01)
    return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=8, gamma=0.7)


def _teacher():
    g = torch.Generator().manual_seed(1234)
    w1, w2 = torch.randn(DIM, 8, generator=g), torch.randn(8, 1, generator=g)
    return lambda x: torch.tanh(x @ w1) @ w2


TEACHER = _teacher()


def batch(idx, step):
    g = torch.Generator().manual_seed(1000 * idx + step)
    x = torch.randn(BATCH, DIM, generator=g)
    return x, TEACHER(x)


def eval_loss(net):
    g = torch.Generator().manual_seed(99)
    x = torch.randn(512, DIM, generator=g)
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(net(x), TEACHER(x)))


def reference_run(idxs, steps):
    """The fault-free run: every step the mean gradient of peers ``idxs``, in one process."""
    net = make_net()
    opt, sched = make_opt(net)
    for s in range(steps):
        grads = []
        for i in idxs:
            net.zero_grad()
            x, y = batch(i, s)
            torch.nn.functional.mse_loss(net(x), y).backward()
            grads.append([p.grad.clone() for p in net.parameters()])
        for p, gs in zip(net.parameters(), zip(*grads)):
            p.grad = torch.stack(gs).mean(0)
        opt.step()
        sched.step()
    return eval_loss(net)


def _send(conn, *msg):
    conn.send_bytes(pickle.dumps(msg))


def die_before_bucket(model, index, when):
    """SIGKILL ourselves, when ``when()``, just before bucket ``index``'s all-reduce (on the
    wrapper's thread, which runs the buckets in order): the buckets before it committed with
    our gradients in them, this one and those after it run without us."""
    reduce = model._reduce

    def maybe_die(b):
        if b.index == index and when():
            os.kill(os.getpid(), signal.SIGKILL)
        return reduce(b)
    model._reduce = maybe_die


def fail_after_bucket(model, index, when, peers_done):
    """Once, when ``when()``: run bucket ``index``'s all-reduce, wait until the files
    ``peers_done`` exist (the other peers' :func:`mark_bucket_done`: theirs finished too), then
    fail it here as a call that broke after its peers had finished theirs does (the engine's
    failure path: the epoch is marked broken and the failure reported to the coordinator,
    which aborts the epoch everywhere): the peers apply the step, this one drops it."""
    from pycoll.core.native import lib
    reduce, fired = model._reduce, []

    def reduce_then_fail(b):
        reduce(b)
        if b.index == index and b.error is None and not fired and when():
            fired.append(True)
            deadline = time.monotonic() + 30
            while not all(os.path.exists(f) for f in peers_done):
                assert time.monotonic() < deadline, "the peers never finished their bucket"
                time.sleep(0.01)
            b.error = model.comm.epoch_state.failure(lib.PC_ERR_IO, -1, "all_reduce")
    model._reduce = reduce_then_fail


def mark_bucket_done(model, index, when, path):
    """Create ``path`` once bucket ``index``'s all-reduce succeeded, when ``when()``."""
    reduce = model._reduce

    def reduce_then_mark(b):
        reduce(b)
        if b.index == index and b.error is None and when():
            open(path, "w").close()
    model._reduce = reduce_then_mark


def peer(idx, world, port, steps, plan, join_file, conn):
    """One peer. ``plan``: {"die_mid_backward": step, "die_before_backward": step, "join": bool,
    "call_joiner_at": step (a member: at this step, create ``join_file`` and wait for a joiner
    first), "perturb_at": step (change a weight after that step), "fail_last_bucket_at": step and
    "after_peers": [idx, ...] (see fail_after_bucket), "mark_last_bucket_at": step (for them), "on_failure": ...}."""
    import pycoll
    from pycoll.train import FaultTolerantDDP
    try:
        kw = dict(heartbeat_timeout=HB, timeout=20, preserve_input=False)
        if plan.get("join"):
            deadline = time.monotonic() + 90
            while not os.path.exists(join_file):  # (a file, not an Event: no semaphore left behind)
                assert time.monotonic() < deadline, "never called in"
                time.sleep(0.02)
            comm = pycoll.connect("127.0.0.1", port, name=f"p{idx}", join_timeout=60, **kw)
        else:
            comm = pycoll.init(idx, world, "127.0.0.1", port, **kw)
        net = make_net()
        opt, sched = make_opt(net)
        # 3 buckets: [last bias, last weight, middle bias], [middle weight], [first bias, first weight]
        model = FaultTolerantDDP(net, opt, comm, scheduler=sched, bucket_cap_mb=2 * HIDDEN * 4 / 2 ** 20,
                                 on_failure=plan.get("on_failure", "complete"))
        _send(conn, "heal", model.step, model.state.digest(), model.last_heal.bytes_received,
              len({r for v in model.last_heal.sources.values() for r in v}))
        if "die_mid_backward" in plan:
            die_before_bucket(model, 1, lambda: model.step == plan["die_mid_backward"])
        last = len(model._buckets) - 1
        if "fail_last_bucket_at" in plan:
            fail_after_bucket(model, last, lambda: model.step == plan["fail_last_bucket_at"],
                              [f"{join_file}.done{i}" for i in plan["after_peers"]])
        if "mark_last_bucket_at" in plan:
            mark_bucket_done(model, last, lambda: model.step == plan["mark_last_bucket_at"], f"{join_file}.done{idx}")
        for _ in range(steps * 2):  # bounded: a discarded step is tried with the next batch
            if model.step >= steps:
                break
            if plan.get("call_joiner_at") == model.step:
                open(join_file, "w").close()
                deadline = time.monotonic() + 60
                while comm.pending_joiners() == 0:
                    assert time.monotonic() < deadline, "the joiner never came"
                    time.sleep(0.02)
                plan = dict(plan, call_joiner_at=None)
            model.optimizer.zero_grad()
            drawn_at = model.step  # (after a heal that zero_grad() waited for: the healed step)
            x, y = batch(idx, drawn_at)
            loss = torch.nn.functional.mse_loss(model(x), y)
            if plan.get("die_before_backward") == model.step:
                os.kill(os.getpid(), signal.SIGKILL)
            loss.backward()
            report = model.optimizer.step()
            if plan.get("perturb_at") == model.step:  # a silent divergence (a bug, a bit flip)
                with torch.no_grad():
                    net[0].weight[0, 0] += 1e-3
            _send(conn, "step", model.step, model.state.digest(), report.applied,
                  [len(c or ()) for c in report.contributors], len(report.members), comm.world_size, model.heals,
                  len(model.last_heal.fetched), model.sync_points, drawn_at)
        _send(conn, "done", model.step, eval_loss(net), comm.world_size)
        model.close()
        comm.close()
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        import traceback
        _send(conn, "error", f"{type(exc).__name__}: {exc}", traceback.format_exc())
