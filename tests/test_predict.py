"""Test-time augmentation (minunet.predict: Tiler(tta=True), D4): the 8 flips and quarter turns.

The reference writes the 8 symmetries of the square out one by one with NumPy (not with
minunet's d4_transform) and runs the model's forward directly, not through the Tiler.
"""
import numpy as np
import pytest

from minunet import nn
from minunet.autograd import no_grad, tensor
from minunet.predict import D4, Tiler, d4_inverse, d4_transform
from minunet.unet import UNet

# (transform, its inverse) on the last two axes, written out
SYMMETRIES = [
    (lambda a: a, lambda a: a),
    (lambda a: np.rot90(a, 1, (-2, -1)), lambda a: np.rot90(a, 3, (-2, -1))),
    (lambda a: np.rot90(a, 2, (-2, -1)), lambda a: np.rot90(a, 2, (-2, -1))),
    (lambda a: np.rot90(a, 3, (-2, -1)), lambda a: np.rot90(a, 1, (-2, -1))),
    (lambda a: np.flip(a, -1), lambda a: np.flip(a, -1)),
    (lambda a: np.flip(a, -2), lambda a: np.flip(a, -2)),
    (lambda a: np.swapaxes(a, -2, -1), lambda a: np.swapaxes(a, -2, -1)),
    (lambda a: np.flip(np.swapaxes(a, -2, -1), (-2, -1)), lambda a: np.flip(np.swapaxes(a, -2, -1), (-2, -1))),
]


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _model(seed=0, classes=3):
    nn.manual_seed(seed)
    model = UNet(in_channels=2, num_classes=classes, base_channels=4, depth=2, batch_norm=True)
    # make batch norm's running statistics non-trivial, so eval mode is a real affine map
    rng = np.random.default_rng(seed)
    for name, buf in model.named_buffers():
        if name.endswith("running_var"):
            buf.data[...] = rng.uniform(0.5, 1.5, buf.shape)
        elif name.endswith("running_mean"):
            buf.data[...] = rng.normal(0, 0.1, buf.shape)
    return model.eval()


def _symmetrize(model):
    """Average every spatial kernel over the 8 symmetries: the network becomes D4-equivariant."""
    for p in model.parameters():
        if p.data.ndim == 4 and p.data.shape[-1] > 1:
            p.data[...] = sum(t(p.data) for t, _ in SYMMETRIES) / len(SYMMETRIES)
    return model


def _forward(model, x):
    with no_grad():
        return model(tensor(np.ascontiguousarray(x, np.float32))).data


def test_d4_is_the_eight_symmetries_and_inverts():
    a = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    images = [d4_transform(a, k, m) for k, m in D4]
    expected = [t(a) for t, _ in SYMMETRIES]
    assert len(D4) == 8
    assert sorted(x.tobytes() + bytes(x.shape) for x in images) == sorted(x.tobytes() + bytes(x.shape) for x in expected)
    for k, m in D4:
        np.testing.assert_array_equal(d4_inverse(d4_transform(a, k, m), k, m), a)


def test_tta_averages_the_eight_transformed_predictions():
    model = _model()
    x = np.random.default_rng(1).standard_normal((2, 2, 16, 16)).astype(np.float32)
    expected = sum(inv(_softmax(_forward(model, t(x)))) for t, inv in SYMMETRIES) / 8
    logits = Tiler(model, 16, tta=True).run(x, logits=True)
    np.testing.assert_allclose(_softmax(logits), expected, atol=1e-5)
    np.testing.assert_array_equal(Tiler(model, 16, tta=True).run(x), expected.argmax(axis=1))
    # an ordinary model is not symmetric: TTA changes its output (so the test above can fail)
    plain = _softmax(Tiler(model, 16).run(x, logits=True))
    assert np.abs(plain - expected).max() > 1e-3


def test_an_equivariant_model_gains_nothing_from_tta():
    model = _symmetrize(_model(seed=2))
    x = np.random.default_rng(3).standard_normal((2, 2, 16, 16)).astype(np.float32)
    for t, inv in SYMMETRIES:  # equivariant by construction: predicting t(x) gives t(prediction)
        np.testing.assert_allclose(inv(_forward(model, t(x))), _forward(model, x), rtol=1e-4, atol=1e-5)
    plain = Tiler(model, 16).run(x, logits=True)
    with_tta = Tiler(model, 16, tta=True).run(x, logits=True)
    np.testing.assert_allclose(_softmax(with_tta), _softmax(plain), atol=1e-5)
    np.testing.assert_array_equal(Tiler(model, 16, tta=True).run(x), Tiler(model, 16).run(x))


@pytest.mark.parametrize("hw, tile", [((20, 36), 16), ((37, 23), 24), ((16, 16), 8)])
def test_tta_keeps_shapes_with_overlapping_tiles(hw, tile):
    model = _model(classes=2)
    x = np.random.default_rng(4).standard_normal((3, 2) + hw).astype(np.float32)
    tiler = Tiler(model, tile, batch_size=3, tta=True)
    logits, labels = tiler.run(x, logits=True), tiler.run(x)
    assert logits.shape == (3, 2) + hw and logits.dtype == np.float32
    assert labels.shape == (3,) + hw and labels.dtype == np.uint8
    np.testing.assert_allclose(np.exp(logits).sum(axis=1), 1, atol=1e-5)  # log-probabilities
    # each of the 8 passes is the plain overlap-tile prediction of the transformed image
    plain = Tiler(model, tile, batch_size=3)
    expected = sum(inv(_softmax(plain.run(t(x), logits=True))) for t, inv in SYMMETRIES) / 8
    np.testing.assert_allclose(np.exp(logits), expected, atol=1e-5)
    np.testing.assert_array_equal(labels, expected.argmax(axis=1))
