"""minunet.cpu.conv2d_winograd_small: Winograd's F(4x4, 3x3) on small planes, output channels in the lanes.

conv2d's version 4 on the CPU (forward and input gradient) where the plane is a few tiles wide:
the 8x8 bottom of a U-Net and the 16x16 level above it (suits). conv2d_winograd.py teaches the
algorithm; this module changes only which axis the SIMD lanes run along in the 36 products and
the output transform.

Why. conv2d_winograd.py's products M[p] (K, T) = U[p] (K, C) @ V[p] (C, T) run their vectors
along the tiles T, which its input transform lays out a tile row at a time with one dummy tile
after each row (see "the steps of a task" there). On an 8x8 plane a tile row is 2 tiles, so a
row takes 3 lanes, and a batch of 4 images has 16 real tiles in 24 places, rounded up to 32
lanes: half of every product's multiply-adds go to tiles that are never written out.

Here the products are transposed, M[p]^T (T, K) = V[p]^T (T, C) @ U[p]^T (C, K), with the
vectors along the output channels K, which a U-Net's bottom has many of (128 to 1024), and a
sum over the real tiles only, one at a time (their places in V are looked up, the dummies
skipped). The micro-kernel keeps 8 tiles x 2 vectors of output channels in 16 accumulators
along the sum over C: each step 2 vector loads of U^T, 8 broadcasts of V and 16 fused
multiply-adds, the same shape as conv2d_winograd.py's. The output transform then runs on
vectors of output channels too, and writes each of a tile's 16 outputs to 16 channels at once
(a scatter, stride Ho*Wo) with the bias and the ReLU added in the registers.

What stays: the input transform (conv2d_winograd.py's, every tile of the batch at once, split
over input channels) and the filter transform (the same `_filter_block`, with the lanes along
the output channels). The work splits by blocks of 2 vectors of output channels, each task
transforming its own filters, which never leave its core's cache.
"""
import numba
import numpy as np
from numba import prange

from minunet.cpu.conv2d_winograd import _at, _filter_block, _part, _rows_at, _tiles, outputs, transformed_inputs
from minunet.cpu.runtime import fma_helper as _helper, fma_kernel as _kernel, thread_scratch
from minunet.cpu.simd import broadcast, fma, lanes, load, load_range, relu, scatter, store, zeros

_WIDEST = 8           # planes at most this wide (2 tiles a row) run here, ...
_WIDE, _MANY = 16, 256  # ... planes up to 16 wide with at least 256 channels in and out, ...
_SOME, _FEW = 128, 128  # ... and those with 128 channels in or out and at most 128 tiles


