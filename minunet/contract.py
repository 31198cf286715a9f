"""minunet.contract: the kernel contract, as code, and the checked dispatch that enforces it.

minunet.cpu (numba) and minunet.cuda (CUDA C) implement the same kernels: one function per
entry of CONTRACT, with the same name and signature. A kernel trusts its arguments (numba does
not check bounds and a CUDA kernel reads whatever address it is given), so they are checked
before any kernel runs, here, once for both backends. Each kernel is declared below by a
function of its name that takes a `Checker` and the call's arguments and

  - normalises them: an int or (h, w) pair becomes a pair of Python ints, a shape a tuple of
    ints, a per-channel vector a contiguous array of the input's dtype (or None), a scalar a
    Python number;
  - checks every shape and value, raising one line that names the kernel, the argument and
    the shapes (ValueError, or TypeError for a wrong type or dtype);
  - returns a `Call`: the normalised arguments, the shape and dtype of every output, and the
    work done (FLOPs; the bytes are counted from the arrays) for the debug counters.

`Kernels(module, xp)` is what backend.kernels_for returns: for each kernel it runs the
declaration, calls the backend's function of that name with the normalised arguments and then
asserts that the outputs have the declared shapes and dtypes, as tinygrad checks its ops. So a
backend keeps only what is its own (choosing a version, allocating, launching) and cannot
drift from the other. Conventions every kernel keeps:

- Layout is NCHW. Array arguments are C-contiguous, of one float dtype (float32 or float64)
  and of the backend's array type; class targets and pooling indices are int64 (an index is
  flat h * W + w into one input plane, as in PyTorch).
- A kernel allocates and returns fresh outputs; it never accumulates into its arguments. The
  exceptions are the optimizer updates, which update their parameter and state arrays in
  place (that is what an optimizer step is), and return None; they take lists of tensors and
  update them all in one call (on the GPU one launch).
- `version=` picks one of a convolution's implementations (None: the backend chooses by
  shape); each backend lists its versions in VERSIONS. Every version computes the same
  function; the tests run them all and the benchmarks time them all.

Counting: `debug()` (minunet.debug) or the environment variable MINUNET_DEBUG, read at every
call, count each kernel's calls, FLOPs and bytes. MINUNET_DEBUG=1 prints the table when the
process exits, MINUNET_DEBUG=2 also prints one line per call. The bytes are what a kernel must
read and write at least once (its array arguments and outputs); FLOPs count a multiply-add as
two and, for the elementwise kernels, the arithmetic per element written in each declaration.

This module imports neither CuPy nor the backends; the array module comes from the caller.
"""
import atexit
import collections
import inspect
import os
import sys

import numpy as np

FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


# ---------------------------------------------------------------------------------------------
# normalising and checking
# ---------------------------------------------------------------------------------------------

def pair(op, name, v, minimum=0):
    """An int or an (h, w) pair of ints -> (h, w) as Python ints, each at least `minimum`; the
    one normalisation of kernel_size, stride, padding and output_padding in minunet."""
    if type(v) is tuple and len(v) == 2 and type(v[0]) is int and type(v[1]) is int and min(v) >= minimum:
        return v  # already normalised (every kernel call from minunet.functional): kept cheap
    p = (v, v) if isinstance(v, (int, np.integer)) else tuple(v) if isinstance(v, (tuple, list)) else ()
    if len(p) != 2 or not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in p):
        raise TypeError(f"{op}: {name} must be an int or an (h, w) pair of ints, got {v!r}")
    if min(p) < minimum:
        raise ValueError(f"{op}: {name} must be >= {minimum}, got {v!r}")
    return int(p[0]), int(p[1])


def conv_out_hw(hw, khw, stride, padding):
    """The output size (Ho, Wo) of a convolution or a pooling: (H + 2 ph - kh) // sh + 1, ..."""
    (H, W), (kh, kw), (sh, sw), (ph, pw) = hw, khw, stride, padding
    return (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1


class Call:
    """A checked kernel call: the normalised arguments, the declared outputs (an Out, a tuple of
    Outs, a list of Outs, or None for an in-place update), the arrays it updates in place, and
    its FLOPs."""
    __slots__ = ("args", "out", "writes", "flops")

    def __init__(self, args, out, writes, flops):
        self.args, self.out, self.writes, self.flops = args, out, writes, flops


class Out:
    """The declared shape and dtype of one output."""
    __slots__ = ("shape", "dtype")

    def __init__(self, shape, dtype):
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)


