"""minunet.cpu.gemm: matrix products on SIMD vectors (simd.py), for the convolutions that are
plain GEMMs: the U-Net's 2x2 stride-2 up-convolution and its 1x1 head (version 4 of each).

Why not numpy.matmul (OpenBLAS), as v2 does: BLAS runs on threads of its own, which spin for a
while after each call in case another comes, and in a training step the next call is nearly
always a numba kernel, whose threads then share the cores with the spinners (how long they
spin is set by an environment variable that OpenBLAS reads as NumPy loads it, so it depends
on the order of the user's imports). These products run on numba's threads like every other
kernel of a step.

Two micro-kernels, both register-blocked:
  _product     C = A @ B (+ a bias per row, then a ReLU if asked): 8 rows of A x 2 vectors of B's columns in 16
               accumulators along the inner dimension, each step 8 broadcasts of A, 2 loads
               of B and 16 fused multiply-adds; B's and C's last columns masked.
  _product_nt  C = A @ B^T summed over a batch: both operands run along the long inner axis
               (pixels), so 4 x 4 dot products in 16 accumulators, summed across lanes once
               at the end.
Arrays are addressed flat (offset, row stride), so a product can read a slice of a batch of
images without a copy.
"""
import math

import numpy as np
from numba import prange

from minunet.cpu.runtime import fma_helper as _helper, fma_kernel as _kernel
from minunet.cpu.simd import (broadcast, fma, hsum, lanes, load_every2, load_range, relu, splat, store_every2,
                              store_range, transpose, zeros)



@_helper
def _product(A, a0, lda, B, b0, ldb, bias, apply_relu, C, c0, ldc, M, K, N):
    # C[c0 + m*ldc + n] = bias[m] + sum_k A[a0 + m*lda + k] * B[b0 + k*ldb + n], m < M, n < N;
    # with apply_relu, max of that and 0 (in the registers, before the store)
    L = lanes(B)
    z = zeros(B)
    for n0 in range(0, N, 2 * L):
        n1 = N - n0                                     # columns left: masks for the last step
        m = 0
        while m < M:
            if m + 8 <= M:
                a = a0 + m * lda
                s0, s1, s2, s3 = splat(bias[m], z), splat(bias[m + 1], z), splat(bias[m + 2], z), splat(bias[m + 3], z)
                s4, s5, s6, s7 = splat(bias[m + 4], z), splat(bias[m + 5], z), splat(bias[m + 6], z), splat(bias[m + 7], z)
                t0, t1, t2, t3, t4, t5, t6, t7 = s0, s1, s2, s3, s4, s5, s6, s7
                for k in range(K):
                    x0 = load_range(B, b0 + k * ldb + n0, 0, n1)
                    x1 = load_range(B, b0 + k * ldb + n0 + L, 0, n1 - L)
                    u = broadcast(A, a + k)
                    s0, t0 = fma(u, x0, s0), fma(u, x1, t0)
                    u = broadcast(A, a + lda + k)
                    s1, t1 = fma(u, x0, s1), fma(u, x1, t1)
                    u = broadcast(A, a + 2 * lda + k)
                    s2, t2 = fma(u, x0, s2), fma(u, x1, t2)
                    u = broadcast(A, a + 3 * lda + k)
                    s3, t3 = fma(u, x0, s3), fma(u, x1, t3)
                    u = broadcast(A, a + 4 * lda + k)
                    s4, t4 = fma(u, x0, s4), fma(u, x1, t4)
                    u = broadcast(A, a + 5 * lda + k)
                    s5, t5 = fma(u, x0, s5), fma(u, x1, t5)
                    u = broadcast(A, a + 6 * lda + k)
                    s6, t6 = fma(u, x0, s6), fma(u, x1, t6)
                    u = broadcast(A, a + 7 * lda + k)
                    s7, t7 = fma(u, x0, s7), fma(u, x1, t7)
                c = c0 + m * ldc + n0
                _store_row(C, c, s0, t0, apply_relu, n1, L)
                _store_row(C, c + ldc, s1, t1, apply_relu, n1, L)
                _store_row(C, c + 2 * ldc, s2, t2, apply_relu, n1, L)
                _store_row(C, c + 3 * ldc, s3, t3, apply_relu, n1, L)
                _store_row(C, c + 4 * ldc, s4, t4, apply_relu, n1, L)
                _store_row(C, c + 5 * ldc, s5, t5, apply_relu, n1, L)
                _store_row(C, c + 6 * ldc, s6, t6, apply_relu, n1, L)
                _store_row(C, c + 7 * ldc, s7, t7, apply_relu, n1, L)
                m += 8
            else:                                       # the last rows, one at a time
                a = a0 + m * lda
                s0 = t0 = splat(bias[m], z)
                for k in range(K):
                    u = broadcast(A, a + k)
                    s0 = fma(u, load_range(B, b0 + k * ldb + n0, 0, n1), s0)
                    t0 = fma(u, load_range(B, b0 + k * ldb + n0 + L, 0, n1 - L), t0)
                _store_row(C, c0 + m * ldc + n0, s0, t0, apply_relu, n1, L)
                m += 1


