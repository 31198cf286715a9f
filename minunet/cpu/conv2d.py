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
  v3  direct loops over zero-padded planes, blocked for the FPU's registers (conv2d_direct.py
      teaches it): no columns, so nothing 9x the size of x goes through memory, and no packing of
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

from minunet.contract import conv_out_hw, joined_shape
from minunet.cpu import conv2d_direct, conv2d_winograd, conv2d_winograd_small, conv2d_winograd_weight, gemm
from minunet.cpu.activation import bias_backward, relu_backward
from minunet.cpu.concat import concat_backward, concat_forward
from minunet.cpu.runtime import batches, empty, kernel, one_blas_thread, scratch, zeros

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
    small = conv2d_winograd_small.suits(x.shape[0], x.shape[1] + x2.shape[1], c_out, Ho, Wo)
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
        return _conv2d_forward_v2(gy, conv2d_direct.flipped(w), None, (1, 1), (kh - 1 - ph, kw - 1 - pw), *x_shape[2:])
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
    return joined_shape([a.shape for a in x]) if isinstance(x, list) else tuple(x.shape)


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
        return conv2d_direct.forward(x, w, b, stride, padding, Ho, Wo, relu)
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
        x_shape = joined_shape(shapes)
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
        return conv2d_direct.backward_input(gy, w, x_shape, stride, padding)
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
        gw, gb = conv2d_direct.backward_weight(x, gy, w_shape, stride, padding, relu_y, bias)
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