class Checker:
    """The checks of one kernel call: `op` names the kernel, `xp` is numpy or cupy (whose arrays
    the backend takes), `versions` the backend's versions of this kernel. Every message starts
    with the kernel's name."""

    def __init__(self, op, xp, device, versions=None):
        self.op, self.xp, self.versions = op, xp, versions
        self.expected = f"a {xp.__name__}.ndarray on the {device}"

    def fail(self, message, error=ValueError):
        raise error(f"{self.op}: {message}")

    def floats(self, ndim=None, **arrays):
        """Arrays (given by name, in order) of this backend, C-contiguous, of one float dtype and
        (where given) `ndim` dimensions. Returns the dtype."""
        dtype = first = None
        for name, a in arrays.items():
            if not isinstance(a, self.xp.ndarray):
                self.fail(f"{name} must be {self.expected}, got {type(a).__name__}", TypeError)
            if a.dtype not in FLOATS:
                self.fail(f"{name} has dtype {a.dtype}; expected float32 or float64", TypeError)
            if dtype is None:
                dtype, first = a.dtype, name
            elif a.dtype != dtype:
                self.fail(f"{name} has dtype {a.dtype} but {first} has {dtype}", TypeError)
            if not a.flags.c_contiguous:
                self.fail(f"{name} of shape {a.shape} must be C-contiguous")
            if ndim is not None and a.ndim != ndim:
                self.fail(f"{name} must have {ndim} dimensions, got shape {a.shape}")
        return dtype

    def int64(self, name, a, shape):
        """An index array (argmax, target): this backend's, int64, C-contiguous, of `shape`."""
        if not isinstance(a, self.xp.ndarray) or a.dtype != np.int64:
            got = f"dtype {a.dtype}" if isinstance(a, self.xp.ndarray) else type(a).__name__
            self.fail(f"{name} must be a {self.xp.__name__} int64 array, got {got}", TypeError)
        if not a.flags.c_contiguous:
            self.fail(f"{name} of shape {a.shape} must be C-contiguous")
        self.same_shape(name, a, shape)
        return a

    def vector(self, name, a, n, dtype):
        """A per-channel vector (bias, gamma, class weight, ...) of length n as a contiguous array
        of `dtype`, or None for None."""
        if a is None:
            return None
        if not isinstance(a, self.xp.ndarray):
            self.fail(f"{name} must be {self.expected} or None, got {type(a).__name__}", TypeError)
        if a.shape != (n,):
            self.fail(f"{name} has shape {a.shape}, expected ({n},)")
        return self.xp.ascontiguousarray(a, dtype=dtype)

    def same_shape(self, name, a, shape):
        if tuple(a.shape) != tuple(shape):
            self.fail(f"{name} has shape {tuple(a.shape)}, expected {tuple(shape)}")

    def shape(self, name, v, ndim=4):
        """A shape argument (x_shape, w_shape): a tuple of `ndim` positive ints."""
        try:
            s = tuple(int(d) for d in v)
        except (TypeError, ValueError):
            s = ()
        if len(s) != ndim or min(s) < 1:
            self.fail(f"{name} must be {ndim} positive ints, got {v!r}")
        return s

    def channels(self, what, have, expects):
        if have != expects:
            self.fail(f"{what[0]} has {have} channels but {what[1]} expects {expects}")

    def pair(self, name, v, minimum=0):
        return pair(self.op, name, v, minimum)

    def conv_out_hw(self, hw, khw, stride, padding):
        """conv_out_hw, or an error where the output would be empty."""
        Ho, Wo = conv_out_hw(hw, khw, stride, padding)
        if Ho <= 0 or Wo <= 0:
            self.fail(f"input {hw[0]}x{hw[1]} with kernel {khw[0]}x{khw[1]}, stride {stride} and padding "
                      f"{padding} gives an empty output ({Ho}x{Wo})")
        return Ho, Wo

    def version(self, v):
        """`version` as given (None: the backend chooses), checked against the backend's list."""
        if v is not None and (isinstance(v, bool) or v not in self.versions):
            self.fail(f"unknown version {v!r}; available: {self.versions}")
        return v

    def call(self, *args, out, writes=(), flops=0):
        return Call(args, out, writes, flops)


# ---------------------------------------------------------------------------------------------
# the kernels: one declaration each, in the order of kernels/ and minunet/cpu/
# ---------------------------------------------------------------------------------------------

CONTRACT = {}  # kernel name -> its declaration


def _declare(fn):
    CONTRACT[fn.__name__] = fn
    return fn


def signature(name):
    """The signature every backend's kernel `name` has: its declaration's, without the checker."""
    params = list(inspect.signature(CONTRACT[name]).parameters.values())[1:]
    return inspect.Signature(params)


# ---- conv2d: y[n,k,i,j] = b[k] + sum_{c,u,v} x[n,c,i*sh-ph+u, j*sw-pw+v] * w[k,c,u,v] --------

def _conv_geometry(c, stride, padding):
    return c.pair("stride", stride, 1), c.pair("padding", padding, 0)


