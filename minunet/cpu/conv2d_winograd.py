"""minunet.cpu.conv2d_winograd: stride-1 3x3 convolutions by Winograd's minimal filtering, F(4x4, 3x3).

conv2d's version 4 on the CPU (minunet.cpu.conv2d routes to it). A direct 3x3 convolution spends
9 multiply-adds per output pixel per (input, output) channel pair; Winograd's algorithm
(Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks", 2015) spends 36 per
4x4 tile of outputs, 2.25 per pixel: 4 times fewer, paid for with cheap linear transforms
of the inputs and outputs.

The 1-D idea, F(4, 3): four outputs y_i = sum_k g_k d_{i+k} of a 3-tap filter g over six
inputs d are the coefficients of a polynomial product, which can be recovered from its values
at six points (here 0, 1, -1, 2, -2 and infinity). So

    y = A^T [ (G g) * (B^T d) ]        (* lane by lane: 6 multiplies instead of 12)

with B^T (6x6) evaluating the input at the points, G (6x3) the filter, A^T (4x6)
interpolating back (the matrices are written out in `_bt`, `_g`, `_at` below). In 2-D the
transforms apply along both axes: a 6x6 input tile d and the 3x3 filter g give the 4x4
output tile Y = A^T [ (G g G^T) * (B^T d B) ] A. Summed over input channels c, the 36 lane-
wise products of one tile become 36 independent matrix products, one per transformed point p:

    M[p] (K, T) = U[p] (K, C) @ V[p] (C, T),    U[p] = (G w[k, c] G^T)[p], V[p] = (B^T d B)[p]

over the T tiles of the batch. So a convolution is: the weight transform (U, once per call),
the input transform (V), 36 matrix products (where nearly all the work is), and the output
transform (Y from M), plus the bias.

The two gradients are Winograd convolutions too:
  backward_input   gx = a stride-1 convolution of gy with w flipped in space and its channel
                   axes swapped, padded by 2 - p: the forward kernel with U of that filter.
  backward_weight  gw[k, c] = sum over tiles of the correlation of an input tile (6x6) with an
                   output-gradient tile (4x4), F(3x3, 4x4) with the same points:
                       gw = G^T [ sum_t (A gy_t A^T) * (B^T x_t B) ] G
                   i.e. per point p the product (K, T) @ (T, C) summed over tiles, and one
                   inverse transform per (k, c) at the end (conv2d_winograd_weight.py).

Accuracy: the points 0, +-1, +-2 keep the transforms' coefficients small (at most 8 in A^T,
5 in B^T), and float32 results stay within the 1e-4 relative tolerance of the oracle tests
(tests/test_kernels.py) at every U-Net shape measured (benchmarks/conv_vs_torch.py checks each
layer against the oracle at its timed shape). Weight transforms are computed in float64 and rounded once.

How the work is laid out (all float lanes run over tiles)
---------------------------------------------------------
The tiles of the batch are grouped by tile row, (image n, tile row ti), each of TW tiles;
one task takes a block of consecutive tile rows and a group of output channels, and does
everything for them in buffers of its own that stay in the core's cache:
  1. reads the 6 input rows each of its tile rows covers, the padding and the image border
     handled here, and applies the first half of the input transform, B^T down each column,
     as it copies them (on whole rows, where neighbouring tiles share 2 columns);
  2. the second half, along the rows: one SIMD vector holds one value of 16 (float32; 8 in
     float64) neighbouring tiles, their 6 columns loaded with stride-4 shuffles
     (simd.load_tiles6), so the whole transform is vector arithmetic, written V[p, c, t] with
     t contiguous;
  3. the 36 products M[p] = U[p] @ V[p], a register-blocked micro-kernel: 8 output channels
     x 2 vectors of tiles of accumulators stay in registers along the sum over c, each step
     8 broadcasts of U and 16 fused multiply-adds (`_multiply`);
  4. output transform and bias, written into y's rows with a stride-4 interleaving store that
     drops the columns past the image's edge (simd.store_every4).
A task's buffers are its thread's, reused from task to task and call to call, on huge pages
(runtime.thread_scratch): the transforms write 36 rows kilobytes apart at each step. Each
point's block of V and M ends with a spare row, never read: without it, the distance from
one point to the next is often a multiple of 4 KB (64 channels x 64 tiles of float32: 16 KB),
so a tile's 36 points all fall in one set of the L1 cache, which holds 12 lines of a set
(measured on 2 cores, forward and input gradient: 1.0 to 1.23 times as fast with the row).
Tasks split the tile rows into blocks of about _BLOCK_BYTES of V, and, where there are fewer
blocks than twice the threads (the small planes at the bottom of a U-Net), split the
output channels too (each such task transforms the inputs again: cheap next to its products).
On planes only a few tiles wide with many channels, minunet.cpu.conv2d runs the forward and
the input gradient in conv2d_winograd_small.py instead: the same transforms, with the vectors
of the products along the output channels, so that no lane is spent on a dummy tile.
"""
import math

