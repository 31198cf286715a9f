"""minunet.backend: where arrays live, and which kernels run on them.

A Tensor holds either a numpy.ndarray (device 'cpu') or a cupy.ndarray (device 'cuda').
Everything above this module is written once for both: it asks

    xp = array_module(x)   # numpy or cupy, for cheap elementwise glue
    k = kernels_for(x)     # minunet.cpu or minunet.cuda, for the heavy ops

and never branches on the device itself. This is the only module that imports cupy, and it
does so guardedly: without CuPy, or with CuPy but no GPU, minunet runs on the CPU and asking
for 'cuda' raises an error that says which of the two is missing.

The backend contract
--------------------
`KERNELS` below lists every kernel function, with its signature and a one-line meaning.
minunet/cpu/ (numba + NumPy) and minunet/cuda.py (CUDA C through cupy.RawModule) each
define exactly these functions with exactly these signatures; tests/test_backend.py asserts
it. Conventions every kernel keeps:

- Layout is NCHW. Inputs are C-contiguous arrays of one floating dtype (float32 or float64);
  integer targets are int64 and pooling indices are int64 (flat h * W + w into one input
  plane, as in PyTorch).
- stride, padding, output_padding and kernel_size arrive as (h, w) pairs of ints; the ops
  in minunet.functional normalise and validate them, so kernels only assert.
- A kernel allocates and returns fresh outputs; it never accumulates into its arguments.
  The exceptions are the optimizer updates, which update their parameter and state arrays
  in place (that is what an optimizer step is).
- Scalars (lr, eps, ...) arrive as Python numbers; `target` values are already validated.

What each kernel computes (sh, sw = stride; ph, pw = padding; all sums skip out-of-range
positions, which is what zero padding means):

conv2d_forward          x (N,C,H,W), w (K,C,kh,kw), b (K,) or None -> y (N,K,Ho,Wo),
                        Ho = (H + 2ph - kh) // sh + 1, Wo likewise;
                        y[n,k,i,j] = b[k] + sum_{c,u,v} x[n,c,i*sh-ph+u, j*sw-pw+v] w[k,c,u,v]
conv2d_backward_input   gx = d/dx sum(y * gy), shape x_shape (no bias term)
conv2d_backward_weight  gw = d/dw sum(y * gy), shape w_shape (the bias gradient is bias_backward)
conv_transpose2d_forward x (N,Cin,H,W), w (Cin,Cout,kh,kw) -> y (N,Cout,Ho,Wo),
                        Ho = (H-1)*sh - 2ph + kh + output_padding_h;
                        y[n,o,i*sh-ph+u, j*sw-pw+v] += x[n,c,i,j] w[c,o,u,v]; plus b[o]
                        (it is conv2d_backward_input with the roles of x and gy swapped)
conv_transpose2d_backward_input  gy (N,Cout,Ho,Wo) -> gx (N,Cin,H,W) = conv2d_forward(gy, w, None,
                        stride, padding) with w read as (K=Cin, C=Cout, kh, kw)
conv_transpose2d_backward_weight gw (Cin,Cout,kh,kw) = conv2d_backward_weight with x and gy swapped
max_pool2d_forward      y (N,C,Ho,Wo) the max over each kh x kw window (Ho as for conv2d, padded
                        places never win); argmax int64 (N,C,Ho,Wo) = h*W + w of the winner in
                        its input plane; a tie goes to the first in row-major window order
max_pool2d_backward     gx (x_shape): gx[n,c].flat[argmax[n,c,i,j]] += gy[n,c,i,j] (windows may overlap)
concat_forward          xs: list of (N,C_i,H_i,W_i); offsets: list of (top_i, left_i); out_hw (H,W)
                        -> y (N, sum C_i, H, W), y[:, c0_i + c, h, w] = xs[i][:, c, top_i+h, left_i+w]
concat_backward         -> list of gx_i (x_shapes[i]): zero outside the crop window, the matching
                        channel slice of gy inside it
relu_forward            y = max(x + b[None,:,None,None], 0) with b (C,) for 4-D x; y = max(x, 0) if b is None
relu_backward           gx = gy * (y > 0)
bias_backward           gy (N,C,H,W) -> gb (C,) = gy summed over n, h, w
softmax_cross_entropy_forward  x (N,C,H,W), target int64 (N,H,W), weight (C,) or None ->
                        loss (N,H,W) = weight[t] * (logsumexp_c x - x[t]), 0 where t == ignore_index;
                        p (N,C,H,W) = softmax over c (saved for backward)
softmax_cross_entropy_backward gx = gloss[n,h,w] * weight[t] * (p - onehot(t)), 0 where t == ignore_index
batch_norm_forward      per channel over (N,H,W): training: mean, var = the batch mean and biased
                        variance (the mean and var arguments are None); else the given (running)
                        mean and var are used;
                        y = (x - mean) / sqrt(var + eps) * gamma + beta; returns the mean, var used
batch_norm_backward     gx, ggamma = sum(gy * xhat), gbeta = sum(gy); in training mode gx carries
                        the terms through the batch statistics, in eval mode gx = gy*gamma/sqrt(var+eps)
sgd_update              PyTorch's SGD: d = g + weight_decay*p; with momentum: buf = d if first else
                        momentum*buf + (1-dampening)*d, d = d + momentum*buf if nesterov else buf;
                        p -= lr*d  (buf is None when momentum == 0)
adam_update             PyTorch's Adam (decoupled=False: g += weight_decay*p) or AdamW (decoupled=True:
                        p *= 1 - lr*weight_decay); m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g*g;
                        p -= lr/(1-b1^step) * m / (sqrt(v)/sqrt(1-b2^step) + eps); step counts from 1
- `version` picks one of a convolution's implementations (None = the fastest). Every
  version computes the same function; tests run them all, benchmarks time them all. Each
  kernel module has `VERSIONS = {kernel_name: (1, 2, ...)}` for the kernels that take
  `version`, and `DEFAULT_VERSION = {kernel_name: v}` for what None picks, unless the
  module routes some shapes to another version, as minunet.cpu does (and says where).
"""
import numpy as np

