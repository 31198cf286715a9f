"""minunet.cpu.conv2d_winograd_weight: the weight gradient of a stride-1 3x3 convolution by Winograd's F(4x4, 3x3).

conv2d's version 4 of backward_weight on the CPU; conv2d_winograd.py teaches the algorithm and
runs the forward pass and the input gradient. The weight gradient is the correlation of every
6x6 input tile x_t with the 4x4 output-gradient tile gy_t at the same place, summed over the
tiles: F(3x3, 4x4) on the same six points, with gy in the filter's role,

    gw[k, c] = G^T [ sum_t (A gy_t A^T) * (B^T x_t B) ] G

so per point p one product (K, T) @ (T, C) summed over the tiles T (the inputs transformed as
in the forward pass, then transposed so that channels run along the vectors), and one inverse
transform G^T . G per (k, c) at the end.

The work splits as the forward's (conv2d_winograd.py, "the kernels"): by tiles, each thread
summing its blocks of tile rows into a (36, K, C) part of its own, the parts added at the end;
or by channels, every tile transformed first, then one task per block of output channels.
"""
import math

import numba
import numpy as np
from numba import prange

from minunet.cpu.conv2d_winograd import (_KB, _blocking, _by_channels, _input_rows, _row, _SIXTH, _24TH, _store8,
                                         _tile_inputs, _tiles)
from minunet.cpu.runtime import empty, fma_helper as _helper, fma_kernel as _kernel, scratch, thread_scratch
from minunet.cpu.simd import (broadcast, fma, hsum, lanes, load, load_every4, relu_mask, scatter, store,
                              store_range, transpose, zeros)

_SMALL_PLANE, _WIDE_PLANE, _MANY_CHANNELS = 8, 16, 256   # split by channels on these planes, ...
_FEW_TILES = 64                                          # ... and batches of so few tiles (conv2d_backward_weight)


@_helper
def _a(h0, h1, h2, h3):
    """A h: an output gradient's 4 values at the six points (the transform of gy in
    backward_weight, where gy plays the filter of F(3, 4))"""
    e, o = h0 + h2, h1 + h3
    e4, o4 = h0 + 4.0 * h2, 2.0 * h1 + 8.0 * h3
    return (h0, e + o, e - o, e4 + o4, e4 - o4, h3)


@_helper
def _gt(m0, m1, m2, m3, m4, m5):
    """G^T m, back from the six points to a 3-tap weight gradient"""
    a, b = m1 + m2, m1 - m2
    c, d = m3 + m4, m3 - m4
    return (0.25 * m0 - _SIXTH * a + _24TH * c, _SIXTH * (d * 0.5 - b), _SIXTH * (c - a) + m5)


@_helper
def _input_transform_t(xs, nt, c0, c1, VT):
    # xs: (C, 6, Wx) -> VT: (36, TBv, Cv), V transposed: VT[p, t, c] = (B^T d B)[p] of tile t of
    # channel c for c0 <= c < c1 (c0 a multiple of the lanes), and 0 for C <= c < Cv. Each vector
    # of channels is transformed into `blk` as (36, channel, tile) and transposed into place.
    C, Cv, TBv = xs.shape[0], VT.shape[2], VT.shape[1]
    L = lanes(xs)
    blk = np.empty(36 * L * L, xs.dtype)
    z = zeros(xs)
    for t0 in range(0, nt, L):
        for cg in range(c0, min(c1, Cv), L):
            for cc in range(L):
                if cg + cc < C:
                    _tile_inputs(xs, cg + cc, t0, blk, cc * L, L * L)
                else:
                    for p in range(36):
                        store(blk, (p * L + cc) * L, z)
            for p in range(36):
                transpose(blk, p * L * L, L, VT, (p * TBv + t0) * Cv + cg, Cv)


