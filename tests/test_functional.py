"""minunet.functional against PyTorch (forward and backward, float32 and float64) and its
errors for bad input. Kernel-level correctness against tests/reference.py lives in
test_kernels.py; this file pins the op-level semantics (argument handling, reductions,
ignore_index, running statistics) to PyTorch's, where PyTorch is installed."""
import numpy as np
import pytest

import minunet as mn
from minunet import F, backend

RTOL = {np.float32: 1e-4, np.float64: 1e-10}
DTYPES = [np.float32, np.float64]


def assert_close(actual, expected, dtype, what):
    actual, expected = backend.to_numpy(actual), np.asarray(expected)
    scale = max(1.0, float(np.abs(expected).max())) if expected.size else 1.0
    tol = RTOL[dtype]
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * scale, err_msg=what)


def compare(mn_fn, torch_fn, arrays, dtype, device, grad=True, seed=0):
    """Run both, compare y, then backward with one random gy and compare every input grad."""
    torch = pytest.importorskip("torch")
    xp = backend.xp_for(device)
    arrays = [np.asarray(a, dtype=dtype) for a in arrays]
    mts = [mn.Tensor(xp.asarray(a), requires_grad=grad) for a in arrays]
    tts = [torch.tensor(a, requires_grad=grad) for a in arrays]
    y, ty = mn_fn(*mts), torch_fn(*tts)
    assert y.shape == tuple(ty.shape), f"shape {y.shape} vs torch {tuple(ty.shape)}"
    assert y.dtype == dtype
    assert_close(y.data, ty.detach().numpy(), dtype, "forward")
    if not grad:
        return
    gy = np.random.default_rng(seed).standard_normal(y.shape).astype(dtype)
    y.backward(xp.asarray(gy))
    ty.backward(torch.tensor(gy))
    for i, (m, t) in enumerate(zip(mts, tts)):
        assert_close(m.grad.numpy(), t.grad.numpy(), dtype, f"gradient of input {i}")


def rand(rng, *shape):
    return rng.standard_normal(shape)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("stride,padding,bias", [(1, 0, True), (1, 1, False), (2, 1, True), ((2, 1), (0, 2), True), (3, 0, True)])
