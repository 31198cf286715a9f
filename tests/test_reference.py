"""Checks the oracle itself: tests/reference.py against PyTorch in float64, forward and
backward (PyTorch's gradients come from torch.autograd), for every op family.

This is what makes the reference trustworthy, and it pins PyTorch's semantics where a
definition leaves a choice: which maximum wins a tie in max-pooling, what 'mean' divides by
in a weighted cross-entropy with ignored pixels, how running statistics are updated, how the
optimizers step. The whole module skips where PyTorch is not installed.
"""
import numpy as np
import pytest

import reference as ref

torch = pytest.importorskip("torch")
F = torch.nn.functional


def T(a, grad=True):
    """A float64 torch tensor holding a copy of `a` that records gradients."""
    return torch.tensor(np.asarray(a, dtype=np.float64), requires_grad=grad)


def close(actual, expected):
    if isinstance(actual, torch.Tensor):
        actual = actual.detach().numpy()
    np.testing.assert_allclose(actual, expected, rtol=1e-10, atol=1e-12)


# (N, C, H, W, K, (kh, kw), stride, padding): the U-Net's 3x3 convolutions with padding 0 and
# 1, a 1x1, strided and asymmetric kernels, stride larger than the kernel, padding >= kernel/2
CONV_CASES = [
    (2, 3, 8, 7, 4, (3, 3), (1, 1), (0, 0)),
    (1, 2, 6, 6, 3, (3, 3), (1, 1), (1, 1)),
    (2, 4, 5, 3, 2, (1, 1), (1, 1), (0, 0)),
    (1, 2, 9, 8, 3, (3, 2), (2, 3), (1, 0)),
    (2, 1, 7, 10, 1, (2, 2), (3, 3), (0, 1)),
    (1, 3, 4, 5, 2, (3, 3), (1, 2), (2, 2)),
]


@pytest.mark.parametrize("N, C, H, W, K, ks, stride, padding", CONV_CASES)
def test_conv2d(rng, N, C, H, W, K, ks, stride, padding):
    x, w, b = rng.standard_normal((N, C, H, W)), rng.standard_normal((K, C) + ks), rng.standard_normal(K)
    tx, tw, tb = T(x), T(w), T(b)
    ty = F.conv2d(tx, tw, tb, stride=stride, padding=padding)
    y = ref.conv2d_forward(x, w, b, stride, padding)
    close(ty, y)
    gy = rng.standard_normal(y.shape)
    ty.backward(torch.tensor(gy))
    close(tx.grad, ref.conv2d_backward_input(gy, w, x.shape, stride, padding))
    close(tw.grad, ref.conv2d_backward_weight(x, gy, w.shape, stride, padding))
    close(tb.grad, ref.bias_backward(gy))
    close(F.conv2d(tx, tw, None, stride=stride, padding=padding), ref.conv2d_forward(x, w, None, stride, padding))


# (N, Cin, H, W, Cout, (kh, kw), stride, padding, output_padding): the U-Net's 2x2 stride-2
# up-convolution, 3x3 stride 2 with output_padding, stride larger than the kernel, asymmetric
CONV_T_CASES = [
    (2, 3, 4, 5, 2, (2, 2), (2, 2), (0, 0), (0, 0)),
    (1, 2, 3, 4, 3, (3, 3), (2, 2), (1, 1), (1, 1)),
    (2, 2, 4, 3, 1, (3, 3), (1, 1), (1, 1), (0, 0)),
    (1, 1, 3, 3, 2, (2, 2), (3, 3), (0, 0), (2, 1)),
    (1, 3, 3, 5, 2, (3, 2), (2, 1), (1, 0), (1, 0)),
]