def _conv2d_call(c, x_shape, w_shape, stride, padding, names):
    """What every conv2d pass checks: x and w agree in channels, the geometry is sound and the
    output is not empty. `names` say where x_shape and w_shape came from, for the messages.
    Returns (stride, padding, y_shape, flops)."""
    (N, C, H, W), (K, Cw, kh, kw) = x_shape, w_shape
    c.channels(names, C, Cw)
    stride, padding = _conv_geometry(c, stride, padding)
    Ho, Wo = c.conv_out_hw((H, W), (kh, kw), stride, padding)
    return stride, padding, (N, K, Ho, Wo), 2 * N * K * Ho * Wo * C * kh * kw


def _conv_input(c, x, **more):
    """A convolution's input: an array (N, C, H, W), or a list of arrays (N, C_i, H, W) of one N,
    H and W standing for their concatenation along channels (C = sum C_i), which the kernels
    read where the arrays lie. Checked with the arrays `more` (by name) as `floats` does.
    Returns (x: an array, or a list of two or more; its (N, C, H, W); the dtype)."""
    if not isinstance(x, (list, tuple)):
        dtype = c.floats(ndim=4, x=x, **more)
        return x, x.shape, dtype
    if not x:
        c.fail("x is an empty list; expected an array or a list of arrays (N, C_i, H, W)")
    dtype = c.floats(ndim=4, **{f"x[{i}]": a for i, a in enumerate(x)}, **more)
    return (x[0], x[0].shape, dtype) if len(x) == 1 else (list(x), _listed_shape(c, "x", [a.shape for a in x]), dtype)


def _conv_input_shape(c, x_shape):
    """x_shape: a shape, or the shapes of a list input (see _conv_input). Returns (x_shape: a
    tuple, or a list of two or more; the (N, C, H, W) of the whole)."""
    if isinstance(x_shape, (list, tuple)) and x_shape and all(isinstance(s, (list, tuple)) for s in x_shape):
        if len(x_shape) > 1:
            shapes = [c.shape(f"x_shape[{i}]", s) for i, s in enumerate(x_shape)]
            return shapes, _listed_shape(c, "x_shape", shapes)
        x_shape = x_shape[0]
    x_shape = c.shape("x_shape", x_shape)
    return x_shape, x_shape


def joined_shape(shapes):
    """The (N, sum C_i, H, W) of a list input's shapes (N, C_i, H, W): its concatenation's."""
    return (shapes[0][0], sum(s[1] for s in shapes), *shapes[0][2:])


def _listed_shape(c, name, shapes):
    """joined_shape of the shapes of a list input, which must agree in N, H and W"""
    for i, s in enumerate(shapes):
        if (s[0], *s[2:]) != (shapes[0][0], *shapes[0][2:]):
            c.fail(f"{name}[{i}] has shape {tuple(s)} but {name}[0] has {tuple(shapes[0])}: a list input is its "
                   f"arrays' concatenation along channels, which must agree in N, H and W")
    return joined_shape(shapes)


def _relu_mask(c, relu_y, gy):
    """relu_y: the output y of the ReLU fused into the convolution (whose backward lets gy through
    where y > 0), of gy's shape and dtype; or None."""
    if relu_y is not None:
        c.floats(gy=gy, relu_y=relu_y)
        c.same_shape("relu_y", relu_y, gy.shape)
    return relu_y


@_declare
def conv2d_forward(c, x, w, b, stride, padding, version=None, relu=False):
    """x (N,C,H,W), w (K,C,kh,kw), b (K,) or None -> y (N,K,Ho,Wo), Ho = (H + 2ph - kh) // sh + 1:
    y[n,k,i,j] = b[k] + sum_{c,u,v} x[n,c,i*sh-ph+u, j*sw-pw+v] w[k,c,u,v] (out-of-range x are 0);
    relu=True: max(y, 0), a ReLU fused into the convolution. x may be a list of (N,C_i,H,W):
    their concatenation along channels, never made (free concatenation)."""
    x, x_shape, dtype = _conv_input(c, x, w=w)
    stride, padding, y_shape, flops = _conv2d_call(c, x_shape, w.shape, stride, padding, ("x", f"w {w.shape}"))
    return c.call(x, w, c.vector("b", b, w.shape[0], dtype), stride, padding, c.version(version), bool(relu),
                  out=Out(y_shape, dtype), flops=flops)


