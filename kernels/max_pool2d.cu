/* max_pool2d.cu: 2-D max pooling that records where each maximum came from, and its gradient.

What it computes
----------------
    forward   y[n,c,i,j] = max over the kh x kw window at (i*sh - ph, j*sw - pw) of x[n,c]
              argmax[n,c,i,j] = h * W + w of the winner, a flat index into the input plane
    backward  gx[n,c].flat[argmax[n,c,i,j]] += gy[n,c,i,j]
Window places outside the input (the padding) never win. Ties go to the first element in
row-major window order, which is what PyTorch and numpy.argmax do: a later element replaces
the running maximum only if it is strictly greater. NaN propagates: the first NaN in a
window wins and stays. A window with no element inside the input (impossible with padding
<= kernel / 2, which minunet.functional enforces) gives y = -inf and argmax = -1.

Memory layout
-------------
NCHW, C-contiguous. x (N,C,H,W) and gx of dtype T; y and gy (N,C,Ho,Wo) of dtype T; argmax
(N,C,Ho,Wo) int64. Planes are independent, so the kernels see N*C planes.

What one thread computes
------------------------
forward: one output element (its whole window), over a grid-stride loop of int64 indices.
backward: one gy element, which it adds into the gx element its argmax names, with an atomic
add: windows may overlap (stride < kernel), so several outputs can name the same input. The
backward has no kernel_size or stride to gather with, only argmax, so it scatters; gx must
be zeroed first (the launcher allocates it with cupy.zeros). atomic_add is native for float
and, from sm_60, for double (common.cuh). With non-overlapping windows, as in the U-Net's
2x2/2 pooling, each gx element receives at most one add, so the result is exact and the
atomics never contend. The order of the adds to one element is not fixed, so with
overlapping windows float results may differ in the last bits between runs.

Kernels: max_pool2d_forward<T>, max_pool2d_backward<T>.
*/

template <typename T>
__global__ void max_pool2d_forward(const T* __restrict__ x, T* __restrict__ y, int64* __restrict__ argmax,
                                   int64 planes, int H, int W, int Ho, int Wo,
                                   int kh, int kw, int sh, int sw, int ph, int pw) {
    const int64 total = planes * Ho * Wo;
    for (int64 idx = thread_index(); idx < total; idx += thread_count()) {
        const int j = (int)(idx % Wo);
        const int i = (int)((idx / Wo) % Ho);
        const int64 plane = idx / ((int64)Wo * Ho);
        const T* xp = x + plane * H * W;
        T best = neg_inf<T>();
        int64 best_at = -1;
        for (int u = 0; u < kh; ++u) {
            const int h = i * sh - ph + u;
            if (h < 0 || h >= H) continue;
            for (int v = 0; v < kw; ++v) {
                const int w = j * sw - pw + v;
                if (w < 0 || w >= W) continue;
                const T val = xp[(int64)h * W + w];
                // the first element in the window always takes the lead (even -inf or NaN);
                // after that only a strictly greater value, or a first NaN, replaces it
                if (best_at < 0 || val > best || (val != val && best == best)) {
                    best = val;
                    best_at = (int64)h * W + w;
                }
            }
        }
        y[idx] = best;
        argmax[idx] = best_at;
    }
}

template <typename T>
__global__ void max_pool2d_backward(const T* __restrict__ gy, const int64* __restrict__ argmax,
                                    T* __restrict__ gx, int64 planes, int H, int W, int Ho, int Wo) {
    const int64 total = planes * Ho * Wo, HW = (int64)H * W;
    for (int64 idx = thread_index(); idx < total; idx += thread_count()) {
        const int64 at = argmax[idx];
        if (at < 0 || at >= HW) continue;  // an empty window (or a corrupt index) contributes nothing
        atomic_add(gx + (idx / ((int64)Ho * Wo)) * HW + at, gy[idx]);
    }
}
