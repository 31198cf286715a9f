/* conv_transpose2d.cu: transposed 2-D convolution (the adjoint of conv2d in x) and its gradients.

What it computes
----------------
Each input pixel scatters a weighted copy of the kernel into the output:
    forward          y[n, o, i*sh-ph+u, j*sw-pw+v] += x[n,c,i,j] * w[c,o,u,v]   (+ b[o] everywhere)
    backward_input   gx[n,c,i,j] = sum_{o,u,v} gy[n, o, i*sh-ph+u, j*sw-pw+v] * w[c,o,u,v]
    backward_weight  gw[c,o,u,v] = sum_{n,i,j} x[n,c,i,j] * gy[n, o, i*sh-ph+u, j*sw-pw+v]
with output positions outside y dropped; Ho = (H-1)*sh - 2ph + kh + output_padding_h. The
forward is conv2d's backward_input with x in the role of gy, backward_input is a plain
conv2d forward of gy, and backward_weight is conv2d's backward_weight with x and gy swapped.

Memory layout
-------------
NCHW, C-contiguous: x and gx (N,Cin,H,W), w and gw (Cin,Cout,kh,kw) (PyTorch's layout for a
transposed convolution: input channels first), y and gy (N,Cout,Ho,Wo). Flat tensor offsets
are int64; GEMM dimensions are int (the launcher checks they fit).

The kernels (every one a `template <typename T>`, instantiated for float and double)
------------------------------------------------------------------------------------
This file holds only the _v2 patch-GEMM kernels below. Everything else runs conv2d.cu's
kernels in the adjoint roles listed above (minunet/cuda.py makes that choice), so each
formula is written once:
  version 1: always conv2d.cu's naive _v1 kernels (any kernel, stride, padding,
             output_padding). The forward is conv2d_backward_input_v1 with conv2d's "x" being
             our y (H, W = Ho, Wo, output_padding rows included) and its "gy" our x, so every
             output pixel, extra rows too, gathers the bias plus exactly the taps that reach it.
  version 2: the kernels below when they apply, and otherwise conv2d.cu's _v2 kernels.

_v2: the U-Net's up-convolution, where the kernel equals the stride and there is no padding
     (2x2, stride 2). Then every output pixel receives exactly one input pixel: output
     (i*kh + u, j*kw + v) comes from input (i, j) through tap (u, v), the patches tile the
     output without overlap, and each pass is a plain matrix product over the channels,
     with p = (n, i, j) an input pixel and q = (o, u, v) an output channel and tap:
         forward          Y[q, p]  = sum_c  w[c, q] * x[c, p]           (M=Cout*kh*kw, N=N*H*W, red=Cin)
         backward_input   gx[c, p] = sum_q  w[c, q] * gy[q, p]          (M=Cin, N=N*H*W, red=Cout*kh*kw)
         backward_weight  gw[c, q] = sum_p  x[c, p] * gy[q, p]          (M=Cin, N=Cout*kh*kw, red=N*H*W)
     where gy[q, p] = gy[n, o, i*kh+u, j*kw+v] and Y is written back the same way. They use
     the 64 x 64 x 16 shared-memory tiles of common.cuh; the forward adds the bias in its
     epilogue and backward_weight splits its long reduction over blockIdx.z (split-K, as in
     conv2d.cu). The forward requires output_padding 0; the two gradients read gy with its
     real row length, so rows and columns added by output_padding (which no input pixel
     reaches) are simply never read.
*/

// ---------------------------------------------------------------------------------- _v2
// kernel == stride, padding 0: no overlap, one GEMM per pass (see the header). As in conv2d.cu,
// each kernel brings its loader and its store; the loop and the epilogue are common.cuh's.

