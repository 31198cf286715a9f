"""minunet.cpu.conv_transpose2d: the transposed convolution whose kernel equals its stride.

A transposed convolution in general is conv2d's adjoint, and minunet.functional runs it on
conv2d's kernels. When the kernel equals the stride and there is no padding (the U-Net's 2x2
stride-2 up-convolution) every input pixel owns its own kh x kw patch of the output, with no
overlap:

    y[n, o, i*kh + u, j*kw + v] = b[o] + sum_c x[n, c, i, j] * w[c, o, u, v]

so the whole op is one GEMM per image and a reshuffle, and so are its gradients. With
z[n] = the patches of y as columns, z[n, (o,u,v), (i,j)] = y[n, o, i*kh+u, j*kw+v] - b[o]:

    forward          z[n] (Cout*kh*kw, H*W) = W.T (Cout*kh*kw, Cin) @ x[n] (Cin, H*W), then into place
    backward_input   gx[n] (Cin, H*W) = W (Cin, Cout*kh*kw) @ patches(gy)[n] (Cout*kh*kw, H*W)
    backward_weight  gW (Cin, Cout*kh*kw) = sum_n x[n] (Cin, H*W) @ patches(gy)[n].T, computed
                     transposed: sum_n patches(gy)[n] @ x[n].T, x[n].T laid out pixel-major

The products run on numba's threads with SIMD micro-kernels (gemm.py, which says why not
BLAS), one task per block of input rows of one image (for the weight gradient, per block of
output channels), the patches of y (or of gy) going into (or coming out of) place in the same
task.
"""
import numba
import numpy as np

from minunet.cpu import gemm
from minunet.cpu.runtime import empty


def conv_transpose2d_forward(x, w, b):
    # x: (N, Cin, H, W), w: (Cin, Cout, kh, kw), b: (Cout,) or None -> y: (N, Cout, H*kh, W*kw)
    N, Cin, H, W = x.shape
    _, Cout, kh, kw = w.shape
    y = empty((N, Cout, H * kh, W * kw), x.dtype)
    gemm.patches_forward(x, np.ascontiguousarray(w.reshape(Cin, -1).T), np.zeros(Cout, x.dtype) if b is None else b,
                         gemm.row_blocks(H, W), y)
    return y


def conv_transpose2d_backward_input(gy, w):
    # gy: (N, Cout, H*kh, W*kw), w: (Cin, Cout, kh, kw) -> gx: (N, Cin, H, W)
    N, Cout, Ho, Wo = gy.shape
    Cin, _, kh, kw = w.shape
    gx = empty((N, Cin, Ho // kh, Wo // kw), gy.dtype)
    gemm.patches_backward_input(gy, w.reshape(Cin, -1), gemm.row_blocks(Ho // kh, Wo // kw), gx)
    return gx


def conv_transpose2d_backward_weight(x, gy, w_shape):
    # x: (N, Cin, H, W), gy: (N, Cout, H*kh, W*kw) -> gw: w_shape = (Cin, Cout, kh, kw)
    N, Cin, H, W = x.shape
    _, Cout, kh, kw = w_shape
    xt = empty((N, H * W, Cin), x.dtype)
    gemm.transposed_planes(x.reshape(N, Cin, H * W), xt)
    gwt = np.empty((1, Cout * kh * kw, Cin), x.dtype)
    gemm.patches_weight_gradient(gy, kh, kw, xt, gemm.weight_rows(Cout * kh * kw, kh * kw, numba.get_num_threads()),
                                 gemm.row_blocks(H, W), gwt[0])
    gw = np.empty(w_shape, x.dtype)
    gemm.transposed_planes(gwt, gw.reshape(1, Cin, -1))
    return gw
