"""CPU kernel benchmarks: minunet.cpu on U-Net-sized shapes, every convolution version, with
PyTorch's CPU kernels timed on the same data in the same run as a yardstick. Each bench first
checks its output at the timed shape against tests/reference.py (benchmarks/validate.py).

    PYTHONPATH=. python -m pytest benchmarks/bench_cpu.py --benchmark-only
    PYTHONPATH=. python -m pytest benchmarks/bench_cpu.py --benchmark-only -k "conv2d_fwd_bwd and v2"

Every bench records in `benchmark.extra_info`:
  gflops        for convolutions: useful floating-point operations per second / 1e9 (benchmarks/flops.py)
  gbytes_per_s  for the memory-bound ops: the bytes the op must read and write at least once,
                per second / 1e9
  torch_ms, torch_ratio   where PyTorch is installed: PyTorch's median time for the same op and
                minunet's speed relative to it (torch time / minunet time; 1.0 = as fast, 0.5 = half
                as fast). PyTorch gets as many threads as numba.

Both sides are timed in steady state: PyTorch's rounds run after minunet's, warmed up first,
and minunet's numba kernels are compiled before pytest-benchmark starts its clock. The conv2d
`fwd_bwd` bench times forward, backward_input and backward_weight in a row, which is what one
training step asks of a convolution; PyTorch's side is F.conv2d followed by one
aten.convolution_backward for both gradients, as its autograd would run it.

In one process PyTorch shares the OpenMP runtime that minunet set up for numba before
PyTorch loaded (benchmarks/conftest.py calls minunet.cpu.configure(); see
minunet/cpu/runtime.py), so its figures here can differ from PyTorch's alone;
bench_train_step.py times each library in a process of its own.
"""
import time

import numba
import numpy as np
import pytest

from flops import UNET_CONV_SHAPES, UNET_CONV_TRANSPOSE_SHAPES, conv2d_flops, conv_transpose2d_flops
from minunet import cpu
from validate import check, reference, reference_of


@pytest.fixture(scope="module")
def torch_cpu(torch):
    """PyTorch on numba's thread count, or None."""
    if torch is not None:
        torch.set_num_threads(numba.get_num_threads())
    return torch


def _median_seconds(fn, min_time=0.5, min_rounds=5, max_rounds=200):
    """Median wall time of fn() after two warm-up calls, over at least `min_rounds` rounds and
    at least `min_time` seconds (as pytest-benchmark's defaults do it)."""
    for _ in range(2):
        fn()
    times = []
    while len(times) < max_rounds and (len(times) < min_rounds or sum(times) < min_time):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _bench(benchmark, fn, torch_fn=None, flops=None, nbytes=None, slow=False):
    """Time fn with pytest-benchmark (a slow one over a few fixed rounds), then torch_fn, and
    record the figures in extra_info. The caller has run fn once and checked its output."""
    if slow:
        benchmark.pedantic(fn, rounds=3, warmup_rounds=0)
    else:
        benchmark(fn)
    if benchmark.disabled:
        return
    t = benchmark.stats.stats.median
    if flops is not None:
        benchmark.extra_info["gflops"] = round(flops / t / 1e9, 2)
    if nbytes is not None:
        benchmark.extra_info["gbytes_per_s"] = round(nbytes / t / 1e9, 2)
    if torch_fn is not None:
        t_torch = _median_seconds(torch_fn)
        benchmark.extra_info["torch_ms"] = round(t_torch * 1e3, 3)
        benchmark.extra_info["torch_ratio"] = round(t_torch / t, 3)


def _arrays(rng, *shapes, dtype=np.float32):
    return [rng.standard_normal(s).astype(dtype) for s in shapes]


# ------------------------------------------------------------------------------- conv2d

CONV_PASSES = ["forward", "backward_input", "backward_weight", "fwd_bwd"]


def _conv2d_case(rng, shape):
    x, w, gy = _arrays(rng, shape.x_shape, shape.w_shape, shape.conv2d_y_shape)
    return x, w, gy, shape.stride, shape.padding