@pytest.mark.parametrize("N, Cin, H, W, Cout, ks, stride, padding, output_padding", CONV_T_CASES)
def test_conv_transpose2d(rng, N, Cin, H, W, Cout, ks, stride, padding, output_padding):
    x, w, b = rng.standard_normal((N, Cin, H, W)), rng.standard_normal((Cin, Cout) + ks), rng.standard_normal(Cout)
    tx, tw, tb = T(x), T(w), T(b)
    ty = F.conv_transpose2d(tx, tw, tb, stride=stride, padding=padding, output_padding=output_padding)
    y = ref.conv_transpose2d_forward(x, w, b, stride, padding, output_padding)
    close(ty, y)
    gy = rng.standard_normal(y.shape)
    ty.backward(torch.tensor(gy))
    close(tx.grad, ref.conv_transpose2d_backward_input(gy, w, stride, padding))
    close(tw.grad, ref.conv_transpose2d_backward_weight(x, gy, w.shape, stride, padding))
    close(tb.grad, ref.bias_backward(gy))


# (N, C, H, W, kernel_size, stride, padding): the U-Net's 2x2/2, overlapping 3x3/2 and 3x3/1
# windows with padding, stride larger than the kernel, odd sizes, asymmetric windows
POOL_CASES = [
    (2, 3, 8, 6, (2, 2), (2, 2), (0, 0)),
    (1, 2, 7, 9, (3, 3), (2, 2), (1, 1)),
    (2, 1, 5, 5, (3, 3), (1, 1), (1, 1)),
    (1, 2, 10, 7, (2, 2), (3, 3), (0, 0)),
    (1, 1, 7, 6, (3, 2), (2, 1), (1, 0)),
]


@pytest.mark.parametrize("N, C, H, W, ks, stride, padding", POOL_CASES)
def test_max_pool2d(rng, N, C, H, W, ks, stride, padding):
    x = rng.permutation(N * C * H * W).reshape(N, C, H, W) - N * C * H * W / 2.0  # distinct values
    tx = T(x)
    ty, tidx = F.max_pool2d(tx, ks, stride, padding, return_indices=True)
    y, argmax = ref.max_pool2d_forward(x, ks, stride, padding)
    close(ty, y)
    assert argmax.dtype == np.int64
    np.testing.assert_array_equal(tidx.numpy(), argmax)
    gy = rng.standard_normal(y.shape)
    ty.backward(torch.tensor(gy))
    close(tx.grad, ref.max_pool2d_backward(gy, argmax, x.shape))


@pytest.mark.parametrize("value", [0.0, -1.0])
@pytest.mark.parametrize("ks, stride, padding", [((2, 2), (2, 2), (0, 0)), ((3, 3), (2, 2), (1, 1)), ((3, 3), (1, 1), (1, 1))])
def test_max_pool2d_ties(value, ks, stride, padding):
    """A constant plane: every window ties, so the first real element of the window wins (and
    with value -1, a padded place, were it read as 0, would wrongly win)."""
    x = np.full((1, 2, 5, 6), value)
    ty, tidx = F.max_pool2d(T(x, grad=False), ks, stride, padding, return_indices=True)
    y, argmax = ref.max_pool2d_forward(x, ks, stride, padding)
    close(ty, y)
    np.testing.assert_array_equal(tidx.numpy(), argmax)
    top = np.maximum(np.arange(y.shape[2]) * stride[0] - padding[0], 0)
    left = np.maximum(np.arange(y.shape[3]) * stride[1] - padding[1], 0)
    np.testing.assert_array_equal(argmax[0, 1], top[:, None] * 6 + left[None, :])


@pytest.mark.parametrize("shapes, offsets, out_hw", [
    ([(2, 3, 9, 8), (2, 2, 5, 4)], [(2, 1), (0, 0)], (5, 4)),    # the U-Net's crop-and-concatenate
    ([(1, 1, 4, 4), (1, 2, 6, 5), (1, 1, 3, 3)], [(1, 0), (3, 2), (0, 0)], (3, 3)),
    ([(1, 2, 3, 3)], [(0, 0)], (3, 3)),
])
def test_concat(rng, shapes, offsets, out_hw):
    xs = [rng.standard_normal(s) for s in shapes]
    txs = [T(x) for x in xs]
    H, W = out_hw
    ty = torch.cat([tx[:, :, t:t + H, l:l + W] for tx, (t, l) in zip(txs, offsets)], dim=1)
    close(ty, ref.concat_forward(xs, offsets, out_hw))
    gy = rng.standard_normal(tuple(ty.shape))
    ty.backward(torch.tensor(gy))
    for tx, gx in zip(txs, ref.concat_backward(gy, shapes, offsets)):
        close(tx.grad, gx)


