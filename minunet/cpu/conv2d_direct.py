"""minunet.cpu.conv2d_direct: conv2d's version 3 on the CPU, direct loops over zero-padded planes.

minunet.cpu.conv2d routes to it (the U-Net's first layer, from 1 or 3 channels, and every other
stride-1 convolution that is not Winograd's) and checks the arguments.

v3 computes a stride-1 correlation y[i, j] = sum_{u,v} w[u, v] * xp[i + u, j + v] over a
zero-padded copy xp of each input plane, and it never builds im2col's columns: for a 3x3
kernel those are 9 copies of x, written out and read back (and repacked by BLAS), and when
the layer has few output channels (K = 16 at the top of a U-Net) every column entry is used
only K times, so v2's GEMM runs at the speed of memory, not of the FPU. v3 reads each x
straight from the padded plane, once per block of 4 output channels.

The padded plane is stored flat with row length Wp = Wo + kw - 1, which makes every tap a
constant offset: xp[i + u, j + v] = plane[(i*Wp + j) + (u*Wp + v)]. So v3 runs over the
flat index p = i*Wp + j of an "extended" output of Ho rows of Wp (its last kw - 1 columns are
garbage, computed and dropped) in long straight loops with no per-row bookkeeping, which
LLVM vectorises: in the 3x3 case the three taps of a kernel row and four output channels
share each load of x, so one pass of the loop does 12 fused multiply-adds on vector lanes.

The weight gradient correlates gy with the padded planes of x the same way, but reads gy where
it lies, row by row on explicit SIMD vectors (simd.py), since a padded copy of gy (which the
flat loops would need) costs more memory traffic than the correlation itself at the top of a
U-Net; it sums the bias gradient on the way, and applies the fused ReLU's mask as it loads gy
where x has one channel (with more, every channel's tasks read gy, so it is masked once before).

Strided convolutions are not v3's business (None never picks it for them), but every version
computes every case: a stride s forward is the stride-1 one read at every s-th place, and
the gradients dilate gy (s - 1 zeros between its entries) and correlate at stride 1.
"""
import numpy as np
from numba import prange

from minunet.cpu.activation import relu_backward
from minunet.cpu.runtime import empty, fma_helper, kernel, scratch
from minunet.cpu.simd import fma, hsum, lanes, load_range, relu_mask, zeros

_V3_CHUNK = 1024  # output places per task in v3's forward: 4 channels' accumulators stay in L1
_V3_FAST = {"contract"}            # let LLVM fuse a*b + c into one FMA


def flipped(w):
    """w (K, C, kh, kw) flipped in space with its channel axes swapped, (C, K, kh, kw): the kernel
    that convolves gy into gx at stride 1 (v2 and v3's input gradient)."""
    return np.ascontiguousarray(w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))


@kernel
def _pad_planes(x, top, left, Hp, Wp, xp):
    # x: (N, C, H, W) -> xp: (N, C, Hp*Wp + tail), xp[n, c, h*Wp + q] = x[n, c, h - top, q - left]
    # where that lies inside x, else 0 (top and left may be negative: a crop). One plane per task;
    # each place is written once (a zero fill first would double the memory traffic).
    N, C, H, W = x.shape
    h0, h1 = min(Hp, max(0, top)), max(min(Hp, max(0, top)), min(Hp, H + top))
    q0, q1 = min(Wp, max(0, left)), max(min(Wp, max(0, left)), min(Wp, W + left))
    for nc in prange(N * C):
        n, c = nc // C, nc % C
        plane = xp[n, c]
        plane[:h0 * Wp] = 0
        for h in range(h0, h1):
            row = plane[h * Wp:(h + 1) * Wp]
            row[:q0] = 0
            row[q0:q1] = x[n, c, h - top, q0 - left:q1 - left]
            row[q1:] = 0
        plane[h1 * Wp:] = 0


