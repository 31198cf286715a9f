"""minunet.cpu: the CPU kernels (numba + NumPy), one function per kernel of minunet.contract.

Every kernel here has the name and signature of its declaration in minunet/contract.py, which
says what it computes; minunet/cuda.py implements the same set on the GPU. Call them through
`minunet.backend.kernels_for(x)`, which checks and normalises the arguments first and checks
the outputs after: the functions here trust their arguments (NumPy arrays, NCHW, C-contiguous,
float32 or float64, (h, w) pairs of ints) and keep only what is the CPU's own: choosing a
version, allocating the outputs with NumPy and launching the numba loops.

One module per op family, with the stems of kernels/*.cu and of the oracles in
tests/reference.py:

    conv2d.py            convolution, versions v1 (direct), v2 (im2col + GEMM), v3 (direct over padded planes:
                         conv2d_direct.py), v4 (Winograd: conv2d_winograd.py, its weight gradient
                         conv2d_winograd_weight.py, its small planes conv2d_winograd_small.py; a 1x1 kernel as
                         one product per image); an input may be a list, read in place (free concatenation)
    conv_transpose2d.py  transposed convolution with kernel == stride (the U-Net's up-convolution)
    max_pool2d.py        max pooling with argmax
    concat.py            crop-and-concatenate along channels
    activation.py        ReLU with a fused bias, the bias gradient
    loss.py              per-pixel softmax cross-entropy
    batch_norm.py        batch normalisation
    optim.py             fused SGD and Adam/AdamW updates
    runtime.py           numba's thread pool, the kernel decorator, scratch buffers, the pool of output buffers
    simd.py              explicit 512-bit SIMD vectors for numba code
    gemm.py              matrix products on those vectors (1x1 convolutions, the up-convolution)

How a kernel is built
---------------------
Each public function is a thin Python wrapper that allocates the outputs (NumPy arrays, the large
ones over buffers that runtime.empty recycles) and hands everything to a `@kernel` loop
(runtime.py), exactly as cuda.py allocates and launches. Only
`sgd_update` and `adam_update` write into their arguments. Reductions (bias and batch-norm
sums, weight gradients) accumulate in float64, except within one plane where a kernel says so
(vector partial sums in the input dtype). `configure()` sets up the threads the kernels run
on; the first launch calls it (runtime.py says what it does, and why).
"""
from minunet.cpu.activation import bias_backward, relu_backward, relu_forward
from minunet.cpu.batch_norm import batch_norm_backward, batch_norm_forward
from minunet.cpu.concat import concat_backward, concat_forward
from minunet.cpu.conv2d import VERSIONS, conv2d_backward_input, conv2d_backward_weight, conv2d_forward
from minunet.cpu.conv_transpose2d import (conv_transpose2d_backward_input, conv_transpose2d_backward_weight,
                                          conv_transpose2d_forward)
from minunet.cpu.loss import softmax_cross_entropy_backward, softmax_cross_entropy_forward
from minunet.cpu.max_pool2d import max_pool2d_backward, max_pool2d_forward
from minunet.cpu.optim import adam_update, sgd_update
from minunet.cpu.runtime import configure

__all__ = ["VERSIONS", "configure", "adam_update", "batch_norm_backward", "batch_norm_forward", "bias_backward",
           "concat_backward", "concat_forward", "conv2d_backward_input", "conv2d_backward_weight", "conv2d_forward",
           "conv_transpose2d_backward_input", "conv_transpose2d_backward_weight", "conv_transpose2d_forward",
           "max_pool2d_backward", "max_pool2d_forward", "relu_backward", "relu_forward", "sgd_update",
           "softmax_cross_entropy_backward", "softmax_cross_entropy_forward"]
