"""What is specific to the CUDA backend, beyond tests/test_kernels.py (which runs every kernel
and version on 'cuda' against tests/reference.py on small shapes):

- tensors on 'cuda': tensor(..., device='cuda'), .to('cuda') / .to('cpu') round trips, and
  gradients flowing back across a device move;
- every kernel family compiles through cupy.RawModule on this GPU and every float/double
  instantiation is found by its name expression;
- the launchers: version selection, and the errors they raise for bad arguments (names of
  the op and the shapes, never a CUDA error);
- the _v2 GEMM tiles at their edges: channel counts and pixel counts that are not multiples
  of the 64 x 64 x 16 tile, several tiles per dimension, and weight gradients long enough to
  be split over blockIdx.z (split-K), against the reference;
- a U-Net-shaped training step (conv, ReLU, max-pool, up-convolution, skip concatenation,
  weighted cross-entropy with ignored pixels, SGD) through minunet.functional on 'cpu' and
  'cuda', each checked against the same step composed from tests/reference.py, for each
  convolution version.

Every test here is marked `gpu` and skipped where no GPU is usable.
"""
import numpy as np
import pytest

import reference as ref
from minunet import backend, functional as F, tensor

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not backend.cuda_available(), reason=f"no usable GPU: {backend.cuda_status()[1]}")]

if backend.cuda_available():
    import cupy

    from minunet import cuda

RTOL = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-10}
CONV_OPS = [name for name in backend.KERNELS if name.startswith("conv")]  # the six that take version=


def check(actual, expected, what):
    """A cupy result against a float64 reference, within its dtype's tolerance."""
    assert isinstance(actual, cupy.ndarray), f"{what}: got {type(actual).__name__}, expected a cupy array"
    a = cupy.asnumpy(actual)
    assert a.shape == expected.shape, f"{what}: shape {a.shape}, expected {expected.shape}"
    rtol = RTOL[a.dtype]
    scale = float(np.abs(expected).max(initial=0.0)) or 1.0
    np.testing.assert_allclose(a, expected, rtol=rtol, atol=rtol * scale, err_msg=what)


# ----------------------------------------------------------------------- tensors on 'cuda'

@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64])
def test_tensor_round_trip(dtype, rng):
    a = (rng.standard_normal((2, 3, 4)) * 10).astype(dtype)
    t = tensor(a, device="cuda")
    assert t.device == "cuda" and isinstance(t.data, cupy.ndarray)
    assert t.dtype == a.dtype and t.shape == a.shape
    np.testing.assert_array_equal(t.numpy(), a)
    back = t.to("cpu")
    assert back.device == "cpu" and isinstance(back.data, np.ndarray) and back.dtype == a.dtype
    np.testing.assert_array_equal(back.numpy(), a)
    moved = tensor(a).to("cuda:0")
    assert moved.device == "cuda"
    np.testing.assert_array_equal(moved.numpy(), a)
    assert moved.to("cuda") is moved, "moving a tensor to the device it is on must not copy it"
    assert backend.kernels_for(t.data) is cuda


def test_gradient_flows_back_across_devices(rng):
    a = rng.standard_normal((3, 5))
    x = tensor(a, requires_grad=True)  # a leaf on the cpu
    y = x.to("cuda")
    (y * y).sum().backward()
    assert isinstance(x.grad, np.ndarray), "the gradient of a cpu leaf must come back to the cpu"
    np.testing.assert_allclose(x.grad, 2 * a, rtol=1e-12)


def test_mixing_devices_is_an_error(rng):
    x = tensor(rng.standard_normal((1, 2, 5, 5)), device="cuda")
    w = tensor(rng.standard_normal((3, 2, 3, 3)))
    with pytest.raises(ValueError, match="conv2d.*device"):
        F.conv2d(x, w)


# ------------------------------------------------------------------- runtime compilation

def test_every_kernel_loads_through_rawmodule():
    """CuPy compiles each family for this GPU and finds every instantiation by its name."""
    for family, names in cuda.FAMILIES.items():
        for name in names:
            for dtype in (np.float32, np.float64):
                fn = cuda._kernel(family, name, np.dtype(dtype))
                assert fn is not None, f"{family}: {name}<{dtype.__name__}> not found"


# ------------------------------------------------------------------------------ launchers

