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
- The register-tiled GEMM engine of the `_v3`, `_v4` (and later) convolution kernels, at the
  end of this file: tile shapes, compute policies (which outputs a thread owns, one staged
  step as FMAs or as tensor-core MMAs), pipelines (register-staged double buffering;
  multi-stage asynchronous copies) and register_tiled_gemm, which runs them over operand
  loaders the kernels define. Every instruction reached through inline PTX (cp.async, cvt.rna.tf32,
  mma.sync) sits behind one small device function there, which the CUDA emulator replaces by
  its own model; so does table_pointer, the read of an array's address from a table in device
  memory (the multi-tensor optimizer kernels).

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

// =============================================================================================
// The register-tiled GEMM engine of the _v3, _v4 and _v5 convolution kernels
// =============================================================================================
//
// A kernel built on it supplies two operand LOADERS (which elements of A and B one thread stages
// per reduction step, and from where), a COMPUTE policy (which outputs a thread owns and how one
// staged step is multiplied) and a PIPELINE (how the steps are staged); register_tiled_gemm runs them.
// Every block computes a BM x BN tile of C in steps of BK = 8 along the reduction; each thread
// owns an 8 x 8 register tile (acc[i][j] is C[row(i), col(j)] of the block's tile).
//
// Shared tiles are stored reduction-major: As[kk * LDA + m] = A[m0 + m, k0 + kk] and
// Bs[kk * LDB + n] = B[k0 + kk, n0 + n], so one step of kk reads a thread's 4 consecutive rows
// (or columns) as ONE 16-byte load (lds4). Rows are padded to LDA = BM + PAD: with PAD = 4 the
// loaders' transposing stores (consecutive threads writing consecutive kk of one column) hit
// distinct banks, and 16-byte alignment is kept; the tensor-core policy needs PAD = 8 (see WarpMma).
//
// Loaders (defined next to the kernels that use them) provide, for their thread:
//     static constexpr int REGS          elements staged per step
//     fetch(T (&r)[REGS])                global -> registers at the current step (0 outside)
//     store(T* tile, const T (&r)[REGS]) registers -> the shared tile
//     copy_async(T* tile)                global -> shared directly (async_copy), zeros outside
//     advance()                          move to the next reduction step
// and are constructed at step 0. Zeros outside the matrices make edge tiles need no special case.

// ---- inline PTX, each instruction behind one small device function --------------------------
// The kernels reach cp.async, cvt.rna.tf32 and mma.sync only through the five functions below,
// and pointers stored in device memory only through the sixth, table_pointer.
// tests/cuda_emulator compiles this file with a host C++ compiler, which cannot assemble PTX: it
// defines MINUNET_EMULATED_PTX and supplies its own model of exactly these six functions (same
// names, same signatures); nothing else in any kernel differs between the GPU and the emulator.
#ifndef MINUNET_EMULATED_PTX

// Start copying BYTES (4, 8 or 16) bytes from global `src` to shared `dst` without passing through
// registers (cp.async, sm_80+). The copy is in flight until async_wait retires its group: dst must
// not be read (or written) before then. Older GPUs get a plain, synchronous copy.
template <int BYTES>
__device__ __forceinline__ void async_copy(void* dst, const void* src) {
#if __CUDA_ARCH__ >= 800
    const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2;\n" ::"r"(d), "l"(src), "n"(BYTES) : "memory");
#else
    if constexpr (BYTES == 4) *(unsigned*)dst = *(const unsigned*)src;
    else if constexpr (BYTES == 8) *(unsigned long long*)dst = *(const unsigned long long*)src;
    else *(uint4*)dst = *(const uint4*)src;
#endif
}

// Close the group of async copies this thread issued since the last commit.
__device__ __forceinline__ void async_commit() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Wait until at most PENDING of this thread's committed groups are still in flight (the newest
// ones). It orders only this thread's copies: a __syncthreads() must follow before other threads
// read what they wrote.
template <int PENDING>
__device__ __forceinline__ void async_wait() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING) : "memory");
#endif
}

// v rounded to TF32 (10 explicit mantissa bits, to nearest, ties away from zero), as the bits
// the tensor cores read.
__device__ __forceinline__ unsigned to_tf32(float v) {
    unsigned r;
#if __CUDA_ARCH__ >= 800
    asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(v));
#else
    r = __float_as_uint(v);
#endif
    return r;
}

