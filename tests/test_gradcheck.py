"""Finite-difference gradient checks, float64, on both devices.

For an op y = f(x1, x2, ...) and a random gy, the scalar L = sum(y * gy) has the gradient
that backward(gy) computes. We compare it with central differences
    (L(x + h d) - L(x - h d)) / 2h  ~=  <dL/dx, d>
for every element (d = a unit vector) on tiny inputs, and along random directions d on
larger ones, as Chainer's check_backward does. Inputs stay away from kinks: distinct values
for max-pool, no ReLU input near 0.
"""
import numpy as np
import pytest

import minunet as mn
from minunet import F, backend

H = 1e-6


def gradcheck(fn, arrays, device, seed=0, every_element_below=80, directions=4, rtol=1e-5):
    xp = backend.xp_for(device)
    rng = np.random.default_rng(seed)
    arrays = [np.asarray(a, dtype=np.float64) for a in arrays]
    ts = [mn.Tensor(xp.asarray(a), requires_grad=True) for a in arrays]
    y = fn(*ts)
    gy = rng.standard_normal(y.shape)
    y.backward(xp.asarray(gy))

    def loss(values):
        with mn.no_grad():
            out = fn(*(mn.Tensor(xp.asarray(v)) for v in values))
        return float((backend.to_numpy(out.data) * gy).sum())

    for i, a in enumerate(arrays):
        analytic = ts[i].grad.numpy()
        if a.size <= every_element_below:
            dirs = [np.eye(a.size)[j].reshape(a.shape) for j in range(a.size)]
        else:
            dirs = [rng.standard_normal(a.shape) for _ in range(directions)]
        for d in dirs:
            plus = [v + H * d if j == i else v for j, v in enumerate(arrays)]
            minus = [v - H * d if j == i else v for j, v in enumerate(arrays)]
            numeric = (loss(plus) - loss(minus)) / (2 * H)
            expected = float((analytic * d).sum())
            scale = max(1.0, abs(numeric), float(np.abs(analytic).sum()) * 1e-3)
            assert abs(numeric - expected) <= rtol * scale, (
                f"input {i}: finite difference {numeric:.10g} vs backward {expected:.10g}")


def away_from_zero(rng, *shape, margin=0.05):
    x = rng.standard_normal(shape)
    return np.where(np.abs(x) < margin, np.sign(x + 1e-12) * margin * 2, x)


def distinct(rng, *shape):
    return rng.permutation(int(np.prod(shape))).reshape(shape) * 0.01 + rng.uniform(0, 1e-3)


@pytest.mark.parametrize("stride,padding", [(1, 0), (2, 1), ((1, 2), (1, 0))])
def test_conv2d(device, stride, padding, rng):
    gradcheck(lambda x, w, b: F.conv2d(x, w, b, stride, padding),
              [rng.standard_normal((2, 2, 5, 6)), rng.standard_normal((3, 2, 3, 2)), rng.standard_normal(3)], device)


def test_conv2d_of_a_list(device, rng):
    """conv2d (and conv2d_relu) of a list of inputs, their concatenation along channels read in
    place: each input gets its own gradient. 9 channels in and 8 out: Winograd (v4) on the CPU."""
    x1, x2, w, b = (rng.standard_normal((2, 4, 6, 7)), away_from_zero(rng, 2, 5, 6, 7), rng.standard_normal((8, 9, 3, 3)),
                    rng.standard_normal(8))
    gradcheck(lambda a, c, w, b: F.conv2d([a, c], w, b, 1, 1), [x1, x2, w, b], device)
    gradcheck(lambda a, c, w, b: F.conv2d_relu([a, c], w, b, 1, 1), [x1, x2, w, b], device)
    gradcheck(lambda a, c, w: F.conv2d([a, c, a], w, None, 1, 0), [x1[:, :2], x2, w], device)  # a twice


@pytest.mark.parametrize("stride,padding,output_padding", [(2, 0, 0), (2, 1, 1), (1, 1, 0)])
def test_conv_transpose2d(device, stride, padding, output_padding, rng):
    gradcheck(lambda x, w, b: F.conv_transpose2d(x, w, b, stride, padding, output_padding),
              [rng.standard_normal((2, 2, 3, 4)), rng.standard_normal((2, 3, 3, 3)), rng.standard_normal(3)], device)


