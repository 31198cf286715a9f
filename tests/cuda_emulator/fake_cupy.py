"""fake_cupy: the part of CuPy that minunet uses, over host memory, for the CUDA emulator.

`cuda_emulator.install()` puts this module into sys.modules as `cupy` before minunet is
imported; minunet.backend then finds "CuPy with one device" and minunet.cuda runs unchanged:
the same launchers, argument checks, scalar packing, grids and split-K workspaces.

Device arrays
-------------
`ndarray` is a numpy.ndarray subclass living in host memory. Arithmetic, reductions and
indexing keep results on the "device" (a reduction gives a 0-d ndarray, as CuPy does), and
mixing a device array with a host numpy array in one operation raises TypeError, as CuPy
does. Arrays that `empty`, `zeros`, `asarray`, ... allocate are carved out of a larger
buffer with 256 untouchable bytes on each side, and `empty` fills them with NaN (integer
dtypes with 0xa5 bytes), so an element a kernel never writes fails any comparison.
The functions of the module that are not defined here forward to NumPy and wrap the
results (`cupy.exp`, `cupy.where`, `cupy.add.at`, `cupy.random.random_sample`, ...).

Kernels
-------
`RawModule(code, options, name_expressions)` (raw_module.py) compiles cuda_model.h + code +
one launcher per name expression with g++ (-fsanitize=thread instrumentation, hooks of our
own, see cuda_model.h) into a shared library, cached under MINUNET_EMU_CACHE (default
~/.cache/minunet-emulator) by the sha256 of everything that goes into it.
`get_function(name)` returns a Kernel; `kernel(grid, block, args)` checks each argument
against the kernel's C++ parameter types (a device array for a pointer, of the pointee's
dtype; a NumPy scalar of exactly the parameter's type and size, as CuPy packs it; Python
int/float/bool count as int64/float64/bool), registers each array's byte range for the
bounds checks and runs the grid. Errors are raised at the launch, as `EmulatorError`.

Streams and graphs
------------------
cupy.cuda.Stream, MemoryPool, using_allocator and stream capture come from capture.py: while
the current stream captures, launches and array operations are recorded for graph.launch()
instead of run, and waits for the device, host-to-device copies and fresh device memory are
errors. Every array operation goes through `_device_op` for that.

Settings (`settings`, read from the environment at import):
  MINUNET_EMU_BLOCK_ORDER  forward | reverse | shuffle (default; a new order every launch)
  MINUNET_EMU_SMS          the MultiProcessorCount the device reports (default 1: launchers
                           that cap grids by SM count then run their grid-stride loops)
"""
import ctypes
import os
import pathlib
import sys
import types
import weakref

import numpy as np

from cuda_emulator import EmulatorError, capture  # noqa: F401  (EmulatorError: cupy.EmulatorError, for the tests)

__version__ = "0.0-emulator"
HERE = pathlib.Path(__file__).resolve().parent
HEADER = HERE / "cuda_model.h"
LINKER_SCRIPT = HERE / "emulator.ld"
REDZONE = 256
ORDERS = {"forward": 0, "reverse": 1, "shuffle": 2}


class _Settings:
    def __init__(self):
        self.block_order = os.environ.get("MINUNET_EMU_BLOCK_ORDER", "shuffle")
        self.sms = int(os.environ.get("MINUNET_EMU_SMS", "1"))
        self.launches = 0
        self.launched = set()  # the name expressions of every kernel launched
        if self.block_order not in ORDERS:
            raise ValueError(f"MINUNET_EMU_BLOCK_ORDER={self.block_order!r}: expected one of {sorted(ORDERS)}")


settings = _Settings()


# ------------------------------------------------------------------------------------------
# device arrays
# ------------------------------------------------------------------------------------------

def _is_host(a):
    return isinstance(a, np.ndarray) and not isinstance(a, ndarray) and a.ndim > 0


def _reject_host(objs, what):
    for o in objs:
        if _is_host(o) or (isinstance(o, (list, tuple)) and any(_is_host(i) for i in o)):
            raise TypeError(f"cupy (emulated): {what} mixes a host numpy.ndarray with device arrays; "
                            f"move it with cupy.asarray or .get() first")


