"""GPU kernel benchmarks: minunet.cuda on U-Net-sized shapes, every convolution version, with
PyTorch's cuDNN kernels timed on the same data in the same run as a yardstick. Each bench first
checks its output at the timed shape against tests/reference.py (benchmarks/validate.py).

    PYTHONPATH=. python -m pytest benchmarks/bench_gpu.py --benchmark-only
    PYTHONPATH=. python -m pytest benchmarks/bench_gpu.py --benchmark-only -k "conv2d_forward and v2"
    python3 benchmarks/gpu_check.py        # tests, sanitizers, these benches, train step -> benchmarks/results/*.json

Skipped as a whole where no GPU is usable. Shapes come from benchmarks/flops.py (the same as
bench_cpu.py, so CPU and GPU figures compare); everything is float32.

Timing: each timed call launches the kernel(s) and then synchronizes the stream, so a round
is the kernel's wall time plus one launch and one synchronisation (a few microseconds).
Before pytest-benchmark starts its clock every bench runs its call three times, which
compiles the family with NVRTC (once per process) and warms the caches and the memory pool.
The naive _v1 convolutions take up to seconds on some shapes (backward_weight_v1 gives each
thread a serial sum over every output pixel), so they run a fixed two rounds.

Every bench records in `benchmark.extra_info`:
  kernel, version, shape   what was timed (the contract's kernel name)
  flops, min_bytes         convolutions: the useful FLOPs and the bytes the pass must move at
                           least (benchmarks/flops.py), whatever the version
  gflops, pct_peak_fp32    convolutions: useful FLOP/s / 1e9 and that as a percentage of the
                           device's FP32 peak (below); the TF32 version (cuda.TF32_VERSION)
                           records pct_peak_tf32, of the dense TF32 tensor-core peak, instead
  gbytes_per_s, pct_peak_bw  memory-bound kernels: the bytes they must read and write at least
                           once, per second / 1e9, and that as a percentage of the DRAM peak
  torch_ms, torch_ratio    where PyTorch with CUDA is installed: PyTorch's median time for the
                           same op on the same data (cuDNN for convolutions) and minunet's speed
                           relative to it (torch time / minunet time; 1.0 = as fast). Timed
                           once per op and shape (not per version), with cuDNN's TF32 off,
                           and once more with TF32 on for the TF32 version

The peaks come from the device attributes (`device_peaks`):
  FP32:  SMs x clock x FP32 lanes per SM x 2 (one fused multiply-add = 2 FLOPs per lane per
         clock). The lanes per SM depend on the architecture: 64 on sm_60, sm_70, sm_75 and
         sm_80 (A100), 128 on sm_61, sm_86, sm_89, sm_90 (H100) and later.
  TF32:  SMs x clock x dense TF32 FLOPs per SM per clock of the tensor cores: 1024 on sm_80,
         2048 on sm_90 (H100/H200: ~495 TFLOP/s); None for other architectures. minunet's
         mma.sync path can reach only part of sm_90's peak, which needs wgmma.
  DRAM:  2 (double data rate) x memory clock x bus width in bytes.
PyTorch runs with its TF32 switches pinned off (torch.backends.cudnn.allow_tf32 and
torch.backends.cuda.matmul.allow_tf32, the first of which defaults to True), so cuDNN does true
float32 arithmetic like minunet, and with cudnn.benchmark on, so cuDNN picks its fastest
algorithm for each shape during the warm-up.
"""
import re
import time

import numpy as np
import pytest

from flops import UNET_CONV_SHAPES, UNET_CONV_TRANSPOSE_SHAPES, conv2d_flops, conv_min_bytes, conv_transpose2d_flops
from minunet import backend
from minunet.unet import UNet
from validate import check, reference, reference_of

if not backend.cuda_available():
    pytest.skip(f"no usable GPU: {backend.cuda_status()[1]}", allow_module_level=True)

import cupy  # noqa: E402  (only where a GPU is usable)

from minunet import cuda  # noqa: E402

pytestmark = pytest.mark.gpu

# FP32 lanes (CUDA cores) per SM by compute capability; 128 for anything newer than listed
_FP32_LANES = {(6, 0): 64, (6, 1): 128, (7, 0): 64, (7, 2): 64, (7, 5): 64, (8, 0): 64,
               (8, 6): 128, (8, 7): 128, (8, 9): 128, (9, 0): 128}
# dense TF32 tensor-core FLOPs per SM per clock, where known
_TF32_FLOPS_PER_SM = {(8, 0): 1024, (9, 0): 2048}