@_helper
def _store_row(C, c, v0, v1, apply_relu, n, L):
    """C[c : c + min(n, 2L)] = the two vectors v0, v1 (their ReLU with apply_relu)"""
    if apply_relu:
        v0, v1 = relu(v0), relu(v1)
    store_range(C, c, v0, 0, n)
    store_range(C, c + L, v1, 0, n - L)


@_helper
def _product_nt(A, a0, lda, sa, B, b0, ldb, sb, n_batch, M, N, T, C, c0, ldc):
    # C[c0 + m*ldc + n] = sum over i < n_batch, t < T of A[a0 + i*sa + m*lda + t] * B[b0 + i*sb + n*ldb + t]
    # for m < M, n < N: per batch item, rows of A and B along t, dot products
    L = lanes(A)
    z = zeros(A)
    Cf = C.reshape(-1)
    for m0 in range(0, M, 4):
        for n0 in range(0, N, 4):
            if m0 + 4 <= M and n0 + 4 <= N:
                s00 = s01 = s02 = s03 = s10 = s11 = s12 = s13 = z
                s20 = s21 = s22 = s23 = s30 = s31 = s32 = s33 = z
                for i in range(n_batch):
                    a, b = a0 + i * sa + m0 * lda, b0 + i * sb + n0 * ldb
                    for t in range(0, T, L):
                        g0, g1 = load_range(A, a + t, 0, T - t), load_range(A, a + lda + t, 0, T - t)
                        g2, g3 = load_range(A, a + 2 * lda + t, 0, T - t), load_range(A, a + 3 * lda + t, 0, T - t)
                        x0, x1 = load_range(B, b + t, 0, T - t), load_range(B, b + ldb + t, 0, T - t)
                        x2, x3 = load_range(B, b + 2 * ldb + t, 0, T - t), load_range(B, b + 3 * ldb + t, 0, T - t)
                        s00, s01, s02, s03 = fma(g0, x0, s00), fma(g0, x1, s01), fma(g0, x2, s02), fma(g0, x3, s03)
                        s10, s11, s12, s13 = fma(g1, x0, s10), fma(g1, x1, s11), fma(g1, x2, s12), fma(g1, x3, s13)
                        s20, s21, s22, s23 = fma(g2, x0, s20), fma(g2, x1, s21), fma(g2, x2, s22), fma(g2, x3, s23)
                        s30, s31, s32, s33 = fma(g3, x0, s30), fma(g3, x1, s31), fma(g3, x2, s32), fma(g3, x3, s33)
                c = c0 + m0 * ldc + n0
                Cf[c], Cf[c + 1], Cf[c + 2], Cf[c + 3] = hsum(s00), hsum(s01), hsum(s02), hsum(s03)
                c += ldc
                Cf[c], Cf[c + 1], Cf[c + 2], Cf[c + 3] = hsum(s10), hsum(s11), hsum(s12), hsum(s13)
                c += ldc
                Cf[c], Cf[c + 1], Cf[c + 2], Cf[c + 3] = hsum(s20), hsum(s21), hsum(s22), hsum(s23)
                c += ldc
                Cf[c], Cf[c + 1], Cf[c + 2], Cf[c + 3] = hsum(s30), hsum(s31), hsum(s32), hsum(s33)
            else:                                       # the edges of M and N, one pair at a time
                for m in range(m0, min(M, m0 + 4)):
                    for n in range(n0, min(N, n0 + 4)):
                        s = z
                        for i in range(n_batch):
                            a, b = a0 + i * sa + m * lda, b0 + i * sb + n * ldb
                            for t in range(0, T, L):
                                s = fma(load_range(A, a + t, 0, T - t), load_range(B, b + t, 0, T - t), s)
                        Cf[c0 + m * ldc + n] = hsum(s)