def _wrap(r):
    if isinstance(r, ndarray):
        return r
    if isinstance(r, np.ndarray):
        return r.view(ndarray)
    if isinstance(r, np.generic):
        return np.asarray(r).view(ndarray)
    if isinstance(r, tuple):
        return tuple(_wrap(i) for i in r)
    if isinstance(r, list):
        return [_wrap(i) for i in r]
    return r


def _host_view(a):
    return a.view(np.ndarray) if isinstance(a, ndarray) else a


def _map_arrays(obj, f):
    """obj with f applied to every device array in it (through tuples, lists and dicts)."""
    if isinstance(obj, ndarray):
        return f(obj)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map_arrays(i, f) for i in obj)
    if isinstance(obj, dict):
        return {k: _map_arrays(v, f) for k, v in obj.items()}
    return obj


def _leaves(obj):
    if isinstance(obj, (tuple, list)):
        return [leaf for i in obj for leaf in _leaves(i)]
    return [obj]


# the NumPy functions that write into an argument instead of returning a new array
_IN_PLACE = {np.copyto, np.put, np.place, np.putmask, np.fill_diagonal, np.put_along_axis}


def _device_op(func, args, kwargs=None, in_place=False):
    """Run `func` (NumPy) on the host views of the device arrays in args and kwargs, as CuPy would
    run a kernel; return its results as device arrays (None for an in-place operation). With a
    memory pool in use, new results move into the pool's memory; while the current stream
    captures, the operation is recorded instead (see capture.py) and only a new result's shape is
    computed now."""
    kwargs = kwargs or {}
    rec = capture.recording()
    if rec is None and not (capture.pool_active() and not in_place):
        r = func(*_map_arrays(args, _host_view), **_map_arrays(kwargs, _host_view))
        return None if in_place else _wrap(r)
    if rec is not None:
        if any(_is_host(leaf) for leaf in _leaves(list(args) + list(kwargs.values()))):
            capture.check_host_copy(f"{getattr(func, '__name__', func)} with a numpy.ndarray argument")
        raw_args, raw_kwargs = (_map_arrays(a, lambda d: capture.raw(d, rec)) for a in (args, kwargs))
        if in_place:
            rec.record(lambda: func(*raw_args, **raw_kwargs))
            return None
    inputs = [leaf.view(np.ndarray) for leaf in _leaves(list(args) + list(kwargs.values())) if isinstance(leaf, ndarray)]
    with np.errstate(all="ignore"):  # in a capture: on whatever the arrays hold now
        r = func(*_map_arrays(args, _host_view), **_map_arrays(kwargs, _host_view))
    fresh = []  # (position among the result's leaves, device array) of each result in new memory

    def place(leaf, i):
        if isinstance(leaf, np.generic):
            leaf = np.asarray(leaf)
        if not isinstance(leaf, np.ndarray):
            return leaf
        if any(capture.same_memory(leaf, x) for x in inputs):
            return leaf.view(ndarray)  # a view of an argument: no new memory, nothing to replay
        a = _alloc(leaf.shape, leaf.dtype, leaf, record=False)
        fresh.append((i, a))
        return a

    leaves = _leaves(r)
    placed = [place(leaf, i) for i, leaf in enumerate(leaves)]
    if rec is not None and fresh:
        outs = [(i, capture.raw(a, rec)) for i, a in fresh]

        def replay():
            results = _leaves(func(*raw_args, **raw_kwargs))
            for i, dst in outs:
                dst[...] = results[i]
        rec.record(replay)
    if isinstance(r, (tuple, list)):
        it = iter(placed)
        return _map_leaves(r, lambda _: next(it))
    return placed[0]


def _map_leaves(obj, f):
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map_leaves(i, f) for i in obj)
    return f(obj)


