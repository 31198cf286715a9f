/* activation.cu: ReLU with an optional fused bias, its gradient, and the bias gradient.

What it computes
----------------
    relu_forward   y = max(x + b[c], 0) for x (N, C, H, W) and b (C,), the bias-add that
                   follows a convolution fused with the ReLU (one pass over memory instead
                   of two); y = max(x, 0) for any x when b is nullptr
    relu_backward  gx = gy where y > 0, else 0 (the gradient at exactly 0 is taken as 0)
    bias_backward  gb[c] = sum over n, h, w of gy[n, c, h, w] (any (N, C, ...) gy: HW is the
                   product of the trailing sizes)

Memory layout
-------------
C-contiguous, one dtype T. With a bias, element idx of x (N,C,H,W) is in channel
(idx / HW) % C, HW = H*W; without one, x is any shape seen as a flat array of n elements.

What one thread (block) computes
--------------------------------
relu_forward, relu_backward: one element per thread, grid-stride over int64 indices.
bias_backward: one block per channel c. Its threads walk the N planes of channel c, each
thread summing every blockDim.x-th element of a plane (so a warp reads consecutive
addresses), in double; then block_sum (common.cuh) adds the per-thread sums. Accumulating
in double keeps the float32 result accurate for planes of a million pixels.

Kernels: relu_forward<T>, relu_backward<T>, bias_backward<T>.
*/

template <typename T>
__global__ void relu_forward(const T* __restrict__ x, const T* __restrict__ b, T* __restrict__ y,
                             int64 n, int C, int64 HW) {
    for (int64 idx = thread_index(); idx < n; idx += thread_count()) {
        const T v = b ? x[idx] + b[(idx / HW) % C] : x[idx];
        y[idx] = v > T(0) ? v : T(0);
    }
}

template <typename T>
__global__ void relu_backward(const T* __restrict__ gy, const T* __restrict__ y, T* __restrict__ gx, int64 n) {
    for (int64 idx = thread_index(); idx < n; idx += thread_count())
        gx[idx] = y[idx] > T(0) ? gy[idx] : T(0);
}

template <typename T>
__global__ void bias_backward(const T* __restrict__ gy, T* __restrict__ gb, int N, int C, int64 HW) {
    const int c = blockIdx.x;
    double sum = 0.0;
    for (int n = 0; n < N; ++n) {
        const T* plane = gy + ((int64)n * C + c) * HW;
        for (int64 k = threadIdx.x; k < HW; k += blockDim.x) sum += (double)plane[k];
    }
    sum = block_sum(sum);
    if (threadIdx.x == 0) gb[c] = (T)sum;
}