def _padded(x, top, left, Hp, Wp, tail):
    """x as zero-padded flat planes (N, C, Hp*Wp + tail) with x[.., 0, 0] at row top, column left,
    in a scratch buffer"""
    xp = scratch((*x.shape[:2], Hp * Wp + tail), x.dtype)
    _pad_planes(x, top, left, Hp, Wp, xp)
    return xp


@kernel(fastmath=_V3_FAST)
def _correlate_v3(xp, w, b, apply_relu, Wp, Ho, Wo, y):
    # y[n, k, i, j] = b[k] + sum_{c,u,v} w[k,c,u,v] * xp[n, c, (i+u)*Wp + j+v], with apply_relu
    # max(y, 0); one task per (image, block of 4 output channels, chunk of whole extended rows)
    N, C, _ = xp.shape
    K, _, kh, kw = w.shape
    n_chunks = max(1, min(Ho, (Ho * Wp) // _V3_CHUNK))   # chunks of about _V3_CHUNK places ...
    rows = (Ho + n_chunks - 1) // n_chunks                # ... as whole rows, split evenly
    n_chunks = (Ho + rows - 1) // rows
    KB = (K + 3) // 4
    for t in prange(N * KB * n_chunks):
        n, kb, ch = t // (KB * n_chunks), (t // n_chunks) % KB, t % n_chunks
        k0, k1 = kb * 4, min(K, kb * 4 + 4)
        i0 = ch * rows
        i1 = min(Ho, i0 + rows)
        L = (i1 - i0) * Wp
        acc = np.zeros((4, L), y.dtype)
        a0, a1, a2, a3 = acc[0], acc[1], acc[2], acc[3]
        for c in range(C):
            for u in range(kh):
                xs = xp[n, c, (i0 + u) * Wp:]        # tap (u, 0) of extended place p is xs[p]
                if kw == 3 and k1 - k0 == 4:
                    p0, p1, p2 = w[k0, c, u, 0], w[k0, c, u, 1], w[k0, c, u, 2]
                    q0, q1, q2 = w[k0 + 1, c, u, 0], w[k0 + 1, c, u, 1], w[k0 + 1, c, u, 2]
                    r0, r1, r2 = w[k0 + 2, c, u, 0], w[k0 + 2, c, u, 1], w[k0 + 2, c, u, 2]
                    s0, s1, s2 = w[k0 + 3, c, u, 0], w[k0 + 3, c, u, 1], w[k0 + 3, c, u, 2]
                    for p in range(L):
                        xa, xb, xc = xs[p], xs[p + 1], xs[p + 2]
                        a0[p] += p0 * xa + p1 * xb + p2 * xc
                        a1[p] += q0 * xa + q1 * xb + q2 * xc
                        a2[p] += r0 * xa + r1 * xb + r2 * xc
                        a3[p] += s0 * xa + s1 * xb + s2 * xc
                else:
                    for k in range(k0, k1):
                        a = acc[k - k0]
                        for v in range(kw):
                            wv = w[k, c, u, v]
                            for p in range(L):
                                a[p] += wv * xs[p + v]
        for k in range(k0, k1):                       # drop the garbage columns, add the bias
            for i in range(i0, i1):
                src, dst = acc[k - k0, (i - i0) * Wp:], y[n, k, i]
                for j in range(Wo):
                    t = src[j] + b[k]
                    dst[j] = 0 if apply_relu and t <= 0 else t


@fma_helper
def _masked(g, mask, o, n):
    """the vector of g's flat places o, o + 1, ... (n of them at most, 0 past that), and 0 where
    mask <= 0 (mask None: g as it is)"""
    v = load_range(g, o, 0, n)
    if mask is None:
        return v
    return relu_mask(v, load_range(mask, o, 0, n))


@fma_helper
def _add3(acc, k, u, a, b, c):
    """acc[k, u] += the lane sums of a, b and c (one kernel row's three taps)"""
    acc[k, u, 0] += hsum(a)
    acc[k, u, 1] += hsum(b)
    acc[k, u, 2] += hsum(c)


@kernel(fastmath=_V3_FAST)
def _correlate_grad_v3(xp, gy, mask, Wp, gw, gb):
    # gw[k, c, u, v] = sum_{n, i, j} g[n, k, i, j] * xp[n, c, (i + u)*Wp + j + v] and gb[k] = sum_{n, i, j}
    # g[n, k, i, j], for g = gy where mask > 0, else 0 (mask None: g = gy), read where it lies: no
    # padded copy of gy. One task per (input channel, block of 4 k); the tasks of channel 0 also
    # sum gb. On explicit vectors along the rows: in the 3x3 case the three taps of a kernel row
    # and four output channels share each vector of x, 12 accumulators (and 4 sums of g) that stay
    # in registers across the rows. Sums are float32 vectors over one (image, kernel row), float64
    # across them.
    N, C, P = xp.shape
    K, H1, W1 = gy.shape[1], gy.shape[2], gy.shape[3]
    kh, kw = gw.shape[2], gw.shape[3]
    L = lanes(gy)
    z = zeros(gy)
    HW = H1 * W1
    KB = (K + 3) // 4
    for t in prange(C * KB):
        c, kb = t // KB, t % KB
        k0, k1 = kb * 4, min(K, kb * 4 + 4)
        acc = np.zeros((4, kh, kw))
        sums = np.zeros(4)
        for n in range(N):
            xo = (n * C + c) * P                        # xp[n, c, 0], a flat place
            if kw == 3 and k1 - k0 == 4:
                for u in range(kh):
                    with_sums = c == 0 and u == 0
                    s00 = s01 = s02 = s10 = s11 = s12 = s20 = s21 = s22 = s30 = s31 = s32 = z
                    t0 = t1 = t2 = t3 = z
                    for i in range(H1):
                        go, xr = ((n * K + k0) * H1 + i) * W1, xo + (i + u) * Wp   # gy[n, k0, i, 0], xp's row i + u
                        for j in range(0, W1, L):
                            g0 = _masked(gy, mask, go + j, W1 - j)
                            g1 = _masked(gy, mask, go + HW + j, W1 - j)
                            g2 = _masked(gy, mask, go + 2 * HW + j, W1 - j)
                            g3 = _masked(gy, mask, go + 3 * HW + j, W1 - j)
                            xa = load_range(xp, xr + j, 0, W1 - j)
                            xb = load_range(xp, xr + j + 1, 0, W1 - j)
                            xc = load_range(xp, xr + j + 2, 0, W1 - j)
                            s00, s01, s02 = fma(g0, xa, s00), fma(g0, xb, s01), fma(g0, xc, s02)
                            s10, s11, s12 = fma(g1, xa, s10), fma(g1, xb, s11), fma(g1, xc, s12)
                            s20, s21, s22 = fma(g2, xa, s20), fma(g2, xb, s21), fma(g2, xc, s22)
                            s30, s31, s32 = fma(g3, xa, s30), fma(g3, xb, s31), fma(g3, xc, s32)
                            if with_sums:
                                t0, t1, t2, t3 = t0 + g0, t1 + g1, t2 + g2, t3 + g3
                    _add3(acc, 0, u, s00, s01, s02)
                    _add3(acc, 1, u, s10, s11, s12)
                    _add3(acc, 2, u, s20, s21, s22)
                    _add3(acc, 3, u, s30, s31, s32)
                    if with_sums:
                        sums += np.array([hsum(t0), hsum(t1), hsum(t2), hsum(t3)])
            else:
                for k in range(k0, k1):
                    go = (n * K + k) * HW                # gy[n, k, 0, 0]
                    for u in range(kh):
                        for v in range(kw):
                            s = z
                            for i in range(H1):
                                xr = xo + (i + u) * Wp + v
                                for j in range(0, W1, L):
                                    s = fma(_masked(gy, mask, go + i * W1 + j, W1 - j),
                                            load_range(xp, xr + j, 0, W1 - j), s)
                            acc[k - k0, u, v] += hsum(s)
                    if c == 0:
                        s = z
                        for q in range(0, HW, L):
                            s = s + _masked(gy, mask, go + q, HW - q)
                        sums[k - k0] += hsum(s)
        for k in range(k0, k1):
            gw[k, c] = acc[k - k0]
            if c == 0:
                gb[k] = sums[k - k0]


def _dilated(gy, stride, shape):
    """gy with stride - 1 zeros after each entry along h and w, in an array of `shape`[2:] (the
    places past gy's last entry are 0 too): the gradient of a strided convolution, laid out
    for a stride-1 one."""
    if stride == (1, 1) and gy.shape[2:] == tuple(shape[2:]):
        return gy
    out = np.zeros((*gy.shape[:2], *shape[2:]), gy.dtype)
    out[:, :, ::stride[0], ::stride[1]][:, :, :gy.shape[2], :gy.shape[3]] = gy
    return out


def forward(x, w, b, stride, padding, Ho, Wo, relu):
    N, K, (kh, kw), (sh, sw), (ph, pw) = x.shape[0], w.shape[0], w.shape[2:], stride, padding
    H1, W1 = (Ho - 1) * sh + 1, (Wo - 1) * sw + 1              # the stride-1 output that covers y
    Wp = W1 + kw - 1
    xp = _padded(x, ph, pw, H1 + kh - 1, Wp, kw)
    b = np.zeros(K, x.dtype) if b is None else b
    y = empty((N, K, H1, W1), x.dtype)
    _correlate_v3(xp, w, b, relu, Wp, H1, W1, y)
    return y if (sh, sw) == (1, 1) else np.ascontiguousarray(y[:, :, ::sh, ::sw])


def backward_input(gy, w, x_shape, stride, padding):
    # gx[h, q] = sum_{k,u,v} gyd[h + ph - u, q + pw - v] * w[k, c, u, v] with gyd gy dilated:
    # a stride-1 correlation of gyd with w flipped in space and its channel axes swapped,
    # padded by kh-1-ph on top (negative: cropped).
    (N, C, H, W), (kh, kw), (sh, sw), (ph, pw) = x_shape, w.shape[2:], stride, padding
    Ho, Wo = gy.shape[2:]
    gyd = _dilated(gy, stride, (N, gy.shape[1], (Ho - 1) * sh + 1, (Wo - 1) * sw + 1))
    Wp = W + kw - 1
    gp = _padded(gyd, kh - 1 - ph, kw - 1 - pw, H + kh - 1, Wp, kw)
    gx = empty(x_shape, gy.dtype)
    _correlate_v3(gp, flipped(w), np.zeros(C, gy.dtype), False, Wp, H, W, gx)
    return gx


def backward_weight(x, gy, w_shape, stride, padding, relu_y, bias):
    # -> (gw, gb or None) of gy masked by relu_y (None: not masked) as it is read; gb summed on the way
    (K, _, kh, kw), (sh, sw), (ph, pw) = w_shape, stride, padding
    N, _, Ho, Wo = gy.shape
    H1, W1 = (Ho - 1) * sh + 1, (Wo - 1) * sw + 1
    Wp = W1 + kw - 1
    xp = _padded(x, ph, pw, H1 + kh - 1, Wp, kw)
    g = _dilated(gy, stride, (N, K, H1, W1))
    mask = None if relu_y is None else _dilated(relu_y, stride, (N, K, H1, W1))
    if mask is not None and x.shape[1] > 1:   # every input channel's tasks read g: mask it once, in a pass
        g, mask = relu_backward(g, mask), None
    gw, gb = np.empty(w_shape, x.dtype), np.empty(K)
    _correlate_grad_v3(xp, g, mask, Wp, gw, gb)
    return gw, (gb.astype(x.dtype) if bias else None)
