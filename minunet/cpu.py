"""minunet.cpu: the CPU kernels (numba + NumPy), one function per entry of backend.KERNELS.

Every public function here has the name, signature and meaning listed in
`minunet.backend.KERNELS`; minunet/cuda.py implements the same set on the GPU. Arrays are
NumPy, NCHW, C-contiguous, float32 or float64; outputs come back in the input dtype and
pooling indices as int64.

How a kernel is built
---------------------
Each public function is a thin Python wrapper that checks its arguments (so a wrong dtype or
layout gives a message naming the op, the argument and the shape, never a numba typing trace
or an out-of-bounds read: numba does not check bounds), allocates the outputs with NumPy and
hands everything to a `_jit` loop, exactly as cuda.py checks, allocates and launches. Only
`sgd_update` and `adam_update` write into their arguments.

The loops are numba `@njit(parallel=True, cache=True)` functions (see `_jit`) whose outer
loop is a `prange`; every iteration owns what it writes (one (n, c) image plane, one channel,
one pixel, one element), so no two threads write the same place and no atomics are needed.
`cache=True` keeps the machine code in __pycache__: each (kernel, dtype) pair is compiled once
per machine. Reductions (bias and batch-norm sums, weight gradients) accumulate in float64,
except within one plane where a kernel says so (vector partial sums in the input dtype).

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
      the 8x8, many-channel bottom, by 2x on the few-channel top; version=None picks it there
      and v2 elsewhere (_direct).

Transposed convolution is the adjoint of convolution in x (as in Chainer): its forward is
conv2d's backward_input with the roles of x and gy swapped, its backward_input is conv2d's
forward and its backward_weight is conv2d's backward_weight with x and gy swapped. The U-Net's
up-convolution (kernel == stride, no padding) has patches that do not overlap, so v2 runs it
as one GEMM per image, z[n] (Cout*kh*kw, H*W) = W.T @ x[n], and a reshuffle of each pixel's
(Cout, kh, kw) patch into place, with the bias added on the way.
"""
import functools
import math
import os
import threading

import numba
import numpy as np
from numba import prange

from minunet.checks import ArrayChecks, conv_out_hw as _conv_out_hw, same_shape as _same_shape
from minunet.checks import version as _checked_version

VERSIONS = {
    "conv2d_forward": (1, 2, 3),
    "conv2d_backward_input": (1, 2, 3),
    "conv2d_backward_weight": (1, 2, 3),
    "conv_transpose2d_forward": (1, 2, 3),
    "conv_transpose2d_backward_input": (1, 2, 3),
    "conv_transpose2d_backward_weight": (1, 2, 3),
}
DEFAULT_VERSION = {name: 2 for name in VERSIONS}

# numba runs prange loops on a thread pool: OpenMP's (GNU libgomp), or its own 'workqueue'.
# Between kernels, idle OpenMP workers spin (by default for ~300,000 polls) before they sleep,
# which makes the next launch cheap (3 us, against 80 us for workqueue's sleeping workers:
# a training step launches ~300 kernels) but takes cores from whatever runs next, and in
# minunet that is often an OpenBLAS GEMM. So minunet asks for OpenMP with a short spin,
# GOMP_SPINCOUNT=1000, set only while the pool starts (libgomp reads it as it loads) and only
# if the user set none; where OpenMP is missing numba falls back to workqueue. Measured on 2
# cores, the U-Net training step ran ~20% faster than on workqueue, and spinning 50,000 or
# 300,000 polls was slower again. The process has one libgomp: a library that loads it later
# (PyTorch, whose bundled copy has the same soname) shares this pool's settings, and one that
# loaded it first keeps its own. A user's NUMBA_THREADING_LAYER is left alone. workqueue
# aborts the process if two threads enter it at once (a running kernel does not hold the GIL),
# hence the lock around every launch.
if numba.config.THREADING_LAYER == "default":
    numba.config.THREADING_LAYER_PRIORITY = ["omp", "workqueue", "tbb"]
_launch_lock = threading.Lock()


@numba.njit(parallel=True, cache=True)
def _touch(x):
    for i in prange(x.size):
        x[i] = i


def _start_thread_pool():
    """Start numba's thread pool now, with GOMP_SPINCOUNT set for libgomp to read (see above)."""
    unset = "GOMP_SPINCOUNT" not in os.environ
    if unset:
        os.environ["GOMP_SPINCOUNT"] = "1000"
    try:
        _touch(np.zeros(numba.get_num_threads()))
    finally:
        if unset:  # not for other OpenMP runtimes, nor for child processes
            del os.environ["GOMP_SPINCOUNT"]


_start_thread_pool()


def _jit(fn=None, *, fastmath=False):
    """fn compiled as a numba parallel kernel (machine code cached on disk), launched one at a
    time; `@_jit(fastmath={...})` passes LLVM fast-math flags (see the v3 convolution)."""
    if fn is None:
        return functools.partial(_jit, fastmath=fastmath)
    kernel = numba.njit(parallel=True, cache=True, fastmath=fastmath)(fn)

    @functools.wraps(fn)
    def launch(*args):
        with _launch_lock:
            return kernel(*args)
    return launch


# ---------------------------------------------------------------------------------------------
# argument checks (minunet/checks.py)
# ---------------------------------------------------------------------------------------------

_check = ArrayChecks(np, "CPU")
_floats, _int64, _vector = _check.floats, _check.int64, _check.vector


