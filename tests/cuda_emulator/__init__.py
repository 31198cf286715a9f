"""cuda_emulator: every CUDA kernel of minunet executed on the CPU, strictly, for CI.

No GPU is needed to run minunet's kernels/*.cu: with MINUNET_CUDA_EMULATOR=1, tests/conftest.py
calls `install()` before minunet is imported, which puts a stand-in for CuPy into
sys.modules['cupy']. minunet.backend then sees one CUDA device, and minunet.cuda compiles and
launches its kernels exactly as on a GPU, without knowing the difference:

    MINUNET_CUDA_EMULATOR=1 python -m pytest -m gpu tests        # the GPU suite on the CPU

The pieces
----------
fake_cupy.py   the stand-in for CuPy: device arrays (host memory, NaN-filled when fresh, with
               guard bytes), NumPy-backed array functions, cupy.cuda.Device/runtime.
raw_module.py  its RawModule: g++ instead of NVRTC, cached by content, and kernel launches
               that check every argument against the kernel's C++ parameter types.
cuda_model.h   the CUDA execution model in C++, compiled in front of the kernel source: a
               grid of blocks run in forward/reverse/shuffled order, the threads of a block
               as cooperative fibers with an exact __syncthreads, warps of 32 for the
               shuffles, atomics, bit casts and math; and the access checks (bounds of every
               array, shared-memory races, reads of shared memory never written, barriers
               not reached by every thread), each an EmulatorError naming kernel and thread.
emulator.ld    the linker script that collects the kernels' __shared__ variables.
capture.py     streams, stream capture into CUDA graphs (operations recorded, not run, then
               replayed by graph.launch()) and memory pools, strict about what a capture
               forbids: waiting for the device, host-to-device copies, fresh device memory.

What it catches, and what it cannot
-----------------------------------
Out-of-bounds reads and writes of arrays, writes through const pointers, elements of an
output never written (NaN), shared-memory races within a block, shared memory read before
any thread of the block wrote it, __syncthreads() not reached by every thread, warp
collectives not reached by their lanes, a block reading or writing what another block of the
same launch wrote, other results that depend on block order (MINUNET_EMU_BLOCK_ORDER runs
blocks in reverse or shuffled order), grid-stride loops that never iterate (MINUNET_EMU_SMS=1,
the default, so grids capped by SM count are small), and arguments of the wrong C type.
It cannot see: timing, occupancy and register limits, races between blocks that the
block order does not expose, the GPU's rounding (no flush-to-zero, FMA contraction differs),
and anything the host compiler accepts that NVRTC does not (tests/test_cuda_compile.py
compiles every kernel with NVRTC for that).

Requirements: Linux on x86-64 and g++ (7 or later) with -fsanitize=thread support in the
compiler (the ThreadSanitizer runtime library itself is not needed).
"""
import sys


class EmulatorError(RuntimeError):
    """A kernel did something a GPU would get wrong: out of bounds, a race, a barrier not
    reached by all threads, a bad launch or argument; or a stream capture did what CUDA forbids."""


def install():
    """Make `import cupy` give the emulator's stand-in (before minunet is imported); return it."""
    from cuda_emulator import fake_cupy
    fake_cupy.__name__ = "cupy"  # error messages say "cupy.ndarray", as they do on a GPU
    sys.modules["cupy"] = fake_cupy
    sys.modules["cupy.cuda"] = fake_cupy.cuda
    sys.modules["cupy.cuda.runtime"] = fake_cupy.runtime
    sys.modules["cupy.cuda.compiler"] = fake_cupy.compiler
    sys.modules["cupy.random"] = fake_cupy.random
    return fake_cupy
