/* conv2d.cu: 2-D convolution (cross-correlation, as in PyTorch) and its two gradients.

What it computes
----------------
    forward          y[n,k,i,j] = b[k] + sum_{c,u,v} x[n,c, i*sh-ph+u, j*sw-pw+v] * w[k,c,u,v]
    backward_input   gx[n,c,h,w] = sum_{k,u,v} gy[n,k,i,j] * w[k,c,u,v]
                         over the (i, j) with i*sh-ph+u = h and j*sw-pw+v = w
    backward_weight  gw[k,c,u,v] = sum_{n,i,j} gy[n,k,i,j] * x[n,c, i*sh-ph+u, j*sw-pw+v]
Positions outside the input are skipped, which is what zero padding means. Ho = (H + 2ph -
kh) / sh + 1 and Wo likewise (the launcher computes them). The bias gradient is
bias_backward in activation.cu.

Memory layout
-------------
NCHW, C-contiguous: x (N,C,H,W), w (K,C,kh,kw), y and gy (N,K,Ho,Wo), all of one dtype T
(float or double). Flat tensor offsets are int64 (a tensor may pass 2^31 elements); the GEMM
dimensions (N*Ho*Wo output pixels, C*kh*kw) are int, which the launcher checks.

The kernels (every one a `template <typename T>`, instantiated for float and double; v3 and up
also take the block tile, `<T, BM, BN>`, one instantiation per entry of cuda.TILES)
------------------------------------------------------------------------------------
_v1: naive, one thread per output element, a transcription of the formula above; grid-stride
     loops over int64 indices, so any size works. Obviously right, and slow: backward_weight
     in particular gives each thread a serial sum over N*Ho*Wo terms.

_v2: shared-memory tiled implicit GEMM (see common.cuh for the 64 x 64 x 16 tile, the 256
     threads and their 4 x 4 register tiles). The three passes are three matrix products,
     with p = (n, i, j) an output pixel and r = (c, u, v) a kernel tap:
         forward          y[k, p]  = sum_r  w[k, r]  * col[r, p]      (M=K,  N=N*Ho*Wo, red=C*kh*kw)
         backward_input   gx[c, q] = sum_r' w'[c, r'] * gcol[r', q]   (M=C,  N=N*H*W,   red=K*kh*kw)
         backward_weight  gw[k, r] = sum_p  gy[k, p] * col[r, p]      (M=K,  N=C*kh*kw, red=N*Ho*Wo)
     where col[r, p] = x[n, c, i*sh-ph+u, j*sw-pw+v] is the im2col matrix (0 in the padding),
     q = (n, h, w) an input pixel, r' = (k, u, v), w'[c, r'] = w[k, c, u, v], and gcol[r', q] =
     gy[n, k, i, j] where (i, j) is the output pixel whose tap (u, v) lands on (h, w) (0 if
     none). Nothing is materialised: each thread computes the tensor offsets of the elements
     it stages. A thread that loads B always loads the same column of the tile, so it decodes
     its pixel (n, i, j) once, outside the reduction loop.
     backward_weight reduces over all N*Ho*Wo pixels but has few outputs (K x C*kh*kw), so it
     splits that reduction over blockIdx.z ("split-K"): block z sums pixels
     [z*chunk, (z+1)*chunk) and writes its partial gw to slice z of a workspace, which the
     launcher sums. backward_input takes an optional per-channel bias b (nullptr for conv2d's
     own gradient): conv_transpose2d_forward is this very computation and reuses the kernel.

     What bounds it on an H200 (132 SMs, 128 FP32 lanes each at ~1.98 GHz: 67 TFLOP/s): per kk a
     thread issues 8 four-byte shared loads for 16 FMAs, so at most 2/3 of the issue slots do
     arithmetic, and a warp's 8 loads are 8 shared-memory wavefronts against 16 FMA instructions:
     an SM issues 4 FMA instructions per clock but serves 1 wavefront, so v2 is bound by shared
     memory at about half the FP32 peak before any index arithmetic or latency is paid.

_v3: register tiling (the engine at the end of common.cuh). Blocks of 128 x 128 (or 128 x 64,
     64 x 128: `_gemm_tile` in minunet/cuda.py picks one per layer) with 256 (128) threads of
     8 x 8 outputs each, reduction steps of 8. Per kk a thread now loads 4 sixteen-byte values (8
     of A, 8 of B) for 64 FMAs: 94% of the issue slots are FMAs, and a warp's loads are 6
     wavefronts against 64 FMA instructions (4 warps: 24 of the 64 wavefronts an SM serves
     while its 4 schedulers issue those FMAs). Each step
     stages 8 KB for 262 kFLOP, 32 FLOP per byte from L2. What else changed:
       - the reduction runs tap by tap, r = (u, v, c) (PyTorch's weight order is (c, u, v)), so a
         step is "channels c0..c0+7 at tap (u, v)": no index needs a division inside the loop,
         and one bounds check per step and pixel serves all of a thread's loads. A channel count
         that is not a multiple of 8 leaves part of each tap's last step zero (the 3-channel
         first layer does 72 reduction slots for 27 terms; it is ~1% of a U-Net's work).
       - the launcher re-lays the weights tap-major, (kh, kw, C, K) for the forward, (kh, kw, K,
         C) for backward_input (a copy of K*C*kh*kw elements: 9 MB, about 4 us of HBM, for the
         largest U-Net layer, against its ~0.3 ms), so a weight tile row is contiguous: one
         16-byte load and one 16-byte shared store per thread and step when K (resp. C) is a
         multiple of 4. The other operands gather an image through the taps, at addresses that
         are 16-byte aligned for one tap in four: they stay 4-byte loads, coalesced along pixels.
       - one register stage: the loads of step s+1 are issued before step s is multiplied and
         stored after it, into the second of two shared buffers (one barrier per step).
     Registers: 64 accumulators, 16 operands, 8 staged loads and the loaders' pixel or tap state
     want 130-155 registers; the float kernels are capped at 128 (two 256-thread blocks per SM,
     16 warps) and spill 12-80 bytes of loop-invariant loader state to L1 (the compile test
     prints the figures); float64 (128 registers of accumulators) runs one block per SM.
     Expected: the compute-bound layers (64+ channels, 3x3) at 50-70% of the FP32 peak, 2x or
     more over v2; to be measured (benchmarks/bench_gpu.py times every version).

_v4: v3 with warp tiling and asynchronous copies. (1) The 8 warps tile the block as 2 x 4
     pieces of 64 x 32, each warp's lanes as 8 x 4: per kk a warp reads 8 + 4 distinct sixteen-
     byte words (4 wavefronts) instead of 2 + 16 (6), and its accumulators cover a compact
     piece. (2) cp.async (async_copy in common.cuh) moves global data straight into shared
     memory without registers, 4 stages deep (3 steps in flight while one is multiplied; 33 KB of
     shared memory per float block, 2 stages for double under the 48 KB static limit): the 8
     staging registers and their load latency leave the loop, and a slow load stalls the block
     only when it is 3 steps late. Expected: 5-15% over v3 where v3 is latency-bound (small
     grids, 1 block per SM), little where it is FMA-bound.

_v5: v4 on the TF32 tensor cores, float only (cuda.py runs v4 for float64). The staged tiles
     are the same; each warp's 64 x 32 piece is 4 x 4 mma.sync.m16n8k8 tiles (mma_tf32_16x8x8 in
     common.cuh), their fragments read from shared memory and rounded to TF32 (to_tf32) per step:
     per kk-step of 8 a lane does 24 four-byte shared loads and 16 MMAs of 2048 FLOPs each. Rows
     are padded by 8 so the fragment loads hit 32 distinct banks. TF32 keeps 10 of float32's 23
     mantissa bits: each product carries up to 2^-10 relative error, summed in float32 (tests
     check each output against that bound). On an H200 the dense TF32 peak is ~495 TFLOP/s, but
     only through wgmma (sm_90's asynchronous warpgroup MMA); mma.sync, which sm_80 and sm_90
     share, reaches perhaps half of it, and here the implicit-GEMM gathers, the fragment loads and
     the 8-deep reduction step will bind first: expected 2-4x v4 on the large 3x3 layers.

Fusion (v3, v4, v5; cuda.py composes the same results from separate passes for v1 and v2):
     forward takes `relu` and applies max(y, 0) in its epilogue; backward_input and
     backward_weight take `relu_y` (the output of that fused ReLU, or nullptr) and load gy as
     (relu_y > 0 ? gy : 0), so the ReLU's backward never runs as a pass of its own (such loads
     need a comparison, so they go in by plain loads, not async copies); backward_weight with
     `bias` appends a column of ones to B, so that column R of its product is sum_p gy[k, p],
     the bias gradient (one more column of 577 for a 64-channel 3x3 layer). Together they save
     a U-Net 3x3 layer three passes over its activations: the ReLU (read + write), the ReLU's
     backward (2 reads + 1 write) and the bias gradient (1 read).

Weight gradients (backward_weight v3/v4/v5) keep v2's split-K: block z reduces its chunk of
pixels into slice z of a workspace that the launcher sums in a fixed order (deterministic). Its
operands are both loaded along the pixels, which a thread shares between its A and B loads.
*/

