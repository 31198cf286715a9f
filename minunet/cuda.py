"""minunet.cuda: the GPU kernels. Loads kernels/*.cu through cupy.RawModule and launches them.

Every public function here is one kernel of minunet.contract, with the name and signature of
its declaration in minunet/contract.py, which says what it computes (the minunet/cpu/ package
implements the same set with numba). Call them through `minunet.backend.kernels_for(x)`,
which checks and normalises the arguments first and checks the outputs after: the launchers
here trust their arguments (cupy arrays, NCHW, C-contiguous, float32 or float64, pooling
indices and targets int64, (h, w) pairs of ints). Kernels allocate fresh outputs with
cupy.empty (cupy.zeros where the kernel accumulates); only sgd_update and adam_update write
into their arguments (every tensor of an optimizer step in one launch).

How a kernel gets from a .cu file to the GPU
--------------------------------------------
kernels/ holds one .cu file per op family plus common.cuh. For a family, `_family_source`
builds the source as the TEXT of common.cuh followed by the TEXT of the family's .cu (not an
#include, so an edit to the header changes the source, hence CuPy's cache key, and a stale
binary is never loaded); `#line` markers keep compiler messages pointing at the right file
and line. Every kernel is a `template <typename T>`; `name_expressions` asks NVRTC for the
float and double instantiation of each (e.g. "conv2d_forward_v2<float>"; the register-tiled
kernels also take their block tile, "conv2d_forward_v3<float, 128, 64>", one instantiation per
entry of TILES), and `module.get_function` finds them by those names. `_module` compiles once
per process, on first use, either one tiled kernel (all its instantiations: they take NVRTC
seconds each, so a process pays only for those it runs) or all the other kernels of a family
together; CuPy also keeps the binary in its on-disk cache, so later processes skip NVRTC. The
sources are found next to this file (minunet/kernels, where the wheel puts them) or in the
repository (kernels/ beside minunet/).

`_compile_table()` lists (family, source, name expressions, NVRTC options) for every family (the
one entry point for tools; it is private only because the public names here are the kernels):
tests/test_cuda_compile.py compiles exactly that for sm_80 and sm_90 on machines without a GPU.

Launchers
---------
Each public function allocates the outputs and launches. Sizes go to the kernels as
np.int32, or np.int64 where
a count can pass 2^31 (flat element counts); scalars as the array's dtype. Every argument's
C type is spelled out next to the launch so the two can be checked against each other.
Elementwise kernels use 256-thread blocks and a grid-stride loop, so the grid is capped
(32 blocks per SM). Launches are asynchronous: results are ready when CuPy next syncs.

Versions
--------
The three conv2d kernels take `version=` (VERSIONS; None means DEFAULT_VERSION):
  1  naive, one thread per output element (the _v1 kernels of conv2d.cu)
  2  shared-memory tiled implicit GEMM (the _v2 kernels of conv2d.cu)
  3  register-tiled implicit GEMM, 8 x 8 outputs per thread, register-staged double buffering
  4  as 3 with warp tiling and a 4-stage cp.async pipeline (the engine of common.cuh)
  5  as 4 on the TF32 tensor cores (mma.sync): float32 inputs rounded to 10 mantissa bits,
     products summed in float32, so results differ from float32's by about 1e-3 relative.
     float32 only: float64 arrays run version 4 (as PyTorch's allow_tf32 leaves float64
     alone); needs compute capability 8.0 or newer.
They also take the contract's fused forms (relu=, relu_y=, bias=), which versions 3 and up
compute inside their kernels and versions 1 and 2 as extra passes. Versions 3 and up take their
block tile (BM, BN) from `_gemm_tile`, the one function that picks a tile for a layer's shape,
and read the weights re-laid out tap by tap ((kh, kw, C, K) for the forward, (kh, kw, K, C) for
backward_input): a copy of the small weight tensor that makes every tile row of it one
contiguous, 16-byte-aligned run.
The conv_transpose2d kernels are the transposed convolution with kernel == stride and no
padding (the U-Net's 2x2/2 up-convolution), conv_transpose2d.cu's patch-GEMM kernels;
minunet.functional runs every other transposed convolution on conv2d's kernels, as conv2d's
adjoint. Weight gradients reduce over every output pixel of the batch but have few outputs,
so they split that reduction over blockIdx.z (split-K): each slice writes a partial gradient
into a (splits, ...) workspace that is summed at the end, in a fixed order, so the result is
deterministic.

This module imports cupy unconditionally: minunet.backend imports it only for cupy arrays.
"""
import functools
import math
import pathlib
import re

