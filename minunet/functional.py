"""minunet.functional: the differentiable ops of a U-Net, with PyTorch's names and semantics.

Each op is a public function that checks what only the op can see (Tensors, devices, dtypes,
ranks, its own options such as reduction or output_padding) and then applies a Function
subclass. Each Function's forward and backward are written ONCE for both devices: the heavy
lifting goes to `kernels_for(x)` (minunet.cpu or minunet.cuda behind minunet.contract, which
checks every kernel call's shapes and values, so a shape that does not fit fails there, in
one place for both devices, with the kernel, the argument and the shapes in the message), and
the cheap elementwise glue uses `array_module(x)` (numpy or cupy). The derivative rules
therefore live in this file only, the adjoints among them: the transposed convolution is
conv2d's adjoint here, and nowhere else.

Layout is NCHW throughout; kernel_size, stride and padding take an int or an (h, w) pair.
"""
import numpy as np

from minunet import backend
from minunet.autograd import Function, Tensor
from minunet.contract import FLOATS, pair


# ---- argument checking ---------------------------------------------------------------

def _check_tensor(x, op, arg, ndim=None):
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: {arg} must be a minunet Tensor, got {type(x).__name__}")
    if x.dtype not in FLOATS:
        raise TypeError(f"{op}: {arg} has dtype {x.dtype}; minunet ops take float32 or float64")
    ranks = (ndim,) if isinstance(ndim, int) else ndim
    if ranks is not None and x.ndim not in ranks:
        want = " or ".join(f"{r}-D" for r in ranks)
        raise ValueError(f"{op}: {arg} must be {want}, got shape {x.shape}")


def _check_same(op, **tensors):
    """All given tensors on one device and of one dtype."""
    items = [(k, t) for k, t in tensors.items() if t is not None]
    devices = {t.device for _, t in items}
    if len(devices) > 1:
        desc = ", ".join(f"{k} on {t.device}" for k, t in items)
        raise ValueError(f"{op}: arguments on different devices ({desc}); move them with .to(device)")
    dtypes = {t.dtype for _, t in items}
    if len(dtypes) > 1:
        desc = ", ".join(f"{k} {t.dtype}" for k, t in items)
        raise TypeError(f"{op}: arguments of different dtypes ({desc}); minunet converts none silently: for a "
                        f"float32 model (the default) pass x.float(), or make the input with "
                        f"mn.tensor(a, dtype=np.float32) (a NumPy float64 array stays float64, as in PyTorch); "
                        f"for float64 call model.double()")


def _unsupported(op, **args):
    """PyTorch arguments that minunet's kernels do not implement: any value but the default
    (1) is refused, naming the argument, rather than computed wrongly."""
    for name, value in args.items():
        if value != 1 and value != (1, 1):
            raise ValueError(f"{op}: {name}={value!r} is not supported (minunet's convolution kernels compute "
                             f"{name}=1 only, on every backend)")


def _array_arg(a, like, op, arg):
    """A non-differentiable array argument (target, weight, ...) as an array on `like`'s device;
    Python lists and scalars are converted, arrays on another device are refused."""
    a = a.data if isinstance(a, Tensor) else a
    if hasattr(a, "shape") and backend.device_of(a) != backend.device_of(like):
        raise ValueError(f"{op}: {arg} is on {backend.device_of(a)} but the input is on "
                         f"{backend.device_of(like)}; move it with .to(device)")
    return backend.array_module(like).asarray(a)


def _contiguous(a):
    return backend.array_module(a).ascontiguousarray(a)


# ---- convolution ---------------------------------------------------------------------

def _check_conv_tensors(op, x, weight, bias):
    """A convolution's Tensors: x and weight 4-D, bias 1-D or None, one device and dtype."""
    _check_tensor(x, op, "input x", 4)
    _check_tensor(weight, op, "weight", 4)
    if bias is not None:
        _check_tensor(bias, op, "bias", 1)
    _check_same(op, x=x, weight=weight, bias=bias)