@_helper
def _gradient_rows(gy, mask, r0, nr, TH, S, k0, k1, gs):
    # gs[k, i, lr*S + q] = gy[n, k, 4*ti + i, q] for q < S (0 past gy's edges) and channels
    # k0 <= k < k1, where r0 + lr = n*TH + ti runs over nr tile rows; 0 from nr*S to the end.
    # With a mask (relu_y), gy where mask > 0, else 0: the ReLU's backward on the way in.
    K, H, W = gy.shape[1], gy.shape[2], gy.shape[3]
    Wg = gs.shape[2]
    L = lanes(gs)
    z = zeros(gs)
    for k in range(k0, k1):
        for lr in range(nr):
            n, ti = (r0 + lr) // TH, (r0 + lr) % TH
            for i in range(4):
                o, at = ((n * K + k) * H + 4 * ti + i) * W, (k * 4 + i) * Wg + lr * S   # flat places: no views
                for q in range(0, S, L):
                    v = _row(gy, o, 4 * ti + i, q, z)
                    if mask is not None:
                        v = relu_mask(v, _row(mask, o, 4 * ti + i, q, z))
                    store_range(gs, at + q, v, 0, S - q)
        for i in range(4):
            for q in range(nr * S, Wg, L):
                store_range(gs, (k * 4 + i) * Wg + q, z, 0, Wg - q)


@_helper
def _gradient_transform(gs, nt, k0, k1, G):
    # gs: (K, 4, Wx) -> G: (36, K, TBv), G[a*6+b, k, t] = (A g A^T)[a, b] of the output-gradient
    # tile g = gs[k, :, 4*t : 4*t+4], for k0 <= k < k1
    K, TBv = G.shape[1], G.shape[2]
    Wg = gs.shape[2]
    L = lanes(gs)
    tmp = np.empty(24 * L, gs.dtype)
    for k in range(k0, k1):
        for t0 in range(0, nt, L):
            for i in range(4):
                h0, h1, h2, h3 = load_every4(gs, (k * 4 + i) * Wg + 4 * t0)     # gs[k, i, 4*t0:], no view
                e0, e1, e2, e3, e4, e5 = _a(h0, h1, h2, h3)
                store(tmp, (6 * i) * L, e0)
                store(tmp, (6 * i + 1) * L, e1)
                store(tmp, (6 * i + 2) * L, e2)
                store(tmp, (6 * i + 3) * L, e3)
                store(tmp, (6 * i + 4) * L, e4)
                store(tmp, (6 * i + 5) * L, e5)
            o, step = k * TBv + t0, K * TBv
            for b in range(6):
                v0, v1, v2, v3, v4, v5 = _a(load(tmp, b * L), load(tmp, (6 + b) * L),
                                            load(tmp, (12 + b) * L), load(tmp, (18 + b) * L))
                store(G, o + b * step, v0)
                store(G, o + (6 + b) * step, v1)
                store(G, o + (12 + b) * step, v2)
                store(G, o + (18 + b) * step, v3)
                store(G, o + (24 + b) * step, v4)
                store(G, o + (30 + b) * step, v5)


@_helper
def _tile_sum(G, nt, k):
    """The sum of the values of every output-gradient tile t < nt of channel k (in float64): its
    share of the bias gradient, with no pass of its own over gy: A's second row is all ones, so
    point (1, 1) of A g A^T (p = 7) already is the tile's sum. Vector partial sums in G's dtype."""
    TBv = G.shape[2]
    L = lanes(G)
    s = zeros(G)
    for t0 in range(0, nt, L):
        s = s + load(G, (7 * G.shape[1] + k) * TBv + t0)
    return np.float64(hsum(s))