def device_peaks(device_id=None):
    """{'fp32_gflops', 'dram_gbytes_per_s', 'sm_count', 'clock_mhz', 'fp32_lanes_per_sm'} of a device
    from its attributes; a peak is None where the driver does not report the clock it needs."""
    dev = cupy.cuda.Device(device_id) if device_id is not None else cupy.cuda.Device()
    a = dev.attributes
    cc = (a["ComputeCapabilityMajor"], a["ComputeCapabilityMinor"])
    lanes = _FP32_LANES.get(cc, 64 if cc < (6, 0) else 128)
    sms, clock_khz = a["MultiProcessorCount"], a.get("ClockRate")
    mem_khz, bus_bits = a.get("MemoryClockRate"), a.get("GlobalMemoryBusWidth")
    return {
        "sm_count": sms,
        "clock_mhz": clock_khz / 1e3 if clock_khz else None,
        "fp32_lanes_per_sm": lanes,
        "fp32_gflops": sms * clock_khz * 1e3 * lanes * 2 / 1e9 if clock_khz else None,
        "tf32_gflops": sms * clock_khz * 1e3 * _TF32_FLOPS_PER_SM[cc] / 1e9 if clock_khz and cc in _TF32_FLOPS_PER_SM
        else None,
        "dram_gbytes_per_s": 2 * mem_khz * 1e3 * bus_bits / 8 / 1e9 if mem_khz and bus_bits else None,
    }


PEAKS = device_peaks()


def _sync():
    cupy.cuda.get_current_stream().synchronize()


@pytest.fixture(scope="module")
def torch_gpu(torch):
    """PyTorch on the GPU with TF32 off and cuDNN autotuning on, or None."""
    if torch is None or not torch.cuda.is_available():
        return None
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    return torch


def _torch_median_seconds(torch, fn, min_time=0.5, min_rounds=5, max_rounds=200):
    """Median wall time of fn() + synchronize after three warm-up calls (cuDNN autotunes in them)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    while len(times) < max_rounds and (len(times) < min_rounds or sum(times) < min_time):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


_TORCH_SECONDS = {}  # (kernel, shape, tf32) -> PyTorch's median: timed once, whatever minunet's version


def _bench(benchmark, fn, info, torch=None, torch_fn=None, flops=None, nbytes=None, slow=False, tf32=False):
    """Time fn + synchronize with pytest-benchmark, then torch_fn (once per kernel and shape, with
    cuDNN's TF32 on where `tf32`), and record the figures. The caller has run fn once (NVRTC
    compiles then) and checked its output."""
    def call():
        fn()
        _sync()

    for _ in range(0 if slow else 2):  # warm-up, outside the clock
        call()
    if slow:
        benchmark.pedantic(call, rounds=2, warmup_rounds=0)
    else:
        benchmark(call)
    benchmark.extra_info.update(info, dtype="float32")
    if benchmark.disabled:
        return
    t = benchmark.stats.stats.median
    if flops is not None:
        benchmark.extra_info["gflops"] = round(flops / t / 1e9, 2)
        peak = "tf32" if tf32 else "fp32"
        if PEAKS[f"{peak}_gflops"]:
            benchmark.extra_info[f"pct_peak_{peak}"] = round(100 * flops / t / 1e9 / PEAKS[f"{peak}_gflops"], 2)
    if nbytes is not None:
        benchmark.extra_info["gbytes_per_s"] = round(nbytes / t / 1e9, 2)
        if PEAKS["dram_gbytes_per_s"]:
            benchmark.extra_info["pct_peak_bw"] = round(100 * nbytes / t / 1e9 / PEAKS["dram_gbytes_per_s"], 2)
    if torch_fn is not None:
        key = (info["kernel"], info["shape"], tf32)
        if key not in _TORCH_SECONDS:
            torch.backends.cudnn.allow_tf32 = tf32
            try:
                _TORCH_SECONDS[key] = _torch_median_seconds(torch, torch_fn)
            finally:
                torch.backends.cudnn.allow_tf32 = False
        t_torch = _TORCH_SECONDS[key]
        benchmark.extra_info["torch_ms"] = round(t_torch * 1e3, 4)
        benchmark.extra_info["torch_ratio"] = round(t_torch / t, 3)


def _arrays(rng, *shapes):
    return [cupy.asarray(rng.standard_normal(s).astype(np.float32)) for s in shapes]


def _torch_tensors(torch, *arrays):
    """Zero-copy views of cupy arrays as torch CUDA tensors (__cuda_array_interface__)."""
    return [torch.as_tensor(a, device="cuda") for a in arrays]


def _torch_conv(torch, which, transposed, x, w, gy, stride, padding):
    """cuDNN's forward, or one aten.convolution_backward for the input or the weight gradient."""
    tx, tw, tgy = _torch_tensors(torch, x, w, gy)
    stride, padding = list(stride), list(padding)
    if which == "forward":
        f = torch.nn.functional.conv_transpose2d if transposed else torch.nn.functional.conv2d
        return lambda: f(tx, tw, None, stride, padding)
    mask = [True, False, False] if which == "backward_input" else [False, True, False]
    return lambda: torch.ops.aten.convolution_backward(tgy, tx, tw, None, stride, padding, [1, 1],
                                                       transposed, [0, 0], 1, mask)