class ndarray(np.ndarray):
    """A device array of the emulator: host memory, CuPy's behaviour where minunet relies on it.
    Every operation goes through _device_op (so a stream capture records it); every read of its
    values on the host is a wait for the device (an error in a capture)."""

    def __array_finalize__(self, obj):
        if self.base is None and capture.recording() is not None:
            capture._fail("an operation the emulator does not model in a stream capture made a new device array "
                          "(a NumPy method without a hook, e.g. take or sort); model it in fake_cupy.ndarray")

    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kwargs):
        _reject_host(inputs, f"ufunc {ufunc.__name__}")
        if out is not None:
            _reject_host(out, f"ufunc {ufunc.__name__}")
            kwargs["out"] = tuple(out)
        r = _device_op(getattr(ufunc, method), inputs, kwargs, in_place=out is not None or method == "at")
        if out is not None:
            return out[0] if len(out) == 1 else out
        return r

    def __array_function__(self, func, types_, args, kwargs):
        _reject_host(list(args) + list(kwargs.values()), func.__name__)
        return _device_op(func, args, kwargs, in_place=func in _IN_PLACE)

    def __getitem__(self, key):
        return _device_op(np.ndarray.__getitem__, (self, key))

    def __setitem__(self, key, value):
        _device_op(np.ndarray.__setitem__, (self, key, value), in_place=True)

    def copy(self, order="C"):
        return _device_op(np.ndarray.copy, (self, order))

    def astype(self, dtype, order="K", casting="unsafe", subok=True, copy=True):
        if not copy and np.dtype(dtype) == self.dtype:
            return self
        return _device_op(np.ndarray.astype, (self, dtype), dict(order=order, casting=casting))

    def fill(self, value):
        _device_op(np.ndarray.fill, (self, value), in_place=True)

    def reshape(self, *shape, order="C"):
        return _device_op(np.reshape, (self, shape[0] if len(shape) == 1 else shape), dict(order=order))

    def ravel(self, order="C"):
        return _device_op(np.ravel, (self,), dict(order=order))

    def flatten(self, order="C"):
        return _device_op(np.ndarray.flatten, (self, order))

    def argmax(self, axis=None, out=None, keepdims=False):
        return _device_op(np.argmax, (self, axis), dict(keepdims=keepdims))

    def argmin(self, axis=None, out=None, keepdims=False):
        return _device_op(np.argmin, (self, axis), dict(keepdims=keepdims))

    # reading values on the host waits for the device
    def get(self, stream=None, order="C", out=None):
        capture.check_sync("a device-to-host copy (get)")
        return np.array(self.view(np.ndarray), copy=True, order=order)

    def item(self, *args):
        capture.check_sync("a device-to-host copy (item)")
        return self.view(np.ndarray).item(*args)

    def tolist(self):
        capture.check_sync("a device-to-host copy (tolist)")
        return self.view(np.ndarray).tolist()

    def __float__(self):
        capture.check_sync("a device-to-host copy (float)")
        return float(self.view(np.ndarray))

    def __int__(self):
        capture.check_sync("a device-to-host copy (int)")
        return int(self.view(np.ndarray))

    def __index__(self):
        capture.check_sync("a device-to-host copy (an index)")
        return self.view(np.ndarray).__index__()

    def __bool__(self):
        capture.check_sync("a device-to-host copy (bool)")
        return bool(self.view(np.ndarray))

    def set(self, arr, stream=None):
        """Copy the host array `arr` (of this shape and dtype) into this device array."""
        capture.check_host_copy("ndarray.set")
        if type(arr) is not np.ndarray or arr.shape != self.shape or arr.dtype != self.dtype:
            raise ValueError(f"cupy (emulated): set() takes a numpy.ndarray of shape {self.shape} and dtype "
                             f"{self.dtype}, got {type(arr).__name__} {getattr(arr, 'shape', '')} "
                             f"{getattr(arr, 'dtype', '')}")
        self.view(np.ndarray)[...] = arr

    @property
    def data(self):
        """The address of the first element (CuPy's MemoryPointer); taking it lets a kernel reach
        these bytes through a table in device memory (table_pointer, cuda_model.h)."""
        return _export(self)

    @property
    def device(self):
        return cuda.Device(0)

    def __reduce__(self):  # pickling a device array gives a host array, like CuPy's .get()
        return self.get().__reduce__()


