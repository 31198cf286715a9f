"""Every op of minunet.functional, forward and backward, against tests/reference.py, on every
device, in float32 and float64, with no PyTorch anywhere (tests/test_functional.py adds
PyTorch parity where PyTorch is installed).

Each test runs the op on Tensors that require grad, takes its output y, back-propagates one
random gy, and checks y and every input gradient against the reference's forward and backward
functions evaluated in float64 on the same values. Where an op composes kernels (the
transposed convolution as conv2d's adjoint, cross_entropy's reductions, batch_norm's running
statistics) this is the test of that composition; tests/test_kernels.py tests the kernels
themselves. Shapes come from hypothesis strategies (tests/strategies.py) as well as fixed lists.
"""
import numpy as np
import pytest
from hypothesis import given

import minunet as mn
import reference as ref
import strategies
from minunet import F, backend

DTYPES = [pytest.param(np.float32, id="f32"), pytest.param(np.float64, id="f64")]
RTOL = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-10}


def check(actual, expected, dtype, what):
    actual, expected, dtype = backend.to_numpy(actual), np.asarray(expected), np.dtype(dtype)
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype}, expected {dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape}, expected {expected.shape}"
    scale = float(np.abs(expected).max(initial=0.0)) or 1.0
    np.testing.assert_allclose(actual, expected, rtol=RTOL[dtype], atol=RTOL[dtype] * scale, err_msg=what)


def run(device, fn, arrays, dtype, seed=99):
    """fn(*tensors) on `device` with every array a Tensor that requires grad, then backward of
    one random gy (from its own seed: a gy drawn like the inputs could make a gradient vanish)
    and return (y, [gradients], gy), all as NumPy arrays, gy in `dtype`."""
    tensors = [mn.tensor(np.asarray(a, dtype), device=device, requires_grad=True) for a in arrays]
    y = fn(*tensors)
    gy = np.random.default_rng(seed).standard_normal(y.shape).astype(dtype)
    y.backward(backend.to_device(gy, device))
    return y.numpy(), [t.grad if t.grad is None else t.grad.numpy() for t in tensors], gy


def rand(rng, dtype, *shapes):
    return [rng.standard_normal(s).astype(dtype) for s in shapes]


# ----------------------------------------------------------------------------- convolutions

def _conv2d_case_check(device, dtype, case, bias, rng):
    N, C, H, W, K, ks, stride, padding = case
    x, w, b = rand(rng, dtype, (N, C, H, W), (K, C, *ks), (K,))
    arrays = [x, w] + ([b] if bias else [])
    y, grads, gy = run(device, lambda *t: F.conv2d(*t, stride=stride, padding=padding), arrays, dtype)
    check(y, ref.conv2d_forward(x, w, b if bias else None, stride, padding), dtype, "conv2d y")
    check(grads[0], ref.conv2d_backward_input(gy, w, x.shape, stride, padding), dtype, "conv2d gx")
    check(grads[1], ref.conv2d_backward_weight(x, gy, w.shape, stride, padding), dtype, "conv2d gw")
    if bias:
        check(grads[2], ref.bias_backward(gy), dtype, "conv2d gb")


@pytest.mark.parametrize("dtype", DTYPES)
@strategies.SETTINGS
@given(case=strategies.conv2d_cases(), bias=strategies.booleans())
def test_conv2d(device, dtype, case, bias):
    _conv2d_case_check(device, dtype, case, bias, np.random.default_rng(1))


def _conv_transpose2d_check(device, dtype, case, bias, rng):
    N, Cin, H, W, Cout, ks, stride, padding, output_padding = case
    x, w, b = rand(rng, dtype, (N, Cin, H, W), (Cin, Cout, *ks), (Cout,))
    arrays = [x, w] + ([b] if bias else [])
    kw = dict(stride=stride, padding=padding, output_padding=output_padding)
    y, grads, gy = run(device, lambda *t: F.conv_transpose2d(*t, **kw), arrays, dtype)
    check(y, ref.conv_transpose2d_forward(x, w, b if bias else None, stride, padding, output_padding), dtype,
          "conv_transpose2d y")
    check(grads[0], ref.conv_transpose2d_backward_input(gy, w, stride, padding), dtype, "conv_transpose2d gx")
    check(grads[1], ref.conv_transpose2d_backward_weight(x, gy, w.shape, stride, padding), dtype,
          "conv_transpose2d gw")
    if bias:
        check(grads[2], ref.bias_backward(gy), dtype, "conv_transpose2d gb")


