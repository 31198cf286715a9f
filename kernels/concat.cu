/* concat.cu: channel concatenation with a crop window per input (the U-Net's crop-and-concatenate)
and its gradient, the matching split.

What it computes
----------------
Input i, x_i (N, C_i, H_i, W_i), contributes channels [c0_i, c0_i + C_i) of the output,
c0_i = C_0 + ... + C_{i-1}, cropped to the (H, W) window whose top-left corner is
(top_i, left_i):
    concat_forward   y[n, c0_i + c, h, w] = x_i[n, c, top_i + h, left_i + w]
    concat_backward  gx_i[n, c, h', w'] = gy[n, c0_i + c, h' - top_i, w' - left_i] inside the
                     window, 0 outside it (the cropped-away border gets no gradient)
The launcher runs one kernel per input, so the kernels see one input at a time with its
channel offset c0 and crop corner (top, left).

Memory layout
-------------
NCHW, C-contiguous, one dtype T: x (N,Ci,Hi,Wi), y and gy (N,Cy,Hy,Wy).

What one thread computes
------------------------
concat_forward: one element of input i's slice of y (a gather from x_i).
concat_backward: one element of gx_i, the window's gy value or 0, so gx_i is written
completely and needs no zeroing.
Both are pure copies, bound by memory bandwidth; consecutive threads touch consecutive w.

Kernels: concat_forward<T>, concat_backward<T>.
*/

template <typename T>
__global__ void concat_forward(const T* __restrict__ x, T* __restrict__ y,
                               int N, int Ci, int Hi, int Wi, int Cy, int Hy, int Wy,
                               int c0, int top, int left) {
    const int64 total = (int64)N * Ci * Hy * Wy;
    for (int64 idx = thread_index(); idx < total; idx += thread_count()) {
        const int w = (int)(idx % Wy);
        const int h = (int)((idx / Wy) % Hy);
        const int c = (int)((idx / ((int64)Wy * Hy)) % Ci);
        const int n = (int)(idx / ((int64)Wy * Hy * Ci));
        y[(((int64)n * Cy + c0 + c) * Hy + h) * Wy + w] = x[(((int64)n * Ci + c) * Hi + top + h) * Wi + left + w];
    }
}

template <typename T>
__global__ void concat_backward(const T* __restrict__ gy, T* __restrict__ gx,
                                int N, int Ci, int Hi, int Wi, int Cy, int Hy, int Wy,
                                int c0, int top, int left) {
    const int64 total = (int64)N * Ci * Hi * Wi;
    for (int64 idx = thread_index(); idx < total; idx += thread_count()) {
        const int w = (int)(idx % Wi) - left;
        const int h = (int)((idx / Wi) % Hi) - top;
        const int c = (int)((idx / ((int64)Wi * Hi)) % Ci);
        const int n = (int)(idx / ((int64)Wi * Hi * Ci));
        const bool inside = h >= 0 && h < Hy && w >= 0 && w < Wy;
        gx[idx] = inside ? gy[(((int64)n * Cy + c0 + c) * Hy + h) * Wy + w] : T(0);
    }
}