def _conv_inputs(op, x, weight, bias):
    """A convolution's input as a list of Tensors: [x], or the Tensors of a list x (their
    concatenation along channels, see conv2d), checked with weight and bias."""
    if not isinstance(x, (list, tuple)):
        _check_conv_tensors(op, x, weight, bias)
        return [x]
    xs = list(x)
    if not xs:
        raise ValueError(f"{op}: input x is an empty list")
    for i, a in enumerate(xs):
        _check_tensor(a, op, f"input x[{i}]", 4)
    _check_conv_tensors(op, xs[0], weight, bias)
    _check_same(op, **{f"x[{i}]": a for i, a in enumerate(xs)}, weight=weight)
    return xs  # their shapes: the kernels' contract checks them


class Conv2d(Function):
    """conv2d, and with relu=True conv2d followed by a ReLU as one op: the kernels fuse the ReLU
    into the forward's epilogue and its mask (y > 0) into the loads of gy in both gradients, and
    the weight gradient computes the bias gradient on the way (bias=True): no pass over memory of
    its own for the ReLU, its backward or the bias gradient.

    Inputs after b are more input channels: the convolution of x and them concatenated along
    channels (the U-Net's skip features and up-convolved features), which the kernels read where
    they lie, and whose gradient they write as one array per input: free concatenation."""
    fresh_grads = True  # kernel outputs (minunet.contract: kernels return fresh arrays)
    name = "conv2d"

    def forward(self, x, w, b, *more, stride, padding, relu=False):
        # x: (N, C, H, W) (with more: (N, C_i, H, W) each, C = their sum), w: (K, C, kh, kw), b: (K,)
        # -> y: (N, K, Ho, Wo) (max(y, 0) with relu)
        xs, w = [_contiguous(a) for a in (x, *more)], _contiguous(w)
        self.x = xs if more else xs[0]
        self.w, self.stride, self.padding = w, stride, padding
        y = backend.kernels_for(x).conv2d_forward(self.x, w, b, stride, padding, relu=relu)
        self.relu_y = y if relu else None
        return y

    def backward(self, gy):
        k, gy = backend.kernels_for(gy), _contiguous(gy)
        need_x, need_w, need_b, *need_more = self.needs_input_grad
        listed = isinstance(self.x, list)
        mask = self.relu_y
        gx = gw = gb = None
        if need_x or any(need_more):
            x_shape = [a.shape for a in self.x] if listed else self.x.shape
            gx = k.conv2d_backward_input(gy, self.w, x_shape, self.stride, self.padding, relu_y=mask)
        if need_w:
            gw = k.conv2d_backward_weight(self.x, gy, self.w.shape, self.stride, self.padding, relu_y=mask,
                                          bias=need_b)
            if need_b:
                gw, gb = gw
        elif need_b:
            gb = k.bias_backward(gy if mask is None else k.relu_backward(gy, mask))
        if not listed:
            return gx, gw, gb
        gx = gx or [None] * len(self.x)
        return (gx[0], gw, gb, *gx[1:])


def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """2-D cross-correlation, as torch.nn.functional.conv2d; dilation and groups must be 1.
    x may also be a list of tensors (N, C_i, H, W): the convolution of torch.cat(x, 1), computed
    without making that concatenation (the kernels read each tensor where it lies)."""
    op = "conv2d"
    _unsupported(op, dilation=dilation, groups=groups)
    xs = _conv_inputs(op, x, weight, bias)
    stride, padding = pair(op, "stride", stride, 1), pair(op, "padding", padding, 0)
    return Conv2d.apply(xs[0], weight, bias, *xs[1:], stride=stride, padding=padding)


