"""minunet.checks: the argument checks of the kernel modules, written once for both devices.

numba does not check bounds and a CUDA kernel reads whatever address it is given, so a kernel
handed an array of the wrong shape, dtype or layout fails far from its cause, or not at all.
Every public kernel of minunet.cpu and minunet.cuda therefore checks its arguments first and
raises an error that names the op, the argument and the shapes. The checks are the same on
both devices except for the array library, which each kernel module passes in (NumPy on the
CPU, CuPy on the GPU): this module imports neither CuPy nor the kernel modules.
"""
import numpy as np

FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def same_shape(op, name, a, shape):
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} has shape {tuple(a.shape)}, expected {tuple(shape)}")


def conv_out_hw(op, hw, khw, stride, padding):
    """A convolution's output size (Ho, Wo), or an error where it would be empty."""
    (H, W), (kh, kw), (sh, sw), (ph, pw) = hw, khw, stride, padding
    Ho, Wo = (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1
    if Ho <= 0 or Wo <= 0:
        raise ValueError(f"{op}: input {H}x{W} with kernel {kh}x{kw}, stride {stride} and "
                         f"padding {padding} gives an empty output ({Ho}x{Wo})")
    return Ho, Wo


def version(op, v, versions, default):
    """The version a kernel runs: `v`, or `default` for None, checked against `versions`."""
    chosen = default if v is None else v
    if chosen not in versions:
        raise ValueError(f"{op}: unknown version {v!r}; available: {versions}")
    return chosen


class ArrayChecks:
    """The checks for one device's arrays: `xp` is numpy or cupy, `device` names where they live."""

    def __init__(self, xp, device):
        self.xp = xp
        self.expected = f"a {xp.__name__}.ndarray on the {device}"

    def floats(self, op, *named, ndim=None):
        """Check (name, array) pairs: this device's arrays, C-contiguous, one float dtype (and
        `ndim` dims). Returns the dtype."""
        dtype = first = None
        for name, a in named:
            if not isinstance(a, self.xp.ndarray):
                raise TypeError(f"{op}: {name} must be {self.expected}, got {type(a).__name__}")
            if a.dtype not in FLOATS:
                raise TypeError(f"{op}: {name} has dtype {a.dtype}; expected float32 or float64")
            if dtype is None:
                dtype, first = a.dtype, name
            elif a.dtype != dtype:
                raise TypeError(f"{op}: {name} has dtype {a.dtype} but {first} has {dtype}")
            if not a.flags.c_contiguous:
                raise ValueError(f"{op}: {name} of shape {a.shape} must be C-contiguous")
            if ndim is not None and a.ndim != ndim:
                raise ValueError(f"{op}: {name} must have {ndim} dimensions, got shape {a.shape}")
        return dtype

    def int64(self, op, name, a, shape=None):
        """An index array (argmax, target): this device's, int64, C-contiguous (and of `shape`)."""
        if not isinstance(a, self.xp.ndarray) or a.dtype != np.int64:
            got = f"dtype {a.dtype}" if isinstance(a, self.xp.ndarray) else type(a).__name__
            raise TypeError(f"{op}: {name} must be a {self.xp.__name__} int64 array, got {got}")
        if not a.flags.c_contiguous:
            raise ValueError(f"{op}: {name} of shape {a.shape} must be C-contiguous")
        if shape is not None:
            same_shape(op, name, a, shape)

    def vector(self, op, name, a, n, dtype, default=None):
        """A per-channel vector (bias, gamma, class weight, ...) as a contiguous (n,) `dtype`
        array; for None, `default` in every place, or None where no default is given."""
        if a is None:
            return None if default is None else self.xp.full(n, default, dtype)
        if not isinstance(a, self.xp.ndarray):
            raise TypeError(f"{op}: {name} must be {self.expected} or None, got {type(a).__name__}")
        if a.shape != (n,):
            raise ValueError(f"{op}: {name} has shape {a.shape}, expected ({n},)")
        return self.xp.ascontiguousarray(a, dtype=dtype)
