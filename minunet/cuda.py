"""minunet.cuda: the GPU kernels. Loads kernels/*.cu through cupy.RawModule and launches them.

Every public function here has the name, signature and meaning listed in
`minunet.backend.KERNELS` (the minunet/cpu/ package implements the same set with numba). Arrays are
cupy.ndarray, NCHW, C-contiguous, float32 or float64, pooling indices and targets int64.
Kernels allocate fresh outputs with cupy.empty (cupy.zeros where the kernel accumulates);
only sgd_update and adam_update write into their arguments.

How a kernel gets from a .cu file to the GPU
--------------------------------------------
kernels/ holds one .cu file per op family plus common.cuh. For a family, `_family_source`
builds the source as the TEXT of common.cuh followed by the TEXT of the family's .cu (not an
#include, so an edit to the header changes the source, hence CuPy's cache key, and a stale
binary is never loaded); `#line` markers keep compiler messages pointing at the right file
and line. Every kernel is a `template <typename T>`; `name_expressions` asks NVRTC for the
float and double instantiation of each (e.g. "conv2d_forward_v2<float>"), and
`module.get_function` finds them by those names. `_module` compiles each family once per
process, on first use; CuPy also keeps the binary in its on-disk cache, so later processes
skip NVRTC. The sources are found next to this file (minunet/kernels, where the wheel puts
them) or in the repository (kernels/ beside minunet/).

`_compile_table()` lists (family, source, name expressions, NVRTC options) for every family (the
one entry point for tools; it is private only because the public names here are the kernels):
tests/test_cuda_compile.py compiles exactly that for sm_80 and sm_90 on machines without a GPU.

Launchers
---------
Each public function checks its arguments (cupy arrays, one float dtype, C-contiguous,
matching shapes; errors name the op, the argument and the shapes, never a CUDA trace),
allocates the outputs, and launches. Sizes go to the kernels as np.int32, or np.int64 where
a count can pass 2^31 (flat element counts); scalars as the array's dtype. Every argument's
C type is spelled out next to the launch so the two can be checked against each other.
Elementwise kernels use 256-thread blocks and a grid-stride loop, so the grid is capped
(32 blocks per SM). Launches are asynchronous: results are ready when CuPy next syncs.

Versions
--------
The six convolution kernels take `version=` (VERSIONS; None means DEFAULT_VERSION):
  1  naive, one thread per output element (the _v1 kernels of conv2d.cu)
  2  shared-memory tiled implicit GEMM (the _v2 kernels of conv2d.cu)
The transposed convolution has no kernels of its own except one special case: it runs
conv2d.cu's kernels of the chosen version in the adjoint roles (its forward is conv2d's
backward_input with x as the output gradient, its backward_input conv2d's forward of gy, its
backward_weight conv2d's backward_weight with x and gy swapped, as in minunet/cpu/conv_transpose2d.py). Only
version 2 with kernel == stride and padding == 0 (the U-Net's 2x2/2 up-convolution; the
forward also needs output_padding 0) runs conv_transpose2d.cu's patch-GEMM kernels instead.
Weight gradients reduce over every output pixel of the batch but have few outputs, so
version 2 splits that reduction over blockIdx.z (split-K): each slice writes a partial
gradient into a (splits, ...) workspace that is summed at the end, in a fixed order, so the
result is deterministic.

This module imports cupy unconditionally: minunet.backend imports it only for cupy arrays.
"""
import functools
import math
import pathlib

import cupy
import numpy as np

from minunet.checks import ArrayChecks, conv_out_hw as _conv_out_hw, same_shape as _same_shape
from minunet.checks import version as _checked_version

VERSIONS = {
    "conv2d_forward": (1, 2),
    "conv2d_backward_input": (1, 2),
    "conv2d_backward_weight": (1, 2),
    "conv_transpose2d_forward": (1, 2),
    "conv_transpose2d_backward_input": (1, 2),
    "conv_transpose2d_backward_weight": (1, 2),
}
DEFAULT_VERSION = {name: 2 for name in VERSIONS}

# ------------------------------------------------------------------------------------------
# sources, compilation, kernel lookup
# ------------------------------------------------------------------------------------------

# the kernels of each family, as named in its .cu file (each instantiated for float and double)
FAMILIES = {
    "conv2d": ("conv2d_forward_v1", "conv2d_forward_v2", "conv2d_backward_input_v1",
               "conv2d_backward_input_v2", "conv2d_backward_weight_v1", "conv2d_backward_weight_v2"),
    "conv_transpose2d": ("conv_transpose2d_forward_v2", "conv_transpose2d_backward_input_v2",
                         "conv_transpose2d_backward_weight_v2"),
    "max_pool2d": ("max_pool2d_forward", "max_pool2d_backward"),
    "concat": ("concat_forward", "concat_backward"),
    "activation": ("relu_forward", "relu_backward", "bias_backward"),
    "loss": ("softmax_cross_entropy_forward", "softmax_cross_entropy_backward"),
    "batch_norm": ("batch_norm_stats", "batch_norm_forward", "batch_norm_backward_reduce", "batch_norm_backward"),
    "optim": ("sgd_update", "adam_update"),
}
_CTYPE = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}