def test_relu_with_bias(rng):
    x, b = rng.standard_normal((2, 3, 4, 5)), rng.standard_normal(3)
    tx, tb = T(x), T(b)
    ty = F.relu(tx + tb[None, :, None, None])
    y = ref.relu_forward(x, b)
    close(ty, y)
    gy = rng.standard_normal(y.shape)
    ty.backward(torch.tensor(gy))
    gx = ref.relu_backward(gy, y)
    close(tx.grad, gx)
    close(tb.grad, ref.bias_backward(gx))
    close(F.relu(T(x)), ref.relu_forward(x))


def test_sigmoid(rng):
    x = rng.standard_normal((3, 4, 5)) * 20  # far into both tails
    tx = T(x)
    ty = torch.sigmoid(tx)
    y = ref.sigmoid(x)
    close(ty, y)
    gy = rng.standard_normal(y.shape)
    ty.backward(torch.tensor(gy))
    close(tx.grad, ref.sigmoid_backward(gy, y))


@pytest.mark.parametrize("dim", [1, -1])
@pytest.mark.parametrize("log", [False, True])
def test_softmax(rng, dim, log):
    x = rng.standard_normal((2, 5, 3, 4)) * 10
    tx = T(x)
    ty = (F.log_softmax if log else F.softmax)(tx, dim=dim)
    y = (ref.log_softmax if log else ref.softmax)(x, dim)
    close(ty, y)
    gy = rng.standard_normal(y.shape)
    ty.backward(torch.tensor(gy))
    close(tx.grad, (ref.log_softmax_backward if log else ref.softmax_backward)(gy, y, dim))


def _targets(rng, N, C, H, W, ignore_index):
    t = rng.integers(0, C, size=(N, H, W))
    t[rng.random((N, H, W)) < 0.2] = ignore_index
    return t


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("ignore_index", [-100, 1])
def test_softmax_cross_entropy(rng, weighted, ignore_index):
    N, C, H, W = 2, 4, 3, 5
    x = rng.standard_normal((N, C, H, W)) * 3
    t = _targets(rng, N, C, H, W, ignore_index)
    weight = rng.random(C) + 0.5 if weighted else None
    tx = T(x)
    tloss = F.cross_entropy(tx, torch.tensor(t), weight=None if weight is None else T(weight, False),
                            ignore_index=ignore_index, reduction="none")
    loss, p = ref.softmax_cross_entropy_forward(x, t, weight, ignore_index)
    close(tloss, loss)
    close(F.softmax(tx, dim=1), p)
    gloss = rng.standard_normal((N, H, W))
    tloss.backward(torch.tensor(gloss))
    close(tx.grad, ref.softmax_cross_entropy_backward(p, t, weight, ignore_index, gloss))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
def test_cross_entropy_reductions(rng, reduction, weighted):
    N, C, H, W = 2, 3, 4, 4
    x = rng.standard_normal((N, C, H, W))
    t = _targets(rng, N, C, H, W, -100)
    weight = rng.random(C) + 0.5 if weighted else None
    tx = T(x)
    tloss = F.cross_entropy(tx, torch.tensor(t), weight=None if weight is None else T(weight, False),
                            reduction=reduction)
    close(tloss, ref.cross_entropy(x, t, weight, -100, reduction))
    gy = rng.standard_normal(tuple(tloss.shape))
    tloss.backward(torch.tensor(gy))
    close(tx.grad, ref.cross_entropy_backward(x, t, weight, -100, reduction, gy))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
