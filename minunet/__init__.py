"""minunet: U-Net semantic segmentation from scratch.

A small autograd engine (minunet.autograd) over NumPy arrays on the CPU and CuPy arrays on
NVIDIA GPUs; differentiable ops written once (minunet.functional) over two kernel backends
(minunet.cpu: numba, minunet.cuda: hand-written CUDA C); layers, the U-Net, optimizers,
data, training and a `minunet` command on top. This file only re-exports: importing minunet
changes nothing in the process (no environment variable, no numba, OpenMP or BLAS setting;
minunet/cpu/runtime.py says what the CPU kernels set up, and when).
"""
from minunet import functional as F
from minunet import nn, optim
from minunet.autograd import Tensor, no_grad, tensor
from minunet.contract import debug
from minunet.unet import UNet

__version__ = "0.1.0"
__all__ = ["Tensor", "tensor", "no_grad", "UNet", "F", "nn", "optim", "debug"]