def _conv2d_minunet(x, w, gy, stride, padding, version):
    """The three passes, as closures, in the order of CONV_PASSES' first three."""
    return (lambda: cpu.conv2d_forward(x, w, None, stride, padding, version=version),
            lambda: cpu.conv2d_backward_input(gy, w, x.shape, stride, padding, version=version),
            lambda: cpu.conv2d_backward_weight(x, gy, w.shape, stride, padding, version=version))


def _conv2d_reference(shape, x, w, gy, stride, padding):
    """The three passes' float64 results at `shape`, from tests/reference.py (once per process)."""
    return reference_of(("conv2d", shape.name), lambda: (
        reference.conv2d_forward(x, w, None, stride, padding),
        reference.conv2d_backward_input(gy, w, x.shape, stride, padding),
        reference.conv2d_backward_weight(x, gy, w.shape, stride, padding)))


def _conv2d_torch(torch, which, x, w, gy, stride, padding):
    x, w, gy = (torch.from_numpy(a) for a in (x, w, gy))
    stride, padding = list(stride), list(padding)

    def backward(mask):
        return torch.ops.aten.convolution_backward(gy, x, w, None, stride, padding, [1, 1], False, [0, 0], 1, mask)

    fwd = lambda: torch.nn.functional.conv2d(x, w, None, stride, padding)  # noqa: E731
    return {"forward": fwd,
            "backward_input": lambda: backward([True, False, False]),
            "backward_weight": lambda: backward([False, True, False]),
            "fwd_bwd": lambda: (fwd(), backward([True, True, False]))}[which]


@pytest.mark.parametrize("shape", UNET_CONV_SHAPES, ids=lambda s: s.name)
@pytest.mark.parametrize("version", cpu.VERSIONS["conv2d_forward"], ids=lambda v: f"v{v}")
@pytest.mark.parametrize("which", CONV_PASSES)
def test_conv2d(benchmark, torch_cpu, rng, which, version, shape):
    benchmark.group = f"conv2d_{which} {shape.name}"
    x, w, gy, stride, padding = _conv2d_case(rng, shape)
    passes = _conv2d_minunet(x, w, gy, stride, padding, version)
    timed = range(3) if which == "fwd_bwd" else [CONV_PASSES.index(which)]
    expected = _conv2d_reference(shape, x, w, gy, stride, padding)
    for i in timed:
        check(passes[i](), expected[i], f"conv2d_{CONV_PASSES[i]} v{version} {shape.name}")
    flops = conv2d_flops(x.shape, w.shape, gy.shape) * len(timed)
    torch_fn = None if torch_cpu is None else _conv2d_torch(torch_cpu, which, x, w, gy, stride, padding)
    _bench(benchmark, lambda: [passes[i]() for i in timed], torch_fn, flops=flops, slow=version == 1)


# --------------------------------------------------------------------- conv_transpose2d

@pytest.mark.parametrize("shape", UNET_CONV_TRANSPOSE_SHAPES, ids=lambda s: s.name)
@pytest.mark.parametrize("which", ["forward", "backward_input", "backward_weight"])
def test_conv_transpose2d(benchmark, torch_cpu, rng, which, shape):
    """The up-convolutions' own kernels (kernel == stride); minunet.functional runs every other
    transposed convolution on conv2d's kernels, whose benches are above."""
    benchmark.group = f"conv_transpose2d_{which} {shape.name}"
    x, w, gy = _arrays(rng, shape.x_shape, shape.w_shape, shape.conv_transpose2d_y_shape)
    stride, padding = shape.stride, shape.padding
    fn, expected = {
        "forward": (lambda: cpu.conv_transpose2d_forward(x, w, None),
                    lambda: reference.conv_transpose2d_forward(x, w, None, stride, padding, (0, 0))),
        "backward_input": (lambda: cpu.conv_transpose2d_backward_input(gy, w),
                           lambda: reference.conv_transpose2d_backward_input(gy, w, stride, padding)),
        "backward_weight": (lambda: cpu.conv_transpose2d_backward_weight(x, gy, w.shape),
                            lambda: reference.conv_transpose2d_backward_weight(x, gy, w.shape, stride, padding)),
    }[which]
    check(fn(), expected(), f"conv_transpose2d_{which} {shape.name}")
    torch_fn = None
    if torch_cpu is not None:
        tx, tw, tgy = (torch_cpu.from_numpy(a) for a in (x, w, gy))
        mask = {"forward": None, "backward_input": [True, False, False], "backward_weight": [False, True, False]}[which]
        if mask is None:
            torch_fn = lambda: torch_cpu.nn.functional.conv_transpose2d(tx, tw, None, stride, padding)  # noqa: E731
        else:
            torch_fn = lambda: torch_cpu.ops.aten.convolution_backward(  # noqa: E731
                tgy, tx, tw, None, list(stride), list(padding), [1, 1], True, [0, 0], 1, mask)
    _bench(benchmark, fn, torch_fn, flops=conv_transpose2d_flops(x.shape, w.shape))