@_helper
def _multiply_transposed(G, k0, nk, VT, nr, TW, add, acc):
    # acc[p, kk*Cv + c] (+)= sum_t G[p, k0 + kk, t] * VT[p, t, c] over the real tiles t of nr tile rows:
    # t = lr*(TW + 1) + j, j < TW. The sum runs along t one tile at a time (the vectors lie
    # along c), so it skips the dummy tiles and the vector padding past the last tile, which
    # the transforms computed as zeros: at 8x8 (2 tiles a row, 3 slots) and in blocks of a few
    # tile rows these are as many again as the real tiles. Micro-kernel: 8 output channels x 2
    # vectors of input channels, 16 accumulators in registers along the sum over t, each step
    # 2 loads of VT, 8 broadcasts of G and 16 fused multiply-adds. With add, the sums are added to
    # acc; without, they replace what it holds (a single pass over every tile: no zeroing of acc
    # beforehand, no load of it after). acc: (36, P), each point's row P >= nk*Cv long (the
    # places past nk*Cv, a spare vector, not written: see conv2d_backward_weight).
    K, TBv = G.shape[1], G.shape[2]
    Cv, P = VT.shape[2], acc.shape[1]
    L = lanes(VT)
    S = TW + 1
    z = zeros(VT)
    for p in range(36):
        kk = 0
        while Cv == L and nk - kk >= 16:                # one vector of input channels: 16 output channels
            _multiply16(G, (p * K + k0 + kk) * TBv, VT, p * TBv * Cv, nr, TW, add, acc, p * P + kk * Cv)
            kk += 16
        while kk < nk:
            rows = min(8, nk - kk)                      # 8 output channels, or the last few
            g = (p * K + k0 + kk) * TBv                 # G's row k0 + kk of point p
            for c in range(0, Cv, 2 * L):
                two = c + L < Cv
                a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = z
                b0 = b1 = b2 = b3 = b4 = b5 = b6 = b7 = z
                i = p * TBv * Cv + c
                if rows == 8:
                    for lr in range(nr):
                        for t in range(lr * S, lr * S + TW):
                            x0 = load(VT, i + t * Cv)
                            x1 = load(VT, i + t * Cv + L) if two else z
                            s = broadcast(G, g + t)
                            a0, b0 = fma(s, x0, a0), fma(s, x1, b0)
                            s = broadcast(G, g + 1 * TBv + t)
                            a1, b1 = fma(s, x0, a1), fma(s, x1, b1)
                            s = broadcast(G, g + 2 * TBv + t)
                            a2, b2 = fma(s, x0, a2), fma(s, x1, b2)
                            s = broadcast(G, g + 3 * TBv + t)
                            a3, b3 = fma(s, x0, a3), fma(s, x1, b3)
                            s = broadcast(G, g + 4 * TBv + t)
                            a4, b4 = fma(s, x0, a4), fma(s, x1, b4)
                            s = broadcast(G, g + 5 * TBv + t)
                            a5, b5 = fma(s, x0, a5), fma(s, x1, b5)
                            s = broadcast(G, g + 6 * TBv + t)
                            a6, b6 = fma(s, x0, a6), fma(s, x1, b6)
                            s = broadcast(G, g + 7 * TBv + t)
                            a7, b7 = fma(s, x0, a7), fma(s, x1, b7)
                    o = p * P + kk * Cv + c
                    _put8(acc, o, Cv, add, a0, a1, a2, a3, a4, a5, a6, a7)
                    if two:
                        _put8(acc, o + L, Cv, add, b0, b1, b2, b3, b4, b5, b6, b7)
                else:
                    for r in range(rows):
                        a0 = b0 = z
                        for lr in range(nr):
                            for t in range(lr * S, lr * S + TW):
                                s = broadcast(G, g + r * TBv + t)
                                a0 = fma(s, load(VT, i + t * Cv), a0)
                                if two:
                                    b0 = fma(s, load(VT, i + t * Cv + L), b0)
                        o = p * P + (kk + r) * Cv + c
                        store(acc, o, load(acc, o) + a0 if add else a0)
                        if two:
                            store(acc, o + L, load(acc, o + L) + b0 if add else b0)
            kk += rows


@_helper
def _multiply16(G, g, VT, i, nr, TW, add, acc, o):
    # acc[o + r*L : o + r*L + L] (+)= sum_t G[g + r*T + t] * VT[i + t*L : i + t*L + L], r < 16 (T = G's
    # rows: G[g + r*T] is row r of a block of G's rows of one point), over the real
    # tiles t of nr tile rows: _multiply_transposed's micro-kernel where the input channels are
    # one vector (C <= L: the top of a U-Net), which there would leave half its accumulators
    # idle; here 16 output channels x 1 vector, each step 1 load of VT, 16 broadcasts of g and
    # 16 fused multiply-adds.
    L = lanes(VT)
    S = TW + 1
    T = G.shape[2]
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = zeros(VT)
    a8 = a9 = a10 = a11 = a12 = a13 = a14 = a15 = zeros(VT)
    for lr in range(nr):
        for t in range(lr * S, lr * S + TW):
            x = load(VT, i + t * L)
            a0, a1 = fma(broadcast(G, g + t), x, a0), fma(broadcast(G, g + 1 * T + t), x, a1)
            a2, a3 = fma(broadcast(G, g + 2 * T + t), x, a2), fma(broadcast(G, g + 3 * T + t), x, a3)
            a4, a5 = fma(broadcast(G, g + 4 * T + t), x, a4), fma(broadcast(G, g + 5 * T + t), x, a5)
            a6, a7 = fma(broadcast(G, g + 6 * T + t), x, a6), fma(broadcast(G, g + 7 * T + t), x, a7)
            a8, a9 = fma(broadcast(G, g + 8 * T + t), x, a8), fma(broadcast(G, g + 9 * T + t), x, a9)
            a10, a11 = fma(broadcast(G, g + 10 * T + t), x, a10), fma(broadcast(G, g + 11 * T + t), x, a11)
            a12, a13 = fma(broadcast(G, g + 12 * T + t), x, a12), fma(broadcast(G, g + 13 * T + t), x, a13)
            a14, a15 = fma(broadcast(G, g + 14 * T + t), x, a14), fma(broadcast(G, g + 15 * T + t), x, a15)
    _put8(acc, o, L, add, a0, a1, a2, a3, a4, a5, a6, a7)
    _put8(acc, o + 8 * L, L, add, a8, a9, a10, a11, a12, a13, a14, a15)


