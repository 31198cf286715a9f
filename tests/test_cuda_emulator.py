"""The CUDA emulator (tests/cuda_emulator) catches what it promises to catch.

Each test launches a small kernel of its own through the emulator's stand-in for CuPy: a
correct one that uses every modelled feature (shared memory, __syncthreads, warp shuffles,
atomics, a grid-stride loop) must give the right answer, and each planted bug must be caught:
an out-of-bounds read or write, an output element never written (NaN from cupy.empty), a
shared-memory race, a __syncthreads() that not every thread reaches, a warp shuffle that not
every lane reaches, a result that depends on the order of blocks (in reverse and shuffled
order; and a block reading another block's output, in any order), a grid-stride loop that
does not loop, shared memory read before it is written, a write through a const pointer,
and a scalar argument of the wrong C type; and for the models of common.cuh's PTX wrappers:
shared memory read while an async copy into it is in flight (a missing or too shallow
async_wait, a missing barrier after it), copies never retired, an mma not reached by every
lane of the warp.

These tests need g++ on x86-64 Linux, not a GPU, and run in the ordinary CPU suite.
"""
import pathlib
import platform
import shutil

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(platform.machine() != "x86_64" or shutil.which("g++") is None,
                                reason="the CUDA emulator needs g++ on x86-64")

from cuda_emulator import fake_cupy as cp  # noqa: E402  (not installed as `cupy`: a module of its own here)

KERNELS = r"""
// the correct versions: a grid-stride copy and a per-block sum through shared memory, warp
// shuffles and an atomic
extern "C" __global__ void copy(const float* x, float* y, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) y[i] = x[i];
}

extern "C" __global__ void block_sums(const float* x, float* total, int n) {
    __shared__ float partial[8];  // one per warp of a 256-thread block
    float v = 0.0f;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) v += x[i];
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
    __syncthreads();
    if (threadIdx.x == 0) {
        float s = 0.0f;
        for (int w = 0; w < 8; ++w) s += partial[w];
        atomicAdd(total, s);
    }
}

// planted bugs, one per kernel
extern "C" __global__ void copy_reads_one_past(const float* x, float* y, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = x[i + 1];  // off by one
}

extern "C" __global__ void copy_writes_one_past(const float* x, float* y, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i <= n) y[i] = i < n ? x[i] : 0.0f;  // <= instead of <
}

extern "C" __global__ void copy_skips_last(const float* x, float* y, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n - 1) y[i] = x[i];  // the last element is never written
}

extern "C" __global__ void copy_without_loop(const float* x, float* y, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = x[i];  // assumes one thread per element, but the launcher caps the grid
}

extern "C" __global__ void reverse_without_barrier(const float* x, float* y) {
    __shared__ float tile[256];
    tile[threadIdx.x] = x[blockIdx.x * 256 + threadIdx.x];
    // missing __syncthreads(): the read below races with another thread's write
    y[blockIdx.x * 256 + threadIdx.x] = tile[255 - threadIdx.x];
}

extern "C" __global__ void barrier_in_branch(const float* x, float* y) {
    __shared__ float tile[256];
    tile[threadIdx.x] = x[threadIdx.x];
    if (threadIdx.x < 128) __syncthreads();  // only half the block gets here
    y[threadIdx.x] = tile[threadIdx.x];
}

extern "C" __global__ void shuffle_in_branch(const float* x, float* y) {
    float v = x[threadIdx.x];
    if (threadIdx.x % 32 < 16) v += __shfl_xor_sync(0xffffffffu, v, 1);  // half the lanes
    y[threadIdx.x] = v;
}

extern "C" __global__ void sum_reads_unwritten_shared(const float* x, float* y) {
    __shared__ float tile[257];
    tile[threadIdx.x] = x[threadIdx.x];
    __syncthreads();
    if (threadIdx.x == 0) {
        float s = 0.0f;
        for (int i = 0; i <= 256; ++i) s += tile[i];  // tile[256] was never written
        y[0] = s;
    }
}

extern "C" __global__ void carry_from_previous_block(const float* x, float* y) {
    // y[b] = x[b] + y[b - 1]: right only if block b - 1 ran first
    if (threadIdx.x == 0) y[blockIdx.x] = x[blockIdx.x] + (blockIdx.x ? y[blockIdx.x - 1] : 0.0f);
}

extern "C" __global__ void slot_by_arrival(const float* x, float* y, int* tickets) {
    // each block takes the next free slot of y: right only if blocks arrive in index order
    __shared__ int slot;
    if (threadIdx.x == 0) slot = atomicAdd(tickets, 1);
    __syncthreads();
    if (threadIdx.x == 0) y[slot] = 2.0f * x[blockIdx.x];
}

extern "C" __global__ void scale_in_place_of_input(const float* x, float* y, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        y[i] = 2.0f * x[i];
        ((float*)x)[i] = 0.0f;  // casts away const and overwrites an input
    }
}

template <typename T>
__global__ void fill(T* y, T v, long long n) {
    for (long long i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) y[i] = v;
}
"""
NAMES = ["copy", "block_sums", "copy_reads_one_past", "copy_writes_one_past", "copy_skips_last", "copy_without_loop",
         "reverse_without_barrier", "barrier_in_branch", "shuffle_in_branch", "sum_reads_unwritten_shared",
         "carry_from_previous_block", "slot_by_arrival", "scale_in_place_of_input", "fill<float>", "fill<double>"]