# ------------------------------------------------------------------ memory-bound kernels

def _torch_forward_backward(torch, which, forward, inputs, gy):
    """forward(*tensors) timed alone, or its backward alone (autograd.grad on a kept graph)."""
    tensors = [torch.from_numpy(a).requires_grad_(which == "backward") for a in inputs]
    if which == "forward":
        return lambda: forward(*tensors)
    y = forward(*tensors)
    tgy = torch.from_numpy(gy)
    return lambda: torch.autograd.grad(y, tensors, tgy, retain_graph=True)


@pytest.mark.parametrize("which", ["forward", "backward"])
def test_max_pool2d(benchmark, torch_cpu, rng, which):
    benchmark.group = f"max_pool2d_{which}"
    (x,) = _arrays(rng, (4, 64, 128, 128))
    y, argmax = cpu.max_pool2d_forward(x, (2, 2), (2, 2), (0, 0))
    (gy,) = _arrays(rng, y.shape)
    y_ref, argmax_ref = reference.max_pool2d_forward(x, (2, 2), (2, 2), (0, 0))
    if which == "forward":
        fn = lambda: cpu.max_pool2d_forward(x, (2, 2), (2, 2), (0, 0))  # noqa: E731
        nbytes = x.nbytes + y.nbytes + argmax.nbytes
        check(y, y_ref, "max_pool2d_forward y")
        np.testing.assert_array_equal(argmax, argmax_ref, err_msg="max_pool2d_forward argmax")
    else:
        fn = lambda: cpu.max_pool2d_backward(gy, argmax, x.shape)  # noqa: E731
        nbytes = gy.nbytes + argmax.nbytes + x.nbytes
        check(fn(), reference.max_pool2d_backward(gy, argmax_ref, x.shape), "max_pool2d_backward gx")
    torch_fn = None if torch_cpu is None else _torch_forward_backward(
        torch_cpu, which, lambda t: torch_cpu.nn.functional.max_pool2d(t, 2, 2, return_indices=True)[0], [x], gy)
    _bench(benchmark, fn, torch_fn, nbytes=nbytes)


@pytest.mark.parametrize("which", ["forward", "backward"])
def test_concat(benchmark, torch_cpu, rng, which):
    """The U-Net's skip connection with 'valid' padding: the encoder map centre-cropped by 4
    on every side, in front of the upsampled decoder map."""
    benchmark.group = f"concat_{which}"
    skip, up = _arrays(rng, (4, 64, 136, 136), (4, 64, 128, 128))
    offsets, out_hw = [(4, 4), (0, 0)], (128, 128)
    y = cpu.concat_forward([skip, up], offsets, out_hw)
    (gy,) = _arrays(rng, y.shape)
    if which == "forward":
        fn = lambda: cpu.concat_forward([skip, up], offsets, out_hw)  # noqa: E731
        check(fn(), reference.concat_forward([skip, up], offsets, out_hw), "concat_forward y")
    else:
        fn = lambda: cpu.concat_backward(gy, [skip.shape, up.shape], offsets)  # noqa: E731
        for i, (gx, e) in enumerate(zip(fn(), reference.concat_backward(gy, [skip.shape, up.shape], offsets))):
            check(gx, e, f"concat_backward gx[{i}]")
    nbytes = 2 * y.nbytes if which == "forward" else gy.nbytes + skip.nbytes + up.nbytes
    torch_fn = None if torch_cpu is None else _torch_forward_backward(
        torch_cpu, which, lambda s, u: torch_cpu.cat([s[:, :, 4:132, 4:132], u], 1), [skip, up], gy)
    _bench(benchmark, fn, torch_fn, nbytes=nbytes)


