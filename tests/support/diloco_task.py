"""The DiLoCo tests' task, peer loop and reference.

The task: a small MLP learns a fixed random teacher MLP (regression, MSE); each peer draws its
own batches from a generator seeded by its name. ``train`` is one peer's loop on
``pycoll.train.DiLoCo`` with SIGKILLs and a join at fixed inner steps; ``simulate`` runs the same
algorithm for several peers in one process with torch alone (torch.optim.SGD as the outer
optimizer), the reference the tests compare with.
"""
import os
import pickle
import signal
import time
import traceback
import zlib

import torch

from pycoll.train.outer import split_fragments

IN, HIDDEN = 16, 32
BATCH = 32


def teacher():
    g = torch.Generator().manual_seed(1234)
    net = torch.nn.Sequential(torch.nn.Linear(IN, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, 1))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 2.0 / p.shape[-1] ** 0.5)
    return net


def student():
    torch.manual_seed(0)  # every peer starts from the same weights
    return torch.nn.Sequential(torch.nn.Linear(IN, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, 1))


def batches(name):
    """This peer's batches, forever (the same for a name wherever it runs)."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    net = teacher()
    while True:
        x = torch.randn(BATCH, IN, generator=g)
        with torch.no_grad():
            y = net(x)
        yield x, y  # (outside no_grad: a generator suspended inside it would leave grad off for the caller)


def eval_loss(model):
    g = torch.Generator().manual_seed(99)
    x = torch.randn(1024, IN, generator=g)
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(model(x), teacher()(x)))


def inner_optimizer(model, cfg):
    return torch.optim.AdamW(model.parameters(), lr=cfg.get("inner_lr", 1e-2))


def state_hash(diloco):
    from pycoll.comm.shared_state import hash_arrays
    state = diloco.shared_state
    return tuple(hash_arrays([state[k] for k in sorted(state)]))


def train(comm, cfg, progress=None, data_name=None):
    """One peer; it draws the batches of ``data_name`` (default: its name). ``cfg``: sync_every,
    rounds, mode, fragments, compression, outer_lr, momentum, inner_lr,
    ``kills`` {inner step: the founder (by its first rank) that SIGKILLs itself just before it}, ``join`` (inner step before
    which the members wait for a pending joiner), ``metrics`` (average the loss each step with
    all_reduce(retry=True), as a user's logging would). ``progress`` (a shared int) gets the revision."""
    from pycoll.train import DiLoCo
    torch.set_num_threads(1)
    model = student()
    diloco = DiLoCo(model, inner_optimizer(model, cfg), comm, sync_every=cfg["sync_every"], mode=cfg["mode"],
                    fragments=cfg.get("fragments"), compression=cfg.get("compression"),
                    outer_lr=cfg.get("outer_lr", 0.7), momentum=cfg.get("momentum", 0.9))
    records = [_record(diloco, comm, diloco.last_round)]
    data = batches(data_name or comm.name)
    total = cfg["rounds"] * cfg["sync_every"]
    kills, join = cfg.get("kills", {}), cfg.get("join")
    # a kill names a founder by its first rank: after a death the ranks shift, and a survivor that
    # re-reaches a kill step (or takes the dead one's rank) is not the one the test meant
    founder_rank = None if records[0]["joined"] else comm.rank
    for _ in range(total + 1):
        step = diloco.inner_steps + 1
        if step > total:
            break
        if founder_rank is not None and kills.get(step) == founder_rank:
            _wait_settled(diloco)  # async: its last round's all-reduce has finished (see the test)
            os.kill(os.getpid(), signal.SIGKILL)
        if step == join and not records[0]["joined"]:
            # Every sync point before the join done, and said so: the joiner connects only then
            # (Group.join_when: the revision before the join), so the next sync point admits it,
            # however fast it starts (in CI a joiner that connected while members were still
            # before an earlier sync point was admitted there, and met this wait's all-reduce).
            _wait_settled(diloco)
            if progress is not None:
                with progress.get_lock():
                    progress.value = max(progress.value, diloco.revision)
            _wait_for_joiner(comm)
        x, y = next(data)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        if cfg.get("metrics"):  # a user's own agreed call each step (async: queued behind DiLoCo's)
            comm.all_reduce(loss.detach().reshape(1).clone(), op="avg", retry=True)
        done = diloco.step()
        if done is not None:
            records.append(_record(diloco, comm, done))
            if progress is not None:
                with progress.get_lock():
                    progress.value = max(progress.value, diloco.revision)
    last = diloco.finish()
    if last is not None:
        records.append(_record(diloco, comm, last))
    return {"name": comm.name, "records": records, "loss": shared_loss(diloco.shared_state, cfg),
            "hash": state_hash(diloco),
            "params": {k: v.clone() for k, v in diloco.shared_state.items()}}


def fragments_of(cfg):
    return cfg.get("fragments") or (4 if cfg["mode"] == "streaming" else 1)


def shared_loss(state, cfg):
    """The eval loss of the shared parameters in ``state`` (DiLoCo.shared_state's names)."""
    model = student()
    params = list(model.parameters())
    with torch.no_grad():
        for f, idx in enumerate(split_fragments([p.numel() for p in params], fragments_of(cfg))):
            flat, offset = state[f"diloco.params.{f}"], 0
            for i in idx:
                params[i].copy_(flat[offset:offset + params[i].numel()].view_as(params[i]))
                offset += params[i].numel()
    return eval_loss(model)


def _record(diloco, comm, rnd):
    return {"revision": rnd.revision, "step": rnd.step, "contributors": sorted(rnd.contributors),
            "joined": sorted(rnd.joined), "lost": sorted(rnd.lost), "fetched": sorted(rnd.fetched),
            "members": list(comm.members), "hash": state_hash(diloco)}


def _wait_settled(diloco, limit=30.0):
    deadline = time.monotonic() + limit
    while diloco.in_flight and time.monotonic() < deadline:
        time.sleep(0.005)


def _wait_for_joiner(comm, limit=60.0):
    """Every member sees a pending joiner (agreed with a min all-reduce) before going on."""
    deadline = time.monotonic() + limit
    flag = torch.zeros(1, dtype=torch.int64)
    while True:
        flag[0] = comm.pending_joiners()
        comm.all_reduce(flag, op="min")
        if flag[0] >= 1:
            return
        if time.monotonic() > deadline:
            raise TimeoutError("no joiner arrived")
        time.sleep(0.02)


def simulate(names, cfg):
    """The same training for the peers ``names`` in this process, fault-free, with torch alone.
    Returns (eval loss, {shared tensor name: tensor}) like ``train``'s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _simulate(names, cfg)
    finally:
        torch.set_num_threads(threads)


def _simulate(names, cfg):
    H, F = cfg["sync_every"], fragments_of(cfg)
    mode, total = cfg["mode"], cfg["rounds"] * cfg["sync_every"]
    outer_model = student()
    params = list(outer_model.parameters())
    groups = split_fragments([p.numel() for p in params], F)
    outers = [torch.optim.SGD([params[i] for i in g], lr=cfg.get("outer_lr", 0.7), momentum=cfg.get("momentum", 0.9),
                              nesterov=True, foreach=False) for g in groups]
    models = {n: student() for n in names}
    inners = {n: inner_optimizer(models[n], cfg) for n in names}
    streams = {n: batches(n) for n in names}
    pending = None  # async: the last round's average, applied one round late
    for step in range(1, total + 1):
        for n in names:
            x, y = next(streams[n])
            torch.nn.functional.mse_loss(models[n](x), y).backward()
            inners[n].step()
            inners[n].zero_grad()
        due = [f for f in range(F) if (step + f * (H // F)) % H == 0]
        for f in due:
            idx = groups[f]
            with torch.no_grad():
                deltas = [[params[i] - list(models[n].parameters())[i] for i in idx] for n in names]
                avg = []
                for k in range(len(idx)):
                    total_k = deltas[0][k]
                    for d in deltas[1:]:
                        total_k = total_k + d[k]
                    avg.append(total_k / len(names))
            if mode == "async":
                avg, pending = pending, avg
            if avg is not None:
                for i, a in zip(idx, avg):
                    params[i].grad = a
                outers[f].step()
            with torch.no_grad():
                for n in names:
                    for i in idx:
                        list(models[n].parameters())[i].copy_(params[i])
    if pending is not None:
        for i, a in zip(groups[0], pending):
            params[i].grad = a
        outers[0].step()
    state = {}
    for f, g in enumerate(groups):
        with torch.no_grad():
            state[f"diloco.params.{f}"] = torch.cat([params[i].detach().reshape(-1) for i in g])
            state[f"diloco.momentum.{f}"] = torch.cat([outers[f].state[params[i]]["momentum_buffer"].reshape(-1)
                                                       for i in g])
    return shared_loss(state, cfg), state


# ---- processes: founders made by pycoll.init (rank 0 hosts the coordinator), joiners by connect ----
PEER_KW = dict(heartbeat_timeout=4.0, timeout=30)  # (a SIGKILL drops connections: seen at once)


def founder(rank, n, port, cfg, progress, conn):
    """Founder ``rank`` of ``n`` (data ``f<rank>``); sends train's result, or the error, down ``conn``."""
    def run():
        import pycoll
        return pycoll.init(rank, n, "127.0.0.1", port, **PEER_KW, **cfg.get("connect", {}))
    _serve(conn, run, cfg, progress, f"f{rank}")


def joiner(name, revision, port, cfg, progress, conn, limit=60.0):
    """A peer that joins the running group once it reached ``revision`` (started early, so its
    imports are done by then), through the coordinator's address (a successor coordinator serves
    it when the first one is gone)."""
    def run():
        import pycoll
        deadline = time.monotonic() + limit
        while progress.value < revision:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the group never reached revision {revision}")
            time.sleep(0.01)
        return pycoll.connect("127.0.0.1", port, name=name, join_timeout=60, **PEER_KW, **cfg.get("connect", {}))
    _serve(conn, run, cfg, progress, name)


def _serve(conn, make, cfg, progress, data_name):
    try:
        comm = make()
        try:
            payload = ("ok", train(comm, cfg, progress, data_name))
        finally:
            comm.close()
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        payload = ("error", f"{type(exc).__name__}: {exc}", traceback.format_exc())
    conn.send_bytes(pickle.dumps(payload))
    conn.close()
