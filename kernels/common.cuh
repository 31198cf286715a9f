/* common.cuh: the helpers every kernel family shares.

How it is used
--------------
minunet/cuda.py does not `#include` this file: it builds each family's source as the TEXT of
common.cuh followed by the TEXT of the family's .cu file and hands that to NVRTC through
cupy.RawModule. So editing this header changes every family's source, and with it CuPy's
compile-cache key, and nothing stale is ever loaded. NVRTC ships no C++ standard headers, so
nothing here (or in any .cu file) includes one; the CUDA math functions (expf, exp, sqrt, ...)
and intrinsics are built into NVRTC.

What is here
------------
- int64: the index type for flat offsets into tensors, which can pass 2^31 elements.
- Grid-stride loops: `for (int64 i = thread_index(); i < n; i += thread_count())` lets a
  grid of any size cover n elements, so launchers can cap the grid.
- Type-generic math (exp_, log_, sqrt_, neg_inf, quiet_nan) by overloading on float and
  double, so a `template <typename T>` kernel calls the right precision.
- atomic_add for float and double (double atomicAdd is native from sm_60; older devices
  get a compare-and-swap loop).
- block_sum: the sum of one double per thread over a block (warp shuffles, then one shared
  slot per warp), used by the per-channel reductions.
- The tiled GEMM of every `_v2` convolution kernel, written once: the tile sizes, the
  thread layout, tile_mma (the inner product of two staged shared-memory tiles),
  gemm_main_loop (stage, barrier, multiply, barrier, over the reduction) and gemm_epilogue
  (each thread's outputs that lie inside the matrix). A kernel brings only what is its own:
  how to load its operand tiles and where an output element goes, as two lambdas.

The tiled implicit GEMM (the `_v2` convolution kernels)
-------------------------------------------------------
Each convolution is a matrix product C[m, n] = sum_r A[m, r] B[r, n] whose operands are never
materialised: the kernel computes the tensor index of A[m, r] or B[r, n] on the fly (that is
what "implicit" means; im2col would write B out to memory first). One block of GEMM_THREADS =
256 threads computes one TILE_M x TILE_N = 64 x 64 tile of C:

    for r0 in steps of TILE_K = 16 over the reduction:                 (gemm_main_loop)
        all 256 threads load A[m0:m0+64, r0:r0+16] and B[r0:r0+16, n0:n0+64] into shared
        memory (4 elements of each per thread; zeros outside the matrix, so edges need no
        special case in the arithmetic)                                    (the kernel's loader)
        __syncthreads(),
        every thread multiplies its 4 x 4 register tile (tile_mma), __syncthreads().
    every thread writes its outputs that lie inside the matrix          (gemm_epilogue and
                                                                         the kernel's store)

Thread t is (tx, ty) = (t % 16, t / 16) and owns the 16 outputs
C[m0 + ty + 16 i, n0 + tx + 16 j] for i, j in 0..3. The stride-16 (not contiguous) layout
means the 16 threads of a half-warp read 16 consecutive words of a B row (no bank conflict)
and a single broadcast word of an A row, and that neighbouring threads write neighbouring
columns of C in the epilogue (coalesced). Per step of kk each thread loads 4 + 4 values from
shared memory and does 16 FMAs; a larger register tile would raise that ratio (the obvious
next version). The shared arrays are padded by one column (TILE_M + 1) so that the stores of
the loaders, which often walk down a column, spread over the banks.

minunet/cuda.py mirrors GEMM_TILE_M, GEMM_TILE_N, GEMM_TILE_K and GEMM_THREADS to size its
grids and split-K chunks; the compile test checks the two copies agree.
*/

typedef long long int64;

// ---- grid-stride loops ----------------------------------------------------------------------