def _conv_args(op, rng):
    """Valid arguments (without version=) for each convolution kernel, on the GPU."""
    d = lambda *s: cupy.asarray(rng.standard_normal(s))  # noqa: E731
    return {
        "conv2d_forward": (d(1, 2, 6, 6), d(3, 2, 3, 3), d(3), (1, 1), (1, 1)),
        "conv2d_backward_input": (d(1, 3, 6, 6), d(3, 2, 3, 3), (1, 2, 6, 6), (1, 1), (1, 1)),
        "conv2d_backward_weight": (d(1, 2, 6, 6), d(1, 3, 6, 6), (3, 2, 3, 3), (1, 1), (1, 1)),
        "conv_transpose2d_forward": (d(1, 2, 3, 3), d(2, 3, 2, 2), d(3), (2, 2), (0, 0), (0, 0)),
        "conv_transpose2d_backward_input": (d(1, 3, 6, 6), d(2, 3, 2, 2), (2, 2), (0, 0)),
        "conv_transpose2d_backward_weight": (d(1, 2, 3, 3), d(1, 3, 6, 6), (2, 3, 2, 2), (2, 2), (0, 0)),
    }[op]


@pytest.mark.parametrize("op", CONV_OPS)
def test_version_selection(op, rng):
    args = _conv_args(op, rng)
    fn = getattr(cuda, op)
    results = {v: cupy.asnumpy(fn(*args, version=v)) for v in cuda.VERSIONS[op]}
    np.testing.assert_allclose(cupy.asnumpy(fn(*args, version=None)), results[cuda.DEFAULT_VERSION[op]],
                               rtol=0, atol=0, err_msg=f"{op}: version=None must run DEFAULT_VERSION")
    for bad in (0, max(cuda.VERSIONS[op]) + 1, "2"):
        with pytest.raises(ValueError, match=f"{op}: unknown version"):
            fn(*args, version=bad)


def _device_arrays(rng):
    """d(*shape, dtype=float32): a standard-normal cupy array."""
    return lambda *shape, dtype=np.float32: cupy.asarray(rng.standard_normal(shape).astype(dtype))


# (label, call taking the array factory d, exception, message pattern): arguments the launchers refuse
BAD_CALLS = [
    ("numpy input", lambda d: cuda.conv2d_forward(np.zeros((1, 2, 6, 6), np.float32), d(3, 2, 3, 3), None, (1, 1), (0, 0)),
     TypeError, r"conv2d_forward: x must be a cupy.ndarray"),
    ("float16", lambda d: cuda.relu_forward(d(2, 3, dtype=np.float16)), TypeError, r"relu_forward: x has dtype float16"),
    ("mixed dtypes", lambda d: cuda.conv2d_forward(d(1, 2, 6, 6), d(3, 2, 3, 3, dtype=np.float64), None, (1, 1), (0, 0)),
     TypeError, r"conv2d_forward: w has dtype float64 but x has float32"),
    ("non-contiguous", lambda d: cuda.conv2d_forward(d(1, 2, 6, 6)[:, :, ::2], d(3, 2, 3, 3), None, (1, 1), (0, 0)),
     ValueError, r"conv2d_forward: x of shape \(1, 2, 3, 6\) must be C-contiguous"),
    ("channels", lambda d: cuda.conv2d_forward(d(1, 2, 6, 6), d(3, 4, 3, 3), None, (1, 1), (0, 0)),
     ValueError, r"conv2d_forward: x has 2 channels .* expects 4"),
    ("empty output", lambda d: cuda.conv2d_forward(d(1, 2, 6, 6), d(3, 2, 7, 7), None, (1, 1), (0, 0)),
     ValueError, r"conv2d_forward: input 6x6 with kernel 7x7"),
    ("gy shape", lambda d: cuda.conv2d_backward_input(d(1, 3, 5, 5), d(3, 2, 3, 3), (1, 2, 6, 6), (1, 1), (0, 0)),
     ValueError, r"conv2d_backward_input: gy has shape \(1, 3, 5, 5\), expected \(1, 3, 4, 4\)"),
    ("bias shape", lambda d: cuda.conv_transpose2d_forward(d(1, 2, 3, 3), d(2, 3, 2, 2), d(4), (2, 2), (0, 0), (0, 0)),
     ValueError, r"conv_transpose2d_forward: b has shape \(4,\), expected \(3,\)"),
    ("stride not a pair", lambda d: cuda.max_pool2d_forward(d(1, 2, 6, 6), (2, 2), 2, (0, 0)),
     TypeError, r"max_pool2d_forward: stride must be an \(h, w\) pair"),
    ("argmax dtype", lambda d: cuda.max_pool2d_backward(d(1, 2, 3, 3), cupy.zeros((1, 2, 3, 3), np.int32), (1, 2, 6, 6)),
     TypeError, r"max_pool2d_backward: argmax must be a cupy int64 array"),
    ("argmax shape", lambda d: cuda.max_pool2d_backward(d(1, 2, 3, 3), cupy.zeros((1, 1, 3, 3), np.int64), (1, 2, 6, 6)),
     ValueError, r"max_pool2d_backward: argmax has shape \(1, 1, 3, 3\), expected \(1, 2, 3, 3\)"),
    ("crop window", lambda d: cuda.concat_forward([d(1, 2, 6, 6), d(1, 1, 4, 4)], [(0, 0), (1, 1)], (4, 4)),
     ValueError, r"concat_forward: the 4x4 window at \(top, left\) = \(1, 1\) does not fit input 1"),
    ("split shapes", lambda d: cuda.concat_backward(d(1, 2, 6, 6), [(1, 1, 6, 6)], [(0, 0)]),
     ValueError, r"concat_backward: x_shapes .* do not split gy"),
    ("target dtype", lambda d: cuda.softmax_cross_entropy_forward(d(1, 2, 6, 6), cupy.zeros((1, 6, 6), np.int32), None, -100),
     TypeError, r"softmax_cross_entropy_forward: target must be a cupy int64 array"),
    ("class weight", lambda d: cuda.softmax_cross_entropy_forward(d(1, 2, 6, 6), cupy.zeros((1, 6, 6), np.int64), d(3), -100),
     ValueError, r"softmax_cross_entropy_forward: weight has shape \(3,\), expected \(2,\)"),
    ("bn eval stats", lambda d: cuda.batch_norm_forward(d(1, 2, 6, 6), None, None, None, None, 1e-5, False),
     ValueError, r"batch_norm_forward: eval mode"),
    ("momentum buffer", lambda d: cuda.sgd_update(d(4, 5), d(4, 5), None, 0.1, 0.9, 0.0, 0.0, False, True),
     ValueError, r"sgd_update: momentum 0.9 needs a momentum buffer"),
    ("state shape", lambda d: cuda.adam_update(d(4, 5), d(4, 5), d(4, 5), d(5, 4), 1e-3, 0.9, 0.999, 1e-8, 0.0, 1, False),
     ValueError, r"adam_update: v has shape \(5, 4\), expected \(4, 5\)"),
    ("adam step", lambda d: cuda.adam_update(d(4, 5), d(4, 5), d(4, 5), d(4, 5), 1e-3, 0.9, 0.999, 1e-8, 0.0, 0, False),
     ValueError, r"adam_update: step counts from 1"),
]