@_declare
def conv2d_backward_input(c, gy, w, x_shape, stride, padding, version=None, relu_y=None):
    """gy (N,K,Ho,Wo), w (K,C,kh,kw) -> gx (x_shape) = d/dx sum(y * gy); with relu_y (the output of
    the fused ReLU) of gy * (relu_y > 0) instead. x_shape may be a list of the shapes of a list
    input (see conv2d_forward): then the list of their gradients, each written in place."""
    dtype = c.floats(ndim=4, gy=gy, w=w)
    x_shape, whole = _conv_input_shape(c, x_shape)
    stride, padding, y_shape, flops = _conv2d_call(c, whole, w.shape, stride, padding,
                                                   (f"x_shape {x_shape}", f"w {w.shape}"))
    c.same_shape("gy", gy, y_shape)
    out = [Out(s, dtype) for s in x_shape] if isinstance(x_shape, list) else Out(x_shape, dtype)
    return c.call(gy, w, x_shape, stride, padding, c.version(version), _relu_mask(c, relu_y, gy),
                  out=out, flops=flops)


@_declare
def conv2d_backward_weight(c, x, gy, w_shape, stride, padding, version=None, relu_y=None, bias=False):
    """x (N,C,H,W), gy (N,K,Ho,Wo) -> gw (w_shape) = d/dw sum(y * gy), of gy * (relu_y > 0) with
    relu_y; bias=True: (gw, gb) with gb (K,) = that gy summed over n, h, w (bias_backward's).
    x may be a list, as conv2d_forward's."""
    x, x_shape, dtype = _conv_input(c, x, gy=gy)
    w_shape = c.shape("w_shape", w_shape)
    stride, padding, y_shape, flops = _conv2d_call(c, x_shape, w_shape, stride, padding, ("x", f"w_shape {w_shape}"))
    c.same_shape("gy", gy, y_shape)
    out = (Out(w_shape, dtype), Out((w_shape[0],), dtype)) if bias else Out(w_shape, dtype)
    return c.call(x, gy, w_shape, stride, padding, c.version(version), _relu_mask(c, relu_y, gy), bool(bias),
                  out=out, flops=flops)


# ---- conv_transpose2d with kernel == stride and no padding: the U-Net's up-convolution --------
# (minunet.functional runs every other transposed convolution on conv2d's kernels, as its adjoint)

@_declare
def conv_transpose2d_forward(c, x, w, b):
    """x (N,Cin,H,W), w (Cin,Cout,kh,kw), b (Cout,) or None -> y (N,Cout,H*kh,W*kw):
    y[n,o,i*kh+u, j*kw+v] = b[o] + sum_c x[n,c,i,j] w[c,o,u,v] (each input pixel's own patch)."""
    dtype = c.floats(ndim=4, x=x, w=w)
    (N, Cin, H, W), (Cw, Cout, kh, kw) = x.shape, w.shape
    c.channels(("x", f"w {w.shape}"), Cin, Cw)
    return c.call(x, w, c.vector("b", b, Cout, dtype),
                  out=Out((N, Cout, H * kh, W * kw), dtype), flops=2 * N * Cin * H * W * Cout * kh * kw)


@_declare
def conv_transpose2d_backward_input(c, gy, w):
    """gy (N,Cout,H*kh,W*kw), w (Cin,Cout,kh,kw) -> gx (N,Cin,H,W) = d/dx sum(y * gy)."""
    dtype = c.floats(ndim=4, gy=gy, w=w)
    (N, Cout, Ho, Wo), (Cin, Cw, kh, kw) = gy.shape, w.shape
    c.channels(("gy", f"w {w.shape} (Cin, Cout, kh, kw)"), Cout, Cw)
    if Ho % kh or Wo % kw:
        c.fail(f"gy {gy.shape} is not a whole number of {kh}x{kw} patches")
    H, W = Ho // kh, Wo // kw
    return c.call(gy, w, out=Out((N, Cin, H, W), dtype), flops=2 * N * Cin * H * W * Cout * kh * kw)


@_declare
def conv_transpose2d_backward_weight(c, x, gy, w_shape):
    """x (N,Cin,H,W), gy (N,Cout,H*kh,W*kw) -> gw (w_shape = (Cin,Cout,kh,kw)) = d/dw sum(y * gy)."""
    dtype = c.floats(ndim=4, x=x, gy=gy)
    (N, Cin, H, W), (Cw, Cout, kh, kw) = x.shape, c.shape("w_shape", w_shape)
    c.channels(("x", f"w_shape {(Cw, Cout, kh, kw)}"), Cin, Cw)
    c.same_shape("gy", gy, (N, Cout, H * kh, W * kw))
    return c.call(x, gy, (Cin, Cout, kh, kw), out=Out((Cin, Cout, kh, kw), dtype),
                  flops=2 * N * Cin * H * W * Cout * kh * kw)


# ---- max_pool2d ------------------------------------------------------------------------------

