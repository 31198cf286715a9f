"""conv2d forward + backward_input + backward_weight for each U-Net layer shape of
benchmarks/flops.py, minunet (version=None) against PyTorch on the CPU, each library timed in a
process of its own, the two alternating (benchmarks/isolated.py says why).

    PYTHONPATH=. python benchmarks/conv_vs_torch.py --pairs 2

Each figure is the median of --rounds calls after two warm-up calls; the table gives, per
layer, the range of each library's figures over the pairs and the median of the pairs'
ratios (PyTorch's time over minunet's: above 1, minunet is faster). PyTorch gets as many
threads as numba. Before the measurements the parent process checks minunet's three passes at
every timed shape against tests/reference.py (benchmarks/validate.py).
"""
import argparse
import importlib.util
import json
import pathlib
import sys

import isolated

LIBRARY = isolated.argv_option("--library")
if LIBRARY == "pytorch":  # the measured library first: see benchmarks/isolated.py
    import torch
elif LIBRARY == "minunet":
    import minunet  # noqa: F401

import numpy as np  # noqa: E402

from flops import UNET_CONV_SHAPES  # noqa: E402


def _fwd_bwd(library, shape):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape.x_shape).astype(np.float32)
    w = (rng.standard_normal(shape.w_shape) * 0.1).astype(np.float32)
    gy = np.ones(shape.conv2d_y_shape, np.float32)
    if library == "minunet":
        from minunet import cpu

        def step():
            cpu.conv2d_forward(x, w, None, shape.stride, shape.padding)
            cpu.conv2d_backward_input(gy, w, x.shape, shape.stride, shape.padding)
            cpu.conv2d_backward_weight(x, gy, w.shape, shape.stride, shape.padding)
        return step
    tx, tw, tgy = torch.from_numpy(x).requires_grad_(), torch.from_numpy(w).requires_grad_(), torch.from_numpy(gy)

    def step():
        y = torch.nn.functional.conv2d(tx, tw, stride=shape.stride, padding=shape.padding)
        torch.autograd.grad(y, (tx, tw), tgy)
    return step


def check_minunet():
    """minunet's conv2d passes (version=None) at every timed shape against tests/reference.py."""
    from minunet import cpu
    from validate import check, reference
    rng = np.random.default_rng(0)
    for shape in UNET_CONV_SHAPES:
        x, w, gy = (rng.standard_normal(s).astype(np.float32) for s in (shape.x_shape, shape.w_shape,
                                                                        shape.conv2d_y_shape))
        s, p = shape.stride, shape.padding
        check(cpu.conv2d_forward(x, w, None, s, p), reference.conv2d_forward(x, w, None, s, p), shape.name)
        check(cpu.conv2d_backward_input(gy, w, x.shape, s, p), reference.conv2d_backward_input(gy, w, x.shape, s, p),
              shape.name)
        check(cpu.conv2d_backward_weight(x, gy, w.shape, s, p),
              reference.conv2d_backward_weight(x, gy, w.shape, s, p), shape.name)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=2, help="minunet/PyTorch measurements, alternating")
    p.add_argument("--rounds", type=int, default=8, help="timed calls per layer and measurement")
    p.add_argument("--library", choices=["minunet", "pytorch"],
                   help="time only this library, in this process, and print one JSON line")
    args = p.parse_args()
    if args.library:
        if args.library == "pytorch":
            import numba
            torch.set_num_threads(numba.get_num_threads())
        print(json.dumps({s.name: 1e3 * isolated.median_seconds(_fwd_bwd(args.library, s), args.rounds)
                          for s in UNET_CONV_SHAPES}))
        return
    if importlib.util.find_spec("torch") is None:  # PyTorch is imported only where it is timed
        sys.exit("conv_vs_torch.py needs PyTorch (pip install torch==2.13.0)")
    check_minunet()
    runs = {"minunet": [], "pytorch": []}
    for _ in range(args.pairs):
        for library in runs:
            runs[library].append(isolated.measure(pathlib.Path(__file__).resolve(), library, ["--rounds", args.rounds]))
    print(f"{'layer':28s} {'minunet ms':>15s} {'PyTorch ms':>15s} {'ratio':>6s}")
    for s in UNET_CONV_SHAPES:
        ours, theirs = [r[s.name] for r in runs["minunet"]], [r[s.name] for r in runs["pytorch"]]
        ratio = float(np.median([t / o for o, t in zip(ours, theirs)]))
        print(f"{s.name:28s} {min(ours):6.1f} to {max(ours):5.1f} {min(theirs):6.1f} to {max(theirs):5.1f} {ratio:6.2f}")


if __name__ == "__main__":
    main()