@pytest.mark.parametrize("call, exc, pattern", [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_launcher_rejects_bad_arguments(call, exc, pattern, rng):
    with pytest.raises(exc, match=pattern):
        call(_device_arrays(rng))


# --------------------------------------------------------------- GEMM tile edges, split-K

# (N, C, H, W, K, (kh, kw), stride, padding): sizes that are not multiples of the 64 x 64 x 16
# tile, several tiles along each GEMM dimension, and reductions over enough pixels that the
# weight gradient is split over blockIdx.z
CONV_EDGE_CASES = [
    (2, 70, 13, 11, 67, (3, 3), (1, 1), (1, 1)),   # M = 67, N = 286, reduction 630: partial tiles everywhere
    (1, 1, 64, 64, 64, (3, 3), (1, 1), (0, 0)),    # the U-Net's first layer, 3844 pixels: split-K
    (3, 5, 33, 35, 9, (3, 3), (1, 1), (0, 0)),     # 3 images in the pixel index, split-K
    (2, 17, 15, 14, 130, (5, 3), (2, 3), (2, 1)),  # asymmetric kernel, stride, padding; 3 tiles of K
]

# (N, Cin, H, W, Cout, (kh, kw), stride, padding, output_padding)
CONV_T_EDGE_CASES = [
    (2, 70, 9, 7, 33, (2, 2), (2, 2), (0, 0), (0, 0)),    # up-convolution: Cout*kh*kw = 132 over 3 tiles
    (2, 5, 40, 40, 3, (2, 2), (2, 2), (0, 0), (0, 0)),    # 3200 input pixels: split-K in backward_weight
    (1, 130, 5, 6, 70, (2, 2), (2, 2), (0, 0), (0, 0)),   # Cin = 130 over 3 tiles
    (2, 66, 6, 5, 20, (3, 3), (2, 2), (1, 1), (1, 1)),    # general case: conv2d's kernels in adjoint roles
    (1, 4, 9, 8, 67, (2, 2), (2, 2), (0, 0), (1, 1)),     # kernel == stride but output_padding
]


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("case", CONV_EDGE_CASES, ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_conv2d_tile_edges(dtype, case, version, rng):
    N, C, H, W, K, ks, stride, padding = case
    x, w, b = (rng.standard_normal(s).astype(dtype) for s in ((N, C, H, W), (K, C, *ks), (K,)))
    y_ref = ref.conv2d_forward(x, w, b, stride, padding)
    gy = rng.standard_normal(y_ref.shape).astype(dtype)
    dx, dw, db, dgy = (cupy.asarray(a) for a in (x, w, b, gy))
    check(cuda.conv2d_forward(dx, dw, db, stride, padding, version=version), y_ref, "conv2d_forward")
    check(cuda.conv2d_backward_input(dgy, dw, x.shape, stride, padding, version=version),
          ref.conv2d_backward_input(gy, w, x.shape, stride, padding), "conv2d_backward_input")
    check(cuda.conv2d_backward_weight(dx, dgy, w.shape, stride, padding, version=version),
          ref.conv2d_backward_weight(x, gy, w.shape, stride, padding), "conv2d_backward_weight")


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("case", CONV_T_EDGE_CASES, ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_conv_transpose2d_tile_edges(dtype, case, version, rng):
    N, Cin, H, W, Cout, ks, stride, padding, output_padding = case
    x, w, b = (rng.standard_normal(s).astype(dtype) for s in ((N, Cin, H, W), (Cin, Cout, *ks), (Cout,)))
    y_ref = ref.conv_transpose2d_forward(x, w, b, stride, padding, output_padding)
    gy = rng.standard_normal(y_ref.shape).astype(dtype)
    dx, dw, db, dgy = (cupy.asarray(a) for a in (x, w, b, gy))
    check(cuda.conv_transpose2d_forward(dx, dw, db, stride, padding, output_padding, version=version), y_ref,
          "conv_transpose2d_forward")
    check(cuda.conv_transpose2d_backward_input(dgy, dw, stride, padding, version=version),
          ref.conv_transpose2d_backward_input(gy, w, stride, padding), "conv_transpose2d_backward_input")
    check(cuda.conv_transpose2d_backward_weight(dx, dgy, w.shape, stride, padding, version=version),
          ref.conv_transpose2d_backward_weight(x, gy, w.shape, stride, padding), "conv_transpose2d_backward_weight")


# ------------------------------------------------------------ a U-Net-shaped training step

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
    grads = {k: backend.to_numpy(p.grad) for k, p in P.items()}
    for p in P.values():
        xp, k = backend.array_module(p.data), backend.kernels_for(p.data)
        k.sgd_update(p.data, p.grad, xp.empty_like(p.data), LR, MOMENTUM, 0.0, WEIGHT_DECAY, True, True)
    return loss.item(), grads, {k: p.numpy() for k, p in P.items()}


@pytest.mark.parametrize("version", [1, 2])
def test_unet_training_step_matches_reference_on_cpu_and_gpu(version, rng, monkeypatch):
    """float64: the loss, every gradient and every updated parameter agree with the reference
    to 1e-9 on both devices (and so with each other), with the convolutions of `version`."""
    for op in CONV_OPS:
        monkeypatch.setitem(cuda.DEFAULT_VERSION, op, version)
    params, x, target, weight = _problem(rng)
    loss_ref, grads_ref, updated_ref = _reference_step(params, x, target, weight)
    results = {device: _minunet_step(params, x, target, weight, device, np.float64) for device in ("cpu", "cuda")}
    for device, (loss, grads, updated) in results.items():
        np.testing.assert_allclose(loss, loss_ref, rtol=1e-9, err_msg=f"{device}: loss")
        for k in params:
            scale = np.abs(grads_ref[k]).max()
            np.testing.assert_allclose(grads[k], grads_ref[k], rtol=1e-9, atol=1e-9 * scale, err_msg=f"{device}: grad {k}")
            np.testing.assert_allclose(updated[k], updated_ref[k], rtol=1e-9, atol=1e-12, err_msg=f"{device}: updated {k}")


def test_unet_training_step_float32_loss(rng):
    """float32 on the GPU: the loss of the same step within float32 rounding of the reference."""
    params, x, target, weight = _problem(rng)
    loss_ref, _, _ = _reference_step(params, x, target, weight)
    loss, _, _ = _minunet_step(params, x, target, weight, "cuda", np.float32)
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-4)
