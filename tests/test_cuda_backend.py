"""What is specific to the CUDA backend, beyond tests/test_kernels.py (which runs every kernel
and version on 'cuda' against tests/reference.py on small shapes):

- tensors on 'cuda': tensor(..., device='cuda'), .to('cuda') / .to('cpu') round trips, and
  gradients flowing back across a device move;
- every kernel family compiles through cupy.RawModule on this GPU and every float/double
  instantiation is found by its name expression;
- the launchers: version selection (the checks of their arguments are the contract's, tested
  on every device in tests/test_contract.py);
- the GEMM tiles at their edges, for every version: channel counts and pixel counts that are
  not multiples of the tile, several tiles per dimension, and weight gradients long enough to
  be split over blockIdx.z (split-K), against the reference; and every block tile that the
  register-tiled versions (3 and up) are compiled for (cuda.TILES), each forced in turn;
- the TF32 version: its error bound, that it rounds its inputs, the mma fragment layout, and
  the precision switch of `minunet train --precision tf32`;
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

CONV_VERSIONS = sorted(cuda.VERSIONS["conv2d_forward"]) if backend.cuda_available() else []
RTOL = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-10}
CONV_OPS = [name for name in contract.CONTRACT if "version" in contract.signature(name).parameters]


def check(actual, expected, what, version=None):
    """A cupy result against a float64 reference, within its dtype's tolerance (TF32's, 2e-3, for
    float32 results of the TF32 convolution version; see tests/test_kernels.py)."""
    assert isinstance(actual, cupy.ndarray), f"{what}: got {type(actual).__name__}, expected a cupy array"
    a = cupy.asnumpy(actual)
    assert a.shape == expected.shape, f"{what}: shape {a.shape}, expected {expected.shape}"
    rtol = 2e-3 if version == cuda.TF32_VERSION and a.dtype == np.float32 else RTOL[a.dtype]
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
            for dtype, tile in cuda._instantiations(name):
                fn = cuda._kernel(family, name, dtype, tile)
                assert fn is not None, f"{family}: {cuda._expression(name, dtype, tile)} not found"


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


def check_conv2d_passes(case, dtype, version, rng):
    """conv2d's forward and both backward passes at `version` against the oracle, on random
    x, w, b and gy of the shape case (N, C, H, W, K, kernel, stride, padding)."""
    N, C, H, W, K, ks, stride, padding = case
    x, w, b = (rng.standard_normal(s).astype(dtype) for s in ((N, C, H, W), (K, C, *ks), (K,)))
    y_ref = ref.conv2d_forward(x, w, b, stride, padding)
    gy = rng.standard_normal(y_ref.shape).astype(dtype)
    dx, dw, db, dgy = (cupy.asarray(a) for a in (x, w, b, gy))
    check(cuda.conv2d_forward(dx, dw, db, stride, padding, version=version), y_ref, "conv2d_forward", version)
    check(cuda.conv2d_backward_input(dgy, dw, x.shape, stride, padding, version=version),
          ref.conv2d_backward_input(gy, w, x.shape, stride, padding), "conv2d_backward_input", version)
    check(cuda.conv2d_backward_weight(dx, dgy, w.shape, stride, padding, version=version),
          ref.conv2d_backward_weight(x, gy, w.shape, stride, padding), "conv2d_backward_weight", version)


@pytest.mark.parametrize("version", CONV_VERSIONS)
@pytest.mark.parametrize("case", CONV_EDGE_CASES, ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_conv2d_tile_edges(dtype, case, version, rng):
    check_conv2d_passes(case, dtype, version, rng)


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


TILED = [(v, np.dtype(dtype), tile) for v in CONV_VERSIONS if v >= 3
         for dtype in (np.float32, np.float64) if backend.cuda_available() for tile in cuda.TILES[np.dtype(dtype)]]


@pytest.mark.parametrize("version, dtype, tile", TILED, ids=[f"v{v}-{d}-{t[0]}x{t[1]}" for v, d, t in TILED])
def test_every_block_tile(version, dtype, tile, rng, monkeypatch):
    """Each (BM, BN) the register-tiled kernels are compiled for, forced through cuda._gemm_tile,
    on shapes with partial tiles along every dimension (and 70 channels: partial reduction
    steps), a strided padded case and a weight gradient split over blockIdx.z."""
    monkeypatch.setattr(cuda, "_gemm_tile", lambda M, N, dt: tile)
    for case in [(2, 70, 13, 11, 67, (3, 3), (1, 1), (1, 1)),
                 (1, 6, 17, 16, 133, (3, 3), (2, 2), (1, 1)),
                 (3, 5, 33, 35, 9, (3, 3), (1, 1), (0, 0))]:
        check_conv2d_passes(case, dtype, version, rng)


def test_gemm_tile_choice(monkeypatch):
    """_gemm_tile: no 128-wide side over a matrix side of at most 64; the largest tile that still
    gives every SM a block; else the tile with the most blocks; float64 has one tile."""
    monkeypatch.setattr(cuda, "_sm_count", lambda device_id: 132)
    f32 = np.dtype(np.float32)
    assert cuda._gemm_tile(512, 16 * 64 * 64, f32) == (128, 128)   # plenty of blocks
    assert cuda._gemm_tile(64, 16 * 256 * 256, f32) == (64, 128)   # 64 output channels
    assert cuda._gemm_tile(512, 4 * 8 * 8, f32) == (128, 64)       # a small bottleneck: more blocks
    assert cuda._gemm_tile(40, 50, f32) in {(128, 64), (64, 128)}   # one block whatever: the least waste
    assert cuda._gemm_tile(1000, 1000, np.dtype(np.float64)) == cuda.TILES[np.dtype(np.float64)][0]


# ------------------------------------------------------------------------- TF32 tensor cores

def _tf32_case(rng, N=2, C=19, H=9, W=11, K=21):
    x, w = rng.standard_normal((N, C, H, W)).astype(np.float32), rng.standard_normal((K, C, 3, 3)).astype(np.float32)
    gy = rng.standard_normal(ref.conv2d_forward(x, w, None, (1, 1), (1, 1)).shape).astype(np.float32)
    return x, w, gy


def test_tf32_error_within_its_bound(rng):
    """Version TF32_VERSION in float32: every output element within TF32's error bound of the
    float64 reference, |got - exact| <= (2^-10 + R 2^-23) * sum |a||b| over its R terms (two
    inputs rounded to 10 mantissa bits, then R float32 additions), for all three passes."""
    x, w, gy = _tf32_case(rng)
    s, p, v = (1, 1), (1, 1), cuda.TF32_VERSION
    dx, dw, dgy = (cupy.asarray(a) for a in (x, w, gy))
    cases = [("forward", cuda.conv2d_forward(dx, dw, None, s, p, version=v), ref.conv2d_forward(x, w, None, s, p),
              ref.conv2d_forward(np.abs(x), np.abs(w), None, s, p), x.shape[1] * 9),
             ("backward_input", cuda.conv2d_backward_input(dgy, dw, x.shape, s, p, version=v),
              ref.conv2d_backward_input(gy, w, x.shape, s, p),
              ref.conv2d_backward_input(np.abs(gy), np.abs(w), x.shape, s, p), w.shape[0] * 9),
             ("backward_weight", cuda.conv2d_backward_weight(dx, dgy, w.shape, s, p, version=v),
              ref.conv2d_backward_weight(x, gy, w.shape, s, p),
              ref.conv2d_backward_weight(np.abs(x), np.abs(gy), w.shape, s, p),
              gy.shape[0] * gy.shape[2] * gy.shape[3])]
    for what, got, exact, abs_sum, terms in cases:
        err = np.abs(cupy.asnumpy(got) - exact)
        bound = (2.0 ** -10 + terms * 2.0 ** -23) * abs_sum
        worst = float((err / bound).max())
        assert worst <= 1.0, f"conv2d_{what} v{v}: an error {worst:.2f} times TF32's bound"


def test_tf32_rounds_its_inputs(rng):
    """The TF32 version really runs on TF32 inputs: 1 + 2^-12 rounds to 1 in TF32 (10 mantissa bits)
    but not in float32, so a convolution of such values with ones sums exact ones there only."""
    x = cupy.full((1, 8, 6, 6), 1 + 2.0 ** -12, np.float32)
    w = cupy.ones((4, 8, 3, 3), np.float32)
    y_tf32 = cupy.asnumpy(cuda.conv2d_forward(x, w, None, (1, 1), (0, 0), version=cuda.TF32_VERSION))
    y_fp32 = cupy.asnumpy(cuda.conv2d_forward(x, w, None, (1, 1), (0, 0), version=cuda.TF32_FALLBACK))
    np.testing.assert_array_equal(y_tf32, 72.0)
    assert (y_fp32 > 72.0).all()


def test_tf32_version_runs_the_fallback_in_float64(rng):
    """float64 has no TF32: the TF32 version runs TF32_FALLBACK's kernels, bit for bit."""
    x, w, _ = (cupy.asarray(a.astype(np.float64)) for a in _tf32_case(rng))
    tf32, fallback = (cupy.asnumpy(cuda.conv2d_forward(x, w, None, (1, 1), (1, 1), version=v))
                      for v in (cuda.TF32_VERSION, cuda.TF32_FALLBACK))
    np.testing.assert_array_equal(tf32, fallback)


