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

Strided convolutions are not v3's business (None never picks it for them), but every version
computes every case: a stride s forward is the stride-1 one read at every s-th place, and
the gradients dilate gy (s - 1 zeros between its entries) and correlate at stride 1.
"""
import numpy as np
from numba import prange

from minunet.cpu.activation import bias_backward
from minunet.cpu.runtime import empty, kernel, scratch
from minunet.cpu.simd import lanes, load_range, relu_mask, store_range

_V3_CHUNK = 1024  # output places per task in v3's forward: 4 channels' accumulators stay in L1
_V3_FAST = {"contract"}            # let LLVM fuse a*b + c into one FMA
_V3_REDUCE = {"contract", "reassoc"}  # ... and reorder sums, so the reductions vectorise


def flipped(w):
    """w (K, C, kh, kw) flipped in space with its channel axes swapped, (C, K, kh, kw): the kernel
    that convolves gy into gx at stride 1 (v2 and v3's input gradient)."""
    return np.ascontiguousarray(w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))


@kernel
def _pad_planes(x, mask, top, left, Hp, Wp, xp):
    # x: (N, C, H, W) -> xp: (N, C, Hp*Wp + tail), xp[n, c, h*Wp + q] = x[n, c, h - top, q - left]
    # where that lies inside x, else 0 (top and left may be negative: a crop); with a mask (x's
    # shape: the output of the ReLU fused into the convolution whose gradient x is), 0 also
    # where the mask is <= 0. One plane per task; each place is written once (a zero fill
    # first would double the memory traffic).
    N, C, H, W = x.shape
    L = lanes(x)
    h0, h1 = min(Hp, max(0, top)), max(min(Hp, max(0, top)), min(Hp, H + top))
    q0, q1 = min(Wp, max(0, left)), max(min(Wp, max(0, left)), min(Wp, W + left))
    for nc in prange(N * C):
        n, c = nc // C, nc % C
        plane = xp[n, c]
        plane[:h0 * Wp] = 0
        for h in range(h0, h1):
            row = plane[h * Wp:(h + 1) * Wp]
            row[:q0] = 0
            if mask is None:
                row[q0:q1] = x[n, c, h - top, q0 - left:q1 - left]
            else:                                       # on vectors: LLVM leaves this loop scalar
                src, m = x[n, c, h - top], mask[n, c, h - top]
                for q in range(q0, q1, L):
                    v = relu_mask(load_range(src, q - left, 0, q1 - q), load_range(m, q - left, 0, q1 - q))
                    store_range(plane, h * Wp + q, v, 0, q1 - q)
            row[q1:] = 0
        plane[h1 * Wp:] = 0


def _padded(x, top, left, Hp, Wp, tail, slot=0, mask=None):
    """x (masked, see _pad_planes) as zero-padded flat planes (N, C, Hp*Wp + tail) with x[.., 0, 0]
    at row top, column left, in scratch buffer `slot`."""
    xp = scratch((*x.shape[:2], Hp * Wp + tail), x.dtype, slot)
    _pad_planes(x, mask, top, left, Hp, Wp, xp)
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


@kernel(fastmath=_V3_REDUCE)
def _correlate_grad_v3(xp, gp, Wp, gw):
    # gw[k, c, u, v] = sum_{n, p} gp[n, k, p] * xp[n, c, p + u*Wp + v] over the extended places p
    # (gp is gy with zeros in the garbage columns); one task per (input channel, block of 4 k).
    # Each loop is a reduction over a whole plane: float32 partial sums inside it (vectorised),
    # float64 across planes and rows of the kernel.
    N, C, _ = xp.shape
    K, P = gp.shape[1], gp.shape[2]
    kh, kw = gw.shape[2], gw.shape[3]
    KB = (K + 3) // 4
    for t in prange(C * KB):
        c, kb = t // KB, t % KB
        k0, k1 = kb * 4, min(K, kb * 4 + 4)
        acc = np.zeros((4, kh, kw))
        zero = np.zeros(1, gp.dtype)[0]
        for n in range(N):
            for u in range(kh):
                xs = xp[n, c, u * Wp:]
                if kw == 3 and k1 - k0 == 4:
                    # written out, not looped: 12 named scalars are what LLVM keeps in 12 vector
                    # registers (an array of sums would go through memory on every step)
                    g0, g1, g2, g3 = gp[n, k0], gp[n, k0 + 1], gp[n, k0 + 2], gp[n, k0 + 3]
                    s00 = s01 = s02 = s10 = s11 = s12 = s20 = s21 = s22 = s30 = s31 = s32 = zero
                    for p in range(P):
                        xa, xb, xc = xs[p], xs[p + 1], xs[p + 2]
                        s00 += g0[p] * xa
                        s01 += g0[p] * xb
                        s02 += g0[p] * xc
                        s10 += g1[p] * xa
                        s11 += g1[p] * xb
                        s12 += g1[p] * xc
                        s20 += g2[p] * xa
                        s21 += g2[p] * xb
                        s22 += g2[p] * xc
                        s30 += g3[p] * xa
                        s31 += g3[p] * xb
                        s32 += g3[p] * xc
                    acc[0, u, 0] += s00
                    acc[0, u, 1] += s01
                    acc[0, u, 2] += s02
                    acc[1, u, 0] += s10
                    acc[1, u, 1] += s11
                    acc[1, u, 2] += s12
                    acc[2, u, 0] += s20
                    acc[2, u, 1] += s21
                    acc[2, u, 2] += s22
                    acc[3, u, 0] += s30
                    acc[3, u, 1] += s31
                    acc[3, u, 2] += s32
                else:
                    for k in range(k0, k1):
                        g = gp[n, k]
                        for v in range(kw):
                            s = zero
                            for p in range(P):
                                s += g[p] * xs[p + v]
                            acc[k - k0, u, v] += s
        for k in range(k0, k1):
            gw[k, c] = acc[k - k0]


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
    # -> (gw, gb or None) of gy masked by relu_y (None: not masked) as it is padded; gb (with
    # bias) summed over that padded copy
    (K, _, kh, kw), (sh, sw), (ph, pw) = w_shape, stride, padding
    N, _, Ho, Wo = gy.shape
    H1, W1 = (Ho - 1) * sh + 1, (Wo - 1) * sw + 1
    Wp = W1 + kw - 1
    xp = _padded(x, ph, pw, H1 + kh - 1, Wp, kw)
    mask = None if relu_y is None else _dilated(relu_y, stride, (N, K, H1, W1))
    gp = _padded(_dilated(gy, stride, (N, K, H1, W1)), 0, 0, H1, Wp, 0, slot=1, mask=mask)  # 0 in the garbage columns
    gw = np.empty(w_shape, x.dtype)
    _correlate_grad_v3(xp, gp, Wp, gw)
    return gw, (bias_backward(gp) if bias else None)
