"""capture: CUDA streams, stream capture into graphs, and memory pools, for the CUDA emulator.

What CUDA does
--------------
Work issued to a stream runs in order on the device. Between `stream.begin_capture()` and
`stream.end_capture()` nothing issued to that stream runs: each kernel launch and copy is
recorded into a graph instead, with the arguments it was issued with (the addresses of its
arrays, its scalars), and `graph.launch()` runs the recorded work again, as often as one
likes, with one launch's overhead. So a graph replays exactly the addresses it captured:
new inputs must be copied into the captured buffers, and memory the capture used must stay
where it is. Inside a capture, nothing may wait for the device (there is nothing to wait
for: the work has not run), so a device-to-host copy, a synchronize or reading a value of
the device is an error, and so is anything that needs the device's memory right now: a
fresh device allocation (cudaMalloc) and a host-to-device copy from ordinary host memory.
CuPy serves allocations from a memory pool that keeps freed blocks; a pool used only by the
captured work ("private") hands the capture the blocks its warm-up left free, so a capture
that follows one eager run of the same work allocates nothing from the device, and its
blocks, freed by Python as the capture goes on, are reused by later steps of the same
capture in stream order, as on a GPU.

What this models
----------------
Everything executes on the host at once, so streams order nothing here; what matters is
whether the current stream is capturing:
  - `with stream:` makes a Stream current; `begin_capture` on it starts a Capture (on the
    legacy null stream it is an error, as in CUDA); until `end_capture` every operation
    issued (kernel launches, and the NumPy work fake_cupy does in place of CuPy's kernels)
    is recorded, NOT executed; `end_capture` returns a Graph whose `launch` executes the
    recorded operations in order. Operations that make new arrays are executed at capture
    time too, on whatever the arrays hold, only to learn their shapes: the memory they
    write is fresh, so nothing the graph reads changes.
  - A recorded operation holds the ADDRESSES of its arrays (a plain NumPy view of the pool's
    block, see `raw`), not the arrays: as on a GPU, Python may free an array during the
    capture, its block goes back to the pool, a later allocation of the capture reuses it,
    and the replay writes and reads it in the recorded order.
  - An allocation under `using_allocator(pool.malloc)` takes a free block of the rounded size
    from the pool, else new memory; during a capture, new memory (a cudaMalloc) is an
    ERROR, and so is any allocation without a pool. Blocks return to their pool when the
    last array on them dies.
  - A wait for the device while any stream captures (`get`, `item`, `float(a)`, `bool(a)`,
    `synchronize`, ...) is an ERROR; so are host-to-device copies (`set`, `cupy.asarray`
    of a NumPy array) and random numbers during a capture.
Not modelled: several streams working concurrently, events inside a capture, graphs
launched inside a capture, and CUDA's relaxed rule that lets other threads allocate.
"""
import contextlib
import ctypes
import time
import weakref

import numpy as np

from cuda_emulator import EmulatorError

POOL_ROUND = 512  # CuPy's pool rounds every allocation up to a multiple of this

_current = []   # the streams made current by `with stream:`, innermost last
_captures = {}  # stream -> its Capture while it captures
_allocator = None  # what using_allocator / set_allocator installed: a MemoryPool's malloc, or None
_blocks = {}    # id(owner object of a pool block) -> (block, pool), while the owner lives


def _fail(message):
    raise EmulatorError(f"CUDA emulator: {message}")


class Capture:
    """The operations recorded so far by one stream capture, and the pools whose memory they touch."""

    def __init__(self):
        self.ops, self.pools, self.kept = [], set(), []

    def record(self, op, keep=()):
        """Append `op` (a callable); `keep`: objects the replay needs alive (non-pool arrays)."""
        self.ops.append(op)
        self.kept.extend(keep)


class Stream:
    """cupy.cuda.Stream: made current by `with`; captures between begin_capture and end_capture."""

    def __init__(self, null=False, non_blocking=False, ptds=False):
        self.is_null = bool(null)

    def __enter__(self):
        _current.append(self)
        return self

    def __exit__(self, *exc):
        _current.pop()
        return False

    def use(self):
        _current[:] = [self]
        return self

    def synchronize(self):
        check_sync("Stream.synchronize()")

    def record(self, event=None):
        event = event or Event()
        event.record(self)
        return event

    def wait_event(self, event):
        pass  # everything has run already

    def begin_capture(self, mode=None):
        if self.is_null:
            _fail("begin_capture on the legacy null stream: CUDA captures only other streams")
        if self in _captures:
            _fail("begin_capture on a stream that is already capturing")
        _captures[self] = Capture()

    def end_capture(self):
        capture = _captures.pop(self, None)
        if capture is None:
            _fail("end_capture on a stream that is not capturing")
        return Graph(capture)

    def is_capturing(self):
        return self in _captures


Stream.null = Stream(null=True)


