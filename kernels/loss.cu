/* loss.cu: per-pixel softmax cross-entropy over the channel axis, and its gradient.

What it computes
----------------
For each pixel (n, h, w) with logits x[n, :, h, w] over C classes and target t = target[n,h,w]:
    p[n,c,h,w]   = exp(x_c - m) / sum_c' exp(x_c' - m),       m = max_c x_c
    loss[n,h,w]  = weight[t] * (m + log sum_c exp(x_c - m) - x_t)   (= weight[t] * -log p_t)
    gx[n,c,h,w]  = gloss[n,h,w] * weight[t] * (p[n,c,h,w] - [c == t])
with loss and gx 0 where t == ignore_index, and weight[t] = 1 when no class weights are
given (weight is nullptr). Subtracting the maximum m first keeps every exp() <= 1, so large
logits cannot overflow. minunet.functional has already checked every target; a target that
is neither ignore_index nor in [0, C) would make the kernels read out of bounds, so they
write NaN for that pixel instead (loud, never silent).

Memory layout
-------------
NCHW, C-contiguous: x, p, gx (N,C,H,W) of dtype T; target (N,H,W) int64; loss, gloss (N,H,W)
of dtype T; weight (C,) of dtype T or nullptr. The C logits of one pixel are HW = H*W
elements apart.

What one thread computes
------------------------
forward: one pixel, looping over its C classes three times (max; sum of exponentials;
normalised probabilities). Neighbouring threads take neighbouring pixels, so every pass over
c reads consecutive addresses across a warp.
backward: one element of gx, grid-stride over int64 indices.

Kernels: softmax_cross_entropy_forward<T>, softmax_cross_entropy_backward<T>.
*/

template <typename T>
__global__ void softmax_cross_entropy_forward(const T* __restrict__ x, const int64* __restrict__ target,
                                              const T* __restrict__ weight, T* __restrict__ loss,
                                              T* __restrict__ p, int64 pixels, int C, int64 HW,
                                              int64 ignore_index) {
    for (int64 pix = thread_index(); pix < pixels; pix += thread_count()) {
        const int64 n = pix / HW, hw = pix - n * HW;
        const T* xp = x + n * C * HW + hw;  // x[n, 0, h, w]; class c is at xp[c * HW]
        T* pp = p + n * C * HW + hw;
        T m = neg_inf<T>();
        for (int c = 0; c < C; ++c) m = xp[c * HW] > m ? xp[c * HW] : m;
        T sum = T(0);
        for (int c = 0; c < C; ++c) sum += exp_(xp[c * HW] - m);
        for (int c = 0; c < C; ++c) pp[c * HW] = exp_(xp[c * HW] - m) / sum;
        const int64 t = target[pix];
        if (t == ignore_index)
            loss[pix] = T(0);
        else if (t < 0 || t >= C)
            loss[pix] = quiet_nan<T>();
        else
            loss[pix] = (weight ? weight[t] : T(1)) * (m + log_(sum) - xp[t * HW]);
    }
}

template <typename T>
__global__ void softmax_cross_entropy_backward(const T* __restrict__ p, const int64* __restrict__ target,
                                               const T* __restrict__ weight, const T* __restrict__ gloss,
                                               T* __restrict__ gx, int64 total, int C, int64 HW,
                                               int64 ignore_index) {
    for (int64 idx = thread_index(); idx < total; idx += thread_count()) {
        const int64 hw = idx % HW, n = idx / ((int64)C * HW);
        const int c = (int)((idx / HW) % C);
        const int64 pix = n * HW + hw;
        const int64 t = target[pix];
        if (t == ignore_index)
            gx[idx] = T(0);
        else if (t < 0 || t >= C)
            gx[idx] = quiet_nan<T>();
        else
            gx[idx] = gloss[pix] * (weight ? weight[t] : T(1)) * (p[idx] - (c == t ? T(1) : T(0)));
    }
}