# ------------------------------------------------------------------------------- conv2d

@pytest.mark.parametrize("shape", UNET_CONV_SHAPES, ids=lambda s: s.name)
@pytest.mark.parametrize("version", cuda.VERSIONS["conv2d_forward"], ids=lambda v: f"v{v}")
@pytest.mark.parametrize("which", ["forward", "backward_input", "backward_weight"])
def test_conv2d(benchmark, torch_gpu, rng, which, version, shape):
    kernel = f"conv2d_{which}"
    benchmark.group = f"{kernel} {shape.name}"
    x, w, gy = _arrays(rng, shape.x_shape, shape.w_shape, shape.conv2d_y_shape)
    s, p = shape.stride, shape.padding
    fn = {"forward": lambda: cuda.conv2d_forward(x, w, None, s, p, version=version),
          "backward_input": lambda: cuda.conv2d_backward_input(gy, w, x.shape, s, p, version=version),
          "backward_weight": lambda: cuda.conv2d_backward_weight(x, gy, w.shape, s, p, version=version)}[which]
    hx, hw, hgy = (a.get() for a in (x, w, gy))
    expected = reference_of((kernel, shape.name), lambda: {
        "forward": lambda: reference.conv2d_forward(hx, hw, None, s, p),
        "backward_input": lambda: reference.conv2d_backward_input(hgy, hw, hx.shape, s, p),
        "backward_weight": lambda: reference.conv2d_backward_weight(hx, hgy, hw.shape, s, p)}[which]())
    check(fn(), expected, f"{kernel} v{version} {shape.name}", rtol=2e-3 if version == cuda.TF32_VERSION else 1e-4)
    torch_fn = None if torch_gpu is None else _torch_conv(torch_gpu, which, False, x, w, gy, s, p)
    flops = conv2d_flops(x.shape, w.shape, gy.shape)
    _bench(benchmark, fn, dict(kernel=kernel, version=version, shape=shape.name, flops=flops,
                               min_bytes=conv_min_bytes(which, x.shape, w.shape, gy.shape)),
           torch_gpu, torch_fn, flops=flops, slow=version == 1, tf32=version == cuda.TF32_VERSION)


# --------------------------------------------------------------------- conv_transpose2d

@pytest.mark.parametrize("shape", UNET_CONV_TRANSPOSE_SHAPES, ids=lambda s: s.name)
@pytest.mark.parametrize("which", ["forward", "backward_input", "backward_weight"])
def test_conv_transpose2d(benchmark, torch_gpu, rng, which, shape):
    """The up-convolutions' own kernels (kernel == stride); minunet.functional runs every other
    transposed convolution on conv2d's kernels, whose benches are above."""
    kernel = f"conv_transpose2d_{which}"
    benchmark.group = f"{kernel} {shape.name}"
    x, w, gy = _arrays(rng, shape.x_shape, shape.w_shape, shape.conv_transpose2d_y_shape)
    s, p = shape.stride, shape.padding
    hx, hw, hgy = (a.get() for a in (x, w, gy))
    fn, expected = {
        "forward": (lambda: cuda.conv_transpose2d_forward(x, w, None),
                    lambda: reference.conv_transpose2d_forward(hx, hw, None, s, p, (0, 0))),
        "backward_input": (lambda: cuda.conv_transpose2d_backward_input(gy, w),
                           lambda: reference.conv_transpose2d_backward_input(hgy, hw, s, p)),
        "backward_weight": (lambda: cuda.conv_transpose2d_backward_weight(x, gy, w.shape),
                            lambda: reference.conv_transpose2d_backward_weight(hx, hgy, hw.shape, s, p)),
    }[which]
    check(fn(), expected(), f"{kernel} {shape.name}")
    torch_fn = None if torch_gpu is None else _torch_conv(torch_gpu, which, True, x, w, gy, s, p)
    flops = conv_transpose2d_flops(x.shape, w.shape)
    # a transposed convolution's forward is conv2d's backward_input with x and y swapped, and so on
    adjoint = {"forward": "backward_input", "backward_input": "forward", "backward_weight": "backward_weight"}[which]
    _bench(benchmark, fn, dict(kernel=kernel, shape=shape.name, flops=flops,
                               min_bytes=conv_min_bytes(adjoint, gy.shape, w.shape, x.shape)),
           torch_gpu, torch_fn, flops=flops)


