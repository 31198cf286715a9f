"""The autograd engine's semantics: accumulation, shared inputs, no_grad, broadcasting, depth."""
import numpy as np
import pytest

import minunet as mn
from minunet import backend


def leaf(xp, shape, seed=0):
    a = np.random.default_rng(seed).standard_normal(shape)
    return mn.Tensor(xp.asarray(a), requires_grad=True)


def host(a):
    return a.numpy() if isinstance(a, mn.Tensor) else backend.to_numpy(a)


def test_gradients_accumulate_across_backward_calls(xp):
    x = leaf(xp, (3,))
    (x * 2).sum().backward()
    (x * 3).sum().backward()
    np.testing.assert_allclose(host(x.grad), np.full(3, 5.0))


def test_tensor_used_twice_gets_both_gradients(xp):
    x = leaf(xp, (4,))
    a = x * x          # two paths from x through one node
    b = x * 3.0
    (a + b).sum().backward()  # d/dx (x^2 + 3x) = 2x + 3
    np.testing.assert_allclose(host(x.grad), 2 * host(x.data) + 3)


def test_diamond_graph(xp):
    x = leaf(xp, (2, 3))
    h = x.exp()
    y = (h * h.log()).sum()  # h log h = x e^x -> (1 + x) e^x
    y.backward()
    xd = host(x.data)
    np.testing.assert_allclose(host(x.grad), (1 + xd) * np.exp(xd), rtol=1e-12)


def test_no_grad_records_nothing(xp):
    x = leaf(xp, (3,))
    with mn.no_grad():
        y = (x * 2).sum()
    assert not y.requires_grad and y._ctx is None
    with pytest.raises(RuntimeError, match="does not require grad"):
        y.backward()
    z = (x * 2).sum()  # grad mode is back on after the block
    assert z.requires_grad


def test_broadcast_gradients_reduce_to_input_shapes(xp):
    a, b = leaf(xp, (3, 1), 1), leaf(xp, (1, 4), 2)
    c = leaf(xp, (4,), 3)
    ((a + b) * c - a / (b * b + 1)).sum().backward()
    ad, bd, cd = host(a.data), host(b.data), host(c.data)
    q = bd * bd + 1
    np.testing.assert_allclose(host(a.grad), (np.broadcast_to(cd, (3, 4)) - 1 / q).sum(1, keepdims=True))
    gb = np.broadcast_to(cd, (3, 4)) + ad * 2 * bd / q ** 2
    np.testing.assert_allclose(host(b.grad), gb.sum(0, keepdims=True))
    np.testing.assert_allclose(host(c.grad), (ad + bd).sum(0))
    assert a.grad.shape == (3, 1) and b.grad.shape == (1, 4) and c.grad.shape == (4,)


def test_elementwise_rules(xp):
    x = mn.Tensor(xp.asarray(np.array([0.5, 1.5, 2.0])), requires_grad=True)
    y = (-(x ** 3) + 2 / x - 1 + (1 - x)).mean()
    y.backward()
    xd = host(x.data)
    np.testing.assert_allclose(host(x.grad), (-3 * xd ** 2 - 2 / xd ** 2 - 1) / 3)


def test_sum_mean_reshape_over_axes(xp):
    x = leaf(xp, (2, 3, 4))
    y = x.sum(axis=(0, 2), keepdims=True) * x.mean(axis=1).reshape(2, 1, 4).sum()
    gy = np.random.default_rng(5).standard_normal(y.shape)
    y.backward(xp.asarray(gy))
    xd = host(x.data)
    s, m = xd.sum(axis=(0, 2), keepdims=True), xd.mean(axis=1).sum()
    expected = np.broadcast_to(gy * m, xd.shape) + (gy * s).sum() / 3
    np.testing.assert_allclose(host(x.grad), expected, rtol=1e-12)


def test_ten_thousand_deep_chain_does_not_recurse():
    x = mn.tensor([1.0], dtype=np.float64, requires_grad=True)
    y = x
    for _ in range(10_000):
        y = y * 1.0001
    y.sum().backward()
    np.testing.assert_allclose(x.grad, [1.0001 ** 10_000])


def test_only_leaves_keep_grad_and_nonscalar_needs_gy():
    x = mn.tensor(np.ones(3), requires_grad=True)
    y = x * 2
    with pytest.raises(RuntimeError, match="shape \\(3,\\)"):
        y.backward()
    y.backward(np.ones(3))
    assert y.grad is None and x.grad is not None
    with pytest.raises(ValueError, match="gy has shape"):
        y.backward(np.ones(4))


def test_tensor_factory_dtypes_and_conversions():
    assert mn.tensor([1.0, 2.0]).dtype == np.float32
    assert mn.tensor([1, 2]).dtype == np.int64
    assert mn.tensor(np.zeros(2)).dtype == np.float64  # arrays keep their dtype, as torch.tensor
    assert mn.tensor([1, 2], dtype=np.float64).dtype == np.float64
    src = np.arange(3.0)
    t = mn.tensor(src)
    src[0] = 9
    assert t.numpy()[0] == 0  # data is copied
    assert mn.tensor([[3.5]]).item() == 3.5
    d = mn.tensor([1.0], requires_grad=True).detach()
    assert not d.requires_grad and d.device == "cpu"
    with pytest.raises(TypeError, match="only floating tensors"):
        mn.tensor([1, 2], requires_grad=True)
    with pytest.raises(ValueError, match="one-element"):
        mn.tensor([1.0, 2.0]).item()