# version=None runs v3 instead of DEFAULT_VERSION's v2 for every stride-1 convolution with a
# kernel larger than 1x1, except on planes smaller than _DIRECT_PLANE places that also have
# more than _DIRECT_CHANNELS output channels (the 8x8 bottom of a wide U-Net): there v2's GEMMs
# are big enough for BLAS to win. A 1x1 kernel needs no im2col, so v2 is a plain GEMM; strided
# convolutions are v2's. Measured on the U-Net's layers, 2 cores, with
# `PYTHONPATH=. python -m pytest benchmarks/bench_cpu.py --benchmark-only -k conv2d`.
_DIRECT_PLANE = 16 * 16
_DIRECT_CHANNELS = 64


def _direct(stride, khw, plane, channels):
    """Whether version=None runs v3: see above. `plane` is the output's Ho*Wo (for
    backward_input, x's H*W) and `channels` its channel count."""
    return (tuple(stride) == (1, 1) and tuple(khw) != (1, 1)
            and (plane >= _DIRECT_PLANE or channels <= _DIRECT_CHANNELS))


def _version(op, version, direct=False):
    """The version to run: `version`, checked, or for None v3 where `direct` says it wins."""
    return _checked_version(op, version, VERSIONS[op], 3 if direct else DEFAULT_VERSION[op])


_SCRATCH_BYTES = 64 << 20  # v2 builds im2col columns for this many bytes' worth of images at a time
_THIN = 256  # below this many output pixels per image, v2 runs one GEMM over the images side by side


class _Scratch(threading.local):
    """Growing byte buffers per thread, for temporaries that never leave a kernel (im2col's
    columns, v3's padded planes): reusing them skips the page faults that a fresh array of that
    size costs on every call. A kernel that needs two at once takes them from two slots."""
    def __init__(self):
        self.bufs = {}


_scratch_space = _Scratch()


def _scratch(shape, dtype, slot=0):
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    buf = _scratch_space.bufs.get(slot)
    if buf is None or buf.nbytes < nbytes:
        buf = _scratch_space.bufs[slot] = np.empty(nbytes, np.uint8)
    return buf[:nbytes].view(dtype).reshape(shape)


# ---------------------------------------------------------------------------------------------
# convolution v1: direct loops
# ---------------------------------------------------------------------------------------------

@_jit
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


@_jit
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


@_jit
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


@_jit
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


