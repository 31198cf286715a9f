"""minunet.optim: SGD, Adam and AdamW against the update rules in tests/reference.py and against
torch.optim (float64, several steps, on every device), state_dict round trips that continue
bit for bit, and the learning-rate schedules against torch's."""
import numpy as np
import pytest

import reference as ref
from minunet import backend, nn, optim
from minunet.autograd import tensor

SGD_CONFIGS = [
    dict(lr=0.1),
    dict(lr=0.05, momentum=0.9),
    dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.01),
    dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.1),
]
ADAM_CONFIGS = [
    (optim.Adam, dict(lr=0.01)),
    (optim.Adam, dict(lr=0.02, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)),
    (optim.AdamW, dict(lr=0.01)),
    (optim.AdamW, dict(lr=0.02, betas=(0.5, 0.9), weight_decay=0.3)),
]
SHAPES = [(3, 2, 3, 3), (3,)]
STEPS = 4


def make_params(device, rng):
    return [nn.Parameter(backend.to_device(rng.standard_normal(s), device)) for s in SHAPES]


def grads_for(step, rng_seed=1):
    rng = np.random.default_rng(rng_seed + step)
    return [rng.standard_normal(s) for s in SHAPES]


def set_grads(params, grads, device):
    for p, g in zip(params, grads):
        p.grad = backend.to_device(g, device)


@pytest.mark.parametrize("config", SGD_CONFIGS, ids=str)
def test_sgd_follows_reference(config, device, rng):
    params = make_params(device, rng)
    expected = [p.numpy().copy() for p in params]
    bufs = [None] * len(params)
    opt = optim.SGD(params, **config)
    full = dict(momentum=0, dampening=0, weight_decay=0, nesterov=False) | config
    for step in range(STEPS):
        grads = grads_for(step)
        set_grads(params, grads, device)
        opt.step()
        for i, g in enumerate(grads):
            expected[i], bufs[i] = ref.sgd_update(expected[i], g, bufs[i], first=step == 0, **full)
    for p, e in zip(params, expected):
        np.testing.assert_allclose(p.numpy(), e, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("cls, config", ADAM_CONFIGS, ids=str)
def test_adam_follows_reference(cls, config, device, rng):
    params = make_params(device, rng)
    expected = [(p.numpy().copy(), np.zeros(p.shape), np.zeros(p.shape)) for p in params]
    opt = cls(params, **config)
    g0 = opt.param_groups[0]
    for step in range(1, STEPS + 1):
        grads = grads_for(step)
        set_grads(params, grads, device)
        opt.step()
        expected = [ref.adam_update(p, g, m, v, g0["lr"], *g0["betas"], g0["eps"], g0["weight_decay"], step,
                                    decoupled=cls is optim.AdamW) for (p, m, v), g in zip(expected, grads)]
    for p, (e, _, _) in zip(params, expected):
        np.testing.assert_allclose(p.numpy(), e, rtol=1e-12, atol=1e-14)
    assert all(opt.state[p]["step"] == STEPS for p in params)


@pytest.mark.parametrize("name, config", [("SGD", c) for c in SGD_CONFIGS] +
                         [(cls.__name__, c) for cls, c in ADAM_CONFIGS], ids=str)
def test_matches_torch_optim(name, config, rng):
    torch = pytest.importorskip("torch")
    params = make_params("cpu", rng)
    tparams = [torch.tensor(p.numpy(), requires_grad=True) for p in params]
    opt, topt = getattr(optim, name)(params, **config), getattr(torch.optim, name)(tparams, **config)
    for step in range(STEPS):
        grads = grads_for(step)
        set_grads(params, grads, "cpu")
        for t, g in zip(tparams, grads):
            t.grad = torch.tensor(g)
        opt.step()
        topt.step()
    for p, t in zip(params, tparams):
        np.testing.assert_allclose(p.numpy(), t.detach().numpy(), rtol=1e-12, atol=1e-14)


def test_params_without_grad_are_skipped_and_zero_grad(rng):
    params = make_params("cpu", rng)
    before = params[1].numpy().copy()
    opt = optim.Adam(params)
    set_grads(params[:1], grads_for(0), "cpu")
    opt.step()
    np.testing.assert_array_equal(params[1].numpy(), before)
    assert params[1] not in opt.state or not opt.state[params[1]]
    opt.zero_grad(set_to_none=False)
    assert not params[0].grad.numpy().any()
    opt.zero_grad()
    assert all(p.grad is None for p in params)


@pytest.mark.parametrize("cls, config", [(optim.SGD, SGD_CONFIGS[3]), (optim.AdamW, ADAM_CONFIGS[3][1])])
def test_state_dict_round_trip_continues_bit_for_bit(cls, config, device, rng):
    params = make_params(device, rng)
    opt = cls(params, **config)
    for step in range(2):
        set_grads(params, grads_for(step), device)
        opt.step()
    sd = opt.state_dict()
    assert sorted(sd["state"]) == [0, 1] and sd["param_groups"][0]["params"] == [0, 1]
    assert sd["param_groups"][0]["lr"] == config["lr"]
    for s in sd["state"].values():
        assert all(isinstance(v, np.ndarray) for k, v in s.items() if k != "step")
        assert s.get("step", 2) == 2

    twins = [nn.Parameter(backend.to_device(p.numpy(), device)) for p in params]
    resumed = cls(twins, lr=123.0)
    resumed.load_state_dict(sd)
    assert resumed.param_groups[0]["lr"] == config["lr"]
    sd["state"][0][next(k for k in sd["state"][0] if k != "step")][...] = 0  # the load copied
    for step in range(2, 5):
        for ps in (params, twins):
            set_grads(ps, grads_for(step), device)
        opt.step()
        resumed.step()
    for p, q in zip(params, twins):
        assert q.device == device
        np.testing.assert_array_equal(p.numpy(), q.numpy())


def test_bad_hyperparameters_raise():
    p = [nn.Parameter(np.zeros(2))]
    with pytest.raises(ValueError, match="Nesterov"):
        optim.SGD(p, lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="Nesterov"):
        optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.1, nesterov=True)
    with pytest.raises(ValueError, match="learning rate"):
        optim.Adam(p, lr=-1)
    with pytest.raises(ValueError, match="beta2"):
        optim.AdamW(p, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="empty"):
        optim.SGD([], lr=0.1)
    with pytest.raises(TypeError, match="leaf Tensors that require grad"):
        optim.SGD([tensor(np.zeros(2))], lr=0.1)