import cupy
import numpy as np

from minunet.contract import conv_out_hw, joined_shape

VERSIONS = {
    "conv2d_forward": (1, 2, 3, 4, 5),
    "conv2d_backward_input": (1, 2, 3, 4, 5),
    "conv2d_backward_weight": (1, 2, 3, 4, 5),
}
DEFAULT_VERSION = {name: 2 for name in VERSIONS}

# ------------------------------------------------------------------------------------------
# sources, compilation, kernel lookup
# ------------------------------------------------------------------------------------------

# the kernels of each family, as named in its .cu file (each instantiated for float and double)
FAMILIES = {
    "conv2d": tuple(f"conv2d_{p}_v{v}" for p in ("forward", "backward_input", "backward_weight") for v in range(1, 6)),
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

# The block tiles (BM, BN) each register-tiled kernel (v3 and up: a name ending in _v3, _v4, ...) is
# instantiated for, per dtype. Every instantiation costs NVRTC about 2 s, so float64 (the gradient
# checks' dtype, not a speed target) gets one.
TILES = {np.dtype(np.float32): ((128, 128), (128, 64), (64, 128)), np.dtype(np.float64): ((128, 128),)}

# The TF32 tensor-core version: its kernels exist for float32 only; float64 runs TF32_FALLBACK.
TF32_VERSION, TF32_FALLBACK = 5, 4

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


def _name_version(name):
    """The version a kernel name ends with (conv2d_forward_v3 -> 3), or None."""
    version = re.search(r"_v(\d+)$", name)
    return int(version.group(1)) if version else None


def _tiled(name):
    """Is `name` a register-tiled kernel (version 3 or later), templated on its block tile too?"""
    return (_name_version(name) or 0) >= 3


def _expression(name, dtype, tile=None):
    """The name expression of one instantiation: "conv2d_forward_v2<float>", "conv2d_forward_v3<float, 128, 64>"."""
    return f"{name}<{_CTYPE[dtype]}, {tile[0]}, {tile[1]}>" if tile else f"{name}<{_CTYPE[dtype]}>"


def _instantiations(name):
    """[(dtype, tile or None)] that kernel `name` is compiled for."""
    dtypes = [np.dtype(np.float32)] if _name_version(name) == TF32_VERSION else list(_CTYPE)
    return [(dtype, tile) for dtype in dtypes for tile in (TILES[dtype] if _tiled(name) else (None,))]


def _name_expressions(family, names=None):
    return [_expression(name, dtype, tile) for name in (names or FAMILIES[family])
            for dtype, tile in _instantiations(name)]


def _compile_table():
    """[(family, source, name_expressions, nvrtc_options)]: every kernel of every family, as `_module` compiles them."""
    return [(family, _family_source(family), _name_expressions(family), NVRTC_OPTIONS) for family in FAMILIES]


def _module_group(family, name):
    """What is compiled together with kernel `name`: a tiled kernel on its own (its instantiations
    take seconds each), None for all the other kernels of its family (quick to compile)."""
    return name if _tiled(name) else None


@functools.cache
def _module(family, group):
    """The module of `family` holding `group` (see _module_group), compiled on first use."""
    names = [group] if group else [name for name in FAMILIES[family] if not _tiled(name)]
    return cupy.RawModule(code=_family_source(family), options=OPTIONS,
                          name_expressions=_name_expressions(family, names))


@functools.cache
def _kernel(family, name, dtype, tile=None):
    return _module(family, _module_group(family, name)).get_function(_expression(name, dtype, tile))


@functools.cache
def _sm_count(device_id):
    return cupy.cuda.Device(device_id).attributes["MultiProcessorCount"]


def _launch(family, name, dtype, grid, block, args, tile=None):
    """Launch kernel `name`<dtype> (<dtype, BM, BN> for a tiled one) of `family`; a grid with no
    blocks launches nothing."""
    if min(grid) > 0:
        _kernel(family, name, np.dtype(dtype), tile)(grid, block, args)


def _grid_1d(n):
    """Blocks for a grid-stride loop over n elements: one per THREADS elements, at most 32 per SM."""
    return (min(-(-n // THREADS), 32 * _sm_count(cupy.cuda.Device().id)),)


def _cdiv(a, b):
    return -(-a // b)


def _fits_int32(op, **sizes):
    """The GEMM kernels index rows, columns and pixels with int (plus up to one tile of slack); the
    tiled ones (v3 and up) also offsets inside the activation tensors."""
    for name, size in sizes.items():
        if size > _INT32_MAX - 128:
            raise ValueError(f"{op}: {name} = {size} is too large for the kernels' 32-bit indices")


def _gemm_tile(M, N, dtype):
    """The block tile (BM, BN) of the register-tiled kernels for an M x N matrix product (M rows:
    output channels; N columns: pixels, or taps for a weight gradient), among TILES[dtype].

    A tile pays for its whole area whatever part of it lies inside the matrix, and a 128 x 128 tile
    does the most work per byte it stages; but a grid with fewer blocks than the GPU has SMs leaves
    SMs idle. So: no 128-wide side where the matrix has at most 64 (half the tile would be zeros);
    then the largest tile whose grid still gives every SM a block; if none does, the tile with the
    most blocks (the smaller one of equal counts). These rules are reasoned, not yet measured: the
    benches time each version at the U-Net's shapes, and a GPU run should check them."""
    tiles = TILES[np.dtype(dtype)]
    fitting = [t for t in tiles if (t[0] == 64 or M > 64) and (t[1] == 64 or N > 64)] or list(tiles)
    blocks = {t: _cdiv(M, t[0]) * _cdiv(N, t[1]) for t in fitting}
    full = [t for t in fitting if blocks[t] >= _sm_count(cupy.cuda.Device().id)]
    if full:
        return max(full, key=lambda t: t[0] * t[1])
    return max(fitting, key=lambda t: (blocks[t], -t[0] * t[1]))


def _tile_threads(tile):
    return (tile[0] // 8) * (tile[1] // 8)


def _kernel_version(op, v, dtype):
    """The version whose kernels run for version `v` on `dtype` arrays: TF32_VERSION runs
    TF32_FALLBACK on float64 (and refuses GPUs without TF32 tensor cores)."""
    if v != TF32_VERSION:
        return v
    if np.dtype(dtype) != np.float32:
        return TF32_FALLBACK
    cc = cupy.cuda.Device().compute_capability
    if int(cc) < 80:
        raise ValueError(f"{op}: version {v} (TF32 tensor cores) needs compute capability 8.0 or newer; "
                         f"this GPU has {cc[:-1]}.{cc[-1]}")
    return v


# ------------------------------------------------------------------------------------------
# convolution
# ------------------------------------------------------------------------------------------

def _split_k(P, tiles):
    """(splits, chunk): cut a reduction over P pixels into `splits` chunks of `chunk` pixels (a
    multiple of GEMM_TILE_K) so that tiles * splits blocks fill the GPU about twice over, each
    chunk at least 512 pixels long."""
    target = 2 * _sm_count(cupy.cuda.Device().id)
    splits = max(1, min(_cdiv(target, tiles), _cdiv(P, 512)))
    chunk = max(GEMM_TILE_K, _cdiv(_cdiv(P, splits), GEMM_TILE_K) * GEMM_TILE_K)
    return max(1, _cdiv(P, chunk)), chunk


def _conv2d_dims(x_shape, w_shape, stride, padding):
    """(N, C, H, W, K, kh, kw, sh, sw, ph, pw, Ho, Wo) as np.int32: the size arguments of every
    conv2d.cu kernel, for x (N, C, H, W), w (K, C, kh, kw) and y (N, K, Ho, Wo)."""
    (N, C, H, W), (K, _, kh, kw) = x_shape, w_shape
    return [np.int32(d) for d in (N, C, H, W, K, kh, kw, *stride, *padding,
                                  *conv_out_hw((H, W), (kh, kw), stride, padding))]


def _conv2d_grid(op, v, outputs, pixels, taps, rows):
    """(grid, block) of a conv2d.cu kernel: v1 one thread per output (grid-stride), v2 one
    GEMM_TILE_M x GEMM_TILE_N tile of (rows, pixels) per block, over `taps` products each."""
    if v == 1:
        return _grid_1d(outputs), (THREADS,)
    _fits_int32(op, pixels=pixels, taps=taps)
    return (_cdiv(pixels, GEMM_TILE_N), _cdiv(rows, GEMM_TILE_M)), (GEMM_THREADS,)


# A list input (contract.conv2d_forward) is concatenated along channels first, and its gradient
# split after, by concat.cu's kernels: conv2d.cu's kernels read one array. (The CPU's Winograd
# kernels read the list in place.)

def _joined(x):
    """x, or a list's concatenation along channels"""
    return concat_forward(x, [(0, 0)] * len(x), x[0].shape[2:]) if isinstance(x, list) else x


def conv2d_forward(x, w, b, stride, padding, version=None, relu=False):
    # x: (N, C, H, W) or a list of (N, C_i, H, W), w: (K, C, kh, kw), b: (K,) or None -> y: (N, K, Ho, Wo)
    # (max(y, 0) with relu)
    op = "conv2d_forward"
    x = _joined(x)
    v = _kernel_version(op, version or DEFAULT_VERSION[op], x.dtype)
    dims = _conv2d_dims(x.shape, w.shape, stride, padding)
    N, C, H, W, K, kh, kw, *_, Ho, Wo = (int(d) for d in dims)
    y = cupy.empty((N, K, Ho, Wo), x.dtype)
    if v >= 3:
        _fits_int32(op, x_elements=x.size, y_elements=y.size)
        tile = _gemm_tile(K, N * Ho * Wo, x.dtype)
        wt = cupy.ascontiguousarray(w.transpose(2, 3, 1, 0))  # (kh, kw, C, K)
        # (const T* x, const T* wt, const T* b, T* y, int N, C, H, W, K, kh, kw, sh, sw, ph, pw, Ho, Wo,
        #  int relu)
        _launch("conv2d", f"conv2d_forward_v{v}", x.dtype, (_cdiv(N * Ho * Wo, tile[1]), _cdiv(K, tile[0])),
                (_tile_threads(tile),), (x, wt, b, y, *dims, np.int32(relu)), tile)
        return y
    grid, block = _conv2d_grid(op, v, y.size, N * Ho * Wo, C * kh * kw, K)
    # (const T* x, const T* w, const T* b, T* y, int N, C, H, W, K, kh, kw, sh, sw, ph, pw, Ho, Wo)
    _launch("conv2d", f"conv2d_forward_v{v}", x.dtype, grid, block, (x, w, b, y, *dims))
    if relu:  # v1 and v2 have no fused epilogue: a second pass
        cupy.maximum(y, 0, out=y)
    return y


def conv2d_backward_input(gy, w, x_shape, stride, padding, version=None, relu_y=None):
    # gy: (N, K, Ho, Wo), w: (K, C, kh, kw), relu_y: gy's shape or None -> gx: x_shape = (N, C, H, W),
    # or for a list of shapes the list of gradients
    if isinstance(x_shape, list):
        gx = conv2d_backward_input(gy, w, joined_shape(x_shape), stride, padding, version, relu_y)
        return concat_backward(gx, x_shape, [(0, 0)] * len(x_shape))
    op = "conv2d_backward_input"
    v = _kernel_version(op, version or DEFAULT_VERSION[op], gy.dtype)
    dims = _conv2d_dims(x_shape, w.shape, stride, padding)
    N, C, H, W, K, kh, kw = (int(d) for d in dims[:7])
    gx = cupy.empty(x_shape, gy.dtype)
    if v >= 3:  # the ReLU mask fused into the loads of gy
        _fits_int32(op, gy_elements=gy.size, gx_elements=gx.size)
        tile = _gemm_tile(C, N * H * W, gy.dtype)
        wt = cupy.ascontiguousarray(w.transpose(2, 3, 0, 1))  # (kh, kw, K, C)
        # (const T* gy, const T* wt, const T* b, T* gx, int N, C, H, W, K, kh, kw, sh, sw, ph, pw, Ho, Wo,
        #  const T* relu_y): no b here
        _launch("conv2d", f"conv2d_backward_input_v{v}", gy.dtype, (_cdiv(N * H * W, tile[1]), _cdiv(C, tile[0])),
                (_tile_threads(tile),), (gy, wt, None, gx, *dims, relu_y), tile)
        return gx
    if relu_y is not None:  # v1 and v2 have no fused mask: a first pass
        gy = relu_backward(gy, relu_y)
    grid, block = _conv2d_grid(op, v, gx.size, N * H * W, K * kh * kw, C)
    # (const T* gy, const T* w, const T* b, T* gx, int N, C, H, W, K, kh, kw, sh, sw, ph, pw, Ho, Wo): no b here
    _launch("conv2d", f"conv2d_backward_input_v{v}", gy.dtype, grid, block, (gy, w, None, gx, *dims))
    return gx


def conv2d_backward_weight(x, gy, w_shape, stride, padding, version=None, relu_y=None, bias=False):
    # x: (N, C, H, W), gy: (N, K, Ho, Wo), relu_y: gy's shape or None -> gw: w_shape = (K, C, kh, kw),
    # or (gw, gb (K,)) with bias; x may be a list
    op = "conv2d_backward_weight"
    x = _joined(x)
    v = _kernel_version(op, version or DEFAULT_VERSION[op], x.dtype)
    dims = _conv2d_dims(x.shape, w_shape, stride, padding)
    N, C, _, _, K, kh, kw, *_, Ho, Wo = (int(d) for d in dims)
    P, R = N * Ho * Wo, C * kh * kw
    if v >= 3:  # the mask and the bias gradient fused: gb is the GEMM's column R, a column of ones
        _fits_int32(op, pixels=P, taps=R + 1, x_elements=x.size, gy_elements=gy.size)
        RB = R + bool(bias)
        tile = _gemm_tile(K, RB, x.dtype)
        tiles = (_cdiv(RB, tile[1]), _cdiv(K, tile[0]))
        splits, chunk = _split_k(P, tiles[0] * tiles[1])
        parts = cupy.empty((splits, K, RB), x.dtype)
        # (const T* x, const T* gy, T* gw_parts, int N, C, H, W, K, kh, kw, sh, sw, ph, pw, Ho, Wo, int chunk,
        #  const T* relu_y, int bias)
        _launch("conv2d", f"conv2d_backward_weight_v{v}", x.dtype, (*tiles, splits), (_tile_threads(tile),),
                (x, gy, parts, *dims, np.int32(chunk), relu_y, np.int32(bias)), tile)
        total = parts[0] if splits == 1 else parts.sum(axis=0)
        if not bias:
            return total.reshape(w_shape)
        return cupy.ascontiguousarray(total[:, :R]).reshape(w_shape), cupy.ascontiguousarray(total[:, R])
    if relu_y is not None:  # v1 and v2 fuse neither: a pass for the mask, one for the bias gradient
        gy = relu_backward(gy, relu_y)
    if v == 1:
        gw = cupy.empty(w_shape, x.dtype)
        # (const T* x, const T* gy, T* gw, int N, C, H, W, K, kh, kw, sh, sw, ph, pw, Ho, Wo)
        _launch("conv2d", "conv2d_backward_weight_v1", x.dtype, _grid_1d(gw.size), (THREADS,), (x, gy, gw, *dims))
    else:
        _fits_int32(op, pixels=P, taps=R)
        tiles = (_cdiv(R, GEMM_TILE_N), _cdiv(K, GEMM_TILE_M))
        splits, chunk = _split_k(P, tiles[0] * tiles[1])
        parts = cupy.empty((splits, *w_shape), x.dtype)
        # (const T* x, const T* gy, T* gw_parts, int N, C, H, W, K, kh, kw, sh, sw, ph, pw, Ho, Wo, int chunk)
        _launch("conv2d", "conv2d_backward_weight_v2", x.dtype, (*tiles, splits), (GEMM_THREADS,),
                (x, gy, parts, *dims, np.int32(chunk)))
        gw = parts[0] if splits == 1 else parts.sum(axis=0)
    return (gw, bias_backward(gy)) if bias else gw


# ------------------------------------------------------------------------------------------
# transposed convolution with kernel == stride, no padding: each input pixel owns a patch
# ------------------------------------------------------------------------------------------

def conv_transpose2d_forward(x, w, b):
    # x: (N, Cin, H, W), w: (Cin, Cout, kh, kw), b: (Cout,) or None -> y: (N, Cout, H*kh, W*kw)
    op = "conv_transpose2d_forward"
    (N, Cin, H, W), (_, Cout, kh, kw) = x.shape, w.shape
    y = cupy.empty((N, Cout, H * kh, W * kw), x.dtype)
    _fits_int32(op, pixels=N * H * W, outputs_per_pixel=Cout * kh * kw)
    grid = (_cdiv(N * H * W, GEMM_TILE_N), _cdiv(Cout * kh * kw, GEMM_TILE_M))
    # (const T* x, const T* w, const T* b, T* y, int N, Cin, H, W, Cout, kh, kw)
    _launch("conv_transpose2d", "conv_transpose2d_forward_v2", x.dtype, grid, (GEMM_THREADS,),
            (x, w, b, y, *(np.int32(d) for d in (N, Cin, H, W, Cout, kh, kw))))
    return y


def conv_transpose2d_backward_input(gy, w):
    # gy: (N, Cout, H*kh, W*kw), w: (Cin, Cout, kh, kw) -> gx: (N, Cin, H, W)
    op = "conv_transpose2d_backward_input"
    (N, Cout, Ho, Wo), (Cin, _, kh, kw) = gy.shape, w.shape
    H, W = Ho // kh, Wo // kw
    gx = cupy.empty((N, Cin, H, W), gy.dtype)
    _fits_int32(op, pixels=N * H * W, taps=Cout * kh * kw)
    grid = (_cdiv(N * H * W, GEMM_TILE_N), _cdiv(Cin, GEMM_TILE_M))
    # (const T* gy, const T* w, T* gx, int N, Cin, H, W, Cout, kh, kw, Ho, Wo)
    _launch("conv_transpose2d", "conv_transpose2d_backward_input_v2", gy.dtype, grid, (GEMM_THREADS,),
            (gy, w, gx, *(np.int32(d) for d in (N, Cin, H, W, Cout, kh, kw, Ho, Wo))))
    return gx


def conv_transpose2d_backward_weight(x, gy, w_shape):
    # x: (N, Cin, H, W), gy: (N, Cout, H*kh, W*kw) -> gw: w_shape = (Cin, Cout, kh, kw)
    op = "conv_transpose2d_backward_weight"
    (N, Cin, H, W), (_, Cout, kh, kw), (Ho, Wo) = x.shape, w_shape, gy.shape[2:]
    P, Q = N * H * W, Cout * kh * kw
    _fits_int32(op, pixels=P, taps=Q)
    tiles = (_cdiv(Q, GEMM_TILE_N), _cdiv(Cin, GEMM_TILE_M))
    splits, chunk = _split_k(P, tiles[0] * tiles[1])
    parts = cupy.empty((splits, Cin, Cout, kh, kw), x.dtype)
    # (const T* x, const T* gy, T* gw_parts, int N, Cin, H, W, Cout, kh, kw, Ho, Wo, int chunk)
    _launch("conv_transpose2d", "conv_transpose2d_backward_weight_v2", x.dtype, (*tiles, splits), (GEMM_THREADS,),
            (x, gy, parts, *(np.int32(d) for d in (N, Cin, H, W, Cout, kh, kw, Ho, Wo, chunk))))
    return parts[0] if splits == 1 else parts.sum(axis=0)


# ------------------------------------------------------------------------------------------
# max pooling
# ------------------------------------------------------------------------------------------

def max_pool2d_forward(x, kernel_size, stride, padding):
    # x: (N, C, H, W) -> y: (N, C, Ho, Wo), argmax: int64 (N, C, Ho, Wo)
    (N, C, H, W), (kh, kw), (sh, sw), (ph, pw) = x.shape, kernel_size, stride, padding
    Ho, Wo = conv_out_hw((H, W), kernel_size, stride, padding)
    y = cupy.empty((N, C, Ho, Wo), x.dtype)
    argmax = cupy.empty((N, C, Ho, Wo), np.int64)
    # (const T* x, T* y, int64* argmax, int64 planes, int H, W, Ho, Wo, kh, kw, sh, sw, ph, pw)
    _launch("max_pool2d", "max_pool2d_forward", x.dtype, _grid_1d(y.size), (THREADS,),
            (x, y, argmax, np.int64(N * C), *(np.int32(d) for d in (H, W, Ho, Wo, kh, kw, sh, sw, ph, pw))))
    return y, argmax


def max_pool2d_backward(gy, argmax, x_shape):
    # gy, argmax: (N, C, Ho, Wo) -> gx: x_shape = (N, C, H, W)
    N, C, H, W = x_shape
    gx = cupy.zeros(x_shape, gy.dtype)  # the kernel adds into it
    # (const T* gy, const int64* argmax, T* gx, int64 planes, int H, W, Ho, Wo)
    _launch("max_pool2d", "max_pool2d_backward", gy.dtype, _grid_1d(gy.size), (THREADS,),
            (gy, argmax, gx, np.int64(N * C), *(np.int32(d) for d in (H, W, *gy.shape[2:]))))
    return gx


# ------------------------------------------------------------------------------------------
# channel concatenation with cropping
# ------------------------------------------------------------------------------------------

def concat_forward(xs, offsets, out_hw):
    # xs[i]: (N, C_i, H_i, W_i) -> y: (N, sum C_i, H, W)
    (H, W), N, Cy = out_hw, xs[0].shape[0], sum(x.shape[1] for x in xs)
    y = cupy.empty((N, Cy, H, W), xs[0].dtype)
    c0 = 0
    for x, (top, left) in zip(xs, offsets):
        _, Ci, Hi, Wi = x.shape
        # (const T* x, T* y, int N, Ci, Hi, Wi, Cy, Hy, Wy, c0, top, left)
        _launch("concat", "concat_forward", x.dtype, _grid_1d(N * Ci * H * W), (THREADS,),
                (x, y, *(np.int32(d) for d in (N, Ci, Hi, Wi, Cy, H, W, c0, top, left))))
        c0 += Ci
    return y


def concat_backward(gy, x_shapes, offsets):
    # gy: (N, sum C_i, H, W) -> gxs[i]: x_shapes[i] = (N, C_i, H_i, W_i)
    N, Cy, H, W = gy.shape
    gxs, c0 = [], 0
    for shape, (top, left) in zip(x_shapes, offsets):
        _, Ci, Hi, Wi = shape
        gx = cupy.empty(shape, gy.dtype)
        # (const T* gy, T* gx, int N, Ci, Hi, Wi, Cy, Hy, Wy, c0, top, left)
        _launch("concat", "concat_backward", gy.dtype, _grid_1d(gx.size), (THREADS,),
                (gy, gx, *(np.int32(d) for d in (N, Ci, Hi, Wi, Cy, H, W, c0, top, left))))
        gxs.append(gx)
        c0 += Ci
    return gxs


# ------------------------------------------------------------------------------------------
# activation and bias
# ------------------------------------------------------------------------------------------

def relu_forward(x, b=None):
    # x: (N, C, H, W) with b: (C,), or any shape without -> y: x's shape
    C, HW = (1, 1) if b is None else (x.shape[1], x.shape[2] * x.shape[3])
    y = cupy.empty_like(x)
    # (const T* x, const T* b, T* y, int64 n, int C, int64 HW)
    _launch("activation", "relu_forward", x.dtype, _grid_1d(x.size), (THREADS,),
            (x, b, y, np.int64(x.size), np.int32(C), np.int64(HW)))
    return y


def relu_backward(gy, y):
    # gy, y: (...) -> gx: (...)
    gx = cupy.empty_like(gy)
    # (const T* gy, const T* y, T* gx, int64 n)
    _launch("activation", "relu_backward", gy.dtype, _grid_1d(gy.size), (THREADS,), (gy, y, gx, np.int64(gy.size)))
    return gx


def bias_backward(gy):
    # gy: (N, C, H, W) (or any (N, C, ...)) -> gb: (C,)
    N, C, HW = gy.shape[0], gy.shape[1], math.prod(gy.shape[2:])
    gb = cupy.empty((C,), gy.dtype)
    # (const T* gy, T* gb, int N, int C, int64 HW): one block per channel
    _launch("activation", "bias_backward", gy.dtype, (C,), (THREADS,),
            (gy, gb, np.int32(N), np.int32(C), np.int64(HW)))
    return gb


# ------------------------------------------------------------------------------------------
# softmax cross-entropy
# ------------------------------------------------------------------------------------------

def softmax_cross_entropy_forward(x, target, weight, ignore_index):
    # x: (N, C, H, W), target: int64 (N, H, W), weight: (C,) or None -> loss: (N, H, W), p: (N, C, H, W)
    N, C, H, W = x.shape
    loss = cupy.empty((N, H, W), x.dtype)
    p = cupy.empty_like(x)
    # (const T* x, const int64* target, const T* weight, T* loss, T* p, int64 pixels, int C, int64 HW,
    #  int64 ignore_index)
    _launch("loss", "softmax_cross_entropy_forward", x.dtype, _grid_1d(N * H * W), (THREADS,),
            (x, target, weight, loss, p, np.int64(N * H * W), np.int32(C), np.int64(H * W), np.int64(ignore_index)))
    return loss, p


def softmax_cross_entropy_backward(p, target, weight, ignore_index, gloss):
    # p: (N, C, H, W), target: int64 (N, H, W), gloss: (N, H, W) -> gx: (N, C, H, W)
    N, C, H, W = p.shape
    gx = cupy.empty_like(p)
    # (const T* p, const int64* target, const T* weight, const T* gloss, T* gx, int64 total, int C,
    #  int64 HW, int64 ignore_index)
    _launch("loss", "softmax_cross_entropy_backward", p.dtype, _grid_1d(p.size), (THREADS,),
            (p, target, weight, gloss, gx, np.int64(p.size), np.int32(C), np.int64(H * W), np.int64(ignore_index)))
    return gx


# ------------------------------------------------------------------------------------------
# batch normalisation
# ------------------------------------------------------------------------------------------

def batch_norm_forward(x, gamma, beta, mean, var, eps, training):
    # x: (N, C, ...), gamma, beta: (C,) or None, mean, var: (C,) (None in training)
    #   -> y: x's shape, mean, var: (C,) the statistics used (fresh arrays)
    N, C, HW = x.shape[0], x.shape[1], math.prod(x.shape[2:])
    dtype = x.dtype
    if training:
        mean, var = cupy.empty((C,), dtype), cupy.empty((C,), dtype)
        # (const T* x, T* mean, T* var, int N, int C, int64 HW): one block per channel
        _launch("batch_norm", "batch_norm_stats", dtype, (C,), (THREADS,),
                (x, mean, var, np.int32(N), np.int32(C), np.int64(HW)))
    else:
        mean, var = mean.copy(), var.copy()
    y = cupy.empty_like(x)
    # (const T* x, const T* gamma, const T* beta, const T* mean, const T* var, T* y, T eps, int64 total,
    #  int C, int64 HW)
    _launch("batch_norm", "batch_norm_forward", dtype, _grid_1d(x.size), (THREADS,),
            (x, gamma, beta, mean, var, y, dtype.type(eps), np.int64(x.size), np.int32(C), np.int64(HW)))
    return y, mean, var


def batch_norm_backward(gy, x, gamma, mean, var, eps, training):
    # gy, x: (N, C, ...), gamma: (C,) or None, mean, var: (C,) -> gx: x's shape, ggamma, gbeta: (C,)
    N, C, HW = x.shape[0], x.shape[1], math.prod(x.shape[2:])
    dtype = x.dtype
    ggamma, gbeta = cupy.empty((C,), dtype), cupy.empty((C,), dtype)
    # (const T* gy, const T* x, const T* mean, const T* var, T* ggamma, T* gbeta, T eps, int N, int C,
    #  int64 HW): one block per channel
    _launch("batch_norm", "batch_norm_backward_reduce", dtype, (C,), (THREADS,),
            (gy, x, mean, var, ggamma, gbeta, dtype.type(eps), np.int32(N), np.int32(C), np.int64(HW)))
    gx = cupy.empty_like(x)
    # (const T* gy, const T* x, const T* gamma, const T* mean, const T* var, const T* ggamma,
    #  const T* gbeta, T* gx, T eps, int training, int64 total, int C, int64 HW, int64 M)
    _launch("batch_norm", "batch_norm_backward", dtype, _grid_1d(x.size), (THREADS,),
            (gy, x, gamma, mean, var, ggamma, gbeta, gx, dtype.type(eps), np.int32(training),
             np.int64(x.size), np.int32(C), np.int64(HW), np.int64(N * HW)))
    return gx, ggamma, gbeta


# ------------------------------------------------------------------------------------------
# optimizers: every tensor of a step in one launch, through a table of addresses
# ------------------------------------------------------------------------------------------

OPTIM_CHUNK = 4096  # elements per block-sized piece of work: mirrors OPTIM_CHUNK in kernels/optim.cu
_tables = {}        # the rows of the latest tables -> their device copies (see _tensor_table)


def _tensor_table(tensors):
    """(table, chunks): the device table of kernels/optim.cu, one row (p, g, state 1, state 2, n,
    first_chunk) per tuple of arrays in `tensors` (None: a state the tensor lacks), and the number
    of chunks. A table is copied to the device once and kept while its arrays stay where they are
    (the last 8 are kept): a training step whose gradients persist reuses it, with no copy, which a
    CUDA graph needs (a host-to-device copy cannot be captured)."""
    rows, chunks = [], 0
    for arrays in tensors:
        n = arrays[0].size
        addresses = [0 if a is None else a.data.ptr for a in arrays]
        rows.append((*addresses, *[0] * (4 - len(addresses)), n, chunks))
        chunks += _cdiv(n, OPTIM_CHUNK)
    key = tuple(rows)
    table = _tables.pop(key, None)
    if table is None:
        table = cupy.asarray(np.array(rows, np.int64))
        while len(_tables) >= 8:
            _tables.pop(next(iter(_tables)))
    _tables[key] = table  # now the newest
    return table, chunks


def _update_launch(name, tensors, hyper):
    table, chunks = _tensor_table(tensors)
    # (const int64* table, const double* hyper, int ntensors, int64 chunks)
    _launch("optim", name, tensors[0][0].dtype, (min(chunks, 32 * _sm_count(cupy.cuda.Device().id)),), (THREADS,),
            (table, hyper, np.int32(len(tensors)), np.int64(chunks)))


def sgd_update(ps, gs, bufs, hyper):
    # ps[i], gs[i], bufs[i] (or None): one shape per i; hyper: float64 (len(ps), 6) -> None; ps (and bufs)
    # updated in place, all in one launch
    _update_launch("sgd_update", list(zip(ps, gs, bufs)), hyper)


def adam_update(ps, gs, ms, vs, hyper):
    # ps[i], gs[i], ms[i], vs[i]: one shape per i; hyper: float64 (len(ps), 8) -> None; ps, ms, vs updated in
    # place, all in one launch
    _update_launch("adam_update", list(zip(ps, gs, ms, vs)), hyper)