@_jit
def _col2im(col, b, kh, kw, sh, sw, ph, pw, x):
    # col: (N, C*kh*kw, Ho*Wo) -> x: (N, C, H, W), im2col's adjoint: each plane x[n, c] starts at
    # b[c] and every entry of its rows (c, *, *) of col is added onto the pixel it came from.
    # One prange iteration per plane x[n, c].
    N, C, H, W = x.shape
    Ho, Wo = (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1
    for nc in prange(N * C):
        n, c = nc // C, nc % C
        x[n, c] = b[c]
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


@_jit
def _patches_to_image(z, b, kh, kw, y):
    # z: (N, Cout*kh*kw, H*W) -> y: (N, Cout, H*kh, W*kw), y[n, o, i*kh+u, j*kw+v] = z[n, (o,u,v), (i,j)] + b[o]:
    # col2im when kernel == stride and there is no padding, so every output has exactly one source.
    # One prange iteration per output plane y[n, o].
    N, Cout, Ho, Wo = y.shape
    H, W = Ho // kh, Wo // kw
    for no in prange(N * Cout):
        n, o = no // Cout, no % Cout
        for u in range(kh):
            for v in range(kw):
                src = z[n, (o * kh + u) * kw + v]
                for i in range(H):
                    dst = y[n, o, i * kh + u]
                    for j in range(W):
                        dst[j * kw + v] = src[i * W + j] + b[o]


def _batches(N, sample_nbytes):
    """Slices of the batch whose temporaries (sample_nbytes per image) fit in _SCRATCH_BYTES, one
    image at least: the scratch buffer stays bounded however large the images or the batch."""
    step = max(1, _SCRATCH_BYTES // sample_nbytes)
    return [slice(n, min(n + step, N)) for n in range(0, N, step)]


def _cols(x, khw, stride, padding, Ho, Wo):
    """im2col of x (a slice of the batch) into the scratch buffer; for a 1x1 kernel with stride 1
    and no padding, x itself."""
    N, C, H, W = x.shape
    if khw == (1, 1) and stride == (1, 1) and padding == (0, 0):
        return x.reshape(N, C, H * W)
    col = _scratch((N, C * khw[0] * khw[1], Ho * Wo), x.dtype)
    _im2col(x, *khw, *stride, *padding, col)
    return col


def _gathered(a):
    """(n, R, P) -> (R, n*P): one image after another along the columns (a copy)."""
    return a.transpose(1, 0, 2).reshape(a.shape[1], -1)


def _flipped(w):
    """w (K, C, kh, kw) flipped in space with its channel axes swapped, (C, K, kh, kw): the kernel
    that convolves gy into gx at stride 1."""
    return np.ascontiguousarray(w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))


def _conv2d_forward_v2(x, w, b, stride, padding, Ho, Wo):
    N, C = x.shape[:2]
    K, _, kh, kw = w.shape
    P = Ho * Wo
    y = np.empty((N, K, P), x.dtype)
    for s in _batches(N, C * kh * kw * P * x.itemsize):
        col = _cols(x[s], (kh, kw), stride, padding, Ho, Wo)  # (n, R, P)
        if P < _THIN:  # one GEMM over the images side by side
            y[s] = (w.reshape(K, -1) @ _gathered(col)).reshape(K, -1, P).transpose(1, 0, 2)
        else:
            np.matmul(w.reshape(K, -1), col, out=y[s])          # (K, R) @ (n, R, P) -> (n, K, P)
    if b is not None:
        y += b[:, None]
    return y.reshape(N, K, Ho, Wo)


def _conv2d_backward_input_v2(gy, w, x_shape, stride, padding, b=None):
    # gx, plus b[c] on every plane where b is given (conv_transpose2d's bias)
    N, K, Ho, Wo = gy.shape
    C = x_shape[1]
    kh, kw = w.shape[2:]
    (ph, pw) = padding
    if stride == (1, 1) and ph < kh and pw < kw and K <= C:
        # With stride 1, gx is itself a convolution: of gy, with the kernel flipped in space and
        # its channel axes swapped, and padding k-1-p. Its im2col (of gy: K*kh*kw rows) is no
        # larger than col2im's columns (C*kh*kw rows) here, and its GEMM has the long inner
        # dimension K*kh*kw rather than K, which BLAS runs faster.
        return _conv2d_forward_v2(gy, _flipped(w), b, (1, 1), (kh - 1 - ph, kw - 1 - pw), *x_shape[2:])
    gy = gy.reshape(N, K, Ho * Wo)
    w_t = w.reshape(K, -1).T                                    # (R, K)
    if (kh, kw) == (1, 1) and stride == (1, 1) and padding == (0, 0):
        gx = np.matmul(w_t, gy)                                 # col2im of a 1x1 kernel: the identity
        if b is not None:
            gx += b[:, None]
        return gx.reshape(x_shape)
    b = np.zeros(C, gy.dtype) if b is None else b
    gx = np.empty(x_shape, gy.dtype)
    for s in _batches(N, C * kh * kw * Ho * Wo * gy.itemsize):
        gcol = _scratch((s.stop - s.start, C * kh * kw, Ho * Wo), gy.dtype)
        np.matmul(w_t, gy[s], out=gcol)                         # (R, K) @ (n, K, P) -> (n, R, P)
        _col2im(gcol, b, kh, kw, *stride, *padding, gx[s])
    return gx


def _conv2d_backward_weight_v2(x, gy, w_shape, stride, padding):
    N, K, Ho, Wo = gy.shape
    C, kh, kw = w_shape[1:]
    P = Ho * Wo
    gy = gy.reshape(N, K, P)
    gw = np.zeros((K, C * kh * kw), x.dtype)
    for s in _batches(N, C * kh * kw * P * x.itemsize):
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


@_jit
def _pad_planes(x, top, left, Hp, Wp, xp):
    # x: (N, C, H, W) -> xp: (N, C, Hp*Wp + tail), xp[n, c, h*Wp + q] = x[n, c, h - top, q - left]
    # where that lies inside x, else 0 (top and left may be negative: a crop). One plane per
    # task; each place is written once (a zero fill first would double the memory traffic).
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


def _padded(x, top, left, Hp, Wp, tail, slot=0):
    """x as zero-padded flat planes (N, C, Hp*Wp + tail) with x[.., 0, 0] at row top, column
    left, in scratch buffer `slot`."""
    xp = _scratch((*x.shape[:2], Hp * Wp + tail), x.dtype, slot)
    _pad_planes(x, top, left, Hp, Wp, xp)
    return xp


@_jit(fastmath=_V3_FAST)
def _correlate_v3(xp, w, b, Wp, Ho, Wo, y):
    # y[n, k, i, j] = b[k] + sum_{c,u,v} w[k,c,u,v] * xp[n, c, (i+u)*Wp + j+v]; one task per
    # (image, block of 4 output channels, chunk of whole extended rows)
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
                    dst[j] = src[j] + b[k]


@_jit(fastmath=_V3_REDUCE)
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


def _conv2d_forward_v3(x, w, b, stride, padding, Ho, Wo):
    N, K, (kh, kw), (sh, sw), (ph, pw) = x.shape[0], w.shape[0], w.shape[2:], stride, padding
    H1, W1 = (Ho - 1) * sh + 1, (Wo - 1) * sw + 1              # the stride-1 output that covers y
    Wp = W1 + kw - 1
    xp = _padded(x, ph, pw, H1 + kh - 1, Wp, kw)
    b = np.zeros(K, x.dtype) if b is None else b
    y = np.empty((N, K, H1, W1), x.dtype)
    _correlate_v3(xp, w, b, Wp, H1, W1, y)
    return y if (sh, sw) == (1, 1) else np.ascontiguousarray(y[:, :, ::sh, ::sw])


def _conv2d_backward_input_v3(gy, w, x_shape, stride, padding, b=None):
    # gx[h, q] = sum_{k,u,v} gyd[h + ph - u, q + pw - v] * w[k, c, u, v] with gyd gy dilated:
    # a stride-1 correlation of gyd with w flipped in space and its channel axes swapped,
    # padded by kh-1-ph on top (negative: cropped). b, where given, is added to every plane.
    (N, C, H, W), (kh, kw), (sh, sw), (ph, pw) = x_shape, w.shape[2:], stride, padding
    Ho, Wo = gy.shape[2:]
    gyd = _dilated(gy, stride, (N, gy.shape[1], (Ho - 1) * sh + 1, (Wo - 1) * sw + 1))
    Wp = W + kw - 1
    gp = _padded(gyd, kh - 1 - ph, kw - 1 - pw, H + kh - 1, Wp, kw)
    gx = np.empty(x_shape, gy.dtype)
    _correlate_v3(gp, _flipped(w), np.zeros(C, gy.dtype) if b is None else b, Wp, H, W, gx)
    return gx


def _conv2d_backward_weight_v3(x, gy, w_shape, stride, padding):
    (K, _, kh, kw), (sh, sw), (ph, pw) = w_shape, stride, padding
    N, _, Ho, Wo = gy.shape
    H1, W1 = (Ho - 1) * sh + 1, (Wo - 1) * sw + 1
    Wp = W1 + kw - 1
    xp = _padded(x, ph, pw, H1 + kh - 1, Wp, kw)
    gp = _padded(_dilated(gy, stride, (N, K, H1, W1)), 0, 0, H1, Wp, 0, slot=1)  # 0 in the garbage columns
    gw = np.empty(w_shape, x.dtype)
    _correlate_grad_v3(xp, gp, Wp, gw)
    return gw


# ---------------------------------------------------------------------------------------------
# convolution: the public kernels
# ---------------------------------------------------------------------------------------------

def conv2d_forward(x, w, b, stride, padding, version=None):
    # x: (N, C, H, W), w: (K, C, kh, kw), b: (K,) or None -> y: (N, K, Ho, Wo)
    op = "conv2d_forward"
    dtype = _floats(op, ("x", x), ("w", w), ndim=4)
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"{op}: x {x.shape} has {x.shape[1]} channels but w {w.shape} expects {w.shape[1]}")
    stride, padding = tuple(stride), tuple(padding)
    Ho, Wo = _conv_out_hw(op, x.shape[2:], w.shape[2:], stride, padding)
    v = _version(op, version, _direct(stride, w.shape[2:], Ho * Wo, w.shape[0]))
    if v == 1:
        y = np.empty((x.shape[0], w.shape[0], Ho, Wo), dtype)
        _conv2d_forward_v1(x, w, _vector(op, "b", b, w.shape[0], dtype, 0), *stride, *padding, y)
        return y
    b = None if b is None else _vector(op, "b", b, w.shape[0], dtype)
    if v == 3:
        return _conv2d_forward_v3(x, w, b, stride, padding, Ho, Wo)
    return _conv2d_forward_v2(x, w, b, stride, padding, Ho, Wo)