class MemoryPointer:
    """CuPy's cupy.cuda.MemoryPointer, as far as minunet uses it: `ptr`, an address."""

    def __init__(self, ptr):
        self.ptr = ptr


_exported = {}  # (address, bytes) of every live array whose address was taken -> its finalizer


def _export(a):
    """a.data: remember a's bytes, while the memory under them lives, as where table_pointer may point."""
    ptr = a.__array_interface__["data"][0]
    key = (ptr, a.nbytes)
    if key not in _exported:
        owner = a
        while isinstance(owner.base, np.ndarray):
            owner = owner.base
        _exported[key] = weakref.finalize(owner, _exported.pop, key, None)
    return MemoryPointer(ptr)


def _exported_table():
    """The exported arrays as (address, bytes) pairs sorted by address, for a launch."""
    pairs = sorted(_exported)
    return (ctypes.c_ulonglong * max(1, 2 * len(pairs)))(*(v for pair in pairs for v in pair)), len(pairs)


def _alloc(shape, dtype, fill=None, record=True):
    """A fresh device array with REDZONE guard bytes on each side (never handed to a kernel), from
    the memory pool in use if any (see capture.py). `fill`: a value or array to fill it with (a
    fill kernel, which a capture records when `record`), else NaN (0xa5 bytes for integers)."""
    dtype = np.dtype(dtype)
    shape = (int(shape),) if np.isscalar(shape) else tuple(int(s) for s in shape)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    buf = capture.device_bytes(nbytes + 2 * REDZONE + 16)
    start = REDZONE + (-(buf.ctypes.data + REDZONE) % max(dtype.alignment, 16))
    a = buf[start:start + nbytes].view(dtype).reshape(shape).view(ndarray)
    if fill is None:
        if dtype.kind in "fc":
            a.view(np.ndarray).fill(np.nan)
        else:
            a.view(np.ndarray).view(np.uint8).fill(0xA5)
    else:
        a.view(np.ndarray)[...] = fill
        rec = capture.recording()
        if record and rec is not None:
            dst = capture.raw(a, rec)
            rec.record(lambda: dst.fill(fill))
    return a


def empty(shape, dtype=float, order="C"):
    return _alloc(shape, dtype)


def zeros(shape, dtype=float, order="C"):
    return _alloc(shape, dtype, 0)


def ones(shape, dtype=float, order="C"):
    return _alloc(shape, dtype, 1)


def full(shape, fill_value, dtype=None, order="C"):
    return _alloc(shape, dtype if dtype is not None else np.asarray(fill_value).dtype, fill_value)


def empty_like(a, dtype=None, order="K", subok=None, shape=None):
    return empty(a.shape if shape is None else shape, a.dtype if dtype is None else dtype)


def zeros_like(a, dtype=None, order="K", subok=None, shape=None):
    return zeros(a.shape if shape is None else shape, a.dtype if dtype is None else dtype)


def ones_like(a, dtype=None, order="K", subok=None, shape=None):
    return ones(a.shape if shape is None else shape, a.dtype if dtype is None else dtype)


def full_like(a, fill_value, dtype=None, order="K", subok=None, shape=None):
    return full(a.shape if shape is None else shape, fill_value, a.dtype if dtype is None else dtype)


def array(obj, dtype=None, copy=True, order="K", subok=False, ndmin=0):
    if isinstance(obj, ndarray):
        if (not copy and (dtype is None or np.dtype(dtype) == obj.dtype) and obj.flags.c_contiguous
                and ndmin <= obj.ndim):
            return obj
        return _device_op(np.array, (obj,), dict(dtype=dtype, copy=True, order="C", ndmin=ndmin))  # device to device
    capture.check_host_copy("cupy.array / cupy.asarray of host data")
    host = np.array(obj, dtype=dtype, copy=True, order="C", ndmin=ndmin)
    return _alloc(host.shape, host.dtype, host, record=False)