@pytest.mark.parametrize("kernel,stride,padding", [(2, 2, 0), (3, 2, 1), (3, 1, 0)])
def test_max_pool2d(device, kernel, stride, padding, rng):
    gradcheck(lambda x: F.max_pool2d(x, kernel, stride, padding), [distinct(rng, 2, 2, 5, 6)], device)


def test_cat_and_center_crop(device, rng):
    gradcheck(lambda a, b: F.cat([F.center_crop(a, (3, 4)), b], 1),
              [rng.standard_normal((2, 2, 6, 7)), rng.standard_normal((2, 3, 3, 4))], device)
    gradcheck(lambda a, b: F.cat([a, b], 0), [rng.standard_normal((1, 3, 2)), rng.standard_normal((2, 3, 2))], device)


@pytest.mark.parametrize("name", ["relu", "sigmoid", "softmax", "log_softmax"])
def test_activations(device, name, rng):
    fn = getattr(F, name)
    f = (lambda x: fn(x, 1)) if name in ("softmax", "log_softmax") else fn
    gradcheck(f, [away_from_zero(rng, 2, 3, 2, 3)], device)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy(device, reduction, rng):
    target = rng.integers(0, 3, (2, 3, 4))
    target[1, 2, :3] = -100
    xp = backend.xp_for(device)
    gradcheck(lambda x: F.cross_entropy(x, xp.asarray(target), weight=xp.asarray([0.5, 1.0, 2.0]), reduction=reduction),
              [rng.standard_normal((2, 3, 3, 4))], device)


def test_binary_cross_entropy_with_logits(device, rng):
    xp = backend.xp_for(device)
    pw = xp.asarray(rng.uniform(0.5, 3, (3, 1)))
    gradcheck(lambda x, t: F.binary_cross_entropy_with_logits(x, t, pos_weight=pw),
              [rng.standard_normal((2, 3, 4)) * 3, rng.uniform(0, 1, (2, 3, 4))], device)


@pytest.mark.parametrize("training", [True, False])
def test_batch_norm(device, training, rng):
    xp = backend.xp_for(device)
    rm, rv = rng.standard_normal(3), rng.uniform(0.5, 2, 3)

    def f(x, g, b):  # fresh running stats per call: the update must not feed back into L
        return F.batch_norm(x, xp.asarray(rm), xp.asarray(rv), g, b, training=training)
    gradcheck(f, [rng.standard_normal((3, 3, 2, 3)), rng.uniform(0.5, 1.5, 3), rng.standard_normal(3)], device)


def test_dice_loss(device, rng):
    xp = backend.xp_for(device)
    target = xp.asarray(rng.integers(0, 3, (2, 3, 3)))
    gradcheck(lambda x: F.dice_loss(x, target, eps=0.5), [rng.standard_normal((2, 3, 3, 3))], device)


def small_unet(x, w1, b1, w2, b2, wt, bt, w3, b3, target, padding):
    """conv, relu, pool, conv, relu, transposed conv, concatenation with the skip, 1x1 conv, loss."""
    skip = F.relu(F.conv2d(x, w1, b1, padding=padding))
    down = F.relu(F.conv2d(F.max_pool2d(skip, 2), w2, b2, padding=padding))
    up = F.conv_transpose2d(down, wt, bt, stride=2)
    joined = F.cat([F.center_crop(skip, up.shape[2:]), up], 1)
    return F.cross_entropy(F.conv2d(joined, w3, b3), target[:, :up.shape[2], :up.shape[3]])


@pytest.mark.parametrize("padding", [1, 0])
def test_unet_shaped_graph_end_to_end(device, padding, rng):
    xp = backend.xp_for(device)
    size = 8 if padding else 12
    target = xp.asarray(rng.integers(0, 3, (2, size, size)))
    params = [rng.standard_normal((2, 1, size, size)),
              rng.standard_normal((4, 1, 3, 3)) * 0.5, rng.standard_normal(4) * 0.1,
              rng.standard_normal((6, 4, 3, 3)) * 0.3, rng.standard_normal(6) * 0.1,
              rng.standard_normal((6, 4, 2, 2)) * 0.3, rng.standard_normal(4) * 0.1,
              rng.standard_normal((3, 8, 1, 1)) * 0.3, rng.standard_normal(3) * 0.1]
    gradcheck(lambda *p: small_unet(*p, target, padding), params, device, directions=3, every_element_below=16)