# ------------------------------------------------------------------ memory-bound kernels

def _torch_forward_backward(torch, which, forward, inputs, gy):
    """forward(*tensors) timed alone, or its backward alone (autograd.grad on a kept graph)."""
    tensors = [t.detach().clone().requires_grad_(which == "backward") for t in _torch_tensors(torch, *inputs)]
    if which == "forward":
        return lambda: forward(*tensors)
    y = forward(*tensors)
    (tgy,) = _torch_tensors(torch, gy)
    return lambda: torch.autograd.grad(y, tensors, tgy, retain_graph=True)


@pytest.mark.parametrize("which", ["forward", "backward"])
def test_max_pool2d(benchmark, torch_gpu, rng, which):
    benchmark.group = f"max_pool2d_{which}"
    (x,) = _arrays(rng, (4, 64, 128, 128))
    y, argmax = cuda.max_pool2d_forward(x, (2, 2), (2, 2), (0, 0))
    (gy,) = _arrays(rng, y.shape)
    y_ref, argmax_ref = reference.max_pool2d_forward(x.get(), (2, 2), (2, 2), (0, 0))
    if which == "forward":
        fn = lambda: cuda.max_pool2d_forward(x, (2, 2), (2, 2), (0, 0))  # noqa: E731
        nbytes = x.nbytes + y.nbytes + argmax.nbytes
        check(y, y_ref, "max_pool2d_forward y")
        np.testing.assert_array_equal(argmax.get(), argmax_ref, err_msg="max_pool2d_forward argmax")
    else:
        fn = lambda: cuda.max_pool2d_backward(gy, argmax, x.shape)  # noqa: E731
        nbytes = gy.nbytes + argmax.nbytes + x.nbytes
        check(fn(), reference.max_pool2d_backward(gy.get(), argmax_ref, x.shape), "max_pool2d_backward gx")
    torch_fn = None if torch_gpu is None else _torch_forward_backward(
        torch_gpu, which, lambda t: torch_gpu.nn.functional.max_pool2d(t, 2, 2, return_indices=True)[0], [x], gy)
    _bench(benchmark, fn, dict(kernel=f"max_pool2d_{which}", shape="4x64x128x128 2x2/2"), torch_gpu, torch_fn,
           nbytes=nbytes)


@pytest.mark.parametrize("which", ["forward", "backward"])
def test_concat(benchmark, torch_gpu, rng, which):
    """The U-Net's skip connection with 'valid' padding: the encoder map centre-cropped by 4
    on every side, in front of the upsampled decoder map."""
    benchmark.group = f"concat_{which}"
    skip, up = _arrays(rng, (4, 64, 136, 136), (4, 64, 128, 128))
    offsets, out_hw = [(4, 4), (0, 0)], (128, 128)
    y = cuda.concat_forward([skip, up], offsets, out_hw)
    (gy,) = _arrays(rng, y.shape)
    if which == "forward":
        fn = lambda: cuda.concat_forward([skip, up], offsets, out_hw)  # noqa: E731
        nbytes = 2 * y.nbytes
        check(fn(), reference.concat_forward([skip.get(), up.get()], offsets, out_hw), "concat_forward y")
    else:
        fn = lambda: cuda.concat_backward(gy, [skip.shape, up.shape], offsets)  # noqa: E731
        nbytes = gy.nbytes + skip.nbytes + up.nbytes
        for i, (gx, e) in enumerate(zip(fn(), reference.concat_backward(gy.get(), [skip.shape, up.shape], offsets))):
            check(gx, e, f"concat_backward gx[{i}]")
    torch_fn = None if torch_gpu is None else _torch_forward_backward(
        torch_gpu, which, lambda s, u: torch_gpu.cat([s[:, :, 4:132, 4:132], u], 1), [skip, up], gy)
    _bench(benchmark, fn, dict(kernel=f"concat_{which}", shape="4x64x136x136 + 4x64x128x128"), torch_gpu,
           torch_fn, nbytes=nbytes)


