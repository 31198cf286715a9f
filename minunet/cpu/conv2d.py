"""minunet.cpu.conv2d: 2-D convolution (cross-correlation, as PyTorch's), four versions.

    y[n,k,i,j] = b[k] + sum_{c,u,v} x[n,c,i*sh-ph+u, j*sw-pw+v] * w[k,c,u,v]

forward computes y, backward_input gx = d/dx sum(y * gy), backward_weight gw = d/dw sum(y * gy)
(and with bias=True the bias gradient, activation.bias_backward's). With relu=True the forward
is max(y, 0), and with relu_y= (that output) both gradients are those of gy * (relu_y > 0): v4's
Winograd kernels do that on the way (the bias and the ReLU as they write y, the mask as they
read gy, the bias gradient from gy's transform), v3 the ReLU as it writes y and the mask as it
pads gy for the weight gradient, the rest as passes of their own. Every
version computes the same function; `version=None` picks one by shape (`choose_version`), the
tests run them all against tests/reference.py and benchmarks/bench_cpu.py times them all.

Convolution versions (`version=`, see VERSIONS)
-----------------------------------------------
  v1  direct loops, a transcription of the definition
          y[n,k,i,j] = b[k] + sum_{c,u,v} x[n,c,i*sh-ph+u, j*sw-pw+v] * w[k,c,u,v];
      naive and obviously right, and slow.
  v2  im2col + GEMM (the Caffe/Chainer lowering). im2col copies every receptive field of x
      into a column, col[n, (c,u,v), (i,j)] = x[n, c, i*sh-ph+u, j*sw-pw+v] (0 in the padding),
      which turns the convolution into one matrix product per image that BLAS runs near peak
      (R = C*kh*kw, P = Ho*Wo):
          forward          y[n]    (K, P) = W (K, R) @ col[n] (R, P)
          backward_weight  gW.T    (R, K) = sum_n col[n] (R, P) @ gy[n].T (P, K)
          backward_input   gcol[n] (R, P) = W.T (R, K) @ gy[n] (K, P), then gx = col2im(gcol)
      col2im is im2col's adjoint: it adds every entry of a column back onto the pixel it was
      copied from. With stride 1, backward_input is itself a convolution, of gy with W flipped
      in space and its two channel axes swapped (padding k-1-p); where that im2col is no larger
      than col2im's columns (K <= C) v2 runs it so, as its GEMM has the long inner dimension
      K*kh*kw instead of K. im2col and col2im are numba loops over (n, c) planes; the GEMMs are
      numpy.matmul over the stacked (N, ., .) arrays: one BLAS call per image, which measured
      faster than one wide GEMM over all images, except where an image has fewer than _THIN
      output pixels: products that thin run below BLAS speed, so there the images go side by
      side into one product. Transposes go to BLAS as flags, not copies.
      col is kh*kw times the size of x, so it lives in a reusable per-thread scratch buffer: a
      fresh array that size costs more in page faults than the copy itself. A 1x1 kernel with
      stride 1 and no padding needs no im2col: x viewed as (N, C, H*W) already is col.
  v3  direct loops over zero-padded planes, blocked for the FPU's registers (see its section
      below): no columns, so nothing 9x the size of x goes through memory, and no packing of
      GEMM operands. On 2 cores it beats v2 on every stride-1 3x3 layer of the U-Net except
      the 8x8, many-channel bottom, by 2x on the few-channel top.
  v4  Winograd's minimal filtering F(4x4, 3x3) for stride-1 3x3 kernels (conv2d_winograd.py
      teaches it): 36 multiplies per 4x4 tile of outputs instead of 144, as 36 matrix products
      between transformed inputs and transformed filters, on explicit SIMD vectors (simd.py);
      on planes a few tiles wide with many channels the forward and the input gradient run
      with the output channels in the vectors instead of the tiles (conv2d_winograd_small.py).
      A 1x1 kernel with stride 1 and no padding v4 runs as one product per image on the same
      vectors (gemm.py), on numba's threads like every other kernel, not BLAS's. Every other
      convolution v4 runs as v3.
"""
import numba
import numpy as np
from numba import prange

