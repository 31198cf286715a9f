"""What is specific to the CUDA backend, beyond tests/test_kernels.py (which runs every kernel
and version on 'cuda' against tests/reference.py on small shapes):

- tensors on 'cuda': tensor(..., device='cuda'), .to('cuda') / .to('cpu') round trips, and
  gradients flowing back across a device move;
- every kernel family compiles through cupy.RawModule on this GPU and every float/double
  instantiation is found by its name expression;
- the launchers: version selection (the checks of their arguments are the contract's, tested
  on every device in tests/test_contract.py);
- the _v2 GEMM tiles at their edges: channel counts and pixel counts that are not multiples
  of the 64 x 64 x 16 tile, several tiles per dimension, and weight gradients long enough to
  be split over blockIdx.z (split-K), against the reference;
(The U-Net-shaped training step against tests/reference.py runs on every device in
tests/test_training_step.py.)

Every test here is marked `gpu` and skipped where no GPU is usable.
"""
import numpy as np
import pytest

import reference as ref
from minunet import backend, contract, functional as F, tensor

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not backend.cuda_available(), reason=f"no usable GPU: {backend.cuda_status()[1]}")]

if backend.cuda_available():
    import cupy

    from minunet import cuda

RTOL = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-10}
CONV_OPS = [name for name in contract.CONTRACT if "version" in contract.signature(name).parameters]


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
    assert backend.kernels_for(t.data).module is cuda


def test_gradient_flows_back_across_devices(rng):
    a = rng.standard_normal((3, 5))
    x = tensor(a, requires_grad=True)  # a leaf on the cpu
    y = x.to("cuda")
    (y * y).sum().backward()
    assert x.grad.device == "cpu", "the gradient of a cpu leaf must come back to the cpu"
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
    }[op]


@pytest.mark.parametrize("op", CONV_OPS)
def test_version_selection(op, rng):
    args = _conv_args(op, rng)
    fn = getattr(backend.kernels_for(args[0]), op)
    results = {v: cupy.asnumpy(fn(*args, version=v)) for v in cuda.VERSIONS[op]}
    np.testing.assert_allclose(cupy.asnumpy(fn(*args, version=None)), results[cuda.DEFAULT_VERSION[op]],
                               rtol=0, atol=0, err_msg=f"{op}: version=None must run DEFAULT_VERSION")
    for bad in (0, max(cuda.VERSIONS[op]) + 1, "2"):
        with pytest.raises(ValueError, match=f"{op}: unknown version"):
            fn(*args, version=bad)


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

# (N, Cin, H, W, Cout, (kh, kw), stride, padding, output_padding): the patchwise cases run the
# conv_transpose2d kernels, the others conv2d's in adjoint roles (through minunet.functional)
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


@pytest.mark.parametrize("case", CONV_T_EDGE_CASES, ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_conv_transpose2d_tile_edges(dtype, case, rng):
    N, Cin, H, W, Cout, ks, stride, padding, output_padding = case
    x, w, b = (rng.standard_normal(s).astype(dtype) for s in ((N, Cin, H, W), (Cin, Cout, *ks), (Cout,)))
    y_ref = ref.conv_transpose2d_forward(x, w, b, stride, padding, output_padding)
    gy = rng.standard_normal(y_ref.shape).astype(dtype)
    tx, tw, tb = (tensor(a, device="cuda", requires_grad=True) for a in (x, w, b))
    y = F.conv_transpose2d(tx, tw, tb, stride, padding, output_padding)
    y.backward(cupy.asarray(gy))
    check(y.data, y_ref, "conv_transpose2d y")
    check(tx.grad.data, ref.conv_transpose2d_backward_input(gy, w, stride, padding), "conv_transpose2d gx")
    check(tw.grad.data, ref.conv_transpose2d_backward_weight(x, gy, w.shape, stride, padding), "conv_transpose2d gw")
    check(tb.grad.data, ref.bias_backward(gy), "conv_transpose2d gb")
