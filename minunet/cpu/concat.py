"""minunet.cpu.concat: channel concatenation with a crop window per input (the U-Net's crop-and-concatenate).

y[:, c0_i + c] = xs[i][:, c, top_i:top_i+H, left_i:left_i+W]: one kernel crops and stacks,
so the valid-padding U-Net's centre crop of each skip feature costs no extra copy. The
backward pass hands each input the matching channel slice of gy inside its window and 0
outside it.
"""
import numpy as np
from numba import prange

from minunet.checks import ArrayChecks
from minunet.cpu.runtime import kernel

_check = ArrayChecks(np, "CPU")
_floats = _check.floats


@kernel
def _crop_into(x, top, left, c0, y):
    # y[:, c0 + c] = x[:, c, top:top+H, left:left+W] for every channel c of x; one iteration per plane
    N, C = x.shape[0], x.shape[1]
    H, W = y.shape[2], y.shape[3]
    for nc in prange(N * C):
        n, c = nc // C, nc % C
        y[n, c0 + c] = x[n, c, top:top + H, left:left + W]


@kernel
def _uncrop_from(gy, top, left, c0, gx):
    # gx[:, c] = 0 outside the window, gy[:, c0 + c] inside it; one iteration per plane
    N, C = gx.shape[0], gx.shape[1]
    H, W = gy.shape[2], gy.shape[3]
    for nc in prange(N * C):
        n, c = nc // C, nc % C
        gx[n, c] = 0
        gx[n, c, top:top + H, left:left + W] = gy[n, c0 + c]


def _check_windows(op, shapes, offsets, out_hw):
    if len(offsets) != len(shapes):
        raise ValueError(f"{op}: {len(shapes)} inputs but {len(offsets)} offsets")
    H, W = out_hw
    for i, (shape, (top, left)) in enumerate(zip(shapes, offsets)):
        if len(shape) != 4 or shape[0] != shapes[0][0]:
            raise ValueError(f"{op}: input {i} has shape {tuple(shape)}; every input must be "
                             f"(N={shapes[0][0]}, C_i, H_i, W_i)")
        if not (0 <= top and top + H <= shape[2] and 0 <= left and left + W <= shape[3]):
            raise ValueError(f"{op}: the {H}x{W} window at offset ({top}, {left}) does not fit "
                             f"in input {i} of shape {tuple(shape)}")


def concat_forward(xs, offsets, out_hw):
    # xs: list of (N, C_i, H_i, W_i) -> y: (N, sum C_i, H, W), input i cropped at offsets[i]
    op = "concat_forward"
    dtype = _floats(op, *((f"xs[{i}]", x) for i, x in enumerate(xs)))
    H, W = out_hw
    _check_windows(op, [x.shape for x in xs], offsets, (H, W))
    y = np.empty((xs[0].shape[0], sum(x.shape[1] for x in xs), H, W), dtype)
    c0 = 0
    for x, (top, left) in zip(xs, offsets):
        _crop_into(x, top, left, c0, y)
        c0 += x.shape[1]
    return y


def concat_backward(gy, x_shapes, offsets):
    # gy: (N, sum C_i, H, W) -> gxs: list of x_shapes[i], zero outside each crop window
    op = "concat_backward"
    dtype = _floats(op, ("gy", gy), ndim=4)
    x_shapes = [tuple(shape) for shape in x_shapes]
    _check_windows(op, x_shapes, offsets, gy.shape[2:])
    if x_shapes[0][0] != gy.shape[0] or sum(s[1] for s in x_shapes) != gy.shape[1]:
        raise ValueError(f"{op}: gy {gy.shape} does not match the inputs {x_shapes}")
    gxs, c0 = [], 0
    for shape, (top, left) in zip(x_shapes, offsets):
        gx = np.empty(shape, dtype)
        _uncrop_from(gy, top, left, c0, gx)
        gxs.append(gx)
        c0 += shape[1]
    return gxs
