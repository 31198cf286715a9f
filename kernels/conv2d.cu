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

The kernels (every one a `template <typename T>`, instantiated for float and double)
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
