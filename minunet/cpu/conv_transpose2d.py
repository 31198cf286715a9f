"""minunet.cpu.conv_transpose2d: the transposed convolution, on conv2d's kernels.

Transposed convolution is the adjoint of convolution in x (as in Chainer): its forward is
conv2d's backward_input with the roles of x and gy swapped, its backward_input is conv2d's
forward and its backward_weight is conv2d's backward_weight with x and gy swapped. The U-Net's
up-convolution (kernel == stride, no padding) has patches that do not overlap, so v2 runs it
as one GEMM per image, z[n] (Cout*kh*kw, H*W) = W.T @ x[n], and a reshuffle of each pixel's
(Cout, kh, kw) patch into place, with the bias added on the way.
"""
import numpy as np
from numba import prange

from minunet.checks import ArrayChecks, conv_out_hw as _conv_out_hw, same_shape as _same_shape
from minunet.checks import version as _checked_version
from minunet.cpu.conv2d import (_batches, _conv2d_backward_input_v1, _conv2d_backward_input_v2,
                                _conv2d_backward_input_v3, _conv2d_backward_weight_v1, _conv2d_backward_weight_v2,
                                _conv2d_backward_weight_v3, _conv2d_forward_v1, _conv2d_forward_v2,
                                _conv2d_forward_v3)
from minunet.cpu.runtime import kernel, scratch

VERSIONS = {
    "conv_transpose2d_forward": (1, 2, 3),
    "conv_transpose2d_backward_input": (1, 2, 3),
    "conv_transpose2d_backward_weight": (1, 2, 3),
}
DEFAULT_VERSION = {name: 2 for name in VERSIONS}

_check = ArrayChecks(np, "CPU")
_floats, _vector = _check.floats, _check.vector


def _version(op, version):
    return _checked_version(op, version, VERSIONS[op], DEFAULT_VERSION[op])


@kernel
def _patches_to_image(z, b, kh, kw, y):
    # z: (N, Cout*kh*kw, H*W) -> y: (N, Cout, H*kh, W*kw), y[n, o, i*kh+u, j*kw+v] = z[n, (o,u,v), (i,j)] + b[o]:
    # col2im when kernel == stride and there is no padding, so every output has exactly one source.
    # One prange iteration per output plane y[n, o].
    N, Cout, Ho, Wo = y.shape
    H, W = Ho // kh, Wo // kw
    for no in prange(N * Cout):
        n, o = no // Cout, no % Cout
        for u in range(kh):
            for v in range(kw):
                src = z[n, (o * kh + u) * kw + v]
                for i in range(H):
                    dst = y[n, o, i * kh + u]
                    for j in range(W):
                        dst[j * kw + v] = src[i * W + j] + b[o]



