"""minunet.nn: registration and naming, state_dict round trips and strict-loading errors,
train/eval behaviour (Dropout, BatchNorm running statistics against tests/reference.py),
PyTorch's initialization, devices, dtypes and gradients."""
import math

import numpy as np
import pytest

import reference as ref
from minunet import backend, nn
from minunet.autograd import tensor


def small_net():
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                         nn.Sequential(nn.ConvTranspose2d(3, 2, 2, stride=2, bias=False), nn.Dropout(0.2)))


# PyTorch's names, in PyTorch's order, for small_net() (torch.nn with the same structure)
SMALL_NET_KEYS = ["0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var",
                  "1.num_batches_tracked", "3.0.weight"]


def test_named_parameters_buffers_and_state_dict_keys():
    net = small_net()
    assert [n for n, _ in net.named_parameters()] == ["0.weight", "0.bias", "1.weight", "1.bias", "3.0.weight"]
    assert [n for n, _ in net.named_buffers()] == ["1.running_mean", "1.running_var", "1.num_batches_tracked"]
    assert list(net.state_dict()) == SMALL_NET_KEYS
    assert all(p.requires_grad and isinstance(p, nn.Parameter) for p in net.parameters())
    assert not any(b.requires_grad for b in net.buffers())
    assert net[3][0].bias is None  # bias=False registers an absent parameter
    assert len(list(net.modules())) == 7 and len(list(net.children())) == 4
    head = net[:2]
    assert isinstance(head, nn.Sequential) and head[1] is net[1] and list(head.state_dict()) == SMALL_NET_KEYS[:7]


def test_state_dict_keys_match_torch():
    torch = pytest.importorskip("torch")
    tnet = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.BatchNorm2d(3), torch.nn.ReLU(),
                               torch.nn.Sequential(torch.nn.ConvTranspose2d(3, 2, 2, stride=2, bias=False),
                                                   torch.nn.Dropout(0.2)))
    assert list(tnet.state_dict()) == SMALL_NET_KEYS
    # and torch accepts our state_dict as is
    tnet.load_state_dict({k: torch.from_numpy(v) for k, v in small_net().state_dict().items()})


def test_state_dict_is_a_host_copy_and_round_trips():
    nn.manual_seed(1)
    a = small_net()
    nn.manual_seed(2)
    b = small_net()
    sd = a.state_dict()
    assert all(isinstance(v, np.ndarray) for v in sd.values())
    sd["0.weight"][...] = 7.0  # mutating the copy leaves the model alone
    assert not np.any(a[0].weight.numpy() == 7.0)
    sd = a.state_dict()
    w_before = b[0].weight
    b.load_state_dict(sd)
    assert b[0].weight is w_before  # loaded in place: same Parameter object
    for k, v in b.state_dict().items():
        np.testing.assert_array_equal(v, sd[k])
        assert v.dtype == sd[k].dtype
    # Tensors are accepted as values too, and are converted to the model's dtype
    b.load_state_dict({k: tensor(v.astype(np.float64) + 1 if v.dtype.kind == "f" else v) for k, v in sd.items()})
    np.testing.assert_allclose(b[0].bias.numpy(), sd["0.bias"] + 1, rtol=1e-6)
    assert b[0].bias.dtype == np.float32


def test_load_state_dict_strict_errors():
    net = small_net()
    sd = net.state_dict()
    del sd["1.running_var"]
    sd["head.weight"] = np.zeros(3, np.float32)
    with pytest.raises(RuntimeError) as e:
        net.load_state_dict(sd)
    assert "missing keys: '1.running_var'" in str(e.value)
    assert "unexpected keys: 'head.weight'" in str(e.value)

    missing, unexpected = net.load_state_dict(sd, strict=False)
    assert missing == ["1.running_var"] and unexpected == ["head.weight"]

    sd = net.state_dict()
    sd["0.bias"] = np.ones(4, np.float32)
    sd["0.weight"] = sd["0.weight"] + 1
    before = net[0].weight.numpy().copy()
    for strict in (True, False):  # a shape mismatch is an error either way
        with pytest.raises(RuntimeError, match=r"size mismatch for '0.bias'.*\(4,\).*\(3,\)"):
            net.load_state_dict(sd, strict=strict)
    np.testing.assert_array_equal(net[0].weight.numpy(), before)  # nothing was half-loaded


