"""minunet.cpu.batch_norm: batch normalisation over (N, H, W), per channel.

Statistics and gradient sums accumulate in float64, with the variance in two passes (the
mean first), so that a channel whose mean is far from 0 keeps its digits.
"""
import math

import numpy as np
from numba import prange

from minunet.cpu.runtime import empty, kernel


@kernel
def _channel_mean_var(x, mean, var):
    # x: (N, C, L) -> the mean and biased variance of each channel, two passes in float64;
    # one prange iteration per channel
    N, C, L = x.shape
    for c in prange(C):
        s = 0.0
        for n in range(N):
            for i in range(L):
                s += x[n, c, i]
        mu = s / (N * L)
        ss = 0.0
        for n in range(N):
            for i in range(L):
                d = x[n, c, i] - mu
                ss += d * d
        mean[c] = mu
        var[c] = ss / (N * L)


@kernel
def _batch_norm_forward(x, gamma, beta, mean, var, eps, y):
    # y = (x - mean) / sqrt(var + eps) * gamma + beta; x, y: (N, C, L); one iteration per plane
    N, C, L = x.shape
    for nc in prange(N * C):
        n, c = nc // C, nc % C
        mu, scale = mean[c], gamma[c] / math.sqrt(var[c] + eps)
        for i in range(L):
            y[n, c, i] = (x[n, c, i] - mu) * scale + beta[c]


@kernel
def _batch_norm_sums(gy, x, mean, var, eps, gbeta, ggamma):
    # gbeta = sum gy, ggamma = sum gy * xhat over (N, L), per channel, in float64
    N, C, L = x.shape
    for c in prange(C):
        mu, inv_std = mean[c], 1.0 / math.sqrt(var[c] + eps)
        sg = sgx = 0.0
        for n in range(N):
            for i in range(L):
                sg += gy[n, c, i]
                sgx += gy[n, c, i] * (x[n, c, i] - mu) * inv_std
        gbeta[c] = sg
        ggamma[c] = sgx


@kernel
def _batch_norm_backward_input(gy, x, gamma, mean, var, eps, gbeta, ggamma, training, gx):
    # eval:     gx = gy * gamma / sqrt(var + eps)
    # training: gx = gamma / sqrt(var + eps) * (gy - gbeta / M - xhat * ggamma / M), M = N * L,
    #           the extra terms being the gradient through the batch mean and variance
    N, C, L = x.shape
    M = N * L
    for nc in prange(N * C):
        n, c = nc // C, nc % C
        mu, inv_std = mean[c], 1.0 / math.sqrt(var[c] + eps)
        k = gamma[c] * inv_std
        if training:
            mg, mgx = gbeta[c] / M, ggamma[c] / M
            for i in range(L):
                gx[n, c, i] = k * (gy[n, c, i] - mg - (x[n, c, i] - mu) * inv_std * mgx)
        else:
            for i in range(L):
                gx[n, c, i] = k * gy[n, c, i]


def _per_channel(a, C, dtype, fill):
    """gamma or beta, or `fill` in every channel where it is None."""
    return np.full(C, fill, dtype) if a is None else a


def batch_norm_forward(x, gamma, beta, mean, var, eps, training):
    # x: (N, C, ...), gamma, beta, mean, var: (C,) or None -> y: x's shape, mean, var: (C,) used
    x3 = x.reshape(x.shape[0], x.shape[1], -1)
    C = x3.shape[1]
    if training:
        mean, var = np.empty(C, x.dtype), np.empty(C, x.dtype)
        _channel_mean_var(x3, mean, var)
    else:
        mean, var = mean.copy(), var.copy()
    y = empty(x.shape, x.dtype)
    _batch_norm_forward(x3, _per_channel(gamma, C, x.dtype, 1), _per_channel(beta, C, x.dtype, 0), mean, var, eps,
                        y.reshape(x3.shape))
    return y, mean, var


def batch_norm_backward(gy, x, gamma, mean, var, eps, training):
    # gy, x: (N, C, ...), gamma, mean, var: (C,) -> gx: x's shape, ggamma, gbeta: (C,)
    x3 = x.reshape(x.shape[0], x.shape[1], -1)
    C = x3.shape[1]
    gy3 = gy.reshape(x3.shape)
    gbeta, ggamma = np.empty(C, x.dtype), np.empty(C, x.dtype)
    _batch_norm_sums(gy3, x3, mean, var, eps, gbeta, ggamma)
    gx = empty(x.shape, x.dtype)
    _batch_norm_backward_input(gy3, x3, _per_channel(gamma, C, x.dtype, 1), mean, var, eps, gbeta, ggamma, training,
                               gx.reshape(x3.shape))
    return gx, ggamma, gbeta
