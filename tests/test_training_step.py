"""A U-Net-shaped training step, on every device, against the same step composed from the
NumPy float64 oracles of tests/reference.py.

One level of a U-Net (conv, ReLU, max-pool, up-convolution, skip concatenation, weighted
cross-entropy with ignored pixels, SGD with momentum, Nesterov and weight decay) runs through
minunet.functional and the backend's sgd_update. In float64 the loss, every gradient and every
updated parameter must agree with the reference to 1e-9, for every convolution version of the
device's kernel module (and version=None); in float32 the loss must agree to float32 rounding.
On 'cuda' this runs on a GPU or on the CUDA emulator (tests/cuda_emulator).
"""
import functools

import numpy as np

import reference as ref
from minunet import F, backend, contract, tensor

CONV_OPS = [name for name in contract.CONTRACT if "version" in contract.signature(name).parameters]

IGNORE = 2  # ignore_index names a real class, so some pixels drop out of the loss
PARAM_SHAPES = {  # one level of a U-Net with same-padding convolutions
    "w1": (4, 1, 3, 3), "b1": (4,), "w2": (4, 4, 3, 3), "b2": (4,),      # encoder, then the skip
    "w3": (8, 4, 3, 3), "b3": (8,),                                        # bottom, after max-pool
    "wt": (8, 4, 2, 2), "bt": (4,),                                        # up-convolution 2x2/2
    "w4": (4, 8, 3, 3), "b4": (4,), "w5": (3, 4, 1, 1), "b5": (3,),        # decoder and 1x1 classifier
}
LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 1e-3


def _problem(rng):
    params = {k: rng.standard_normal(s) * (0.5 if k.startswith("w") else 0.1) for k, s in PARAM_SHAPES.items()}
    x = rng.standard_normal((2, 1, 12, 10))
    target = rng.integers(0, 3, size=(2, 12, 10)).astype(np.int64)
    weight = np.array([0.5, 2.0, 1.0])
    return params, x, target, weight


def _reference_step(params, x, target, weight):
    """Loss, gradients and SGD-updated parameters of the step, composed from tests/reference.py."""
    P = params
    one, same, none = (1, 1), (1, 1), (0, 0)
    a1 = ref.relu_forward(ref.conv2d_forward(x, P["w1"], P["b1"], one, same))
    a2 = ref.relu_forward(ref.conv2d_forward(a1, P["w2"], P["b2"], one, same))
    pooled, argmax = ref.max_pool2d_forward(a2, (2, 2), (2, 2), none)
    a3 = ref.relu_forward(ref.conv2d_forward(pooled, P["w3"], P["b3"], one, same))
    u = ref.conv_transpose2d_forward(a3, P["wt"], P["bt"], (2, 2), none, none)
    c = ref.concat_forward([a2, u], [(0, 0), (0, 0)], a2.shape[2:])
    a4 = ref.relu_forward(ref.conv2d_forward(c, P["w4"], P["b4"], one, same))
    z = ref.conv2d_forward(a4, P["w5"], P["b5"], one, none)
    loss = ref.cross_entropy(z, target, weight, IGNORE, "mean")

    g = {}
    gz = ref.cross_entropy_backward(z, target, weight, IGNORE, "mean", 1.0)
    g["w5"], g["b5"] = ref.conv2d_backward_weight(a4, gz, P["w5"].shape, one, none), ref.bias_backward(gz)
    g4 = ref.relu_backward(ref.conv2d_backward_input(gz, P["w5"], a4.shape, one, none), a4)
    g["w4"], g["b4"] = ref.conv2d_backward_weight(c, g4, P["w4"].shape, one, same), ref.bias_backward(g4)
    g_skip, gu = ref.concat_backward(ref.conv2d_backward_input(g4, P["w4"], c.shape, one, same),
                                     [a2.shape, u.shape], [(0, 0), (0, 0)])
    g["wt"], g["bt"] = ref.conv_transpose2d_backward_weight(a3, gu, P["wt"].shape, (2, 2), none), ref.bias_backward(gu)
    g3 = ref.relu_backward(ref.conv_transpose2d_backward_input(gu, P["wt"], (2, 2), none), a3)
    g["w3"], g["b3"] = ref.conv2d_backward_weight(pooled, g3, P["w3"].shape, one, same), ref.bias_backward(g3)
    g_pool = ref.max_pool2d_backward(ref.conv2d_backward_input(g3, P["w3"], pooled.shape, one, same), argmax, a2.shape)
    g2 = ref.relu_backward(g_skip + g_pool, a2)
    g["w2"], g["b2"] = ref.conv2d_backward_weight(a1, g2, P["w2"].shape, one, same), ref.bias_backward(g2)
    g1 = ref.relu_backward(ref.conv2d_backward_input(g2, P["w2"], a1.shape, one, same), a1)
    g["w1"], g["b1"] = ref.conv2d_backward_weight(x, g1, P["w1"].shape, one, same), ref.bias_backward(g1)

    updated = {k: ref.sgd_update(P[k], g[k], None, LR, MOMENTUM, 0.0, WEIGHT_DECAY, True, True)[0] for k in P}
    return float(loss), g, updated