def suits(N, C, K, Ho, Wo):
    """Whether a convolution of C channels into K onto N planes (Ho, Wo) runs here rather than in
    conv2d_winograd.py. Measured on 2 cores, forward and input gradient, in one process,
    alternating: at 8x8 from 128 -> 256 channels up, 10 to 20% faster here, and twice as fast at
    512 -> 512; at 16x16 twice as fast at 512 (where conv2d_winograd.py's blocks of tiles each
    read all the transformed filters, 36 MB); at 16x16 with 128 channels on either side, 1.1 to
    1.3x as fast for batches of 1 to 8 (16 to 128 tiles) and 0.9 to 1.1x at 16 images (the
    products' rows of tiles no longer stay in cache); at 32x32 slower (0.4 to 0.75x)."""
    tiles = N * -(-Ho // 4) * -(-Wo // 4)
    return Wo <= _WIDEST or (Wo <= _WIDE and (min(C, K) >= _MANY or (max(C, K) >= _SOME and tiles <= _FEW)))


@_helper
def _slot(j, TW):
    """V's place of real tile j (tile rows of TW tiles, each followed by a dummy)"""
    return j // TW * (TW + 1) + j % TW


@_helper
def _multiply(V, Ut, T, TW, Mt):
    # Mt[p, j, k] = sum_c V[p, c, slot(j)] * Ut[p, c, k] for the real tiles j < T and k < KB (2
    # vectors). Micro-kernel: 8 tiles x 2 vectors of output channels (see the module's docstring).
    # Mt's rows are T rounded up to 8: a last group past tile T - 1 repeats it into rows never read.
    # V, Ut and Mt each have a spare row per point (conv2d_winograd's docstring): V and Ut C + 1.
    CP, TBv = V.shape[1], V.shape[2]
    C = CP - 1
    TP, KB = Mt.shape[1], Mt.shape[2]                   # Mt's rows per point: T rounded up to 8, and the spare
    L = lanes(V)
    z = zeros(V)
    for p in range(36):
        for j in range(0, T, 8):
            last = T - 1
            s0, s1, s2, s3 = _slot(j, TW), _slot(min(j + 1, last), TW), _slot(min(j + 2, last), TW), \
                _slot(min(j + 3, last), TW)
            s4, s5, s6, s7 = _slot(min(j + 4, last), TW), _slot(min(j + 5, last), TW), \
                _slot(min(j + 6, last), TW), _slot(min(j + 7, last), TW)
            a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = z
            b0 = b1 = b2 = b3 = b4 = b5 = b6 = b7 = z
            for c in range(C):
                u0 = load(Ut, (p * CP + c) * KB)
                u1 = load(Ut, (p * CP + c) * KB + L)
                v = (p * CP + c) * TBv
                s = broadcast(V, v + s0)
                a0, b0 = fma(s, u0, a0), fma(s, u1, b0)
                s = broadcast(V, v + s1)
                a1, b1 = fma(s, u0, a1), fma(s, u1, b1)
                s = broadcast(V, v + s2)
                a2, b2 = fma(s, u0, a2), fma(s, u1, b2)
                s = broadcast(V, v + s3)
                a3, b3 = fma(s, u0, a3), fma(s, u1, b3)
                s = broadcast(V, v + s4)
                a4, b4 = fma(s, u0, a4), fma(s, u1, b4)
                s = broadcast(V, v + s5)
                a5, b5 = fma(s, u0, a5), fma(s, u1, b5)
                s = broadcast(V, v + s6)
                a6, b6 = fma(s, u0, a6), fma(s, u1, b6)
                s = broadcast(V, v + s7)
                a7, b7 = fma(s, u0, a7), fma(s, u1, b7)
            o = (p * TP + j) * KB
            _store2(Mt, o, L, a0, b0)
            _store2(Mt, o + KB, L, a1, b1)
            _store2(Mt, o + 2 * KB, L, a2, b2)
            _store2(Mt, o + 3 * KB, L, a3, b3)
            _store2(Mt, o + 4 * KB, L, a4, b4)
            _store2(Mt, o + 5 * KB, L, a5, b5)
            _store2(Mt, o + 6 * KB, L, a6, b6)
            _store2(Mt, o + 7 * KB, L, a7, b7)


@_helper
def _store2(a, o, L, v0, v1):
    store(a, o, v0)
    store(a, o + L, v1)


@_helper
def _output_transform(Mt, T, b, apply_relu, k0, nk, TH, TW, y, y2):
    # y[n, k0 + k, 4*ti + i, 4*tj + c] = (A^T M A)[i, c] + b[k0 + k] (with apply_relu, max of that
    # and 0) for k < nk, M[a, b'] = Mt[a*6 + b', j, k] of real tile j = (n*TH + ti)*TW + tj < T;
    # vectors over k, each output scattered to its L channels; places past y's edge not written.
    # Channels k0 + k >= K1 (y's) go to y2's channel k0 + k - K1 (see conv2d_winograd's); K1 is
    # a multiple of the vector (see convolve), so no vector straddles the two.
    KB = Mt.shape[2]
    Ho, Wo = y.shape[2], y.shape[3]
    L = lanes(Mt)
    P = Mt.shape[1] * KB                                          # from one point to the next in Mt
    HW = Ho * Wo
    tmp = np.empty(24 * L, Mt.dtype)
    for kv in range(0, nk, L):
        n_lanes = min(L, nk - kv)
        dst, kd, Kd = _part(y, y2, k0 + kv)
        bias = load_range(b, k0 + kv, 0, n_lanes)
        for j in range(T):
            r, tj = j // TW, j % TW
            n, ti = r // TH, r % TH
            o = j * KB + kv
            _rows_at(Mt, o, P, tmp)                     # along each row: A^T over the columns
            for c in range(4):                          # then down each column: outputs (i, c)
                col = 4 * tj + c
                if col < Wo:
                    v0, v1, v2, v3 = _at(load(tmp, c * L), load(tmp, (4 + c) * L), load(tmp, (8 + c) * L),
                                         load(tmp, (12 + c) * L), load(tmp, (16 + c) * L), load(tmp, (20 + c) * L))
                    v0, v1, v2, v3 = v0 + bias, v1 + bias, v2 + bias, v3 + bias
                    if apply_relu:
                        v0, v1, v2, v3 = relu(v0), relu(v1), relu(v2), relu(v3)
                    at = ((n * Kd + kd) * Ho + 4 * ti) * Wo + col
                    scatter(dst, at, HW, v0, n_lanes)
                    if 4 * ti + 1 < Ho:
                        scatter(dst, at + Wo, HW, v1, n_lanes)
                    if 4 * ti + 2 < Ho:
                        scatter(dst, at + 2 * Wo, HW, v2, n_lanes)
                    if 4 * ti + 3 < Ho:
                        scatter(dst, at + 3 * Wo, HW, v3, n_lanes)


@_kernel
def _forward(V, w, flip, b, apply_relu, work, y, y2):
    # y: (N, K, Ho, Wo) = b + the products of the transformed inputs V (conv2d_winograd's
    # transformed_inputs) with w (or w flipped: conv2d_winograd._transform_filters); with
    # apply_relu max(y, 0); y2 the channels that follow y's. One task per 2 vectors of output
    # channels: its filters, products and outputs, in its thread's row of work (36*(C + T8 + 2)*KB
    # elements: a spare row per point in Ut and in Mt).
    N, C = y.shape[0], V.shape[1] - 1                   # V's spare row
    K, Ho, Wo = y.shape[1] + y2.shape[1], y.shape[2], y.shape[3]
    Cw = w.shape[1]
    L = lanes(V)
    TH, TW = (Ho + 3) // 4, (Wo + 3) // 4
    R = N * TH
    KB = 2 * L
    for kb in prange((K + KB - 1) // KB):
        k0 = kb * KB
        nk = min(K, k0 + KB) - k0
        mine = work[numba.get_thread_id()]
        Ut = mine[:36 * (C + 1) * KB].reshape((36, C + 1, KB))     # U^T
        if nk < KB:                                     # the lanes past nk: 0
            Ut[:, :, nk:] = 0
        if flip:   # output channel k of this convolution is w's input channel: w[c, k] turned
            _filter_block(w, k0 * 9 + 8, 9 * Cw, 9, -1, C, nk, Ut, 0, (C + 1) * KB, KB)
        else:      # w[k, c]
            _filter_block(w, k0 * Cw * 9, 9, 9 * Cw, 1, C, nk, Ut, 0, (C + 1) * KB, KB)
        T8 = (R * TW + 7) // 8 * 8
        Mt = mine[36 * (C + 1) * KB:36 * (C + T8 + 2) * KB].reshape((36, T8 + 1, KB))   # a spare row too
        _multiply(V, Ut, R * TW, TW, Mt)
        _output_transform(Mt, R * TW, b, apply_relu, k0, nk, TH, TW, y, y2)


def convolve(x, x2, mask, w, flip, b, relu, ph, pw, Ho, Wo, K1):
    """As conv2d_winograd.convolve."""
    N, C = x.shape[0], x.shape[1] + x2.shape[1]
    K = w.shape[1] if flip else w.shape[0]
    if K1 < K and K1 % (64 // x.itemsize):   # a vector of output channels would straddle y and y2: one output, then a copy
        y, _ = convolve(x, x2, mask, w, flip, b, relu, ph, pw, Ho, Wo, K)
        return np.ascontiguousarray(y[:, :K1]), np.ascontiguousarray(y[:, K1:])
    y, y2 = outputs(N, K, K1, Ho, Wo, x.dtype)
    b = np.zeros(K, x.dtype) if b is None else b
    R, TW, _ = _tiles(N, Ho, Wo, x.itemsize)
    T8 = (R * TW + 7) // 8 * 8                          # the real tiles, rounded up to 8
    work = thread_scratch(36 * (C + T8 + 2) * 2 * (64 // x.itemsize), x.dtype)   # Ut and Mt, KB = 2 vectors
    _forward(transformed_inputs(x, x2, mask, ph, pw, Ho, Wo), w, flip, b, relu, work, y, y2)
    return y, y2