// d += a * b for one 16 x 8 x 8 TF32 tile, computed by the 32 lanes of a warp together
// (mma.sync.m16n8k8, sm_80+; every lane of the warp must call it). With g = lane / 4 and
// q = lane % 4 (the PTX manual's groupID and threadID_in_group), lane holds
//   a[0] = A[g][q], a[1] = A[g+8][q], a[2] = A[g][q+4], a[3] = A[g+8][q+4]   (A: 16 x 8, row m, col k)
//   b[0] = B[q][g], b[1] = B[q+4][g]                                        (B: 8 x 8, row k, col n)
//   d[0] = D[g][2q], d[1] = D[g][2q+1], d[2] = D[g+8][2q], d[3] = D[g+8][2q+1]
__device__ __forceinline__ void mma_tf32_16x8x8(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
#if __CUDA_ARCH__ >= 800
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    __trap();  // the launcher offers the TF32 version only on sm_80 and newer
#endif
}

// The address of a device array that the host wrote into device memory: `slot` holds it as an
// int64 (0 for none), and the array has n elements of T (const T for one the kernel only reads).
// A multi-tensor kernel (optim.cu) finds its arrays through such a table. A plain load on the GPU;
// the emulator's model checks that the n elements lie inside one device array whose address the
// host took, and lets the kernel touch exactly those bytes (stores only through a non-const T).
template <typename T>
__device__ __forceinline__ T* table_pointer(const int64* slot, int64 n) {
    return reinterpret_cast<T*>(*slot);
}

#endif  // MINUNET_EMULATED_PTX

// ---- 16-byte loads and stores ---------------------------------------------------------------

// r[0..4) = p[0..4): one 16-byte shared-memory load for float, two for double. p 16-byte aligned.
__device__ __forceinline__ void lds4(const float* p, float* r) {
    const float4 v = *reinterpret_cast<const float4*>(p);
    r[0] = v.x; r[1] = v.y; r[2] = v.z; r[3] = v.w;
}
__device__ __forceinline__ void lds4(const double* p, double* r) {
    const double2 v = reinterpret_cast<const double2*>(p)[0], w = reinterpret_cast<const double2*>(p)[1];
    r[0] = v.x; r[1] = v.y; r[2] = w.x; r[3] = w.y;
}

// 16 bytes (4 floats or 2 doubles) at once, from global or shared memory; p 16-byte aligned.
__device__ __forceinline__ void load16(const float* p, float* r) { lds4(p, r); }
__device__ __forceinline__ void load16(const double* p, double* r) {
    const double2 v = *reinterpret_cast<const double2*>(p);
    r[0] = v.x; r[1] = v.y;
}
__device__ __forceinline__ void store16(float* p, const float* r) {
    *reinterpret_cast<float4*>(p) = make_float4(r[0], r[1], r[2], r[3]);
}
__device__ __forceinline__ void store16(double* p, const double* r) {
    *reinterpret_cast<double2*>(p) = make_double2(r[0], r[1]);
}

// ---- tile shapes ----------------------------------------------------------------------------

template <int BM_, int BN_, int PAD_>
struct GemmShape {
    static constexpr int BM = BM_, BN = BN_;          // the block's tile of C
    static constexpr int BK = 8;                      // reduction step staged in shared memory
    static constexpr int THREADS = (BM / 8) * (BN / 8);  // 8 x 8 outputs per thread
    static constexpr int LDA = BM + PAD_, LDB = BN + PAD_;  // padded rows of the shared tiles
    static constexpr int A_TILE = BK * LDA, B_TILE = BK * LDB;
    static_assert(BM % 64 == 0 && BN % 64 == 0, "tiles are multiples of 64");
};

// The launch bounds of a kernel templated on <T, BM, BN>: (BM/8) * (BN/8) threads; the float ones
// ask for 512 resident threads per SM, which caps them at 128 registers, the double ones (128
// registers of accumulators alone) for one block.
#define TILED_BOUNDS __launch_bounds__((BM / 8) * (BN / 8), sizeof(T) == 4 ? 512 / ((BM / 8) * (BN / 8)) : 1)

// ---- compute policies: which outputs a thread owns, and one staged step ---------------------

// acc[i][j] += sum_kk A[r(i), kk] B[kk, c(j)] where the rows are r0 + [0,4) and r0 + rs + [0,4)
// and the columns c0 + [0,4) and c0 + cs + [0,4): 4 16-byte shared loads and 64 FMAs per kk.
template <class S, typename T>
__device__ __forceinline__ void fma_step(const T* As, const T* Bs, T (&acc)[8][8], int r0, int rs, int c0, int cs) {
#pragma unroll
    for (int kk = 0; kk < S::BK; ++kk) {
        T a[8], b[8];
        lds4(As + kk * S::LDA + r0, a);
        lds4(As + kk * S::LDA + r0 + rs, a + 4);
        lds4(Bs + kk * S::LDB + c0, b);
        lds4(Bs + kk * S::LDB + c0 + cs, b + 4);
#pragma unroll
        for (int i = 0; i < 8; ++i)
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[i][j] += a[i] * b[j];
    }
}