@pytest.mark.parametrize("which", ["relu_forward", "relu_backward", "bias_backward"])
def test_activation(benchmark, torch_gpu, rng, which):
    """The bias-add + ReLU after a 64-channel convolution on 4 images of 128x128, its gradient,
    and the bias gradient (a per-channel reduction)."""
    benchmark.group = which
    x, b, gy = _arrays(rng, (4, 64, 128, 128), (64,), (4, 64, 128, 128))
    y = cuda.relu_forward(x, b)
    hx, hb, hgy, hy = (a.get() for a in (x, b, gy, y))
    fn, nbytes, expected = {
        "relu_forward": (lambda: cuda.relu_forward(x, b), 2 * x.nbytes, lambda: reference.relu_forward(hx, hb)),
        "relu_backward": (lambda: cuda.relu_backward(gy, y), 3 * x.nbytes, lambda: reference.relu_backward(hgy, hy)),
        "bias_backward": (lambda: cuda.bias_backward(gy), gy.nbytes, lambda: reference.bias_backward(hgy))}[which]
    check(fn(), expected(), which)
    torch_fn = None
    if torch_gpu is not None:
        tx, tb, tgy, ty = _torch_tensors(torch_gpu, x, b, gy, y)
        torch_fn = {"relu_forward": lambda: torch_gpu.relu(tx + tb[None, :, None, None]),
                    "relu_backward": lambda: torch_gpu.ops.aten.threshold_backward(tgy, ty, 0),
                    "bias_backward": lambda: tgy.sum((0, 2, 3))}[which]
    _bench(benchmark, fn, dict(kernel=which, shape="4x64x128x128"), torch_gpu, torch_fn, nbytes=nbytes)


@pytest.mark.parametrize("which", ["forward", "backward"])
def test_softmax_cross_entropy(benchmark, torch_gpu, rng, which):
    """12 classes (CamVid's 11 + void) on 4 images of 128x128, per-pixel losses (no reduction)."""
    benchmark.group = f"softmax_cross_entropy_{which}"
    (x,) = _arrays(rng, (4, 12, 128, 128))
    target = cupy.asarray(rng.integers(0, 12, size=(4, 128, 128)))
    loss, p = cuda.softmax_cross_entropy_forward(x, target, None, -100)
    (gloss,) = _arrays(rng, loss.shape)
    if which == "forward":
        fn = lambda: cuda.softmax_cross_entropy_forward(x, target, None, -100)  # noqa: E731
        nbytes = x.nbytes + target.nbytes + loss.nbytes + p.nbytes
        for a, e, what in zip(fn(), reference.softmax_cross_entropy_forward(x.get(), target.get(), None, -100),
                              ("loss", "p")):
            check(a, e, f"softmax_cross_entropy_forward {what}")
    else:
        fn = lambda: cuda.softmax_cross_entropy_backward(p, target, None, -100, gloss)  # noqa: E731
        nbytes = p.nbytes + target.nbytes + gloss.nbytes + x.nbytes
        check(fn(), reference.softmax_cross_entropy_backward(p.get(), target.get(), None, -100, gloss.get()),
              "softmax_cross_entropy_backward gx")
    torch_fn = None
    if torch_gpu is not None:
        (tt,) = _torch_tensors(torch_gpu, target)
        torch_fn = _torch_forward_backward(
            torch_gpu, which, lambda t: torch_gpu.nn.functional.cross_entropy(t, tt, reduction="none"), [x], gloss)
    _bench(benchmark, fn, dict(kernel=f"softmax_cross_entropy_{which}", shape="4x12x128x128"), torch_gpu,
           torch_fn, nbytes=nbytes)