template <typename T>
__global__ void __launch_bounds__(GEMM_THREADS)
conv_transpose2d_forward_v2(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ b,
                            T* __restrict__ y, int N, int Cin, int H, int W, int Cout, int kh, int kw) {
    // Y[q, p] = b[o] + sum_c w[c, q] * x[n, c, i, j]; this block: q in [m0, m0+64), p in [p0, p0+64)
    // As[kk][m] = w[c0 + kk, m0 + m], Bs[kk][q] = x[n, c0 + kk, i, j] with (n,i,j) = p0 + q
    const int khw = kh * kw, Q = Cout * khw, HW = H * W, P = N * HW;
    const int Ho = H * kh, Wo = W * kw;
    const int m0 = blockIdx.y * GEMM_TILE_M, p0 = blockIdx.x * GEMM_TILE_N;
    const int t = threadIdx.x;

    // both tiles along their columns (w rows are contiguous in q, x rows in p)
    const int l_col = t % GEMM_TILE_N, l_k = t / GEMM_TILE_N;
    const int p = p0 + l_col;
    const bool p_in = p < P;
    const int n = p_in ? p / HW : 0;
    const T* xp = x + (int64)n * Cin * HW + (p_in ? p - n * HW : 0);  // x[n, 0, i, j]

    T acc[GEMM_MICRO][GEMM_MICRO] = {};
    gemm_main_loop(0, Cin, acc, [&](TileA<T>& As, TileB<T>& Bs, int c0) {
#pragma unroll
        for (int s = 0; s < GEMM_LOADS; ++s) {
            const int kk = l_k + ALONG_PIX_ROWS * s, c = c0 + kk, q = m0 + l_col;
            As[kk][l_col] = (c < Cin && q < Q) ? w[(int64)c * Q + q] : T(0);
            Bs[kk][l_col] = (c < Cin && p_in) ? xp[(int64)c * HW] : T(0);
        }
    });
    gemm_epilogue(acc, m0, p0, Q, P, [&](int q, int pp, T value) {
        const int o = q / khw, u = (q - o * khw) / kw, v = q - o * khw - u * kw;
        const Pixel in = pixel_of(pp, W, HW);
        y[(((int64)in.n * Cout + o) * Ho + in.i * kh + u) * Wo + in.j * kw + v] = value + (b ? b[o] : T(0));
    });
}

template <typename T>
__global__ void __launch_bounds__(GEMM_THREADS)
conv_transpose2d_backward_input_v2(const T* __restrict__ gy, const T* __restrict__ w, T* __restrict__ gx,
                                   int N, int Cin, int H, int W, int Cout, int kh, int kw, int Ho, int Wo) {
    // gx[c, p] = sum_q w[c, q] * gy[n, o, i*kh+u, j*kw+v]; this block: c in [m0, m0+64), p in [p0, p0+64).
    // Ho, Wo are gy's real sizes (>= H*kh, W*kw when output_padding added rows no input reaches).
    // As[kk][m] = w[m0 + m, q0 + kk], Bs[kk][q] = gy[q0 + kk, p0 + q]
    const int khw = kh * kw, Q = Cout * khw, HW = H * W, P = N * HW;
    const int m0 = blockIdx.y * GEMM_TILE_M, p0 = blockIdx.x * GEMM_TILE_N;
    const int t = threadIdx.x;

    const int b_p = t % GEMM_TILE_N, b_k = t / GEMM_TILE_N;  // gy: along the pixels
    const int p = p0 + b_p;
    const bool p_in = p < P;
    const Pixel px = p_in ? pixel_of(p, W, HW) : Pixel{0, 0, 0};
    const T* gyp = gy + (int64)px.n * Cout * Ho * Wo + (int64)px.i * kh * Wo + px.j * kw;  // gy[n, 0, i*kh, j*kw]

    T acc[GEMM_MICRO][GEMM_MICRO] = {};
    gemm_main_loop(0, Q, acc, [&](TileA<T>& As, TileB<T>& Bs, int q0) {
        stage_dense_a(As, w, m0, Cin, q0, Q);  // w as Cin rows of Q = Cout*kh*kw taps
#pragma unroll
        for (int s = 0; s < GEMM_LOADS; ++s) {
            const int kk = b_k + ALONG_PIX_ROWS * s, q = q0 + kk;
            T val = T(0);
            if (p_in && q < Q) {
                const int o = q / khw, u = (q - o * khw) / kw, v = q - o * khw - u * kw;
                val = gyp[((int64)o * Ho + u) * Wo + v];
            }
            Bs[kk][b_p] = val;
        }
    });
    gemm_epilogue(acc, m0, p0, Cin, P, [&](int c, int pp, T value) {
        const int np = pp / HW, ij = pp - np * HW;
        gx[((int64)np * Cin + c) * HW + ij] = value;
    });
}

