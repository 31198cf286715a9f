"""Every convolution layer of a U-Net configuration, forward and both backward passes, minunet
(version=None) against PyTorch on the CPU: each library timed in a process of its own that
imports NumPy first (as nearly every user script does), the two alternating
(benchmarks/isolated.py says why).

    PYTHONPATH=. python benchmarks/conv_vs_torch.py --config base16 --pairs 3
    PYTHONPATH=. python benchmarks/conv_vs_torch.py --config camvid
    PYTHONPATH=. python benchmarks/conv_vs_torch.py --config valid572 --rounds 3

Configurations (benchmarks/flops.py, UNET_CONFIGS): base16 is the README's default model
(base_channels 16, depth 4, 128x128, batch 4), camvid the CamVid worked example (3 -> 11
channels, base 32, 256x256, batch 4), valid572 the paper's network (base 64, 'valid'
convolutions, 572x572, batch 1). A shape that occurs twice in the network is timed once.

Before it times a layer, each process checks its outputs at the timed shape against the NumPy
float64 oracle, tests/reference.py (benchmarks/validate.py): the forward pass and the input
gradient on a window of their output (cut from the full arrays, with its halo), the weight
gradient on two output x two input channels summed over the whole batch, which keeps the
check of the 572x572 layers to seconds. A kernel that is wrong cannot post a time.

The table gives, per layer and pass, the median time over the pairs for each library, its
GFLOP/s counted as a direct convolution's work (benchmarks/flops.py: Winograd's fewer
multiplies show as a rate above the machine's), and the median over the pairs of PyTorch's
time over minunet's (above 1: minunet is faster). PyTorch gets as many threads as numba.
"""
import argparse
import importlib.util
import json
import pathlib
import sys

import isolated

LIBRARY = isolated.argv_option("--library")
import numpy as np  # noqa: E402  (first, as in a user's script: before the library it times)

if LIBRARY == "pytorch":
    import torch
elif LIBRARY == "minunet":
    import minunet  # noqa: F401

from flops import UNET_CONFIGS, unet_layers  # noqa: E402
from validate import check, reference as ref  # noqa: E402

PASSES = ("forward", "backward_input", "backward_weight")


def distinct_layers(config):
    """The configuration's layers, one per distinct shape, named after all that share it."""
    layers = {}
    for s in unet_layers(**UNET_CONFIGS[config]):
        key = (s.x_shape, s.w_shape, s.stride, s.padding, s.transposed)
        if key in layers:
            layers[key] = layers[key]._replace(name=layers[key].name + ", " + s.name.split()[0])
        else:
            layers[key] = s
    return list(layers.values())


def _inputs(shape):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape.x_shape).astype(np.float32)
    w = (rng.standard_normal(shape.w_shape) / np.sqrt(np.prod(shape.w_shape[1:]))).astype(np.float32)
    out_channels = shape.w_shape[1] if shape.transposed else shape.w_shape[0]
    b = rng.standard_normal(out_channels).astype(np.float32)
    gy = rng.standard_normal(shape.y_shape).astype(np.float32)
    return x, w, b, gy


def validate(shape, x, w, b, gy, y, gx, gw):
    """Check the three passes' outputs y, gx, gw at this shape against tests/reference.py."""
    (sh, sw), (ph, pw) = shape.stride, shape.padding
    kh, kw = shape.w_shape[2:]
    name = shape.name.split(",")[0]
    if shape.transposed:  # kernel == stride, no padding: output patch (i, j) comes from input pixel (i, j)
        i1, j1 = min(4, x.shape[2]), min(4, x.shape[3])
        check(y[:, :, :i1 * kh, :j1 * kw], ref.conv_transpose2d_forward(x[:, :, :i1, :j1], w, b, shape.stride, 0, 0),
              f"{name} forward")
        check(gx[:, :, :i1, :j1], ref.conv_transpose2d_backward_input(gy[:, :, :i1 * kh, :j1 * kw], w, shape.stride, 0),
              f"{name} backward_input")
        ci, co = min(2, x.shape[1]), min(2, gy.shape[1])
        check(gw[:ci, :co], ref.conv_transpose2d_backward_weight(x[:, :ci], gy[:, :co], (ci, co, kh, kw), shape.stride, 0),
              f"{name} backward_weight")
        return
    # a window of rows and columns from the middle of y, from the padded input rows it reads
    Ho, Wo = y.shape[2:]
    i0, j0 = Ho // 2, Wo // 2
    i1, j1 = min(Ho, i0 + 5), min(Wo, j0 + 5)
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    window = xp[:, :, i0 * sh:(i1 - 1) * sh + kh, j0 * sw:(j1 - 1) * sw + kw]
    check(y[:, :, i0:i1, j0:j1], ref.conv2d_forward(window, w, b, shape.stride, 0), f"{name} forward")
    if shape.stride == (1, 1):  # gx is the convolution of gy, padded by k-1-p, by w turned and transposed
        H, W = gx.shape[2:]
        i0, j0 = H // 2, W // 2
        i1, j1 = min(H, i0 + 5), min(W, j0 + 5)
        gp = np.pad(gy, ((0, 0), (0, 0), (kh - 1 - ph, kh - 1 - ph), (kw - 1 - pw, kw - 1 - pw)))
        turned = w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3)
        check(gx[:, :, i0:i1, j0:j1], ref.conv2d_forward(gp[:, :, i0:i1 + kh - 1, j0:j1 + kw - 1], turned, None, 1, 0),
              f"{name} backward_input")
    ko, ci = min(2, gy.shape[1]), min(2, x.shape[1])
    check(gw[:ko, :ci], ref.conv2d_backward_weight(x[:, :ci], gy[:, :ko], (ko, ci, kh, kw), shape.stride, shape.padding),
          f"{name} backward_weight")