# ---------------------------------------------------------------------------------------------
# the convolutions that are one product per image
# ---------------------------------------------------------------------------------------------
# pointwise: conv2d with a 1x1 kernel, stride 1, no padding (the U-Net's head):
#     y[n] (K, P) = w (K, C) @ x[n] (C, P) + b,  gx[n] = w^T @ gy[n],  gw = sum_n gy[n] @ x[n]^T
# patches: conv_transpose2d with kernel == stride and no padding (the U-Net's up-convolution),
#     whose outputs do not overlap: z[n] (Cout*kh*kw, P) = w^T @ x[n] holds, for every input
#     pixel, its (Cout, kh, kw) patch of y, which is then put into place; the gradients read gy
#     as those patches, gyp[n] (Cout*kh*kw, P):  gx[n] = w (Cin, Cout*kh*kw) @ gyp[n] and
#     gw = sum_n x[n] @ gyp[n]^T, computed transposed as sum_n gyp[n] @ x[n]^T with x[n]^T laid out
#     pixel-major (a cheap transpose of the smaller operand) so that _product's vectors run
#     along its input channels.
# Tasks: blocks of whole input rows of one image for the products per image (about
# _BLOCK_PIXELS pixels, so a block's columns stay in cache while every row of the weights
# passes over them); 4 x 4 blocks of the 1x1 weight gradient, each summing over the whole batch;
# blocks of rows (weight_rows: whole output channels) of the up-convolution's weight gradient,
# each over the batch and cutting its own rows of gy's patches, a block of input rows at a time:
# gy's patches are never laid out whole (measured on 2 cores, batch 4, against doing so in a
# kernel of their own: at the U-Net's up-convolutions from 16x16 to 64x64 1.03 to 1.29 times as
# fast, at 8x8 0.96 to 1.08, at 98x98 1.8 to 2.2).

_BLOCK_PIXELS = 1024


