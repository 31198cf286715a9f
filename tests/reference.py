"""tests/reference.py: the oracle. Naive NumPy float64 implementations of every minunet op,
forward and backward, written straight from the definitions in minunet/backend.py.

Everything here computes in float64 whatever it is given, returns fresh arrays and never
touches its arguments (the optimizer rules return the updated arrays instead of writing in
place). The code favours being obviously right over being fast: convolutions loop over the
kernel offsets (u, v) and do one vectorised product per offset; pooling loops over window
offsets. That is quick enough for the small shapes the tests use.

Trust comes from two directions: minunet never imports this file and this file never imports
minunet, so a backend is always checked against an independent implementation; and
tests/test_reference.py checks this file against PyTorch in float64 where PyTorch is
installed, which pins PyTorch's semantics (reductions, ties, running statistics, optimizer
rules).

Names follow the backend contract (conv2d_backward_weight here is conv2d_backward_weight
there); variables follow Chainer: x, w, b, y, gy, gx, gw, gb. Layout is NCHW throughout;
stride, padding, output_padding and kernel_size are (h, w) pairs.
"""
import numpy as np


def _f64(a):
    return None if a is None else np.asarray(a, dtype=np.float64)


def _pair(v):
    return (v, v) if np.isscalar(v) else tuple(v)


def conv_out_size(size, k, s, p):
    """Output length of a convolution or pooling along one axis."""
    return (size + 2 * p - k) // s + 1


def _taps(u, s, n):
    """Slice of a padded axis holding the inputs that kernel tap u meets at outputs 0..n-1:
    output i reads padded position i*s + u."""
    return slice(u, u + s * (n - 1) + 1, s)


# ----------------------------------------------------------------------------- convolution

def conv2d_forward(x, w, b, stride, padding):
    """y[n,k,i,j] = b[k] + sum_{c,u,v} x[n,c,i*sh-ph+u, j*sw-pw+v] * w[k,c,u,v]."""
    # x: (N, C, H, W), w: (K, C, kh, kw), b: (K,) or None -> y: (N, K, Ho, Wo)
    x, w, b = _f64(x), _f64(w), _f64(b)
    (sh, sw), (ph, pw) = _pair(stride), _pair(padding)
    N, C, H, W = x.shape
    K, _, kh, kw = w.shape
    Ho, Wo = conv_out_size(H, kh, sh, ph), conv_out_size(W, kw, sw, pw)
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))  # zero padding
    y = np.zeros((N, K, Ho, Wo))
    for u in range(kh):
        for v in range(kw):
            xuv = xp[:, :, _taps(u, sh, Ho), _taps(v, sw, Wo)]  # (N, C, Ho, Wo)
            y += np.einsum("nchw,kc->nkhw", xuv, w[:, :, u, v])
    if b is not None:
        y += b[None, :, None, None]
    return y


def conv2d_backward_input(gy, w, x_shape, stride, padding):
    """gx = d/dx sum(y * gy): each output scatters gy * w back onto the inputs it read."""
    # gy: (N, K, Ho, Wo), w: (K, C, kh, kw) -> gx: x_shape = (N, C, H, W)
    gy, w = _f64(gy), _f64(w)
    (sh, sw), (ph, pw) = _pair(stride), _pair(padding)
    N, C, H, W = x_shape
    _, _, kh, kw = w.shape
    _, _, Ho, Wo = gy.shape
    gxp = np.zeros((N, C, H + 2 * ph, W + 2 * pw))
    for u in range(kh):
        for v in range(kw):
            gxp[:, :, _taps(u, sh, Ho), _taps(v, sw, Wo)] += np.einsum("nkhw,kc->nchw", gy, w[:, :, u, v])
    return gxp[:, :, ph:ph + H, pw:pw + W].copy()  # what landed on padding is dropped