import numba
import numpy as np
from numba import prange

from minunet.cpu.runtime import empty, fma_helper as _helper, fma_kernel as _kernel, scratch, thread_scratch
from minunet.cpu.simd import (fma, gather, lanes, load, load_range, load_tiles6, relu, relu_mask, splat, store,
                              store_every4, store_range, zeros)

_BLOCK_BYTES = 512 << 10   # transformed inputs per task: fits in one core's L2 with its products
_SIXTH, _24TH = 1.0 / 6.0, 1.0 / 24.0


# ---------------------------------------------------------------------------------------------
# the 1-D transforms of F(4, 3), points 0, 1, -1, 2, -2, infinity (scalars or SIMD vectors)
# ---------------------------------------------------------------------------------------------

@_helper
def _bt(d0, d1, d2, d3, d4, d5):
    """B^T d, the input at the six points:
        [4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
        [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]"""
    p, q = d4 - 4.0 * d2, d3 - 4.0 * d1
    r, s = d4 - d2, 2.0 * (d3 - d1)
    return (4.0 * d0 - 5.0 * d2 + d4, p + q, p - q, r + s, r - s, 4.0 * d1 - 5.0 * d3 + d5)


@_helper
def _g(g0, g1, g2):
    """G g, the filter at the six points:
        [1/4, 0, 0], [-1/6, -1/6, -1/6], [-1/6, 1/6, -1/6], [1/24, 1/12, 1/6], [1/24, -1/12, 1/6], [0, 0, 1]"""
    e, f = g0 + g2, 4.0 * g2 + g0
    return (0.25 * g0, -_SIXTH * (e + g1), -_SIXTH * (e - g1), _24TH * (f + 2.0 * g1), _24TH * (f - 2.0 * g1), g2)


@_helper
def _at(m0, m1, m2, m3, m4, m5):
    """A^T m, back from the six points to four outputs:
        [1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]"""
    a, b = m1 + m2, m1 - m2
    c, d = m3 + m4, m3 - m4
    return (m0 + a + c, b + 2.0 * d, a + 4.0 * c, b + 8.0 * d + m5)


# ---------------------------------------------------------------------------------------------
# the steps of a task
# ---------------------------------------------------------------------------------------------
# Tiles are numbered along the tile rows laid side by side, each row followed by one dummy tile:
# tile (lr, tj) of a run of tile rows is number t = lr*(TW + 1) + tj, and its input columns
# start at 4*t in `xs`, the run's input rows copied end to end in segments of S = 4*(TW + 1)
# columns. The dummy tile keeps a row's last tile, which reads 2 columns past 4*TW, out of the
# next row, and with it one run of vectors covers all the tiles whatever the plane's width (a
# row of 2 tiles on an 8x8 plane wastes no lanes). Dummy tiles are computed and never written out.

@_helper
def _transform_filter(g00, g01, g02, g10, g11, g12, g20, g21, g22):
    """G g G^T of the 3x3 filter g, as 36 values in row-major (a, b) order"""
    r0, r1, r2 = _g(g00, g01, g02), _g(g10, g11, g12), _g(g20, g21, g22)    # along each row
    c0, c1, c2 = _g(r0[0], r1[0], r2[0]), _g(r0[1], r1[1], r2[1]), _g(r0[2], r1[2], r2[2])
    c3, c4, c5 = _g(r0[3], r1[3], r2[3]), _g(r0[4], r1[4], r2[4]), _g(r0[5], r1[5], r2[5])
    return (c0[0], c1[0], c2[0], c3[0], c4[0], c5[0], c0[1], c1[1], c2[1], c3[1], c4[1], c5[1],
            c0[2], c1[2], c2[2], c3[2], c4[2], c5[2], c0[3], c1[3], c2[3], c3[3], c4[3], c5[3],
            c0[4], c1[4], c2[4], c3[4], c4[4], c5[4], c0[5], c1[5], c2[5], c3[5], c4[5], c5[5])


@_helper
def _transform_filters(w, flip, o0, no, U, u0, step_p):
    # U[u0 + p*step_p + oo*I + i] = (G f G^T)[p] of the filter f from input channel i < I to output
    # channel o0 + oo (oo < no) of this convolution: f = w[o, i] (K, C, 3, 3), or with flip,
    # f = w[i, o] turned 180 degrees (the filter of the input gradient), I = K then. Vectors run
    # over i.
    K, C = w.shape[0], w.shape[1]
    if flip:     # w[i, o] turned: tap q of f at (i*C + o)*9 + 8 - q
        _filter_block(w, o0 * 9 + 8, 9, 9 * C, -1, no, K, U, u0, step_p, K)
    else:        # w[o, i]: tap q at (o*C + i)*9 + q
        _filter_block(w, o0 * C * 9, 9 * C, 9, 1, no, C, U, u0, step_p, C)