template <typename T>
__global__ void __launch_bounds__(GEMM_THREADS)
conv_transpose2d_backward_weight_v2(const T* __restrict__ x, const T* __restrict__ gy, T* __restrict__ gw_parts,
                                    int N, int Cin, int H, int W, int Cout, int kh, int kw, int Ho, int Wo,
                                    int chunk) {
    // gw[c, q] = sum_p x[n, c, i, j] * gy[n, o, i*kh+u, j*kw+v] over this block's pixels p in
    // [p_begin, p_end); this block: c in [m0, m0+64), q in [q0, q0+64); writes slice blockIdx.z
    // of gw_parts (Z, Cin, Cout*kh*kw)
    // As[kk][m] = x[n, m0 + m, i, j] with (n,i,j) = pk + kk, Bs[kk][q] = gy[n, o, i*kh+u, j*kw+v]
    // with (o,u,v) = q0 + q
    const int khw = kh * kw, Q = Cout * khw, HW = H * W, P = N * HW;
    const int m0 = blockIdx.y * GEMM_TILE_M, q0 = blockIdx.x * GEMM_TILE_N;
    const int p_begin = blockIdx.z * chunk, p_end = min(P, p_begin + chunk);
    const int t = threadIdx.x;

    // both tiles along the reduction: thread t takes pixel pk + t % 16 for rows t / 16 + 16 s
    const int l_k = t % GEMM_TILE_K, l_row = t / GEMM_TILE_K;
    int64 tap_offset[GEMM_LOADS];  // gy offset of this thread's (o, u, v) from gy[n, 0, i*kh, j*kw]; -1: past Q
#pragma unroll
    for (int s = 0; s < GEMM_LOADS; ++s) {
        const int q = q0 + l_row + ALONG_RED_ROWS * s, o = q / khw, u = (q - o * khw) / kw, v = q - o * khw - u * kw;
        tap_offset[s] = q < Q ? ((int64)o * Ho + u) * Wo + v : -1;
    }

    T acc[GEMM_MICRO][GEMM_MICRO] = {};
    gemm_main_loop(p_begin, p_end, acc, [&](TileA<T>& As, TileB<T>& Bs, int pk) {
        const int p = pk + l_k;
        const bool p_in = p < p_end;
        const Pixel px = p_in ? pixel_of(p, W, HW) : Pixel{0, 0, 0};
        const T* xp = x + (int64)px.n * Cin * HW + px.i * W + px.j;                              // x[n, 0, i, j]
        const T* gyp = gy + (int64)px.n * Cout * Ho * Wo + (int64)px.i * kh * Wo + px.j * kw;  // gy[n, 0, i*kh, j*kw]
#pragma unroll
        for (int s = 0; s < GEMM_LOADS; ++s) {
            const int c = m0 + l_row + ALONG_RED_ROWS * s;
            As[l_k][l_row + ALONG_RED_ROWS * s] = (p_in && c < Cin) ? xp[(int64)c * HW] : T(0);
            Bs[l_k][l_row + ALONG_RED_ROWS * s] = (p_in && tap_offset[s] >= 0) ? gyp[tap_offset[s]] : T(0);
        }
    });
    T* gw = gw_parts + (int64)blockIdx.z * Cin * Q;
    gemm_epilogue(acc, m0, q0, Cin, Q, [&](int c, int q, T value) { gw[(int64)c * Q + q] = value; });
}