// ---------------------------------------------------------------------------------- _v1

template <typename T>
__global__ void conv2d_forward_v1(const T* __restrict__ x, const T* __restrict__ w,
                                  const T* __restrict__ b, T* __restrict__ y,
                                  int N, int C, int H, int W, int K, int kh, int kw,
                                  int sh, int sw, int ph, int pw, int Ho, int Wo) {
    const int64 total = (int64)N * K * Ho * Wo;
    for (int64 idx = thread_index(); idx < total; idx += thread_count()) {
        const int j = (int)(idx % Wo);
        const int i = (int)((idx / Wo) % Ho);
        const int k = (int)((idx / ((int64)Wo * Ho)) % K);
        const int n = (int)(idx / ((int64)Wo * Ho * K));
        T acc = b ? b[k] : T(0);
        for (int c = 0; c < C; ++c) {
            const T* xc = x + ((int64)n * C + c) * H * W;
            const T* wc = w + ((int64)k * C + c) * kh * kw;
            for (int u = 0; u < kh; ++u) {
                const int h = i * sh - ph + u;
                if (h < 0 || h >= H) continue;
                for (int v = 0; v < kw; ++v) {
                    const int ww = j * sw - pw + v;
                    if (ww < 0 || ww >= W) continue;
                    acc += xc[(int64)h * W + ww] * wc[u * kw + v];
                }
            }
        }
        y[idx] = acc;
    }
}

template <typename T>
__global__ void conv2d_backward_input_v1(const T* __restrict__ gy, const T* __restrict__ w,
                                         const T* __restrict__ b, T* __restrict__ gx,
                                         int N, int C, int H, int W, int K, int kh, int kw,
                                         int sh, int sw, int ph, int pw, int Ho, int Wo) {
    const int64 total = (int64)N * C * H * W;
    for (int64 idx = thread_index(); idx < total; idx += thread_count()) {
        const int ww = (int)(idx % W);
        const int h = (int)((idx / W) % H);
        const int c = (int)((idx / ((int64)W * H)) % C);
        const int n = (int)(idx / ((int64)W * H * C));
        T acc = b ? b[c] : T(0);
        for (int u = 0; u < kh; ++u) {
            const int ti = h + ph - u;  // = i * sh for the output row i whose tap u lands on h
            if (ti < 0 || ti % sh != 0 || ti / sh >= Ho) continue;
            const int i = ti / sh;
            for (int v = 0; v < kw; ++v) {
                const int tj = ww + pw - v;
                if (tj < 0 || tj % sw != 0 || tj / sw >= Wo) continue;
                const int j = tj / sw;
                for (int k = 0; k < K; ++k)
                    acc += gy[(((int64)n * K + k) * Ho + i) * Wo + j] * w[(((int64)k * C + c) * kh + u) * kw + v];
            }
        }
        gx[idx] = acc;
    }
}

template <typename T>
__global__ void conv2d_backward_weight_v1(const T* __restrict__ x, const T* __restrict__ gy,
                                          T* __restrict__ gw,
                                          int N, int C, int H, int W, int K, int kh, int kw,
                                          int sh, int sw, int ph, int pw, int Ho, int Wo) {
    const int64 total = (int64)K * C * kh * kw;
    for (int64 idx = thread_index(); idx < total; idx += thread_count()) {
        const int v = (int)(idx % kw);
        const int u = (int)((idx / kw) % kh);
        const int c = (int)((idx / ((int64)kw * kh)) % C);
        const int k = (int)(idx / ((int64)kw * kh * C));
        T acc = T(0);
        for (int n = 0; n < N; ++n) {
            const T* xc = x + ((int64)n * C + c) * H * W;
            const T* gyk = gy + ((int64)n * K + k) * Ho * Wo;
            for (int i = 0; i < Ho; ++i) {
                const int h = i * sh - ph + u;
                if (h < 0 || h >= H) continue;
                for (int j = 0; j < Wo; ++j) {
                    const int ww = j * sw - pw + v;
                    if (ww < 0 || ww >= W) continue;
                    acc += gyk[(int64)i * Wo + j] * xc[(int64)h * W + ww];
                }
            }
        }
        gw[idx] = acc;
    }
}