def test_conv2d_matches_torch(device, dtype, stride, padding, bias, rng):
    tf = pytest.importorskip("torch.nn.functional")
    arrays = [rand(rng, 2, 3, 9, 8), rand(rng, 4, 3, 3, 2)] + ([rand(rng, 4)] if bias else [])
    compare(lambda *t: F.conv2d(*t, stride=stride, padding=padding),
            lambda *t: tf.conv2d(*t, stride=stride, padding=padding), arrays, dtype, device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("stride,padding,output_padding", [(2, 0, 0), (1, 0, 0), (2, 1, 1), (3, 1, (2, 0)), ((2, 3), (0, 1), (1, 2))])
def test_conv_transpose2d_matches_torch(device, dtype, stride, padding, output_padding, rng):
    tf = pytest.importorskip("torch.nn.functional")
    arrays = [rand(rng, 2, 3, 5, 4), rand(rng, 3, 4, 3, 3), rand(rng, 4)]
    kw = dict(stride=stride, padding=padding, output_padding=output_padding)
    compare(lambda *t: F.conv_transpose2d(*t, **kw), lambda *t: tf.conv_transpose2d(*t, **kw), arrays, dtype, device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel,stride,padding", [(2, None, 0), (3, 2, 1), (3, 1, 0), (2, 3, 1), ((3, 2), (1, 2), (1, 0))])
def test_max_pool2d_matches_torch(device, dtype, kernel, stride, padding, rng):
    tf = pytest.importorskip("torch.nn.functional")
    x = rng.permutation(2 * 3 * 7 * 9).reshape(2, 3, 7, 9) / 10.0  # distinct values: one argmax
    compare(lambda t: F.max_pool2d(t, kernel, stride, padding),
            lambda t: tf.max_pool2d(t, kernel, stride, padding), [x], dtype, device)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cat_matches_torch(device, dtype, rng):
    torch = pytest.importorskip("torch")
    a, b, c = rand(rng, 2, 3, 4, 5), rand(rng, 2, 1, 4, 5), rand(rng, 2, 2, 4, 5)
    compare(lambda *t: F.cat(t, 1), lambda *t: torch.cat(t, 1), [a, b, c], dtype, device)
    compare(lambda *t: F.cat(t, -4), lambda *t: torch.cat(t, -4), [a, rand(rng, 1, 3, 4, 5)], dtype, device)
    compare(lambda *t: F.cat(t, 2), lambda *t: torch.cat(t, 2), [a, rand(rng, 2, 3, 2, 5)], dtype, device)


@pytest.mark.parametrize("dtype", DTYPES)
def test_center_crop_matches_slicing(device, dtype, rng):
    pytest.importorskip("torch")
    x = rand(rng, 2, 3, 9, 10)
    compare(lambda t: F.center_crop(t, (5, 7)), lambda t: t[:, :, 2:7, 1:8], [x], dtype, device)
    compare(lambda t: F.center_crop(t, 4), lambda t: t[:, 3:7, 1:5], [rand(rng, 3, 10, 7)], dtype, device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["relu", "sigmoid", "softmax", "log_softmax"])
def test_activations_match_torch(device, dtype, name, rng):
    torch = pytest.importorskip("torch")
    x = rand(rng, 2, 4, 3, 5) * 3
    x[np.abs(x) < 1e-3] = 0.5  # keep relu away from its kink
    if name in ("softmax", "log_softmax"):
        for dim in (1, -1, 0):
            compare(lambda t: getattr(F, name)(t, dim), lambda t: getattr(torch, name)(t, dim), [x], dtype, device)
    else:
        compare(getattr(F, name), getattr(torch, name), [x], dtype, device)
    big = np.array([-800.0, -30.0, 0.0, 30.0, 800.0])  # no overflow warnings, exact limits
    compare(getattr(F, name) if name not in ("softmax", "log_softmax") else (lambda t: getattr(F, name)(t, 0)),
            getattr(torch, name) if name not in ("softmax", "log_softmax") else (lambda t: getattr(torch, name)(t, 0)),
            [big], dtype, device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
def test_cross_entropy_matches_torch(device, dtype, reduction, weighted, rng):
    torch = pytest.importorskip("torch")
    tf = torch.nn.functional
    n, c, h, w = 2, 4, 5, 3
    target = rng.integers(0, c, (n, h, w))
    target[0, 0, :2] = 255  # ignored pixels
    weight = rng.uniform(0.5, 2.0, c).astype(dtype) if weighted else None
    xp = backend.xp_for(device)
    kw = dict(ignore_index=255, reduction=reduction)
    compare(lambda x: F.cross_entropy(x, xp.asarray(target), weight=None if weight is None else xp.asarray(weight), **kw),
            lambda x: tf.cross_entropy(x, torch.tensor(target), weight=None if weight is None else torch.tensor(weight), **kw),
            [rand(rng, n, c, h, w) * 2], dtype, device)
    t2 = rng.integers(0, c, (6,))  # (N, C) logits, (N,) targets
    compare(lambda x: F.cross_entropy(x, xp.asarray(t2), reduction=reduction),
            lambda x: tf.cross_entropy(x, torch.tensor(t2), reduction=reduction), [rand(rng, 6, c)], dtype, device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_binary_cross_entropy_with_logits_matches_torch(device, dtype, reduction, rng):
    torch = pytest.importorskip("torch")
    tf = torch.nn.functional
    x, t = rand(rng, 2, 3, 4, 4) * 4, rng.uniform(0, 1, (2, 3, 4, 4))
    pw, w = rng.uniform(0.5, 3, (3, 1, 1)).astype(dtype), rng.uniform(0, 1, (4, 4)).astype(dtype)
    xp = backend.xp_for(device)
    compare(lambda a, b: F.binary_cross_entropy_with_logits(a, b, xp.asarray(w), xp.asarray(pw), reduction),
            lambda a, b: tf.binary_cross_entropy_with_logits(a, b, torch.tensor(w), reduction=reduction, pos_weight=torch.tensor(pw)),
            [x, t], dtype, device)
    compare(lambda a: F.binary_cross_entropy_with_logits(a, xp.asarray(t.astype(dtype)), reduction=reduction),
            lambda a: tf.binary_cross_entropy_with_logits(a, torch.tensor(t.astype(dtype)), reduction=reduction),
            [x], dtype, device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_matches_torch(device, dtype, training, rng):
    torch = pytest.importorskip("torch")
    xp = backend.xp_for(device)
    c = 3
    rm, rv = rng.standard_normal(c).astype(dtype), rng.uniform(0.5, 2, c).astype(dtype)
    ours = (xp.asarray(rm.copy()), xp.asarray(rv.copy()))
    theirs = (torch.tensor(rm.copy()), torch.tensor(rv.copy()))
    x = rand(rng, 4, c, 3, 5) * 2 + 1
    compare(lambda a, g, b: F.batch_norm(a, *ours, g, b, training=training, momentum=0.2, eps=1e-3),
            lambda a, g, b: torch.nn.functional.batch_norm(a, *theirs, g, b, training=training, momentum=0.2, eps=1e-3),
            [x, rng.uniform(0.5, 1.5, c), rand(rng, c)], dtype, device)
    assert_close(ours[0], theirs[0].numpy(), dtype, "running_mean")
    assert_close(ours[1], theirs[1].numpy(), dtype, "running_var")


def test_dice_loss_is_zero_for_a_perfect_prediction_and_differentiable():
    target = np.array([[[0, 1], [2, 2]]])
    logits = np.full((1, 3, 2, 2), -40.0)
    for c in range(3):
        logits[0, c][target[0] == c] = 40.0
    perfect = F.dice_loss(mn.tensor(logits), target, eps=0.0)
    assert abs(perfect.item()) < 1e-12
    x = mn.tensor(np.zeros((1, 3, 2, 2)), requires_grad=True)
    loss = F.dice_loss(x, target)
    # uniform softmax: class c has |P| = 4/3, |T| = count_c, |P∩T| = count_c/3
    counts = np.array([1, 1, 2])
    dice = (2 * counts / 3 + 1) / (4 / 3 + counts + 1)
    np.testing.assert_allclose(loss.item(), 1 - dice.mean(), rtol=1e-12)
    loss.backward()
    assert x.grad.shape == x.shape and np.abs(x.grad).sum() > 0
    ignored = F.dice_loss(mn.tensor(logits), np.array([[[0, 1], [2, 7]]]), ignore_index=7, eps=0.0)
    assert abs(ignored.item()) < 1e-12


def test_dropout_scales_in_training_and_is_identity_in_eval():
    x = mn.tensor(np.ones((200, 100)), requires_grad=True)
    assert F.dropout(x, 0.3, training=False) is x
    y = F.dropout(x, 0.3)
    kept = y.numpy() != 0
    assert 0.65 < kept.mean() < 0.75
    np.testing.assert_allclose(y.numpy()[kept], 1 / 0.7)
    y.sum().backward()
    np.testing.assert_allclose(x.grad, kept / 0.7)
    assert not F.dropout(x, 1.0).numpy().any()


# ---- errors for bad input ----------------------------------------------------------------

def t(*shape, dtype=np.float32):
    return mn.tensor(np.zeros(shape, dtype=dtype))


@pytest.mark.parametrize("call,exc,message", [
    (lambda: F.conv2d(t(3, 8, 8), t(4, 3, 3, 3)), ValueError, r"conv2d: input x must be 4-D, got shape \(3, 8, 8\)"),
    (lambda: F.conv2d(t(1, 3, 8, 8), t(4, 2, 3, 3)), ValueError, r"conv2d_forward: x has 3 channels but w \(4, 2, 3, 3\) expects 2"),
    (lambda: F.conv2d(t(1, 3, 8, 8), t(4, 3, 3, 3), t(5)), ValueError, r"conv2d_forward: b has shape \(5,\), expected \(4,\)"),
    (lambda: F.conv2d(t(1, 3, 8, 8), t(4, 3, 3, 3, dtype=np.float64)), TypeError, r"conv2d: arguments of different dtypes \(x float32, weight float64\)"),
    (lambda: F.conv2d(t(1, 3, 2, 2), t(4, 3, 3, 3)), ValueError, r"conv2d_forward: input 2x2 with kernel 3x3, stride \(1, 1\) and padding \(0, 0\) gives an empty output"),
    (lambda: F.conv2d(t(1, 3, 8, 8), t(4, 3, 3, 3), stride=0), ValueError, r"conv2d: stride must be >= 1"),
    (lambda: F.conv2d(t(1, 3, 8, 8), t(4, 3, 3, 3), padding=(1, 2, 3)), TypeError, r"conv2d: padding must be an int or an \(h, w\) pair"),
    (lambda: F.conv2d(t(1, 3, 8, 8), t(4, 3, 3, 3), dilation=2), ValueError, r"conv2d: dilation=2 is not supported"),
    (lambda: F.conv2d(np.zeros((1, 3, 8, 8)), t(4, 3, 3, 3)), TypeError, r"conv2d: input x must be a minunet Tensor"),
    (lambda: F.conv2d(t(1, 3, 8, 8, dtype=np.int32), t(4, 3, 3, 3)), TypeError, r"conv2d: input x has dtype int32"),
    (lambda: F.conv_transpose2d(t(1, 3, 4, 4), t(2, 4, 2, 2), stride=2), ValueError, r"conv_transpose2d: input x has 3 channels .* weight expects 2"),
    (lambda: F.conv_transpose2d(t(1, 3, 4, 4), t(3, 4, 2, 2), stride=2, output_padding=2), ValueError, r"output_padding \(2, 2\) must be smaller than stride"),
    (lambda: F.max_pool2d(t(1, 1, 4, 4), 2, padding=2), ValueError, r"max_pool2d_forward: padding \(2, 2\) must be at most half"),
    (lambda: F.max_pool2d(t(1, 1, 1, 4), 2), ValueError, r"max_pool2d_forward: input 1x4 with kernel 2x2, stride \(2, 2\) and padding \(0, 0\) gives an empty output"),
    (lambda: F.cat([t(1, 2, 4, 4), t(1, 2, 5, 4)], 1), ValueError, r"cat: sizes must match except in dim 1; got shapes \(1, 2, 4, 4\), \(1, 2, 5, 4\)"),
    (lambda: F.cat([], 1), ValueError, r"cat: expected a non-empty list"),
    (lambda: F.cat([t(1, 2), t(1, 2)], 2), ValueError, r"cat: dim 2 is out of range"),
    (lambda: F.center_crop(t(1, 1, 4, 4), (5, 4)), ValueError, r"center_crop: cannot crop \(5, 4\) out of input x \(1, 1, 4, 4\)"),
    (lambda: F.softmax(t(2, 3), 2), ValueError, r"softmax: dim 2 is out of range for input x of shape \(2, 3\)"),
    (lambda: F.cross_entropy(t(2, 3, 4, 4), np.full((2, 4, 4), 3)), ValueError, r"cross_entropy: target holds class indices \[3\] outside \[0, 3\)"),
    (lambda: F.cross_entropy(t(2, 3, 4, 4), np.zeros((2, 4, 5), int)), ValueError, r"cross_entropy: target has shape \(2, 4, 5\), expected \(2, 4, 4\)"),
    (lambda: F.cross_entropy(t(2, 3, 4, 4), np.zeros((2, 4, 4))), TypeError, r"cross_entropy: target must hold integer class indices, got dtype float64"),
    (lambda: F.cross_entropy(t(2, 3, 4, 4), np.zeros((2, 4, 4), int), weight=np.ones(2)), ValueError, r"softmax_cross_entropy_forward: weight has shape \(2,\), expected \(3,\)"),
    (lambda: F.cross_entropy(t(2, 3, 4, 4), np.zeros((2, 4, 4), int), reduction="avg"), ValueError, r"reduction must be 'mean', 'sum' or 'none'"),
    (lambda: F.cross_entropy(t(2, 3, 4), np.zeros((2, 4), int)), ValueError, r"cross_entropy: logits must be 2-D or 4-D, got shape \(2, 3, 4\)"),
    (lambda: F.binary_cross_entropy_with_logits(t(2, 3), np.zeros((3, 2))), ValueError, r"target has shape \(3, 2\), logits \(2, 3\)"),
    (lambda: F.binary_cross_entropy_with_logits(t(2, 3), np.zeros((2, 3)), pos_weight=np.ones(2)), ValueError, r"pos_weight of shape \(2,\) does not broadcast"),
    (lambda: F.batch_norm(t(1, 3, 1, 1), None, None, training=True), ValueError, r"batch_norm: training needs more than one value per channel"),
    (lambda: F.batch_norm(t(2, 3, 4, 4), None, None), ValueError, r"batch_norm: eval mode needs running_mean and running_var"),
    (lambda: F.batch_norm(t(2, 3, 4, 4), np.zeros(2), np.ones(2)), ValueError, r"batch_norm: running_mean must be a \(3,\) array on cpu, got shape \(2,\)"),
    (lambda: F.batch_norm(t(2, 3, 4, 4), np.zeros(3), np.ones(3), weight=t(4)), ValueError, r"batch_norm_forward: gamma has shape \(4,\), expected \(3,\)"),
    (lambda: F.dropout(t(2), 1.5), ValueError, r"dropout: p must be in \[0, 1\]"),
])
def test_bad_input_gives_a_clear_error(call, exc, message):
    with pytest.raises(exc, match=message):
        call()


@pytest.mark.gpu
def test_mixed_devices_are_refused():
    if not backend.cuda_available():
        pytest.skip(backend.cuda_status()[1])
    x, w = t(1, 3, 8, 8), t(4, 3, 3, 3).to("cuda")
    with pytest.raises(ValueError, match=r"conv2d: arguments on different devices \(x on cpu, weight on cuda\)"):
        F.conv2d(x, w)
    with pytest.raises(ValueError, match=r"cross_entropy: target is on cpu but the input is on cuda"):
        F.cross_entropy(t(2, 3, 4, 4).to("cuda"), mn.tensor(np.zeros((2, 4, 4), int)))


def test_ops_accept_non_contiguous_inputs(device, rng):
    x = mn.tensor(rng.standard_normal((2, 3, 8, 12)), device=device)[:, :, :, ::2]  # a strided view
    w = mn.tensor(rng.standard_normal((4, 3, 3, 3)), device=device, requires_grad=True)
    y = F.max_pool2d(F.relu(F.conv2d(x, w, padding=1)), 2)
    dense = F.max_pool2d(F.relu(F.conv2d(mn.tensor(x.numpy().copy(), device=device), w, padding=1)), 2)
    np.testing.assert_array_equal(y.numpy(), dense.numpy())
    assert mn.tensor(np.zeros((3, 4)).T).data.flags.c_contiguous