try:  # the only import of cupy in minunet
    import cupy as _cupy
except Exception:  # ImportError, or a broken CUDA install raising at import time
    _cupy = None

DEVICES = ("cpu", "cuda")

KERNELS = {
    # convolution: y[n,k,i,j] = b[k] + sum_{c,u,v} x[n,c,i*sh-ph+u, j*sw-pw+v] * w[k,c,u,v]
    "conv2d_forward": "(x, w, b, stride, padding, version=None) -> y",
    "conv2d_backward_input": "(gy, w, x_shape, stride, padding, version=None) -> gx",
    "conv2d_backward_weight": "(x, gy, w_shape, stride, padding, version=None) -> gw",
    # transposed convolution: the adjoint of conv2d in x; w is (Cin, Cout, kh, kw)
    "conv_transpose2d_forward": "(x, w, b, stride, padding, output_padding, version=None) -> y",
    "conv_transpose2d_backward_input": "(gy, w, stride, padding, version=None) -> gx",
    "conv_transpose2d_backward_weight": "(x, gy, w_shape, stride, padding, version=None) -> gw",
    # max pooling with argmax (first maximum in window order wins ties)
    "max_pool2d_forward": "(x, kernel_size, stride, padding) -> (y, argmax)",
    "max_pool2d_backward": "(gy, argmax, x_shape) -> gx",
    # channel concatenation with a crop window per input (the U-Net's crop-and-concatenate)
    "concat_forward": "(xs, offsets, out_hw) -> y",
    "concat_backward": "(gy, x_shapes, offsets) -> gxs",
    # activation and bias
    "relu_forward": "(x, b=None) -> y",
    "relu_backward": "(gy, y) -> gx",
    "bias_backward": "(gy) -> gb",
    # per-pixel softmax cross-entropy over the channel axis
    "softmax_cross_entropy_forward": "(x, target, weight, ignore_index) -> (loss, p)",
    "softmax_cross_entropy_backward": "(p, target, weight, ignore_index, gloss) -> gx",
    # batch normalisation over (N, H, W) per channel
    "batch_norm_forward": "(x, gamma, beta, mean, var, eps, training) -> (y, mean, var)",
    "batch_norm_backward": "(gy, x, gamma, mean, var, eps, training) -> (gx, ggamma, gbeta)",
    # fused optimizer updates, in place on p and the state arrays
    "sgd_update": "(p, g, buf, lr, momentum, dampening, weight_decay, nesterov, first) -> None",
    "adam_update": "(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step, decoupled) -> None",
}

_cuda_status = None  # (usable: bool, reason: str), probed once


def cuda_status():
    """(usable, reason): whether CuPy imports AND a CUDA device is present, and if not, why."""
    global _cuda_status
    if _cuda_status is None:
        if _cupy is None:
            _cuda_status = (False, "CuPy is not installed (pip install 'minunet[cuda12]' or 'minunet[cuda13]')")
        else:
            try:
                n = _cupy.cuda.runtime.getDeviceCount()
                _cuda_status = (True, "") if n > 0 else (False, "CuPy is installed but no CUDA device is present")
            except Exception as e:  # no driver, no device, broken runtime: cupy raises
                _cuda_status = (False, f"CuPy is installed but no usable CUDA device was found ({type(e).__name__}: {e})")
    return _cuda_status


def cuda_available():
    return cuda_status()[0]


def normalize_device(device):
    """'cpu' | 'cuda' | 'cuda:0' | 'auto' -> 'cpu' or 'cuda'; 'cuda' only if usable."""
    d = str(device).lower()
    if d == "auto":
        return "cuda" if cuda_available() else "cpu"
    if d.startswith("cuda"):
        if d not in ("cuda", "cuda:0"):
            raise ValueError(f"device {device!r}: minunet uses one GPU, 'cuda' (or 'cuda:0')")
        usable, reason = cuda_status()
        if not usable:
            raise RuntimeError(f"device 'cuda' was asked for, but {reason}")
        return "cuda"
    if d != "cpu":
        raise ValueError(f"unknown device {device!r}; expected 'cpu', 'cuda' or 'auto'")
    return "cpu"


def is_cuda_array(a):
    return _cupy is not None and isinstance(a, _cupy.ndarray)


def device_of(a):
    return "cuda" if is_cuda_array(a) else "cpu"


def array_module(a):
    """numpy or cupy, whichever owns `a`."""
    return _cupy if is_cuda_array(a) else np


def xp_for(device):
    return _cupy if normalize_device(device) == "cuda" else np


def to_device(a, device):
    """Copy array `a` to `device` (no copy when it is already there)."""
    device = normalize_device(device)
    if device == "cuda":
        return _cupy.asarray(a)
    return _cupy.asnumpy(a) if is_cuda_array(a) else np.asarray(a)


def to_numpy(a):
    return _cupy.asnumpy(a) if is_cuda_array(a) else np.asarray(a)


def kernels_for(a):
    """The kernel module (minunet.cpu or minunet.cuda) for arrays like `a`."""
    if is_cuda_array(a):
        from minunet import cuda
        return cuda
    from minunet import cpu
    return cpu