def conv2d_backward_input(gy, w, x_shape, stride, padding, version=None):
    # gy: (N, K, Ho, Wo), w: (K, C, kh, kw) -> gx: x_shape = (N, C, H, W)
    op = "conv2d_backward_input"
    dtype = _floats(op, ("gy", gy), ("w", w), ndim=4)
    stride, padding, x_shape = tuple(stride), tuple(padding), tuple(x_shape)
    N, C, H, W = x_shape
    v = _version(op, version, _direct(stride, w.shape[2:], H * W, C))
    if C != w.shape[1]:
        raise ValueError(f"{op}: x_shape {x_shape} has {C} channels but w {w.shape} expects {w.shape[1]}")
    _same_shape(op, "gy", gy, (N, w.shape[0], *_conv_out_hw(op, (H, W), w.shape[2:], stride, padding)))
    if v == 1:
        gx = np.zeros(x_shape, dtype)
        _conv2d_backward_input_v1(gy, w, *stride, *padding, gx)
        return gx
    if v == 3:
        return _conv2d_backward_input_v3(gy, w, x_shape, stride, padding)
    return _conv2d_backward_input_v2(gy, w, x_shape, stride, padding)


def conv2d_backward_weight(x, gy, w_shape, stride, padding, version=None):
    # x: (N, C, H, W), gy: (N, K, Ho, Wo) -> gw: w_shape = (K, C, kh, kw)
    op = "conv2d_backward_weight"
    dtype = _floats(op, ("x", x), ("gy", gy), ndim=4)
    stride, padding, w_shape = tuple(stride), tuple(padding), tuple(w_shape)
    K, C, kh, kw = w_shape
    v = _version(op, version, _direct(stride, (kh, kw), gy.shape[2] * gy.shape[3], K))
    if x.shape[1] != C:
        raise ValueError(f"{op}: x {x.shape} has {x.shape[1]} channels but w_shape {w_shape} expects {C}")
    _same_shape(op, "gy", gy, (x.shape[0], K, *_conv_out_hw(op, x.shape[2:], (kh, kw), stride, padding)))
    if v == 1:
        gw = np.empty(w_shape, dtype)
        _conv2d_backward_weight_v1(x, gy, *stride, *padding, gw)
        return gw
    if v == 3:
        return _conv2d_backward_weight_v3(x, gy, w_shape, stride, padding)
    return _conv2d_backward_weight_v2(x, gy, w_shape, stride, padding)


# ---------------------------------------------------------------------------------------------
# transposed convolution: conv2d's kernels with x and gy swapped
# ---------------------------------------------------------------------------------------------