MMA_KERNEL = r"""
// one warp: D (16 x 8) = A (16 x 8) B (8 x 8) + C through mma_tf32_16x8x8, every fragment
// filled as common.cuh documents the layout (g = lane / 4, q = lane % 4)
extern "C" __global__ void mma_once(const float* A, const float* B, const float* C, float* D) {
    const int lane = threadIdx.x, g = lane / 4, q = lane % 4;
    unsigned a[4] = {to_tf32(A[g * 8 + q]), to_tf32(A[(g + 8) * 8 + q]), to_tf32(A[g * 8 + q + 4]),
                     to_tf32(A[(g + 8) * 8 + q + 4])};
    unsigned b[2] = {to_tf32(B[q * 8 + g]), to_tf32(B[(q + 4) * 8 + g])};
    float d[4] = {C[g * 8 + 2 * q], C[g * 8 + 2 * q + 1], C[(g + 8) * 8 + 2 * q], C[(g + 8) * 8 + 2 * q + 1]};
    mma_tf32_16x8x8(d, a, b);
    D[g * 8 + 2 * q] = d[0];
    D[g * 8 + 2 * q + 1] = d[1];
    D[(g + 8) * 8 + 2 * q] = d[2];
    D[(g + 8) * 8 + 2 * q + 1] = d[3];
}
"""