def row_blocks(H, W):
    """Input rows per task: whole rows, about _BLOCK_PIXELS pixels."""
    return max(1, min(H, _BLOCK_PIXELS // W))


@_kernel
def pointwise_forward(x, w, b, apply_relu, rows, y):
    # x: (N, C, H, W), w: (K, C), b: (K,) -> y: (N, K, H, W), max(y, 0) with apply_relu
    N, C, H, W = x.shape
    K, P = w.shape[0], H * W
    nb = (H + rows - 1) // rows
    for task in prange(N * nb):
        n, i0 = task // nb, task % nb * rows
        npx = (min(H, i0 + rows) - i0) * W
        _product(w, 0, C, x, n * C * P + i0 * W, P, b, apply_relu, y, n * K * P + i0 * W, P, K, C, npx)


@_kernel
def weight_gradient(a, b, gw):
    # gw: (M, Q) = sum_n a[n] (M, P) @ b[n]^T (P, Q) for a: (N, M, ...), b: (N, Q, ...) with P
    # pixels per channel; one task per 4 x 4 block of gw
    N, M, Q = a.shape[0], gw.shape[0], gw.shape[1]
    P = a.size // (N * M)
    mb, qb = (M + 3) // 4, (Q + 3) // 4
    for task in prange(mb * qb):
        m0, q0 = task // qb * 4, task % qb * 4
        _product_nt(a, m0 * P, P, M * P, b, q0 * P, P, Q * P, N, min(4, M - m0), min(4, Q - q0), P, gw,
                    m0 * Q + q0, Q)


@_kernel
def patches_forward(x, wt, b, rows, y):
    # x: (N, Cin, H, W), wt: (Cout*kh*kw, Cin) with rows (o, u, v), b: (Cout,) -> y: (N, Cout,
    # H*kh, W*kw), y[n, o, i*kh + u, j*kw + v] = b[o] + sum_c wt[(o,u,v), c] x[n, c, i, j]
    N, Cin, H, W = x.shape
    M, Cout = wt.shape[0], y.shape[1]
    kh, kw = y.shape[2] // H, y.shape[3] // W
    P = H * W
    L = lanes(x)
    nb = (H + rows - 1) // rows
    zero = np.zeros(M, x.dtype)
    for task in prange(N * nb):
        n, i0 = task // nb, task % nb * rows
        i1 = min(H, i0 + rows)
        npx = (i1 - i0) * W
        z = np.empty((M, npx), x.dtype)
        _product(wt, 0, Cin, x, n * Cin * P + i0 * W, P, zero, False, z, 0, npx, M, Cin, npx)
        for o in range(Cout):                           # each pixel's patch into place
            for u in range(kh):
                if kw == 2:                             # rows (o, u, 0) and (o, u, 1) interleaved
                    z0, z1 = z[(o * kh + u) * 2], z[(o * kh + u) * 2 + 1]
                    bias = splat(b[o], zeros(z))
                    for i in range(i0, i1):
                        dst, s = y[n, o, i * kh + u], (i - i0) * W
                        for j in range(0, W, L):
                            store_every2(dst, 2 * j, load_range(z0, s + j, 0, W - j) + bias,
                                         load_range(z1, s + j, 0, W - j) + bias, 0, 2 * (W - j))
                    continue
                for v in range(kw):
                    src = z[(o * kh + u) * kw + v]
                    for i in range(i0, i1):
                        dst, s = y[n, o, i * kh + u], (i - i0) * W
                        for j in range(W):
                            dst[j * kw + v] = src[s + j] + b[o]


@_helper
def _patches_of(gy, n, i0, i1, kh, kw, gp):
    # gp[(o,u,v), (i-i0)*W + j] = gy[n, o, i*kh + u, j*kw + v] for input rows i0 <= i < i1
    Cout, W = gy.shape[1], gy.shape[3] // kw
    L = lanes(gp)
    for o in range(Cout):
        for u in range(kh):
            if kw == 2:                                 # one row of gy split into rows (o, u, 0), (o, u, 1)
                d0, d1 = gp[(o * kh + u) * 2], gp[(o * kh + u) * 2 + 1]
                for i in range(i0, i1):
                    src, s = gy[n, o, i * kh + u], (i - i0) * W
                    for j in range(0, W, L):
                        v0, v1 = load_every2(src, 2 * j, 0, 2 * (W - j))
                        store_range(d0, s + j, v0, 0, W - j)
                        store_range(d1, s + j, v1, 0, W - j)
                continue
            for v in range(kw):
                dst = gp[(o * kh + u) * kw + v]
                for i in range(i0, i1):
                    src, s = gy[n, o, i * kh + u], (i - i0) * W
                    for j in range(W):
                        dst[s + j] = src[j * kw + v]


@_kernel
def patches_backward_input(gy, w2, rows, gx):
    # gy: (N, Cout, H*kh, W*kw), w2: (Cin, Cout*kh*kw) -> gx: (N, Cin, H, W) = w2 @ gy's patches
    N, Cin, H, W = gx.shape
    M = w2.shape[1]
    P = H * W
    nb = (H + rows - 1) // rows
    zero = np.zeros(Cin, gx.dtype)
    for task in prange(N * nb):
        n, i0 = task // nb, task % nb * rows
        i1 = min(H, i0 + rows)
        npx = (i1 - i0) * W
        gp = np.empty((M, npx), gx.dtype)
        _patches_of(gy, n, i0, i1, gy.shape[2] // H, gy.shape[3] // W, gp)
        _product(w2, 0, M, gp, 0, npx, zero, False, gx, n * Cin * P + i0 * W, P, Cin, M, npx)


@_kernel
def transposed_planes(x, xt):
    # x: (N, C, P) -> xt: (N, P, C), xt[n, p, c] = x[n, c, p]: whole lanes x lanes blocks by shuffles
    # in registers (simd.transpose), the rest one float at a time; one task per (image, vector of channels)
    N, C, P = x.shape
    L = lanes(x)
    nc = (C + L - 1) // L
    for task in prange(N * nc):
        n, c0 = task // nc, task % nc * L
        p1 = P - P % L if c0 + L <= C else 0            # pixels covered by whole blocks
        for p in range(0, p1, L):
            transpose(x, (n * C + c0) * P + p, P, xt, (n * P + p) * C + c0, C)
        for p in range(p1, P):
            for c in range(c0, min(C, c0 + L)):
                xt[n, p, c] = x[n, c, p]


def weight_rows(Q, khkw, threads):
    """Rows of the up-convolution's transposed weight gradient per task: whole output channels
    (a multiple of khkw = kh*kw rows) in a multiple of 8 (the micro-kernel's), at most 64 (or
    one such multiple), at least two tasks per thread where Q allows."""
    step = math.lcm(8, khkw)
    return max(step, min(max(64, step) // step * step, -(-Q // (2 * threads * step)) * step))


@_kernel
def patches_weight_gradient(gy, kh, kw, xt, rows, band, gwt):
    # gwt (Q, C) = sum_n patches(gy)[n] (Q, P) @ xt[n] (P, C): the transposed weight gradient of the
    # kernel == stride transposed convolution, Q = Cout*kh*kw its rows (o, u, v), xt its x
    # transposed (N, P = H*W, C); one task per block of `rows` rows (whole output channels), which
    # cuts its rows of each image's patches from gy itself (_patches_of), `band` input rows at a
    # time, into a buffer of its own that stays in cache; the products summed in float64
    N, P, C = xt.shape
    Q = gwt.shape[0]
    H, W = gy.shape[2] // kh, gy.shape[3] // kw
    khkw = kh * kw
    zero = np.zeros(Q, gwt.dtype)
    for task in prange((Q + rows - 1) // rows):
        q0 = task * rows
        nq = min(Q, q0 + rows) - q0
        mine = gy[:, q0 // khkw:(q0 + nq) // khkw]          # this task's output channels
        gp = np.empty((nq, band * W), gwt.dtype)
        one, acc = np.empty((nq, C), gwt.dtype), np.zeros((nq, C))
        for n in range(N):
            for i0 in range(0, H, band):
                i1 = min(H, i0 + band)
                npx = (i1 - i0) * W
                _patches_of(mine, n, i0, i1, kh, kw, gp)
                _product(gp, 0, band * W, xt, (n * P + i0 * W) * C, C, zero, False, one, 0, C, nq, npx, C)
                acc += one
        gwt[q0:q0 + nq] = acc
