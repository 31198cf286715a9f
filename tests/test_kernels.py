"""Every kernel of the contract (minunet/contract.py), every version, on every usable device,
in float32 and float64, checked against the NumPy float64 oracle in tests/reference.py.

Each test is named `test_<kernel>` after the kernel it checks. A kernel that takes
`version=` is run once per entry of its module's VERSIONS and once with version=None (the
default); `pytest_generate_tests` below builds those (device, version) pairs from
minunet.cpu.VERSIONS and, where a GPU is usable, minunet.cuda.VERSIONS. The other tests take
the `device` fixture from conftest.py.

Inputs are drawn in the tested dtype and the reference runs in float64 on those very values,
so the only difference left is the kernel's own rounding. Tolerances: float64 results must
agree to rtol 1e-10; float32 ones to rtol 1e-4, with an absolute slack of 1e-4 times the
largest |reference| value because sums of many float32 terms of both signs cancel. The CUDA
convolutions' TF32 version (cuda.TF32_VERSION) rounds float32 inputs to 10 mantissa bits, so
its float32 results must agree to TF32's tolerance instead, rtol 2e-3 (each product carries up
to 2 x 2^-11 of relative error); tests/test_cuda_backend.py bounds that error element by element.

Shapes come from fixed lists (the U-Net's own cases, odd sizes, stride larger than the kernel,
overlapping pooling windows, padding, batch 1, one channel), a few drawn from a seeded
generator, and, for the convolution's versions, hypothesis strategies (tests/strategies.py;
`test_<kernel>_drawn`): a failure names its shape.
"""
import numpy as np
import pytest
from hypothesis import given

import reference as ref
import strategies
from minunet import backend, contract

DTYPES = [pytest.param(np.float32, id="f32"), pytest.param(np.float64, id="f64")]
RTOL = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-10}
TF32_RTOL = 2e-3


# ---------------------------------------------------------------------------------- harness

def pytest_generate_tests(metafunc):
    """Parametrize (device, version) for tests of kernels that take `version=`."""
    if "version" not in metafunc.fixturenames:
        return
    name = metafunc.function.__name__.removeprefix("test_").removesuffix("_drawn")
    assert name in contract.CONTRACT, f"{metafunc.function.__name__} is not named after a kernel"
    from minunet import cpu
    params = [pytest.param("cpu", v, id=f"cpu-v{v}") for v in (*cpu.VERSIONS[name], None)]
    if backend.cuda_available():
        from minunet import cuda
        params += [pytest.param("cuda", v, id=f"cuda-v{v}", marks=pytest.mark.gpu) for v in (*cuda.VERSIONS[name], None)]
    else:
        params.append(pytest.param("cuda", None, id="cuda", marks=[
            pytest.mark.gpu, pytest.mark.skip(reason=f"no usable GPU: {backend.cuda_status()[1]}")]))
    metafunc.parametrize("device, version", params)


def make(rng, dtype, *shapes):
    """Standard-normal arrays of `dtype`, one per shape."""
    return [rng.standard_normal(s).astype(dtype) for s in shapes]


def run(device, kernel, *args, **kwargs):
    """Call kernel `kernel` of `device`'s kernel module on copies of the NumPy arguments moved
    to `device`, check that it left its inputs untouched, and return its outputs as NumPy."""
    to_dev = lambda a: backend.to_device(a, device) if isinstance(a, np.ndarray) else a  # noqa: E731
    dev_args = [[to_dev(a) for a in arg] if isinstance(arg, list) else to_dev(arg) for arg in args]
    dev_kwargs = {name: to_dev(a) for name, a in kwargs.items()}
    k = backend.kernels_for(backend.to_device(np.zeros(1), device))
    out = getattr(k, kernel)(*dev_args, **dev_kwargs)
    for arg, dev_arg in zip([*args, *kwargs.values()], [*dev_args, *dev_kwargs.values()]):
        for a, d in zip(arg, dev_arg) if isinstance(arg, list) else [(arg, dev_arg)]:
            if isinstance(a, np.ndarray):
                np.testing.assert_array_equal(backend.to_numpy(d), a, err_msg=f"{kernel} modified an input")
    if isinstance(out, (tuple, list)):
        return type(out)(backend.to_numpy(o) for o in out)
    return backend.to_numpy(out)


def check(actual, expected, dtype, what, rtol=None):
    """`actual` has `dtype`, the reference's shape, and its values within the dtype's tolerance
    (or `rtol`)."""
    dtype = np.dtype(dtype)
    assert isinstance(actual, np.ndarray), f"{what}: got {type(actual).__name__}, expected an array"
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype}, expected {dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape}, expected {expected.shape}"
    scale = float(np.abs(expected).max(initial=0.0)) or 1.0
    rtol = RTOL[dtype] if rtol is None else rtol
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale, err_msg=what)


def conv_rtol(device, kernel, version, dtype):
    """The tolerance of a convolution kernel's result: TF32's where the CUDA version that runs
    (version, or DEFAULT_VERSION for None) is the TF32 one and the arrays are float32."""
    if device == "cuda" and np.dtype(dtype) == np.float32:
        from minunet import cuda
        if (cuda.DEFAULT_VERSION[kernel] if version is None else version) == cuda.TF32_VERSION:
            return TF32_RTOL
    return RTOL[np.dtype(dtype)]


def case_id(case):
    return "-".join("x".join(map(str, v)) if isinstance(v, tuple) else str(v) for v in case)


# ----------------------------------------------------------------------------- convolution