def conv2d_relu(x, weight, bias=None, stride=1, padding=0):
    """relu(conv2d(x, weight, bias, stride, padding)) as one fused op (see Conv2d): the same values,
    with the ReLU, its backward and the bias gradient inside the convolution's kernels.
    nn.Sequential uses it for a Conv2d followed by a ReLU. x may be a list, as conv2d's."""
    op = "conv2d_relu"
    xs = _conv_inputs(op, x, weight, bias)
    stride, padding = pair(op, "stride", stride, 1), pair(op, "padding", padding, 0)
    return Conv2d.apply(xs[0], weight, bias, *xs[1:], stride=stride, padding=padding, relu=True)


def _patchwise(w_shape, stride, padding, output_padding):
    """Whether a transposed convolution's patches tile its output without overlap: kernel ==
    stride, no padding (the U-Net's 2x2 stride-2 up-convolution). The one place that picks the
    backends' own kernels for that case (conv_transpose2d_*: one GEMM and a reshuffle of each
    input pixel's patch) over conv2d's kernels in adjoint roles."""
    return tuple(w_shape[2:]) == tuple(stride) and tuple(padding) == (0, 0) and tuple(output_padding) == (0, 0)


class ConvTranspose2d(Function):
    """The transposed convolution is conv2d's adjoint in x (Chainer's way): if conv2d maps x to
    y = A x, the transposed convolution with the same weight maps x to A^T x. So its forward is
    conv2d's backward_input with x in the role of the output gradient, the gradient of its
    input is conv2d's forward of gy, and the gradient of its weight is conv2d's backward_weight
    with x and gy in swapped roles, which gives gw in the transposed layout (Cin, Cout, kh, kw)."""
    fresh_grads = True  # kernel outputs (minunet.contract: kernels return fresh arrays)
    name = "conv_transpose2d"

    def forward(self, x, w, b, stride, padding, output_padding):
        # x: (N, Cin, H, W), w: (Cin, Cout, kh, kw) -> y: (N, Cout, Ho, Wo), Ho = (H - 1) sh - 2 ph + kh + oph
        k, x, w = backend.kernels_for(x), _contiguous(x), _contiguous(w)
        self.x, self.w, self.stride, self.padding = x, w, stride, padding
        self.patchwise = _patchwise(w.shape, stride, padding, output_padding)
        if self.patchwise:
            return k.conv_transpose2d_forward(x, w, b)
        y_shape = (x.shape[0], w.shape[1], *_conv_transpose2d_out_hw(x.shape[2:], w.shape[2:], stride, padding,
                                                                     output_padding))
        y = k.conv2d_backward_input(x, w, y_shape, stride, padding)
        if b is not None:
            y += b.reshape(-1, 1, 1)
        return y

    def backward(self, gy):
        k, gy, x, w = backend.kernels_for(gy), _contiguous(gy), self.x, self.w
        need_x, need_w, need_b = self.needs_input_grad
        if self.patchwise:
            gx = k.conv_transpose2d_backward_input(gy, w) if need_x else None
            gw = k.conv_transpose2d_backward_weight(x, gy, w.shape) if need_w else None
        else:
            gx = k.conv2d_forward(gy, w, None, self.stride, self.padding) if need_x else None
            gw = k.conv2d_backward_weight(gy, x, w.shape, self.stride, self.padding) if need_w else None
        gb = k.bias_backward(gy) if need_b else None
        return gx, gw, gb


def _conv_transpose2d_out_hw(hw, khw, stride, padding, output_padding):
    """(Ho, Wo) of a transposed convolution: Ho = (H - 1) * sh - 2 * ph + kh + oph."""
    return tuple((n - 1) * s - 2 * p + k + o for n, k, s, p, o in zip(hw, khw, stride, padding, output_padding))