@pytest.mark.parametrize("which", ["forward", "backward"])
def test_softmax_cross_entropy(benchmark, torch_cpu, rng, which):
    """12 classes (CamVid's 11 + void) on 4 images of 128x128, per-pixel losses (no reduction)."""
    benchmark.group = f"softmax_cross_entropy_{which}"
    (x,) = _arrays(rng, (4, 12, 128, 128))
    target = rng.integers(0, 12, size=(4, 128, 128))
    loss, p = cpu.softmax_cross_entropy_forward(x, target, None, -100)
    (gloss,) = _arrays(rng, loss.shape)
    if which == "forward":
        fn = lambda: cpu.softmax_cross_entropy_forward(x, target, None, -100)  # noqa: E731
        nbytes = x.nbytes + target.nbytes + loss.nbytes + p.nbytes
        for a, e, what in zip(fn(), reference.softmax_cross_entropy_forward(x, target, None, -100), ("loss", "p")):
            check(a, e, f"softmax_cross_entropy_forward {what}")
    else:
        fn = lambda: cpu.softmax_cross_entropy_backward(p, target, None, -100, gloss)  # noqa: E731
        nbytes = p.nbytes + target.nbytes + gloss.nbytes + x.nbytes
        check(fn(), reference.softmax_cross_entropy_backward(p, target, None, -100, gloss),
              "softmax_cross_entropy_backward gx")
    tt = None if torch_cpu is None else torch_cpu.from_numpy(target)
    torch_fn = None if torch_cpu is None else _torch_forward_backward(
        torch_cpu, which, lambda t: torch_cpu.nn.functional.cross_entropy(t, tt, reduction="none"), [x], gloss)
    _bench(benchmark, fn, torch_fn, nbytes=nbytes)


@pytest.mark.parametrize("which", ["forward", "backward"])
def test_batch_norm(benchmark, torch_cpu, rng, which):
    """Training mode (batch statistics) on a 64-channel 64x64 feature map."""
    benchmark.group = f"batch_norm_{which}"
    x, gamma, beta = _arrays(rng, (4, 64, 64, 64), (64,), (64,))
    y, mean, var = cpu.batch_norm_forward(x, gamma, beta, None, None, 1e-5, True)
    (gy,) = _arrays(rng, y.shape)
    if which == "forward":
        fn = lambda: cpu.batch_norm_forward(x, gamma, beta, None, None, 1e-5, True)  # noqa: E731
        nbytes = x.nbytes + y.nbytes
        expected = reference.batch_norm_forward(x, gamma, beta, None, None, 1e-5, True)
    else:
        fn = lambda: cpu.batch_norm_backward(gy, x, gamma, mean, var, 1e-5, True)  # noqa: E731
        nbytes = gy.nbytes + x.nbytes + y.nbytes
        expected = reference.batch_norm_backward(gy, x, gamma, mean, var, 1e-5, True)
    for i, (a, e) in enumerate(zip(fn(), expected)):
        check(a, e, f"batch_norm_{which} output {i}")
    torch_fn = None if torch_cpu is None else _torch_forward_backward(
        torch_cpu, which, lambda t, g, b: torch_cpu.nn.functional.batch_norm(t, None, None, g, b, training=True),
        [x, gamma, beta], gy)
    _bench(benchmark, fn, torch_fn, nbytes=nbytes)
