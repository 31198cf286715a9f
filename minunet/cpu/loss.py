"""minunet.cpu.loss: per-pixel softmax cross-entropy over the channel axis.

The forward pass keeps the softmax p for the backward pass, whose gradient is then just
gloss * weight[t] * (p - onehot(t)). Each prange iteration owns one image row (n, h) and its
inner loops run along the row, so they vectorise.
"""
import math

import numpy as np
from numba import prange

from minunet.cpu.runtime import empty, kernel


@kernel
def _softmax_cross_entropy_forward(x, target, weight, ignore_index, loss, p):
    # x, p: (N, C, H, W), target, loss: (N, H, W). One prange iteration per image row (n, h),
    # its inner loops running along the row so they vectorise: m = max_c x, p = exp(x - m) / z
    # with z = sum_c exp(x - m), and loss = weight[t] * (m + log z - x[t]).
    N, C, H, W = x.shape
    for nh in prange(N * H):
        n, h = nh // H, nh % H
        m = x[n, 0, h].copy()
        for c in range(1, C):
            for j in range(W):
                m[j] = max(m[j], x[n, c, h, j])
        z = np.zeros(W)
        for c in range(C):
            for j in range(W):
                e = math.exp(x[n, c, h, j] - m[j])
                p[n, c, h, j] = e
                z[j] += e
        for c in range(C):
            for j in range(W):
                p[n, c, h, j] /= z[j]
        for j in range(W):
            t = target[n, h, j]
            loss[n, h, j] = 0 if t == ignore_index else weight[t] * (m[j] - x[n, t, h, j] + math.log(z[j]))


@kernel
def _softmax_cross_entropy_backward(p, target, weight, ignore_index, gloss, gx):
    # gx[n, c, h, w] = gloss[n, h, w] * weight[t] * (p[n, c, h, w] - [c == t]), 0 where t is ignored;
    # one prange iteration per image row (n, h)
    N, C, H, W = p.shape
    for nh in prange(N * H):
        n, h = nh // H, nh % H
        g = np.empty(W)
        for j in range(W):
            t = target[n, h, j]
            g[j] = 0 if t == ignore_index else gloss[n, h, j] * weight[t]
        for c in range(C):
            for j in range(W):
                gx[n, c, h, j] = g[j] * (p[n, c, h, j] - (1.0 if c == target[n, h, j] else 0.0))


def _ones_for_none(weight, C, dtype):
    """The class weights, all 1 where none are given."""
    return np.ones(C, dtype) if weight is None else weight


def softmax_cross_entropy_forward(x, target, weight, ignore_index):
    # x: (N, C, H, W) logits, target: (N, H, W) int64 -> loss: (N, H, W), p: (N, C, H, W)
    N, C, H, W = x.shape
    loss = empty((N, H, W), x.dtype)
    p = empty(x.shape, x.dtype)
    _softmax_cross_entropy_forward(x, target, _ones_for_none(weight, C, x.dtype), ignore_index, loss, p)
    return loss, p


def softmax_cross_entropy_backward(p, target, weight, ignore_index, gloss):
    # p: (N, C, H, W), target, gloss: (N, H, W) -> gx: (N, C, H, W)
    gx = empty(p.shape, p.dtype)
    _softmax_cross_entropy_backward(p, target, _ones_for_none(weight, p.shape[1], p.dtype), ignore_index, gloss, gx)
    return gx
