"""minunet: U-Net semantic segmentation from scratch.

A small autograd engine (minunet.autograd) over NumPy arrays on the CPU and CuPy arrays on
NVIDIA GPUs; differentiable ops written once (minunet.functional) over two kernel backends
(minunet.cpu: numba, minunet.cuda: hand-written CUDA C); layers, the U-Net, optimizers,
data, training and a `minunet` command on top. This file re-exports, and first of all makes
one setting that must be made before NumPy loads its BLAS.
"""
import os
import sys

# OpenBLAS (numpy's BLAS, which runs minunet's CPU GEMMs) keeps its worker threads spinning
# for about 2^28 cycles after each call, in case another comes. In minunet the next call is
# nearly always a numba kernel, whose own threads then share the cores with those spinners:
# measured on 2 cores, that made the U-Net training step 20% slower. OpenBLAS reads this
# setting once, when it loads, so it is set here, only if NumPy is not loaded yet and only if
# the user has not chosen a value (its minimum, 4, puts idle workers to sleep at once).
if "numpy" not in sys.modules:
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

from minunet import functional as F  # noqa: E402  (after the setting above)
from minunet import nn, optim
from minunet.autograd import Tensor, no_grad, tensor
from minunet.unet import UNet

__version__ = "0.1.0"
__all__ = ["Tensor", "tensor", "no_grad", "UNet", "F", "nn", "optim"]