// v3: the threads as a (BM/8) x (BN/8) grid over the whole block tile; thread (tx, ty) owns rows
// 4ty + [0,4) and BM/2 + 4ty + [0,4), columns 4tx + [0,4) and BN/2 + 4tx + [0,4). A warp (2 rows
// of 16 threads) reads 2 distinct A addresses (broadcast) and 16 consecutive 16-byte B words.
template <class S>
struct BlockFma {
    int r0, c0;
    __device__ BlockFma() : r0(threadIdx.x / (S::BN / 8) * 4), c0(threadIdx.x % (S::BN / 8) * 4) {}
    __device__ int row(int i) const { return r0 + (i & 3) + (i >> 2) * (S::BM / 2); }
    __device__ int col(int j) const { return c0 + (j & 3) + (j >> 2) * (S::BN / 2); }
    template <typename T>
    __device__ void step(const T* As, const T* Bs, T (&acc)[8][8]) const {
        fma_step<S>(As, Bs, acc, r0, S::BM / 2, c0, S::BN / 2);
    }
};

// v4: warp tiling. The warps tile the block as (BM/64) x (BN/32), each warp a 64 x 32 piece; its
// lanes form an 8 x 4 grid, lane (ly, lx) owning rows 4ly + [0,4) and 32 + 4ly + [0,4) of the
// warp's 64, columns 4lx + [0,4) and 16 + 4lx + [0,4) of its 32. Per kk a warp reads 8 distinct
// 16-byte A words and 4 B words (one shared-memory wavefront each) instead of v3's 2 and 16
// (16 B words are two wavefronts): fewer wavefronts, and a warp touches a compact 64 x 32 piece.
template <class S>
struct WarpFma {
    int r0, c0;
    __device__ WarpFma() {
        const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
        r0 = warp / (S::BN / 32) * 64 + lane / 4 * 4;
        c0 = warp % (S::BN / 32) * 32 + lane % 4 * 4;
    }
    __device__ int row(int i) const { return r0 + (i & 3) + (i >> 2) * 32; }
    __device__ int col(int j) const { return c0 + (j & 3) + (j >> 2) * 16; }
    template <typename T>
    __device__ void step(const T* As, const T* Bs, T (&acc)[8][8]) const { fma_step<S>(As, Bs, acc, r0, 32, c0, 16); }
};

// v5: TF32 tensor cores. Warps tile the block as in WarpFma (64 x 32 each), as 4 x 4 mma tiles of
// 16 x 8; per kk-step of 8 a lane loads 16 A and 8 B values (rounded to TF32) in the fragment
// layout of mma_tf32_16x8x8 and issues 16 mma. acc[2 mt + h][2 nt + e] holds D[g + 8h][2q + e] of
// mma tile (mt, nt). The fragment loads read As[q][g] for the 32 lanes: bank (q * LDA + g) mod 32
// is conflict-free only if LDA = 8 mod 32, hence PAD = 8 for this policy.
template <class S>
struct WarpMma {
    int r0, c0, g, q;
    __device__ WarpMma() {
        const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
        r0 = warp / (S::BN / 32) * 64;
        c0 = warp % (S::BN / 32) * 32;
        g = lane / 4;
        q = lane % 4;
    }
    __device__ int row(int i) const { return r0 + (i >> 1) * 16 + g + (i & 1) * 8; }
    __device__ int col(int j) const { return c0 + (j >> 1) * 8 + 2 * q + (j & 1); }
    __device__ void step(const float* As, const float* Bs, float (&acc)[8][8]) const {
        static_assert(S::LDA % 32 == 8 && S::LDB % 32 == 8, "WarpMma needs PAD = 8");
        unsigned a[4][4], b[4][2];
#pragma unroll
        for (int mt = 0; mt < 4; ++mt) {
            const float* p = As + q * S::LDA + r0 + mt * 16 + g;
            a[mt][0] = to_tf32(p[0]);
            a[mt][1] = to_tf32(p[8]);
            a[mt][2] = to_tf32(p[4 * S::LDA]);
            a[mt][3] = to_tf32(p[4 * S::LDA + 8]);
        }
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
            const float* p = Bs + q * S::LDB + c0 + nt * 8 + g;
            b[nt][0] = to_tf32(p[0]);
            b[nt][1] = to_tf32(p[4 * S::LDB]);
        }
#pragma unroll
        for (int mt = 0; mt < 4; ++mt)
#pragma unroll
            for (int nt = 0; nt < 4; ++nt) {
                float d[4] = {acc[2 * mt][2 * nt], acc[2 * mt][2 * nt + 1], acc[2 * mt + 1][2 * nt],
                              acc[2 * mt + 1][2 * nt + 1]};
                mma_tf32_16x8x8(d, a[mt], b[nt]);
                acc[2 * mt][2 * nt] = d[0];
                acc[2 * mt][2 * nt + 1] = d[1];
                acc[2 * mt + 1][2 * nt] = d[2];
                acc[2 * mt + 1][2 * nt + 1] = d[3];
            }
    }
};