def test_mma_fragment_layout_is_a_matrix_product(rng):
    """mma_tf32_16x8x8 with fragments in the layout common.cuh documents (the PTX manual's for
    m16n8k8) computes D = A B + C: on a GPU this checks the documented layout, on the emulator
    its model. Entries are small integers, exact in TF32, so the product is exact."""
    A, B, C = (rng.integers(-4, 5, size=s).astype(np.float32) for s in ((16, 8), (8, 8), (16, 8)))
    source = (cuda._kernel_dir() / "common.cuh").read_text() + MMA_KERNEL
    kernel = cupy.RawModule(code=source, options=cuda.OPTIONS, name_expressions=["mma_once"]).get_function("mma_once")
    D = cupy.empty((16, 8), np.float32)
    kernel((1,), (32,), (cupy.asarray(A), cupy.asarray(B), cupy.asarray(C), D))
    np.testing.assert_array_equal(cupy.asnumpy(D), A @ B + C)


def test_conv_precision_tf32_routes_version_none(rng):
    """backend.conv_precision('tf32') (minunet train --precision tf32): inside it version=None
    runs the TF32 version on float32 and the fallback on float64; outside, DEFAULT_VERSION again."""
    x, w, _ = _tf32_case(rng)
    default = dict(cuda.DEFAULT_VERSION)
    for dtype, expected in ((np.float32, cuda.TF32_VERSION), (np.float64, cuda.TF32_FALLBACK)):
        dx, dw = cupy.asarray(x.astype(dtype)), cupy.asarray(w.astype(dtype))
        with backend.conv_precision("tf32"):
            y = cupy.asnumpy(cuda.conv2d_forward(dx, dw, None, (1, 1), (1, 1)))
        y_expected = cupy.asnumpy(cuda.conv2d_forward(dx, dw, None, (1, 1), (1, 1), version=expected))
        np.testing.assert_array_equal(y, y_expected)
    assert cuda.DEFAULT_VERSION == default
