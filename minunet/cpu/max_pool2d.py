"""minunet.cpu.max_pool2d: max pooling, with the argmax saved for the backward pass (as Chainer).

The forward pass records, for every output, where in its input plane the maximum was (flat
h * W + w, int64, as PyTorch's indices); the backward pass adds each gy onto that place.
Windows may overlap (stride < kernel), so the backward pass gives each input plane to one
prange iteration, which owns every += into it.

The U-Net's 2x2 pooling with stride 2 gets a forward loop of its own, with no bounds to check
and written without branches (each comparison a select) so that LLVM vectorises it.
"""
import numba
import numpy as np
from numba import prange

from minunet.contract import conv_out_hw
from minunet.cpu.runtime import empty, kernel


@numba.njit(inline="always")
def _larger(best, at, v, where):
    """(best, at) unless v wins: v > best, or v is NaN and best is not (a NaN propagates, as in
    PyTorch); no branch (the & and | of two booleans), so the loop around it vectorises"""
    take = (v > best) | ((v != v) & (best == best))
    return (v if take else best), (where if take else at)


@kernel
def _max_pool2d_forward(x, kh, kw, sh, sw, ph, pw, y, argmax):
    # one prange iteration per plane (n, c); the first maximum in row-major window order wins,
    # a NaN wins over any number (it propagates, as in PyTorch); padded places are never read
    N, C, H, W = x.shape
    Ho, Wo = y.shape[2], y.shape[3]
    if (kh, kw, sh, sw, ph, pw) == (2, 2, 2, 2, 0, 0):   # the U-Net's pooling: no bounds to check
        for nc in prange(N * C):
            n, c = nc // C, nc % C
            for i in range(Ho):
                top, bot = x[n, c, 2 * i], x[n, c, 2 * i + 1]
                yr, ar = y[n, c, i], argmax[n, c, i]
                for j in range(Wo):
                    at = 2 * i * W + 2 * j
                    best, where = _larger(top[2 * j], at, top[2 * j + 1], at + 1)
                    best, where = _larger(best, where, bot[2 * j], at + W)
                    yr[j], ar[j] = _larger(best, where, bot[2 * j + 1], at + W + 1)
        return
    for nc in prange(N * C):
        n, c = nc // C, nc % C
        for i in range(Ho):
            h0 = i * sh - ph
            for j in range(Wo):
                q0 = j * sw - pw
                best = x[n, c, max(h0, 0), max(q0, 0)]
                at = max(h0, 0) * W + max(q0, 0)
                for h in range(max(h0, 0), min(h0 + kh, H)):
                    for q in range(max(q0, 0), min(q0 + kw, W)):
                        v = x[n, c, h, q]
                        if v > best or (v != v and best == best):
                            best, at = v, h * W + q
                y[n, c, i, j] = best
                argmax[n, c, i, j] = at


@kernel
def _max_pool2d_backward(gy, argmax, gx):
    # gy, argmax: (N*C, Ho*Wo) -> gx: (N*C, H*W); windows may overlap, so one prange iteration
    # per whole plane, which zeroes it (in its core's cache, where the += then find it) and owns
    # every += into it
    for nc in prange(gy.shape[0]):
        gx[nc] = 0
        for s in range(gy.shape[1]):
            gx[nc, argmax[nc, s]] += gy[nc, s]


def max_pool2d_forward(x, kernel_size, stride, padding):
    # x: (N, C, H, W) -> y: (N, C, Ho, Wo), argmax: (N, C, Ho, Wo) int64
    y = empty((*x.shape[:2], *conv_out_hw(x.shape[2:], kernel_size, stride, padding)), x.dtype)
    argmax = empty(y.shape, np.int64)
    _max_pool2d_forward(x, *kernel_size, *stride, *padding, y, argmax)
    return y, argmax


def max_pool2d_backward(gy, argmax, x_shape):
    # gy: (N, C, Ho, Wo), argmax: (N, C, Ho, Wo) -> gx: x_shape = (N, C, H, W)
    N, C, H, W = x_shape
    gx = empty((N * C, H * W), gy.dtype)
    _max_pool2d_backward(gy.reshape(N * C, -1), argmax.reshape(N * C, -1), gx)
    return gx.reshape(N, C, H, W)