def conv_transpose2d_forward(x, w, b, stride, padding, output_padding, version=None):
    # x: (N, Cin, H, W), w: (Cin, Cout, kh, kw), b: (Cout,) or None -> y: (N, Cout, Ho, Wo)
    op = "conv_transpose2d_forward"
    v = _version(op, version)
    dtype = _floats(op, ("x", x), ("w", w), ndim=4)
    N, Cin, H, W = x.shape
    if w.shape[0] != Cin:
        raise ValueError(f"{op}: x {x.shape} has {Cin} channels but w {w.shape} expects {w.shape[0]}")
    _, Cout, kh, kw = w.shape
    stride, padding, output_padding = tuple(stride), tuple(padding), tuple(output_padding)
    (sh, sw), (ph, pw), (oph, opw) = stride, padding, output_padding
    y_shape = (N, Cout, (H - 1) * sh - 2 * ph + kh + oph, (W - 1) * sw - 2 * pw + kw + opw)
    if y_shape[2] <= 0 or y_shape[3] <= 0:
        raise ValueError(f"{op}: input {H}x{W} with kernel {kh}x{kw}, stride {stride} and padding "
                         f"{padding} gives an empty output ({y_shape[2]}x{y_shape[3]})")
    if not (0 <= oph < sh and 0 <= opw < sw):
        raise ValueError(f"{op}: output_padding {output_padding} must be smaller than stride {stride}")
    b = None if b is None else _vector(op, "b", b, Cout, dtype)
    if v == 1:
        y = np.zeros(y_shape, dtype)
        _conv2d_backward_input_v1(x, w, sh, sw, ph, pw, y)
        if b is not None:
            y += b[:, None, None]
        return y
    if v == 3:
        return _conv2d_backward_input_v3(x, w, y_shape, stride, padding, b)
    if (kh, kw) == stride and padding == (0, 0) and output_padding == (0, 0):
        # patches that do not overlap: z[n] (Cout*kh*kw, H*W) = W.T @ x[n], then each into place
        b = np.zeros(Cout, dtype) if b is None else b
        y = np.empty(y_shape, dtype)
        for s in _batches(N, Cout * kh * kw * H * W * x.itemsize):
            z = _scratch((s.stop - s.start, Cout * kh * kw, H * W), dtype)
            np.matmul(w.reshape(Cin, -1).T, x[s].reshape(-1, Cin, H * W), out=z)
            _patches_to_image(z, b, kh, kw, y[s])
        return y
    return _conv2d_backward_input_v2(x, w, y_shape, stride, padding, b)


def conv_transpose2d_backward_input(gy, w, stride, padding, version=None):
    # gy: (N, Cout, Ho, Wo), w: (Cin, Cout, kh, kw) -> gx: (N, Cin, H, W), a plain convolution
    op = "conv_transpose2d_backward_input"
    v = _version(op, version)
    dtype = _floats(op, ("gy", gy), ("w", w), ndim=4)
    if gy.shape[1] != w.shape[1]:
        raise ValueError(f"{op}: gy {gy.shape} has {gy.shape[1]} channels but w {w.shape} has Cout = {w.shape[1]}")
    stride, padding = tuple(stride), tuple(padding)
    Ho, Wo = _conv_out_hw(op, gy.shape[2:], w.shape[2:], stride, padding)
    if v == 1:
        gx = np.empty((gy.shape[0], w.shape[0], Ho, Wo), dtype)
        _conv2d_forward_v1(gy, w, np.zeros(w.shape[0], dtype), *stride, *padding, gx)
        return gx
    if v == 3:
        return _conv2d_forward_v3(gy, w, None, stride, padding, Ho, Wo)
    return _conv2d_forward_v2(gy, w, None, stride, padding, Ho, Wo)


def conv_transpose2d_backward_weight(x, gy, w_shape, stride, padding, version=None):
    # x: (N, Cin, H, W), gy: (N, Cout, Ho, Wo) -> gw: w_shape = (Cin, Cout, kh, kw)
    op = "conv_transpose2d_backward_weight"
    v = _version(op, version)
    dtype = _floats(op, ("x", x), ("gy", gy), ndim=4)
    stride, padding, w_shape = tuple(stride), tuple(padding), tuple(w_shape)
    Cin, Cout, kh, kw = w_shape
    if gy.shape[1] != Cout:
        raise ValueError(f"{op}: gy {gy.shape} has {gy.shape[1]} channels but w_shape {w_shape} has Cout = {Cout}")
    # in conv2d's terms gy is the input and x the output gradient
    _same_shape(op, "x", x, (gy.shape[0], Cin, *_conv_out_hw(op, gy.shape[2:], (kh, kw), stride, padding)))
    if v == 1:
        gw = np.empty(w_shape, dtype)
        _conv2d_backward_weight_v1(gy, x, *stride, *padding, gw)
        return gw
    if v == 3:
        return _conv2d_backward_weight_v3(gy, x, w_shape, stride, padding)
    return _conv2d_backward_weight_v2(gy, x, w_shape, stride, padding)


# ---------------------------------------------------------------------------------------------
# max pooling
# ---------------------------------------------------------------------------------------------

@_jit
def _max_pool2d_forward(x, kh, kw, sh, sw, ph, pw, y, argmax):
    # one prange iteration per plane (n, c); the first maximum in row-major window order wins,
    # a NaN wins over any number (it propagates, as in PyTorch); padded places are never read
    N, C, H, W = x.shape
    Ho, Wo = y.shape[2], y.shape[3]
    if (kh, kw, sh, sw, ph, pw) == (2, 2, 2, 2, 0, 0):   # the U-Net's pooling: no bounds to check
        for nc in prange(N * C):
            n, c = nc // C, nc % C
            for i in range(Ho):
                top, bot = x[n, c, 2 * i], x[n, c, 2 * i + 1]
                yr, ar = y[n, c, i], argmax[n, c, i]
                for j in range(Wo):
                    best, at = top[2 * j], 2 * i * W + 2 * j
                    for v, where in ((top[2 * j + 1], at + 1), (bot[2 * j], at + W), (bot[2 * j + 1], at + W + 1)):
                        if v > best or (v != v and best == best):
                            best, at = v, where
                    yr[j], ar[j] = best, at
        return
    for nc in prange(N * C):
        n, c = nc // C, nc % C
        for i in range(Ho):
            h0 = i * sh - ph
            for j in range(Wo):
                q0 = j * sw - pw
                best = x[n, c, max(h0, 0), max(q0, 0)]
                at = max(h0, 0) * W + max(q0, 0)
                for h in range(max(h0, 0), min(h0 + kh, H)):
                    for q in range(max(q0, 0), min(q0 + kw, W)):
                        v = x[n, c, h, q]
                        if v > best or (v != v and best == best):
                            best, at = v, h * W + q
                y[n, c, i, j] = best
                argmax[n, c, i, j] = at