__device__ __forceinline__ int64 thread_index() {
    return (int64)blockIdx.x * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ int64 thread_count() {
    return (int64)gridDim.x * blockDim.x;
}

// ---- type-generic math ----------------------------------------------------------------------

__device__ __forceinline__ float exp_(float v) { return expf(v); }
__device__ __forceinline__ double exp_(double v) { return exp(v); }
__device__ __forceinline__ float log_(float v) { return logf(v); }
__device__ __forceinline__ double log_(double v) { return log(v); }
__device__ __forceinline__ float sqrt_(float v) { return sqrtf(v); }
__device__ __forceinline__ double sqrt_(double v) { return sqrt(v); }

// -infinity and a quiet NaN of T, from their bit patterns (no <limits> in NVRTC)
template <typename T> __device__ __forceinline__ T neg_inf();
template <> __device__ __forceinline__ float neg_inf<float>() { return __int_as_float(0xff800000); }
template <> __device__ __forceinline__ double neg_inf<double>() { return __longlong_as_double(0xfff0000000000000LL); }

template <typename T> __device__ __forceinline__ T quiet_nan();
template <> __device__ __forceinline__ float quiet_nan<float>() { return __int_as_float(0x7fc00000); }
template <> __device__ __forceinline__ double quiet_nan<double>() { return __longlong_as_double(0x7ff8000000000000LL); }

// ---- atomics --------------------------------------------------------------------------------

__device__ __forceinline__ void atomic_add(float* address, float v) { atomicAdd(address, v); }

__device__ __forceinline__ void atomic_add(double* address, double v) {
#if __CUDA_ARCH__ >= 600
    atomicAdd(address, v);
#else
    // before sm_60 there is no double atomicAdd: retry a 64-bit compare-and-swap until no other
    // thread changed the value between our read and our write
    unsigned long long* bits = (unsigned long long*)address;
    unsigned long long seen = *bits, expected;
    do {
        expected = seen;
        seen = atomicCAS(bits, expected, __double_as_longlong(__longlong_as_double(expected) + v));
    } while (seen != expected);
#endif
}

// ---- block-wide reduction -------------------------------------------------------------------

// The sum of `v` over all threads of the block, returned to every thread. blockDim.x must be a
// multiple of 32 (at most 1024) and every thread of the block must call it (it synchronises).
__device__ __forceinline__ double block_sum(double v) {
    __shared__ double warp_sums[32];
    for (int offset = 16; offset > 0; offset >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, offset);  // butterfly: every lane gets its warp's sum
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) warp_sums[warp] = v;
    __syncthreads();
    v = lane < (int)(blockDim.x >> 5) ? warp_sums[lane] : 0.0;
    for (int offset = 16; offset > 0; offset >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, offset);  // every warp sums the per-warp partials
    __syncthreads();  // warp_sums may be reused by the next call once everyone has read it
    return v;
}

// ---- tiled GEMM building blocks (the _v2 convolution kernels) -------------------------------

#define GEMM_TILE_M 64    // rows of C per block
#define GEMM_TILE_N 64    // columns of C per block
#define GEMM_TILE_K 16    // reduction step staged in shared memory
#define GEMM_MICRO 4      // each thread owns a GEMM_MICRO x GEMM_MICRO register tile ...
#define GEMM_THREADS 256  // ... so a block has (64 / 4) x (64 / 4) = 256 threads
#define GEMM_LOADS 4      // elements of each operand tile one thread stages per step: 64 * 16 / 256
#define GEMM_STRIDE 16    // thread (tx, ty) owns rows ty + 16 i and columns tx + 16 j

static_assert(GEMM_TILE_M == GEMM_STRIDE * GEMM_MICRO && GEMM_TILE_N == GEMM_STRIDE * GEMM_MICRO,
              "the register tiles must cover the block tile");
static_assert(GEMM_THREADS == GEMM_STRIDE * GEMM_STRIDE, "one thread per register tile");
static_assert(GEMM_LOADS * GEMM_THREADS == GEMM_TILE_M * GEMM_TILE_K &&
              GEMM_LOADS * GEMM_THREADS == GEMM_TILE_N * GEMM_TILE_K,
              "the threads stage each operand tile in GEMM_LOADS loads apiece");

// How 256 threads stage a 64 x 16 (or 16 x 64) operand tile, GEMM_LOADS elements each:
//   "along the reduction": thread t takes reduction column t % 16 of tile rows t / 16 + 16 s;
//       consecutive threads read consecutive reduction indices (coalesced where those are
//       contiguous in memory, e.g. the taps of one w[k, c]).
//   "along the pixels": thread t takes pixel column t % 64 of reduction rows t / 64 + 4 s;
//       consecutive threads read consecutive pixels (coalesced for stride 1), and a thread
//       keeps one pixel for the whole reduction, so it decodes (n, i, j) only once.
#define ALONG_RED_ROWS (GEMM_THREADS / GEMM_TILE_K)  // 16
#define ALONG_PIX_ROWS (GEMM_THREADS / GEMM_TILE_N)  // 4

