"""minunet.cpu.activation: ReLU (with the conv layer's bias fused into it) and the bias gradient.

relu_forward(x, b) computes max(x + b, 0) in one pass, which is how the U-Net's conv layers
use it: the convolution runs without its bias and the ReLU adds it, saving a pass over the
feature map. bias_backward sums gy over everything but the channel axis.
"""
import numpy as np
from numba import prange

from minunet.cpu.runtime import empty, kernel


@kernel
def _relu(x, y):
    # x, y: flat; NaN passes through (NaN <= 0 is False), as in PyTorch
    for i in prange(x.size):
        y[i] = 0 if x[i] <= 0 else x[i]


@kernel
def _bias_relu(x, b, y):
    # x, y: (N, C, H*W); one prange iteration per plane (n, c)
    N, C, L = x.shape
    for nc in prange(N * C):
        n, c = nc // C, nc % C
        for s in range(L):
            t = x[n, c, s] + b[c]
            y[n, c, s] = 0 if t <= 0 else t


@kernel
def _relu_backward(gy, y, gx):
    for i in prange(gy.size):
        gx[i] = gy[i] if y[i] > 0 else 0


@kernel(fastmath={"reassoc"})
def _bias_backward(gy, gb):
    # gy: (N, C, L) -> gb: (C,); one prange iteration per channel. Each plane is summed in the
    # input dtype (reassoc lets LLVM keep vector partial sums), the planes' sums in float64.
    N, C, L = gy.shape
    zero = np.zeros(1, gy.dtype)[0]
    for c in prange(C):
        acc = 0.0
        for n in range(N):
            plane, s = gy[n, c], zero
            for i in range(L):
                s += plane[i]
            acc += s
        gb[c] = acc


def relu_forward(x, b=None):
    # x: (N, C, H, W), b: (C,) -> y = max(x + b, 0): (N, C, H, W); without b, x of any shape
    y = empty(x.shape, x.dtype)
    if b is None:
        _relu(x.reshape(-1), y.reshape(-1))
        return y
    N, C, H, W = x.shape
    _bias_relu(x.reshape(N, C, H * W), b, y.reshape(N, C, H * W))
    return y


def relu_backward(gy, y):
    # gy, y: same shape -> gx = gy * (y > 0)
    gx = empty(gy.shape, gy.dtype)
    _relu_backward(gy.reshape(-1), y.reshape(-1), gx.reshape(-1))
    return gx


def bias_backward(gy):
    # gy: (N, C, H, W) -> gb: (C,)
    gb = np.empty(gy.shape[1], gy.dtype)
    _bias_backward(gy.reshape(gy.shape[0], gy.shape[1], -1), gb)
    return gb