class Event:
    """cupy.cuda.Event: record() notes the host time (the work before it has run already)."""

    def __init__(self, *args, **kwargs):
        self.t = None

    def record(self, stream=None):
        if _captures:
            _fail("Event.record during a stream capture is not modelled")
        self.t = time.perf_counter()

    def synchronize(self):
        check_sync("Event.synchronize()")


def get_elapsed_time(start, end):
    return (end.t - start.t) * 1e3


def current_stream():
    return _current[-1] if _current else Stream.null


class Graph:
    """cupy.cuda.graph.Graph: launch() executes the captured operations in order."""

    def __init__(self, capture):
        self._capture = capture  # its ops, and the pools and arrays they need alive

    def launch(self, stream=None):
        if _captures:
            _fail("graph.launch() during a stream capture (a graph inside a graph) is not modelled")
        for op in self._capture.ops:
            op()

    def upload(self, stream=None):
        pass


def recording():
    """The Capture of the current stream, or None when it is not capturing."""
    return _captures.get(current_stream())


def check_sync(what):
    """A wait for the device, which no capture allows."""
    if _captures:
        _fail(f"{what} during a stream capture: it waits for the device, and the captured work has not run "
              f"(cudaErrorStreamCaptureUnsupported)")


def check_host_copy(what):
    """A host-to-device copy from ordinary (pageable) host memory, which a capture cannot record."""
    if recording() is not None:
        _fail(f"{what} during a stream capture: a host-to-device copy; copy into the captured buffers before "
              f"the capture or the replay")


class MemoryPool:
    """cupy.cuda.MemoryPool: keeps freed blocks by size (rounded up to POOL_ROUND bytes) and hands
    them out again; new memory only when it holds no free block of the size, never in a capture."""

    def __init__(self, allocator=None):
        self._free = {}  # size -> [block]

    def malloc(self, size):
        """What using_allocator installs: allocations in fake_cupy go through device_bytes."""
        raise NotImplementedError("the emulator's MemoryPool serves fake_cupy's allocations only")

    def free_bytes(self):
        return sum(size * len(blocks) for size, blocks in self._free.items())

    def _take(self, nbytes):
        size = -(-max(nbytes, 1) // POOL_ROUND) * POOL_ROUND
        free = self._free.get(size)
        if free:
            block = free.pop()
        elif recording() is not None:
            _fail(f"a device allocation of {size} bytes (cudaMalloc) during a stream capture: the memory pool holds "
                  f"no free block of that size; run the work once before capturing it, with the same pool")
        else:
            block = np.empty(size, np.uint8)
        owner = (ctypes.c_uint8 * size).from_buffer(block)  # every array on the block keeps it alive
        _blocks[id(owner)] = (block, self)
        weakref.finalize(owner, self._give_back, id(owner), size, block)
        return np.frombuffer(owner, np.uint8)

    def _give_back(self, owner_id, size, block):
        _blocks.pop(owner_id, None)
        self._free.setdefault(size, []).append(block)


def set_allocator(allocator=None):
    global _allocator
    _allocator = allocator


@contextlib.contextmanager
def using_allocator(allocator=None):
    global _allocator
    previous, _allocator = _allocator, allocator
    try:
        yield
    finally:
        _allocator = previous


def _pool():
    pool = getattr(_allocator, "__self__", None)
    return pool if isinstance(pool, MemoryPool) else None


def pool_active():
    """Whether allocations come from a MemoryPool now (so fake_cupy puts every new array there)."""
    return _pool() is not None


def device_bytes(nbytes):
    """A uint8 buffer of at least nbytes for new device arrays: a block of the current pool, or new
    memory (an error during a capture)."""
    pool = _pool()
    if pool is not None:
        return pool._take(nbytes)
    if recording() is not None:
        _fail(f"a device allocation of {nbytes} bytes during a stream capture, with no memory pool in use: "
              f"allocate under cupy.cuda.using_allocator(pool.malloc) and run the work once before capturing it")
    return np.empty(nbytes, np.uint8)


def _owner(a):
    while isinstance(a, np.ndarray) and a.base is not None:
        a = a.base
    return a


def raw(a, capture):
    """What a recorded operation holds for device array `a`: a plain NumPy view of its bytes. For an
    array on a pool block the view hangs on the block itself, not on the array, so the block still
    returns to its pool when Python frees the array; the capture keeps the pool alive."""
    owner = _owner(a)
    entry = _blocks.get(id(owner))
    if entry is None:  # memory outside the pools: the replay keeps the array alive
        capture.kept.append(a)
        return a.view(np.ndarray)
    block, pool = entry
    capture.pools.add(pool)
    offset = a.__array_interface__["data"][0] - block.__array_interface__["data"][0]
    return np.ndarray(a.shape, a.dtype, buffer=block, offset=offset, strides=a.strides)


def same_memory(a, b):
    """Whether two host views lie on the same allocation (so a result of `a` is a view of it)."""
    return _owner(a) is _owner(b)