def test_param_groups_carry_their_own_hyperparameters(rng):
    a, b = make_params("cpu", rng)
    a0, b0 = a.numpy().copy(), b.numpy().copy()
    opt = optim.SGD([{"params": [a]}, {"params": [b], "lr": 0.5}], lr=0.1)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.5]
    a.grad, b.grad = np.ones(a.shape), np.ones(b.shape)
    opt.step()
    np.testing.assert_allclose(a.numpy(), a0 - 0.1)
    np.testing.assert_allclose(b.numpy(), b0 - 0.5)


@pytest.mark.parametrize("name, kwargs", [("StepLR", dict(step_size=3, gamma=0.5)),
                                          ("CosineAnnealingLR", dict(T_max=5, eta_min=0.001))])
def test_schedules_match_torch_and_resume(name, kwargs):
    torch = pytest.importorskip("torch")
    p = nn.Parameter(np.zeros(2))
    opt = optim.SGD([{"params": [p]}, {"params": [nn.Parameter(np.zeros(1))], "lr": 0.3}], lr=0.1)
    tp = torch.zeros(2, requires_grad=True)
    topt = torch.optim.SGD([{"params": [tp]}, {"params": [torch.zeros(1, requires_grad=True)], "lr": 0.3}], lr=0.1)
    sched, tsched = getattr(optim, name)(opt, **kwargs), getattr(torch.optim.lr_scheduler, name)(topt, **kwargs)
    lrs = []
    for epoch in range(12):
        assert sched.get_last_lr() == pytest.approx(tsched.get_last_lr(), rel=1e-12, abs=1e-15), epoch
        assert [g["lr"] for g in opt.param_groups] == sched.get_last_lr()
        lrs.append(sched.get_last_lr())
        if epoch == 6:
            saved = sched.state_dict()
        opt.step()
        topt.step()
        sched.step()
        tsched.step()

    fresh = optim.SGD([{"params": [nn.Parameter(np.zeros(2))]}, {"params": [nn.Parameter(np.zeros(1))]}], lr=9.0)
    resumed = getattr(optim, name)(fresh, **kwargs)
    resumed.load_state_dict(saved)
    assert resumed.get_last_lr() == lrs[6]
    resumed.step()
    assert resumed.get_last_lr() == lrs[7] == [g["lr"] for g in fresh.param_groups]