// ---------------------------------------------------------------------------------- _v2
// Each kernel brings its loader (which thread stages which element of A and B) and its store
// (where C[m, n] goes) as lambdas; the loop and the epilogue are common.cuh's.

template <typename T>
__global__ void __launch_bounds__(GEMM_THREADS)
conv2d_forward_v2(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ b,
                  T* __restrict__ y, int N, int C, int H, int W, int K, int kh, int kw,
                  int sh, int sw, int ph, int pw, int Ho, int Wo) {
    // y[k, p] = sum_r w[k, r] * col[r, p]; this block: k in [m0, m0+64), p in [p0, p0+64)
    // As[kk][m] = w[m0 + m, r0 + kk], Bs[kk][q] = col[r0 + kk, p0 + q]
    const int khw = kh * kw, R = C * khw, HoWo = Ho * Wo, P = N * HoWo;
    const int m0 = blockIdx.y * GEMM_TILE_M, p0 = blockIdx.x * GEMM_TILE_N;
    const int t = threadIdx.x;

    const int b_q = t % GEMM_TILE_N, b_k = t / GEMM_TILE_N;  // col: along the pixels
    const int p = p0 + b_q;
    const bool p_in = p < P;
    const Pixel out = p_in ? pixel_of(p, Wo, HoWo) : Pixel{0, 0, 0};  // this thread's output pixel
    const int h0 = out.i * sh - ph, w0 = out.j * sw - pw;  // the corner of its receptive field
    const T* xn = x + (int64)out.n * C * H * W;

    T acc[GEMM_MICRO][GEMM_MICRO] = {};
    gemm_main_loop(0, R, acc, [&](TileA<T>& As, TileB<T>& Bs, int r0) {
        stage_dense_a(As, w, m0, K, r0, R);  // w as K rows of R taps
#pragma unroll
        for (int s = 0; s < GEMM_LOADS; ++s) {
            const int kk = b_k + ALONG_PIX_ROWS * s, r = r0 + kk;
            T val = T(0);
            if (p_in && r < R) {
                const int c = r / khw, u = (r - c * khw) / kw, v = r - c * khw - u * kw;
                const int h = h0 + u, ww = w0 + v;
                if (h >= 0 && h < H && ww >= 0 && ww < W) val = xn[((int64)c * H + h) * W + ww];
            }
            Bs[kk][b_q] = val;
        }
    });
    gemm_epilogue(acc, m0, p0, K, P, [&](int k, int q, T value) {
        const int nq = q / HoWo, ij = q - nq * HoWo;
        y[((int64)nq * K + k) * HoWo + ij] = value + (b ? b[k] : T(0));
    });
}

template <typename T>
__global__ void __launch_bounds__(GEMM_THREADS)
conv2d_backward_input_v2(const T* __restrict__ gy, const T* __restrict__ w, const T* __restrict__ b,
                         T* __restrict__ gx, int N, int C, int H, int W, int K, int kh, int kw,
                         int sh, int sw, int ph, int pw, int Ho, int Wo) {
    // gx[c, q] = b[c] + sum_r w'[c, r] * gcol[r, q], r = (k, u, v), q = (n, h, w);
    // this block: c in [m0, m0+64), q in [q0, q0+64)
    // As[kk][m] = w[k, m0 + m, u, v] with (k,u,v) = r0 + kk, Bs[kk][q] = gcol[r0 + kk, q0 + q]
    const int khw = kh * kw, R = K * khw, HW = H * W, Q = N * HW, HoWo = Ho * Wo;
    const int m0 = blockIdx.y * GEMM_TILE_M, q0 = blockIdx.x * GEMM_TILE_N;
    const int t = threadIdx.x;

    const int a_k = t % GEMM_TILE_K, a_m = t / GEMM_TILE_K;  // w: along the reduction
    const int b_q = t % GEMM_TILE_N, b_k = t / GEMM_TILE_N;  // gcol: along the pixels
    const int q = q0 + b_q;
    const bool q_in = q < Q;
    int n = 0, hp = 0, wp = 0;  // this thread's input pixel (h, w), shifted by the padding
    if (q_in) {
        n = q / HW;
        const int h = (q - n * HW) / W;
        hp = h + ph;
        wp = q - n * HW - h * W + pw;
    }
    const T* gyn = gy + (int64)n * K * HoWo;

    T acc[GEMM_MICRO][GEMM_MICRO] = {};
    gemm_main_loop(0, R, acc, [&](TileA<T>& As, TileB<T>& Bs, int r0) {
#pragma unroll
        for (int s = 0; s < GEMM_LOADS; ++s) {
            const int c = m0 + a_m + ALONG_RED_ROWS * s, r = r0 + a_k;
            T val = T(0);
            if (c < C && r < R) {
                const int k = r / khw;
                val = w[((int64)k * C + c) * khw + (r - k * khw)];
            }
            As[a_k][a_m + ALONG_RED_ROWS * s] = val;
        }
#pragma unroll
        for (int s = 0; s < GEMM_LOADS; ++s) {
            const int kk = b_k + ALONG_PIX_ROWS * s, r = r0 + kk;
            T val = T(0);
            if (q_in && r < R) {
                const int k = r / khw, u = (r - k * khw) / kw, v = r - k * khw - u * kw;
                const int ti = hp - u, tj = wp - v;  // = (i * sh, j * sw) if an output pixel hits (h, w)
                if (ti >= 0 && tj >= 0) {
                    const int i = ti / sh, j = tj / sw;
                    if (i * sh == ti && j * sw == tj && i < Ho && j < Wo)
                        val = gyn[(int64)k * HoWo + i * Wo + j];
                }
            }
            Bs[kk][b_q] = val;
        }
    });
    gemm_epilogue(acc, m0, q0, C, Q, [&](int c, int qq, T value) {
        const int nq = qq / HW, hw = qq - nq * HW;
        gx[((int64)nq * C + c) * HW + hw] = value + (b ? b[c] : T(0));
    });
}