def asarray(a, dtype=None, order=None):
    if isinstance(a, ndarray) and (dtype is None or np.dtype(dtype) == a.dtype):
        return a
    return array(a, dtype=dtype)


def ascontiguousarray(a, dtype=None):
    if isinstance(a, ndarray) and a.flags.c_contiguous and (dtype is None or np.dtype(dtype) == a.dtype):
        return a
    return array(a, dtype=dtype)


def asnumpy(a, stream=None, order="C", out=None):
    return a.get() if isinstance(a, ndarray) else np.asarray(a)  # get() is a wait for the device


def get_array_module(*args):
    return sys.modules[__name__] if any(isinstance(a, ndarray) for a in args) else np


def _forward(name, target):
    """A NumPy function as a cupy one: host arrays rejected, results device arrays (_device_op)."""
    def f(*args, **kwargs):
        _reject_host(list(args) + list(kwargs.values()), name)
        if name.startswith("random.") and capture.recording() is not None:
            capture._fail(f"cupy.{name} during a stream capture: random numbers in a graph are not modelled")
        return _device_op(target, args, kwargs, in_place=target in _IN_PLACE)
    f.__name__ = name
    return f


def _forwarding_getattr(namespace, prefix):
    def getattr_(name):
        if name.startswith("__"):
            raise AttributeError(name)
        obj = getattr(namespace, name)  # AttributeError for what NumPy lacks too
        if isinstance(obj, (np.ufunc, type)) or not callable(obj):
            return obj  # ufuncs dispatch to ndarray.__array_ufunc__; dtypes and constants as they are
        return _forward(prefix + name, obj)
    return getattr_


__getattr__ = _forwarding_getattr(np, "")
random = types.ModuleType("cupy.random")
random.__getattr__ = _forwarding_getattr(np.random, "random.")


# ------------------------------------------------------------------------------------------
# cupy.cuda: one emulated device
# ------------------------------------------------------------------------------------------

cuda = types.ModuleType("cupy.cuda")
runtime = types.ModuleType("cupy.cuda.runtime")
compiler = types.ModuleType("cupy.cuda.compiler")
cuda.runtime, cuda.compiler = runtime, compiler


class CompileException(Exception):
    pass


compiler.CompileException = CompileException


class Device:
    def __init__(self, device=None):
        self.id = 0 if device is None else int(device)
        if self.id != 0:
            raise ValueError(f"cupy (emulated): there is one device, 0; got {device!r}")

    @property
    def attributes(self):
        return {"MultiProcessorCount": settings.sms, "MaxThreadsPerBlock": 1024, "WarpSize": 32,
                "MaxSharedMemoryPerBlock": 49152, "ComputeCapabilityMajor": 9, "ComputeCapabilityMinor": 0}

    compute_capability = "90"

    def synchronize(self):
        capture.check_sync("Device.synchronize()")

    def use(self):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


cuda.Device, cuda.Event, cuda.get_elapsed_time = Device, capture.Event, capture.get_elapsed_time
cuda.MemoryPointer = MemoryPointer
# streams, graphs and memory pools (capture.py); without a pool every array is its own allocation
cuda.Stream, cuda.get_current_stream, cuda.MemoryPool = capture.Stream, capture.current_stream, capture.MemoryPool
cuda.set_allocator, cuda.using_allocator = capture.set_allocator, capture.using_allocator
cuda.CompileException = CompileException
runtime.getDeviceCount = lambda: 1
runtime.runtimeGetVersion = lambda: 0
runtime.driverGetVersion = lambda: 0
runtime.getDeviceProperties = lambda device_id=0: {
    "name": b"CUDA emulator (CPU)", "major": 9, "minor": 0, "multiProcessorCount": settings.sms,
    "totalGlobalMem": 0, "clockRate": 0, "memoryClockRate": 0, "memoryBusWidth": 0}

from cuda_emulator.raw_module import RawModule  # noqa: E402,F401  (cupy.RawModule; it reads the names above)