def conv2d_backward_weight(x, gy, w_shape, stride, padding):
    """gw = d/dw sum(y * gy): gw[k,c,u,v] = sum_{n,i,j} gy[n,k,i,j] x[n,c,i*sh-ph+u, j*sw-pw+v]."""
    # x: (N, C, H, W), gy: (N, K, Ho, Wo) -> gw: w_shape = (K, C, kh, kw)
    x, gy = _f64(x), _f64(gy)
    (sh, sw), (ph, pw) = _pair(stride), _pair(padding)
    K, C, kh, kw = w_shape
    _, _, Ho, Wo = gy.shape
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    gw = np.zeros(w_shape)
    for u in range(kh):
        for v in range(kw):
            gw[:, :, u, v] = np.einsum("nkhw,nchw->kc", gy, xp[:, :, _taps(u, sh, Ho), _taps(v, sw, Wo)])
    return gw


def bias_backward(gy):
    """gb[c] = sum over n, h, w of gy[n, c, h, w]."""
    # gy: (N, C, H, W) -> gb: (C,)
    return _f64(gy).sum(axis=(0, 2, 3))


# ------------------------------------------------------------------- transposed convolution

def conv_transpose2d_output_size(H, k, s, p, op):
    return (H - 1) * s - 2 * p + k + op


def conv_transpose2d_forward(x, w, b, stride, padding, output_padding):
    """y[n,o,i*sh-ph+u, j*sw-pw+v] += x[n,c,i,j] * w[c,o,u,v], plus b[o].

    Written as a scatter onto an uncropped canvas whose row r is output row r - ph; the
    output_padding rows extend the canvas at the bottom/right, then the canvas is cropped."""
    # x: (N, Cin, H, W), w: (Cin, Cout, kh, kw), b: (Cout,) or None -> y: (N, Cout, Ho, Wo)
    x, w, b = _f64(x), _f64(w), _f64(b)
    (sh, sw), (ph, pw), (oph, opw) = _pair(stride), _pair(padding), _pair(output_padding)
    N, Cin, H, W = x.shape
    _, Cout, kh, kw = w.shape
    Ho = conv_transpose2d_output_size(H, kh, sh, ph, oph)
    Wo = conv_transpose2d_output_size(W, kw, sw, pw, opw)
    canvas = np.zeros((N, Cout, Ho + 2 * ph, Wo + 2 * pw))
    for u in range(kh):
        for v in range(kw):
            canvas[:, :, _taps(u, sh, H), _taps(v, sw, W)] += np.einsum("nchw,co->nohw", x, w[:, :, u, v])
    y = canvas[:, :, ph:ph + Ho, pw:pw + Wo].copy()
    if b is not None:
        y += b[None, :, None, None]
    return y