@_helper
def _put8(a, o, step, add, v0, v1, v2, v3, v4, v5, v6, v7):
    """a's vectors at flat places o, o + step, ..., o + 7*step: plus v0, ..., v7 with add, else
    replaced by them"""
    if add:
        v0, v1, v2, v3 = load(a, o) + v0, load(a, o + step) + v1, load(a, o + 2 * step) + v2, load(a, o + 3 * step) + v3
        v4, v5 = load(a, o + 4 * step) + v4, load(a, o + 5 * step) + v5
        v6, v7 = load(a, o + 6 * step) + v6, load(a, o + 7 * step) + v7
    _store8(a, o, step, v0, v1, v2, v3, v4, v5, v6, v7)


@_helper
def _filter_gradients(m, o, step, gw, k, c0):
    # gw[k, c0 + j] = G^T M G for the lanes j of one vector of input channels (those past gw's
    # last channel are dropped), M[a, b] the vector at m's flat place o + (a*6 + b)*step
    C = gw.shape[1]
    rows = (_gt(load(m, o), load(m, o + step), load(m, o + 2 * step), load(m, o + 3 * step),  # along each row
                load(m, o + 4 * step), load(m, o + 5 * step)),
            _gt(load(m, o + 6 * step), load(m, o + 7 * step), load(m, o + 8 * step), load(m, o + 9 * step),
                load(m, o + 10 * step), load(m, o + 11 * step)),
            _gt(load(m, o + 12 * step), load(m, o + 13 * step), load(m, o + 14 * step), load(m, o + 15 * step),
                load(m, o + 16 * step), load(m, o + 17 * step)),
            _gt(load(m, o + 18 * step), load(m, o + 19 * step), load(m, o + 20 * step), load(m, o + 21 * step),
                load(m, o + 22 * step), load(m, o + 23 * step)),
            _gt(load(m, o + 24 * step), load(m, o + 25 * step), load(m, o + 26 * step), load(m, o + 27 * step),
                load(m, o + 28 * step), load(m, o + 29 * step)),
            _gt(load(m, o + 30 * step), load(m, o + 31 * step), load(m, o + 32 * step), load(m, o + 33 * step),
                load(m, o + 34 * step), load(m, o + 35 * step)))
    r0, r1, r2, r3, r4, r5 = rows
    at = (k * C + c0) * 9
    for v in range(3):                                           # then down each column
        g0, g1, g2 = _gt(r0[v], r1[v], r2[v], r3[v], r4[v], r5[v])
        scatter(gw, at + v, 9, g0, C - c0)                       # gw[k, c, 0, v] for the channels c
        scatter(gw, at + 3 + v, 9, g1, C - c0)
        scatter(gw, at + 6 + v, 9, g2, C - c0)