@_helper
def _filter_block(w, base, step_a, step_j, tap, na, nj, U, u0, step_p, step_u):
    # U[u0 + p*step_p + a*step_u + j] = (G f G^T)[p] for a < na, j < nj, the filter f's tap q
    # (row-major 3x3) at w's flat place base + a*step_a + j*step_j + q*tap (tap = 1, or -1 for a
    # filter turned 180 degrees); vectors run over j, gathered from w (the last few j one at a
    # time). U's other places are not written.
    L = lanes(w)
    Uf = U.reshape(-1)
    for a in range(na):
        for j0 in range(0, nj - L + 1, L):
            b = base + a * step_a + j0 * step_j
            e = _transform_filter(gather(w, b, step_j), gather(w, b + tap, step_j), gather(w, b + 2 * tap, step_j),
                                  gather(w, b + 3 * tap, step_j), gather(w, b + 4 * tap, step_j),
                                  gather(w, b + 5 * tap, step_j), gather(w, b + 6 * tap, step_j),
                                  gather(w, b + 7 * tap, step_j), gather(w, b + 8 * tap, step_j))
            _store36(Uf, u0 + a * step_u + j0, step_p, e)
        for j in range(nj - nj % L, nj):                # the places past the last whole vector
            _filter_one(w, base + a * step_a + j * step_j, tap, Uf, u0 + a * step_u + j, step_p)


@_helper
def _filter_one(w, b, tap, Uf, o, step_p):
    """Uf[o + p*step_p] = (G f G^T)[p] of the one filter f whose tap q is at w's flat place b + q*tap,
    in float64, rounded once"""
    wf = w.reshape(-1)
    e = _transform_filter(np.float64(wf[b]), np.float64(wf[b + tap]), np.float64(wf[b + 2 * tap]),
                          np.float64(wf[b + 3 * tap]), np.float64(wf[b + 4 * tap]), np.float64(wf[b + 5 * tap]),
                          np.float64(wf[b + 6 * tap]), np.float64(wf[b + 7 * tap]), np.float64(wf[b + 8 * tap]))
    for p in range(36):
        Uf[o + p * step_p] = e[p]


@_helper
def _store36(a, o, step, e):
    """store the 36 vectors e at a's flat places o, o + step, ..., o + 35*step"""
    for b in range(6):
        v0, v1, v2, v3, v4, v5 = e[b], e[6 + b], e[12 + b], e[18 + b], e[24 + b], e[30 + b]
        store(a, o + b * step, v0)
        store(a, o + (6 + b) * step, v1)
        store(a, o + (12 + b) * step, v2)
        store(a, o + (18 + b) * step, v3)
        store(a, o + (24 + b) * step, v4)
        store(a, o + (30 + b) * step, v5)


@_helper
def _row(x, o, h, j, z):
    """x's row h, its first column at x's flat place o, from column j: one vector, 0 in the
    places outside x. Flat places, not views: a view of x costs numba a reference count, twice,
    and here that would be twice per vector."""
    H, W = x.shape[2], x.shape[3]
    if h < 0 or h >= H:
        return z
    return load_range(x, o + j, -j, W - j)


@_helper
def _column(x, mask, o, h, j, z):
    """_row of the six rows h, ..., h + 5; with a mask (the output of the ReLU fused into the
    convolution that made x = gy), x where mask > 0, else 0: the ReLU's backward on the way in
    (numba compiles the mask=None case without the test)"""
    W = x.shape[3]
    d0, d1, d2 = _row(x, o, h, j, z), _row(x, o + W, h + 1, j, z), _row(x, o + 2 * W, h + 2, j, z)
    d3, d4, d5 = _row(x, o + 3 * W, h + 3, j, z), _row(x, o + 4 * W, h + 4, j, z), _row(x, o + 5 * W, h + 5, j, z)
    if mask is None:
        return d0, d1, d2, d3, d4, d5
    return (relu_mask(d0, _row(mask, o, h, j, z)), relu_mask(d1, _row(mask, o + W, h + 1, j, z)),
            relu_mask(d2, _row(mask, o + 2 * W, h + 2, j, z)), relu_mask(d3, _row(mask, o + 3 * W, h + 3, j, z)),
            relu_mask(d4, _row(mask, o + 4 * W, h + 4, j, z)), relu_mask(d5, _row(mask, o + 5 * W, h + 5, j, z)))


@_helper
def _part(a, a2, c):
    """(array, its channel, its channels) that hold channel c of a and a2 concatenated along
    channels: a list input or output read or written where it lies (free concatenation)"""
    if c < a.shape[1]:
        return a, c, a.shape[1]
    return a2, c - a.shape[1], a2.shape[1]