@pytest.fixture(scope="module")
def module():
    return cp.RawModule(code=KERNELS, options=("--std=c++17",), name_expressions=NAMES)


@pytest.fixture
def emulator(monkeypatch):
    """The emulator's settings, restored after the test."""
    monkeypatch.setattr(cp.settings, "block_order", "shuffle")
    monkeypatch.setattr(cp.settings, "sms", 1)
    return cp.settings


def grid_1d(n, threads=256):
    """minunet.cuda's grid for a grid-stride loop: one block per 256 elements, at most 32 per SM."""
    return (min(-(-n // threads), 32 * cp.cuda.Device().attributes["MultiProcessorCount"]),)


def data(n, seed=0):
    return cp.asarray(np.random.default_rng(seed).standard_normal(n).astype(np.float32))


def test_correct_kernels_give_the_right_answer(module, emulator):
    n = 20000  # more than 32 blocks of 256: the grid-stride loop runs several rounds
    x = data(n)
    y = cp.empty(n, np.float32)
    module.get_function("copy")(grid_1d(n), (256,), (x, y, np.int32(n)))
    np.testing.assert_array_equal(cp.asnumpy(y), cp.asnumpy(x))
    total = cp.zeros(1, np.float32)
    module.get_function("block_sums")(grid_1d(n), (256,), (x, total, np.int32(n)))
    np.testing.assert_allclose(cp.asnumpy(total)[0], cp.asnumpy(x).astype(np.float64).sum(), rtol=1e-4)
    for dtype, ctype in ((np.float32, "float"), (np.float64, "double")):
        out = cp.empty(1000, dtype)
        module.get_function(f"fill<{ctype}>")((3,), (128,), (out, dtype(2.5), np.int64(1000)))
        np.testing.assert_array_equal(cp.asnumpy(out), 2.5)


@pytest.mark.parametrize("kernel, what", [("copy_reads_one_past", r"read of 4 bytes, 0 bytes past the end of "
                                                                 r"argument 0 \(1200 bytes\), by thread \(43,0,0\)"),
                                          ("copy_writes_one_past", r"write of 4 bytes, 0 bytes past the end of "
                                                                   r"argument 1 \(1200 bytes\), by thread \(44,0,0\)")])
def test_out_of_bounds_access_is_caught(module, emulator, kernel, what):
    n = 300
    with pytest.raises(cp.EmulatorError, match=f"{kernel}: out-of-bounds {what} of block \\(1,0,0\\)"):
        module.get_function(kernel)(grid_1d(n), (256,), (data(n), cp.empty(n, np.float32), np.int32(n)))


def test_output_never_written_is_nan_and_fails_the_comparison(module, emulator):
    n = 300
    x, y = data(n), cp.empty(n, np.float32)
    module.get_function("copy_skips_last")(grid_1d(n), (256,), (x, y, np.int32(n)))
    assert np.isnan(cp.asnumpy(y)[-1])
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(cp.asnumpy(y), cp.asnumpy(x))


def test_grid_stride_loop_that_does_not_loop_is_caught_with_few_sms(module, emulator):
    n = 10000  # > 32 blocks * 256 threads: a capped grid must loop
    x = data(n)
    emulator.sms = 132  # an H200's grid covers n in one round: the bug hides
    y = cp.empty(n, np.float32)
    module.get_function("copy_without_loop")(grid_1d(n), (256,), (x, y, np.int32(n)))
    np.testing.assert_array_equal(cp.asnumpy(y), cp.asnumpy(x))
    emulator.sms = 1  # the emulator's default: the grid is capped at 32 blocks
    y = cp.empty(n, np.float32)
    module.get_function("copy_without_loop")(grid_1d(n), (256,), (x, y, np.int32(n)))
    assert np.isnan(cp.asnumpy(y)[32 * 256:]).all()


def test_shared_memory_race_is_caught(module, emulator):
    with pytest.raises(cp.EmulatorError, match=r"reverse_without_barrier: shared-memory race: write to shared byte "
                                               r"\d+ \(byte \d+ of tile in reverse_without_barrier\), which thread "
                                               r"\(\d+,0,0\) read since the last __syncthreads\(\)"):
        module.get_function("reverse_without_barrier")((2,), (256,), (data(512), cp.empty(512, np.float32)))


def test_barrier_not_reached_by_every_thread_is_an_error_not_a_hang(module, emulator):
    with pytest.raises(cp.EmulatorError, match=r"barrier_in_branch: __syncthreads\(\) at <RawModule code>:\d+ is "
                                               r"reached by 128 of the block's 256 threads"):
        module.get_function("barrier_in_branch")((1,), (256,), (data(256), cp.empty(256, np.float32)))


def test_warp_shuffle_not_reached_by_every_lane_is_an_error(module, emulator):
    with pytest.raises(cp.EmulatorError, match=r"shuffle_in_branch: warp collective at <RawModule code>:\d+ "
                                               r"\(mask 0xffffffff\) is not reached by every lane of its mask"):
        module.get_function("shuffle_in_branch")((1,), (64,), (data(64), cp.empty(64, np.float32)))


def test_shared_memory_read_before_written_is_caught(module, emulator):
    with pytest.raises(cp.EmulatorError, match=r"sum_reads_unwritten_shared: read of shared byte \d+ "
                                               r"\(byte 1024 of tile in sum_reads_unwritten_shared\), which no thread of "
                                               r"this block has written, by thread \(0,0,0\)"):
        module.get_function("sum_reads_unwritten_shared")((1,), (256,), (data(256), cp.empty(1, np.float32)))


def test_result_that_depends_on_block_order_shows_in_reverse_and_shuffled_order(module, emulator):
    x = data(64)
    results = {}
    for order in ("forward", "reverse", "shuffle"):
        emulator.block_order = order
        y = cp.empty(64, np.float32)
        module.get_function("slot_by_arrival")((64,), (32,), (x, y, cp.zeros(1, np.int32)))
        results[order] = cp.asnumpy(y)
    np.testing.assert_array_equal(results["forward"], 2 * cp.asnumpy(x))  # in index order, the bug hides
    for order in ("reverse", "shuffle"):
        assert not np.array_equal(results[order], 2 * cp.asnumpy(x)), f"{order} order did not expose the bug"


def test_block_reading_what_another_block_wrote_is_caught_in_any_order(module, emulator):
    emulator.block_order = "forward"  # even where the order happens to make the result right
    with pytest.raises(cp.EmulatorError, match=r"carry_from_previous_block: read of byte 0 of argument 1, which "
                                               r"block \(0,0,0\) wrote in this launch: the result depends on the "
                                               r"order in which blocks run, by thread \(0,0,0\) of block \(1,0,0\)"):
        module.get_function("carry_from_previous_block")((64,), (32,), (data(64), cp.empty(64, np.float32)))


def test_write_through_a_const_pointer_is_caught(module, emulator):
    with pytest.raises(cp.EmulatorError, match=r"scale_in_place_of_input: write of 4 bytes into argument 0, which "
                                               r"the kernel takes as a const pointer"):
        module.get_function("scale_in_place_of_input")((1,), (256,), (data(100), cp.empty(100, np.float32),
                                                                       np.int32(100)))


def test_arguments_must_match_the_kernel_parameters(module, emulator):
    copy = module.get_function("copy")
    x, y = data(10), cp.empty(10, np.float32)
    with pytest.raises(TypeError, match=r"copy: argument 2: the kernel takes a 4-byte 'i' scalar, got int64"):
        copy((1,), (32,), (x, y, np.int64(10)))
    with pytest.raises(TypeError, match=r"copy: argument 1: the kernel takes a pointer to a 4-byte 'f' type, got an "
                                        r"array of float64"):
        copy((1,), (32,), (x, cp.empty(10, np.float64), np.int32(10)))
    with pytest.raises(TypeError, match=r"copy: argument 0 is a pointer; expected a device array or None, got ndarray"):
        copy((1,), (32,), (np.zeros(10, np.float32), y, np.int32(10)))
    with pytest.raises(TypeError, match=r"copy: the kernel takes 3 arguments, got 2"):
        copy((1,), (32,), (x, y))
    with pytest.raises(cp.EmulatorError, match=r"invalid launch configuration"):
        copy((1,), (2048,), (x, y, np.int32(10)))


def test_device_arrays_behave_like_cupy_arrays():
    a = cp.empty((2, 3), np.float32)
    assert isinstance(a, cp.ndarray) and np.isnan(cp.asnumpy(a)).all()  # fresh memory is NaN
    b = cp.asarray(np.arange(6.0).reshape(2, 3))
    assert isinstance(b.sum(), cp.ndarray) and b.sum().ndim == 0 and float(b.sum()) == 15.0
    assert isinstance(cp.exp(b), cp.ndarray) and isinstance(b[0, 1], cp.ndarray) and isinstance(b * 2, cp.ndarray)
    with pytest.raises(TypeError, match="mixes a host numpy.ndarray with device arrays"):
        b + np.ones((2, 3))
    assert type(b.get()) is np.ndarray and type(cp.asnumpy(b)) is np.ndarray


# ---- the same checks on minunet's own kernels, each with one line of it broken ---------------

KERNEL_DIR = pathlib.Path(__file__).resolve().parents[1] / "kernels"


def _conv2d_forward_v2(common, conv2d, K=70):
    """Compile common.cuh + conv2d.cu as given and run conv2d_forward_v2<float> as minunet.cuda
    launches it: x (1, 3, 9, 9), w (K, 3, 3, 3), padding 1; returns y as NumPy."""
    source = f'#line 1 "common.cuh"\n{common}\n#line 1 "conv2d.cu"\n{conv2d}'
    kernel = cp.RawModule(code=source, options=("--std=c++17",),
                          name_expressions=["conv2d_forward_v2<float>"]).get_function("conv2d_forward_v2<float>")
    N, C, H, W, kh, kw = 1, 3, 9, 9, 3, 3
    x, w, b = data(N * C * H * W).reshape(N, C, H, W), data(K * C * kh * kw, 1).reshape(K, C, kh, kw), data(K, 2)
    y = cp.empty((N, K, H, W), np.float32)
    dims = (N, C, H, W, K, kh, kw, 1, 1, 1, 1, H, W)
    kernel((-(-N * H * W // 64), -(-K // 64)), (256,), (x, w, b, y, *(np.int32(d) for d in dims)))
    return cp.asnumpy(y)


def _break(text, old, new):
    assert text.count(old) >= 1, f"{old!r} not found: the test no longer matches the kernel source"
    return text.replace(old, new, 1)


def test_minunet_kernel_unbroken_runs_clean(emulator):
    y = _conv2d_forward_v2((KERNEL_DIR / "common.cuh").read_text(), (KERNEL_DIR / "conv2d.cu").read_text())
    assert np.isfinite(y).all()


def test_minunet_gemm_loop_missing_barrier_is_a_race(emulator):
    common = _break((KERNEL_DIR / "common.cuh").read_text(), "tile_mma(As, Bs, acc, tx, ty);\n        __syncthreads();",
                    "tile_mma(As, Bs, acc, tx, ty);")
    with pytest.raises(cp.EmulatorError, match=r"conv2d_forward_v2<float>: shared-memory race: .* of shared byte \d+ "
                                               r"\(byte \d+ of [AB]s in gemm_main_loop<float, conv2d_forward_v2<float>"):
        _conv2d_forward_v2(common, (KERNEL_DIR / "conv2d.cu").read_text())


def test_minunet_gemm_epilogue_missing_edge_guard_is_out_of_bounds(emulator):
    common = _break((KERNEL_DIR / "common.cuh").read_text(), "if (m < M) store(", "store(")  # K = 70: 6 rows in tile 2
    with pytest.raises(cp.EmulatorError, match=r"conv2d_forward_v2<float>: out-of-bounds (read|write) of 4 bytes"):
        _conv2d_forward_v2(common, (KERNEL_DIR / "conv2d.cu").read_text())


def test_minunet_tile_loader_off_by_one_reads_unwritten_shared_memory(emulator):
    common = _break((KERNEL_DIR / "common.cuh").read_text(), "for (int kk = 0; kk < GEMM_TILE_K; ++kk)",
                    "for (int kk = 0; kk <= GEMM_TILE_K; ++kk)")  # one reduction step too many
    # As[16][...] lies past As: in Bs (a race or a read of unwritten words) or past all shared memory
    with pytest.raises(cp.EmulatorError, match=r"conv2d_forward_v2<float>: (shared-memory race|read of shared byte|"
                                               r"out-of-bounds read of 4 bytes of shared memory)"):
        _conv2d_forward_v2(common, (KERNEL_DIR / "conv2d.cu").read_text())


def test_common_double_atomic_add_compare_and_swap_path_before_sm60(emulator):
    """common.cuh's atomic_add(double*) as compiled for a device before sm_60 (a CAS loop)."""
    kernel_source = (KERNEL_DIR / "common.cuh").read_text() + r"""
    template <typename T>
    __global__ void sum_all(const T* x, T* total, int n) {
        for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) atomic_add(total, x[i]);
    }
    """
    for arch in ("500", "900"):
        module = cp.RawModule(code=kernel_source, options=("--std=c++17", f"-D__CUDA_ARCH__={arch}"),
                              name_expressions=["sum_all<double>"])
        x = cp.asarray(np.random.default_rng(3).standard_normal(5000))
        total = cp.zeros(1, np.float64)
        module.get_function("sum_all<double>")((4,), (256,), (x, total, np.int32(5000)))
        np.testing.assert_allclose(cp.asnumpy(total)[0], cp.asnumpy(x).sum(), rtol=1e-12, err_msg=f"sm_{arch}")


# ---- asynchronous copies and tensor cores: the models of common.cuh's PTX wrappers ----------

def _conv2d_forward_tiled(common, conv2d, version=4, tile=(64, 128), K=70):
    """Compile common.cuh + conv2d.cu as given and run conv2d_forward_v<version><float, BM, BN> as
    minunet.cuda launches it: x (2, 19, 9, 9), w (K, 19, 3, 3) re-laid as (3, 3, 19, K), padding
    1 (3 x 3 taps x 3 channel steps: the 4-stage pipeline wraps around); returns y and the
    float64 reference as NumPy."""
    source = f'#line 1 "common.cuh"\n{common}\n#line 1 "conv2d.cu"\n{conv2d}'
    name = f"conv2d_forward_v{version}<float, {tile[0]}, {tile[1]}>"
    kernel = cp.RawModule(code=source, options=("--std=c++17",), name_expressions=[name]).get_function(name)
    N, C, H, W, kh, kw = 2, 19, 9, 9, 3, 3
    rng = np.random.default_rng(3)
    x, w = rng.standard_normal((N, C, H, W)).astype(np.float32), rng.standard_normal((K, C, kh, kw)).astype(np.float32)
    y = cp.empty((N, K, H, W), np.float32)
    dims = (N, C, H, W, K, kh, kw, 1, 1, 1, 1, H, W)
    kernel((-(-N * H * W // tile[1]), -(-K // tile[0])), ((tile[0] // 8) * (tile[1] // 8),),
           (cp.asarray(x), cp.asarray(np.ascontiguousarray(w.transpose(2, 3, 1, 0))), None, y,
            *(np.int32(d) for d in dims), np.int32(0)))
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    y_ref = sum(np.einsum("nchw,kc->nkhw", xp[:, :, u:u + H, v:v + W], w[:, :, u, v]) for u in range(3) for v in range(3))
    return cp.asnumpy(y), y_ref


PIPELINE_WAIT = "            async_wait<STAGES - 2>();\n            __syncthreads();"


def test_minunet_async_pipeline_unbroken_runs_clean(emulator):
    common, conv2d = (KERNEL_DIR / "common.cuh").read_text(), (KERNEL_DIR / "conv2d.cu").read_text()
    for version in (4, 5):
        y, y_ref = _conv2d_forward_tiled(common, conv2d, version)
        np.testing.assert_allclose(y, y_ref, rtol=2e-3, atol=2e-3 * np.abs(y_ref).max())


@pytest.mark.parametrize("broken, what", [
    ("            __syncthreads();", "no async_wait"),
    ("            async_wait<STAGES - 1>();\n            __syncthreads();", "one group too few retired"),
])
def test_minunet_async_pipeline_missing_wait_is_caught(emulator, broken, what):
    """A read of shared memory that an async copy has not yet landed in (a missing async_wait, or
    one that leaves one group too many in flight) is an error naming the copy's thread."""
    common = _break((KERNEL_DIR / "common.cuh").read_text(), PIPELINE_WAIT, broken)
    with pytest.raises(cp.EmulatorError, match=r"conv2d_forward_v4<float, 64, 128>: read of shared byte \d+ \(byte \d+ "
                                               r"of [AB]s in AsyncStaged.*\) while an async copy of thread "
                                               r"\(\d+,0,0\) into it is in flight"):
        _conv2d_forward_tiled(common, (KERNEL_DIR / "conv2d.cu").read_text())


def test_minunet_async_pipeline_missing_barrier_is_caught(emulator):
    """async_wait orders only the calling thread's copies: without the __syncthreads() after it a
    thread reads words whose copies another thread has not retired yet (or retired without a
    barrier in between: a race)."""
    common = _break((KERNEL_DIR / "common.cuh").read_text(), PIPELINE_WAIT, "            async_wait<STAGES - 2>();")
    with pytest.raises(cp.EmulatorError, match=r"conv2d_forward_v4<float, 64, 128>: (read of shared byte \d+ while an "
                                               r"async copy|shared-memory race|read of shared byte \d+, which no thread)"):
        _conv2d_forward_tiled(common, (KERNEL_DIR / "conv2d.cu").read_text())


ASYNC_KERNELS = r"""
// a copy issued and committed but never waited for
extern "C" __global__ void copy_never_waited(const float* x, float* y) {
    __shared__ float tile[64];
    async_copy<4>(&tile[threadIdx.x], &x[threadIdx.x]);
    async_commit();
    y[threadIdx.x] = x[threadIdx.x];
}

// mma_tf32_16x8x8 by half a warp
extern "C" __global__ void mma_by_half_a_warp(float* y) {
    float d[4] = {0, 0, 0, 0};
    unsigned a[4] = {0, 0, 0, 0}, b[2] = {0, 0};
    if (threadIdx.x < 16) mma_tf32_16x8x8(d, a, b);
    y[threadIdx.x] = d[0];
}
"""


def _async_module():
    source = (KERNEL_DIR / "common.cuh").read_text() + ASYNC_KERNELS
    return cp.RawModule(code=source, options=("--std=c++17",), name_expressions=["copy_never_waited", "mma_by_half_a_warp"])


def test_async_copies_never_retired_are_caught(emulator):
    with pytest.raises(cp.EmulatorError, match=r"copy_never_waited: thread \(0,0,0\) ended with 1 async copies in "
                                               r"flight"):
        _async_module().get_function("copy_never_waited")((1,), (64,), (data(64), cp.empty(64, np.float32)))


def test_mma_not_reached_by_every_lane_is_caught(emulator):
    with pytest.raises(cp.EmulatorError, match=r"mma_by_half_a_warp: warp collective at .* is not reached by every "
                                               r"lane of its mask"):
        _async_module().get_function("mma_by_half_a_warp")((1,), (32,), (cp.empty(32, np.float32),))


# ---- addresses read from device memory: the model of table_pointer (kernels/optim.cu) -------

def _optim_module(optim):
    source = f'#line 1 "common.cuh"\n{(KERNEL_DIR / "common.cuh").read_text()}\n#line 1 "optim.cu"\n{optim}'
    return cp.RawModule(code=source, options=("--std=c++17",), name_expressions=["sgd_update<float>"])


def _sgd_step(optim, sizes, n_in_table=None):
    """One plain SGD step (lr 0.5, no momentum) of tensors of `sizes` through optim.cu's sgd_update as
    minunet.cuda launches it, the table's n column given by n_in_table (the true sizes by default);
    returns the parameters after the step and p - 0.5 g."""
    rng = np.random.default_rng(4)
    ps = [cp.asarray(rng.standard_normal(n).astype(np.float32)) for n in sizes]
    gs = [cp.asarray(rng.standard_normal(n).astype(np.float32)) for n in sizes]
    expected = [cp.asnumpy(p) - np.float32(0.5) * cp.asnumpy(g) for p, g in zip(ps, gs)]
    rows, chunks = [], 0
    for p, g, n in zip(ps, gs, n_in_table or sizes):
        rows.append((p.data.ptr, g.data.ptr, 0, 0, n, chunks))
        chunks += -(-n // 4096)
    hyper = cp.asarray(np.array([(0.5, 0.0, 0.0, 0.0, 0.0, 0.0)] * len(sizes)))
    _optim_module(optim).get_function("sgd_update<float>")(
        (min(chunks, 32),), (256,), (cp.asarray(np.array(rows, np.int64)), hyper, np.int32(len(sizes)), np.int64(chunks)))
    return [cp.asnumpy(p) for p in ps], expected


def test_minunet_multi_tensor_update_unbroken_runs_clean(emulator):
    """33 chunks over 32 blocks (the grid-stride loop over chunks turns), tensors of 1 element to 8
    chunks, each found through the table."""
    sizes = [8 * 4096, 3, 4096, 4097, 1] + [2000] * 16 + [4096 * 5 + 11]
    got, expected = _sgd_step((KERNEL_DIR / "optim.cu").read_text(), sizes)
    for i, (a, e) in enumerate(zip(got, expected)):
        np.testing.assert_array_equal(a, e, err_msg=f"tensor {i}")


def test_minunet_multi_tensor_chunk_past_its_tensor_is_out_of_bounds(emulator):
    """The last chunk of a tensor run to a full CHUNK: the bytes past the tensor are not its, even
    where another array lies right after it."""
    optim = _break((KERNEL_DIR / "optim.cu").read_text(), "k.end = min(k.n, k.begin + OPTIM_CHUNK);",
                   "k.end = k.begin + OPTIM_CHUNK;")
    with pytest.raises(cp.EmulatorError, match=r"sgd_update<float>: out-of-bounds read of 4 bytes, \d+ bytes past the end "
                                               r"of argument 0"):
        _sgd_step(optim, [4096 + 5, 7])


def test_table_pointer_past_its_array_is_caught(emulator):
    """A table that claims more elements than the array at its address holds (a host bug)."""
    with pytest.raises(cp.EmulatorError, match=r"sgd_update<float>: table_pointer: 11 elements \(44 bytes\) at 0x[0-9a-f]+, "
                                               r"read from the table \(argument 0\), are not inside one device array"):
        _sgd_step((KERNEL_DIR / "optim.cu").read_text(), [10, 7], n_in_table=[11, 7])


def test_write_through_a_const_table_pointer_is_caught(emulator):
    optim = _break((KERNEL_DIR / "optim.cu").read_text(), "p[idx] -= lr * d;", "p[idx] -= lr * d;\n            "
                   "((T*)g)[idx] = T(0);")
    with pytest.raises(cp.EmulatorError, match=r"sgd_update<float>: write of 4 bytes into argument 0, which the kernel "
                                               r"takes as a const pointer"):
        _sgd_step(optim, [10])