@_kernel
def _backward_weight_by_tiles(x, x2, gy, mask, ph, pw, rows_per_block, work, part, gb_part):
    # part[th, p, k*Cv + c] = thread th's share of sum_t (A gy_t A^T)[p] * (B^T x_t B)[p], and
    # gb_part[th, k] its share of gy's sum (gy masked by relu_y, see _gradient_rows): one prange
    # iteration per thread, over every threads-th block of tile rows, in its row of work
    # (_buffers); x2: the input channels that follow x's (conv2d_winograd._input_rows)
    N, C = x.shape[0], x.shape[1] + x2.shape[1]
    K, Ho, Wo = gy.shape[1], gy.shape[2], gy.shape[3]
    n_parts = part.shape[0]
    L = lanes(x)
    Cv = (C + L - 1) // L * L
    TH, TW = (Ho + 3) // 4, (Wo + 3) // 4
    R = N * TH
    n_blocks = (R + rows_per_block - 1) // rows_per_block
    TBv = (rows_per_block * (TW + 1) + L - 1) // L * L
    for th in prange(n_parts):
        acc = part[th]
        acc[:] = 0
        gb_part[th] = 0
        xs, VT, gs, G = _carve(work[th], C, K, TBv, Cv)
        for blk in range(th, n_blocks, n_parts):
            r0 = blk * rows_per_block
            nr = min(R, r0 + rows_per_block) - r0
            nt = nr * (TW + 1)
            _input_rows(x, x2, None, r0, nr, TH, 4 * (TW + 1), ph, pw, 0, C, xs)
            _input_transform_t(xs, nt, 0, Cv, VT)
            _gradient_rows(gy, mask, r0, nr, TH, 4 * (TW + 1), 0, K, gs)
            _gradient_transform(gs, nt, 0, K, G)
            for k in range(K):
                gb_part[th, k] += _tile_sum(G, nt, k)
            _multiply_transposed(G, 0, K, VT, nr, TW, True, acc)


@_kernel
def _filters_from_parts(part, gb_part, gw, gb):
    # gw[k, c] = G^T M G, M (6x6) the sum over part's first axis of part[:, :, k*Cv + c], and gb[k]
    # the sum of gb_part[:, k]; one prange iteration per output channel k, vectors over c
    n_parts, P = part.shape[0], part.shape[2]
    K = gw.shape[0]
    L = lanes(part)
    Cv = (gw.shape[1] + L - 1) // L * L
    for k in prange(K):
        gb[k] = gb_part[:, k].sum()
        m = np.empty(36 * L, part.dtype)
        for c0 in range(0, Cv, L):
            for p in range(36):
                s = load(part, p * P + k * Cv + c0)
                for th in range(1, n_parts):
                    s = s + load(part, (th * 36 + p) * P + k * Cv + c0)
                store(m, p * L, s)
            _filter_gradients(m, 0, L, gw, k, c0)


@_helper
def _carve(buf, C, K, TBv, Cv):
    """(xs, VT, gs, G) over buf's start (see _buffers)"""
    n_xs, n_vt, n_gs = C * 6 * (4 * TBv + 4), 36 * TBv * Cv, K * 4 * (4 * TBv + 4)
    return (buf[:n_xs].reshape((C, 6, 4 * TBv + 4)), buf[n_xs:n_xs + n_vt].reshape((36, TBv, Cv)),
            buf[n_xs + n_vt:n_xs + n_vt + n_gs].reshape((K, 4, 4 * TBv + 4)),
            buf[n_xs + n_vt + n_gs:n_xs + n_vt + n_gs + 36 * K * TBv].reshape((36, K, TBv)))