@_jit
def _max_pool2d_backward(gy, argmax, gx):
    # gy, argmax: (N*C, Ho*Wo) -> gx: (N*C, H*W), zeroed by the caller; windows may overlap, so
    # one prange iteration per whole plane, which owns every += into it
    for nc in prange(gy.shape[0]):
        for s in range(gy.shape[1]):
            gx[nc, argmax[nc, s]] += gy[nc, s]


def max_pool2d_forward(x, kernel_size, stride, padding):
    # x: (N, C, H, W) -> y: (N, C, Ho, Wo), argmax: (N, C, Ho, Wo) int64
    op = "max_pool2d_forward"
    dtype = _floats(op, ("x", x), ndim=4)
    kernel_size, stride, padding = tuple(kernel_size), tuple(stride), tuple(padding)
    if not all(0 <= p <= k // 2 for p, k in zip(padding, kernel_size)):
        raise ValueError(f"{op}: padding {padding} must be at most half of kernel_size {kernel_size}")
    Ho, Wo = _conv_out_hw(op, x.shape[2:], kernel_size, stride, padding)
    y = np.empty((*x.shape[:2], Ho, Wo), dtype)
    argmax = np.empty(y.shape, np.int64)
    _max_pool2d_forward(x, *kernel_size, *stride, *padding, y, argmax)
    return y, argmax


def max_pool2d_backward(gy, argmax, x_shape):
    # gy: (N, C, Ho, Wo), argmax: (N, C, Ho, Wo) -> gx: x_shape = (N, C, H, W)
    op = "max_pool2d_backward"
    dtype = _floats(op, ("gy", gy), ndim=4)
    _int64(op, "argmax", argmax, gy.shape)
    N, C, H, W = x_shape
    if gy.shape[:2] != (N, C):
        raise ValueError(f"{op}: gy {gy.shape} does not match x_shape {tuple(x_shape)} in (N, C)")
    gx = np.zeros((N * C, H * W), dtype)
    _max_pool2d_backward(gy.reshape(N * C, -1), argmax.reshape(N * C, -1), gx)
    return gx.reshape(N, C, H, W)


# ---------------------------------------------------------------------------------------------
# crop-and-concatenate along channels
# ---------------------------------------------------------------------------------------------

@_jit
def _crop_into(x, top, left, c0, y):
    # y[:, c0 + c] = x[:, c, top:top+H, left:left+W] for every channel c of x; one iteration per plane
    N, C = x.shape[0], x.shape[1]
    H, W = y.shape[2], y.shape[3]
    for nc in prange(N * C):
        n, c = nc // C, nc % C
        y[n, c0 + c] = x[n, c, top:top + H, left:left + W]


@_jit
def _uncrop_from(gy, top, left, c0, gx):
    # gx[:, c] = 0 outside the window, gy[:, c0 + c] inside it; one iteration per plane
    N, C = gx.shape[0], gx.shape[1]
    H, W = gy.shape[2], gy.shape[3]
    for nc in prange(N * C):
        n, c = nc // C, nc % C
        gx[n, c] = 0
        gx[n, c, top:top + H, left:left + W] = gy[n, c0 + c]


def _check_windows(op, shapes, offsets, out_hw):
    if len(offsets) != len(shapes):
        raise ValueError(f"{op}: {len(shapes)} inputs but {len(offsets)} offsets")
    H, W = out_hw
    for i, (shape, (top, left)) in enumerate(zip(shapes, offsets)):
        if len(shape) != 4 or shape[0] != shapes[0][0]:
            raise ValueError(f"{op}: input {i} has shape {tuple(shape)}; every input must be "
                             f"(N={shapes[0][0]}, C_i, H_i, W_i)")
        if not (0 <= top and top + H <= shape[2] and 0 <= left and left + W <= shape[3]):
            raise ValueError(f"{op}: the {H}x{W} window at offset ({top}, {left}) does not fit "
                             f"in input {i} of shape {tuple(shape)}")


def concat_forward(xs, offsets, out_hw):
    # xs: list of (N, C_i, H_i, W_i) -> y: (N, sum C_i, H, W), input i cropped at offsets[i]
    op = "concat_forward"
    dtype = _floats(op, *((f"xs[{i}]", x) for i, x in enumerate(xs)))
    H, W = out_hw
    _check_windows(op, [x.shape for x in xs], offsets, (H, W))
    y = np.empty((xs[0].shape[0], sum(x.shape[1] for x in xs), H, W), dtype)
    c0 = 0
    for x, (top, left) in zip(xs, offsets):
        _crop_into(x, top, left, c0, y)
        c0 += x.shape[1]
    return y


def concat_backward(gy, x_shapes, offsets):
    # gy: (N, sum C_i, H, W) -> gxs: list of x_shapes[i], zero outside each crop window
    op = "concat_backward"
    dtype = _floats(op, ("gy", gy), ndim=4)
    x_shapes = [tuple(shape) for shape in x_shapes]
    _check_windows(op, x_shapes, offsets, gy.shape[2:])
    if x_shapes[0][0] != gy.shape[0] or sum(s[1] for s in x_shapes) != gy.shape[1]:
        raise ValueError(f"{op}: gy {gy.shape} does not match the inputs {x_shapes}")
    gxs, c0 = [], 0
    for shape, (top, left) in zip(x_shapes, offsets):
        gx = np.empty(shape, dtype)
        _uncrop_from(gy, top, left, c0, gx)
        gxs.append(gx)
        c0 += shape[1]
    return gxs


# ---------------------------------------------------------------------------------------------
# ReLU and bias
# ---------------------------------------------------------------------------------------------

@_jit
def _relu(x, y):
    # x, y: flat; NaN passes through (NaN <= 0 is False), as in PyTorch
    for i in prange(x.size):
        y[i] = 0 if x[i] <= 0 else x[i]


@_jit
def _bias_relu(x, b, y):
    # x, y: (N, C, H*W); one prange iteration per plane (n, c)
    N, C, L = x.shape
    for nc in prange(N * C):
        n, c = nc // C, nc % C
        for s in range(L):
            t = x[n, c, s] + b[c]
            y[n, c, s] = 0 if t <= 0 else t


@_jit
def _relu_backward(gy, y, gx):
    for i in prange(gy.size):
        gx[i] = gy[i] if y[i] > 0 else 0


@_jit(fastmath={"reassoc"})
def _bias_backward(gy, gb):
    # gy: (N, C, L) -> gb: (C,); one prange iteration per channel. Each plane is summed in the
    # input dtype (reassoc lets LLVM keep vector partial sums), the planes' sums in float64.
    N, C, L = gy.shape
    zero = np.zeros(1, gy.dtype)[0]
    for c in prange(C):
        acc = 0.0
        for n in range(N):
            plane, s = gy[n, c], zero
            for i in range(L):
                s += plane[i]
            acc += s
        gb[c] = acc


def relu_forward(x, b=None):
    # x: (N, C, H, W), b: (C,) -> y = max(x + b, 0): (N, C, H, W); without b, x of any shape
    op = "relu_forward"
    dtype = _floats(op, ("x", x))
    y = np.empty_like(x)
    if b is None:
        _relu(x.reshape(-1), y.reshape(-1))
        return y
    if x.ndim != 4:
        raise ValueError(f"{op}: a bias needs a 4-d x (N, C, H, W), got shape {x.shape}")
    N, C, H, W = x.shape
    _bias_relu(x.reshape(N, C, H * W), _vector(op, "b", b, C, dtype), y.reshape(N, C, H * W))
    return y


def relu_backward(gy, y):
    # gy, y: same shape -> gx = gy * (y > 0)
    op = "relu_backward"
    _floats(op, ("gy", gy), ("y", y))
    _same_shape(op, "y", y, gy.shape)
    gx = np.empty_like(gy)
    _relu_backward(gy.reshape(-1), y.reshape(-1), gx.reshape(-1))
    return gx


def bias_backward(gy):
    # gy: (N, C, H, W) -> gb: (C,)
    op = "bias_backward"
    dtype = _floats(op, ("gy", gy))
    if gy.ndim < 2:
        raise ValueError(f"{op}: gy must be (N, C, ...), got shape {gy.shape}")
    gb = np.empty(gy.shape[1], dtype)
    _bias_backward(gy.reshape(gy.shape[0], gy.shape[1], -1), gb)
    return gb


# ---------------------------------------------------------------------------------------------
# per-pixel softmax cross-entropy
# ---------------------------------------------------------------------------------------------

@_jit
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


@_jit
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


def softmax_cross_entropy_forward(x, target, weight, ignore_index):
    # x: (N, C, H, W) logits, target: (N, H, W) int64 -> loss: (N, H, W), p: (N, C, H, W)
    op = "softmax_cross_entropy_forward"
    dtype = _floats(op, ("x", x), ndim=4)
    N, C, H, W = x.shape
    _int64(op, "target", target, (N, H, W))
    loss = np.empty((N, H, W), dtype)
    p = np.empty_like(x)
    _softmax_cross_entropy_forward(x, target, _vector(op, "weight", weight, C, dtype, 1), int(ignore_index), loss, p)
    return loss, p


def softmax_cross_entropy_backward(p, target, weight, ignore_index, gloss):
    # p: (N, C, H, W), target, gloss: (N, H, W) -> gx: (N, C, H, W)
    op = "softmax_cross_entropy_backward"
    dtype = _floats(op, ("p", p), ("gloss", gloss))
    if p.ndim != 4:
        raise ValueError(f"{op}: p must have 4 dimensions, got shape {p.shape}")
    N, C, H, W = p.shape
    _int64(op, "target", target, (N, H, W))
    _same_shape(op, "gloss", gloss, (N, H, W))
    gx = np.empty_like(p)
    _softmax_cross_entropy_backward(p, target, _vector(op, "weight", weight, C, dtype, 1), int(ignore_index),
                                    gloss, gx)
    return gx


# ---------------------------------------------------------------------------------------------
# batch normalisation over (N, H, W), per channel
# ---------------------------------------------------------------------------------------------

@_jit
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


@_jit
def _batch_norm_forward(x, gamma, beta, mean, var, eps, y):
    # y = (x - mean) / sqrt(var + eps) * gamma + beta; x, y: (N, C, L); one iteration per plane
    N, C, L = x.shape
    for nc in prange(N * C):
        n, c = nc // C, nc % C
        mu, scale = mean[c], gamma[c] / math.sqrt(var[c] + eps)
        for i in range(L):
            y[n, c, i] = (x[n, c, i] - mu) * scale + beta[c]


@_jit
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


@_jit
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


def _as_ncl(op, x):
    if x.ndim < 2:
        raise ValueError(f"{op}: x must be (N, C, ...), got shape {x.shape}")
    return x.reshape(x.shape[0], x.shape[1], -1)


def batch_norm_forward(x, gamma, beta, mean, var, eps, training):
    # x: (N, C, H, W), gamma, beta, mean, var: (C,) -> y: (N, C, H, W), mean, var: (C,) used
    op = "batch_norm_forward"
    dtype = _floats(op, ("x", x))
    x3 = _as_ncl(op, x)
    C = x3.shape[1]
    if training:
        mean, var = np.empty(C, dtype), np.empty(C, dtype)
        _channel_mean_var(x3, mean, var)
    else:
        mean = _vector(op, "mean", mean, C, dtype).copy()
        var = _vector(op, "var", var, C, dtype).copy()
    y = np.empty_like(x)
    _batch_norm_forward(x3, _vector(op, "gamma", gamma, C, dtype, 1), _vector(op, "beta", beta, C, dtype, 0),
                        mean, var, float(eps), y.reshape(x3.shape))
    return y, mean, var


def batch_norm_backward(gy, x, gamma, mean, var, eps, training):
    # gy, x: (N, C, H, W), gamma, mean, var: (C,) -> gx: (N, C, H, W), ggamma, gbeta: (C,)
    op = "batch_norm_backward"
    dtype = _floats(op, ("gy", gy), ("x", x))
    _same_shape(op, "gy", gy, x.shape)
    x3 = _as_ncl(op, x)
    C = x3.shape[1]
    mean, var = _vector(op, "mean", mean, C, dtype), _vector(op, "var", var, C, dtype)
    gy3 = gy.reshape(x3.shape)
    gbeta, ggamma = np.empty(C, dtype), np.empty(C, dtype)
    _batch_norm_sums(gy3, x3, mean, var, float(eps), gbeta, ggamma)
    gx = np.empty_like(x)
    _batch_norm_backward_input(gy3, x3, _vector(op, "gamma", gamma, C, dtype, 1), mean, var, float(eps),
                               gbeta, ggamma, bool(training), gx.reshape(x3.shape))
    return gx, ggamma, gbeta


# ---------------------------------------------------------------------------------------------
# optimizer updates, in place, one element per prange iteration
# ---------------------------------------------------------------------------------------------

@_jit
def _sgd(p, g, lr, weight_decay):
    for i in prange(p.size):
        p[i] -= lr * (g[i] + weight_decay * p[i])


@_jit
def _sgd_momentum(p, g, buf, lr, momentum, dampening, weight_decay, nesterov, first):
    for i in prange(p.size):
        d = g[i] + weight_decay * p[i]
        b = d if first else momentum * buf[i] + (1.0 - dampening) * d
        buf[i] = b
        p[i] -= lr * (d + momentum * b if nesterov else b)


@_jit
def _adam(p, g, m, v, lr, beta1, beta2, eps, weight_decay, decoupled, step_size, bias_correction2_sqrt):
    for i in prange(p.size):
        gi = g[i]
        if decoupled:
            p[i] *= 1.0 - lr * weight_decay
        else:
            gi += weight_decay * p[i]
        m[i] = beta1 * m[i] + (1.0 - beta1) * gi
        v[i] = beta2 * v[i] + (1.0 - beta2) * gi * gi
        p[i] -= step_size * m[i] / (math.sqrt(v[i]) / bias_correction2_sqrt + eps)


def sgd_update(p, g, buf, lr, momentum, dampening, weight_decay, nesterov, first):
    # p, g, buf: one shape; updates p (and buf) in place
    op = "sgd_update"
    if momentum == 0:
        _floats(op, ("p", p), ("g", g))
        _same_shape(op, "g", g, p.shape)
        _sgd(p.reshape(-1), g.reshape(-1), float(lr), float(weight_decay))
        return None
    _floats(op, ("p", p), ("g", g), ("buf", buf))
    _same_shape(op, "g", g, p.shape)
    _same_shape(op, "buf", buf, p.shape)
    _sgd_momentum(p.reshape(-1), g.reshape(-1), buf.reshape(-1), float(lr), float(momentum),
                  float(dampening), float(weight_decay), bool(nesterov), bool(first))
    return None


def adam_update(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step, decoupled):
    # p, g, m, v: one shape; updates p, m, v in place; step counts from 1
    op = "adam_update"
    _floats(op, ("p", p), ("g", g), ("m", m), ("v", v))
    for name, a in (("g", g), ("m", m), ("v", v)):
        _same_shape(op, name, a, p.shape)
    step_size = lr / (1.0 - beta1 ** step)
    _adam(p.reshape(-1), g.reshape(-1), m.reshape(-1), v.reshape(-1), float(lr), float(beta1), float(beta2),
          float(eps), float(weight_decay), bool(decoupled), float(step_size), math.sqrt(1.0 - beta2 ** step))
    return None