# What cuda.py passes to cupy.RawModule. CuPy appends "-ftz=true" (cupy/cuda/compiler.py) and
# "-arch=..." for the current device; NVRTC_OPTIONS is the former, the compile test adds -arch.
OPTIONS = ("--std=c++17",)
NVRTC_OPTIONS = OPTIONS + ("-ftz=true",)

# the tile of the _v2 GEMM kernels: mirrors the #defines in kernels/common.cuh
GEMM_TILE_M, GEMM_TILE_N, GEMM_TILE_K, GEMM_THREADS = 64, 64, 16, 256
THREADS = 256            # block size of the elementwise and per-channel kernels
_INT32_MAX = 2**31 - 1


def _kernel_dir():
    """The folder holding common.cuh and the .cu files: minunet/kernels in an installed wheel,
    kernels/ at the repository root in a source checkout."""
    here = pathlib.Path(__file__).resolve().parent
    for d in (here / "kernels", here.parent / "kernels"):
        if (d / "common.cuh").is_file():
            return d
    raise FileNotFoundError(f"minunet.cuda: kernel sources not found in {here / 'kernels'} "
                            f"or {here.parent / 'kernels'}")


def _family_source(family):
    """The CUDA source of one family: common.cuh's text, then the family's .cu text."""
    d = _kernel_dir()
    return (f'#line 1 "common.cuh"\n{(d / "common.cuh").read_text()}\n'
            f'#line 1 "{family}.cu"\n{(d / f"{family}.cu").read_text()}')


def _name_expressions(family):
    return [f"{name}<{ctype}>" for name in FAMILIES[family] for ctype in ("float", "double")]


def _compile_table():
    """[(family, source, name_expressions, nvrtc_options)]: what `_module` compiles, family by family."""
    return [(family, _family_source(family), _name_expressions(family), NVRTC_OPTIONS) for family in FAMILIES]


@functools.cache
def _module(family):
    return cupy.RawModule(code=_family_source(family), options=OPTIONS, name_expressions=_name_expressions(family))


@functools.cache
def _kernel(family, name, dtype):
    return _module(family).get_function(f"{name}<{_CTYPE[dtype]}>")


@functools.cache
def _sm_count(device_id):
    return cupy.cuda.Device(device_id).attributes["MultiProcessorCount"]


def _launch(family, name, dtype, grid, block, args):
    """Launch kernel `name`<dtype> of `family`; a grid with no blocks launches nothing."""
    if min(grid) > 0:
        _kernel(family, name, np.dtype(dtype))(grid, block, args)