@_kernel
def _backward_weight_by_channels(x, x2, gy, mask, ph, pw, KB, work, sums, gw, gb):
    # gw: (K, C, 3, 3) and gb: (K,), every tile at once: the transforms of x and of gy (masked
    # by relu_y, see _gradient_rows; gb on the way) into work (_buffers) split over channels, then
    # one prange iteration per block of KB output channels, from the products (summed in its
    # thread's row of sums) to gw; x2 as in _backward_weight_by_tiles
    N, C = x.shape[0], x.shape[1] + x2.shape[1]
    K, Ho, Wo = gy.shape[1], gy.shape[2], gy.shape[3]
    L = lanes(x)
    TH, TW = (Ho + 3) // 4, (Wo + 3) // 4
    R = N * TH
    nt = R * (TW + 1)
    TBv = (nt + L - 1) // L * L
    Cv = (C + L - 1) // L * L
    xs, VT, gs, G = _carve(work, C, K, TBv, Cv)
    # two loops, not one over both kinds of task: numba hands each thread an equal run of
    # iterations, and the first thread's run would hold every input vector, the heavier tasks
    # (1.1-1.2x as fast with two loops at 8x8 and 16x16, 128 to 256 channels)
    for cv in prange(Cv // L):                          # a vector of input channels
        c0, c1 = cv * L, min(C, cv * L + L)
        _input_rows(x, x2, None, 0, R, TH, 4 * (TW + 1), ph, pw, c0, c1, xs)
        _input_transform_t(xs, nt, c0, c0 + L, VT)
    for k in prange(K):                                 # an output channel
        _gradient_rows(gy, mask, 0, R, TH, 4 * (TW + 1), k, k + 1, gs)
        _gradient_transform(gs, nt, k, k + 1, G)
        gb[k] = _tile_sum(G, nt, k)
    for kb in prange((K + KB - 1) // KB):
        k0 = kb * KB
        nk = min(K, k0 + KB) - k0
        P = nk * Cv + L                                 # a spare vector per point (conv2d_backward_weight)
        acc = sums[numba.get_thread_id(), :36 * P].reshape((36, P))
        _multiply_transposed(G, k0, nk, VT, R, TW, False, acc)      # every tile in one pass
        for kk in range(nk):
            for c0 in range(0, Cv, L):
                _filter_gradients(acc, kk * Cv + c0, P, gw, k0 + kk, c0)


def _buffers(C, K, rows, TW, dtype, per_thread):
    """work, a row for each thread with per_thread (else one, shared by every thread), enough for the
    padded rows of x (C, 6, 4*TBv + 4) and of gy (K, 4, 4*TBv + 4) and their transforms VT
    (36, TBv, Cv) and G (36, K, TBv) (_carve) for TBv the tiles of `rows` tile rows rounded up to
    whole vectors; on huge pages (runtime.scratch)"""
    L = 64 // np.dtype(dtype).itemsize
    TBv, Cv = -(-rows * (TW + 1) // L) * L, -(-C // L) * L
    n = (C * 6 + K * 4) * (4 * TBv + 4) + 36 * TBv * (Cv + K)
    return thread_scratch(n, dtype) if per_thread else scratch((n,), dtype, 1)


def conv2d_backward_weight(x, x2, gy, w_shape, padding, relu_y):
    # x: (N, C, H, W), gy: (N, K, Ho, Wo), relu_y: gy's shape or None -> (gw: w_shape = (K, C, 3, 3),
    # gb: (K,)), both of gy where relu_y > 0 (else 0) with relu_y; the input is the concatenation
    # of x and x2 (N, C2, H, W) along channels (C2 = 0: x alone), read where they lie
    N, C, (K, Ho, Wo) = x.shape[0], x.shape[1] + x2.shape[1], gy.shape[1:]
    gw, gb = np.empty(w_shape, x.dtype), np.empty(K, x.dtype)
    R, TW, _ = _tiles(N, Ho, Wo, x.itemsize)
    rows, _ = _blocking(R, TW, C, K, x.itemsize)
    n_parts = min(numba.get_num_threads(), math.ceil(R / rows))
    L = 64 // x.itemsize
    Cv = -(-C // L) * L                                 # the input channels in whole vectors
    # by tiles, a thread sums whole blocks of tile rows: where there are fewer blocks than
    # threads (the 8x8 bottom of a U-Net), split by channels whatever the size; likewise on
    # planes 8 wide (1.9x as fast at 128 -> 256, batch 4 or 8), 16 wide with 256 channels in
    # and out (at 512 each thread's part would be 36 MB, twice the transformed tiles), and
    # for at most _FEW_TILES tiles (16x16, batch 4: 1.0-1.6x as fast; 0.8-0.98x at 128 tiles).
    #
    # The sums per point (sums' rows, part) end with a spare vector, never written: the inverse
    # transform reads a (k, c) pair's 36 points from 36 rows, and without the spare vector these
    # are nk*Cv floats apart, a multiple of 4 KB at nearly every U-Net shape (16 x 256: 16 KB),
    # so all 36 fall in one set of the L1 cache, which holds 12 (conv2d_winograd.py's V and M
    # have a spare row for the same reason).
    if (_by_channels(C + K, N, Ho, Wo, x.itemsize, rows) or n_parts < numba.get_num_threads()
            or Wo <= _SMALL_PLANE or (Wo <= _WIDE_PLANE and min(C, K) >= _MANY_CHANNELS)
            or R * TW <= _FEW_TILES):
        sums = thread_scratch(36 * (_KB * Cv + L), x.dtype)
        _backward_weight_by_channels(x, x2, gy, relu_y, padding[0], padding[1], _KB, _buffers(C, K, R, TW, x.dtype, False),
                                     sums, gw, gb)
        return gw, gb
    part, gb_part = empty((n_parts, 36, K * Cv + L), x.dtype), np.empty((n_parts, K))
    _backward_weight_by_tiles(x, x2, gy, relu_y, padding[0], padding[1], rows, _buffers(C, K, rows, TW, x.dtype, True),
                              part, gb_part)
    _filters_from_parts(part, gb_part, gw, gb)
    return gw, gb