from minunet.contract import conv_out_hw
from minunet.cpu import conv2d_winograd, conv2d_winograd_small, conv2d_winograd_weight, gemm
from minunet.cpu.activation import bias_backward, relu_backward
from minunet.cpu.concat import concat_backward, concat_forward
from minunet.cpu.runtime import batches, empty, kernel, one_blas_thread, scratch, zeros
from minunet.cpu.simd import lanes, load_range, relu_mask, store_range

VERSIONS = {
    "conv2d_forward": (1, 2, 3, 4),
    "conv2d_backward_input": (1, 2, 3, 4),
    "conv2d_backward_weight": (1, 2, 3, 4),
}

# version=None picks a convolution's version by its shape (choose_version):
#   v4, Winograd, for every stride-1 3x3 convolution with at least _WINOGRAD_CHANNELS input and
#       output channels: 4 times fewer multiplies, and its transforms cost little next to them
#       once both sides have a few channels (the U-Net's first layer, from 1 or 3 channels, is
#       v3's); and v4 for a 1x1 kernel with stride 1 and no padding: one product per image;
#   v3, the direct loops, for the other stride-1 convolutions with a kernel larger than 1x1,
#       except on planes smaller than _DIRECT_PLANE places that also have more than
#       _DIRECT_CHANNELS output channels: there v2's GEMMs are big enough for BLAS to win;
#   v2, im2col + GEMM, for the rest (the strided convolutions).
# Measured on the U-Net's layers, 2 cores, with `python benchmarks/conv_vs_torch.py` and
# `PYTHONPATH=. python -m pytest benchmarks/bench_cpu.py --benchmark-only -k conv2d`.
_WINOGRAD_CHANNELS = 8
_DIRECT_PLANE = 16 * 16
_DIRECT_CHANNELS = 64


def choose_version(stride, khw, padding, c_in, c_out, plane):
    """The version that version=None runs (see above) for a convolution of c_in channels into
    c_out channels of `plane` places (Ho*Wo). For backward_input it is the convolution of gy
    into gx: c_in = K, c_out = C and plane = H*W."""
    stride, khw = tuple(stride), tuple(khw)
    if stride == (1, 1) and khw == (3, 3) and min(c_in, c_out) >= _WINOGRAD_CHANNELS:
        return 4
    if _pointwise(stride, khw, padding):
        return 4
    if stride == (1, 1) and khw != (1, 1) and (plane >= _DIRECT_PLANE or c_out <= _DIRECT_CHANNELS):
        return 3
    return 2


def _pointwise(stride, khw, padding):
    """Whether the convolution is one product per image: 1x1 kernel, stride 1, no padding."""
    return tuple(stride) == (1, 1) and tuple(khw) == (1, 1) and tuple(padding) == (0, 0)


def _winograd(x, x2, mask, w, flip, b, relu, ph, pw, Ho, Wo, K1):
    """v4's stride-1 3x3 convolution (conv2d_winograd.convolve: the forward, or with flip and the
    mask relu_y the input gradient) onto planes Wo wide: products with the tiles in the vectors,
    or (small planes, many channels) with the output channels. The input is x and x2 along
    channels, the output (y, y2) split after K1 channels."""
    c_out = w.shape[1] if flip else w.shape[0]
    small = conv2d_winograd_small.suits(x.shape[1] + x2.shape[1], c_out, Wo)
    return (conv2d_winograd_small if small else conv2d_winograd).convolve(x, x2, mask, w, flip, b, relu, ph, pw,
                                                                          Ho, Wo, K1)


def _winograd_fits(stride, khw):
    """Whether v4 runs Winograd's F(4x4, 3x3): a stride-1 3x3 kernel."""
    return tuple(stride) == (1, 1) and tuple(khw) == (3, 3)


_THIN = 256  # below this many output pixels per image, v2 runs one GEMM over the images side by side


# ---------------------------------------------------------------------------------------------
# convolution v1: direct loops
# ---------------------------------------------------------------------------------------------