template <typename T>
__global__ void __launch_bounds__(GEMM_THREADS)
conv2d_backward_weight_v2(const T* __restrict__ x, const T* __restrict__ gy, T* __restrict__ gw_parts,
                          int N, int C, int H, int W, int K, int kh, int kw,
                          int sh, int sw, int ph, int pw, int Ho, int Wo, int chunk) {
    // gw[k, r] = sum_p gy[k, p] * col[r, p] over this block's pixels p in [p_begin, p_end);
    // this block: k in [m0, m0+64), r in [r0, r0+64); writes slice blockIdx.z of gw_parts (Z, K, R)
    // As[kk][m] = gy[n, m0 + m, i, j] with (n,i,j) = pk + kk, Bs[kk][q] = col[r0 + q, pk + kk]
    const int khw = kh * kw, R = C * khw, HoWo = Ho * Wo, P = N * HoWo;
    const int m0 = blockIdx.y * GEMM_TILE_M, r0 = blockIdx.x * GEMM_TILE_N;
    const int p_begin = blockIdx.z * chunk, p_end = min(P, p_begin + chunk);
    const int t = threadIdx.x;

    // both tiles are loaded along the reduction: thread t takes pixel pk + t % 16 for rows t / 16 + 16 s
    const int l_k = t % GEMM_TILE_K, l_row = t / GEMM_TILE_K;
    int tap_c[GEMM_LOADS], tap_u[GEMM_LOADS], tap_v[GEMM_LOADS];  // this thread's taps r = (c, u, v)
#pragma unroll
    for (int s = 0; s < GEMM_LOADS; ++s) {
        const int r = r0 + l_row + ALONG_RED_ROWS * s, c = r / khw, uv = r - c * khw;
        tap_c[s] = r < R ? c : -1;  // -1: past the last column of gw
        tap_u[s] = uv / kw;
        tap_v[s] = uv - tap_u[s] * kw;
    }

    T acc[GEMM_MICRO][GEMM_MICRO] = {};
    gemm_main_loop(p_begin, p_end, acc, [&](TileA<T>& As, TileB<T>& Bs, int pk) {
        const int p = pk + l_k;
        const bool p_in = p < p_end;
        const Pixel px = p_in ? pixel_of(p, Wo, HoWo) : Pixel{0, 0, 0};
        const T* gyp = gy + (int64)px.n * K * HoWo + px.i * Wo + px.j;  // gy[n, 0, i, j]
        const T* xn = x + (int64)px.n * C * H * W;
        const int h0 = px.i * sh - ph, w0 = px.j * sw - pw;
#pragma unroll
        for (int s = 0; s < GEMM_LOADS; ++s) {
            const int k = m0 + l_row + ALONG_RED_ROWS * s;
            As[l_k][l_row + ALONG_RED_ROWS * s] = (p_in && k < K) ? gyp[(int64)k * HoWo] : T(0);
        }
#pragma unroll
        for (int s = 0; s < GEMM_LOADS; ++s) {
            T val = T(0);
            if (p_in && tap_c[s] >= 0) {
                const int h = h0 + tap_u[s], ww = w0 + tap_v[s];
                if (h >= 0 && h < H && ww >= 0 && ww < W) val = xn[((int64)tap_c[s] * H + h) * W + ww];
            }
            Bs[l_k][l_row + ALONG_RED_ROWS * s] = val;
        }
    });
    T* gw = gw_parts + (int64)blockIdx.z * K * R;
    gemm_epilogue(acc, m0, r0, K, R, [&](int k, int r, T value) { gw[(int64)k * R + r] = value; });
}

// ------------------------------------------------------------------ _v3, _v4, _v5: the operands
// Loaders for the register-tiled engine of common.cuh (its comment lists what a loader provides).
// Each thread stages the same tile positions at every step; what it precomputes once (its pixels
// or its taps) it keeps in registers, and out-of-range elements become zeros.
//
// Offsets inside x, y, gy and gx are 32-bit ints here (the launcher checks each of these tensors
// has fewer than 2^31 elements); a pixel outside the matrix gets a row index of -2^30, which no
// bounds check lets through.

#define OUTSIDE (-(1 << 30))

// The reduction position of forward and backward_input: tap (u, v), channels c0 .. c0+7. The
// reduction runs tap by tap (r = (u, v, c), not PyTorch's (c, u, v) order), so that a step needs no
// division, only three counters; when the channel count is not a multiple of 8 the last step of
// each tap is partly zero.
struct TapStep {
    int u = 0, v = 0, c0 = 0;
    __device__ void advance(int Cred, int kw) {
        c0 += 8;
        if (c0 >= Cred) {
            c0 = 0;
            if (++v == kw) {
                v = 0;
                ++u;
            }
        }
    }
};