@_helper
def _input_rows(x, x2, mask, r0, nr, TH, S, top, left, c0, c1, xs):
    # The input transform's first half, down the columns, on the way in: xs[c, a, lr*S + q] =
    # (B^T d)[a], d the column of six input rows d_i = x[n, c, 4*ti - top + i, q - left] (0
    # outside x, masked as _column), for q < S and channels c0 <= c < c1, where r0 + lr =
    # n*TH + ti runs over nr tile rows; 0 from nr*S to the end. Done here on whole columns, it
    # costs 4 vectors of B^T per vector of tiles, where done per tile (after the pass along the
    # rows) it would cost 6: neighbouring tiles overlap by 2 columns.
    # The input is the concatenation of x and x2 along channels, read where they lie: channel
    # c >= C1 (x's channels) is x2's channel c - C1 (free concatenation; x2 has no channels for
    # a single input, and always none with a mask).
    H, W = x.shape[2], x.shape[3]
    Wx = xs.shape[2]
    L = lanes(xs)
    z = zeros(xs)
    for c in range(c0, c1):
        out = c * 6 * Wx                                # xs[c, 0, 0]
        src, cs, Cs = _part(x, x2, c)
        for lr in range(nr):
            n, ti = (r0 + lr) // TH, (r0 + lr) % TH
            h, base = 4 * ti - top, lr * S
            o = ((n * Cs + cs) * H + h) * W             # src[n, cs, h, 0]
            for q in range(0, S, L):
                j = q - left                            # x's column under lane 0
                d0, d1, d2, d3, d4, d5 = _column(src, mask, o, h, j, z)
                e0, e1, e2, e3, e4, e5 = _bt(d0, d1, d2, d3, d4, d5)
                at = out + base + q
                store_range(xs, at, e0, 0, S - q)
                store_range(xs, at + Wx, e1, 0, S - q)
                store_range(xs, at + 2 * Wx, e2, 0, S - q)
                store_range(xs, at + 3 * Wx, e3, 0, S - q)
                store_range(xs, at + 4 * Wx, e4, 0, S - q)
                store_range(xs, at + 5 * Wx, e5, 0, S - q)
        for q in range(out + nr * S, out + Wx, L):     # the tails of the six rows
            for a in range(6):
                store_range(xs, q + a * Wx, z, 0, out + Wx - q)


@_helper
def _tile_inputs(xs, c, t0, out, o, step):
    # (B^T d B)[a, b] of the L tiles t0 <= t < t0 + L, the second half of the input transform,
    # along the rows of xs[c] (_input_rows: B^T d already), one vector per point, stored at
    # out's flat places o + (a*6 + b)*step
    Wx = xs.shape[2]
    for a in range(6):
        d0, d1, d2, d3, d4, d5 = load_tiles6(xs, (c * 6 + a) * Wx + 4 * t0)
        e0, e1, e2, e3, e4, e5 = _bt(d0, d1, d2, d3, d4, d5)
        store(out, o + (6 * a) * step, e0)
        store(out, o + (6 * a + 1) * step, e1)
        store(out, o + (6 * a + 2) * step, e2)
        store(out, o + (6 * a + 3) * step, e3)
        store(out, o + (6 * a + 4) * step, e4)
        store(out, o + (6 * a + 5) * step, e5)


@_helper
def _input_transform(xs, nt, c0, c1, V):
    # xs: (C, 6, Wx) (_input_rows) -> V: (36, C + 1, TBv), V[p, c, t] = (B^T d B)[p] of tile t of
    # channel c, for c0 <= c < c1 and t < nt rounded up to whole vectors (row C: the spare)
    C, TBv = V.shape[1], V.shape[2]
    L = lanes(xs)
    for c in range(c0, c1):
        for t0 in range(0, nt, L):
            _tile_inputs(xs, c, t0, V, c * TBv + t0, C * TBv)


