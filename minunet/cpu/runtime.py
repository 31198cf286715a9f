"""minunet.cpu.runtime: what every CPU kernel shares: numba's thread pool, the launch, memory.

Each kernel of minunet.cpu is a numba `@njit(parallel=True, cache=True)` loop (see `kernel`)
whose outer loop is a `prange`; every iteration owns what it writes (one (n, c) image plane,
one channel, one pixel, one element), so no two threads write the same place and no atomics
are needed. `cache=True` keeps the machine code in __pycache__: each (kernel, dtype) pair is
compiled once per machine.
"""
import contextlib
import functools
import math
import mmap
import os
import threading
import weakref

import numba
import numpy as np
from numba import prange

# Threads. A training step on the CPU alternates two thread pools: numba's, which runs the
# kernels' prange loops, and OpenBLAS's (numpy's BLAS), which runs the GEMMs of the v2
# convolution. Each pool's idle workers spin before they sleep, and a spinning worker of one
# pool takes a core from the other's busy ones. minunet sets both up for its own use, at the
# first kernel launch and never at import, and changes nothing else in the process:
#
# - numba: `configure()` asks for OpenMP's pool (GNU libgomp) with a short spin. Idle OpenMP
#   workers spin (by default ~300,000 polls) before they sleep, which makes the next launch
#   cheap (3 us, against 80 us for numba's 'workqueue' pool, whose workers sleep at once: a
#   training step launches ~300 kernels); GOMP_SPINCOUNT=1000 keeps that and gives the cores
#   back within microseconds. libgomp reads GOMP_SPINCOUNT once, as it loads, so configure()
#   sets it only while it starts the pool, and only where the user set none; numba's
#   THREADING_LAYER_PRIORITY is likewise set while the pool starts and put back after. Measured
#   on 2 cores, the U-Net training step ran ~20% faster than on workqueue, and spinning 50,000
#   or 300,000 polls was slower again. numba picks its pool once per process: if the process
#   already ran a parallel numba function, or the user set NUMBA_THREADING_LAYER, that choice
#   stands. The process has one libgomp: a library that loads it later (PyTorch, whose bundled
#   copy has the same soname) shares this pool's settings, and one that loaded it first keeps
#   its own. Where OpenMP is missing numba falls back to workqueue, which aborts the process if
#   two threads enter it at once (a running kernel does not hold the GIL), hence the lock
#   around every launch.
# - OpenBLAS: its workers spin for about 2^28 cycles after each GEMM (tenths of a second), and
#   the only knob, OPENBLAS_THREAD_TIMEOUT, is read as the library loads, so it depends on
#   import order. minunet instead runs its own GEMMs with BLAS limited to one thread
#   (`one_blas_thread`, through threadpoolctl): OpenBLAS's workers then never wake for
#   minunet, and numba keeps every core. The limit holds only during minunet's GEMMs; numpy
#   elsewhere in the process keeps its threads (a GEMM in another Python thread at that very
#   moment runs on one thread too).
_launch_lock = threading.Lock()
_configured = False


@numba.njit(parallel=True, cache=True)
def _touch(x):
    for i in prange(x.size):
        x[i] = i


def configure(spin_count=1000):
    """Start numba's thread pool for minunet's kernels: OpenMP's, with `spin_count` polls of
    spinning before idle workers sleep (see above). The first kernel launch calls it; the
    `minunet` command calls it at start. Later calls, and calls after the process started
    numba's pool by other means, change nothing. Returns numba's threading layer."""
    global _configured
    with _launch_lock:
        if not _configured:
            _configured = True
            try:
                return numba.threading_layer()   # already started (by anyone): leave it
            except ValueError:
                pass
            saved_priority = numba.config.THREADING_LAYER_PRIORITY
            set_spin = "GOMP_SPINCOUNT" not in os.environ
            if numba.config.THREADING_LAYER == "default":   # the user chose none
                numba.config.THREADING_LAYER_PRIORITY = ["omp", "workqueue", "tbb"]
            if set_spin:
                os.environ["GOMP_SPINCOUNT"] = str(int(spin_count))
            try:
                _touch(np.zeros(numba.get_num_threads()))   # starts the pool, which reads both
            finally:
                numba.config.THREADING_LAYER_PRIORITY = saved_priority
                if set_spin:  # not for other OpenMP runtimes, nor for child processes
                    del os.environ["GOMP_SPINCOUNT"]
    return numba.threading_layer()