// A of forward and backward_input: a[(u, v, c), m], the weights re-laid by the launcher as
// (kh, kw, Cred, M) (w.transpose(2, 3, 1, 0) for the forward, (2, 3, 0, 1) for backward_input), so
// a tile row is contiguous along m. When M is a multiple of VEC (16 bytes' worth of T), each
// thread moves whole 16-byte pieces: one global load and one shared store, or one 16-byte async
// copy; otherwise single elements. Either way a warp reads whole rows: coalesced.
template <typename T, class S>
struct WeightLoader {
    static constexpr int VEC = 16 / sizeof(T);
    static constexpr int REGS = S::BM * S::BK / S::THREADS;
    static_assert(REGS % VEC == 0, "whole 16-byte pieces per thread");
    const T* a;
    int M, Cred, kw, m0;
    bool vec;
    TapStep pos;
    __device__ WeightLoader(const T* a_, int M_, int Cred_, int kw_, int m0_)
        : a(a_), M(M_), Cred(Cred_), kw(kw_), m0(m0_), vec(M_ % VEC == 0) {}
    // element e of this thread's share: tile row kk, column m (piece e / VEC on the vector path)
    __device__ void place(int e, int& kk, int& m) const {
        const int i = threadIdx.x + S::THREADS * (vec ? e / VEC : e);
        kk = vec ? i / (S::BM / VEC) : i / S::BM;
        m = vec ? i % (S::BM / VEC) * VEC : i % S::BM;
    }
    __device__ const T* source(int kk, int m, bool& in) const {
        const int c = pos.c0 + kk;
        in = c < Cred && m0 + m < M;
        return a + ((int64)(pos.u * kw + pos.v) * Cred + c) * M + m0 + m;
    }
    __device__ void fetch(T (&r)[REGS]) const {
        int kk, m;
        bool in;
        if (vec) {
#pragma unroll
            for (int e = 0; e < REGS; e += VEC) {
                place(e, kk, m);
                const T* src = source(kk, m, in);
                if (in) load16(src, r + e);
                else
#pragma unroll
                    for (int i = 0; i < VEC; ++i) r[e + i] = T(0);
            }
        } else {
#pragma unroll
            for (int e = 0; e < REGS; ++e) {
                place(e, kk, m);
                const T* src = source(kk, m, in);
                r[e] = in ? *src : T(0);
            }
        }
    }
    __device__ void store(T* tile, const T (&r)[REGS]) const {
        int kk, m;
        if (vec) {
#pragma unroll
            for (int e = 0; e < REGS; e += VEC) {
                place(e, kk, m);
                store16(tile + kk * S::LDA + m, r + e);
            }
        } else {
#pragma unroll
            for (int e = 0; e < REGS; ++e) {
                place(e, kk, m);
                tile[kk * S::LDA + m] = r[e];
            }
        }
    }
    __device__ void copy_async(T* tile) const {
        int kk, m;
        bool in;
        if (vec) {
#pragma unroll
            for (int e = 0; e < REGS; e += VEC) {
                place(e, kk, m);
                const T* src = source(kk, m, in);
                T* dst = tile + kk * S::LDA + m;
                if (in) async_copy<16>(dst, src);
                else
#pragma unroll
                    for (int i = 0; i < VEC; ++i) dst[i] = T(0);
            }
        } else {
#pragma unroll
            for (int e = 0; e < REGS; ++e) {
                place(e, kk, m);
                const T* src = source(kk, m, in);
                T* dst = tile + kk * S::LDA + m;
                if (in) async_copy<sizeof(T)>(dst, src);
                else *dst = T(0);
            }
        }
    }
    __device__ void advance() { pos.advance(Cred, kw); }
};

// The B operands of forward and backward_input: BN pixel columns. Thread t owns column t % BN (one
// pixel, decoded once, so consecutive threads read consecutive pixels: coalesced for stride 1) and
// tile rows kk = t / BN + (THREADS / BN) e, i.e. REGS channels at each step's tap. Whether the tap
// lands inside the tensor depends only on the pixel and the tap, so one bounds check per step
// serves all REGS loads. `Gather` says what B[(u, v, c), pixel] is (at: the offset of channel 0
// of this step's tap at the thread's pixel, and whether it lies inside; load: the element at an
// offset, through the Gather's ReLU mask if it has one); this struct does the staging. With a mask
// an element needs a comparison on its way in, so copy_async loads and stores it plainly.
template <typename T, class S, class Gather>
struct PixelLoader {
    static constexpr int KSTEP = S::THREADS / S::BN;    // threads per tile column
    static constexpr int REGS = S::BK / KSTEP;           // = BN * BK / THREADS
    Gather g;
    int col, kk, Cred, kw;
    TapStep pos;
    __device__ PixelLoader(const Gather& g_, int Cred_, int kw_)
        : g(g_), col(threadIdx.x % S::BN), kk(threadIdx.x / S::BN), Cred(Cred_), kw(kw_) {}
    __device__ int slot(int e) const { return (kk + KSTEP * e) * S::LDB + col; }
    __device__ void fetch(T (&r)[REGS]) const {
        bool in;
        const int off = g.at(pos, in);
#pragma unroll
        for (int e = 0; e < REGS; ++e) {
            const int c = pos.c0 + kk + KSTEP * e;
            r[e] = in && c < Cred ? g.load(off + c * g.channel_stride) : T(0);
        }
    }
    __device__ void store(T* tile, const T (&r)[REGS]) const {
#pragma unroll
        for (int e = 0; e < REGS; ++e) tile[slot(e)] = r[e];
    }
    __device__ void copy_async(T* tile) const {
        bool in;
        const int off = g.at(pos, in);
#pragma unroll
        for (int e = 0; e < REGS; ++e) {
            const int c = pos.c0 + kk + KSTEP * e, o = off + c * g.channel_stride;
            if (!(in && c < Cred)) tile[slot(e)] = T(0);
            else if (g.mask) tile[slot(e)] = g.load(o);
            else async_copy<sizeof(T)>(tile + slot(e), g.base + o);
        }
    }
    __device__ void advance() { pos.advance(Cred, kw); }
};

// forward: B[(u, v, c), p] = x[n, c, i*sh - ph + u, j*sw - pw + v] for output pixel p = (n, i, j)
template <typename T>
struct Im2col {
    const T* base;
    const T* mask = nullptr;
    int H, W, channel_stride;
    int off, h0, w0;  // x[n, 0, h0, w0]: the corner of the pixel's receptive field
    __device__ Im2col(const T* x, int C, int H_, int W_, int sh, int sw, int ph, int pw, int Ho, int Wo, int P, int p)
        : base(x), H(H_), W(W_), channel_stride(H_ * W_) {
        if (p < P) {
            const int n = p / (Ho * Wo), ij = p - n * Ho * Wo, i = ij / Wo, j = ij - i * Wo;
            h0 = i * sh - ph;
            w0 = j * sw - pw;
            off = n * C * H * W + h0 * W + w0;
        } else {
            h0 = OUTSIDE;
            w0 = off = 0;
        }
    }
    __device__ int at(const TapStep& pos, bool& in) const {
        in = (unsigned)(h0 + pos.u) < (unsigned)H && (unsigned)(w0 + pos.v) < (unsigned)W;
        return off + pos.u * W + pos.v;
    }
    __device__ T load(int o) const { return base[o]; }
};

