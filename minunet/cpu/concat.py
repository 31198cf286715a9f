"""minunet.cpu.concat: channel concatenation with a crop window per input (the U-Net's crop-and-concatenate).

y[:, c0_i + c] = xs[i][:, c, top_i:top_i+H, left_i:left_i+W]: one kernel crops and stacks,
so the valid-padding U-Net's centre crop of each skip feature costs no extra copy. The
backward pass hands each input the matching channel slice of gy inside its window and 0
outside it.
"""
from numba import prange

from minunet.cpu.runtime import empty, kernel


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
    # gx[:, c] = 0 outside the window, gy[:, c0 + c] inside it; one iteration per plane (zeroed
    # first only where the window leaves some of it out: the 'same' U-Net's windows are whole)
    N, C = gx.shape[0], gx.shape[1]
    H, W = gy.shape[2], gy.shape[3]
    whole = H == gx.shape[2] and W == gx.shape[3]
    for nc in prange(N * C):
        n, c = nc // C, nc % C
        if not whole:
            gx[n, c] = 0
        gx[n, c, top:top + H, left:left + W] = gy[n, c0 + c]


def concat_forward(xs, offsets, out_hw):
    # xs: list of (N, C_i, H_i, W_i) -> y: (N, sum C_i, H, W), input i cropped at offsets[i]
    y = empty((xs[0].shape[0], sum(x.shape[1] for x in xs), *out_hw), xs[0].dtype)
    c0 = 0
    for x, (top, left) in zip(xs, offsets):
        _crop_into(x, top, left, c0, y)
        c0 += x.shape[1]
    return y


def concat_backward(gy, x_shapes, offsets):
    # gy: (N, sum C_i, H, W) -> gxs: list of x_shapes[i], zero outside each crop window
    gxs, c0 = [], 0
    for shape, (top, left) in zip(x_shapes, offsets):
        gx = empty(shape, gy.dtype)
        _uncrop_from(gy, top, left, c0, gx)
        gxs.append(gx)
        c0 += shape[1]
    return gxs