def _grid_1d(n):
    """Blocks for a grid-stride loop over n elements: one per THREADS elements, at most 32 per SM."""
    return (min(-(-n // THREADS), 32 * _sm_count(cupy.cuda.Device().id)),)


def _cdiv(a, b):
    return -(-a // b)


# ------------------------------------------------------------------------------------------
# argument checks: they turn what would be an out-of-bounds read on the GPU (or a CUDA error
# far from its cause) into a message naming the op, the argument and the shapes
# ------------------------------------------------------------------------------------------

_check = ArrayChecks(cupy, "GPU")
_floats, _int64, _vector = _check.floats, _check.int64, _check.vector


def _version(op, version):
    return _checked_version(op, version, VERSIONS[op], DEFAULT_VERSION[op])


def _pair(op, name, v):
    try:
        pair = tuple(int(p) for p in v)
    except TypeError:
        pair = ()
    if len(pair) != 2:
        raise TypeError(f"{op}: {name} must be an (h, w) pair of ints, got {v!r}")
    return pair


def _ncl(op, name, a):
    """(N, C, L) of an (N, C, ...) array: the channel axis is 1, everything after it is one plane."""
    if a.ndim < 2:
        raise ValueError(f"{op}: {name} must be (N, C, ...), got shape {a.shape}")
    return a.shape[0], a.shape[1], math.prod(a.shape[2:])


def _fits_int32(op, **sizes):
    """The GEMM kernels index rows, columns and pixels with int (plus up to one tile of slack)."""
    for name, size in sizes.items():
        if size > _INT32_MAX - GEMM_TILE_N:
            raise ValueError(f"{op}: {name} = {size} is too large for the kernels' 32-bit indices")


# ------------------------------------------------------------------------------------------
# convolution: the three conv2d passes, shared by conv2d and (in adjoint roles) conv_transpose2d
# dims = (N, C, H, W, K, kh, kw, sh, sw, ph, pw, Ho, Wo) in conv2d's terms: x (N,C,H,W),
# w (K,C,kh,kw), y (N,K,Ho,Wo)
# ------------------------------------------------------------------------------------------

def _split_k(P, tiles):
    """(splits, chunk): cut a reduction over P pixels into `splits` chunks of `chunk` pixels (a
    multiple of GEMM_TILE_K) so that tiles * splits blocks fill the GPU about twice over, each
    chunk at least 512 pixels long."""
    target = 2 * _sm_count(cupy.cuda.Device().id)
    splits = max(1, min(_cdiv(target, tiles), _cdiv(P, 512)))
    chunk = max(GEMM_TILE_K, _cdiv(_cdiv(P, splits), GEMM_TILE_K) * GEMM_TILE_K)
    return max(1, _cdiv(P, chunk)), chunk


def _conv2d_y(v, x, w, b, y, dims, op):
    """y = conv2d(x, w) + b, into y."""
    N, C, H, W, K, kh, kw, sh, sw, ph, pw, Ho, Wo = dims
    i32 = [np.int32(d) for d in dims]
    if v == 1:
        grid = _grid_1d(N * K * Ho * Wo)
    else:
        _fits_int32(op, pixels=N * Ho * Wo, taps=C * kh * kw)
        grid = (_cdiv(N * Ho * Wo, GEMM_TILE_N), _cdiv(K, GEMM_TILE_M))
    # (const T* x, const T* w, const T* b, T* y, int N, C, H, W, K, kh, kw, sh, sw, ph, pw, Ho, Wo)
    _launch("conv2d", f"conv2d_forward_v{v}", x.dtype, grid, (GEMM_THREADS if v == 2 else THREADS,),
            (x, w, b, y, *i32))


def _conv2d_gx(v, gy, w, b, gx, dims, op):
    """gx = conv2d_backward_input(gy, w) + b (per channel of gx), into gx."""
    N, C, H, W, K, kh, kw, sh, sw, ph, pw, Ho, Wo = dims
    i32 = [np.int32(d) for d in dims]
    if v == 1:
        grid = _grid_1d(N * C * H * W)
    else:
        _fits_int32(op, pixels=N * H * W, taps=K * kh * kw)
        grid = (_cdiv(N * H * W, GEMM_TILE_N), _cdiv(C, GEMM_TILE_M))
    # (const T* gy, const T* w, const T* b, T* gx, int N, C, H, W, K, kh, kw, sh, sw, ph, pw, Ho, Wo)
    _launch("conv2d", f"conv2d_backward_input_v{v}", gy.dtype, grid, (GEMM_THREADS if v == 2 else THREADS,),
            (gy, w, b, gx, *i32))


def _conv2d_gw(v, x, gy, dims, op):
    """gw (K, C, kh, kw) = conv2d_backward_weight(x, gy)."""
    N, C, H, W, K, kh, kw, sh, sw, ph, pw, Ho, Wo = dims
    i32 = [np.int32(d) for d in dims]
    if v == 1:
        gw = cupy.empty((K, C, kh, kw), x.dtype)
        # (const T* x, const T* gy, T* gw, int N, C, H, W, K, kh, kw, sh, sw, ph, pw, Ho, Wo)
        _launch("conv2d", "conv2d_backward_weight_v1", x.dtype, _grid_1d(gw.size), (THREADS,), (x, gy, gw, *i32))
        return gw
    P, R = N * Ho * Wo, C * kh * kw
    _fits_int32(op, pixels=P, taps=R)
    tiles = (_cdiv(R, GEMM_TILE_N), _cdiv(K, GEMM_TILE_M))
    splits, chunk = _split_k(P, tiles[0] * tiles[1])
    parts = cupy.empty((splits, K, C, kh, kw), x.dtype)
    # (const T* x, const T* gy, T* gw_parts, int N, C, H, W, K, kh, kw, sh, sw, ph, pw, Ho, Wo, int chunk)
    _launch("conv2d", "conv2d_backward_weight_v2", x.dtype, (*tiles, splits), (GEMM_THREADS,),
            (x, gy, parts, *i32, np.int32(chunk)))
    return parts[0] if splits == 1 else parts.sum(axis=0)


def conv2d_forward(x, w, b, stride, padding, version=None):
    # x: (N, C, H, W), w: (K, C, kh, kw), b: (K,) or None -> y: (N, K, Ho, Wo)
    op = "conv2d_forward"
    v = _version(op, version)
    dtype = _floats(op, ("x", x), ("w", w), ndim=4)
    N, C, H, W = x.shape
    K, Cw, kh, kw = w.shape
    if C != Cw:
        raise ValueError(f"{op}: x has {C} channels (shape {x.shape}) but w {w.shape} expects {Cw}")
    stride, padding = _pair(op, "stride", stride), _pair(op, "padding", padding)
    Ho, Wo = _conv_out_hw(op, (H, W), (kh, kw), stride, padding)
    b = _vector(op, "b", b, K, dtype)
    y = cupy.empty((N, K, Ho, Wo), dtype)
    _conv2d_y(v, x, w, b, y, (N, C, H, W, K, kh, kw, *stride, *padding, Ho, Wo), op)
    return y


def conv2d_backward_input(gy, w, x_shape, stride, padding, version=None):
    # gy: (N, K, Ho, Wo), w: (K, C, kh, kw) -> gx: x_shape = (N, C, H, W)
    op = "conv2d_backward_input"
    v = _version(op, version)
    dtype = _floats(op, ("gy", gy), ("w", w), ndim=4)
    N, C, H, W = (int(s) for s in x_shape)
    K, Cw, kh, kw = w.shape
    if C != Cw:
        raise ValueError(f"{op}: x_shape {tuple(x_shape)} has {C} channels but w {w.shape} expects {Cw}")
    stride, padding = _pair(op, "stride", stride), _pair(op, "padding", padding)
    Ho, Wo = _conv_out_hw(op, (H, W), (kh, kw), stride, padding)
    _same_shape(op, "gy", gy, (N, K, Ho, Wo))
    gx = cupy.empty((N, C, H, W), dtype)
    _conv2d_gx(v, gy, w, None, gx, (N, C, H, W, K, kh, kw, *stride, *padding, Ho, Wo), op)
    return gx


def conv2d_backward_weight(x, gy, w_shape, stride, padding, version=None):
    # x: (N, C, H, W), gy: (N, K, Ho, Wo) -> gw: w_shape = (K, C, kh, kw)
    op = "conv2d_backward_weight"
    v = _version(op, version)
    _floats(op, ("x", x), ("gy", gy), ndim=4)
    N, C, H, W = x.shape
    K, Cw, kh, kw = (int(s) for s in w_shape)
    if C != Cw:
        raise ValueError(f"{op}: x has {C} channels (shape {x.shape}) but w_shape {tuple(w_shape)} expects {Cw}")
    stride, padding = _pair(op, "stride", stride), _pair(op, "padding", padding)
    Ho, Wo = _conv_out_hw(op, (H, W), (kh, kw), stride, padding)
    _same_shape(op, "gy", gy, (N, K, Ho, Wo))
    return _conv2d_gw(v, x, gy, (N, C, H, W, K, kh, kw, *stride, *padding, Ho, Wo), op)


# ------------------------------------------------------------------------------------------
# transposed convolution
# ------------------------------------------------------------------------------------------

def _patchwise(khw, stride, padding):
    """Kernel == stride and no padding: the patches tile the output without overlap (v2's GEMM case)."""
    return tuple(khw) == tuple(stride) and tuple(padding) == (0, 0)


def conv_transpose2d_forward(x, w, b, stride, padding, output_padding, version=None):
    # x: (N, Cin, H, W), w: (Cin, Cout, kh, kw), b: (Cout,) or None -> y: (N, Cout, Ho, Wo)
    op = "conv_transpose2d_forward"
    v = _version(op, version)
    dtype = _floats(op, ("x", x), ("w", w), ndim=4)
    N, Cin, H, W = x.shape
    Cw, Cout, kh, kw = w.shape
    if Cin != Cw:
        raise ValueError(f"{op}: x has {Cin} channels (shape {x.shape}) but w {w.shape} expects {Cw}")
    stride, padding = _pair(op, "stride", stride), _pair(op, "padding", padding)
    output_padding = _pair(op, "output_padding", output_padding)
    (sh, sw), (ph, pw), (oph, opw) = stride, padding, output_padding
    Ho, Wo = (H - 1) * sh - 2 * ph + kh + oph, (W - 1) * sw - 2 * pw + kw + opw
    if Ho <= 0 or Wo <= 0:
        raise ValueError(f"{op}: input {H}x{W} with kernel {kh}x{kw}, stride {stride}, padding {padding} "
                         f"gives an empty output ({Ho}x{Wo})")
    b = _vector(op, "b", b, Cout, dtype)
    y = cupy.empty((N, Cout, Ho, Wo), dtype)
    if v == 2 and _patchwise((kh, kw), stride, padding) and output_padding == (0, 0):
        _fits_int32(op, pixels=N * H * W, outputs_per_pixel=Cout * kh * kw)
        grid = (_cdiv(N * H * W, GEMM_TILE_N), _cdiv(Cout * kh * kw, GEMM_TILE_M))
        # (const T* x, const T* w, const T* b, T* y, int N, Cin, H, W, Cout, kh, kw)
        _launch("conv_transpose2d", "conv_transpose2d_forward_v2", dtype, grid, (GEMM_THREADS,),
                (x, w, b, y, *(np.int32(d) for d in (N, Cin, H, W, Cout, kh, kw))))
    else:
        # conv2d's backward_input with x as the output gradient: conv2d's x is our y, so its
        # (H, W) are our (Ho, Wo), output_padding rows included (they get the bias and whatever
        # taps reach them), and its (Ho, Wo) are our (H, W)
        _conv2d_gx(v, x, w, b, y, (N, Cout, Ho, Wo, Cin, kh, kw, sh, sw, ph, pw, H, W), op)
    return y


def conv_transpose2d_backward_input(gy, w, stride, padding, version=None):
    # gy: (N, Cout, Ho, Wo), w: (Cin, Cout, kh, kw) -> gx: (N, Cin, H, W), a plain convolution
    op = "conv_transpose2d_backward_input"
    v = _version(op, version)
    dtype = _floats(op, ("gy", gy), ("w", w), ndim=4)
    N, Cout, Ho, Wo = gy.shape
    Cin, Cw, kh, kw = w.shape
    if Cout != Cw:
        raise ValueError(f"{op}: gy has {Cout} channels (shape {gy.shape}) but w {w.shape} has Cout = {Cw}")
    stride, padding = _pair(op, "stride", stride), _pair(op, "padding", padding)
    (sh, sw), (ph, pw) = stride, padding
    H, W = _conv_out_hw(op, (Ho, Wo), (kh, kw), stride, padding)
    gx = cupy.empty((N, Cin, H, W), dtype)
    if v == 2 and _patchwise((kh, kw), stride, padding):
        _fits_int32(op, pixels=N * H * W, taps=Cout * kh * kw)
        grid = (_cdiv(N * H * W, GEMM_TILE_N), _cdiv(Cin, GEMM_TILE_M))
        # (const T* gy, const T* w, T* gx, int N, Cin, H, W, Cout, kh, kw, Ho, Wo)
        _launch("conv_transpose2d", "conv_transpose2d_backward_input_v2", dtype, grid, (GEMM_THREADS,),
                (gy, w, gx, *(np.int32(d) for d in (N, Cin, H, W, Cout, kh, kw, Ho, Wo))))
    else:  # conv2d's forward of gy, w read as (K=Cin, C=Cout, kh, kw)
        _conv2d_y(v, gy, w, None, gx, (N, Cout, Ho, Wo, Cin, kh, kw, sh, sw, ph, pw, H, W), op)
    return gx


def conv_transpose2d_backward_weight(x, gy, w_shape, stride, padding, version=None):
    # x: (N, Cin, H, W), gy: (N, Cout, Ho, Wo) -> gw: w_shape = (Cin, Cout, kh, kw)
    op = "conv_transpose2d_backward_weight"
    v = _version(op, version)
    dtype = _floats(op, ("x", x), ("gy", gy), ndim=4)
    N, Cout, Ho, Wo = gy.shape
    Cin, Cw, kh, kw = (int(s) for s in w_shape)
    if Cout != Cw:
        raise ValueError(f"{op}: gy has {Cout} channels (shape {gy.shape}) but w_shape {tuple(w_shape)} "
                         f"has Cout = {Cw}")
    stride, padding = _pair(op, "stride", stride), _pair(op, "padding", padding)
    (sh, sw), (ph, pw) = stride, padding
    H, W = _conv_out_hw(op, (Ho, Wo), (kh, kw), stride, padding)  # in conv2d's terms gy is the input
    _same_shape(op, "x", x, (N, Cin, H, W))
    if v == 2 and _patchwise((kh, kw), stride, padding):
        P, Q = N * H * W, Cout * kh * kw
        _fits_int32(op, pixels=P, taps=Q)
        tiles = (_cdiv(Q, GEMM_TILE_N), _cdiv(Cin, GEMM_TILE_M))
        splits, chunk = _split_k(P, tiles[0] * tiles[1])
        parts = cupy.empty((splits, Cin, Cout, kh, kw), dtype)
        # (const T* x, const T* gy, T* gw_parts, int N, Cin, H, W, Cout, kh, kw, Ho, Wo, int chunk)
        _launch("conv_transpose2d", "conv_transpose2d_backward_weight_v2", dtype, (*tiles, splits), (GEMM_THREADS,),
                (x, gy, parts, *(np.int32(d) for d in (N, Cin, H, W, Cout, kh, kw, Ho, Wo, chunk))))
        return parts[0] if splits == 1 else parts.sum(axis=0)
    # conv2d's backward_weight with gy as the input and x as the output gradient: gw comes out
    # as (K=Cin, C=Cout, kh, kw), which is the transposed layout
    return _conv2d_gw(v, gy, x, (N, Cout, Ho, Wo, Cin, kh, kw, sh, sw, ph, pw, H, W), op)


# ------------------------------------------------------------------------------------------
# max pooling
# ------------------------------------------------------------------------------------------

def max_pool2d_forward(x, kernel_size, stride, padding):
    # x: (N, C, H, W) -> y: (N, C, Ho, Wo), argmax: int64 (N, C, Ho, Wo)
    op = "max_pool2d_forward"
    dtype = _floats(op, ("x", x), ndim=4)
    N, C, H, W = x.shape
    (kh, kw), (sh, sw) = _pair(op, "kernel_size", kernel_size), _pair(op, "stride", stride)
    ph, pw = _pair(op, "padding", padding)
    Ho, Wo = _conv_out_hw(op, (H, W), (kh, kw), (sh, sw), (ph, pw))
    y = cupy.empty((N, C, Ho, Wo), dtype)
    argmax = cupy.empty((N, C, Ho, Wo), np.int64)
    # (const T* x, T* y, int64* argmax, int64 planes, int H, W, Ho, Wo, kh, kw, sh, sw, ph, pw)
    _launch("max_pool2d", "max_pool2d_forward", dtype, _grid_1d(y.size), (THREADS,),
            (x, y, argmax, np.int64(N * C), *(np.int32(d) for d in (H, W, Ho, Wo, kh, kw, sh, sw, ph, pw))))
    return y, argmax


def max_pool2d_backward(gy, argmax, x_shape):
    # gy, argmax: (N, C, Ho, Wo) -> gx: x_shape = (N, C, H, W)
    op = "max_pool2d_backward"
    dtype = _floats(op, ("gy", gy), ndim=4)
    _int64(op, "argmax", argmax)
    _same_shape(op, "argmax", argmax, gy.shape)
    N, C, H, W = (int(s) for s in x_shape)
    if gy.shape[:2] != (N, C):
        raise ValueError(f"{op}: gy has shape {gy.shape} but x_shape {tuple(x_shape)} has (N, C) = {(N, C)}")
    gx = cupy.zeros((N, C, H, W), dtype)  # the kernel adds into it
    # (const T* gy, const int64* argmax, T* gx, int64 planes, int H, W, Ho, Wo)
    _launch("max_pool2d", "max_pool2d_backward", dtype, _grid_1d(gy.size), (THREADS,),
            (gy, argmax, gx, np.int64(N * C), *(np.int32(d) for d in (H, W, *gy.shape[2:]))))
    return gx


# ------------------------------------------------------------------------------------------
# channel concatenation with cropping
# ------------------------------------------------------------------------------------------

def _crop_windows(op, x_shapes, offsets, out_hw):
    """Check that every (top, left) + out_hw window lies inside its input; return [(top, left)]."""
    if len(offsets) != len(x_shapes):
        raise ValueError(f"{op}: {len(x_shapes)} inputs but {len(offsets)} offsets")
    H, W = out_hw
    windows = []
    for i, (shape, offset) in enumerate(zip(x_shapes, offsets)):
        top, left = _pair(op, f"offsets[{i}]", offset)
        if top < 0 or left < 0 or top + H > shape[2] or left + W > shape[3]:
            raise ValueError(f"{op}: the {H}x{W} window at (top, left) = {(top, left)} does not fit "
                             f"input {i} of shape {tuple(shape)}")
        windows.append((top, left))
    return windows


def concat_forward(xs, offsets, out_hw):
    # xs[i]: (N, C_i, H_i, W_i) -> y: (N, sum C_i, H, W)
    op = "concat_forward"
    xs = list(xs)
    if not xs:
        raise ValueError(f"{op}: expected at least one input")
    dtype = _floats(op, *((f"xs[{i}]", x) for i, x in enumerate(xs)), ndim=4)
    N = xs[0].shape[0]
    if any(x.shape[0] != N for x in xs):
        raise ValueError(f"{op}: inputs have different batch sizes: {[x.shape for x in xs]}")
    H, W = _pair(op, "out_hw", out_hw)
    windows = _crop_windows(op, [x.shape for x in xs], offsets, (H, W))
    Cy = sum(x.shape[1] for x in xs)
    y = cupy.empty((N, Cy, H, W), dtype)
    c0 = 0
    for x, (top, left) in zip(xs, windows):
        _, Ci, Hi, Wi = x.shape
        # (const T* x, T* y, int N, Ci, Hi, Wi, Cy, Hy, Wy, c0, top, left)
        _launch("concat", "concat_forward", dtype, _grid_1d(N * Ci * H * W), (THREADS,),
                (x, y, *(np.int32(d) for d in (N, Ci, Hi, Wi, Cy, H, W, c0, top, left))))
        c0 += Ci
    return y


def concat_backward(gy, x_shapes, offsets):
    # gy: (N, sum C_i, H, W) -> gxs[i]: x_shapes[i] = (N, C_i, H_i, W_i)
    op = "concat_backward"
    dtype = _floats(op, ("gy", gy), ndim=4)
    x_shapes = [tuple(int(s) for s in shape) for shape in x_shapes]
    N, Cy, H, W = gy.shape
    if any(len(s) != 4 or s[0] != N for s in x_shapes) or sum(s[1] for s in x_shapes) != Cy:
        raise ValueError(f"{op}: x_shapes {x_shapes} do not split gy of shape {gy.shape} along its channels")
    windows = _crop_windows(op, x_shapes, offsets, (H, W))
    gxs, c0 = [], 0
    for shape, (top, left) in zip(x_shapes, windows):
        _, Ci, Hi, Wi = shape
        gx = cupy.empty(shape, dtype)
        # (const T* gy, T* gx, int N, Ci, Hi, Wi, Cy, Hy, Wy, c0, top, left)
        _launch("concat", "concat_backward", dtype, _grid_1d(gx.size), (THREADS,),
                (gy, gx, *(np.int32(d) for d in (N, Ci, Hi, Wi, Cy, H, W, c0, top, left))))
        gxs.append(gx)
        c0 += Ci
    return gxs


# ------------------------------------------------------------------------------------------
# activation and bias
# ------------------------------------------------------------------------------------------

def relu_forward(x, b=None):
    # x: (N, C, H, W) with b: (C,), or any shape without -> y: x's shape
    op = "relu_forward"
    dtype = _floats(op, ("x", x))
    C, HW = 1, 1
    if b is not None:
        if x.ndim != 4:
            raise ValueError(f"{op}: a bias needs x of shape (N, C, H, W), got {x.shape}")
        C, HW = x.shape[1], x.shape[2] * x.shape[3]
        b = _vector(op, "b", b, C, dtype)
    y = cupy.empty_like(x)
    # (const T* x, const T* b, T* y, int64 n, int C, int64 HW)
    _launch("activation", "relu_forward", dtype, _grid_1d(x.size), (THREADS,),
            (x, b, y, np.int64(x.size), np.int32(C), np.int64(HW)))
    return y


def relu_backward(gy, y):
    # gy, y: (...) -> gx: (...)
    op = "relu_backward"
    dtype = _floats(op, ("gy", gy), ("y", y))
    _same_shape(op, "y", y, gy.shape)
    gx = cupy.empty_like(gy)
    # (const T* gy, const T* y, T* gx, int64 n)
    _launch("activation", "relu_backward", dtype, _grid_1d(gy.size), (THREADS,), (gy, y, gx, np.int64(gy.size)))
    return gx


def bias_backward(gy):
    # gy: (N, C, H, W) (or any (N, C, ...)) -> gb: (C,)
    op = "bias_backward"
    dtype = _floats(op, ("gy", gy))
    N, C, HW = _ncl(op, "gy", gy)
    gb = cupy.empty((C,), dtype)
    # (const T* gy, T* gb, int N, int C, int64 HW): one block per channel
    _launch("activation", "bias_backward", dtype, (C,), (THREADS,), (gy, gb, np.int32(N), np.int32(C), np.int64(HW)))
    return gb


# ------------------------------------------------------------------------------------------
# softmax cross-entropy
# ------------------------------------------------------------------------------------------

def _ce_args(op, x_name, x, target, weight):
    dtype = _floats(op, (x_name, x), ndim=4)
    N, C, H, W = x.shape
    _int64(op, "target", target)
    _same_shape(op, "target", target, (N, H, W))
    return dtype, _vector(op, "weight", weight, C, dtype)


def softmax_cross_entropy_forward(x, target, weight, ignore_index):
    # x: (N, C, H, W), target: int64 (N, H, W), weight: (C,) or None -> loss: (N, H, W), p: (N, C, H, W)
    op = "softmax_cross_entropy_forward"
    dtype, weight = _ce_args(op, "x", x, target, weight)
    N, C, H, W = x.shape
    loss = cupy.empty((N, H, W), dtype)
    p = cupy.empty_like(x)
    # (const T* x, const int64* target, const T* weight, T* loss, T* p, int64 pixels, int C, int64 HW,
    #  int64 ignore_index)
    _launch("loss", "softmax_cross_entropy_forward", dtype, _grid_1d(N * H * W), (THREADS,),
            (x, target, weight, loss, p, np.int64(N * H * W), np.int32(C), np.int64(H * W), np.int64(ignore_index)))
    return loss, p


def softmax_cross_entropy_backward(p, target, weight, ignore_index, gloss):
    # p: (N, C, H, W), target: int64 (N, H, W), gloss: (N, H, W) -> gx: (N, C, H, W)
    op = "softmax_cross_entropy_backward"
    dtype, weight = _ce_args(op, "p", p, target, weight)
    _floats(op, ("p", p), ("gloss", gloss))
    N, C, H, W = p.shape
    _same_shape(op, "gloss", gloss, (N, H, W))
    gx = cupy.empty_like(p)
    # (const T* p, const int64* target, const T* weight, const T* gloss, T* gx, int64 total, int C,
    #  int64 HW, int64 ignore_index)
    _launch("loss", "softmax_cross_entropy_backward", dtype, _grid_1d(p.size), (THREADS,),
            (p, target, weight, gloss, gx, np.int64(p.size), np.int32(C), np.int64(H * W), np.int64(ignore_index)))
    return gx


# ------------------------------------------------------------------------------------------
# batch normalisation
# ------------------------------------------------------------------------------------------

def batch_norm_forward(x, gamma, beta, mean, var, eps, training):
    # x: (N, C, H, W) (or any (N, C, ...)), gamma, beta: (C,) or None, mean, var: (C,) (ignored in
    # training) -> y: x's shape, mean, var: (C,) the statistics used (fresh arrays)
    op = "batch_norm_forward"
    dtype = _floats(op, ("x", x))
    N, C, HW = _ncl(op, "x", x)
    gamma, beta = _vector(op, "gamma", gamma, C, dtype), _vector(op, "beta", beta, C, dtype)
    if training:
        mean, var = cupy.empty((C,), dtype), cupy.empty((C,), dtype)
        # (const T* x, T* mean, T* var, int N, int C, int64 HW): one block per channel
        _launch("batch_norm", "batch_norm_stats", dtype, (C,), (THREADS,),
                (x, mean, var, np.int32(N), np.int32(C), np.int64(HW)))
    else:
        if mean is None or var is None:
            raise ValueError(f"{op}: eval mode (training=False) needs the running mean and var")
        mean, var = _vector(op, "mean", mean, C, dtype).copy(), _vector(op, "var", var, C, dtype).copy()
    y = cupy.empty_like(x)
    # (const T* x, const T* gamma, const T* beta, const T* mean, const T* var, T* y, T eps, int64 total,
    #  int C, int64 HW)
    _launch("batch_norm", "batch_norm_forward", dtype, _grid_1d(x.size), (THREADS,),
            (x, gamma, beta, mean, var, y, dtype.type(eps), np.int64(x.size), np.int32(C), np.int64(HW)))
    return y, mean, var


def batch_norm_backward(gy, x, gamma, mean, var, eps, training):
    # gy, x: (N, C, H, W) (or any (N, C, ...)), gamma: (C,) or None, mean, var: (C,)
    #   -> gx: x's shape, ggamma, gbeta: (C,)
    op = "batch_norm_backward"
    dtype = _floats(op, ("gy", gy), ("x", x))
    _same_shape(op, "x", x, gy.shape)
    N, C, HW = _ncl(op, "x", x)
    gamma = _vector(op, "gamma", gamma, C, dtype)
    if mean is None or var is None:
        raise ValueError(f"{op}: needs the mean and var the forward pass used")
    mean, var = _vector(op, "mean", mean, C, dtype), _vector(op, "var", var, C, dtype)
    ggamma, gbeta = cupy.empty((C,), dtype), cupy.empty((C,), dtype)
    # (const T* gy, const T* x, const T* mean, const T* var, T* ggamma, T* gbeta, T eps, int N, int C,
    #  int64 HW): one block per channel
    _launch("batch_norm", "batch_norm_backward_reduce", dtype, (C,), (THREADS,),
            (gy, x, mean, var, ggamma, gbeta, dtype.type(eps), np.int32(N), np.int32(C), np.int64(HW)))
    gx = cupy.empty_like(x)
    # (const T* gy, const T* x, const T* gamma, const T* mean, const T* var, const T* ggamma,
    #  const T* gbeta, T* gx, T eps, int training, int64 total, int C, int64 HW, int64 M)
    _launch("batch_norm", "batch_norm_backward", dtype, _grid_1d(x.size), (THREADS,),
            (gy, x, gamma, mean, var, ggamma, gbeta, gx, dtype.type(eps), np.int32(bool(training)),
             np.int64(x.size), np.int32(C), np.int64(HW), np.int64(N * HW)))
    return gx, ggamma, gbeta


# ------------------------------------------------------------------------------------------
# optimizers: fused in-place updates of one parameter tensor
# ------------------------------------------------------------------------------------------

def _state(op, p, *named):
    """p and its gradient/state arrays: one float dtype, C-contiguous, all of p's shape."""
    dtype = _floats(op, ("p", p), *named)
    for name, a in named:
        _same_shape(op, name, a, p.shape)
    return dtype


def sgd_update(p, g, buf, lr, momentum, dampening, weight_decay, nesterov, first):
    # p, g, buf: (...) -> None; p (and buf) updated in place
    op = "sgd_update"
    if momentum != 0 and buf is None:
        raise ValueError(f"{op}: momentum {momentum} needs a momentum buffer, got buf=None")
    buf = buf if momentum != 0 else None
    dtype = _state(op, p, ("g", g), *((("buf", buf),) if buf is not None else ()))
    t = dtype.type
    # (T* p, const T* g, T* buf, int64 n, T lr, T momentum, T dampening, T weight_decay, int nesterov, int first)
    _launch("optim", "sgd_update", dtype, _grid_1d(p.size), (THREADS,),
            (p, g, buf, np.int64(p.size), t(lr), t(momentum), t(dampening), t(weight_decay),
             np.int32(bool(nesterov)), np.int32(bool(first))))


def adam_update(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step, decoupled):
    # p, g, m, v: (...) -> None; p, m, v updated in place
    op = "adam_update"
    if step < 1:
        raise ValueError(f"{op}: step counts from 1, got {step}")
    dtype = _state(op, p, ("g", g), ("m", m), ("v", v))
    t = dtype.type
    step_size = lr / (1 - beta1 ** step)
    bias_correction2_sqrt = math.sqrt(1 - beta2 ** step)
    # (T* p, const T* g, T* m, T* v, int64 n, T lr, T beta1, T beta2, T eps, T weight_decay,
    #  T step_size, T bias_correction2_sqrt, int decoupled)
    _launch("optim", "adam_update", dtype, _grid_1d(p.size), (THREADS,),
            (p, g, m, v, np.int64(p.size), t(lr), t(beta1), t(beta2), t(eps), t(weight_decay),
             t(step_size), t(bias_correction2_sqrt), np.int32(bool(decoupled))))
