/* optim.cu: fused optimizer updates, one pass over one parameter tensor, in place.

What it computes (PyTorch's torch.optim.SGD and torch.optim.Adam / AdamW, element by element)
----------------
sgd_update:
    d = g + weight_decay * p
    with momentum (buf is not nullptr):
        buf = d                                        on the first step (first != 0)
        buf = momentum * buf + (1 - dampening) * d      afterwards
        d   = d + momentum * buf   if nesterov,   else   d = buf
    p -= lr * d
adam_update (step counts from 1):
    Adam  (decoupled == 0): g = g + weight_decay * p
    AdamW (decoupled != 0): p = p * (1 - lr * weight_decay)
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    p -= step_size * m / (sqrt(v) / bias_correction2_sqrt + eps)
    with step_size = lr / (1 - beta1^step) and bias_correction2_sqrt = sqrt(1 - beta2^step),
    which the launcher computes once on the host (in double) and passes in.
On the first SGD step buf may hold anything: it is written, never read.

Memory layout
-------------
p, g, buf, m, v: C-contiguous arrays of n elements of one dtype T, any shape (seen flat).
The scalars arrive as T. g is only read.

What one thread computes
------------------------
One element per thread, grid-stride over int64 indices: read p, g (and the state), update,
write back. An unfused optimizer would run 4 to 8 separate elementwise kernels per tensor,
each a full pass over memory; this is one pass.

Kernels: sgd_update<T>, adam_update<T>.
*/

template <typename T>
__global__ void sgd_update(T* __restrict__ p, const T* __restrict__ g, T* __restrict__ buf, int64 n,
                           T lr, T momentum, T dampening, T weight_decay, int nesterov, int first) {
    for (int64 idx = thread_index(); idx < n; idx += thread_count()) {
        T d = g[idx] + weight_decay * p[idx];
        if (buf) {
            const T b = first ? d : momentum * buf[idx] + (T(1) - dampening) * d;
            buf[idx] = b;
            d = nesterov ? d + momentum * b : b;
        }
        p[idx] -= lr * d;
    }
}

template <typename T>
__global__ void adam_update(T* __restrict__ p, const T* __restrict__ g, T* __restrict__ m, T* __restrict__ v,
                            int64 n, T lr, T beta1, T beta2, T eps, T weight_decay,
                            T step_size, T bias_correction2_sqrt, int decoupled) {
    for (int64 idx = thread_index(); idx < n; idx += thread_count()) {
        T param = p[idx], grad = g[idx];
        if (decoupled)
            param *= T(1) - lr * weight_decay;
        else
            grad += weight_decay * param;
        const T m_new = beta1 * m[idx] + (T(1) - beta1) * grad;
        const T v_new = beta2 * v[idx] + (T(1) - beta2) * grad * grad;
        m[idx] = m_new;
        v[idx] = v_new;
        p[idx] = param - step_size * m_new / (sqrt_(v_new) / bias_correction2_sqrt + eps);
    }
}
