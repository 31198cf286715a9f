"""minunet.cpu.runtime: what every CPU kernel shares: numba's thread pool, the launch, scratch memory.

Each kernel of minunet.cpu is a numba `@njit(parallel=True, cache=True)` loop (see `kernel`)
whose outer loop is a `prange`; every iteration owns what it writes (one (n, c) image plane,
one channel, one pixel, one element), so no two threads write the same place and no atomics
are needed. `cache=True` keeps the machine code in __pycache__: each (kernel, dtype) pair is
compiled once per machine.
"""
import functools
import math
import os
import threading

import numba
import numpy as np
from numba import prange

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


def kernel(fn=None, *, fastmath=False):
    """fn compiled as a numba parallel kernel (machine code cached on disk), launched one at a
    time; `@kernel(fastmath={...})` passes LLVM fast-math flags (see the v3 convolution)."""
    if fn is None:
        return functools.partial(kernel, fastmath=fastmath)
    compiled = numba.njit(parallel=True, cache=True, fastmath=fastmath)(fn)

    @functools.wraps(fn)
    def launch(*args):
        with _launch_lock:
            return compiled(*args)
    return launch



class _Scratch(threading.local):
    """Growing byte buffers per thread, for temporaries that never leave a kernel (im2col's
    columns, v3's padded planes): reusing them skips the page faults that a fresh array of that
    size costs on every call. A kernel that needs two at once takes them from two slots."""
    def __init__(self):
        self.bufs = {}


_scratch_space = _Scratch()


def scratch(shape, dtype, slot=0):
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    buf = _scratch_space.bufs.get(slot)
    if buf is None or buf.nbytes < nbytes:
        buf = _scratch_space.bufs[slot] = np.empty(nbytes, np.uint8)
    return buf[:nbytes].view(dtype).reshape(shape)


