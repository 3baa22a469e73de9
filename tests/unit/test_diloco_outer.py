"""The DiLoCo family without sockets: the streaming schedule, the fragments, the outer Nesterov
step against torch.optim.SGD bit for bit, and DiLoCo's outer loop (sync, async, streaming) on a
one-peer stand-in communicator against the torch reference of tests/support/diloco_task.py."""
import types

import pytest
import torch

import diloco_task
from pycoll.comm.agreement import Outcome
from pycoll.comm.work import Work
from pycoll.errors import InvalidArgument
from pycoll.train import DiLoCo
from pycoll.train.outer import Schedule, nesterov_, split_fragments


# ---- the schedule ------------------------------------------------------------
@pytest.mark.parametrize("H, F", [(1, 1), (8, 1), (8, 2), (8, 4), (8, 8), (12, 3)])
def test_each_fragment_syncs_once_per_round_staggered_evenly(H, F):
    s = Schedule(H, F)
    due = {step: s.due(step) for step in range(1, 5 * H + 1)}
    for f in range(F):
        steps = [step for step, g in due.items() if g == f]
        assert len(steps) == 5, (f, steps)
        assert all(b - a == H for a, b in zip(steps, steps[1:])), steps  # once every H steps
        assert all((step + f * (H // F)) % H == 0 for step in steps)    # the formula
    syncs = [step for step, g in due.items() if g is not None]
    assert all(b - a == H // F for a, b in zip(syncs, syncs[1:])), syncs  # one every H / F steps
    assert s.due(0) is None
    if F == 1:
        assert syncs == list(range(H, 5 * H + 1, H))  # plain DiLoCo: every H steps


@pytest.mark.parametrize("H, F", [(0, 1), (8, 0), (8, 3), (4, 8), (2.0, 1)])
def test_a_schedule_that_cannot_stagger_evenly_is_refused(H, F):
    with pytest.raises(InvalidArgument):
        Schedule(H, F)


@pytest.mark.parametrize("sizes, F", [([512, 32, 32, 1], 2), ([10] * 7, 3), ([1, 1000, 1, 1], 4), ([5], 1),
                                      ([100, 1, 1, 1, 1, 100], 3)])
def test_fragments_are_contiguous_whole_tensors_none_empty(sizes, F):
    groups = split_fragments(sizes, F)
    assert len(groups) == F and all(groups)
    assert [i for g in groups for i in g] == list(range(len(sizes)))


def test_fragments_share_the_elements_about_evenly():
    groups = split_fragments([10] * 8, 4)
    assert [len(g) for g in groups] == [2, 2, 2, 2]
    with pytest.raises(InvalidArgument):
        split_fragments([10, 10], 3)


# ---- the outer step ------------------------------------------------------------
@pytest.mark.parametrize("foreach", [False, True])
def test_outer_nesterov_step_is_torch_sgd_bit_for_bit(foreach):
    g = torch.Generator().manual_seed(3)
    ref = [torch.randn(n, generator=g) for n in (1000, 7)]
    mine = [t.clone() for t in ref]
    bufs = [torch.zeros_like(t) for t in mine]
    params = [torch.nn.Parameter(t) for t in ref]
    opt = torch.optim.SGD(params, lr=0.7, momentum=0.9, nesterov=True, foreach=foreach)
    for _ in range(5):
        grads = [torch.randn(p.shape, generator=g) for p in params]
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        opt.step()
        for t, b, gr in zip(mine, bufs, grads):
            nesterov_(t, b, gr, 0.7, 0.9)
    for p, t, b in zip(params, mine, bufs):
        assert torch.equal(p.detach(), t)
        assert torch.equal(opt.state[p]["momentum_buffer"], b)


# ---- the outer loop on one peer --------------------------------------------------
class OnePeer:
    """A communicator of one peer: its sums are its own values, nobody joins or leaves."""

    name, rank, world_size, members, joined, lost = "solo", 0, 1, ["solo"], [], []

    def __init__(self):
        self.last_outcome = None
        self.calls = []

    def all_reduce(self, arr, op="sum", *, retry=False, async_op=False, **kw):
        assert op == "sum" and retry, "DiLoCo sums with agreed retries"
        self.calls.append(("all_reduce", async_op, kw.get("compression")))
        self.last_outcome = Outcome(["solo"], 1, 1, 1, 1, [], None)
        if async_op:
            work = Work("all_reduce")
            work.complete(arr)
            return work
        return arr

    def update_topology(self):
        self.calls.append(("update_topology",))
        return False

    def sync_shared_state(self, state, revision, timeout=None):
        self.calls.append(("sync_shared_state", revision))
        return types.SimpleNamespace(fetched=[], revision=revision)


def _run_alone(cfg):
    torch.set_num_threads(1)
    comm = OnePeer()
    model = diloco_task.student()
    d = DiLoCo(model, diloco_task.inner_optimizer(model, cfg), comm, sync_every=cfg["sync_every"], mode=cfg["mode"],
               fragments=cfg.get("fragments"), outer_lr=cfg["outer_lr"], momentum=cfg["momentum"],
               compression=cfg.get("compression"))
    data = diloco_task.batches(comm.name)
    rounds = []
    for _ in range(cfg["rounds"] * cfg["sync_every"]):
        x, y = next(data)
        torch.nn.functional.mse_loss(model(x), y).backward()
        r = d.step()
        if r is not None:
            rounds.append(r)
    d.finish()
    return d, comm, rounds, model


@pytest.mark.parametrize("mode, fragments", [("sync", None), ("async", None), ("streaming", 2), ("streaming", 4)])
def test_outer_loop_on_one_peer_is_the_torch_reference_bit_for_bit(mode, fragments):
    cfg = dict(sync_every=4, rounds=3, mode=mode, fragments=fragments, outer_lr=0.7, momentum=0.9, inner_lr=0.05)
    d, comm, rounds, model = _run_alone(cfg)
    _, ref = diloco_task.simulate(["solo"], cfg)
    for name, tensor in ref.items():
        assert torch.equal(d.shared_state[name], tensor), name
    # after finish() the model holds the shared parameters (streaming: every fragment's)
    assert diloco_task.shared_loss(d.shared_state, cfg) == diloco_task.eval_loss(model)
    F = diloco_task.fragments_of(cfg)
    assert d.inner_steps == 12 and len(rounds) == 3 * F
    assert [r.fragment for r in rounds] == [Schedule(4, F).due(s) for s in range(1, 13) if Schedule(4, F).due(s)
                                            is not None]
    # every outer step is a sync point: the sum, then update_topology, then sync_shared_state
    kinds = [c[0] for c in comm.calls]
    assert kinds[0] == "sync_shared_state" and kinds.count("update_topology") == len(rounds)
    if mode == "async":  # one round late: the first outer step applies nothing, finish() the last round
        assert [bool(r.contributors) for r in rounds] == [False, True, True]
        assert d.revision == 4 and all(c[1] for c in comm.calls if c[0] == "all_reduce")
    else:
        assert all(r.contributors == ["solo"] for r in rounds) and d.revision == len(rounds)


def test_compression_is_passed_to_the_all_reduce():
    cfg = dict(sync_every=2, rounds=1, mode="sync", outer_lr=0.7, momentum=0.9, compression="bfloat16")
    _, comm, _, _ = _run_alone(cfg)
    assert [c[2] for c in comm.calls if c[0] == "all_reduce"] == ["bf16"]


@pytest.mark.parametrize("kw", [dict(mode="eager"), dict(mode="sync", fragments=2), dict(compression="zip"),
                                dict(mode="streaming", fragments=3)])
def test_bad_arguments_are_refused(kw):
    model = diloco_task.student()
    with pytest.raises(InvalidArgument):
        DiLoCo(model, torch.optim.SGD(model.parameters(), lr=0.1), OnePeer(), sync_every=4, **kw)


def test_parameters_of_mixed_dtypes_are_refused():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1).double())
    with pytest.raises(InvalidArgument, match="one floating dtype"):
        DiLoCo(model, torch.optim.SGD(model.parameters(), lr=0.1), OnePeer(), sync_every=4)