def test_register_buffer_and_assignment_rules():
    m = nn.Module()
    m.register_buffer("count", np.zeros(2, np.int64))
    m.w = nn.Parameter(np.ones(3, np.float32))
    assert [n for n, _ in m.named_buffers()] == ["count"]
    assert [n for n, _ in m.named_parameters()] == ["w"]
    m.count = np.ones(2, np.int64)  # assigning to a buffer name replaces the buffer
    np.testing.assert_array_equal(m.state_dict()["count"], [1, 1])
    with pytest.raises(TypeError, match="parameter 'w'"):
        m.w = tensor(np.ones(3, np.float32))
    shared = nn.Conv2d(1, 1, 1)
    twice = nn.Sequential(shared, shared)
    assert len(list(twice.parameters())) == 2  # weight and bias once each


def test_replacing_a_child_or_parameter_keeps_its_place():
    m = nn.Module()
    m.a, m.b = nn.Conv2d(1, 2, 1), nn.ReLU()
    m.p, m.q = nn.Parameter(np.ones(1, np.float32)), nn.Parameter(np.ones(1, np.float32))
    m.a = nn.Conv2d(1, 3, 1)  # as in PyTorch: replaced in place, not moved to the end
    m.p = nn.Parameter(np.zeros(1, np.float32))
    assert [n for n, _ in m.named_children()] == ["a", "b"]
    assert [n for n, _ in m.named_parameters()] == ["p", "q", "a.weight", "a.bias"]
    assert m.a.weight.shape == (3, 1, 1, 1)
    m.b = nn.Parameter(np.ones(1, np.float32))  # a name changing kind moves to its new registry
    assert [n for n, _ in m.named_children()] == ["a"] and "b" in dict(m.named_parameters())


def test_train_eval_is_recursive_and_dropout_follows_it():
    net = small_net()
    assert all(m.training for m in net.modules())
    net.eval()
    assert not any(m.training for m in net.modules())
    net.train()
    assert all(m.training for m in net.modules())

    drop = nn.Dropout(0.25)
    x = tensor(np.ones((4, 3, 16, 16), np.float32))
    y = drop(x).numpy()
    assert set(np.unique(y)) <= {0.0, np.float32(1 / 0.75)}
    assert 0.15 < np.mean(y == 0) < 0.35  # 3072 Bernoulli(0.25) draws
    drop.eval()
    np.testing.assert_array_equal(drop(x).numpy(), x.numpy())
    with pytest.raises(ValueError, match="Dropout"):
        nn.Dropout(1.5)


@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
def test_batchnorm_running_stats_follow_reference(device, momentum, rng):
    bn = nn.BatchNorm2d(3, momentum=momentum).to(device).double()
    bn.weight.data[...] = backend.to_device(rng.uniform(0.5, 1.5, 3), device)
    bn.bias.data[...] = backend.to_device(rng.uniform(-0.5, 0.5, 3), device)
    r_mean, r_var = np.zeros(3), np.ones(3)
    for step in range(1, 4):
        x = rng.standard_normal((2, 3, 4, 5)) * 2 + 1
        y = bn(tensor(x, device=device)).numpy()
        y_ref, mean, var = ref.batch_norm_forward(x, bn.weight.numpy(), bn.bias.numpy(), None, None, 1e-5, True)
        np.testing.assert_allclose(y, y_ref, rtol=1e-10, atol=1e-10)
        factor = 1 / step if momentum is None else momentum
        r_mean, r_var = ref.batch_norm_update_running(r_mean, r_var, mean, var, 2 * 4 * 5, factor)
        np.testing.assert_allclose(bn.running_mean.numpy(), r_mean, rtol=1e-10)
        np.testing.assert_allclose(bn.running_var.numpy(), r_var, rtol=1e-10)
        assert int(bn.num_batches_tracked.item()) == step

    bn.eval()  # normalises with the running statistics and leaves them alone
    x = rng.standard_normal((1, 3, 2, 2))
    y = bn(tensor(x, device=device)).numpy()
    y_ref, _, _ = ref.batch_norm_forward(x, bn.weight.numpy(), bn.bias.numpy(), r_mean, r_var, 1e-5, False)
    np.testing.assert_allclose(y, y_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(bn.running_mean.numpy(), r_mean, rtol=1e-10)
    assert int(bn.num_batches_tracked.item()) == 3


def test_layers_call_their_ops_with_their_arguments(rng):
    """Each layer forwards its own stride/padding/weights: compare with the reference ops."""
    conv = nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 0)).double()
    x = rng.standard_normal((2, 3, 7, 6))
    y_ref = ref.conv2d_forward(x, conv.weight.numpy(), conv.bias.numpy(), (2, 1), (1, 0))
    np.testing.assert_allclose(conv(tensor(x)).numpy(), y_ref, rtol=1e-10, atol=1e-12)

    up = nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1, output_padding=1).double()
    y_ref = ref.conv_transpose2d_forward(x, up.weight.numpy(), up.bias.numpy(), (2, 2), (1, 1), (1, 1))
    np.testing.assert_allclose(up(tensor(x)).numpy(), y_ref, rtol=1e-10, atol=1e-12)

    pool = nn.MaxPool2d(3, stride=2, padding=1)
    y_ref, _ = ref.max_pool2d_forward(x, (3, 3), (2, 2), (1, 1))
    np.testing.assert_allclose(pool(tensor(x)).numpy(), y_ref)
    np.testing.assert_array_equal(nn.ReLU()(tensor(x)).numpy(), np.maximum(x, 0))
    np.testing.assert_array_equal(nn.Identity()(tensor(x)).numpy(), x)