// backward_input: B[(u, v, k), q] = gy[n, k, i, j] for input pixel q = (n, h, w), where (i, j) is the
// output pixel whose tap (u, v) lands on (h, w): i*sh - ph + u = h, j*sw - pw + v = w (0 if none).
// With a ReLU mask (relu_y: the output y of the ReLU that followed this convolution) the element
// is gy where y > 0 and 0 elsewhere: the ReLU's backward fused into this load.
template <typename T>
struct Col2im {
    const T* base;
    const T* mask;
    int Ho, Wo, sh, sw, channel_stride;
    int off, hp, wp;  // gy[n, 0, 0, 0] and (h + ph, w + pw)
    __device__ Col2im(const T* gy, const T* relu_y, int K, int H, int W, int sh_, int sw_, int ph, int pw, int Ho_,
                      int Wo_, int Q, int q)
        : base(gy), mask(relu_y), Ho(Ho_), Wo(Wo_), sh(sh_), sw(sw_), channel_stride(Ho_ * Wo_) {
        if (q < Q) {
            const int n = q / (H * W), hw = q - n * H * W, h = hw / W;
            hp = h + ph;
            wp = hw - h * W + pw;
            off = n * K * Ho * Wo;
        } else {
            hp = OUTSIDE;
            wp = off = 0;
        }
    }
    __device__ int at(const TapStep& pos, bool& in) const {
        const int ti = hp - pos.u, tj = wp - pos.v;  // = (i*sh, j*sw) if an output pixel's tap lands here
        int i = ti, j = tj;
        if (sh == 1 && sw == 1) {
            in = (unsigned)i < (unsigned)Ho && (unsigned)j < (unsigned)Wo;
        } else {
            i = ti / sh;
            j = tj / sw;
            in = ti >= 0 && tj >= 0 && i * sh == ti && j * sw == tj && i < Ho && j < Wo;
        }
        return off + i * Wo + j;
    }
    __device__ T load(int o) const { return mask && !(mask[o] > T(0)) ? T(0) : base[o]; }
};

// The reduction position of backward_weight: the thread's pixel pk + kk, as (n, i, j), moved on by
// 8 pixels per step without a division (a step crosses a row end at most once when Wo >= 8).
struct PixelStep {
    int p, n, i, j;
    __device__ void start(int p_, int Ho, int Wo) {
        p = p_;
        n = p / (Ho * Wo);
        i = (p - n * Ho * Wo) / Wo;
        j = p - n * Ho * Wo - i * Wo;
    }
    __device__ void advance(int Ho, int Wo) {
        p += 8;
        j += 8;
        while (j >= Wo) {
            j -= Wo;
            if (++i == Ho) {
                i = 0;
                ++n;
            }
        }
    }
};

// A of backward_weight: A[k, p] = gy[n, k, i, j], BM rows k, loaded along the pixels p: thread t
// takes pixel pk + t % 8 of rows t / 8 + (THREADS / 8) e, so the 8 threads of a row read 8
// consecutive pixels (32 bytes). The pixel's position is shared with the B loader (TapLoader),
// which keeps the same pixel; this loader moves it. With a ReLU mask (relu_y, as in Col2im) an
// element is gy where y > 0, else 0, and goes in by a plain load and store. (No 16-byte loads
// here: a thread's pixel must be the B loader's, and 4 consecutive pixels per thread would save
// 3 loads per 512 FMAs.)
template <typename T, class S>
struct GyLoader {
    static constexpr int REGS = S::BM * S::BK / S::THREADS;
    const T* gy;
    const T* mask;
    int K, HoWo, Ho, Wo, p_end, m0;
    PixelStep pos;
    __device__ GyLoader(const T* gy_, const T* relu_y, int K_, int Ho_, int Wo_, int p_begin, int p_end_, int m0_)
        : gy(gy_), mask(relu_y), K(K_), HoWo(Ho_ * Wo_), Ho(Ho_), Wo(Wo_), p_end(p_end_), m0(m0_) {
        pos.start(p_begin + threadIdx.x % S::BK, Ho, Wo);
    }
    __device__ int row(int e) const { return (threadIdx.x + S::THREADS * e) / S::BK; }
    __device__ int slot(int e) const { return threadIdx.x % S::BK * S::LDA + row(e); }
    __device__ int offset(int e, bool& in) const {
        in = pos.p < p_end && m0 + row(e) < K;
        return (pos.n * K + m0 + row(e)) * HoWo + pos.i * Wo + pos.j;
    }
    __device__ T load(int o) const { return mask && !(mask[o] > T(0)) ? T(0) : gy[o]; }
    __device__ void fetch(T (&r)[REGS]) const {
#pragma unroll
        for (int e = 0; e < REGS; ++e) {
            bool in;
            const int o = offset(e, in);
            r[e] = in ? load(o) : T(0);
        }
    }
    __device__ void store(T* tile, const T (&r)[REGS]) const {
#pragma unroll
        for (int e = 0; e < REGS; ++e) tile[slot(e)] = r[e];
    }
    __device__ void copy_async(T* tile) const {
#pragma unroll
        for (int e = 0; e < REGS; ++e) {
            bool in;
            const int o = offset(e, in);
            if (!in) tile[slot(e)] = T(0);
            else if (mask) tile[slot(e)] = load(o);
            else async_copy<sizeof(T)>(tile + slot(e), gy + o);
        }
    }
    __device__ void advance() { pos.advance(Ho, Wo); }
};

// B of backward_weight: B[p, r] = x[n, c, i*sh - ph + u, j*sw - pw + v] for tap column r = (c, u, v),
// BN columns, loaded along the pixels (the 8 threads of a column read consecutive pixels). The
// pixel is the A loader's (`pos`, which that loader moves); a thread's REGS taps are decoded once,
// in the constructor, into two registers each: the offset c*H*W + u*W + v (-1 for a column past
// the end of gw), and (u, v) packed as u * 2^16 + v (kernels are smaller than 2^15 taps a side).
// With `bias`, column R (one past the taps) is all ones (-2), so that the GEMM's column R is
// sum_p gy[k, p] = the bias gradient, at the price of one column more.
template <typename T, class S>
struct TapLoader {
    static constexpr int REGS = S::BN * S::BK / S::THREADS;
    const T* x;
    const PixelStep* pos;
    int C, H, W, sh, sw, ph, pw, p_end;
    int coff[REGS], tuv[REGS];
    __device__ TapLoader(const T* x_, const PixelStep* pos_, int C_, int H_, int W_, int kh, int kw, int sh_,
                         int sw_, int ph_, int pw_, int p_end_, int r0, int bias)
        : x(x_), pos(pos_), C(C_), H(H_), W(W_), sh(sh_), sw(sw_), ph(ph_), pw(pw_), p_end(p_end_) {
        const int khw = kh * kw;
#pragma unroll
        for (int e = 0; e < REGS; ++e) {
            const int r = r0 + (threadIdx.x + S::THREADS * e) / S::BK;
            if (r < C * khw) {
                const int c = r / khw, uv = r - c * khw, u = uv / kw, v = uv - u * kw;
                tuv[e] = u << 16 | v;
                coff[e] = (c * H + u) * W + v;
            } else {
                tuv[e] = 0;
                coff[e] = bias && r == C * khw ? -2 : -1;  // the bias column, or past the end: never loaded
            }
        }
    }
    __device__ int slot(int e) const { return threadIdx.x % S::BK * S::LDB + (threadIdx.x + S::THREADS * e) / S::BK; }
    __device__ const T* source(int e, bool& in) const {
        const int h0 = pos->i * sh - ph, w0 = pos->j * sw - pw;
        const int h = h0 + (tuv[e] >> 16), w = w0 + (tuv[e] & 0xffff);
        in = pos->p < p_end && coff[e] >= 0 && (unsigned)h < (unsigned)H && (unsigned)w < (unsigned)W;
        return x + (pos->n * C * H * W + h0 * W + w0 + coff[e]);
    }
    __device__ T ones(int e) const { return coff[e] == -2 && pos->p < p_end ? T(1) : T(0); }
    __device__ void fetch(T (&r)[REGS]) const {
#pragma unroll
        for (int e = 0; e < REGS; ++e) {
            bool in;
            const T* src = source(e, in);
            r[e] = in ? *src : ones(e);
        }
    }
    __device__ void store(T* tile, const T (&r)[REGS]) const {
#pragma unroll
        for (int e = 0; e < REGS; ++e) tile[slot(e)] = r[e];
    }
    __device__ void copy_async(T* tile) const {
#pragma unroll
        for (int e = 0; e < REGS; ++e) {
            bool in;
            const T* src = source(e, in);
            if (in) async_copy<sizeof(T)>(tile + slot(e), src);
            else tile[slot(e)] = ones(e);
        }
    }
    __device__ void advance() {}  // the A loader moves the shared pixel
};

