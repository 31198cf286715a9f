/* batch_norm.cu: batch normalisation over (N, H, W) for each channel, forward and backward.

What it computes
----------------
With M = N*H*W values per channel c, statistics mean[c], var[c] and rstd = 1/sqrt(var + eps):
    forward   xhat = (x - mean[c]) * rstd,   y = gamma[c] * xhat + beta[c]
              training: mean and var are the batch mean and the BIASED variance (divide by M),
              computed here (batch_norm_stats); eval: the given running statistics are used
    backward  gbeta[c] = sum gy,   ggamma[c] = sum gy * xhat         (both modes)
              training: gx = gamma[c] * rstd * (gy - gbeta[c]/M - xhat * ggamma[c]/M)
                        (the gradient also flows through mean and var, which depend on x)
              eval:     gx = gamma[c] * rstd * gy
gamma or beta may be nullptr (no affine part): then gamma = 1, beta = 0.

Memory layout
-------------
NCHW, C-contiguous, one dtype T: x, y, gy, gx (N,C,H,W); gamma, beta, mean, var, ggamma,
gbeta (C,). Element idx of x is in channel (idx / HW) % C. Any (N, C, ...) shape works the
same way, with HW the product of the trailing sizes (1 for an (N, C) input).

What one thread (block) computes
--------------------------------
The per-channel reductions (batch_norm_stats, batch_norm_backward_reduce) run one block per
channel: the block's threads stride through the channel's N planes (consecutive threads,
consecutive addresses), accumulate in double, and combine with block_sum (common.cuh). The
variance is computed in two passes, the mean first and then the mean squared deviation, not
as E[x^2] - E[x]^2, which loses every digit when the mean is large against the spread.
The elementwise kernels (batch_norm_forward, batch_norm_backward) take one element per
thread, grid-stride over int64 indices, reading the channel's statistics.

Kernels: batch_norm_stats<T>, batch_norm_forward<T>, batch_norm_backward_reduce<T>,
batch_norm_backward<T>.
*/

template <typename T>
__global__ void batch_norm_stats(const T* __restrict__ x, T* __restrict__ mean, T* __restrict__ var,
                                 int N, int C, int64 HW) {
    const int c = blockIdx.x;
    const double M = (double)N * HW;
    double sum = 0.0;
    for (int n = 0; n < N; ++n) {
        const T* plane = x + ((int64)n * C + c) * HW;
        for (int64 k = threadIdx.x; k < HW; k += blockDim.x) sum += (double)plane[k];
    }
    const double mu = block_sum(sum) / M;
    double sq = 0.0;
    for (int n = 0; n < N; ++n) {
        const T* plane = x + ((int64)n * C + c) * HW;
        for (int64 k = threadIdx.x; k < HW; k += blockDim.x) {
            const double d = (double)plane[k] - mu;
            sq += d * d;
        }
    }
    const double sigma2 = block_sum(sq) / M;
    if (threadIdx.x == 0) {
        mean[c] = (T)mu;
        var[c] = (T)sigma2;
    }
}

template <typename T>
__global__ void batch_norm_forward(const T* __restrict__ x, const T* __restrict__ gamma,
                                   const T* __restrict__ beta, const T* __restrict__ mean,
                                   const T* __restrict__ var, T* __restrict__ y,
                                   T eps, int64 total, int C, int64 HW) {
    for (int64 idx = thread_index(); idx < total; idx += thread_count()) {
        const int c = (int)((idx / HW) % C);
        const T xhat = (x[idx] - mean[c]) / sqrt_(var[c] + eps);
        y[idx] = (gamma ? gamma[c] : T(1)) * xhat + (beta ? beta[c] : T(0));
    }
}

template <typename T>
__global__ void batch_norm_backward_reduce(const T* __restrict__ gy, const T* __restrict__ x,
                                           const T* __restrict__ mean, const T* __restrict__ var,
                                           T* __restrict__ ggamma, T* __restrict__ gbeta,
                                           T eps, int N, int C, int64 HW) {
    const int c = blockIdx.x;
    const double mu = (double)mean[c];
    double sum_gy = 0.0, sum_gy_dx = 0.0;  // sum gy, sum gy * (x - mean)
    for (int n = 0; n < N; ++n) {
        const int64 offset = ((int64)n * C + c) * HW;
        for (int64 k = threadIdx.x; k < HW; k += blockDim.x) {
            const double g = (double)gy[offset + k];
            sum_gy += g;
            sum_gy_dx += g * ((double)x[offset + k] - mu);
        }
    }
    sum_gy = block_sum(sum_gy);
    sum_gy_dx = block_sum(sum_gy_dx);
    if (threadIdx.x == 0) {
        gbeta[c] = (T)sum_gy;
        ggamma[c] = (T)(sum_gy_dx / sqrt((double)var[c] + (double)eps));
    }
}

template <typename T>
__global__ void batch_norm_backward(const T* __restrict__ gy, const T* __restrict__ x,
                                    const T* __restrict__ gamma, const T* __restrict__ mean,
                                    const T* __restrict__ var, const T* __restrict__ ggamma,
                                    const T* __restrict__ gbeta, T* __restrict__ gx,
                                    T eps, int training, int64 total, int C, int64 HW, int64 M) {
    for (int64 idx = thread_index(); idx < total; idx += thread_count()) {
        const int c = (int)((idx / HW) % C);
        const T rstd = T(1) / sqrt_(var[c] + eps);
        const T scale = (gamma ? gamma[c] : T(1)) * rstd;
        if (training) {
            const T xhat = (x[idx] - mean[c]) * rstd;
            gx[idx] = scale * (gy[idx] - (gbeta[c] + xhat * ggamma[c]) / T(M));
        } else {
            gx[idx] = scale * gy[idx];
        }
    }
}