def test_init_follows_pytorch_bounds_and_is_reproducible():
    nn.manual_seed(0)
    conv = nn.Conv2d(16, 32, 3)
    bound = 1 / math.sqrt(16 * 9)
    w = conv.weight.numpy()
    assert w.dtype == np.float32 and conv.bias.dtype == np.float32
    assert np.abs(w).max() <= bound and np.abs(conv.bias.numpy()).max() <= bound
    assert np.abs(w).max() > 0.95 * bound  # 4608 uniform draws reach the edge
    assert abs(w.std() - bound / math.sqrt(3)) < 0.05 * bound  # the std of U(-b, b)
    assert abs(w.mean()) < 0.05 * bound

    # transposed conv: weight (Cin, Cout, kh, kw), fan_in from dim 1 = Cout * kh * kw = 8
    up = nn.ConvTranspose2d(64, 2, 2, stride=2)
    bound = 1 / math.sqrt(2 * 4)
    assert up.weight.shape == (64, 2, 2, 2)
    assert bound * 0.9 < np.abs(up.weight.numpy()).max() <= bound  # dim 0 would bound it by 1/16

    bn = nn.BatchNorm2d(5)
    np.testing.assert_array_equal(bn.weight.numpy(), 1)
    np.testing.assert_array_equal(bn.bias.numpy(), 0)

    nn.manual_seed(123)
    a = small_net().state_dict()
    nn.manual_seed(123)
    b = small_net().state_dict()
    nn.manual_seed(124)
    c = small_net().state_dict()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["0.weight"], c["0.weight"])


def test_to_cuda_without_gpu_raises_clearly():
    if backend.cuda_available():
        pytest.skip("a GPU is usable here")
    net = small_net()
    with pytest.raises(RuntimeError, match="cuda"):
        net.to("cuda")
    assert all(p.device == "cpu" for p in net.parameters())


def test_to_moves_and_casts_in_place(device):
    net = small_net()
    params = list(net.parameters())
    assert net.to(device) is net
    assert [p is q for p, q in zip(params, net.parameters())] == [True] * len(params)
    assert all(t.device == device for t in list(net.parameters()) + list(net.buffers()))
    net.to(np.float64)
    assert all(p.dtype == np.float64 for p in net.parameters())
    assert net[1].running_var.dtype == np.float64
    assert net[1].num_batches_tracked.dtype == np.int64  # integer buffers keep their type
    sd = net.state_dict()
    assert all(isinstance(v, np.ndarray) for v in sd.values())
    net.to("cpu", np.float32)
    assert all(p.dtype == np.float32 and p.device == "cpu" for p in net.parameters())


def test_zero_grad_and_backward_through_layers(device, rng):
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 1, 1)).to(device)
    x = tensor(rng.standard_normal((1, 1, 5, 5)).astype(np.float32), device=device)
    net(x).sum().backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in net.parameters())
    net.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.numpy().any() for p in net.parameters())
    net.zero_grad()
    assert all(p.grad is None for p in net.parameters())


def test_repr_is_readable():
    text = repr(small_net())
    assert "(0): Conv2d(2, 3, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))" in text
    assert "(1): BatchNorm2d(3, eps=1e-05, momentum=0.1)" in text
    assert "(0): ConvTranspose2d(3, 2, kernel_size=(2, 2), stride=(2, 2), bias=False)" in text
    assert "(1): Dropout(p=0.2)" in text