@_helper
def _multiply(U, V, Mt):
    # Mt[p, k, t] = sum_c U[p, k, c] * V[p, c, t] for U: (36, nk, C); V and Mt have a spare row
    # per point, (36, C + 1, TBv) and (36, nk + 1, TBv). Micro-kernel: 8 output channels x 2
    # vectors of tiles, 16 accumulators in registers along the sum over c, each step 2 loads of
    # V, 8 broadcasts of U and 16 fused multiply-adds.
    nk, C, TBv = U.shape[1], U.shape[2], V.shape[2]
    CP, KP = V.shape[1], Mt.shape[1]                   # rows per point, spares included
    L = lanes(V)
    z = zeros(V)
    for p in range(36):
        kk = 0
        while kk + 8 <= nk:
            u = U[p, kk:kk + 8]
            for t in range(0, TBv, 2 * L):
                two = t + L < TBv                       # the last step may have one vector only
                a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = z
                b0 = b1 = b2 = b3 = b4 = b5 = b6 = b7 = z
                i = p * CP * TBv + t
                for c in range(C):
                    x0 = load(V, i + c * TBv)
                    x1 = load(V, i + c * TBv + L) if two else z
                    s = splat(u[0, c], z)
                    a0, b0 = fma(s, x0, a0), fma(s, x1, b0)
                    s = splat(u[1, c], z)
                    a1, b1 = fma(s, x0, a1), fma(s, x1, b1)
                    s = splat(u[2, c], z)
                    a2, b2 = fma(s, x0, a2), fma(s, x1, b2)
                    s = splat(u[3, c], z)
                    a3, b3 = fma(s, x0, a3), fma(s, x1, b3)
                    s = splat(u[4, c], z)
                    a4, b4 = fma(s, x0, a4), fma(s, x1, b4)
                    s = splat(u[5, c], z)
                    a5, b5 = fma(s, x0, a5), fma(s, x1, b5)
                    s = splat(u[6, c], z)
                    a6, b6 = fma(s, x0, a6), fma(s, x1, b6)
                    s = splat(u[7, c], z)
                    a7, b7 = fma(s, x0, a7), fma(s, x1, b7)
                o = (p * KP + kk) * TBv + t
                _store8(Mt, o, TBv, a0, a1, a2, a3, a4, a5, a6, a7)
                if two:
                    _store8(Mt, o + L, TBv, b0, b1, b2, b3, b4, b5, b6, b7)
            kk += 8
        for k in range(kk, nk):                         # the output channels past the last 8
            u0 = U[p, k]
            for t in range(0, TBv, L):
                a0 = z
                for c in range(C):
                    a0 = fma(splat(u0[c], z), load(V, (p * CP + c) * TBv + t), a0)
                store(Mt, (p * KP + k) * TBv + t, a0)


@_helper
def _store8(a, o, step, v0, v1, v2, v3, v4, v5, v6, v7):
    store(a, o, v0)
    store(a, o + step, v1)
    store(a, o + 2 * step, v2)
    store(a, o + 3 * step, v3)
    store(a, o + 4 * step, v4)
    store(a, o + 5 * step, v5)
    store(a, o + 6 * step, v6)
    store(a, o + 7 * step, v7)


@_helper
def _rows_at(Mt, o, P, tmp):
    # the first half of the output transform, A^T along each row: tmp[(4a + c)*L + lane] =
    # (A^T m_a)[c] for the 6 rows a, m_a's 6 points (a, b) the vectors at Mt's flat places
    # o + (6a + b)*P
    L = lanes(Mt)
    for a in range(6):
        q0, q1, q2, q3 = _at(load(Mt, o), load(Mt, o + P), load(Mt, o + 2 * P),
                             load(Mt, o + 3 * P), load(Mt, o + 4 * P), load(Mt, o + 5 * P))
        store(tmp, (4 * a) * L, q0)
        store(tmp, (4 * a + 1) * L, q1)
        store(tmp, (4 * a + 2) * L, q2)
        store(tmp, (4 * a + 3) * L, q3)
        o += 6 * P