@kernel
def _conv2d_forward_v1(x, w, b, sh, sw, ph, pw, y):
    # one prange iteration per output plane y[n, k]
    N, C, H, W = x.shape
    K, _, kh, kw = w.shape
    Ho, Wo = y.shape[2], y.shape[3]
    for nk in prange(N * K):
        n, k = nk // K, nk % K
        for i in range(Ho):
            for j in range(Wo):
                acc = b[k]
                for c in range(C):
                    for u in range(kh):
                        h = i * sh - ph + u
                        if 0 <= h < H:
                            for v in range(kw):
                                q = j * sw - pw + v
                                if 0 <= q < W:
                                    acc += x[n, c, h, q] * w[k, c, u, v]
                y[n, k, i, j] = acc


@kernel
def _conv2d_backward_input_v1(gy, w, sh, sw, ph, pw, gx):
    # the forward loops run backwards: every y[n,k,i,j] hands gy * w back to each x it read.
    # One prange iteration per input plane gx[n, c] (zeroed by the caller), so += never races.
    N, C, H, W = gx.shape
    _, K, Ho, Wo = gy.shape
    kh, kw = w.shape[2], w.shape[3]
    for nc in prange(N * C):
        n, c = nc // C, nc % C
        for k in range(K):
            for i in range(Ho):
                for j in range(Wo):
                    g = gy[n, k, i, j]
                    for u in range(kh):
                        h = i * sh - ph + u
                        if 0 <= h < H:
                            for v in range(kw):
                                q = j * sw - pw + v
                                if 0 <= q < W:
                                    gx[n, c, h, q] += g * w[k, c, u, v]


@kernel
def _conv2d_backward_weight_v1(x, gy, sh, sw, ph, pw, gw):
    # gw[k,c,u,v] = sum_{n,i,j} gy[n,k,i,j] * x[n,c,i*sh-ph+u, j*sw-pw+v]; one iteration per (k, c)
    N, C, H, W = x.shape
    _, K, Ho, Wo = gy.shape
    kh, kw = gw.shape[2], gw.shape[3]
    for kc in prange(K * C):
        k, c = kc // C, kc % C
        for u in range(kh):
            for v in range(kw):
                acc = 0.0
                for n in range(N):
                    for i in range(Ho):
                        h = i * sh - ph + u
                        if 0 <= h < H:
                            for j in range(Wo):
                                q = j * sw - pw + v
                                if 0 <= q < W:
                                    acc += gy[n, k, i, j] * x[n, c, h, q]
                gw[k, c, u, v] = acc


# ---------------------------------------------------------------------------------------------
# convolution v2: im2col / col2im (numba) + GEMM (BLAS through numpy.matmul)
# ---------------------------------------------------------------------------------------------