def test_binary_cross_entropy_with_logits(rng, reduction, weighted):
    x = rng.standard_normal((2, 3, 4, 5)) * 8
    t = (rng.random(x.shape) < 0.4).astype(np.float64)
    t[0, 0] = rng.random((4, 5))  # soft targets are allowed too
    weight = rng.random((3, 1, 1)) + 0.5 if weighted else None
    pos_weight = rng.random(5) * 3 if weighted else None  # broadcasts along the last axis
    tx = T(x)
    tloss = F.binary_cross_entropy_with_logits(
        tx, torch.tensor(t), weight=None if weight is None else T(weight, False),
        pos_weight=None if pos_weight is None else T(pos_weight, False), reduction=reduction)
    close(tloss, ref.binary_cross_entropy_with_logits(x, t, weight, pos_weight, reduction))
    gy = rng.standard_normal(tuple(tloss.shape))
    tloss.backward(torch.tensor(gy))
    close(tx.grad, ref.binary_cross_entropy_with_logits_backward(x, t, weight, pos_weight, reduction, gy))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(4, 3, 5, 6), (1, 2, 3, 3), (8, 1, 1, 1)])
def test_batch_norm(rng, training, shape):
    C = shape[1]
    x = rng.standard_normal(shape) * 2 + 1
    gamma, beta = rng.standard_normal(C), rng.standard_normal(C)
    rmean, rvar = rng.standard_normal(C), rng.random(C) + 0.5
    eps, momentum = 1e-5, 0.1
    tx, tg, tb = T(x), T(gamma), T(beta)
    trm, trv = torch.tensor(rmean), torch.tensor(rvar)  # updated in place by F.batch_norm
    ty = F.batch_norm(tx, trm, trv, tg, tb, training=training, momentum=momentum, eps=eps)
    y, mean, var = ref.batch_norm_forward(x, gamma, beta, rmean, rvar, eps, training)
    close(ty, y)
    if training:
        new_mean, new_var = ref.batch_norm_update_running(rmean, rvar, mean, var, x.size // C, momentum)
        close(trm, new_mean)
        close(trv, new_var)
    else:
        close(mean, rmean)
        close(var, rvar)
    gy = rng.standard_normal(shape)
    ty.backward(torch.tensor(gy))
    gx, ggamma, gbeta = ref.batch_norm_backward(gy, x, gamma, mean, var, eps, training)
    np.testing.assert_allclose(tx.grad.numpy(), gx, rtol=1e-9, atol=1e-11)  # cancellation in training mode
    close(tg.grad, ggamma)
    close(tb.grad, gbeta)


def _run_torch_optimizer(opt_cls, p0, grads, **hyper):
    tp = T(p0)
    opt = opt_cls([tp], **hyper)
    for g in grads:
        tp.grad = torch.tensor(g)
        opt.step()
    return tp.detach().numpy()


@pytest.mark.parametrize("momentum, dampening, weight_decay, nesterov", [
    (0.0, 0.0, 0.0, False), (0.9, 0.0, 0.0, False), (0.9, 0.3, 1e-2, False), (0.8, 0.0, 1e-2, True),
])
def test_sgd(rng, momentum, dampening, weight_decay, nesterov):
    p0, grads = rng.standard_normal((3, 4)), [rng.standard_normal((3, 4)) for _ in range(3)]
    lr = 0.1
    expected = _run_torch_optimizer(torch.optim.SGD, p0, grads, lr=lr, momentum=momentum,
                                    dampening=dampening, weight_decay=weight_decay, nesterov=nesterov)
    p, buf = p0, None
    for step, g in enumerate(grads):
        p, buf = ref.sgd_update(p, g, buf, lr, momentum, dampening, weight_decay, nesterov, first=step == 0)
    close(p, expected)


@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_adam(rng, decoupled, weight_decay):
    p0, grads = rng.standard_normal((5, 2)), [rng.standard_normal((5, 2)) for _ in range(3)]
    lr, betas, eps = 0.01, (0.9, 0.99), 1e-8
    expected = _run_torch_optimizer(torch.optim.AdamW if decoupled else torch.optim.Adam, p0, grads,
                                    lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    p, m, v = p0, np.zeros_like(p0), np.zeros_like(p0)
    for step, g in enumerate(grads, start=1):
        p, m, v = ref.adam_update(p, g, m, v, lr, betas[0], betas[1], eps, weight_decay, step, decoupled)
    close(p, expected)