def conv_transpose2d_backward_input(gy, w, stride, padding):
    """gx = d/dx sum(y * gy): each input pixel gathers gy over the patch it was scattered onto,
    gx[n,c,i,j] = sum_{o,u,v} gy[n,o,i*sh-ph+u, j*sw-pw+v] w[c,o,u,v] (gy outside is 0).
    H = (Ho + 2ph - kh) // sh + 1, which undoes the forward's size for any output_padding < stride."""
    # gy: (N, Cout, Ho, Wo), w: (Cin, Cout, kh, kw) -> gx: (N, Cin, H, W)
    gy, w = _f64(gy), _f64(w)
    (sh, sw), (ph, pw) = _pair(stride), _pair(padding)
    N, _, Ho, Wo = gy.shape
    Cin, _, kh, kw = w.shape
    H, W = conv_out_size(Ho, kh, sh, ph), conv_out_size(Wo, kw, sw, pw)
    gyp = np.pad(gy, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    gx = np.zeros((N, Cin, H, W))
    for u in range(kh):
        for v in range(kw):
            gx += np.einsum("nohw,co->nchw", gyp[:, :, _taps(u, sh, H), _taps(v, sw, W)], w[:, :, u, v])
    return gx


def conv_transpose2d_backward_weight(x, gy, w_shape, stride, padding):
    """gw[c,o,u,v] = sum_{n,i,j} x[n,c,i,j] gy[n,o,i*sh-ph+u, j*sw-pw+v]."""
    # x: (N, Cin, H, W), gy: (N, Cout, Ho, Wo) -> gw: w_shape = (Cin, Cout, kh, kw)
    x, gy = _f64(x), _f64(gy)
    (sh, sw), (ph, pw) = _pair(stride), _pair(padding)
    Cin, Cout, kh, kw = w_shape
    _, _, H, W = x.shape
    gyp = np.pad(gy, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    gw = np.zeros(w_shape)
    for u in range(kh):
        for v in range(kw):
            gw[:, :, u, v] = np.einsum("nchw,nohw->co", x, gyp[:, :, _taps(u, sh, H), _taps(v, sw, W)])
    return gw


# ----------------------------------------------------------------------------- max pooling

def max_pool2d_forward(x, kernel_size, stride, padding):
    """y = the max over each window; argmax = h*W + w of the winner in its input plane.

    Window offsets are visited in row-major order and a later value must be strictly greater
    to win, so a tie goes to the first in window order. Padded places never win (they are
    masked out, not filled with a value)."""
    # x: (N, C, H, W) -> y: (N, C, Ho, Wo), argmax: int64 (N, C, Ho, Wo)
    x = _f64(x)
    (kh, kw), (sh, sw), (ph, pw) = _pair(kernel_size), _pair(stride), _pair(padding)
    N, C, H, W = x.shape
    Ho, Wo = conv_out_size(H, kh, sh, ph), conv_out_size(W, kw, sw, pw)
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    hs = np.arange(Ho) * sh - ph  # top row of each window, in input coordinates
    ws = np.arange(Wo) * sw - pw
    y = np.zeros((N, C, Ho, Wo))
    argmax = np.full((N, C, Ho, Wo), -1, dtype=np.int64)
    for u in range(kh):
        for v in range(kw):
            h, w = hs + u, ws + v
            inside = ((h >= 0) & (h < H))[:, None] & ((w >= 0) & (w < W))[None, :]  # (Ho, Wo)
            val = xp[:, :, _taps(u, sh, Ho), _taps(v, sw, Wo)]
            wins = inside & ((argmax < 0) | (val > y))
            y = np.where(wins, val, y)
            argmax = np.where(wins, h[:, None] * W + w[None, :], argmax)
    return y, argmax


def max_pool2d_backward(gy, argmax, x_shape):
    """gx[n,c].flat[argmax[n,c,i,j]] += gy[n,c,i,j]; overlapping windows add up."""
    # gy, argmax: (N, C, Ho, Wo) -> gx: x_shape = (N, C, H, W)
    gy = _f64(gy)
    N, C, H, W = x_shape
    gx = np.zeros((N * C, H * W))
    rows = np.repeat(np.arange(N * C), gy.shape[2] * gy.shape[3])
    np.add.at(gx, (rows, np.asarray(argmax).reshape(-1)), gy.reshape(-1))
    return gx.reshape(x_shape)


# ----------------------------------------------------------- concatenation with cropping

def concat_forward(xs, offsets, out_hw):
    """y[:, c0_i + c, h, w] = xs[i][:, c, top_i + h, left_i + w]: crop each input to the
    out_hw window at its (top, left) offset, then stack along channels."""
    # xs: [(N, C_i, H_i, W_i)], offsets: [(top_i, left_i)], out_hw: (H, W) -> y: (N, sum C_i, H, W)
    H, W = out_hw
    return np.concatenate([_f64(x)[:, :, t:t + H, l:l + W] for x, (t, l) in zip(xs, offsets)], axis=1)


def concat_backward(gy, x_shapes, offsets):
    """gx_i: zero outside input i's crop window, its channel slice of gy inside."""
    # gy: (N, sum C_i, H, W) -> gxs: [x_shapes[i]]
    gy = _f64(gy)
    H, W = gy.shape[2:]
    gxs, c0 = [], 0
    for shape, (t, l) in zip(x_shapes, offsets):
        gx = np.zeros(shape)
        gx[:, :, t:t + H, l:l + W] = gy[:, c0:c0 + shape[1]]
        gxs.append(gx)
        c0 += shape[1]
    return gxs


# ----------------------------------------------------------------------------- activations

def relu_forward(x, b=None):
    """y = max(x + b[None, :, None, None], 0) for 4-D x with a per-channel bias; max(x, 0) without."""
    # x: (N, C, H, W), b: (C,) or None -> y: (N, C, H, W)
    x = _f64(x)
    if b is not None:
        x = x + _f64(b)[None, :, None, None]
    return np.maximum(x, 0.0)


def relu_backward(gy, y):
    """gx = gy where the output was positive, 0 elsewhere (the derivative at 0 is taken as 0)."""
    return _f64(gy) * (_f64(y) > 0)


def sigmoid(x):
    """1 / (1 + exp(-x)), computed without overflow for either sign of x."""
    x = _f64(x)
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def sigmoid_backward(gy, y):
    return _f64(gy) * _f64(y) * (1.0 - _f64(y))


def logsumexp(x, dim, keepdims=False):
    x = _f64(x)
    m = x.max(axis=dim, keepdims=True)
    s = m + np.log(np.exp(x - m).sum(axis=dim, keepdims=True))
    return s if keepdims else np.squeeze(s, axis=dim)


def softmax(x, dim):
    """exp(x) / sum exp(x) along dim (shifted by the max for stability)."""
    x = _f64(x)
    return np.exp(x - logsumexp(x, dim, keepdims=True))


def softmax_backward(gy, y, dim):
    """gx = y * (gy - sum(gy * y, dim)): the Jacobian diag(y) - y y^T applied to gy."""
    gy, y = _f64(gy), _f64(y)
    return y * (gy - (gy * y).sum(axis=dim, keepdims=True))


def log_softmax(x, dim):
    x = _f64(x)
    return x - logsumexp(x, dim, keepdims=True)


def log_softmax_backward(gy, y, dim):
    """gx = gy - softmax(x) * sum(gy, dim), with softmax(x) = exp(y)."""
    gy, y = _f64(gy), _f64(y)
    return gy - np.exp(y) * gy.sum(axis=dim, keepdims=True)


# ---------------------------------------------------------------------------------- losses

def _class_weight(target, weight, ignore_index):
    """weight[t] per pixel (1 without class weights), 0 where t == ignore_index."""
    target = np.asarray(target)
    keep = target != ignore_index
    t = np.where(keep, target, 0)  # any valid index; masked out below
    wt = np.ones(target.shape) if weight is None else _f64(weight)[t]
    return np.where(keep, wt, 0.0), t


def softmax_cross_entropy_forward(x, target, weight, ignore_index):
    """loss[n,h,w] = weight[t] * (logsumexp_c x[n,:,h,w] - x[n,t,h,w]), 0 where t is ignored;
    p = softmax over the channel axis (what backward needs)."""
    # x: (N, C, H, W), target: int64 (N, H, W), weight: (C,) or None -> loss: (N, H, W), p: (N, C, H, W)
    x = _f64(x)
    wt, t = _class_weight(target, weight, ignore_index)
    xt = np.take_along_axis(x, t[:, None], axis=1)[:, 0]
    return wt * (logsumexp(x, 1) - xt), softmax(x, 1)


def softmax_cross_entropy_backward(p, target, weight, ignore_index, gloss):
    """gx = gloss * weight[t] * (p - onehot(t)), 0 where t is ignored."""
    # p: (N, C, H, W), target, gloss: (N, H, W) -> gx: (N, C, H, W)
    p = _f64(p)
    wt, t = _class_weight(target, weight, ignore_index)
    onehot = np.arange(p.shape[1])[None, :, None, None] == t[:, None]
    return (_f64(gloss) * wt)[:, None] * (p - onehot)


def cross_entropy(x, target, weight=None, ignore_index=-100, reduction="mean"):
    """PyTorch's F.cross_entropy for x (N, C, H, W) and class-index targets: 'none' gives the
    per-pixel losses, 'sum' their sum, 'mean' their sum divided by the sum of weight[t] over
    the pixels that are not ignored (the number of such pixels without class weights)."""
    loss, _ = softmax_cross_entropy_forward(x, target, weight, ignore_index)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / _class_weight(target, weight, ignore_index)[0].sum()
    raise ValueError(f"cross_entropy: unknown reduction {reduction!r}")


def cross_entropy_backward(x, target, weight, ignore_index, reduction, gy):
    """gx of cross_entropy: gy is a scalar for 'mean'/'sum', (N, H, W) for 'none'."""
    _, p = softmax_cross_entropy_forward(x, target, weight, ignore_index)
    gy = _f64(gy)
    if reduction == "none":
        gloss = gy
    elif reduction == "sum":
        gloss = np.full(np.shape(target), gy)
    elif reduction == "mean":
        gloss = np.full(np.shape(target), gy / _class_weight(target, weight, ignore_index)[0].sum())
    else:
        raise ValueError(f"cross_entropy: unknown reduction {reduction!r}")
    return softmax_cross_entropy_backward(p, target, weight, ignore_index, gloss)


def _softplus(x):
    """log(1 + exp(x)) without overflow."""
    return np.maximum(x, 0.0) + np.log1p(np.exp(-np.abs(x)))


def _reduce(loss, reduction, op):
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean()
    raise ValueError(f"{op}: unknown reduction {reduction!r}")


def binary_cross_entropy_with_logits(x, target, weight=None, pos_weight=None, reduction="mean"):
    """PyTorch's F.binary_cross_entropy_with_logits:
    loss = -weight * (pos_weight * t * log(sigmoid(x)) + (1 - t) * log(1 - sigmoid(x))),
    with log(sigmoid(x)) = -softplus(-x) and log(1 - sigmoid(x)) = -softplus(x); weight and
    pos_weight broadcast against x as in PyTorch (pos_weight along the last axis)."""
    x, t = _f64(x), _f64(target)
    pw = 1.0 if pos_weight is None else _f64(pos_weight)
    loss = pw * t * _softplus(-x) + (1.0 - t) * _softplus(x)
    if weight is not None:
        loss = loss * _f64(weight)
    return _reduce(loss, reduction, "binary_cross_entropy_with_logits")


def binary_cross_entropy_with_logits_backward(x, target, weight, pos_weight, reduction, gy):
    """gx = weight * ((1 - t) * sigmoid(x) - pos_weight * t * (1 - sigmoid(x))) * g, g the
    upstream gradient per element (gy / numel for 'mean')."""
    x, t = _f64(x), _f64(target)
    pw = 1.0 if pos_weight is None else _f64(pos_weight)
    s = sigmoid(x)
    gx = (1.0 - t) * s - pw * t * (1.0 - s)
    if weight is not None:
        gx = gx * _f64(weight)
    gy = _f64(gy)
    if reduction == "mean":
        gy = gy / x.size
    elif reduction not in ("sum", "none"):
        raise ValueError(f"binary_cross_entropy_with_logits: unknown reduction {reduction!r}")
    return gx * gy


# ---------------------------------------------------------------------- batch normalisation

def _bn_axes(x):
    return (0,) + tuple(range(2, x.ndim))  # every axis but the channel axis


def _per_channel(a, ndim):
    return _f64(a).reshape((1, -1) + (1,) * (ndim - 2))


def batch_norm_forward(x, gamma, beta, mean, var, eps, training):
    """y = (x - mean) / sqrt(var + eps) * gamma + beta per channel; in training mode mean and
    var are the batch mean and biased variance over (N, H, W) (the arguments are ignored),
    else the given running statistics. Returns (y, mean, var) with the statistics used."""
    # x: (N, C, H, W), gamma, beta, mean, var: (C,) -> y: (N, C, H, W), mean, var: (C,)
    x = _f64(x)
    if training:
        mean, var = x.mean(axis=_bn_axes(x)), x.var(axis=_bn_axes(x))
    mean, var = _f64(mean), _f64(var)
    xhat = (x - _per_channel(mean, x.ndim)) / np.sqrt(_per_channel(var, x.ndim) + eps)
    return xhat * _per_channel(gamma, x.ndim) + _per_channel(beta, x.ndim), mean, var


def batch_norm_backward(gy, x, gamma, mean, var, eps, training):
    """(gx, ggamma, gbeta). ggamma = sum(gy * xhat), gbeta = sum(gy) over (N, H, W). In eval
    mode the statistics are constants: gx = gy * gamma / sqrt(var + eps). In training mode
    they depend on x, and with g = gy * gamma and means over the M = N*H*W values of a channel,
    gx = (g - mean(g) - xhat * mean(g * xhat)) / sqrt(var + eps)."""
    gy, x = _f64(gy), _f64(x)
    axes = _bn_axes(x)
    rstd = 1.0 / np.sqrt(_per_channel(var, x.ndim) + eps)
    xhat = (x - _per_channel(mean, x.ndim)) * rstd
    ggamma, gbeta = (gy * xhat).sum(axis=axes), gy.sum(axis=axes)
    g = gy * _per_channel(gamma, x.ndim)
    if training:
        gx = (g - g.mean(axis=axes, keepdims=True) - xhat * (g * xhat).mean(axis=axes, keepdims=True)) * rstd
    else:
        gx = g * rstd
    return gx, ggamma, gbeta


def batch_norm_update_running(running_mean, running_var, mean, var, count, momentum):
    """PyTorch's running statistics after one training step over `count` values per channel:
    r = (1 - momentum) * r + momentum * batch statistic, where the variance fed in is the
    unbiased one, var * count / (count - 1). Returns the new (running_mean, running_var)."""
    unbiased = _f64(var) * count / (count - 1)
    return ((1 - momentum) * _f64(running_mean) + momentum * _f64(mean),
            (1 - momentum) * _f64(running_var) + momentum * unbiased)


# ------------------------------------------------------------------------------ optimizers

def sgd_update(p, g, buf, lr, momentum, dampening, weight_decay, nesterov, first):
    """One step of PyTorch's SGD; returns the new (p, buf) (buf is None without momentum).
    d = g + weight_decay * p; buf = d on the first step, else momentum * buf + (1 - dampening) * d;
    the step direction is d + momentum * buf with nesterov, else buf; p -= lr * direction."""
    p, g = _f64(p), _f64(g)
    d = g + weight_decay * p
    if momentum != 0:
        buf = d.copy() if first else momentum * _f64(buf) + (1 - dampening) * d
        d = d + momentum * buf if nesterov else buf
    return p - lr * d, buf


def adam_update(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step, decoupled):
    """One step of PyTorch's Adam (decoupled=False: L2 penalty, g += weight_decay * p) or AdamW
    (decoupled=True: p *= 1 - lr * weight_decay); step counts from 1. Returns the new (p, m, v).
    m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
    p -= lr / (1 - b1^step) * m / (sqrt(v) / sqrt(1 - b2^step) + eps)."""
    p, g, m, v = _f64(p), _f64(g), _f64(m), _f64(v)
    if decoupled:
        p = p * (1 - lr * weight_decay)
    else:
        g = g + weight_decay * p
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    denom = np.sqrt(v) / np.sqrt(1 - beta2 ** step) + eps
    return p - lr / (1 - beta1 ** step) * m / denom, m, v


def adapted_rand_error_pairs(true_segments, pred_segments):
    """The adapted Rand error counted pair by pair: over every unordered pair of pixels that
    both lie in true segments (label != 0), precision = P(same in truth | same in prediction),
    recall = P(same in prediction | same in truth); error = 1 - their harmonic mean. Predicted
    label 0 is an ordinary segment."""
    t = np.asarray(true_segments).ravel()
    p = np.asarray(pred_segments).ravel()
    keep = t != 0
    t, p = t[keep], p[keep]
    i, j = np.triu_indices(t.size, k=1)
    same_true, same_pred = t[i] == t[j], p[i] == p[j]
    both = float(np.sum(same_true & same_pred))
    precision, recall = both / float(np.sum(same_pred)), both / float(np.sum(same_true))
    return 1.0 - (2 * precision * recall / (precision + recall) if precision + recall else 0.0)