@_declare
def max_pool2d_forward(c, x, kernel_size, stride, padding):
    """x (N,C,H,W) -> y (N,C,Ho,Wo), the max over each window (padded places never win), and
    argmax int64 (N,C,Ho,Wo), h * W + w of the winner in its plane; a tie goes to the first in
    row-major window order. padding is at most half the kernel (as in PyTorch), so every window
    holds a real element."""
    dtype = c.floats(ndim=4, x=x)
    kernel_size, (stride, padding) = c.pair("kernel_size", kernel_size, 1), _conv_geometry(c, stride, padding)
    if padding[0] > kernel_size[0] // 2 or padding[1] > kernel_size[1] // 2:
        c.fail(f"padding {padding} must be at most half of kernel_size {kernel_size}")
    (N, C, H, W) = x.shape
    Ho, Wo = c.conv_out_hw((H, W), kernel_size, stride, padding)
    return c.call(x, kernel_size, stride, padding, out=(Out((N, C, Ho, Wo), dtype), Out((N, C, Ho, Wo), np.int64)),
                  flops=N * C * Ho * Wo * kernel_size[0] * kernel_size[1])


@_declare
def max_pool2d_backward(c, gy, argmax, x_shape):
    """gy, argmax (N,C,Ho,Wo) -> gx (x_shape): gx[n,c].flat[argmax[n,c,i,j]] += gy[n,c,i,j]
    (windows may overlap)."""
    dtype = c.floats(ndim=4, gy=gy)
    c.int64("argmax", argmax, gy.shape)
    x_shape = c.shape("x_shape", x_shape)
    if gy.shape[:2] != x_shape[:2]:
        c.fail(f"gy has shape {gy.shape} but x_shape {x_shape} has (N, C) = {x_shape[:2]}")
    return c.call(gy, argmax, x_shape, out=Out(x_shape, dtype), flops=gy.size)


# ---- concat: channel concatenation with a crop window per input --------------------------------

def _crop_windows(c, x_shapes, offsets, out_hw):
    """Every input (N, C_i, H_i, W_i) of one N, and its (top, left) + out_hw window inside it.
    Returns the offsets as pairs of ints."""
    if not x_shapes:
        c.fail("expected at least one input")
    offsets = list(offsets)
    if len(offsets) != len(x_shapes):
        c.fail(f"{len(x_shapes)} inputs but {len(offsets)} offsets")
    H, W = out_hw
    windows = []
    for i, (shape, offset) in enumerate(zip(x_shapes, offsets)):
        if len(shape) != 4 or shape[0] != x_shapes[0][0]:
            c.fail(f"input {i} has shape {tuple(shape)}; every input must be (N={x_shapes[0][0]}, C_i, H_i, W_i)")
        top, left = c.pair(f"offsets[{i}]", offset, 0)
        if top + H > shape[2] or left + W > shape[3]:
            c.fail(f"the {H}x{W} window at (top, left) = {(top, left)} does not fit input {i} of shape "
                   f"{tuple(shape)}")
        windows.append((top, left))
    return windows


@_declare
def concat_forward(c, xs, offsets, out_hw):
    """xs: list of (N,C_i,H_i,W_i), offsets: list of (top_i, left_i), out_hw (H, W) ->
    y (N, sum C_i, H, W), y[:, c0_i + c, h, w] = xs[i][:, c, top_i + h, left_i + w]."""
    xs = list(xs)
    dtype = c.floats(**{f"xs[{i}]": x for i, x in enumerate(xs)})
    H, W = c.pair("out_hw", out_hw, 1)
    offsets = _crop_windows(c, [x.shape for x in xs], offsets, (H, W))
    return c.call(xs, offsets, (H, W), out=Out((xs[0].shape[0], sum(x.shape[1] for x in xs), H, W), dtype))


@_declare
def concat_backward(c, gy, x_shapes, offsets):
    """gy (N, sum C_i, H, W) -> list of gx_i (x_shapes[i]): zero outside input i's window, the
    matching channel slice of gy inside it."""
    dtype = c.floats(ndim=4, gy=gy)
    x_shapes = [c.shape(f"x_shapes[{i}]", s) for i, s in enumerate(x_shapes)]
    offsets = _crop_windows(c, x_shapes, offsets, gy.shape[2:])
    if x_shapes[0][0] != gy.shape[0] or sum(s[1] for s in x_shapes) != gy.shape[1]:
        c.fail(f"x_shapes {x_shapes} do not split gy of shape {gy.shape} along its channels")
    return c.call(gy, x_shapes, offsets, out=[Out(s, dtype) for s in x_shapes])


# ---- activation and bias -------------------------------------------------------------------

@_declare
def relu_forward(c, x, b=None):
    """y = max(x + b[None, :, None, None], 0) for x (N,C,H,W) and b (C,); y = max(x, 0) for x of
    any shape and b None. NaN passes through."""
    dtype = c.floats(x=x)
    if b is not None and x.ndim != 4:
        c.fail(f"a bias needs x of shape (N, C, H, W), got {x.shape}")
    b = None if b is None else c.vector("b", b, x.shape[1], dtype)
    return c.call(x, b, out=Out(x.shape, dtype), flops=x.size * (1 if b is None else 2))