@numba.njit(cache=True)
def _valid(n_out, n_in, s, p, u):
    """The output positions i in [lo, hi) that read an input 0 <= i*s - p + u < n_in."""
    lo = max(0, (p - u + s - 1) // s)
    hi = min(n_out, (n_in - 1 + p - u) // s + 1)
    return lo, max(lo, hi)


@kernel
def _im2col(x, kh, kw, sh, sw, ph, pw, col):
    # x: (N, C, H, W) -> col: (N, C*kh*kw, Ho*Wo), col[n, (c,u,v), (i,j)] = x[n, c, i*sh-ph+u, j*sw-pw+v]
    # or 0 in the padding. One prange iteration per plane x[n, c]: it fills rows (c, *, *) of col[n].
    N, C, H, W = x.shape
    Ho, Wo = (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1
    for nc in prange(N * C):
        n, c = nc // C, nc % C
        for u in range(kh):
            i0, i1 = _valid(Ho, H, sh, ph, u)
            for v in range(kw):
                j0, j1 = _valid(Wo, W, sw, pw, v)
                row = col[n, (c * kh + u) * kw + v]     # (Ho*Wo,)
                row[:i0 * Wo] = 0                      # output rows that read the top padding
                row[i1 * Wo:] = 0                      # ... and the bottom padding
                for i in range(i0, i1):
                    src = x[n, c, i * sh - ph + u]     # the input row this output row reads
                    dst = row[i * Wo:(i + 1) * Wo]
                    dst[:j0] = 0
                    dst[j1:] = 0
                    if sw == 1:                        # a contiguous copy: the common case
                        dst[j0:j1] = src[j0 - pw + v:j1 - pw + v]
                    else:
                        for j in range(j0, j1):
                            dst[j] = src[j * sw - pw + v]


@kernel
def _col2im(col, kh, kw, sh, sw, ph, pw, x):
    # col: (N, C*kh*kw, Ho*Wo) -> x: (N, C, H, W), im2col's adjoint: each plane x[n, c] starts at
    # 0 and every entry of its rows (c, *, *) of col is added onto the pixel it came from.
    # One prange iteration per plane x[n, c].
    N, C, H, W = x.shape
    Ho, Wo = (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1
    for nc in prange(N * C):
        n, c = nc // C, nc % C
        x[n, c] = 0
        for u in range(kh):
            i0, i1 = _valid(Ho, H, sh, ph, u)
            for v in range(kw):
                j0, j1 = _valid(Wo, W, sw, pw, v)
                row = col[n, (c * kh + u) * kw + v]
                for i in range(i0, i1):
                    dst = x[n, c, i * sh - ph + u]
                    src = row[i * Wo:(i + 1) * Wo]
                    if sw == 1:
                        for j in range(j0, j1):
                            dst[j - pw + v] += src[j]
                    else:
                        for j in range(j0, j1):
                            dst[j * sw - pw + v] += src[j]


def _cols(x, khw, stride, padding, Ho, Wo):
    """im2col of x (a slice of the batch) into the scratch buffer; for a 1x1 kernel with stride 1
    and no padding, x itself."""
    N, C, H, W = x.shape
    if khw == (1, 1) and stride == (1, 1) and padding == (0, 0):
        return x.reshape(N, C, H * W)
    col = scratch((N, C * khw[0] * khw[1], Ho * Wo), x.dtype)
    _im2col(x, *khw, *stride, *padding, col)
    return col


def _gathered(a):
    """(n, R, P) -> (R, n*P): one image after another along the columns (a copy)."""
    return a.transpose(1, 0, 2).reshape(a.shape[1], -1)


def _flipped(w):
    """w (K, C, kh, kw) flipped in space with its channel axes swapped, (C, K, kh, kw): the kernel
    that convolves gy into gx at stride 1."""
    return np.ascontiguousarray(w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))


@one_blas_thread
def _conv2d_forward_v2(x, w, b, stride, padding, Ho, Wo):
    N, C = x.shape[:2]
    K, _, kh, kw = w.shape
    P = Ho * Wo
    y = empty((N, K, P), x.dtype)
    for s in batches(N, C * kh * kw * P * x.itemsize):
        col = _cols(x[s], (kh, kw), stride, padding, Ho, Wo)  # (n, R, P)
        if P < _THIN:  # one GEMM over the images side by side
            y[s] = (w.reshape(K, -1) @ _gathered(col)).reshape(K, -1, P).transpose(1, 0, 2)
        else:
            np.matmul(w.reshape(K, -1), col, out=y[s])          # (K, R) @ (n, R, P) -> (n, K, P)
    if b is not None:
        y += b[:, None]
    return y.reshape(N, K, Ho, Wo)


@one_blas_thread
def _conv2d_backward_input_v2(gy, w, x_shape, stride, padding):
    N, K, Ho, Wo = gy.shape
    C = x_shape[1]
    kh, kw = w.shape[2:]
    (ph, pw) = padding
    if stride == (1, 1) and ph < kh and pw < kw and K <= C:
        # With stride 1, gx is itself a convolution: of gy, with the kernel flipped in space and
        # its channel axes swapped, and padding k-1-p. Its im2col (of gy: K*kh*kw rows) is no
        # larger than col2im's columns (C*kh*kw rows) here, and its GEMM has the long inner
        # dimension K*kh*kw rather than K, which BLAS runs faster.
        return _conv2d_forward_v2(gy, _flipped(w), None, (1, 1), (kh - 1 - ph, kw - 1 - pw), *x_shape[2:])
    gy = gy.reshape(N, K, Ho * Wo)
    w_t = w.reshape(K, -1).T                                    # (R, K)
    if (kh, kw) == (1, 1) and stride == (1, 1) and padding == (0, 0):
        return np.matmul(w_t, gy).reshape(x_shape)              # col2im of a 1x1 kernel: the identity
    gx = empty(x_shape, gy.dtype)
    for s in batches(N, C * kh * kw * Ho * Wo * gy.itemsize):
        gcol = scratch((s.stop - s.start, C * kh * kw, Ho * Wo), gy.dtype)
        np.matmul(w_t, gy[s], out=gcol)                         # (R, K) @ (n, K, P) -> (n, R, P)
        _col2im(gcol, kh, kw, *stride, *padding, gx[s])
    return gx


@one_blas_thread
def _conv2d_backward_weight_v2(x, gy, w_shape, stride, padding):
    N, K, Ho, Wo = gy.shape
    C, kh, kw = w_shape[1:]
    P = Ho * Wo
    gy = gy.reshape(N, K, P)
    gw = np.zeros((K, C * kh * kw), x.dtype)
    for s in batches(N, C * kh * kw * P * x.itemsize):
        col = _cols(x[s], (kh, kw), stride, padding, Ho, Wo)   # (n, R, P)
        if P < _THIN:  # one GEMM over the images side by side: (K, n*P) @ (n*P, R)
            gw += _gathered(gy[s]) @ _gathered(col).T
        else:
            # sum_n col[n] (R, P) @ gy[n].T (P, K), in the orientation OpenBLAS runs faster here
            gw += np.matmul(col, gy[s].transpose(0, 2, 1)).sum(axis=0).T
    return gw.reshape(w_shape)


# ---------------------------------------------------------------------------------------------
# convolution v3: direct loops over zero-padded planes, register-blocked
# ---------------------------------------------------------------------------------------------
# v3 computes a stride-1 correlation y[i, j] = sum_{u,v} w[u, v] * xp[i + u, j + v] over a
# zero-padded copy xp of each input plane, and it never builds im2col's columns: for a 3x3
# kernel those are 9 copies of x, written out and read back (and repacked by BLAS), and when
# the layer has few output channels (K = 16 at the top of a U-Net) every column entry is used
# only K times, so v2's GEMM runs at the speed of memory, not of the FPU. v3 reads each x
# straight from the padded plane, once per block of 4 output channels.
#
# The padded plane is stored flat with row length Wp = Wo + kw - 1, which makes every tap a
# constant offset: xp[i + u, j + v] = plane[(i*Wp + j) + (u*Wp + v)]. So v3 runs over the
# flat index p = i*Wp + j of an "extended" output of Ho rows of Wp (its last kw - 1 columns are
# garbage, computed and dropped) in long straight loops with no per-row bookkeeping, which
# LLVM vectorises: in the 3x3 case the three taps of a kernel row and four output channels
# share each load of x, so one pass of the loop does 12 fused multiply-adds on vector lanes.
#
# Strided convolutions are not v3's business (None never picks it for them), but every version
# computes every case: a stride s forward is the stride-1 one read at every s-th place, and
# the gradients dilate gy (s - 1 zeros between its entries) and correlate at stride 1.

_V3_CHUNK = 1024  # output places per task in v3's forward: 4 channels' accumulators stay in L1
_V3_FAST = {"contract"}            # let LLVM fuse a*b + c into one FMA
_V3_REDUCE = {"contract", "reassoc"}  # ... and reorder sums, so the reductions vectorise


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


def _conv2d_forward_v3(x, w, b, stride, padding, Ho, Wo, relu):
    N, K, (kh, kw), (sh, sw), (ph, pw) = x.shape[0], w.shape[0], w.shape[2:], stride, padding
    H1, W1 = (Ho - 1) * sh + 1, (Wo - 1) * sw + 1              # the stride-1 output that covers y
    Wp = W1 + kw - 1
    xp = _padded(x, ph, pw, H1 + kh - 1, Wp, kw)
    b = np.zeros(K, x.dtype) if b is None else b
    y = empty((N, K, H1, W1), x.dtype)
    _correlate_v3(xp, w, b, relu, Wp, H1, W1, y)
    return y if (sh, sw) == (1, 1) else np.ascontiguousarray(y[:, :, ::sh, ::sw])


def _conv2d_backward_input_v3(gy, w, x_shape, stride, padding):
    # gx[h, q] = sum_{k,u,v} gyd[h + ph - u, q + pw - v] * w[k, c, u, v] with gyd gy dilated:
    # a stride-1 correlation of gyd with w flipped in space and its channel axes swapped,
    # padded by kh-1-ph on top (negative: cropped).
    (N, C, H, W), (kh, kw), (sh, sw), (ph, pw) = x_shape, w.shape[2:], stride, padding
    Ho, Wo = gy.shape[2:]
    gyd = _dilated(gy, stride, (N, gy.shape[1], (Ho - 1) * sh + 1, (Wo - 1) * sw + 1))
    Wp = W + kw - 1
    gp = _padded(gyd, kh - 1 - ph, kw - 1 - pw, H + kh - 1, Wp, kw)
    gx = empty(x_shape, gy.dtype)
    _correlate_v3(gp, _flipped(w), np.zeros(C, gy.dtype), False, Wp, H, W, gx)
    return gx


def _conv2d_backward_weight_v3(x, gy, w_shape, stride, padding, relu_y, bias):
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


# ---------------------------------------------------------------------------------------------
# convolution: the public kernels
# ---------------------------------------------------------------------------------------------

# An input may be a list of arrays (N, C_i, H, W): the convolution of their concatenation along
# channels (the U-Net's skip features and up-convolved features), whose input gradient is then
# the list of theirs. v4's Winograd kernels read two inputs where they lie and write the two
# gradients in place (conv2d_winograd._input_rows, _output_transform): no concatenated copy is
# ever made. The other versions read one array: for them the list is concatenated (and the
# gradient split) by the concat kernels, as a separate torch.cat would.

def _joined(x):
    """x, or a list's concatenation along channels (a copy)"""
    return concat_forward(x, [(0, 0)] * len(x), x[0].shape[2:]) if isinstance(x, list) else x


def _two(x):
    """(x, x2), an input as v4's Winograd kernels read it: x alone (x2 a view of none of its
    channels), or a list's first array and the rest"""
    if not isinstance(x, list):
        return x, x[:, :0]
    return x[0], x[1] if len(x) == 2 else _joined(x[1:])


def _shape(x):
    """the (N, C, H, W) of an input or a list of inputs"""
    if not isinstance(x, list):
        return tuple(x.shape)
    return (x[0].shape[0], sum(a.shape[1] for a in x), *x[0].shape[2:])


def conv2d_forward(x, w, b, stride, padding, version=None, relu=False):
    # x: (N, C, H, W) or a list of (N, C_i, H, W) (see above), w: (K, C, kh, kw), b: (K,) or None
    # -> y: (N, K, Ho, Wo) (max(y, 0) with relu)
    N, C, H, W = _shape(x)
    Ho, Wo = conv_out_hw((H, W), w.shape[2:], stride, padding)
    v = version or choose_version(stride, w.shape[2:], padding, C, w.shape[0], Ho * Wo)
    if v == 4 and _winograd_fits(stride, w.shape[2:]):   # v4 adds the bias and the ReLU as it writes y
        return _winograd(*_two(x), None, w, False, b, relu, *padding, Ho, Wo, w.shape[0])[0]
    x = _joined(x)
    if v == 4 and _pointwise(stride, w.shape[2:], padding):
        y = empty((x.shape[0], w.shape[0], Ho, Wo), x.dtype)
        gemm.pointwise_forward(x, w.reshape(w.shape[0], -1), np.zeros(w.shape[0], x.dtype) if b is None else b,
                               relu, gemm.row_blocks(Ho, Wo), y)
        return y
    if v >= 3:                                           # v3 too adds them as it writes y
        return _conv2d_forward_v3(x, w, b, stride, padding, Ho, Wo, relu)
    if v == 1:
        y = empty((x.shape[0], w.shape[0], Ho, Wo), x.dtype)
        _conv2d_forward_v1(x, w, np.zeros(w.shape[0], x.dtype) if b is None else b, *stride, *padding, y)
    else:
        y = _conv2d_forward_v2(x, w, b, stride, padding, Ho, Wo)
    if relu:  # v1 and v2 fuse no ReLU: a second pass, in place
        np.maximum(y, 0, out=y)
    return y


def conv2d_backward_input(gy, w, x_shape, stride, padding, version=None, relu_y=None):
    # gy: (N, K, Ho, Wo), w: (K, C, kh, kw), relu_y: gy's shape or None -> gx: x_shape = (N, C, H, W);
    # x_shape a list of shapes (the inputs of a list, see above) -> the list of their gradients
    shapes = x_shape if isinstance(x_shape, list) else None
    if shapes:
        x_shape = (shapes[0][0], sum(s[1] for s in shapes), *shapes[0][2:])
    N, C, H, W = x_shape
    v = version or choose_version(stride, w.shape[2:], padding, w.shape[0], C, H * W)
    if v == 4 and _winograd_fits(stride, w.shape[2:]):   # v4 masks gy as it reads it
        gx, gx2 = _winograd(gy, gy[:, :0], relu_y, w, True, None, False, 2 - padding[0], 2 - padding[1], H, W,
                            shapes[0][1] if shapes else C)  # gy padded by 2 - p
        if not shapes:
            return gx
        return [gx, gx2] if len(shapes) == 2 else [gx] + concat_backward(gx2, shapes[1:], [(0, 0)] * (len(shapes) - 1))
    gx = _conv2d_backward_input(gy, w, x_shape, stride, padding, v, relu_y)
    return concat_backward(gx, shapes, [(0, 0)] * len(shapes)) if shapes else gx


def _conv2d_backward_input(gy, w, x_shape, stride, padding, v, relu_y):
    # v1 to v3 and v4's 1x1 product
    N, C, H, W = x_shape
    gy = gy if relu_y is None else relu_backward(gy, relu_y)  # masked by a pass of its own
    if v == 1:
        gx = zeros(x_shape, gy.dtype)
        _conv2d_backward_input_v1(gy, w, *stride, *padding, gx)
        return gx
    if v == 4 and _pointwise(stride, w.shape[2:], padding):
        gx = empty(x_shape, gy.dtype)
        gemm.pointwise_forward(gy, np.ascontiguousarray(w.reshape(w.shape[0], -1).T), np.zeros(C, gy.dtype), False,
                               gemm.row_blocks(H, W), gx)
        return gx
    if v >= 3:
        return _conv2d_backward_input_v3(gy, w, x_shape, stride, padding)
    return _conv2d_backward_input_v2(gy, w, x_shape, stride, padding)


def conv2d_backward_weight(x, gy, w_shape, stride, padding, version=None, relu_y=None, bias=False):
    # x: (N, C, H, W) or a list (see above), gy: (N, K, Ho, Wo), relu_y: gy's shape or None -> gw:
    # w_shape = (K, C, kh, kw), or (gw, gb (K,)) with bias
    K, C, kh, kw = w_shape
    v = version or choose_version(stride, (kh, kw), padding, C, K, gy.shape[2] * gy.shape[3])
    if v == 4 and _winograd_fits(stride, (kh, kw)):      # v4 masks gy as it reads it, and sums gb
        gw, gb = conv2d_winograd_weight.conv2d_backward_weight(*_two(x), gy, w_shape, padding, relu_y)
        return (gw, gb) if bias else gw
    x = _joined(x)
    if v >= 3 and not _pointwise(stride, (kh, kw), padding):   # v3 masks gy as it pads it
        gw, gb = _conv2d_backward_weight_v3(x, gy, w_shape, stride, padding, relu_y, bias)
        return (gw, gb) if bias else gw
    gy = gy if relu_y is None else relu_backward(gy, relu_y)  # the others: passes of their own
    gw = _conv2d_backward_weight(x, gy, w_shape, stride, padding, v)
    return (gw, bias_backward(gy)) if bias else gw


def _conv2d_backward_weight(x, gy, w_shape, stride, padding, v):
    # v1, v2 and v4's 1x1 product
    K, C, kh, kw = w_shape
    if v == 1:
        gw = np.empty(w_shape, x.dtype)
        _conv2d_backward_weight_v1(x, gy, *stride, *padding, gw)
        return gw
    if v == 4 and _pointwise(stride, (kh, kw), padding):
        gw = np.empty(w_shape, x.dtype)
        gemm.weight_gradient(gy, x, gw.reshape(K, C))
        return gw
    return _conv2d_backward_weight_v2(x, gy, w_shape, stride, padding)