def _minunet_passes(shape, x, w, b, gy):
    from minunet import cpu
    if shape.transposed:
        return (lambda: cpu.conv_transpose2d_forward(x, w, b),      # kernel == stride, no padding
                lambda: cpu.conv_transpose2d_backward_input(gy, w),
                lambda: cpu.conv_transpose2d_backward_weight(x, gy, w.shape))
    return (lambda: cpu.conv2d_forward(x, w, b, shape.stride, shape.padding),
            lambda: cpu.conv2d_backward_input(gy, w, x.shape, shape.stride, shape.padding),
            lambda: cpu.conv2d_backward_weight(x, gy, w.shape, shape.stride, shape.padding))


def _torch_passes(shape, x, w, b, gy):
    tx, tw, tb, tgy = (torch.from_numpy(a) for a in (x, w, b, gy))
    conv = torch.nn.functional.conv_transpose2d if shape.transposed else torch.nn.functional.conv2d

    def backward(mask):
        out = torch.ops.aten.convolution_backward(tgy, tx, tw, None, shape.stride, shape.padding, (1, 1),
                                                  shape.transposed, (0, 0), 1, mask)
        return out[0] if mask[0] else out[1]
    return (lambda: conv(tx, tw, tb, stride=shape.stride, padding=shape.padding),
            lambda: backward((True, False, False)),
            lambda: backward((False, True, False)))


def measure(config, rounds):
    """{layer: {pass: ms}} for this process's library, each pass validated first."""
    if LIBRARY == "pytorch":
        import numba
        torch.set_num_threads(numba.get_num_threads())
    results = {}
    for shape in distinct_layers(config):
        x, w, b, gy = _inputs(shape)
        if LIBRARY == "pytorch":
            passes = _torch_passes(shape, x, w, b, gy)
            with torch.no_grad():
                validate(shape, x, w, b, gy, *(np.asarray(p()) for p in passes))
                results[shape.name] = {name: 1e3 * isolated.median_seconds(p, rounds) for name, p in zip(PASSES, passes)}
        else:
            passes = _minunet_passes(shape, x, w, b, gy)
            validate(shape, x, w, b, gy, *(p() for p in passes))
            results[shape.name] = {name: 1e3 * isolated.median_seconds(p, rounds) for name, p in zip(PASSES, passes)}
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="base16", choices=sorted(UNET_CONFIGS))
    p.add_argument("--pairs", type=int, default=3, help="minunet/PyTorch measurements, alternating")
    p.add_argument("--rounds", type=int, default=7, help="timed calls per pass and measurement (the median counts)")
    p.add_argument("--library", choices=["minunet", "pytorch"],
                   help="time only this library, in this process, and print one JSON line")
    args = p.parse_args()
    if args.library:
        print(json.dumps(measure(args.config, args.rounds)))
        return
    if importlib.util.find_spec("torch") is None:  # PyTorch is imported only where it is timed
        sys.exit("conv_vs_torch.py needs PyTorch (pip install torch==2.13.0)")
    runs = {"minunet": [], "pytorch": []}
    for _ in range(args.pairs):
        for library in runs:
            runs[library].append(isolated.measure(pathlib.Path(__file__).resolve(), library,
                                                  ["--config", args.config, "--rounds", args.rounds]))
    cfg = UNET_CONFIGS[args.config]
    print(f"{args.config}: {cfg}; each library alone in its process, NumPy imported first, median of "
          f"{args.rounds} calls per pass, {args.pairs} pairs; GFLOP/s as direct convolution")
    print(f"{'layer':44s} {'pass':15s} {'minunet ms':>10s} {'GFLOP/s':>8s} {'PyTorch ms':>10s} {'GFLOP/s':>8s} {'ratio':>6s}")
    totals = {"minunet": 0.0, "pytorch": 0.0}
    counts = {}
    for s in unet_layers(**cfg):
        key = (s.x_shape, s.w_shape, s.stride, s.padding, s.transposed)
        counts[key] = counts.get(key, 0) + 1
    for shape in distinct_layers(args.config):
        count = counts[(shape.x_shape, shape.w_shape, shape.stride, shape.padding, shape.transposed)]
        for name in PASSES:
            ours = float(np.median([r[shape.name][name] for r in runs["minunet"]]))
            theirs = float(np.median([r[shape.name][name] for r in runs["pytorch"]]))
            ratio = float(np.median([t[shape.name][name] / o[shape.name][name]
                                     for o, t in zip(runs["minunet"], runs["pytorch"])]))
            totals["minunet"] += count * ours
            totals["pytorch"] += count * theirs
            print(f"{shape.name[:44]:44s} {name:15s} {ours:10.2f} {shape.flops / ours / 1e6:8.0f} "
                  f"{theirs:10.2f} {shape.flops / theirs / 1e6:8.0f} {ratio:6.2f}")
    print(f"every layer, every pass (shapes counted as often as the network has them): minunet "
          f"{totals['minunet']:.1f} ms, PyTorch {totals['pytorch']:.1f} ms, ratio {totals['pytorch'] / totals['minunet']:.2f}")


if __name__ == "__main__":
    main()