def _random_conv_cases(seed, n):
    """(N, C, H, W, K, (kh, kw), stride, padding) drawn at random; padding <= kernel // 2."""
    g = np.random.default_rng(seed)
    cases = []
    for _ in range(n):
        kh, kw = (int(v) for v in g.integers(1, 5, size=2))
        sh, sw = (int(v) for v in g.integers(1, 4, size=2))
        ph, pw = int(g.integers(0, kh // 2 + 1)), int(g.integers(0, kw // 2 + 1))
        H, W = int(g.integers(max(kh - 2 * ph, 1), 12)), int(g.integers(max(kw - 2 * pw, 1), 12))
        N, C, K = (int(v) for v in g.integers(1, 5, size=3))
        cases.append((N, C, H, W, K, (kh, kw), (sh, sw), (ph, pw)))
    return cases


# (N, C, H, W, K, (kh, kw), stride, padding)
CONV_CASES = [
    (2, 3, 10, 9, 4, (3, 3), (1, 1), (0, 0)),    # U-Net 3x3, no padding (the paper's valid convs)
    (2, 4, 8, 8, 5, (3, 3), (1, 1), (1, 1)),     # U-Net 3x3, same padding
    (1, 32, 12, 12, 8, (3, 3), (1, 1), (1, 1)),  # many channels: long float32 sums
    (1, 6, 5, 7, 3, (1, 1), (1, 1), (0, 0)),     # the final 1x1 classifier
    (1, 2, 9, 7, 3, (3, 3), (2, 2), (1, 1)),     # strided
    (2, 1, 11, 10, 2, (2, 2), (3, 3), (0, 0)),   # stride > kernel: some inputs are never read
    (1, 3, 7, 12, 2, (3, 5), (2, 1), (1, 2)),    # asymmetric kernel, stride and padding
    (1, 1, 5, 5, 1, (3, 3), (1, 1), (0, 0)),     # batch 1, one channel
    (1, 2, 4, 4, 3, (2, 2), (1, 1), (2, 2)),     # padding >= kernel: border outputs see only padding
    (1, 2, 3, 3, 2, (3, 3), (1, 1), (0, 0)),     # a 1x1 output
    (1, 2, 40, 33, 6, (3, 3), (1, 1), (1, 1)),   # a plane larger than one task of v3's forward
    (1, 2, 9, 70, 3, (3, 3), (1, 1), (1, 1)),    # Winograd (v4): tile rows longer than a vector of tiles
    (2, 64, 24, 19, 16, (3, 3), (1, 1), (1, 1)), # v4: several blocks of tile rows, channel groups
    (2, 20, 5, 37, 9, (1, 1), (1, 1), (0, 0)),   # v4's 1x1 product: rows and pixels off its blocks
] + _random_conv_cases(seed=2024, n=5)


def _conv_inputs(rng, dtype, case):
    N, C, H, W, K, ks, stride, padding = case
    x, w, b = make(rng, dtype, (N, C, H, W), (K, C) + ks, (K,))
    return x, w, b, stride, padding


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("case", CONV_CASES, ids=case_id)
@pytest.mark.parametrize("dtype", DTYPES)
def test_conv2d_forward(device, version, dtype, case, bias, rng):
    x, w, b, stride, padding = _conv_inputs(rng, dtype, case)
    b = b if bias else None
    y = run(device, "conv2d_forward", x, w, b, stride, padding, version=version)
    check(y, ref.conv2d_forward(x, w, b, stride, padding), dtype, "conv2d_forward y",
          conv_rtol(device, "conv2d_forward", version, dtype))


@pytest.mark.parametrize("case", CONV_CASES, ids=case_id)
@pytest.mark.parametrize("dtype", DTYPES)
def test_conv2d_backward_input(device, version, dtype, case, rng):
    x, w, _, stride, padding = _conv_inputs(rng, dtype, case)
    (gy,) = make(rng, dtype, ref.conv2d_forward(x, w, None, stride, padding).shape)
    gx = run(device, "conv2d_backward_input", gy, w, x.shape, stride, padding, version=version)
    check(gx, ref.conv2d_backward_input(gy, w, x.shape, stride, padding), dtype, "conv2d_backward_input gx",
          conv_rtol(device, "conv2d_backward_input", version, dtype))


@pytest.mark.parametrize("case", CONV_CASES, ids=case_id)
@pytest.mark.parametrize("dtype", DTYPES)
def test_conv2d_backward_weight(device, version, dtype, case, rng):
    x, w, _, stride, padding = _conv_inputs(rng, dtype, case)
    (gy,) = make(rng, dtype, ref.conv2d_forward(x, w, None, stride, padding).shape)
    gw = run(device, "conv2d_backward_weight", x, gy, w.shape, stride, padding, version=version)
    check(gw, ref.conv2d_backward_weight(x, gy, w.shape, stride, padding), dtype, "conv2d_backward_weight gw",
          conv_rtol(device, "conv2d_backward_weight", version, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_conv2d_fused_relu_and_bias(device, dtype, rng):
    """The fused forms, every version: conv2d_forward(relu=True) = relu(conv2d_forward);
    conv2d_backward_input(relu_y=y) and conv2d_backward_weight(relu_y=y, bias=True) = the
    gradients of gy * (y > 0), with gb its sum over n, h, w (what bias_backward gives)."""
    k = backend.kernels_for(backend.to_device(np.zeros(1), device))
    for case in [(2, 4, 8, 8, 5, (3, 3), (1, 1), (1, 1)), (1, 2, 9, 7, 3, (3, 3), (2, 2), (1, 1)),
                 (2, 70, 13, 11, 67, (3, 3), (1, 1), (1, 1)), (2, 20, 5, 37, 9, (1, 1), (1, 1), (0, 0)),
                 (2, 1, 9, 21, 8, (3, 3), (1, 1), (1, 1))]:   # one input channel: v3 masks gy as it reads it
        for version in k.VERSIONS["conv2d_forward"]:
            _check_fused(device, version, dtype, case, rng)


def _check_fused(device, version, dtype, case, rng, what="", parts=None):
    """conv2d_forward(relu=True), conv2d_backward_input(relu_y=) and conv2d_backward_weight(relu_y=,
    bias=True) of one case and version against the oracle's relu, relu_backward and bias_backward.
    With `parts` (channel counts), x goes in as the list of its channel slices (a list input: their
    concatenation) and the input gradient must come back as the list of theirs."""
    x, w, b, stride, padding = _conv_inputs(rng, dtype, case)
    xs = x if parts is None else [np.ascontiguousarray(a) for a in np.split(x, np.cumsum(parts)[:-1], axis=1)]
    x_shape = x.shape if parts is None else [a.shape for a in xs]
    y_ref = ref.relu_forward(ref.conv2d_forward(x, w, b, stride, padding))
    (gy,) = make(rng, dtype, y_ref.shape)
    gz = ref.relu_backward(gy, y_ref)
    what = f"{device} v{version} {what} {case_id(case)}" + ("" if parts is None else f" parts {parts}")
    rtol = {kernel: conv_rtol(device, kernel, version, dtype)
            for kernel in ("conv2d_forward", "conv2d_backward_input", "conv2d_backward_weight")}
    y = run(device, "conv2d_forward", xs, w, b, stride, padding, version=version, relu=True)
    check(y, y_ref, dtype, f"conv2d_forward relu {what}", rtol["conv2d_forward"])
    y_dev = y_ref.astype(dtype)  # the reference's mask: a kernel's own y may differ in sign near 0
    gx = run(device, "conv2d_backward_input", gy, w, x_shape, stride, padding, version=version, relu_y=y_dev)
    gx_ref = ref.conv2d_backward_input(gz, w, x.shape, stride, padding)
    if parts is None:
        gx, gx_ref = [gx], [gx_ref]
    else:
        assert isinstance(gx, list) and len(gx) == len(parts), f"conv2d_backward_input of a list {what}: {type(gx)}"
        gx_ref = np.split(gx_ref, np.cumsum(parts)[:-1], axis=1)
    for i, (g, g_ref) in enumerate(zip(gx, gx_ref)):
        check(g, g_ref, dtype, f"conv2d_backward_input relu_y {what} gx[{i}]", rtol["conv2d_backward_input"])
    gw, gb = run(device, "conv2d_backward_weight", xs, gy, w.shape, stride, padding, version=version,
                 relu_y=y_dev, bias=True)
    check(gw, ref.conv2d_backward_weight(x, gz, w.shape, stride, padding), dtype,
          f"conv2d_backward_weight relu_y {what}", rtol["conv2d_backward_weight"])
    check(gb, ref.bias_backward(gz), dtype, f"conv2d_backward_weight bias {what}", rtol["conv2d_backward_weight"])


@pytest.mark.parametrize("dtype", DTYPES)
def test_conv2d_list_input(device, dtype, rng):
    """conv2d's three kernels take a list of inputs for their concatenation along channels (the
    U-Net's skip and up-convolved features; v4 on the CPU reads them in place, the others join
    them first): every version, 2 and 3 parts, the U-Net's 3x3 convolution and others."""
    k = backend.kernels_for(backend.to_device(np.zeros(1), device))
    for case, parts in [((2, 32, 12, 12, 16, (3, 3), (1, 1), (1, 1)), [16, 16]),
                        ((2, 7, 10, 9, 4, (3, 3), (1, 1), (0, 0)), [3, 4]),
                        ((1, 24, 9, 70, 9, (3, 3), (1, 1), (1, 1)), [8, 10, 6]),
                        ((1, 5, 9, 7, 3, (3, 3), (2, 2), (1, 1)), [1, 4]),
                        ((2, 6, 5, 7, 3, (1, 1), (1, 1), (0, 0)), [2, 4])]:
        for version in k.VERSIONS["conv2d_forward"]:
            _check_fused(device, version, dtype, case, rng, parts=parts)


def test_conv2d_list_input_errors():
    """A list input whose arrays disagree in N, H or W is refused, naming them."""
    k = backend.kernels_for(np.zeros(1))
    x1, x2, w = np.zeros((2, 3, 8, 8)), np.zeros((2, 4, 8, 9)), np.zeros((5, 7, 3, 3))
    with pytest.raises(ValueError, match=r"conv2d_forward: x\[1\] has shape \(2, 4, 8, 9\)"):
        k.conv2d_forward([x1, x2], w, None, 1, 1)
    with pytest.raises(ValueError, match=r"conv2d_backward_input: x_shape\[1\] has shape \(1, 4, 8, 8\)"):
        k.conv2d_backward_input(np.zeros((2, 5, 8, 8)), w, [(2, 3, 8, 8), (1, 4, 8, 8)], 1, 1)
    with pytest.raises(ValueError, match="conv2d_forward: x has 6 channels but w"):
        k.conv2d_forward([x1, x1], w, None, 1, 1)


@pytest.mark.parametrize("dtype", DTYPES)
@strategies.SETTINGS
@given(case=strategies.conv2d_cases())
def test_conv2d_forward_drawn(device, version, dtype, case):
    """Each version's three passes (forward and both backward) on drawn shapes (tests/strategies.py): odd sizes, stride above
    the kernel, padding up to the kernel, batch 1, one channel."""
    rng = np.random.default_rng(5)
    x, w, b, stride, padding = _conv_inputs(rng, dtype, case)
    (gy,) = make(rng, dtype, ref.conv2d_forward(x, w, None, stride, padding).shape)
    check(run(device, "conv2d_forward", x, w, b, stride, padding, version=version),
          ref.conv2d_forward(x, w, b, stride, padding), dtype, f"conv2d_forward y {case}",
          conv_rtol(device, "conv2d_forward", version, dtype))
    check(run(device, "conv2d_backward_input", gy, w, x.shape, stride, padding, version=version),
          ref.conv2d_backward_input(gy, w, x.shape, stride, padding), dtype, f"conv2d_backward_input gx {case}",
          conv_rtol(device, "conv2d_backward_input", version, dtype))
    check(run(device, "conv2d_backward_weight", x, gy, w.shape, stride, padding, version=version),
          ref.conv2d_backward_weight(x, gy, w.shape, stride, padding), dtype, f"conv2d_backward_weight gw {case}",
          conv_rtol(device, "conv2d_backward_weight", version, dtype))


@pytest.mark.parametrize("split", ["tiles", "channels", "small"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_winograd_work_splits(split, dtype, monkeypatch, rng):
    """v4 shares a convolution between threads by blocks of tiles (large planes) or by channels
    (small planes, many channels), and on the smallest planes runs its forward and input gradient
    with the output channels in the vectors (conv2d_winograd_small.py): each way against the
    oracle, with blocks small enough that there are several, and channel counts off the
    micro-kernels' multiples; plain and fused (relu=, relu_y=, bias=)."""
    from minunet.cpu import conv2d_winograd, conv2d_winograd_small, conv2d_winograd_weight
    monkeypatch.setattr(conv2d_winograd, "_BY_CHANNELS_BYTES", 0 if split == "tiles" else 1 << 40)
    monkeypatch.setattr(conv2d_winograd, "_BY_CHANNELS_TILES", 0 if split == "tiles" else 1 << 20)
    monkeypatch.setattr(conv2d_winograd, "_BLOCK_BYTES", 4096)
    monkeypatch.setattr(conv2d_winograd_small, "suits", lambda N, c_in, c_out, Ho, Wo: split == "small")
    if split == "tiles":    # the weight gradient too, however few the tiles
        monkeypatch.setattr(conv2d_winograd_weight, "_FEW_TILES", 0)
    for case in [(2, 16, 21, 38, 24, (3, 3), (1, 1), (1, 1)), (3, 9, 13, 10, 12, (3, 3), (1, 1), (0, 0)),
                 (1, 16, 26, 50, 17, (3, 3), (1, 1), (1, 1)),    # 4 blocks of 2, 2, 2, 1 tile rows
                 (2, 5, 9, 10, 17, (3, 3), (1, 1), (1, 1)),      # one vector of input channels, 16 + 1 outputs
                 (2, 32, 9, 10, 8, (3, 3), (1, 1), (1, 1))]:     # input gradients split at a whole vector
        x, w, b, stride, padding = _conv_inputs(rng, dtype, case)
        what = f"{split} {case_id(case)}"
        y = ref.conv2d_forward(x, w, b, stride, padding)
        (gy,) = make(rng, dtype, y.shape)
        check(run("cpu", "conv2d_forward", x, w, b, stride, padding, version=4), y, dtype, f"y {what}")
        check(run("cpu", "conv2d_backward_input", gy, w, x.shape, stride, padding, version=4),
              ref.conv2d_backward_input(gy, w, x.shape, stride, padding), dtype, f"gx {what}")
        check(run("cpu", "conv2d_backward_weight", x, gy, w.shape, stride, padding, version=4),
              ref.conv2d_backward_weight(x, gy, w.shape, stride, padding), dtype, f"gw {what}")
        _check_fused("cpu", 4, dtype, case, rng, split)
        _check_fused("cpu", 4, dtype, case, rng, split, parts=[case[1] // 2, case[1] - case[1] // 2])


@pytest.mark.parametrize("stride, khw, padding, c_in, c_out, plane, expected", [
    ((1, 1), (3, 3), (1, 1), 16, 16, 128 * 128, 4),    # the U-Net's 3x3 layers: Winograd ...
    ((1, 1), (3, 3), (1, 1), 256, 256, 8 * 8, 4),      # ... the 8x8 bottom included
    ((1, 1), (3, 3), (0, 0), 64, 128, 30 * 30, 4),     # ... and 'valid' ones
    ((1, 1), (3, 3), (1, 1), 1, 16, 128 * 128, 3),     # the first layer, from one channel: direct
    ((1, 1), (3, 3), (1, 1), 16, 3, 128 * 128, 3),     # few output channels: direct
    ((1, 1), (5, 5), (2, 2), 64, 64, 32 * 32, 3),      # not 3x3: direct
    ((1, 1), (5, 5), (2, 2), 128, 128, 8 * 8, 2),      # ... but GEMM on a small plane, many channels
    ((1, 1), (3, 1), (1, 0), 128, 128, 15 * 15, 2),    # just under 16x16, many channels
    ((2, 2), (3, 3), (1, 1), 64, 64, 32 * 32, 2),      # strided: GEMM
    ((1, 1), (1, 1), (0, 0), 64, 2, 128 * 128, 4),     # 1x1: one product per image, on numba's threads
    ((1, 1), (1, 1), (1, 1), 64, 2, 130 * 130, 2),     # 1x1 with padding: im2col + GEMM
])
def test_cpu_choose_version(stride, khw, padding, c_in, c_out, plane, expected):
    from minunet.cpu import conv2d
    assert conv2d.choose_version(stride, khw, padding, c_in, c_out, plane) == expected


@pytest.mark.parametrize("op, args, expected", [
    ("conv2d_forward", lambda x, w, gy: (x, w, None, (1, 1), (1, 1)), ((1, 1), (3, 3), (1, 1), 2, 5, 10 * 12)),
    ("conv2d_backward_input", lambda x, w, gy: (gy, w, x.shape, (1, 1), (1, 1)), ((1, 1), (3, 3), (1, 1), 5, 2, 10 * 12)),
    ("conv2d_backward_weight", lambda x, w, gy: (x, gy, w.shape, (1, 1), (1, 1)), ((1, 1), (3, 3), (1, 1), 2, 5, 10 * 12)),
])
def test_cpu_version_none_asks_choose_version(op, args, expected, monkeypatch, rng):
    """version=None runs what choose_version says for the call's convolution: (stride, kernel,
    padding, input and output channels, output plane; for backward_input the convolution of gy
    into gx: K in, C out, x's plane)."""
    from minunet.cpu import conv2d
    asked = []
    monkeypatch.setattr(conv2d, "choose_version", lambda *a: asked.append(a) or 1)
    x, w, gy = make(rng, np.float64, (2, 2, 10, 12), (5, 2, 3, 3), (2, 5, 10, 12))
    out = run("cpu", op, *args(x, w, gy))
    assert asked == [expected]
    np.testing.assert_array_equal(out, run("cpu", op, *args(x, w, gy), version=1))  # what it returned, it ran


@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_backward(device, dtype, rng):
    for shape in [(2, 3, 5, 7), (1, 1, 1, 1), (3, 16, 4, 4)]:
        (gy,) = make(rng, dtype, shape)
        check(run(device, "bias_backward", gy), ref.bias_backward(gy), dtype, f"bias_backward gb {shape}")


# ------------------------------------------------------------------- transposed convolution
# The kernels are the transposed convolution with kernel == stride and no padding (the U-Net's
# up-convolution); every other one is conv2d's kernels in adjoint roles, which
# tests/test_ops.py checks through minunet.functional.

# (N, Cin, H, W, Cout, (kh, kw))
CONV_T_CASES = [
    (2, 4, 5, 6, 3, (2, 2)),    # U-Net up-convolution 2x2 stride 2
    (1, 16, 4, 4, 8, (2, 2)),   # ... with more channels
    (1, 2, 3, 4, 2, (3, 3)),    # 3x3 stride 3
    (1, 1, 3, 5, 1, (3, 2)),    # asymmetric, batch 1, one channel
    (3, 5, 1, 1, 7, (1, 1)),    # one pixel, a 1x1 kernel
    (2, 3, 7, 2, 4, (2, 3)),    # odd sizes
    (1, 9, 40, 30, 5, (2, 2)),  # several blocks of input rows in one image (cpu/gemm.py)
    (2, 17, 5, 7, 3, (2, 2)),   # whole and partial blocks of channels and pixels (cpu/gemm.py's transpose)
]


def _conv_t_inputs(rng, dtype, case):
    N, Cin, H, W, Cout, ks = case
    x, w, b = make(rng, dtype, (N, Cin, H, W), (Cin, Cout) + ks, (Cout,))
    (gy,) = make(rng, dtype, (N, Cout, H * ks[0], W * ks[1]))
    return x, w, b, gy, ks


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("case", CONV_T_CASES, ids=case_id)
@pytest.mark.parametrize("dtype", DTYPES)
def test_conv_transpose2d_forward(device, dtype, case, bias, rng):
    x, w, b, _, ks = _conv_t_inputs(rng, dtype, case)
    b = b if bias else None
    y = run(device, "conv_transpose2d_forward", x, w, b)
    check(y, ref.conv_transpose2d_forward(x, w, b, ks, 0, 0), dtype, "conv_transpose2d_forward y")


@pytest.mark.parametrize("case", CONV_T_CASES, ids=case_id)
@pytest.mark.parametrize("dtype", DTYPES)
def test_conv_transpose2d_backward_input(device, dtype, case, rng):
    x, w, _, gy, ks = _conv_t_inputs(rng, dtype, case)
    gx = run(device, "conv_transpose2d_backward_input", gy, w)
    check(gx, ref.conv_transpose2d_backward_input(gy, w, ks, 0), dtype, "conv_transpose2d_backward_input gx")
    assert gx.shape == x.shape


@pytest.mark.parametrize("case", CONV_T_CASES, ids=case_id)
@pytest.mark.parametrize("dtype", DTYPES)
def test_conv_transpose2d_backward_weight(device, dtype, case, rng):
    x, w, _, gy, ks = _conv_t_inputs(rng, dtype, case)
    gw = run(device, "conv_transpose2d_backward_weight", x, gy, w.shape)
    check(gw, ref.conv_transpose2d_backward_weight(x, gy, w.shape, ks, 0), dtype,
          "conv_transpose2d_backward_weight gw")


# ----------------------------------------------------------------------------- max pooling

# (N, C, H, W, kernel_size, stride, padding)
POOL_CASES = [
    (2, 3, 8, 6, (2, 2), (2, 2), (0, 0)),    # U-Net 2x2 stride 2
    (1, 2, 9, 7, (2, 2), (2, 2), (0, 0)),    # ... on odd sizes: the last row/column is dropped
    (1, 2, 7, 9, (3, 3), (2, 2), (1, 1)),    # overlapping windows with padding
    (2, 1, 5, 5, (3, 3), (1, 1), (1, 1)),    # heavily overlapping: one input wins many windows
    (1, 3, 8, 7, (3, 3), (2, 2), (0, 0)),    # overlapping, no padding
    (1, 2, 10, 7, (2, 2), (3, 3), (0, 0)),   # stride > kernel
    (1, 1, 7, 6, (3, 2), (2, 1), (1, 0)),    # asymmetric
    (1, 1, 1, 1, (1, 1), (1, 1), (0, 0)),    # a single pixel
]


def _distinct(rng, dtype, shape):
    """Distinct values (a shuffled range, exact in float32), so every window has one maximum."""
    n = int(np.prod(shape))
    return (rng.permutation(n) - n / 2.0).reshape(shape).astype(dtype)


@pytest.mark.parametrize("case", POOL_CASES, ids=case_id)
@pytest.mark.parametrize("dtype", DTYPES)
def test_max_pool2d_forward(device, dtype, case, rng):
    N, C, H, W, ks, stride, padding = case
    x = _distinct(rng, dtype, (N, C, H, W))
    y, argmax = run(device, "max_pool2d_forward", x, ks, stride, padding)
    y_ref, argmax_ref = ref.max_pool2d_forward(x, ks, stride, padding)
    check(y, y_ref, dtype, "max_pool2d_forward y")
    assert argmax.dtype == np.int64, f"max_pool2d_forward argmax: dtype {argmax.dtype}, expected int64"
    np.testing.assert_array_equal(argmax, argmax_ref, err_msg="max_pool2d_forward argmax")


@pytest.mark.parametrize("value", [0.0, -1.0])
@pytest.mark.parametrize("case", POOL_CASES, ids=case_id)
@pytest.mark.parametrize("dtype", DTYPES)
def test_max_pool2d_forward_ties(device, dtype, case, value):
    """A constant input ties every window: the first real element in row-major window order
    must win, and a padded place never (with value -1 a padding read as 0 would)."""
    N, C, H, W, ks, stride, padding = case
    x = np.full((N, C, H, W), value, dtype=dtype)
    y, argmax = run(device, "max_pool2d_forward", x, ks, stride, padding)
    y_ref, argmax_ref = ref.max_pool2d_forward(x, ks, stride, padding)
    check(y, y_ref, dtype, "max_pool2d_forward y")
    np.testing.assert_array_equal(argmax, argmax_ref, err_msg="max_pool2d_forward argmax on ties")


@pytest.mark.parametrize("case", POOL_CASES, ids=case_id)
@pytest.mark.parametrize("dtype", DTYPES)
def test_max_pool2d_forward_nan(device, dtype, case, rng):
    """A NaN wins its windows, as in PyTorch: y is NaN and argmax points at the window's first
    NaN, wherever in the window it lies (the oracle's strict > would let it lose)."""
    N, C, H, W, ks, stride, padding = case
    x = _distinct(rng, dtype, (N, C, H, W))
    x.reshape(N * C, H * W)[:, rng.permutation(H * W)[:max(1, H * W // 5)]] = np.nan
    y, argmax = run(device, "max_pool2d_forward", x, ks, stride, padding)
    has_nan = ~np.isfinite(ref.max_pool2d_forward(np.where(np.isnan(x), np.inf, x), ks, stride, padding)[0])
    assert has_nan.any(), "the case needs a window with a NaN"
    np.testing.assert_array_equal(np.isnan(y), has_nan, err_msg="max_pool2d_forward: NaN windows")
    first = ref.max_pool2d_forward(np.where(np.isnan(x), 1.0, 0.0), ks, stride, padding)[1]
    np.testing.assert_array_equal(argmax[has_nan], first[has_nan], err_msg="max_pool2d_forward: argmax of a NaN window")


@pytest.mark.parametrize("case", POOL_CASES, ids=case_id)
@pytest.mark.parametrize("dtype", DTYPES)
def test_max_pool2d_backward(device, dtype, case, rng):
    N, C, H, W, ks, stride, padding = case
    _, argmax = ref.max_pool2d_forward(_distinct(rng, np.float64, (N, C, H, W)), ks, stride, padding)
    (gy,) = make(rng, dtype, argmax.shape)
    gx = run(device, "max_pool2d_backward", gy, argmax, (N, C, H, W))
    check(gx, ref.max_pool2d_backward(gy, argmax, (N, C, H, W)), dtype, "max_pool2d_backward gx")


# ----------------------------------------------------------- concatenation with cropping

# (input shapes, crop offsets (top, left), out_hw)
CONCAT_CASES = [
    ([(2, 3, 9, 8), (2, 2, 5, 4)], [(2, 2), (0, 0)], (5, 4)),                       # U-Net: centre crop of the skip
    ([(1, 4, 17, 17), (1, 4, 13, 13)], [(2, 2), (0, 0)], (13, 13)),
    ([(1, 1, 4, 4), (1, 2, 6, 5), (1, 1, 3, 3)], [(1, 0), (3, 2), (0, 0)], (3, 3)),  # uneven offsets, 3 inputs
    ([(2, 2, 3, 5)], [(0, 1)], (3, 3)),                                              # one input: a crop
    ([(1, 1, 2, 2), (1, 1, 2, 2)], [(0, 0), (0, 0)], (2, 2)),                        # no cropping
]


@pytest.mark.parametrize("case", CONCAT_CASES, ids=lambda c: case_id([s for shape in c[0] for s in shape]))
@pytest.mark.parametrize("dtype", DTYPES)
def test_concat_forward(device, dtype, case, rng):
    shapes, offsets, out_hw = case
    xs = make(rng, dtype, *shapes)
    y = run(device, "concat_forward", xs, offsets, out_hw)
    check(y, ref.concat_forward(xs, offsets, out_hw), dtype, "concat_forward y")


@pytest.mark.parametrize("case", CONCAT_CASES, ids=lambda c: case_id([s for shape in c[0] for s in shape]))
@pytest.mark.parametrize("dtype", DTYPES)
def test_concat_backward(device, dtype, case, rng):
    shapes, offsets, out_hw = case
    (gy,) = make(rng, dtype, (shapes[0][0], sum(s[1] for s in shapes)) + out_hw)
    gxs = run(device, "concat_backward", gy, shapes, offsets)
    expected = ref.concat_backward(gy, shapes, offsets)
    assert len(gxs) == len(expected), f"concat_backward: {len(gxs)} gradients for {len(expected)} inputs"
    for i, (gx, e) in enumerate(zip(gxs, expected)):
        check(gx, e, dtype, f"concat_backward gx[{i}]")


# ------------------------------------------------------------------------ activation, bias

@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_forward(device, dtype, rng):
    x, b = make(rng, dtype, (2, 3, 5, 7), (3,))
    check(run(device, "relu_forward", x, b), ref.relu_forward(x, b), dtype, "relu_forward y (with b)")
    check(run(device, "relu_forward", x), ref.relu_forward(x), dtype, "relu_forward y (b=None)")
    for shape in [(7,), (3, 5), (2, 1, 3, 2, 2)]:  # without a bias any shape goes
        (x,) = make(rng, dtype, shape)
        check(run(device, "relu_forward", x), ref.relu_forward(x), dtype, f"relu_forward y {shape}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_backward(device, dtype, rng):
    for shape in [(2, 3, 5, 7), (4, 5)]:
        x, gy = make(rng, dtype, shape, shape)
        y = np.maximum(x, 0)
        check(run(device, "relu_backward", gy, y), ref.relu_backward(gy, y), dtype, f"relu_backward gx {shape}")


# -------------------------------------------------------------- softmax cross-entropy

# (N, C, H, W, class weights?, ignore_index)
CE_CASES = [
    (2, 3, 4, 5, False, -100),
    (2, 3, 4, 5, True, -100),
    (1, 12, 6, 8, True, 11),   # CamVid-like: 11 classes + a void class that is ignored
    (1, 2, 7, 3, False, 0),    # ignore_index names a real class
    (3, 1, 2, 2, True, -1),    # one class
]


def _ce_inputs(rng, dtype, case):
    N, C, H, W, weighted, ignore_index = case
    (x,) = make(rng, dtype, (N, C, H, W))
    x *= 3  # confident and unconfident pixels
    target = rng.integers(0, C, size=(N, H, W)).astype(np.int64)
    target[rng.random((N, H, W)) < 0.25] = ignore_index
    weight = (rng.random(C) + 0.5).astype(dtype) if weighted else None
    return x, target, weight, ignore_index


@pytest.mark.parametrize("case", CE_CASES, ids=case_id)
@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_cross_entropy_forward(device, dtype, case, rng):
    x, target, weight, ignore_index = _ce_inputs(rng, dtype, case)
    loss, p = run(device, "softmax_cross_entropy_forward", x, target, weight, ignore_index)
    loss_ref, p_ref = ref.softmax_cross_entropy_forward(x, target, weight, ignore_index)
    check(loss, loss_ref, dtype, "softmax_cross_entropy_forward loss")
    check(p, p_ref, dtype, "softmax_cross_entropy_forward p")


@pytest.mark.parametrize("case", CE_CASES, ids=case_id)
@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_cross_entropy_backward(device, dtype, case, rng):
    x, target, weight, ignore_index = _ce_inputs(rng, dtype, case)
    p = ref.softmax(x, 1).astype(dtype)
    (gloss,) = make(rng, dtype, target.shape)
    gx = run(device, "softmax_cross_entropy_backward", p, target, weight, ignore_index, gloss)
    check(gx, ref.softmax_cross_entropy_backward(p, target, weight, ignore_index, gloss), dtype,
          "softmax_cross_entropy_backward gx")


# ---------------------------------------------------------------------- batch normalisation

BN_SHAPES = [(4, 3, 5, 6), (2, 1, 3, 3), (8, 5, 1, 1), (1, 2, 4, 7)]


def _bn_inputs(rng, dtype, shape):
    C = shape[1]
    (x,) = make(rng, dtype, shape)
    x = x * 2 + 3  # a mean away from 0, so a one-pass variance would lose digits
    gamma, beta = make(rng, dtype, (C,), (C,))
    running_mean = rng.standard_normal(C).astype(dtype)
    running_var = (rng.random(C) + 0.5).astype(dtype)
    return x, gamma, beta, running_mean, running_var


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", BN_SHAPES, ids=case_id)
@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_norm_forward(device, dtype, shape, training, rng):
    x, gamma, beta, running_mean, running_var = _bn_inputs(rng, dtype, shape)
    mean, var = (None, None) if training else (running_mean, running_var)  # as minunet.functional passes them
    y, mean_used, var_used = run(device, "batch_norm_forward", x, gamma, beta, mean, var, 1e-5, training)
    y_ref, mean_ref, var_ref = ref.batch_norm_forward(x, gamma, beta, running_mean, running_var, 1e-5, training)
    check(y, y_ref, dtype, "batch_norm_forward y")
    check(mean_used, mean_ref, dtype, "batch_norm_forward mean")
    check(var_used, var_ref, dtype, "batch_norm_forward var")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", BN_SHAPES, ids=case_id)
@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_norm_backward(device, dtype, shape, training, rng):
    x, gamma, beta, running_mean, running_var = _bn_inputs(rng, dtype, shape)
    _, mean, var = ref.batch_norm_forward(x, gamma, beta, running_mean, running_var, 1e-5, training)
    mean, var = mean.astype(dtype), var.astype(dtype)
    (gy,) = make(rng, dtype, shape)
    gx, ggamma, gbeta = run(device, "batch_norm_backward", gy, x, gamma, mean, var, 1e-5, training)
    gx_ref, ggamma_ref, gbeta_ref = ref.batch_norm_backward(gy, x, gamma, mean, var, 1e-5, training)
    check(gx, gx_ref, dtype, "batch_norm_backward gx")
    check(ggamma, ggamma_ref, dtype, "batch_norm_backward ggamma")
    check(gbeta, gbeta_ref, dtype, "batch_norm_backward gbeta")


# ------------------------------------------------------------------------------ optimizers

def _device_copy(a, device):
    return None if a is None else backend.to_device(a.copy(), device)


# Every tensor of a step in one call: one tensor of two chunks (kernels/optim.cu cuts tensors into
# chunks of 4096 elements), tiny ones, and each with its own learning rate, so a row read for the
# wrong tensor shows.
OPTIM_SHAPES = [(3, 7), (4096 + 37,), (5,), (2, 3, 3, 3)]
OPTIM_LRS = [0.1, 0.05, 0.2, 0.01]


@pytest.mark.parametrize("momentum, dampening, weight_decay, nesterov", [
    (0.0, 0.0, 0.0, False), (0.9, 0.0, 0.0, False), (0.9, 0.3, 1e-2, False), (0.8, 0.0, 1e-2, True),
])
@pytest.mark.parametrize("dtype", DTYPES)
def test_sgd_update(device, dtype, momentum, dampening, weight_decay, nesterov, rng):
    """Three steps of four tensors at once, in place; with momentum, tensor 2 has none (bufs[2] is
    None), and on the first step the buffers hold garbage the kernel must not read."""
    ps = make(rng, dtype, *OPTIM_SHAPES)
    bufs = [rng.standard_normal(s).astype(dtype) if momentum and i != 2 else None for i, s in enumerate(OPTIM_SHAPES)]
    p_dev, buf_dev = [_device_copy(p, device) for p in ps], [_device_copy(b, device) for b in bufs]
    k = backend.kernels_for(p_dev[0])
    p_ref, buf_ref = ps, [None] * len(ps)
    for step in range(3):
        gs = make(rng, dtype, *OPTIM_SHAPES)
        g_dev = [_device_copy(g, device) for g in gs]
        hyper = np.array([(lr, momentum, dampening, weight_decay, nesterov, step == 0) for lr in OPTIM_LRS])
        out = k.sgd_update(p_dev, g_dev, buf_dev, backend.to_device(hyper, device))
        assert out is None, "sgd_update updates in place and returns None"
        for i, (g, lr) in enumerate(zip(gs, OPTIM_LRS)):
            np.testing.assert_array_equal(backend.to_numpy(g_dev[i]), g, err_msg="sgd_update modified g")
            p_ref[i], buf_ref[i] = ref.sgd_update(p_ref[i], g, buf_ref[i], lr, momentum if bufs[i] is not None else 0,
                                                  dampening, weight_decay, nesterov, step == 0)
            check(backend.to_numpy(p_dev[i]), p_ref[i], dtype, f"sgd_update p[{i}] after step {step + 1}")
            if bufs[i] is not None:
                check(backend.to_numpy(buf_dev[i]), buf_ref[i], dtype, f"sgd_update buf[{i}] after step {step + 1}")


@pytest.mark.parametrize("decoupled", [False, True], ids=["adam", "adamw"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize("dtype", DTYPES)
def test_adam_update(device, dtype, weight_decay, decoupled, rng):
    """Three steps of four tensors at once; tensor i has taken i steps before (its own bias correction)."""
    beta1, beta2, eps = 0.9, 0.99, 1e-8
    ps = make(rng, dtype, *OPTIM_SHAPES)
    ms, vs = [np.zeros(s, dtype) for s in OPTIM_SHAPES], [np.zeros(s, dtype) for s in OPTIM_SHAPES]
    p_dev, m_dev, v_dev = ([_device_copy(a, device) for a in arrays] for arrays in (ps, ms, vs))
    k = backend.kernels_for(p_dev[0])
    p_ref, m_ref, v_ref = ps, ms, vs
    for step in range(1, 4):
        gs = make(rng, dtype, *OPTIM_SHAPES)
        g_dev = [_device_copy(g, device) for g in gs]
        steps = [step + i for i in range(len(ps))]
        hyper = np.array([(lr, beta1, beta2, eps, weight_decay, lr / (1 - beta1 ** t), np.sqrt(1 - beta2 ** t), decoupled)
                          for lr, t in zip(OPTIM_LRS, steps)])
        out = k.adam_update(p_dev, g_dev, m_dev, v_dev, backend.to_device(hyper, device))
        assert out is None, "adam_update updates in place and returns None"
        for i, (g, lr, t) in enumerate(zip(gs, OPTIM_LRS, steps)):
            np.testing.assert_array_equal(backend.to_numpy(g_dev[i]), g, err_msg="adam_update modified g")
            p_ref[i], m_ref[i], v_ref[i] = ref.adam_update(p_ref[i], g, m_ref[i], v_ref[i], lr, beta1, beta2, eps,
                                                           weight_decay, t, decoupled)
            check(backend.to_numpy(p_dev[i]), p_ref[i], dtype, f"adam_update p[{i}] after step {step}")
            check(backend.to_numpy(m_dev[i]), m_ref[i], dtype, f"adam_update m[{i}] after step {step}")
            check(backend.to_numpy(v_dev[i]), v_ref[i], dtype, f"adam_update v[{i}] after step {step}")