def test_indexing_scatters_gradients_back(xp):
    x = leaf(xp, (3, 4))
    (x[1:, ::2].sum() + x[xp.asarray([0, 0, 2]), 1].sum()).backward()
    expected = np.zeros((3, 4))
    expected[1:, ::2] = 1
    expected[0, 1] += 2  # picked twice
    expected[2, 1] += 1
    np.testing.assert_allclose(host(x.grad), expected)


def test_astype_is_differentiable():
    x = mn.tensor(np.array([1.0, 2.0]), requires_grad=True)
    y = x.float()
    assert y.dtype == np.float32
    (y * 3).sum().backward()
    assert x.grad.dtype == np.float64
    np.testing.assert_allclose(x.grad, [3.0, 3.0])


@pytest.mark.skipif(backend.cuda_available(), reason="checks the error raised without a GPU")
def test_asking_for_cuda_without_a_gpu_says_what_is_missing():
    with pytest.raises(RuntimeError, match="device 'cuda' was asked for, but (CuPy is not installed|CuPy is installed but)"):
        mn.tensor([1.0], device="cuda")
    with pytest.raises(RuntimeError, match="device 'cuda'"):
        mn.tensor([1.0]).to("cuda")
    with pytest.raises(ValueError, match="unknown device"):
        mn.tensor([1.0], device="tpu")


@pytest.mark.gpu
def test_to_device_round_trip_carries_gradients():
    if not backend.cuda_available():
        pytest.skip(backend.cuda_status()[1])
    x = mn.tensor(np.arange(3.0), requires_grad=True)
    y = x.to("cuda")
    assert y.device == "cuda"
    (y * y).sum().backward()
    assert x.grad is not None and x.device == "cpu"
    np.testing.assert_allclose(x.grad, 2 * np.arange(3.0))
    with pytest.raises(ValueError, match="different devices"):
        x + y


def test_post_accumulate_grad_hook_sees_each_final_gradient_once_in_backward_order():
    # y = sum(w2 * relu(w1 * x)) with w1 also used a second time: its hook must fire once,
    # after both contributions, and after w2's (which backward reaches first)
    x = mn.tensor(np.array([1.0, -2.0, 3.0]))
    w1, w2 = leaf(np, (3,), seed=1), leaf(np, (3,), seed=2)
    seen = []
    handles = [w.register_post_accumulate_grad_hook(lambda t, name=name: seen.append((name, host(t.grad).copy())))
               for w, name in ((w1, "w1"), (w2, "w2"))]
    h = w1 * x
    ((w2 * h).sum() + (w1 * w1).sum()).backward()
    assert [name for name, _ in seen] == ["w2", "w1"]
    np.testing.assert_allclose(seen[1][1], host(w2.data) * host(x.data) + 2 * host(w1.data))
    np.testing.assert_allclose(seen[0][1], host(h.data))
    handles[0].remove()
    seen.clear()
    (w1 * w2).sum().backward()
    assert [name for name, _ in seen] == ["w2"]
    with pytest.raises(RuntimeError, match="only a leaf"):
        h.register_post_accumulate_grad_hook(print)


class _Made(mn.autograd.Function):
    """y = x * c with a backward that returns an array it makes, recorded with c in `made`."""
    made = []

    def forward(self, x, c):
        self.c = c
        return x * c

    def backward(self, gy):
        g = gy * self.c
        self.made.append((self.c, g))
        return g, None


class _MadeFresh(_Made):
    fresh_grads = True


@pytest.mark.parametrize("fresh", [False, True])
def test_backward_keeps_fresh_gradients_and_copies_the_others(xp, fresh):
    # x feeds two ops; a leaf w one. With fresh_grads the engine keeps the ops' own arrays (w.grad
    # is the array backward made; x's two gradients are summed into the first one in place), and
    # without it copies or allocates: either way the values are the same and the caller's gy and
    # every array an op returned without owning stay as they were.
    op = _MadeFresh if fresh else _Made
    op.made = []
    x, w = leaf(xp, (3,)), leaf(xp, (3,), seed=1)
    gy = xp.asarray(np.array([1.0, 2.0, 3.0]))
    y = op.apply(x, 2.0) + op.apply(x, 5.0) + op.apply(w, 3.0)
    y.backward(gy)
    np.testing.assert_allclose(host(x.grad), 7 * host(gy))
    np.testing.assert_allclose(host(w.grad), 3 * host(gy))
    np.testing.assert_allclose(host(gy), [1.0, 2.0, 3.0])
    made = dict(op.made)                                         # c -> the array of c * gy
    assert (w.grad.data is made[3.0]) == fresh
    assert (x.grad.data is made[2.0] or x.grad.data is made[5.0]) == fresh
    if not fresh:
        for c, g in made.items():
            np.testing.assert_allclose(host(g), c * host(gy))