@pytest.mark.parametrize("which", ["forward", "backward"])
def test_batch_norm(benchmark, torch_gpu, rng, which):
    """Training mode (batch statistics) on a 64-channel 64x64 feature map."""
    benchmark.group = f"batch_norm_{which}"
    x, gamma, beta = _arrays(rng, (4, 64, 64, 64), (64,), (64,))
    y, mean, var = cuda.batch_norm_forward(x, gamma, beta, None, None, 1e-5, True)
    (gy,) = _arrays(rng, y.shape)
    hx, hgamma, hbeta = x.get(), gamma.get(), beta.get()
    if which == "forward":
        fn = lambda: cuda.batch_norm_forward(x, gamma, beta, None, None, 1e-5, True)  # noqa: E731
        nbytes = x.nbytes + y.nbytes
        expected = reference.batch_norm_forward(hx, hgamma, hbeta, None, None, 1e-5, True)
    else:
        fn = lambda: cuda.batch_norm_backward(gy, x, gamma, mean, var, 1e-5, True)  # noqa: E731
        nbytes = gy.nbytes + x.nbytes + y.nbytes
        expected = reference.batch_norm_backward(gy.get(), hx, hgamma, mean.get(), var.get(), 1e-5, True)
    for i, (a, e) in enumerate(zip(fn(), expected)):
        check(a, e, f"batch_norm_{which} output {i}")
    torch_fn = None if torch_gpu is None else _torch_forward_backward(
        torch_gpu, which, lambda t, g, b: torch_gpu.nn.functional.batch_norm(t, None, None, g, b, training=True),
        [x, gamma, beta], gy)
    _bench(benchmark, fn, dict(kernel=f"batch_norm_{which}", shape="4x64x64x64"), torch_gpu, torch_fn,
           nbytes=nbytes)


@pytest.mark.parametrize("network", ["base64-depth4", "base4-depth2"])
@pytest.mark.parametrize("which", ["sgd_update", "adam_update"])
def test_optimizer_update(benchmark, torch_gpu, rng, which, network):
    """One optimizer step over every parameter of a U-Net (no batch norm, weights and biases) in one
    launch (kernels/optim.cu), against torch's fused AdamW / foreach SGD over the same list: base 64,
    depth 4 (31M values in 46 tensors: memory-bound), and base 4, depth 2 (7k values in 26 tensors:
    what a launch per tensor would cost is the whole of it)."""
    benchmark.group = which
    base, depth = (int(v) for v in re.findall(r"\d+", network))
    unet = UNet(in_channels=1, num_classes=2, base_channels=base, depth=depth, batch_norm=False)
    shapes = [p.shape for p in unet.parameters()]
    ps, gs, s1, s2 = (_arrays(rng, *shapes) for _ in range(4))
    s2 = [cupy.abs(v) for v in s2]  # Adam's second moment is non-negative
    host = [[a.get() for a in arrays] for arrays in (ps, gs, s1, s2)]
    step = 10
    if which == "sgd_update":
        hyper = cupy.asarray(np.array([(1e-3, 0.9, 0.0, 1e-4, 0.0, 0.0)] * len(ps)))
        fn = lambda: cuda.sgd_update(ps, gs, s1, hyper)  # noqa: E731
        nbytes = 5 * sum(p.nbytes for p in ps)  # read p, g, buf; write p, buf
        expected = [reference.sgd_update(*a, 1e-3, 0.9, 0.0, 1e-4, False, False) for a in zip(*host[:3])]
        state = list(zip(ps, s1))
    else:
        hyper = cupy.asarray(np.array([(1e-3, 0.9, 0.999, 1e-8, 1e-2, 1e-3 / (1 - 0.9 ** step),
                                        (1 - 0.999 ** step) ** 0.5, 1.0)] * len(ps)))
        fn = lambda: cuda.adam_update(ps, gs, s1, s2, hyper)  # noqa: E731
        nbytes = 7 * sum(p.nbytes for p in ps)  # read p, g, m, v; write p, m, v
        expected = [reference.adam_update(*a, 1e-3, 0.9, 0.999, 1e-8, 1e-2, step, True) for a in zip(*host)]
        state = list(zip(ps, s1, s2))
    fn()  # one update, checked; the timed ones keep updating the same arrays
    for i, (arrays, e) in enumerate(zip(state, expected)):
        for a, ei, name in zip(arrays, e, ("p", "state 1", "state 2")):
            check(a, ei, f"{which} tensor {i} {name}")
    torch_fn = None
    if torch_gpu is not None:
        tps = [t.clone() for t in _torch_tensors(torch_gpu, *ps)]
        for tp, tg in zip(tps, _torch_tensors(torch_gpu, *gs)):
            tp.grad = tg
        if which == "sgd_update":
            torch_opt = torch_gpu.optim.SGD(tps, lr=1e-3, momentum=0.9, weight_decay=1e-4, foreach=True)
        else:
            torch_opt = torch_gpu.optim.AdamW(tps, lr=1e-3, weight_decay=1e-2, fused=True)
        torch_fn = torch_opt.step
    _bench(benchmark, fn, dict(kernel=which, shape=f"{network} ({len(ps)} tensors)"), torch_gpu, torch_fn,
           nbytes=nbytes)