// ------------------------------------------------------------------ _v3, _v4, _v5: the kernels
// One body per pass, templated on the engine's parts; the numbered kernels below pick them.

// The epilogue of the forward and backward-input GEMMs: the thread's 8x8 accumulators, rows
// m (output channels) by columns q (pixels of the whole batch, q = n * HW + hw), plus the bias
// of their row, max(., 0) with relu, stored to the NCHW tensor out[(n * M + m) * HW + hw].
// Rows past M and columns past Q (the last block's overhang) are not stored.
template <typename T, class Compute>
__device__ __forceinline__ void store_nchw_tile(T (&acc)[8][8], const Compute& compute,
                                                const T* __restrict__ b, T* __restrict__ out,
                                                int m0, int M, int q0, int Q, int HW, int relu) {
    T bias[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const int m = m0 + compute.row(i);
        bias[i] = b && m < M ? b[m] : T(0);
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        const int q = q0 + compute.col(j);
        if (q >= Q) continue;
        const int n = q / HW, hw = q - n * HW;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const int m = m0 + compute.row(i);
            const T v = acc[i][j] + bias[i];
            if (m < M) out[(n * M + m) * HW + hw] = relu && v < T(0) ? T(0) : v;
        }
    }
}

template <typename T, class S, class Pipeline, class Compute>
__device__ __forceinline__ void conv2d_forward_tiled(const T* __restrict__ x, const T* __restrict__ wt,
                                                     const T* __restrict__ b, T* __restrict__ y,
                                                     int N, int C, int H, int W, int K, int kh, int kw,
                                                     int sh, int sw, int ph, int pw, int Ho, int Wo, int relu) {
    // y[k, p] = b[k] + sum_(u,v,c) wt[u, v, c, k] * col[(u,v,c), p], then max(y, 0) if relu;
    // this block: k in [m0, m0+BM), p in [p0, p0+BN)
    const int HoWo = Ho * Wo, P = N * HoWo;
    const int m0 = blockIdx.y * S::BM, p0 = blockIdx.x * S::BN;
    WeightLoader<T, S> la(wt, K, C, kw, m0);
    PixelLoader<T, S, Im2col<T>> lb(Im2col<T>(x, C, H, W, sh, sw, ph, pw, Ho, Wo, P, p0 + threadIdx.x % S::BN), C, kw);
    const Compute compute;
    T acc[8][8];
    register_tiled_gemm<S, Pipeline>(la, lb, kh * kw * ((C + 7) / 8), acc, compute);
    store_nchw_tile(acc, compute, b, y, m0, K, p0, P, HoWo, relu);
}

template <typename T, class S, class Pipeline, class Compute>
__device__ __forceinline__ void conv2d_backward_input_tiled(const T* __restrict__ gy, const T* __restrict__ wt,
                                                            const T* __restrict__ b, T* __restrict__ gx,
                                                            int N, int C, int H, int W, int K, int kh, int kw,
                                                            int sh, int sw, int ph, int pw, int Ho, int Wo,
                                                            const T* __restrict__ relu_y) {
    // gx[c, q] = b[c] + sum_(u,v,k) wt[u, v, k, c] * gcol[(u,v,k), q], gy masked by relu_y > 0 if
    // given; this block: c in [m0, m0+BM), q in [q0, q0+BN)
    const int HW = H * W, Q = N * HW;
    const int m0 = blockIdx.y * S::BM, q0 = blockIdx.x * S::BN;
    WeightLoader<T, S> la(wt, C, K, kw, m0);
    PixelLoader<T, S, Col2im<T>> lb(Col2im<T>(gy, relu_y, K, H, W, sh, sw, ph, pw, Ho, Wo, Q, q0 + threadIdx.x % S::BN),
                                    K, kw);
    const Compute compute;
    T acc[8][8];
    register_tiled_gemm<S, Pipeline>(la, lb, kh * kw * ((K + 7) / 8), acc, compute);
    store_nchw_tile(acc, compute, b, gx, m0, C, q0, Q, HW, 0);
}