def conv_transpose2d_forward(x, w, b, stride, padding, output_padding, version=None):
    # x: (N, Cin, H, W), w: (Cin, Cout, kh, kw), b: (Cout,) or None -> y: (N, Cout, Ho, Wo)
    op = "conv_transpose2d_forward"
    v = _version(op, version)
    dtype = _floats(op, ("x", x), ("w", w), ndim=4)
    N, Cin, H, W = x.shape
    if w.shape[0] != Cin:
        raise ValueError(f"{op}: x {x.shape} has {Cin} channels but w {w.shape} expects {w.shape[0]}")
    _, Cout, kh, kw = w.shape
    stride, padding, output_padding = tuple(stride), tuple(padding), tuple(output_padding)
    (sh, sw), (ph, pw), (oph, opw) = stride, padding, output_padding
    y_shape = (N, Cout, (H - 1) * sh - 2 * ph + kh + oph, (W - 1) * sw - 2 * pw + kw + opw)
    if y_shape[2] <= 0 or y_shape[3] <= 0:
        raise ValueError(f"{op}: input {H}x{W} with kernel {kh}x{kw}, stride {stride} and padding "
                         f"{padding} gives an empty output ({y_shape[2]}x{y_shape[3]})")
    if not (0 <= oph < sh and 0 <= opw < sw):
        raise ValueError(f"{op}: output_padding {output_padding} must be smaller than stride {stride}")
    b = None if b is None else _vector(op, "b", b, Cout, dtype)
    if v == 1:
        y = np.zeros(y_shape, dtype)
        _conv2d_backward_input_v1(x, w, sh, sw, ph, pw, y)
        if b is not None:
            y += b[:, None, None]
        return y
    if v == 3:
        return _conv2d_backward_input_v3(x, w, y_shape, stride, padding, b)
    if (kh, kw) == stride and padding == (0, 0) and output_padding == (0, 0):
        # patches that do not overlap: z[n] (Cout*kh*kw, H*W) = W.T @ x[n], then each into place
        b = np.zeros(Cout, dtype) if b is None else b
        y = np.empty(y_shape, dtype)
        for s in _batches(N, Cout * kh * kw * H * W * x.itemsize):
            z = scratch((s.stop - s.start, Cout * kh * kw, H * W), dtype)
            np.matmul(w.reshape(Cin, -1).T, x[s].reshape(-1, Cin, H * W), out=z)
            _patches_to_image(z, b, kh, kw, y[s])
        return y
    return _conv2d_backward_input_v2(x, w, y_shape, stride, padding, b)


def conv_transpose2d_backward_input(gy, w, stride, padding, version=None):
    # gy: (N, Cout, Ho, Wo), w: (Cin, Cout, kh, kw) -> gx: (N, Cin, H, W), a plain convolution
    op = "conv_transpose2d_backward_input"
    v = _version(op, version)
    dtype = _floats(op, ("gy", gy), ("w", w), ndim=4)
    if gy.shape[1] != w.shape[1]:
        raise ValueError(f"{op}: gy {gy.shape} has {gy.shape[1]} channels but w {w.shape} has Cout = {w.shape[1]}")
    stride, padding = tuple(stride), tuple(padding)
    Ho, Wo = _conv_out_hw(op, gy.shape[2:], w.shape[2:], stride, padding)
    if v == 1:
        gx = np.empty((gy.shape[0], w.shape[0], Ho, Wo), dtype)
        _conv2d_forward_v1(gy, w, np.zeros(w.shape[0], dtype), *stride, *padding, gx)
        return gx
    if v == 3:
        return _conv2d_forward_v3(gy, w, None, stride, padding, Ho, Wo)
    return _conv2d_forward_v2(gy, w, None, stride, padding, Ho, Wo)


def conv_transpose2d_backward_weight(x, gy, w_shape, stride, padding, version=None):
    # x: (N, Cin, H, W), gy: (N, Cout, Ho, Wo) -> gw: w_shape = (Cin, Cout, kh, kw)
    op = "conv_transpose2d_backward_weight"
    v = _version(op, version)
    dtype = _floats(op, ("x", x), ("gy", gy), ndim=4)
    stride, padding, w_shape = tuple(stride), tuple(padding), tuple(w_shape)
    Cin, Cout, kh, kw = w_shape
    if gy.shape[1] != Cout:
        raise ValueError(f"{op}: gy {gy.shape} has {gy.shape[1]} channels but w_shape {w_shape} has Cout = {Cout}")
    # in conv2d's terms gy is the input and x the output gradient
    _same_shape(op, "x", x, (gy.shape[0], Cin, *_conv_out_hw(op, gy.shape[2:], (kh, kw), stride, padding)))
    if v == 1:
        gw = np.empty(w_shape, dtype)
        _conv2d_backward_weight_v1(gy, x, *stride, *padding, gw)
        return gw
    if v == 3:
        return _conv2d_backward_weight_v3(gy, x, w_shape, stride, padding)
    return _conv2d_backward_weight_v2(gy, x, w_shape, stride, padding)