@_declare
def relu_backward(c, gy, y):
    """gy, y (any one shape) -> gx = gy * (y > 0)."""
    dtype = c.floats(gy=gy, y=y)
    c.same_shape("y", y, gy.shape)
    return c.call(gy, y, out=Out(gy.shape, dtype), flops=gy.size)


@_declare
def bias_backward(c, gy):
    """gy (N,C,...) -> gb (C,) = gy summed over every axis but the channels."""
    dtype = c.floats(gy=gy)
    if gy.ndim < 2:
        c.fail(f"gy must be (N, C, ...), got shape {gy.shape}")
    return c.call(gy, out=Out((gy.shape[1],), dtype), flops=gy.size)


# ---- softmax cross-entropy over the channel axis, per pixel ------------------------------------

def _class_targets(c, name, x, target, weight):
    dtype = c.floats(ndim=4, **{name: x})
    N, C, H, W = x.shape
    return dtype, c.int64("target", target, (N, H, W)), c.vector("weight", weight, C, dtype)


@_declare
def softmax_cross_entropy_forward(c, x, target, weight, ignore_index):
    """x (N,C,H,W), target int64 (N,H,W), weight (C,) or None -> loss (N,H,W) = weight[t] *
    (logsumexp_c x - x[t]), 0 where t == ignore_index; p (N,C,H,W) = softmax over c, for backward.
    Targets are trusted to lie in [0, C) or equal ignore_index (minunet.functional checks them)."""
    dtype, target, weight = _class_targets(c, "x", x, target, weight)
    N, C, H, W = x.shape
    return c.call(x, target, weight, int(ignore_index), out=(Out((N, H, W), dtype), Out(x.shape, dtype)),
                  flops=5 * x.size)


@_declare
def softmax_cross_entropy_backward(c, p, target, weight, ignore_index, gloss):
    """p (N,C,H,W), target int64 (N,H,W), gloss (N,H,W) -> gx (N,C,H,W) =
    gloss * weight[t] * (p - onehot(t)), 0 where t == ignore_index."""
    dtype, target, weight = _class_targets(c, "p", p, target, weight)
    c.floats(p=p, gloss=gloss)
    c.same_shape("gloss", gloss, target.shape)
    return c.call(p, target, weight, int(ignore_index), gloss, out=Out(p.shape, dtype), flops=3 * p.size)


# ---- batch normalisation over (N, H, W), per channel ---------------------------------------------

def _channels(c, x):
    if x.ndim < 2:
        c.fail(f"x must be (N, C, ...), got shape {x.shape}")
    return x.shape[1]


@_declare
def batch_norm_forward(c, x, gamma, beta, mean, var, eps, training):
    """x (N,C,...), gamma, beta (C,) or None (1 and 0) -> y = (x - mean) / sqrt(var + eps) * gamma
    + beta, and the mean and var used (C,): in training the batch mean and biased variance (the
    mean and var arguments are ignored), else the given (running) ones, copied."""
    dtype = c.floats(x=x)
    C = _channels(c, x)
    training = bool(training)
    if not training and (mean is None or var is None):
        c.fail("eval mode (training=False) needs the running mean and var")
    mean, var = (None, None) if training else (c.vector("mean", mean, C, dtype), c.vector("var", var, C, dtype))
    return c.call(x, c.vector("gamma", gamma, C, dtype), c.vector("beta", beta, C, dtype), mean, var, float(eps),
                  training, out=(Out(x.shape, dtype), Out((C,), dtype), Out((C,), dtype)),
                  flops=(7 if training else 4) * x.size)


@_declare
def batch_norm_backward(c, gy, x, gamma, mean, var, eps, training):
    """gy, x (N,C,...), gamma (C,) or None, mean, var (C,) the forward pass used -> gx (x's shape),
    ggamma = sum(gy * xhat), gbeta = sum(gy) (C,); in training gx carries the terms through the
    batch statistics, in eval gx = gy * gamma / sqrt(var + eps)."""
    dtype = c.floats(gy=gy, x=x)
    c.same_shape("x", x, gy.shape)
    C = _channels(c, x)
    if mean is None or var is None:
        c.fail("needs the mean and var the forward pass used")
    return c.call(gy, x, c.vector("gamma", gamma, C, dtype), c.vector("mean", mean, C, dtype),
                  c.vector("var", var, C, dtype), float(eps), bool(training),
                  out=(Out(x.shape, dtype), Out((C,), dtype), Out((C,), dtype)), flops=(8 if training else 2) * x.size)


