"""minunet.backend: where arrays live, and which kernels run on them.

A Tensor holds either a numpy.ndarray (device 'cpu') or a cupy.ndarray (device 'cuda').
Everything above this module is written once for both: it asks

    xp = array_module(x)   # numpy or cupy, for cheap elementwise glue
    k = kernels_for(x)     # the checked kernels of minunet.cpu or minunet.cuda, for the heavy ops

and never branches on the device itself. `kernels_for` returns a minunet.contract.Kernels: the
backend's kernels behind the contract's checks (minunet/contract.py declares every kernel,
its signature, its checks and its outputs). This is the only module that imports cupy, and it
does so guardedly: without CuPy, or with CuPy but no GPU, minunet runs on the CPU and asking
for 'cuda' raises an error that says which of the two is missing.
"""
import contextlib

import numpy as np

from minunet import contract

try:  # the only import of cupy in minunet
    import cupy as _cupy
except Exception:  # ImportError, or a broken CUDA install raising at import time
    _cupy = None

DEVICES = ("cpu", "cuda")

_cuda_status = None  # (usable: bool, reason: str), probed once


def cuda_status():
    """(usable, reason): whether CuPy imports AND a CUDA device is present, and if not, why."""
    global _cuda_status
    if _cuda_status is None:
        if _cupy is None:
            _cuda_status = (False, "CuPy is not installed (pip install 'minunet[cuda12]' or 'minunet[cuda13]')")
        else:
            try:
                n = _cupy.cuda.runtime.getDeviceCount()
                _cuda_status = (True, "") if n > 0 else (False, "CuPy is installed but no CUDA device is present")
            except Exception as e:  # no driver, no device, broken runtime: cupy raises
                _cuda_status = (False, f"CuPy is installed but no usable CUDA device was found ({type(e).__name__}: {e})")
    return _cuda_status


def cuda_available():
    return cuda_status()[0]


def normalize_device(device):
    """'cpu' | 'cuda' | 'cuda:0' | 'auto' -> 'cpu' or 'cuda'; 'cuda' only if usable."""
    d = str(device).lower()
    if d == "auto":
        return "cuda" if cuda_available() else "cpu"
    if d.startswith("cuda"):
        if d not in ("cuda", "cuda:0"):
            raise ValueError(f"device {device!r}: minunet uses one GPU, 'cuda' (or 'cuda:0')")
        usable, reason = cuda_status()
        if not usable:
            raise RuntimeError(f"device 'cuda' was asked for, but {reason}")
        return "cuda"
    if d != "cpu":
        raise ValueError(f"unknown device {device!r}; expected 'cpu', 'cuda' or 'auto'")
    return "cpu"


def is_cuda_array(a):
    return _cupy is not None and isinstance(a, _cupy.ndarray)


def device_of(a):
    return "cuda" if is_cuda_array(a) else "cpu"


def array_module(a):
    """numpy or cupy, whichever owns `a`."""
    return _cupy if is_cuda_array(a) else np


def xp_for(device):
    return _cupy if normalize_device(device) == "cuda" else np


def to_device(a, device):
    """Copy array `a` to `device` (no copy when it is already there)."""
    device = normalize_device(device)
    if device == "cuda":
        return _cupy.asarray(a)
    return _cupy.asnumpy(a) if is_cuda_array(a) else np.asarray(a)


def to_numpy(a):
    return _cupy.asnumpy(a) if is_cuda_array(a) else np.asarray(a)


def capturing(a):
    """Whether the GPU work on arrays like `a` is being captured into a CUDA graph now (CuPy's
    current stream is capturing, minunet/cuda_graph.py): then nothing may wait for the device."""
    return is_cuda_array(a) and _cupy.cuda.get_current_stream().is_capturing()


def copy_from_host(dst, src):
    """Write the host array `src` into the existing array `dst` (same shape and dtype) in place,
    allocating nothing: on the GPU a host-to-device copy ordered on the current stream."""
    if is_cuda_array(dst):
        dst.set(np.ascontiguousarray(src, dtype=dst.dtype))
    else:
        dst[...] = src


_kernels = {}  # device -> its checked kernels, made on first use


def kernels_for(a):
    """The checked kernels (a minunet.contract.Kernels over minunet.cpu or minunet.cuda) for
    arrays like `a`."""
    device = device_of(a)
    kernels = _kernels.get(device)
    if kernels is None:
        if device == "cuda":
            from minunet import cuda as module
        else:
            from minunet import cpu as module
        kernels = _kernels[device] = contract.Kernels(module, array_module(a), {"cpu": "CPU", "cuda": "GPU"}[device])
    return kernels


PRECISIONS = ("fp32", "tf32")


@contextlib.contextmanager
def conv_precision(precision):
    """Within the block, convolutions called without a version run at `precision` on the GPU:
    'fp32' (each kernel module's DEFAULT_VERSION) or 'tf32' (the CUDA module's TF32 tensor-core
    version, cuda.TF32_VERSION: float32 inputs rounded to 10 mantissa bits, about 1e-3 relative
    error; float64 arrays keep full precision). The CPU has no TF32, so its kernels are
    unaffected, as PyTorch's allow_tf32 leaves the CPU alone."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == "fp32" or not cuda_available():
        yield
        return
    from minunet import cuda
    saved = dict(cuda.DEFAULT_VERSION)
    cuda.DEFAULT_VERSION.update({op: cuda.TF32_VERSION for op in saved})
    try:
        yield
    finally:
        cuda.DEFAULT_VERSION.update(saved)