# (N, Cin, H, W, Cout, (kh, kw), stride, padding, output_padding): both routes of the op
CONV_T_CASES = [
    (2, 4, 5, 6, 3, (2, 2), (2, 2), (0, 0), (0, 0)),   # kernel == stride: the backends' own kernels
    (1, 2, 3, 4, 2, (3, 3), (3, 3), (0, 0), (0, 0)),
    (1, 3, 4, 5, 2, (3, 3), (2, 2), (1, 1), (1, 1)),   # conv2d's kernels in adjoint roles ...
    (2, 2, 5, 4, 3, (3, 3), (1, 1), (1, 1), (0, 0)),   # stride 1: overlapping patches
    (1, 2, 4, 3, 2, (2, 2), (3, 3), (0, 0), (2, 1)),   # stride > kernel: gaps, output_padding
    (1, 1, 3, 5, 1, (3, 2), (2, 1), (1, 0), (1, 0)),   # asymmetric, batch 1, one channel
    (1, 2, 2, 2, 2, (2, 2), (2, 2), (0, 0), (1, 1)),   # kernel == stride but output_padding
    (1, 2, 3, 3, 3, (2, 2), (2, 2), (1, 1), (0, 0)),   # kernel == stride but padding
]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("case", CONV_T_CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_conv_transpose2d(device, dtype, case, bias, rng):
    _conv_transpose2d_check(device, dtype, case, bias, rng)


@pytest.mark.parametrize("dtype", DTYPES)
@strategies.SETTINGS
@given(case=strategies.conv_transpose2d_cases(), bias=strategies.booleans())
def test_conv_transpose2d_drawn(device, dtype, case, bias):
    _conv_transpose2d_check(device, dtype, case, bias, np.random.default_rng(2))


# ----------------------------------------------------------------------------- pooling, concat

@pytest.mark.parametrize("dtype", DTYPES)
@strategies.SETTINGS
@given(case=strategies.pool_cases())
def test_max_pool2d(device, dtype, case):
    N, C, H, W, ks, stride, padding = case
    n = N * C * H * W
    x = (np.random.default_rng(3).permutation(n) - n / 2).reshape(N, C, H, W)  # distinct: one argmax
    y, (gx,), gy = run(device, lambda t: F.max_pool2d(t, ks, stride, padding), [x], dtype)
    y_ref, argmax = ref.max_pool2d_forward(x, ks, stride, padding)
    check(y, y_ref, dtype, "max_pool2d y")
    check(gx, ref.max_pool2d_backward(gy, argmax, x.shape), dtype, "max_pool2d gx")


@pytest.mark.parametrize("dtype", DTYPES)
@strategies.SETTINGS
@given(case=strategies.concat_cases())
def test_cat_along_channels(device, dtype, case):
    shapes, _, out_hw = case
    xs = rand(np.random.default_rng(4), dtype, *[(s[0], s[1], *out_hw) for s in shapes])  # cat: no cropping
    y, grads, gy = run(device, lambda *t: F.cat(t, dim=1), xs, dtype)
    offsets = [(0, 0)] * len(xs)
    check(y, ref.concat_forward(xs, offsets, out_hw), dtype, "cat y")
    for i, (g, e) in enumerate(zip(grads, ref.concat_backward(gy, [x.shape for x in xs], offsets))):
        check(g, e, dtype, f"cat gx[{i}]")


@pytest.mark.parametrize("dtype", DTYPES)
def test_center_crop(device, dtype, rng):
    (x,) = rand(rng, dtype, (2, 3, 9, 8))
    y, (gx,), gy = run(device, lambda t: F.center_crop(t, (4, 5)), [x], dtype)
    offset = ((9 - 4) // 2, (8 - 5) // 2)
    check(y, ref.concat_forward([x], [offset], (4, 5)), dtype, "center_crop y")
    check(gx, ref.concat_backward(gy, [x.shape], [offset])[0], dtype, "center_crop gx")


# ----------------------------------------------------------------------------- activations

@pytest.mark.parametrize("dtype", DTYPES)
def test_relu(device, dtype, rng):
    (x,) = rand(rng, dtype, (2, 3, 4, 5))
    y, (gx,), gy = run(device, F.relu, [x], dtype)
    check(y, ref.relu_forward(x), dtype, "relu y")
    check(gx, ref.relu_backward(gy, ref.relu_forward(x)), dtype, "relu gx")


@pytest.mark.parametrize("dtype", DTYPES)
def test_sigmoid(device, dtype, rng):
    (x,) = rand(rng, dtype, (3, 7))
    x *= 10  # both tails
    y, (gx,), gy = run(device, F.sigmoid, [x], dtype)
    check(y, ref.sigmoid(x), dtype, "sigmoid y")
    check(gx, ref.sigmoid_backward(gy, ref.sigmoid(x)), dtype, "sigmoid gx")


@pytest.mark.parametrize("dim", [1, -1, 0])
@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_and_log_softmax(device, dtype, dim, rng):
    (x,) = rand(rng, dtype, (2, 4, 3, 5))
    x *= 5
    y, (gx,), gy = run(device, lambda t: F.softmax(t, dim), [x], dtype)
    check(y, ref.softmax(x, dim), dtype, "softmax y")
    check(gx, ref.softmax_backward(gy, ref.softmax(x, dim), dim), dtype, "softmax gx")
    y, (gx,), gy = run(device, lambda t: F.log_softmax(t, dim), [x], dtype)
    check(y, ref.log_softmax(x, dim), dtype, "log_softmax y")
    check(gx, ref.log_softmax_backward(gy, ref.log_softmax(x, dim), dim), dtype, "log_softmax gx")


# ----------------------------------------------------------------------------- losses

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("ignore_index", [-100, 1])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy(device, dtype, ignore_index, weighted, reduction, rng):
    (x,) = rand(rng, dtype, (2, 3, 4, 5))
    x *= 3
    target = rng.integers(0, 3, size=(2, 4, 5))
    target[0, 0, 0] = 2  # a pixel that counts, whatever ignore_index is
    weight = (rng.random(3) + 0.5).astype(dtype) if weighted else None
    on_device = None if weight is None else backend.to_device(weight, device)
    y, (gx,), gy = run(device, lambda t: F.cross_entropy(t, backend.to_device(target, device), weight=on_device,
                                                         ignore_index=ignore_index, reduction=reduction), [x], dtype)
    check(y, ref.cross_entropy(x, target, weight, ignore_index, reduction), dtype, "cross_entropy y")
    check(gx, ref.cross_entropy_backward(x, target, weight, ignore_index, reduction, gy), dtype, "cross_entropy gx")


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_of_a_batch_of_vectors(device, dtype, rng):
    """(N, C) logits with (N,) targets, as PyTorch's classification use: the 4-D op on 1x1 images."""
    (x,) = rand(rng, dtype, (6, 4))
    target = rng.integers(0, 4, size=6)
    y, (gx,), gy = run(device, lambda t: F.cross_entropy(t, backend.to_device(target, device)), [x], dtype)
    x4, t3 = x[:, :, None, None], target[:, None, None]
    check(y, ref.cross_entropy(x4, t3), dtype, "cross_entropy y")
    check(gx, ref.cross_entropy_backward(x4, t3, None, -100, "mean", gy)[:, :, 0, 0], dtype, "cross_entropy gx")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_binary_cross_entropy_with_logits(device, dtype, reduction, rng):
    x, weight = rand(rng, dtype, (2, 3, 4, 4), (3, 1, 1))
    target = (rng.random((2, 3, 4, 4)) < 0.4).astype(dtype)
    pos_weight = (rng.random((3, 1, 1)) + 0.5).astype(dtype)
    t_, w_, pw_ = (backend.to_device(a, device) for a in (target, weight, pos_weight))
    y, (gx,), gy = run(device, lambda t: F.binary_cross_entropy_with_logits(
        t, t_, weight=w_, pos_weight=pw_, reduction=reduction), [x], dtype)
    check(y, ref.binary_cross_entropy_with_logits(x, target, weight, pos_weight, reduction), dtype, "bce y")
    check(gx, ref.binary_cross_entropy_with_logits_backward(x, target, weight, pos_weight, reduction, gy), dtype,
          "bce gx")


# ----------------------------------------------------------------------------- normalisation

@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(4, 3, 5, 6), (6, 2)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_norm(device, dtype, shape, training, rng):
    C = shape[1]
    x, gamma, beta = rand(rng, dtype, shape, (C,), (C,))
    x = x * 2 + 3
    running_mean, running_var = rng.standard_normal(C), rng.random(C) + 0.5
    rm, rv = backend.to_device(running_mean.copy(), device), backend.to_device(running_var.copy(), device)
    y, (gx, ggamma, gbeta), gy = run(device, lambda t, g, b: F.batch_norm(t, rm, rv, g, b, training=training,
                                                                            momentum=0.3), [x, gamma, beta], dtype)
    y_ref, mean, var = ref.batch_norm_forward(x, gamma, beta, running_mean, running_var, 1e-5, training)
    check(y, y_ref, dtype, "batch_norm y")
    gx_ref, ggamma_ref, gbeta_ref = ref.batch_norm_backward(gy, x, gamma, mean, var, 1e-5, training)
    check(gx, gx_ref, dtype, "batch_norm gx")
    check(ggamma, ggamma_ref, dtype, "batch_norm gweight")
    check(gbeta, gbeta_ref, dtype, "batch_norm gbias")
    expected_rm, expected_rv = ((ref.batch_norm_update_running(running_mean, running_var, mean, var, x.size // C, 0.3))
                                if training else (running_mean, running_var))
    np.testing.assert_allclose(backend.to_numpy(rm), expected_rm, rtol=RTOL[np.dtype(dtype)], err_msg="running mean")
    np.testing.assert_allclose(backend.to_numpy(rv), expected_rv, rtol=RTOL[np.dtype(dtype)], err_msg="running var")
