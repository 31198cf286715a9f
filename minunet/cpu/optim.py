"""minunet.cpu.optim: the fused optimizer updates, in place, one element per prange iteration.

One kernel reads the gradient and the optimizer state of a parameter and writes the new
parameter and state in a single pass, following PyTorch's update rules exactly.
"""
import math

import numpy as np
from numba import prange

from minunet.checks import ArrayChecks, same_shape as _same_shape
from minunet.cpu.runtime import kernel

_check = ArrayChecks(np, "CPU")
_floats = _check.floats


@kernel
def _sgd(p, g, lr, weight_decay):
    for i in prange(p.size):
        p[i] -= lr * (g[i] + weight_decay * p[i])


@kernel
def _sgd_momentum(p, g, buf, lr, momentum, dampening, weight_decay, nesterov, first):
    for i in prange(p.size):
        d = g[i] + weight_decay * p[i]
        b = d if first else momentum * buf[i] + (1.0 - dampening) * d
        buf[i] = b
        p[i] -= lr * (d + momentum * b if nesterov else b)


@kernel
def _adam(p, g, m, v, lr, beta1, beta2, eps, weight_decay, decoupled, step_size, bias_correction2_sqrt):
    for i in prange(p.size):
        gi = g[i]
        if decoupled:
            p[i] *= 1.0 - lr * weight_decay
        else:
            gi += weight_decay * p[i]
        m[i] = beta1 * m[i] + (1.0 - beta1) * gi
        v[i] = beta2 * v[i] + (1.0 - beta2) * gi * gi
        p[i] -= step_size * m[i] / (math.sqrt(v[i]) / bias_correction2_sqrt + eps)


def sgd_update(p, g, buf, lr, momentum, dampening, weight_decay, nesterov, first):
    # p, g, buf: one shape; updates p (and buf) in place
    op = "sgd_update"
    if momentum == 0:
        _floats(op, ("p", p), ("g", g))
        _same_shape(op, "g", g, p.shape)
        _sgd(p.reshape(-1), g.reshape(-1), float(lr), float(weight_decay))
        return None
    _floats(op, ("p", p), ("g", g), ("buf", buf))
    _same_shape(op, "g", g, p.shape)
    _same_shape(op, "buf", buf, p.shape)
    _sgd_momentum(p.reshape(-1), g.reshape(-1), buf.reshape(-1), float(lr), float(momentum),
                  float(dampening), float(weight_decay), bool(nesterov), bool(first))
    return None


def adam_update(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step, decoupled):
    # p, g, m, v: one shape; updates p, m, v in place; step counts from 1
    op = "adam_update"
    _floats(op, ("p", p), ("g", g), ("m", m), ("v", v))
    for name, a in (("g", g), ("m", m), ("v", v)):
        _same_shape(op, name, a, p.shape)
    step_size = lr / (1.0 - beta1 ** step)
    _adam(p.reshape(-1), g.reshape(-1), m.reshape(-1), v.reshape(-1), float(lr), float(beta1), float(beta2),
          float(eps), float(weight_decay), bool(decoupled), float(step_size), math.sqrt(1.0 - beta2 ** step))
    return None
