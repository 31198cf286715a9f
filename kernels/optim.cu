/* optim.cu: the optimizer step of every parameter in ONE launch (a multi-tensor update), in place.

What it computes (PyTorch's torch.optim.SGD and torch.optim.Adam / AdamW, element by element)
----------------
For every tensor t of the launch's table, with p its parameter, g its gradient and h its row
of hyperparameters (minunet.contract.SGD_HYPER / ADAM_HYPER name the columns):
sgd_update, h = (lr, momentum, dampening, weight_decay, nesterov, first):
    d = g + weight_decay * p
    with momentum (buf is not nullptr):
        buf = d                                        on the first step (first != 0)
        buf = momentum * buf + (1 - dampening) * d      afterwards
        d   = d + momentum * buf   if nesterov,   else   d = buf
    p -= lr * d
adam_update, h = (lr, beta1, beta2, eps, weight_decay, step_size, bias_correction2_sqrt, decoupled):
    Adam  (decoupled == 0): g = g + weight_decay * p
    AdamW (decoupled != 0): p = p * (1 - lr * weight_decay)
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    p -= step_size * m / (sqrt(v) / bias_correction2_sqrt + eps)
    with step_size = lr / (1 - beta1^step) and bias_correction2_sqrt = sqrt(1 - beta2^step),
    which the optimizer computes on the host, in double, for the step it is about to take.
On the first SGD step buf may hold anything: it is written, never read.

Why one launch, and why the hyperparameters live in device memory
------------------------------------------------------------------
A U-Net has dozens of parameter tensors, many of them tiny (biases, batch-norm scales). One
launch per tensor costs a few microseconds of launch overhead each, more than the work of
the small ones; PyTorch's fused optimizers and apex's multi_tensor_apply launch once for all.
Here the host writes a table with one row per tensor and the kernel finds each tensor's
arrays through it. The hyperparameters come from device memory too (a float64 row per
tensor), not from kernel arguments: a CUDA graph replays its kernels with the arguments they
were captured with, so a learning rate passed by value would be frozen at capture; read from
memory that the host rewrites before each replay, the schedule (and Adam's bias correction)
goes on working.

Memory layout
-------------
table: int64 (ntensors, TABLE_COLUMNS), row t = (p, g, state 1, state 2, n, first_chunk):
    the addresses of tensor t's arrays (0 for a state the tensor lacks: SGD without momentum
    has no buffer, SGD has no state 2), its element count n, and the index of its first chunk
    in the launch's chunk numbering (tensor t owns chunks first_chunk .. first_chunk +
    ceil(n / CHUNK) - 1; the rows are in order, so first_chunk increases down the table).
    Addresses are read through table_pointer (common.cuh), which the CUDA emulator models.
hyper: float64 (ntensors, 6 for SGD or 8 for Adam), row t as above; cast to T where used, as
    the single-tensor launcher cast its arguments before.
p, g, buf, m, v: C-contiguous arrays of n elements of one dtype T (seen flat); g is only read.

What one block computes
-----------------------
Every tensor is cut into chunks of CHUNK = 4096 elements; chunk c of the launch is one chunk
of one tensor. Block b takes chunks b, b + gridDim.x, ... (a grid-stride loop over chunks, so
the launcher caps the grid); for each it finds its tensor by binary search over first_chunk,
reads the row's addresses and hyperparameters once, and its 256 threads update the chunk's
elements, one element per thread per pass: read p, g (and the state), update, write back,
one pass over memory. No two blocks touch one element: the update needs no atomics and its
result does not depend on the order blocks run in.

Kernels: sgd_update<T>, adam_update<T>.
*/

#define OPTIM_CHUNK 4096       // elements per chunk; minunet/cuda.py mirrors it (OPTIM_CHUNK)
#define TABLE_COLUMNS 6        // p, g, state 1, state 2, n, first_chunk

// Chunk c of the launch: the tensor t that owns it (the last row whose first_chunk is <= c),
// that tensor's table row and element count n, and the chunk's elements [begin, end).
struct OptimChunk {
    int t;
    const int64* row;
    int64 n, begin, end;
};

__device__ __forceinline__ OptimChunk optim_chunk(const int64* __restrict__ table, int ntensors, int64 c) {
    int lo = 0, hi = ntensors - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (table[(int64)mid * TABLE_COLUMNS + 5] <= c) lo = mid;
        else hi = mid - 1;
    }
    OptimChunk k;
    k.t = lo;
    k.row = table + (int64)lo * TABLE_COLUMNS;
    k.n = k.row[4];
    k.begin = (c - k.row[5]) * OPTIM_CHUNK;
    k.end = min(k.n, k.begin + OPTIM_CHUNK);
    return k;
}

template <typename T>
__global__ void sgd_update(const int64* __restrict__ table, const double* __restrict__ hyper, int ntensors,
                           int64 chunks) {
    for (int64 c = blockIdx.x; c < chunks; c += gridDim.x) {
        const OptimChunk k = optim_chunk(table, ntensors, c);
        T* p = table_pointer<T>(k.row + 0, k.n);
        const T* g = table_pointer<const T>(k.row + 1, k.n);
        T* buf = table_pointer<T>(k.row + 2, k.n);  // nullptr without momentum
        const double* h = hyper + (int64)k.t * 6;
        const T lr = T(h[0]), momentum = T(h[1]), dampening = T(h[2]), weight_decay = T(h[3]);
        const bool nesterov = h[4] != 0, first = h[5] != 0;
        for (int64 idx = k.begin + threadIdx.x; idx < k.end; idx += blockDim.x) {
            T d = g[idx] + weight_decay * p[idx];
            if (buf) {
                const T b = first ? d : momentum * buf[idx] + (T(1) - dampening) * d;
                buf[idx] = b;
                d = nesterov ? d + momentum * b : b;
            }
            p[idx] -= lr * d;
        }
    }
}

template <typename T>
__global__ void adam_update(const int64* __restrict__ table, const double* __restrict__ hyper, int ntensors,
                            int64 chunks) {
    for (int64 c = blockIdx.x; c < chunks; c += gridDim.x) {
        const OptimChunk k = optim_chunk(table, ntensors, c);
        T* p = table_pointer<T>(k.row + 0, k.n);
        const T* g = table_pointer<const T>(k.row + 1, k.n);
        T* m = table_pointer<T>(k.row + 2, k.n);
        T* v = table_pointer<T>(k.row + 3, k.n);
        const double* h = hyper + (int64)k.t * 8;
        const T lr = T(h[0]), beta1 = T(h[1]), beta2 = T(h[2]), eps = T(h[3]), weight_decay = T(h[4]);
        const T step_size = T(h[5]), bias_correction2_sqrt = T(h[6]);
        const bool decoupled = h[7] != 0;
        for (int64 idx = k.begin + threadIdx.x; idx < k.end; idx += blockDim.x) {
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
}
