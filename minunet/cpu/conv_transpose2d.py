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
    backward_weight  gW (Cin, Cout*kh*kw) = sum_n x[n] (Cin, H*W) @ patches(gy)[n].T

`_patches_to_image` is the reshuffle (numba, one plane per prange iteration) and `_patches`
its inverse, conv2d's im2col at stride = kernel; the GEMMs run on BLAS with one thread (see
runtime.py), one per image, in batches whose patches fit the scratch buffer.
"""
import numpy as np
from numba import prange

from minunet.cpu.conv2d import _cols
from minunet.cpu.runtime import batches, kernel, one_blas_thread, scratch


@kernel
def _patches_to_image(z, b, kh, kw, y):
    # z: (N, Cout*kh*kw, H*W) -> y: (N, Cout, H*kh, W*kw), y[n, o, i*kh+u, j*kw+v] = z[n, (o,u,v), (i,j)] + b[o].
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


def _patches(gy, kh, kw):
    """The patches of gy (a slice of the batch) as columns, (n, Cout*kh*kw, H*W), in the scratch
    buffer: im2col with stride = kernel and no padding, which is exactly the reshuffle
    _patches_to_image undoes."""
    return _cols(gy, (kh, kw), (kh, kw), (0, 0), gy.shape[2] // kh, gy.shape[3] // kw)


@one_blas_thread
def conv_transpose2d_forward(x, w, b):
    # x: (N, Cin, H, W), w: (Cin, Cout, kh, kw), b: (Cout,) or None -> y: (N, Cout, H*kh, W*kw)
    N, Cin, H, W = x.shape
    _, Cout, kh, kw = w.shape
    y = np.empty((N, Cout, H * kh, W * kw), x.dtype)
    b = np.zeros(Cout, x.dtype) if b is None else b
    for s in batches(N, Cout * kh * kw * H * W * x.itemsize):
        z = scratch((s.stop - s.start, Cout * kh * kw, H * W), x.dtype)
        np.matmul(w.reshape(Cin, -1).T, x[s].reshape(-1, Cin, H * W), out=z)
        _patches_to_image(z, b, kh, kw, y[s])
    return y


@one_blas_thread
def conv_transpose2d_backward_input(gy, w):
    # gy: (N, Cout, H*kh, W*kw), w: (Cin, Cout, kh, kw) -> gx: (N, Cin, H, W)
    N, Cout, Ho, Wo = gy.shape
    Cin, _, kh, kw = w.shape
    gx = np.empty((N, Cin, Ho // kh, Wo // kw), gy.dtype)
    for s in batches(N, gy[0].nbytes):
        np.matmul(w.reshape(Cin, -1), _patches(gy[s], kh, kw), out=gx[s].reshape(-1, Cin, gx.shape[2] * gx.shape[3]))
    return gx


@one_blas_thread
def conv_transpose2d_backward_weight(x, gy, w_shape):
    # x: (N, Cin, H, W), gy: (N, Cout, H*kh, W*kw) -> gw: w_shape = (Cin, Cout, kh, kw)
    N, Cin, H, W = x.shape
    _, _, kh, kw = w_shape
    gw = np.zeros((Cin, gy.shape[1] * kh * kw), x.dtype)
    for s in batches(N, gy[0].nbytes):
        gw += np.matmul(x[s].reshape(-1, Cin, H * W), _patches(gy[s], kh, kw).transpose(0, 2, 1)).sum(axis=0)
    return gw.reshape(w_shape)
