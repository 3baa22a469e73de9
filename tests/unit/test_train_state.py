"""pycoll.train.state.TrainingState: the training state as one name -> tensor dict (no sockets: a
sync is simulated by copying one peer's tensors into another's)."""
import pytest

torch = pytest.importorskip("torch", reason="torch is an optional extra (pip install -e '.[torch]')")

from pycoll.train.state import TrainingState  # noqa: E402

OPTIMIZERS = {
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.01),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
}


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def _peer(kind, materialize=True, scheduler=True):
    net = _net()
    opt = OPTIMIZERS[kind](net.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5) if scheduler else None
    gen = torch.Generator().manual_seed(7)
    state = TrainingState(net, opt, scheduler=sched, generators=[gen]) if materialize else None
    return net, opt, sched, gen, state


def _train(net, opt, sched, steps, start=0, state=None):
    for s in range(start, start + steps):
        g = torch.Generator().manual_seed(s)
        x, y = torch.randn(5, 6, generator=g), torch.randn(5, 2, generator=g)
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(x), y).backward()
        opt.step()
        if sched is not None:
            sched.step()
        if state is not None:
            state.advance()


def _equal_state(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.tensors().values(), b.tensors().values()))


@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_materialized_state_steps_bit_for_bit_like_a_fresh_optimizer(kind):
    net_a, opt_a, sched_a, _, state = _peer(kind)
    net_b, opt_b, sched_b, _, _ = _peer(kind, materialize=False)
    before = {n: p.detach().clone() for n, p in net_a.named_parameters()}
    assert all(torch.equal(p, before[n]) for n, p in net_b.named_parameters())  # parameters untouched
    names = sorted(state.tensors())
    assert [n for n in names if n.startswith("optim/")]  # the state exists before the first step
    _train(net_a, opt_a, sched_a, 4)
    _train(net_b, opt_b, sched_b, 4)
    for (n, pa), pb in zip(net_a.named_parameters(), net_b.parameters()):
        assert torch.equal(pa, pb), n
    for pa, pb in zip(net_a.parameters(), net_b.parameters()):
        for key, va in opt_a.state[pa].items():
            vb = opt_b.state[pb][key]
            assert (torch.equal(va, vb) if isinstance(va, torch.Tensor) else va == vb), key
    assert sorted(state.tensors()) == names  # the same names after training


@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_a_peer_given_the_tensors_of_another_holds_its_whole_state(kind):
    net_a, opt_a, sched_a, gen_a, a = _peer(kind)
    net_b, opt_b, sched_b, gen_b, b = _peer(kind)
    assert a.digest() == b.digest()  # made alike: equal
    _train(net_a, opt_a, sched_a, 3, state=a)
    gen_a.manual_seed(123)
    assert a.digest() != b.digest()
    src, dst = a.tensors(), b.tensors()
    assert sorted(src) == sorted(dst)
    assert {"train/step", "train/meta", "train/rng.0"} <= set(src)
    assert any(n.startswith("buffer/") for n in src)  # BatchNorm's running statistics travel too
    for name, t in src.items():  # what sync_shared_state does: the bytes into the live tensors
        dst[name].copy_(t)
    b.restore()
    assert b.step == 3 and sched_b.last_epoch == sched_a.last_epoch
    assert opt_b.param_groups[0]["lr"] == opt_a.param_groups[0]["lr"] != 0.05 if kind == "sgd-momentum" else True
    assert torch.equal(gen_b.get_state(), gen_a.get_state())
    assert a.digest() == b.digest()  # and again after capturing (the meta pickles alike)
    _train(net_a, opt_a, sched_a, 3, start=3, state=a)  # the same future: scheduler, optimizer, step
    _train(net_b, opt_b, sched_b, 3, start=3, state=b)
    assert a.digest() == b.digest() and _equal_state(a, b)
    assert torch.equal(torch.randn(4, generator=gen_a), torch.randn(4, generator=gen_b))


def test_digest_sees_every_tensor_and_hashes_name_them():
    net, opt, sched, gen, state = _peer("adamw")
    h0 = state.hashes()
    d0 = state.digest()
    assert set(h0) == set(state.tensors())
    p = next(net.parameters())
    opt.state[p]["exp_avg"].view(-1)[0] += 1e-30  # one tensor, one element
    h1 = state.hashes()
    assert state.digest() != d0
    assert [n for n in h0 if h0[n] != h1[n]] == ["optim/0.0/exp_avg"]
    opt.state[p]["exp_avg"].view(-1)[0] = 0.0
    assert state.digest() == d0
    opt.param_groups[0]["lr"] = 0.5  # a hyperparameter: in train/meta
    h2 = state.hashes()
    assert [n for n in h0 if h0[n] != h2[n]] == ["train/meta"]


@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_checkpoint_round_trip(kind):
    net_a, opt_a, sched_a, gen_a, a = _peer(kind)
    _train(net_a, opt_a, sched_a, 3, state=a)
    ckpt = a.state_dict()
    net_b, opt_b, sched_b, gen_b, b = _peer(kind)
    b.load_state_dict(ckpt)
    assert b.step == 3 and a.digest() == b.digest()
    _train(net_a, opt_a, sched_a, 2, start=3, state=a)
    _train(net_b, opt_b, sched_b, 2, start=3, state=b)
    assert a.digest() == b.digest()
    # a checkpoint from before the first step (no optimizer state in it) loads too
    _, _, _, _, c = _peer(kind)
    fresh = _peer(kind)[4]
    c.load_state_dict(fresh.state_dict())
    assert c.digest() == fresh.digest()


def test_non_tensor_state_larger_than_meta_bytes_is_a_clear_error():
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    state = TrainingState(net, opt, meta_bytes=64)
    with pytest.raises(ValueError, match="meta_bytes"):
        state.tensors()


def test_non_contiguous_parameters_are_refused():
    lin = torch.nn.Linear(4, 4)
    lin.weight = torch.nn.Parameter(torch.randn(4, 4).t())
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="contiguous"):
        TrainingState(lin, opt)