_blas_libraries = None  # threadpoolctl's controllers of the BLAS libraries loaded, found once


def _find_blas_libraries():
    """threadpoolctl's controllers of the BLAS libraries in the process. threadpoolctl is
    imported here, at the first GEMM, not with minunet: importing it sets KMP_DUPLICATE_LIB_OK
    in the environment (for Intel OpenMP, which it may load), so the environment is put back
    as it was once it has looked."""
    saved = os.environ.get("KMP_DUPLICATE_LIB_OK")
    try:
        import threadpoolctl
        return threadpoolctl.ThreadpoolController().select(user_api="blas").lib_controllers
    finally:
        if saved is None:
            os.environ.pop("KMP_DUPLICATE_LIB_OK", None)
        else:
            os.environ["KMP_DUPLICATE_LIB_OK"] = saved


@contextlib.contextmanager
def _one_blas_thread():
    global _blas_libraries
    if _blas_libraries is None:
        _blas_libraries = _find_blas_libraries()
    saved = [lib.num_threads for lib in _blas_libraries]
    for lib in _blas_libraries:
        lib.set_num_threads(1)
    try:
        yield
    finally:
        for lib, n in zip(_blas_libraries, saved):
            lib.set_num_threads(n)


def one_blas_thread(fn):
    """fn (a function that runs GEMMs through numpy) run with BLAS limited to one thread: see above."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        with _one_blas_thread():
            return fn(*args, **kwargs)
    return run


def kernel(fn=None, *, fastmath=False):
    """fn compiled as a numba parallel kernel (machine code cached on disk), launched one at a
    time; `@kernel(fastmath={...})` passes LLVM fast-math flags (see the v3 convolution)."""
    if fn is None:
        return functools.partial(kernel, fastmath=fastmath)
    compiled = numba.njit(parallel=True, cache=True, fastmath=fastmath)(fn)

    @functools.wraps(fn)
    def launch(*args):
        if not _configured:
            configure()
        with _launch_lock:
            return compiled(*args)
    return launch


# LLVM may contract a*b + c into one fused multiply-add: what the SIMD kernels (gemm.py,
# conv2d_winograd.py) are written for. Only contraction: no reassociation, so sums keep their order.
_FMA = {"contract"}


def fma_kernel(fn):
    """`kernel` with FMA contraction."""
    return kernel(fn, fastmath=_FMA)


def fma_helper(fn):
    """fn compiled as a serial numba function that the kernels call (cached, FMA contraction)."""
    return numba.njit(cache=True, fastmath=_FMA)(fn)


_SCRATCH_BYTES = 64 << 20  # a kernel's temporaries (im2col's columns, ...) for this many bytes of images at a time


def batches(N, sample_nbytes):
    """Slices of the batch whose temporaries (sample_nbytes per image) fit in _SCRATCH_BYTES, one
    image at least: the scratch buffer stays bounded however large the images or the batch."""
    step = max(1, _SCRATCH_BYTES // sample_nbytes)
    return [slice(n, min(n + step, N)) for n in range(0, N, step)]


# Scratch memory. Temporaries that never leave a kernel (im2col's columns, v3's padded planes,
# v4's per-thread tiles) live in growing buffers kept per Python thread and reused from call to
# call, which skips the page faults a fresh array of that size costs on every call. From 2 MB up
# they are mapped on their own and marked for transparent huge pages (madvise(MADV_HUGEPAGE),
# where Linux offers it: it changes nothing outside these mappings). v4's transforms store each
# tile's 36 points into 36 rows some kilobytes apart, a new 4 KB page per store: with 4 KB pages
# the TLB misses on nearly every one, with 2 MB pages a whole block of tiles is a few entries
# (measured on 2 cores: the forward of 16 -> 16 channels at 128x128, 20% faster).
_HUGE_PAGE = 2 << 20


def _buffer(nbytes):
    """A new np.uint8 buffer of nbytes; from _HUGE_PAGE up, on huge pages where the system has them."""
    if nbytes < _HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return np.empty(nbytes, np.uint8)
    size = nbytes + _HUGE_PAGE                          # room to start on a huge page's boundary
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        m.madvise(mmap.MADV_HUGEPAGE)
    except OSError:                                     # a kernel without transparent huge pages
        pass
    whole = np.frombuffer(m, np.uint8)                  # keeps the mapping alive
    start = -whole.ctypes.data % _HUGE_PAGE
    return whole[start:start + nbytes]


class _Scratch(threading.local):
    """The growing scratch buffers of one Python thread, by slot: a kernel that needs two at once
    takes them from two slots."""
    def __init__(self):
        self.bufs = {}


_scratch_space = _Scratch()


def scratch(shape, dtype, slot=0):
    """An array of shape and dtype over this thread's scratch buffer `slot` (see above): valid
    until the next call for that slot."""
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    buf = _scratch_space.bufs.get(slot)
    if buf is None or buf.nbytes < nbytes:
        buf = _scratch_space.bufs[slot] = _buffer(nbytes)
    return buf[:nbytes].view(dtype).reshape(shape)


def thread_scratch(n, dtype, slot=0):
    """scratch((threads, n), dtype, slot): one row of n elements for each of numba's threads, a
    kernel's thread taking row numba.get_thread_id(), each row starting on a cache line."""
    itemsize = np.dtype(dtype).itemsize
    n = -(-n * itemsize // 64) * 64 // itemsize
    return scratch((numba.get_num_threads(), n), dtype, slot)


# Outputs. A training step allocates the same large arrays in every step (each layer's outputs
# and gradients) and frees them as it ends. glibc's malloc gives such memory back to the system
# as soon as a free block at the top of its heap passes a threshold, so the next step takes it
# back page by page: about 3,000 page faults per step of the README's U-Net, a fifth of its
# time on 2 cores. `empty` and `zeros` instead keep each large buffer once its arrays are gone
# and hand it to the next array of the same size in bytes (the next step's twin): the kernels'
# outputs are still fresh arrays, never memory that a live array uses. How it knows: the array
# is a view of a 1-D array made over the buffer, which every view of it (reshape, slice,
# transpose) keeps alive, as NumPy collapses a view's base to it; when that array is collected,
# the buffer goes back to the pool. At most _POOL_BYTES wait there, the rest is freed.
_POOL_MIN_BYTES = 256 << 10  # smaller arrays come from malloc as usual
_POOL_BYTES = 1 << 30


class _Pool:
    """Freed buffers by size in bytes (see above)."""
    def __init__(self):
        self.free, self.nbytes, self.lock = {}, 0, threading.Lock()

    def take(self, nbytes):
        with self.lock:
            bufs = self.free.get(nbytes)
            if bufs:
                self.nbytes -= nbytes
                return bufs.pop()
        return _buffer(nbytes)

    def give(self, buf):
        with self.lock:
            if self.nbytes + buf.nbytes <= _POOL_BYTES:
                self.free.setdefault(buf.nbytes, []).append(buf)
                self.nbytes += buf.nbytes


_pool = _Pool()


def empty(shape, dtype):
    """np.empty(shape, dtype), from the pool of large buffers (see above)."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < _POOL_MIN_BYTES:
        return np.empty(shape, dtype)
    buf = _pool.take(nbytes)
    flat = np.frombuffer(memoryview(buf), dtype)
    weakref.finalize(flat, _pool.give, buf).atexit = False
    return flat.reshape(shape)


def zeros(shape, dtype):
    """np.zeros(shape, dtype), from the pool of large buffers."""
    a = empty(shape, dtype)
    a.fill(0)
    return a