def conv_transpose2d(x, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    """Transposed convolution (the adjoint of conv2d), as torch.nn.functional.conv_transpose2d;
    groups and dilation must be 1."""
    op = "conv_transpose2d"
    _unsupported(op, groups=groups, dilation=dilation)
    _check_conv_tensors(op, x, weight, bias)
    # The checks here are the op's own: on conv2d's kernels in adjoint roles x plays the output
    # gradient, so a kernel's message would not be in this op's terms.
    stride, padding = pair(op, "stride", stride, 1), pair(op, "padding", padding, 0)
    output_padding = pair(op, "output_padding", output_padding, 0)
    if output_padding[0] >= stride[0] or output_padding[1] >= stride[1]:
        raise ValueError(f"{op}: output_padding {output_padding} must be smaller than stride {stride}")
    n, c, h, w_ = x.shape
    cw, k, kh, kw = weight.shape
    if c != cw:
        raise ValueError(f"{op}: input x has {c} channels (shape {x.shape}) but weight expects {cw} "
                         f"(weight shape {weight.shape}, which is (in, out, kh, kw))")
    if bias is not None and bias.shape != (k,):
        raise ValueError(f"{op}: bias must have shape ({k},) for weight {weight.shape}, got {bias.shape}")
    ho, wo = _conv_transpose2d_out_hw((h, w_), (kh, kw), stride, padding, output_padding)
    if ho < 1 or wo < 1:
        raise ValueError(f"{op}: padding {padding} leaves no output for x {x.shape} and weight {weight.shape}")
    return ConvTranspose2d.apply(x, weight, bias, stride=stride, padding=padding, output_padding=output_padding)


# ---- pooling, concatenation, cropping --------------------------------------------------

class MaxPool2d(Function):
    fresh_grads = True  # kernel outputs (minunet.contract: kernels return fresh arrays)
    name = "max_pool2d"

    def forward(self, x, kernel_size, stride, padding):
        # x: (N, C, H, W) -> y: (N, C, Ho, Wo), with the argmax saved for backward
        self.x_shape = x.shape
        y, self.argmax = backend.kernels_for(x).max_pool2d_forward(_contiguous(x), kernel_size, stride, padding)
        return y

    def backward(self, gy):
        return backend.kernels_for(gy).max_pool2d_backward(_contiguous(gy), self.argmax, self.x_shape)


def max_pool2d(x, kernel_size, stride=None, padding=0):
    """Max pooling, as torch.nn.functional.max_pool2d (floor mode, no dilation)."""
    op = "max_pool2d"
    _check_tensor(x, op, "input x", 4)
    kernel_size = pair(op, "kernel_size", kernel_size, 1)
    stride = kernel_size if stride is None else pair(op, "stride", stride, 1)
    return MaxPool2d.apply(x, kernel_size=kernel_size, stride=stride, padding=pair(op, "padding", padding, 0))


class Concat(Function):
    """Concatenation along channels, each input cropped to a window first: one kernel does both."""
    name = "cat"

    def forward(self, *xs, offsets, out_hw):
        # xs[i]: (N, C_i, H_i, W_i) -> y: (N, sum C_i, H, W)
        self.shapes, self.offsets = [x.shape for x in xs], offsets
        return backend.kernels_for(xs[0]).concat_forward([_contiguous(x) for x in xs], offsets, out_hw)

    def backward(self, gy):
        return tuple(backend.kernels_for(gy).concat_backward(_contiguous(gy), self.shapes, self.offsets))


class ConcatAnyDim(Function):
    name = "cat"

    def forward(self, *xs, dim):
        # xs[i]: (..., D_i, ...) -> y: (..., sum D_i, ...)
        self.dim, self.sizes = dim, [x.shape[dim] for x in xs]
        return backend.array_module(xs[0]).concatenate(xs, axis=dim)

    def backward(self, gy):
        xp = backend.array_module(gy)
        return tuple(xp.split(gy, np.cumsum(self.sizes)[:-1].tolist(), axis=self.dim))


def cat(tensors, dim=0):
    """Concatenate tensors along `dim`, as torch.cat."""
    op = "cat"
    tensors = list(tensors)
    if not tensors:
        raise ValueError(f"{op}: expected a non-empty list of tensors")
    for i, t in enumerate(tensors):
        _check_tensor(t, op, f"tensors[{i}]")
    _check_same(op, **{f"tensors[{i}]": t for i, t in enumerate(tensors)})
    ndim = tensors[0].ndim
    if not -ndim <= dim < ndim:
        raise ValueError(f"{op}: dim {dim} is out of range for {ndim}-D tensors")
    dim %= ndim
    ref = tensors[0].shape
    for i, t in enumerate(tensors):
        if t.ndim != ndim or any(a != b for d, (a, b) in enumerate(zip(t.shape, ref)) if d != dim):
            shapes = ", ".join(str(t.shape) for t in tensors)
            raise ValueError(f"{op}: sizes must match except in dim {dim}; got shapes {shapes}")
    if ndim == 4 and dim == 1:
        return Concat.apply(*tensors, offsets=[(0, 0)] * len(tensors), out_hw=ref[2:])
    return ConcatAnyDim.apply(*tensors, dim=dim)


def center_crop(x, size):
    """Crop the centre (H, W) window of the last two dims, as the valid-padding U-Net does with
    its skip features. Where the margin is odd, the extra row/column is cut at the bottom/right."""
    op = "center_crop"
    _check_tensor(x, op, "input x")
    if x.ndim < 2:
        raise ValueError(f"{op}: input x needs at least 2 dims, got shape {x.shape}")
    h, w = pair(op, "size", size, 1)
    H, W = x.shape[-2:]
    if h > H or w > W:
        raise ValueError(f"{op}: cannot crop {(h, w)} out of input x {x.shape}")
    lead = x.shape[:-2]
    x4 = x.reshape(int(np.prod(lead[:-1])) if len(lead) > 1 else 1, lead[-1] if lead else 1, H, W)
    y = Concat.apply(x4, offsets=[((H - h) // 2, (W - w) // 2)], out_hw=(h, w))
    return y.reshape(*lead, h, w)


# ---- activations -----------------------------------------------------------------------

class ReLU(Function):
    name = "relu"

    def forward(self, x):
        # x: (...) -> y: (...)
        self.y = backend.kernels_for(x).relu_forward(_contiguous(x))
        return self.y

    def backward(self, gy):
        return backend.kernels_for(gy).relu_backward(_contiguous(gy), self.y)


def relu(x):
    _check_tensor(x, "relu", "input x")
    return ReLU.apply(x)


def _sigmoid(xp, x):
    return xp.exp(-xp.logaddexp(0, -x))  # 1 / (1 + e^-x) without overflow for large |x|


class Sigmoid(Function):
    name = "sigmoid"

    def forward(self, x):
        self.y = _sigmoid(backend.array_module(x), x)
        return self.y

    def backward(self, gy):
        return gy * self.y * (1 - self.y)


def sigmoid(x):
    _check_tensor(x, "sigmoid", "input x")
    return Sigmoid.apply(x)


class Softmax(Function):
    name = "softmax"

    def forward(self, x, dim):
        xp = backend.array_module(x)
        e = xp.exp(x - x.max(axis=dim, keepdims=True))
        self.y, self.dim = e / e.sum(axis=dim, keepdims=True), dim
        return self.y

    def backward(self, gy):
        return self.y * (gy - (gy * self.y).sum(axis=self.dim, keepdims=True))


class LogSoftmax(Function):
    name = "log_softmax"

    def forward(self, x, dim):
        xp = backend.array_module(x)
        z = x - x.max(axis=dim, keepdims=True)
        self.y, self.dim = z - xp.log(xp.exp(z).sum(axis=dim, keepdims=True)), dim
        return self.y

    def backward(self, gy):
        xp = backend.array_module(gy)
        return gy - xp.exp(self.y) * gy.sum(axis=self.dim, keepdims=True)


def _dim(x, dim, op):
    if not -x.ndim <= dim < x.ndim:
        raise ValueError(f"{op}: dim {dim} is out of range for input x of shape {x.shape}")
    return dim % x.ndim


def softmax(x, dim):
    _check_tensor(x, "softmax", "input x")
    return Softmax.apply(x, dim=_dim(x, dim, "softmax"))


def log_softmax(x, dim):
    _check_tensor(x, "log_softmax", "input x")
    return LogSoftmax.apply(x, dim=_dim(x, dim, "log_softmax"))


def dropout(x, p=0.5, training=True):
    """Zero each element with probability p and scale the rest by 1/(1-p), in training only."""
    _check_tensor(x, "dropout", "input x")
    if not 0 <= p <= 1:
        raise ValueError(f"dropout: p must be in [0, 1], got {p}")
    if not training or p == 0:
        return x
    xp = backend.array_module(x.data)
    if p == 1:
        return x * xp.zeros(x.shape, dtype=x.dtype)
    keep = (xp.random.random_sample(x.shape) >= p).astype(x.dtype) / x.dtype.type(1 - p)
    return x * keep


# ---- losses ----------------------------------------------------------------------------

class SoftmaxCrossEntropy(Function):
    """Per-pixel weighted cross-entropy of softmax(x) over channels: (N,C,H,W) -> (N,H,W)."""
    name = "cross_entropy"

    def forward(self, x, target, weight, ignore_index):
        # x: (N, C, H, W), target: (N, H, W) -> loss: (N, H, W)
        self.target, self.weight, self.ignore_index = target, weight, ignore_index
        loss, self.p = backend.kernels_for(x).softmax_cross_entropy_forward(x, target, weight, ignore_index)
        return loss

    def backward(self, gloss):
        k = backend.kernels_for(gloss)
        return k.softmax_cross_entropy_backward(self.p, self.target, self.weight, self.ignore_index,
                                                _contiguous(gloss)), None, None


def _check_target(logits, target, op):
    """Validate integer class targets against (N, C, ...) logits; return them as int64."""
    target = _array_arg(target, logits.data, op, "target")
    if target.dtype.kind not in "iu":
        raise TypeError(f"{op}: target must hold integer class indices, got dtype {target.dtype}")
    expected = (logits.shape[0],) + logits.shape[2:]
    if target.shape != expected:
        raise ValueError(f"{op}: target has shape {tuple(target.shape)}, expected {expected} for logits {logits.shape}")
    return target.astype(np.int64, copy=False)


def check_class_indices(target, n_classes, ignore_index=-100, prefix="", suffix=""):
    """Raise ValueError if `target` (on any device) holds a class index outside [0, n_classes) other
    than ignore_index. It reads the answer on the host: a step captured as a CUDA graph cannot, so
    its caller checks each batch's host array with it before copying the batch in."""
    bad = (target != ignore_index) & ((target < 0) | (target >= n_classes))
    if bool(bad.any()):
        values = sorted(set(backend.to_numpy(target[bad]).tolist()))[:10]
        raise ValueError(f"{prefix}target holds class indices {values} outside [0, {n_classes}) "
                         f"(ignore_index={ignore_index}){suffix}")


def cross_entropy(logits, target, weight=None, ignore_index=-100, reduction="mean"):
    """Softmax cross-entropy over dim 1, as torch.nn.functional.cross_entropy.

    logits: (N, C) or (N, C, H, W); target: integer class indices, (N,) or (N, H, W); weight: (C,)
    class weights; pixels whose target is ignore_index count for nothing. 'mean' divides by the
    summed weight of the pixels that count.
    """
    op = "cross_entropy"
    _check_tensor(logits, op, "logits", (2, 4))
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"{op}: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    target = _check_target(logits, target, op)
    n_classes = logits.shape[1]
    xp = backend.array_module(logits.data)
    if not backend.capturing(target):  # a captured step's caller checks each batch on the host
        check_class_indices(target, n_classes, ignore_index, f"{op}: ", f" for logits {logits.shape}")
    if weight is not None:  # a (C,) vector: the kernel's contract checks its shape
        weight = xp.ascontiguousarray(_array_arg(weight, logits.data, op, "weight").astype(logits.dtype))
    x4 = logits if logits.ndim == 4 else logits.reshape(*logits.shape, 1, 1)
    t3 = target.reshape(x4.shape[0], *x4.shape[2:])
    loss = SoftmaxCrossEntropy.apply(x4, xp.ascontiguousarray(t3), weight, ignore_index=int(ignore_index))
    if logits.ndim == 2:
        loss = loss.reshape(logits.shape[0])
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    valid = target != ignore_index
    total = (weight[xp.where(valid, target, 0)] * valid).sum() if weight is not None else valid.sum()
    return loss.sum() / total.astype(logits.dtype)


class BCEWithLogits(Function):
    name = "binary_cross_entropy_with_logits"

    def forward(self, x, t, pos_weight):
        # x, t: (...) -> loss: (...) = -[pw t log s(x) + (1 - t) log(1 - s(x))]
        xp = backend.array_module(x)
        self.x, self.t, self.pw = x, t, pos_weight
        self.softplus_neg = xp.logaddexp(0, -x)  # -log s(x), stable
        lw = 1 if pos_weight is None else 1 + (pos_weight - 1) * t
        return (1 - t) * x + lw * self.softplus_neg

    def backward(self, gy):
        xp = backend.array_module(gy)
        x, t, pw = self.x, self.t, self.pw
        lw = 1 if pw is None else 1 + (pw - 1) * t
        gx = gy * ((1 - t) - lw * _sigmoid(xp, -x)) if self.needs_input_grad[0] else None
        gt = None
        if self.needs_input_grad[1]:
            gt = gy * (-x + (0 if pw is None else (pw - 1) * self.softplus_neg))
        return gx, gt, None


def binary_cross_entropy_with_logits(logits, target, weight=None, pos_weight=None, reduction="mean"):
    """Sigmoid + binary cross-entropy in one stable op, as in PyTorch (pos_weight broadcasts
    against the target, so (C, 1, 1) weighs the positives of each channel of (N, C, H, W))."""
    op = "binary_cross_entropy_with_logits"
    _check_tensor(logits, op, "logits")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"{op}: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if isinstance(target, Tensor):
        _check_tensor(target, op, "target")
        _check_same(op, logits=logits, target=target)
    else:
        target = Tensor(_array_arg(target, logits.data, op, "target").astype(logits.dtype))
    if target.shape != logits.shape:
        raise ValueError(f"{op}: target has shape {target.shape}, logits {logits.shape}; they must match")
    if pos_weight is not None:
        pos_weight = _array_arg(pos_weight, logits.data, op, "pos_weight").astype(logits.dtype)
        try:
            np.broadcast_shapes(pos_weight.shape, logits.shape)
        except ValueError:
            raise ValueError(f"{op}: pos_weight of shape {tuple(pos_weight.shape)} does not broadcast "
                             f"against logits {logits.shape}") from None
    loss = BCEWithLogits.apply(logits, target, pos_weight)
    if weight is not None:
        weight = _array_arg(weight, logits.data, op, "weight").astype(logits.dtype)
        loss = loss * weight
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.mean()


def dice_loss(logits, target, ignore_index=None, eps=1.0, all_sum=None):
    """Soft multi-class Dice loss: 1 - mean over classes of (2|P∩T| + eps) / (|P| + |T| + eps),
    with P = softmax(logits) and T the one-hot target, summed over the batch and the pixels.
    all_sum: a differentiable function the per-class sums pass through before the ratio; data-
    parallel training gives the sum over the processes (minunet.distributed.all_sum), so that
    the loss is the Dice of the global batch."""
    op = "dice_loss"
    _check_tensor(logits, op, "logits", 4)
    target = _check_target(logits, target, op)
    xp = backend.array_module(logits.data)
    n_classes = logits.shape[1]
    valid = (target != ignore_index) if ignore_index is not None else xp.ones(target.shape, bool)
    t = xp.where(valid, target, 0)
    if not backend.capturing(t) and bool(((t < 0) | (t >= n_classes)).any()):
        raise ValueError(f"{op}: target holds class indices outside [0, {n_classes}) for logits {logits.shape}")
    onehot = (t[:, None] == xp.arange(n_classes)[None, :, None, None]) & valid[:, None]
    onehot = onehot.astype(logits.dtype)
    p = softmax(logits, 1) * valid[:, None].astype(logits.dtype)
    inter = (p * onehot).sum(axis=(0, 2, 3))
    denom = p.sum(axis=(0, 2, 3)) + onehot.sum(axis=(0, 2, 3))
    if all_sum is not None:
        inter, denom = all_sum(inter), all_sum(denom)
    dice = (inter * 2 + eps) / (denom + eps)
    return 1 - dice.mean()


# ---- normalisation ---------------------------------------------------------------------

class BatchNorm(Function):
    name = "batch_norm"

    def forward(self, x, gamma, beta, mean, var, eps, training, stats):
        # x: (N, C, H, W), gamma, beta: (C,) -> y: (N, C, H, W)
        k, x = backend.kernels_for(x), _contiguous(x)
        y, self.mean, self.var = k.batch_norm_forward(x, gamma, beta, mean, var, eps, training)
        self.x, self.gamma, self.eps, self.training = x, gamma, eps, training
        stats["mean"], stats["var"] = self.mean, self.var  # for the running-statistics update
        return y

    def backward(self, gy):
        k = backend.kernels_for(gy)
        gx, ggamma, gbeta = k.batch_norm_backward(_contiguous(gy), self.x, self.gamma, self.mean, self.var,
                                                  self.eps, self.training)
        return gx, ggamma, gbeta


def batch_norm(x, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    """Batch normalisation over (N, H, W) per channel, as torch.nn.functional.batch_norm.

    In training mode the batch statistics normalise x and, where running_mean/running_var
    are given, update them in place (the variance unbiased, as in PyTorch); in eval mode the
    running statistics are used.
    """
    op = "batch_norm"
    _check_tensor(x, op, "input x", (2, 4))
    c = x.shape[1]
    xp = backend.array_module(x.data)

    def param(p, arg, fill):
        if p is None:
            return Tensor(xp.full((c,), fill, dtype=x.dtype))
        _check_tensor(p, op, arg, 1)
        _check_same(op, x=x, **{arg: p})
        return p  # its shape is the kernel's contract's to check

    def stat(s, arg):
        if s is None:
            return None
        s = s.data if isinstance(s, Tensor) else s
        if backend.device_of(s) != x.device or tuple(s.shape) != (c,):
            raise ValueError(f"{op}: {arg} must be a ({c},) array on {x.device}, "
                             f"got shape {tuple(s.shape)} on {backend.device_of(s)}")
        return s

    gamma, beta = param(weight, "weight", 1), param(bias, "bias", 0)
    running_mean, running_var = stat(running_mean, "running_mean"), stat(running_var, "running_var")
    m = x.data.size // c
    if training and m < 2:
        raise ValueError(f"{op}: training needs more than one value per channel, got input x {x.shape}")
    if not training and (running_mean is None or running_var is None):
        raise ValueError(f"{op}: eval mode needs running_mean and running_var")
    x4 = x if x.ndim == 4 else x.reshape(*x.shape, 1, 1)
    mean = None if training else _contiguous(running_mean.astype(x.dtype, copy=False))
    var = None if training else _contiguous(running_var.astype(x.dtype, copy=False))
    stats = {}
    y = BatchNorm.apply(x4, gamma, beta, mean, var, eps=float(eps), training=bool(training), stats=stats)
    if training and running_mean is not None:
        running_mean *= 1 - momentum
        running_mean += momentum * stats["mean"].astype(running_mean.dtype)
    if training and running_var is not None:
        running_var *= 1 - momentum
        running_var += momentum * (stats["var"] * (m / (m - 1))).astype(running_var.dtype)
    return y if x.ndim == 4 else y.reshape(x.shape)