def _minunet_step(params, x, target, weight, device, dtype):
    """The same step through minunet.functional and the backend's sgd_update on `device`."""
    P = {k: tensor(v.astype(dtype), device=device, requires_grad=True) for k, v in params.items()}
    a1 = F.relu(F.conv2d(tensor(x.astype(dtype), device=device), P["w1"], P["b1"], padding=1))
    a2 = F.relu(F.conv2d(a1, P["w2"], P["b2"], padding=1))
    a3 = F.relu(F.conv2d(F.max_pool2d(a2, 2), P["w3"], P["b3"], padding=1))
    u = F.conv_transpose2d(a3, P["wt"], P["bt"], stride=2)
    a4 = F.relu(F.conv2d(F.cat([a2, u], dim=1), P["w4"], P["b4"], padding=1))
    z = F.conv2d(a4, P["w5"], P["b5"])
    loss = F.cross_entropy(z, tensor(target, device=device), weight=tensor(weight.astype(dtype), device=device),
                           ignore_index=IGNORE)
    loss.backward()
    grads = {k: p.grad.numpy() for k, p in P.items()}
    k = backend.kernels_for(P["w1"].data)
    hyper = backend.to_device(np.array([(LR, MOMENTUM, 0.0, WEIGHT_DECAY, True, True)] * len(P)), device)
    k.sgd_update([p.data for p in P.values()], [p.grad.data for p in P.values()],
                 [backend.array_module(p.data).empty_like(p.data) for p in P.values()], hyper)
    return loss.item(), grads, {k: p.numpy() for k, p in P.items()}


def _kernel_module(device):
    return backend.kernels_for(backend.to_device(np.zeros(1), device))


def test_unet_training_step_matches_reference(device, rng, monkeypatch):
    """float64: loss, gradients and updated parameters agree with the reference to 1e-9, with the
    convolutions of each version of the device's kernels (each op pinned to that version)."""
    k = _kernel_module(device)
    params, x, target, weight = _problem(rng)
    loss_ref, grads_ref, updated_ref = _reference_step(params, x, target, weight)
    versions = sorted({v for op in CONV_OPS for v in k.VERSIONS[op]})
    for version in (None, *versions):
        with monkeypatch.context() as m:
            for op in CONV_OPS:
                if version is not None:
                    pinned = version if version in k.VERSIONS[op] else max(k.VERSIONS[op])
                    m.setattr(k, op, functools.partial(getattr(k, op), version=pinned))
            loss, grads, updated = _minunet_step(params, x, target, weight, device, np.float64)
        what = f"{device}, version {version}"
        np.testing.assert_allclose(loss, loss_ref, rtol=1e-9, err_msg=f"{what}: loss")
        for name in params:
            scale = np.abs(grads_ref[name]).max()
            np.testing.assert_allclose(grads[name], grads_ref[name], rtol=1e-9, atol=1e-9 * scale,
                                       err_msg=f"{what}: grad {name}")
            np.testing.assert_allclose(updated[name], updated_ref[name], rtol=1e-9, atol=1e-12,
                                       err_msg=f"{what}: updated {name}")


def test_unet_training_step_float32_loss(device, rng):
    """float32: the loss of the same step within float32 rounding of the reference."""
    params, x, target, weight = _problem(rng)
    loss_ref, _, _ = _reference_step(params, x, target, weight)
    loss, _, _ = _minunet_step(params, x, target, weight, device, np.float32)
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-4)