template <typename T, class S, class Pipeline, class Compute>
__device__ __forceinline__ void conv2d_backward_weight_tiled(const T* __restrict__ x, const T* __restrict__ gy,
                                                             T* __restrict__ gw_parts,
                                                             int N, int C, int H, int W, int K, int kh, int kw,
                                                             int sh, int sw, int ph, int pw, int Ho, int Wo,
                                                             int chunk, const T* __restrict__ relu_y, int bias) {
    // gw[k, r] = sum_p gy[k, p] * col[r, p] over this block's pixels [p_begin, p_end), gy masked by
    // relu_y > 0 if given, and with `bias` gw[k, R] = sum_p gy[k, p] (the bias gradient) as one
    // column more; this block: k in [m0, m0+BM), r in [r0, r0+BN); writes slice blockIdx.z of
    // gw_parts (Z, K, R + bias)
    const int R = C * kh * kw, RB = R + (bias ? 1 : 0), P = N * Ho * Wo;
    const int m0 = blockIdx.y * S::BM, r0 = blockIdx.x * S::BN;
    const int p_begin = blockIdx.z * chunk, p_end = min(P, p_begin + chunk);
    GyLoader<T, S> la(gy, relu_y, K, Ho, Wo, p_begin, p_end, m0);
    TapLoader<T, S> lb(x, &la.pos, C, H, W, kh, kw, sh, sw, ph, pw, p_end, r0, bias);
    const Compute compute;
    T acc[8][8];
    register_tiled_gemm<S, Pipeline>(la, lb, (p_end - p_begin + 7) / 8, acc, compute);
    T* gw = gw_parts + (int64)blockIdx.z * K * RB;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const int k = m0 + compute.row(i);
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const int r = r0 + compute.col(j);
            if (k < K && r < RB) gw[(int64)k * RB + r] = acc[i][j];
        }
    }
}

// The numbered kernels: one per pass, version and block tile (BM, BN), launched with
// (BM/8) * (BN/8) threads (TILED_BOUNDS in common.cuh).
#define CONV_ARGS int N, int C, int H, int W, int K, int kh, int kw, int sh, int sw, int ph, int pw, int Ho, int Wo
#define CONV_PASS N, C, H, W, K, kh, kw, sh, sw, ph, pw, Ho, Wo

template <typename T, int BM, int BN>
__global__ void TILED_BOUNDS conv2d_forward_v3(const T* __restrict__ x, const T* __restrict__ wt,
                                               const T* __restrict__ b, T* __restrict__ y, CONV_ARGS,
                                               int relu) {
    using S = GemmShape<BM, BN, 4>;
    conv2d_forward_tiled<T, S, RegisterStaged, BlockFma<S>>(x, wt, b, y, CONV_PASS, relu);
}

template <typename T, int BM, int BN>
__global__ void TILED_BOUNDS conv2d_forward_v4(const T* __restrict__ x, const T* __restrict__ wt,
                                               const T* __restrict__ b, T* __restrict__ y, CONV_ARGS,
                                               int relu) {
    using S = GemmShape<BM, BN, 4>;
    conv2d_forward_tiled<T, S, AsyncStaged<Stages<T>::value>, WarpFma<S>>(x, wt, b, y, CONV_PASS, relu);
}

template <typename T, int BM, int BN>
__global__ void TILED_BOUNDS conv2d_backward_input_v3(const T* __restrict__ gy, const T* __restrict__ wt,
                                                      const T* __restrict__ b, T* __restrict__ gx, CONV_ARGS,
                                                      const T* __restrict__ relu_y) {
    using S = GemmShape<BM, BN, 4>;
    conv2d_backward_input_tiled<T, S, RegisterStaged, BlockFma<S>>(gy, wt, b, gx, CONV_PASS, relu_y);
}

template <typename T, int BM, int BN>
__global__ void TILED_BOUNDS conv2d_backward_input_v4(const T* __restrict__ gy, const T* __restrict__ wt,
                                                      const T* __restrict__ b, T* __restrict__ gx, CONV_ARGS,
                                                      const T* __restrict__ relu_y) {
    using S = GemmShape<BM, BN, 4>;
    conv2d_backward_input_tiled<T, S, AsyncStaged<Stages<T>::value>, WarpFma<S>>(gy, wt, b, gx, CONV_PASS, relu_y);
}

template <typename T, int BM, int BN>
__global__ void TILED_BOUNDS conv2d_backward_weight_v3(const T* __restrict__ x, const T* __restrict__ gy,
                                                       T* __restrict__ gw_parts, CONV_ARGS, int chunk,
                                                       const T* __restrict__ relu_y, int bias) {
    using S = GemmShape<BM, BN, 4>;
    conv2d_backward_weight_tiled<T, S, RegisterStaged, BlockFma<S>>(x, gy, gw_parts, CONV_PASS, chunk, relu_y, bias);
}

template <typename T, int BM, int BN>
__global__ void TILED_BOUNDS conv2d_backward_weight_v4(const T* __restrict__ x, const T* __restrict__ gy,
                                                       T* __restrict__ gw_parts, CONV_ARGS, int chunk,
                                                       const T* __restrict__ relu_y, int bias) {
    using S = GemmShape<BM, BN, 4>;
    conv2d_backward_weight_tiled<T, S, AsyncStaged<Stages<T>::value>, WarpFma<S>>(x, gy, gw_parts, CONV_PASS, chunk,
                                                                                  relu_y, bias);
}

// v5: TF32 tensor cores, float only (the launcher runs float64 on v4): v4's operands and pipeline,
// shared rows padded by 8 for the fragment loads, and WarpMma's 16 x 8 x 8 mma.sync per step.
template <typename T, int BM, int BN>
__global__ void TILED_BOUNDS conv2d_forward_v5(const T* __restrict__ x, const T* __restrict__ wt,
                                               const T* __restrict__ b, T* __restrict__ y, CONV_ARGS,
                                               int relu) {
    using S = GemmShape<BM, BN, 8>;
    conv2d_forward_tiled<T, S, AsyncStaged<Stages<T>::value>, WarpMma<S>>(x, wt, b, y, CONV_PASS, relu);
}

template <typename T, int BM, int BN>
__global__ void TILED_BOUNDS conv2d_backward_input_v5(const T* __restrict__ gy, const T* __restrict__ wt,
                                                      const T* __restrict__ b, T* __restrict__ gx, CONV_ARGS,
                                                      const T* __restrict__ relu_y) {
    using S = GemmShape<BM, BN, 8>;
    conv2d_backward_input_tiled<T, S, AsyncStaged<Stages<T>::value>, WarpMma<S>>(gy, wt, b, gx, CONV_PASS, relu_y);
}

template <typename T, int BM, int BN>
__global__ void TILED_BOUNDS conv2d_backward_weight_v5(const T* __restrict__ x, const T* __restrict__ gy,
                                                       T* __restrict__ gw_parts, CONV_ARGS, int chunk,
                                                       const T* __restrict__ relu_y, int bias) {
    using S = GemmShape<BM, BN, 8>;
    conv2d_backward_weight_tiled<T, S, AsyncStaged<Stages<T>::value>, WarpMma<S>>(x, gy, gw_parts, CONV_PASS, chunk,
                                                                                  relu_y, bias);
}