# ---- optimizers: every parameter of a step in one call, in place ------------------------------

# The columns of the hyperparameter table `hyper` of the optimizer updates, one row per tensor,
# float64 (kernels/optim.cu reads them by position). Booleans are 0 or 1; Adam's step enters
# as step_size = lr / (1 - beta1^step) and bias_correction2_sqrt = sqrt(1 - beta2^step).
SGD_HYPER = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "first")
ADAM_HYPER = ("lr", "beta1", "beta2", "eps", "weight_decay", "step_size", "bias_correction2_sqrt", "decoupled")


def _tensor_lists(c, hyper, columns, ps, **lists):
    """ps and the lists beside it (gradients, states; a state list may hold None) of one length,
    each tensor's arrays of one float dtype, contiguous, of its parameter's shape, no parameter
    twice; hyper a float64 (len(ps), len(columns)) array of this backend. Returns the lists."""
    ps = list(ps)
    lists = {name: list(v) for name, v in lists.items()}
    if not ps:
        c.fail("got no tensors")
    for name, v in lists.items():
        if len(v) != len(ps):
            c.fail(f"{name} holds {len(v)} arrays for {len(ps)} parameters")
    dtype = None
    for i, p in enumerate(ps):
        arrays = {f"{name}[{i}]": v[i] for name, v in lists.items() if v[i] is not None}
        dtype_i = c.floats(**{f"ps[{i}]": p}, **arrays)
        if dtype is not None and dtype_i != dtype:
            c.fail(f"ps[{i}] has dtype {dtype_i} but ps[0] has {dtype}: one call updates one dtype", TypeError)
        dtype = dtype_i
        for name, a in arrays.items():
            c.same_shape(name, a, p.shape)
    if len({id(p) for p in ps}) != len(ps):
        c.fail("a parameter appears twice")
    if not isinstance(hyper, c.xp.ndarray) or hyper.dtype != np.float64 or not hyper.flags.c_contiguous:
        c.fail(f"hyper must be a C-contiguous float64 {c.expected}", TypeError)
    c.same_shape("hyper", hyper, (len(ps), len(columns)))
    return [ps, *lists.values()]


@_declare
def sgd_update(c, ps, gs, bufs, hyper):
    """PyTorch's SGD on every tensor i at once, in place on ps[i] (and bufs[i]), with hyper[i] =
    SGD_HYPER: d = g + weight_decay * p; with a momentum buffer (bufs[i] not None),
    buf = d if first else momentum * buf + (1 - dampening) * d, and d = d + momentum * buf if
    nesterov else buf; p -= lr * d. bufs[i] is None for a tensor without momentum."""
    ps, gs, bufs = _tensor_lists(c, hyper, SGD_HYPER, ps, gs=gs, bufs=bufs)
    momentum = [p for p, buf in zip(ps, bufs) if buf is not None]
    return c.call(ps, gs, bufs, hyper, out=None, writes=tuple(ps) + tuple(b for b in bufs if b is not None),
                  flops=3 * sum(p.size for p in ps) + 4 * sum(p.size for p in momentum))


@_declare
def adam_update(c, ps, gs, ms, vs, hyper):
    """PyTorch's Adam (decoupled 0: g += weight_decay * p) or AdamW (decoupled 1:
    p *= 1 - lr * weight_decay) on every tensor i at once, in place on ps[i], ms[i], vs[i], with
    hyper[i] = ADAM_HYPER: m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
    p -= step_size * m / (sqrt(v) / bias_correction2_sqrt + eps)."""
    ps, gs, ms, vs = _tensor_lists(c, hyper, ADAM_HYPER, ps, gs=gs, ms=ms, vs=vs)
    if any(m is None for m in ms) or any(v is None for v in vs):
        c.fail("every tensor needs its m and v")
    return c.call(ps, gs, ms, vs, hyper, out=None, writes=(*ps, *ms, *vs), flops=12 * sum(p.size for p in ps))


# ---------------------------------------------------------------------------------------------
# the checked dispatch
# ---------------------------------------------------------------------------------------------

def _assert_outputs(op, out, declared, xp):
    """The kernel returned what its declaration says: arrays of the declared shapes and dtypes
    (a tuple or a list of them where declared so), or None for an in-place update."""
    if declared is None:
        assert out is None, f"{op} updates in place and must return None, returned {type(out).__name__}"
        return
    if isinstance(declared, Out):
        outs, declared = (out,), (declared,)
    else:
        assert isinstance(out, type(declared)) and len(out) == len(declared), (
            f"{op} returned {type(out).__name__} of {len(out) if isinstance(out, (tuple, list)) else 1} outputs; "
            f"its declaration: a {type(declared).__name__} of {len(declared)}")
        outs = out
    for i, (a, d) in enumerate(zip(outs, declared)):
        assert isinstance(a, xp.ndarray) and a.shape == d.shape and a.dtype == d.dtype, (
            f"{op} output {i}: {type(a).__name__} {getattr(a, 'shape', '')} {getattr(a, 'dtype', '')}, "
            f"declared {d.shape} {d.dtype}")