// acc[i][j] += sum_kk As[kk][ty + 16 i] * Bs[kk][tx + 16 j] over one staged reduction step.
template <typename T>
__device__ __forceinline__ void tile_mma(const T (&As)[GEMM_TILE_K][GEMM_TILE_M + 1],
                                         const T (&Bs)[GEMM_TILE_K][GEMM_TILE_N + 1],
                                         T (&acc)[GEMM_MICRO][GEMM_MICRO], int tx, int ty) {
#pragma unroll
    for (int kk = 0; kk < GEMM_TILE_K; ++kk) {
        T a[GEMM_MICRO], b[GEMM_MICRO];
#pragma unroll
        for (int i = 0; i < GEMM_MICRO; ++i) a[i] = As[kk][ty + GEMM_STRIDE * i];
#pragma unroll
        for (int j = 0; j < GEMM_MICRO; ++j) b[j] = Bs[kk][tx + GEMM_STRIDE * j];
#pragma unroll
        for (int i = 0; i < GEMM_MICRO; ++i)
#pragma unroll
            for (int j = 0; j < GEMM_MICRO; ++j) acc[i][j] += a[i] * b[j];
    }
}

// One staged reduction step of each operand, padded by one column (see the header).
template <typename T> using TileA = T[GEMM_TILE_K][GEMM_TILE_M + 1];  // [kk][m] = A[m0 + m, r0 + kk]
template <typename T> using TileB = T[GEMM_TILE_K][GEMM_TILE_N + 1];  // [kk][n] = B[r0 + kk, n0 + n]

// Output or input pixel p of a batch of planes of width W and size HW, as (n, i, j):
// p = n * HW + i * W + j.
struct Pixel {
    int n, i, j;
};
__device__ __forceinline__ Pixel pixel_of(int p, int W, int HW) {
    const int n = p / HW, ij = p - n * HW, i = ij / W;
    return Pixel{n, i, ij - i * W};
}

// The A tile of a GEMM whose A is a dense row-major M x R matrix `a` (a convolution's weight
// seen as rows of taps), staged along the reduction: thread t takes column r0 + t % 16 of rows
// m0 + t / 16 + 16 s, so consecutive threads read consecutive addresses; zeros outside A.
template <typename T>
__device__ __forceinline__ void stage_dense_a(TileA<T>& As, const T* __restrict__ a, int m0, int M, int r0, int R) {
    const int kk = threadIdx.x % GEMM_TILE_K, row = threadIdx.x / GEMM_TILE_K, r = r0 + kk;
#pragma unroll
    for (int s = 0; s < GEMM_LOADS; ++s) {
        const int m = m0 + row + ALONG_RED_ROWS * s;
        As[kk][row + ALONG_RED_ROWS * s] = (m < M && r < R) ? a[(int64)m * R + r] : T(0);
    }
}

// The main loop of every tiled kernel: acc += A[m0:m0+64, r_begin:r_end] B[r_begin:r_end, n0:n0+64]
// on this thread's 4 x 4 register tile. load_tiles(As, Bs, r0) is the kernel's own loader: every
// thread stages its share of A[:, r0:r0+16] into As and of B[r0:r0+16, :] into Bs, zeros outside
// the matrices and past r_end. The shared tiles belong to the calling kernel (each kernel's loader
// is a type of its own, so each kernel gets its own instantiation and its own tiles).
template <typename T, typename LoadTiles>
__device__ __forceinline__ void gemm_main_loop(int r_begin, int r_end, T (&acc)[GEMM_MICRO][GEMM_MICRO],
                                               LoadTiles load_tiles) {
    __shared__ TileA<T> As;
    __shared__ TileB<T> Bs;
    const int tx = threadIdx.x % GEMM_STRIDE, ty = threadIdx.x / GEMM_STRIDE;
    for (int r0 = r_begin; r0 < r_end; r0 += GEMM_TILE_K) {
        load_tiles(As, Bs, r0);
        __syncthreads();
        tile_mma(As, Bs, acc, tx, ty);
        __syncthreads();  // before the next step's loads overwrite the tiles
    }
}

// The epilogue of every tiled kernel: store(m, n, value) for each of this thread's 16 results
// C[m, n] = acc[i][j], m = m0 + ty + 16 i, n = n0 + tx + 16 j, that lie inside the M x N matrix.
// For one (i, j), neighbouring threads store neighbouring columns n (coalesced where the kernel's
// columns are contiguous).
template <typename T, typename Store>
__device__ __forceinline__ void gemm_epilogue(const T (&acc)[GEMM_MICRO][GEMM_MICRO], int m0, int n0, int M, int N,
                                              Store store) {
    const int tx = threadIdx.x % GEMM_STRIDE, ty = threadIdx.x / GEMM_STRIDE;
#pragma unroll
    for (int jj = 0; jj < GEMM_MICRO; ++jj) {
        const int n = n0 + tx + GEMM_STRIDE * jj;
        if (n >= N) continue;
#pragma unroll
        for (int ii = 0; ii < GEMM_MICRO; ++ii) {
            const int m = m0 + ty + GEMM_STRIDE * ii;
            if (m < M) store(m, n, acc[ii][jj]);
        }
    }
}