@_helper
def _output_transform(Mt, nk, b, apply_relu, k0, r0, nr, TH, TW, y, y2):
    # y[n, k0+kk, 4*ti + i, 4*tj + j] = (A^T M A)[i, j] + b[k0+kk] for kk < nk (Mt: (36, nk + 1, TBv),
    # the last row of each point a spare), M[a, b'] = Mt[a*6+b', kk, t] for
    # the tiles t = lr*(TW+1) + tj of tile rows r0 + lr (with apply_relu, max of that and 0: the bias and
    # the ReLU in the registers, before the one store); places past y's edge are not written.
    # The output is the concatenation of y and y2 along channels: channel k >= K1 (y's channels)
    # goes to y2's channel k - K1 (the input gradient of a convolution of two inputs).
    TBv = Mt.shape[2]
    Ho, Wo = y.shape[2], y.shape[3]
    L = lanes(Mt)
    T1 = TW + 1
    nt = nr * T1
    P = Mt.shape[1] * TBv                               # from one point to the next in Mt
    tmp = np.empty(24 * L, Mt.dtype)
    for kk in range(nk):
        bias = splat(b[k0 + kk], zeros(Mt))
        dst, kd, Kd = _part(y, y2, k0 + kk)
        for t0 in range(0, nt, L):
            o = kk * TBv + t0
            _rows_at(Mt, o, P, tmp)                     # along each row: A^T over the columns
            v0 = _at(load(tmp, 0), load(tmp, 4 * L), load(tmp, 8 * L),                # then down each column
                     load(tmp, 12 * L), load(tmp, 16 * L), load(tmp, 20 * L))
            v1 = _at(load(tmp, L), load(tmp, 5 * L), load(tmp, 9 * L),
                     load(tmp, 13 * L), load(tmp, 17 * L), load(tmp, 21 * L))
            v2 = _at(load(tmp, 2 * L), load(tmp, 6 * L), load(tmp, 10 * L),
                     load(tmp, 14 * L), load(tmp, 18 * L), load(tmp, 22 * L))
            v3 = _at(load(tmp, 3 * L), load(tmp, 7 * L), load(tmp, 11 * L),
                     load(tmp, 15 * L), load(tmp, 19 * L), load(tmp, 23 * L))
            if apply_relu:
                v0 = (relu(v0[0] + bias), relu(v0[1] + bias), relu(v0[2] + bias), relu(v0[3] + bias))
                v1 = (relu(v1[0] + bias), relu(v1[1] + bias), relu(v1[2] + bias), relu(v1[3] + bias))
                v2 = (relu(v2[0] + bias), relu(v2[1] + bias), relu(v2[2] + bias), relu(v2[3] + bias))
                v3 = (relu(v3[0] + bias), relu(v3[1] + bias), relu(v3[2] + bias), relu(v3[3] + bias))
            else:
                v0 = (v0[0] + bias, v0[1] + bias, v0[2] + bias, v0[3] + bias)
                v1 = (v1[0] + bias, v1[1] + bias, v1[2] + bias, v1[3] + bias)
                v2 = (v2[0] + bias, v2[1] + bias, v2[2] + bias, v2[3] + bias)
                v3 = (v3[0] + bias, v3[1] + bias, v3[2] + bias, v3[3] + bias)
            for lr in range(t0 // T1, min(nr, (t0 + L - 1) // T1 + 1)):   # the tile rows in the vector
                n, ti = (r0 + lr) // TH, (r0 + lr) % TH
                start = lr * T1 - t0                    # the lane of tile (lr, 0), maybe < 0
                lo, hi = max(0, start), min(L, start + TW)
                row = ((n * Kd + kd) * Ho + 4 * ti) * Wo   # dst[n, kd, 4*ti, 0], a flat place: no view
                for i in range(4):
                    if 4 * ti + i < Ho and lo < hi:     # lane l -> columns 4*(l - start) + j
                        store_every4(dst, row + i * Wo - 4 * start, v0[i], v1[i], v2[i], v3[i], 4 * lo,
                                     min(4 * hi, Wo + 4 * start))


# ---------------------------------------------------------------------------------------------
# the kernels
# ---------------------------------------------------------------------------------------------
# Two ways to share the work between threads, by the number of tiles:
#   by tiles     (large planes, few channels) one prange iteration per block of tile rows (and
#                group of output channels): its own transforms, products and output, all in
#                its core's cache; the filters are transformed once, beforehand.
#   by channels  (small planes, many channels: too few tiles for a block per thread) first every
#                input transformed, shared, split over input channels; then one prange iteration
#                per block of output channels, which transforms its own filters, multiplies and
#                writes its outputs. Its transformed filters never leave its cache: at 8x8 they
#                are 4 times the filters, some megabytes.

@_kernel
def _transform_all_filters(w, flip, U):
    # U: (36, O, I) transformed filters of every output channel, as _transform_filters, written
    # in place; one prange iteration per vector of output channels
    O, I = U.shape[1], U.shape[2]
    L = lanes(w)
    for ob in prange((O + L - 1) // L):
        o0 = ob * L
        _transform_filters(w, flip, o0, min(L, O - o0), U, o0 * I, O * I)


@_helper
def _task(t, rows_per_block, R, groups, K):
    """(first tile row, tile rows, first output channel, output channels) of task t"""
    blk, g = t // groups, t % groups
    r0 = blk * rows_per_block
    Kg = (K + groups - 1) // groups
    k0 = min(K, g * Kg)
    return r0, min(R, r0 + rows_per_block) - r0, k0, min(K, k0 + Kg) - k0


@_kernel
def _forward_by_tiles(x, x2, mask, U, b, apply_relu, ph, pw, rows_per_block, groups, work, y, y2):
    # y: (N, K, Ho, Wo) = b + the convolution of x: (N, C, H, W) (masked, see _column), padded
    # by (ph, pw), by the transformed filters U: (36, K, C); with apply_relu, max(y, 0). A task's
    # buffers are its thread's row of work (_task_buffers). x2 and y2: the channels that follow
    # x's and y's (see _input_rows and _output_transform).
    N, C = x.shape[0], x.shape[1] + x2.shape[1]
    K, Ho, Wo = y.shape[1] + y2.shape[1], y.shape[2], y.shape[3]
    L = lanes(x)
    TH, TW = (Ho + 3) // 4, (Wo + 3) // 4
    R = N * TH
    for task in prange((R + rows_per_block - 1) // rows_per_block * groups):
        r0, nr, k0, nk = _task(task, rows_per_block, R, groups, K)
        if nk > 0:
            nt = nr * (TW + 1)
            TBv = (nt + L - 1) // L * L
            mine = work[numba.get_thread_id()]
            n_xs, n_v = C * 6 * (4 * TBv + 4), 36 * (C + 1) * TBv
            xs = mine[:n_xs].reshape((C, 6, 4 * TBv + 4))
            V = mine[n_xs:n_xs + n_v].reshape((36, C + 1, TBv))                  # a spare row per point
            Mt = mine[n_xs + n_v:n_xs + n_v + 36 * (nk + 1) * TBv].reshape((36, nk + 1, TBv))
            _input_rows(x, x2, mask, r0, nr, TH, 4 * (TW + 1), ph, pw, 0, C, xs)
            _input_transform(xs, nt, 0, C, V)
            _multiply(U[:, k0:k0 + nk], V, Mt)
            _output_transform(Mt, nk, b, apply_relu, k0, r0, nr, TH, TW, y, y2)


def _task_buffers(C, K, rows, groups, TW, dtype):
    """work for _forward_by_tiles: per thread, a task's padded rows xs (C, 6, 4*TBv + 4),
    transformed inputs V (36, C + 1, TBv) and products Mt (36, <= K/groups + 1, TBv) for TBv the
    tiles of `rows` tile rows rounded up to whole vectors, on huge pages (runtime.scratch)"""
    L = 64 // np.dtype(dtype).itemsize
    TBv = -(-rows * (TW + 1) // L) * L
    return thread_scratch(C * 6 * (4 * TBv + 4) + 36 * (C + 1) * TBv + 36 * (-(-K // groups) + 1) * TBv, dtype)


@_kernel
def _transform_inputs(x, x2, mask, ph, pw, Ho, Wo, CB, xs, V):
    # V: (36, C + 1, TBv) = the input transform of every tile of x: (N, C, H, W) (masked, see
    # _column; x2: the channels that follow x's), padded by (ph, pw), onto planes (Ho, Wo),
    # through xs: (C, 6, 4*TBv + 4); CB input channels to a task. The first step of the split by
    # channels (and of conv2d_winograd_small.py's kernel).
    N, C = x.shape[0], x.shape[1] + x2.shape[1]
    TH, TW = (Ho + 3) // 4, (Wo + 3) // 4
    R = N * TH
    nt = R * (TW + 1)
    for cb in prange((C + CB - 1) // CB):
        c0, c1 = cb * CB, min(C, cb * CB + CB)
        _input_rows(x, x2, mask, 0, R, TH, 4 * (TW + 1), ph, pw, c0, c1, xs)
        _input_transform(xs, nt, c0, c1, V)


def transformed_inputs(x, x2, mask, ph, pw, Ho, Wo):
    """V: (36, C + 1, TBv), the transformed inputs of every tile of the batch (_transform_inputs),
    split over input channels between the threads; row C of each point a spare, never written."""
    N, C = x.shape[0], x.shape[1] + x2.shape[1]
    TBv = _tiles(N, Ho, Wo, x.itemsize)[2]
    V, xs = empty((36, C + 1, TBv), x.dtype), scratch((C, 6, 4 * TBv + 4), x.dtype, 1)
    _transform_inputs(x, x2, mask, ph, pw, Ho, Wo, max(1, C // (4 * numba.get_num_threads())), xs, V)
    return V


@_kernel
def _forward_by_channels(V, w, flip, b, apply_relu, KB, work, y, y2):
    # y: (N, K, Ho, Wo) = b + the products of the transformed inputs V (transformed_inputs) with w
    # (or w flipped, see _transform_filters), with apply_relu max(y, 0) (y2: the channels that
    # follow y's): one task per block of KB output channels, which transforms its own filters,
    # multiplies and writes its outputs, in its thread's row of work: 36*(KB*C + (KB + 1)*TBv)
    # elements
    N, C, TBv = y.shape[0], V.shape[1] - 1, V.shape[2]
    K, Ho, Wo = y.shape[1] + y2.shape[1], y.shape[2], y.shape[3]
    TH, TW = (Ho + 3) // 4, (Wo + 3) // 4
    R = N * TH
    for kb in prange((K + KB - 1) // KB):
        k0 = kb * KB
        nk = min(K, k0 + KB) - k0
        mine = work[numba.get_thread_id()]
        Ub = mine[:36 * nk * C].reshape((36, nk, C))
        _transform_filters(w, flip, k0, nk, Ub, 0, nk * C)
        Mt = mine[36 * nk * C:36 * (nk * C + (nk + 1) * TBv)].reshape((36, nk + 1, TBv))
        _multiply(Ub, V, Mt)
        _output_transform(Mt, nk, b, apply_relu, k0, 0, R, TH, TW, y, y2)


# ---------------------------------------------------------------------------------------------
# drivers (minunet.cpu.conv2d checks the arguments and sends only stride-1 3x3 convolutions here)
# ---------------------------------------------------------------------------------------------

_BY_CHANNELS_BYTES = 2 << 20  # every tile's transformed inputs under this: split by channels
_KB = 16                      # output channels per task when split by channels
_BY_CHANNELS_TILES = 4        # ... and, in convolve, planes at most this many tiles wide (measured on 2
                              # cores: by tiles 1.2-1.8x as fast at 32x32 and 64x64, 1.04-1.3x slower at 16x16)


def _tiles(N, Ho, Wo, itemsize):
    """(tile rows, tiles per row, whole vectors of tiles of the batch)"""
    L = 64 // itemsize
    R, TW = N * ((Ho + 3) // 4), (Wo + 3) // 4
    return R, TW, (R * (TW + 1) + L - 1) // L * L


def _by_channels(C, N, Ho, Wo, itemsize, rows):
    """Whether a convolution that transforms C channels (input channels; for the weight gradient
    C + K) onto (N, ., Ho, Wo) shares work by channels: where every tile's transformed inputs
    fit _BY_CHANNELS_BYTES, or twice that where the split by tiles, in blocks of `rows` tile
    rows each rounded up to whole vectors of tiles, would compute half as many tiles again (the
    16x16 planes near a U-Net's bottom: 4 blocks of 20 tiles become 4 of 32)."""
    R, TW, TBv = _tiles(N, Ho, Wo, itemsize)
    L = 64 // itemsize
    nbytes = 36 * C * TBv * itemsize
    by_tiles = math.ceil(R / rows) * (-(-rows * (TW + 1) // L) * L)
    return nbytes <= _BY_CHANNELS_BYTES or (nbytes <= 2 * _BY_CHANNELS_BYTES and by_tiles >= 1.5 * TBv)


def _blocking(R, TW, C, K, itemsize):
    """(tile rows per block, output-channel groups) for R tile rows of TW tiles: blocks of about
    _BLOCK_BYTES of transformed inputs (and at least two vectors of tiles), their number a
    multiple of the threads; where the blocks are fewer than twice the threads, groups of output
    channels (of 8 at least) make up the difference."""
    threads = numba.get_num_threads()
    tiles = max(128 // itemsize, _BLOCK_BYTES // (36 * C * itemsize))
    n_blocks = math.ceil(R / max(1, min(R, tiles // (TW + 1))))
    if n_blocks >= threads:
        n_blocks = min(R, math.ceil(n_blocks / threads) * threads)
    rows = math.ceil(R / n_blocks)
    n_blocks = math.ceil(R / rows)
    groups = 1
    while n_blocks * groups < 2 * threads and K // (2 * groups) >= 8:
        groups *= 2
    return rows, groups


def outputs(N, K, K1, Ho, Wo, dtype):
    """(y, y2): a convolution's K output channels as two arrays, (N, K1, Ho, Wo) and the rest"""
    return empty((N, K1, Ho, Wo), dtype), empty((N, K - K1, Ho, Wo), dtype)


def convolve(x, x2, mask, w, flip, b, relu, ph, pw, Ho, Wo, K1):
    """(y, y2): y = b + the stride-1 3x3 convolution of x: (N, C, H, W), padded by (ph, pw), by
    w: (K, C, 3, 3), max(y, 0) with relu; or with flip by w turned 180 degrees with its channel
    axes swapped (K = w.shape[1]): conv2d's input gradient, of x = gy padded by 2 - p, masked by
    mask = relu_y (None: not masked) as it is read. b may be None. The input is the
    concatenation of x and x2 (N, C2, H, W) along channels (C2 = 0: x alone), the output that of
    y (N, K1, Ho, Wo) and y2 (N, K - K1, Ho, Wo): no copy concatenates or splits them."""
    N, C = x.shape[0], x.shape[1] + x2.shape[1]
    K = w.shape[1] if flip else w.shape[0]
    y, y2 = outputs(N, K, K1, Ho, Wo, x.dtype)
    b = np.zeros(K, x.dtype) if b is None else b
    R, TW, _ = _tiles(N, Ho, Wo, x.itemsize)
    rows, groups = _blocking(R, TW, C, K, x.itemsize)
    if TW <= _BY_CHANNELS_TILES and _by_channels(C, N, Ho, Wo, x.itemsize, rows):
        V = transformed_inputs(x, x2, mask, ph, pw, Ho, Wo)
        _forward_by_channels(V, w, flip, b, relu, _KB, thread_scratch(36 * (_KB * C + (_KB + 1) * V.shape[2]), x.dtype),
                             y, y2)
        return y, y2
    U = empty((36, K, C), x.dtype)
    _transform_all_filters(w, flip, U)
    _forward_by_tiles(x, x2, mask, U, b, relu, ph, pw, rows, groups, _task_buffers(C, K, rows, groups, TW, x.dtype),
                      y, y2)
    return y, y2