class Kernels:
    """The checked kernels of one backend: what minunet.backend.kernels_for returns.

    `Kernels(module, xp, device)` has an attribute per kernel of CONTRACT, with the contract's
    signature: it checks and normalises the call (the kernel's declaration above), runs
    module's function of that name on the normalised arguments, asserts the outputs, and
    counts the call where counting is on. `module` and its VERSIONS are reachable as
    attributes too."""

    def __init__(self, module, xp, device):
        self.module, self.xp, self.device = module, xp, device
        self.VERSIONS = module.VERSIONS
        for name in CONTRACT:
            setattr(self, name, self._checked(name))

    def _checked(self, name):
        declaration, launch = CONTRACT[name], getattr(self.module, name)
        xp, device, versions = self.xp, self.device, self.VERSIONS.get(name)

        def kernel(*args, **kwargs):
            call = declaration(Checker(name, xp, device, versions), *args, **kwargs)
            out = launch(*call.args)
            _assert_outputs(name, out, call.out, xp)
            counts = _counting()
            if counts is not None:
                counts.add(name, call, out)
            return out

        kernel.__name__ = kernel.__qualname__ = name
        kernel.__doc__ = declaration.__doc__
        kernel.__signature__ = signature(name)
        return kernel

    def __repr__(self):
        return f"<minunet kernels of {self.module.__name__}, checked>"


# ---------------------------------------------------------------------------------------------
# counting calls, FLOPs and bytes per kernel (minunet.debug, MINUNET_DEBUG)
# ---------------------------------------------------------------------------------------------

def _arrays(values):
    for v in values:
        if isinstance(v, (list, tuple)):
            yield from _arrays(v)
        elif hasattr(v, "nbytes") and hasattr(v, "shape"):
            yield v


class Counts:
    """Calls, FLOPs and bytes per kernel name, as `debug()` and MINUNET_DEBUG count them."""

    def __init__(self, verbose=False):
        self.verbose = verbose
        self.calls, self.flops, self.bytes = collections.Counter(), collections.Counter(), collections.Counter()

    def add(self, name, call, out):
        nbytes = sum(a.nbytes for a in _arrays(call.args)) + sum(a.nbytes for a in _arrays((out,) + call.writes))
        self.calls[name] += 1
        self.flops[name] += call.flops
        self.bytes[name] += nbytes
        if self.verbose:
            print(f"minunet kernel {name:34s} {call.flops / 1e6:12.3f} MFLOP {nbytes / 1e6:10.3f} MB", file=sys.stderr)

    def table(self):
        """One line per kernel (most FLOPs first) and a total."""
        lines = [f"{'kernel':34s} {'calls':>7s} {'GFLOP':>10s} {'MB':>10s}"]
        for name in sorted(self.calls, key=lambda n: (-self.flops[n], n)):
            lines.append(f"{name:34s} {self.calls[name]:7d} {self.flops[name] / 1e9:10.3f} {self.bytes[name] / 1e6:10.1f}")
        lines.append(f"{'total':34s} {sum(self.calls.values()):7d} {sum(self.flops.values()) / 1e9:10.3f} "
                     f"{sum(self.bytes.values()) / 1e6:10.1f}")
        return "\n".join(lines)

    def stop(self):
        """Stop counting into this object (debug() started it)."""
        global _debug
        if _debug is self:
            _debug = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


_debug = None       # the Counts that debug() started, or None
_env_counts = None  # the Counts MINUNET_DEBUG fills, made at the first call that sees it set


def debug(verbose=False):
    """Count every kernel call from now on (calls, FLOPs and bytes per kernel) into a fresh
    Counts, and return it; `verbose` also prints one line per call. Use it as a context manager,
    or call .stop():

    >>> with minunet.debug() as counts:
    ...     loss = F.cross_entropy(model(x), y); loss.backward()
    >>> print(counts.table())
    """
    global _debug
    _debug = Counts(verbose)
    return _debug


def _counting():
    """Where this call is counted: debug()'s Counts, MINUNET_DEBUG's, or nowhere (None)."""
    global _env_counts
    if _debug is not None:
        return _debug
    level = os.environ.get("MINUNET_DEBUG", "")
    if level in ("", "0"):
        return None
    if _env_counts is None:
        _env_counts = Counts(verbose=level not in ("1",))
        atexit.register(lambda: print("minunet kernels (MINUNET_DEBUG):\n" + _env_counts.table(), file=sys.stderr))
    return _env_counts