// ---- pipelines: how the steps are staged ----------------------------------------------------

// v3: two shared buffers and one register stage. While the block multiplies step s out of one
// buffer, each thread's loads for step s+1 are in flight into registers; they are stored into the
// other buffer after the multiply, and one barrier per step separates the two.
struct RegisterStaged {
    template <class S, typename T, class LA, class LB, class Compute>
    static __device__ __forceinline__ void run(LA& la, LB& lb, int steps, T (&acc)[8][8], const Compute& compute) {
        __shared__ __align__(16) T As[2][S::A_TILE];
        __shared__ __align__(16) T Bs[2][S::B_TILE];
        T ra[LA::REGS], rb[LB::REGS];
        if (steps > 0) {
            la.fetch(ra);
            lb.fetch(rb);
            la.store(As[0], ra);
            lb.store(Bs[0], rb);
        }
        __syncthreads();
        for (int s = 0; s < steps; ++s) {
            const int cur = s & 1;
            const bool more = s + 1 < steps;
            if (more) {
                la.advance();
                lb.advance();
                la.fetch(ra);
                lb.fetch(rb);
            }
            compute.step(As[cur], Bs[cur], acc);
            if (more) {
                la.store(As[cur ^ 1], ra);
                lb.store(Bs[cur ^ 1], rb);
            }
            __syncthreads();
        }
    }
};

// v4, v5: STAGES shared buffers filled by async copies, STAGES - 1 steps ahead of the multiply.
// Iteration s waits for its own copies (at most STAGES - 2 newer groups may stay in flight), then
// a barrier makes every thread's copies visible and guarantees that everyone has finished step
// s - 1, whose buffer the copies for step s + STAGES - 1 then overwrite. Every iteration commits a
// group, empty ones past the end, so the count that async_wait relies on stays uniform.
template <int STAGES>
struct AsyncStaged {
    static_assert(STAGES >= 2, "at least double buffering");
    template <class S, typename T, class LA, class LB, class Compute>
    static __device__ __forceinline__ void run(LA& la, LB& lb, int steps, T (&acc)[8][8], const Compute& compute) {
        __shared__ __align__(16) T As[STAGES][S::A_TILE];
        __shared__ __align__(16) T Bs[STAGES][S::B_TILE];
#pragma unroll
        for (int s = 0; s < STAGES - 1; ++s) {
            if (s < steps) {
                la.copy_async(As[s]);
                lb.copy_async(Bs[s]);
                la.advance();
                lb.advance();
            }
            async_commit();
        }
        for (int s = 0; s < steps; ++s) {
            async_wait<STAGES - 2>();
            __syncthreads();
            const int next = s + STAGES - 1;
            if (next < steps) {
                la.copy_async(As[next % STAGES]);
                lb.copy_async(Bs[next % STAGES]);
                la.advance();
                lb.advance();
            }
            async_commit();
            compute.step(As[s % STAGES], Bs[s % STAGES], acc);
        }
    }
};

// Shared memory per block: AsyncStaged<4> with 128 x 128 float tiles is 4 x 8 x 264 x 4 B = 33 KB
// (static shared memory stops at 48 KB), so double runs with 2 stages.
template <typename T>
struct Stages {
    static constexpr int value = sizeof(T) == 4 ? 4 : 2;
};

// C[m0.., n0..] of this block = the sum over `steps` staged steps; acc starts at zero.
template <class S, class Pipeline, typename T, class LA, class LB, class Compute>
__device__ __forceinline__ void register_tiled_gemm(LA& la, LB& lb, int steps, T (&acc)[8][8], const Compute& compute) {
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = T(0);
    Pipeline::template run<S>(la, lb, steps, acc, compute);
}
