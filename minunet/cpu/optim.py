"""minunet.cpu.optim: the fused optimizer updates, in place, one element per prange iteration.

One kernel reads the gradient and the optimizer state of a parameter and writes the new
parameter and state in a single pass, following PyTorch's update rules exactly. The contract's
sgd_update and adam_update take every tensor of a step at once, with their hyperparameters as
rows of a float64 table (minunet.contract.SGD_HYPER / ADAM_HYPER); on the CPU they call the
kernel once per tensor (a call costs microseconds here, no launch), where the GPU launches once.
"""
import math

from numba import prange

from minunet.cpu.runtime import kernel


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


def sgd_update(ps, gs, bufs, hyper):
    # ps[i], gs[i], bufs[i] (or None): one shape per i; hyper: float64 (len(ps), 6) rows SGD_HYPER -> None,
    # ps (and bufs) updated in place, one kernel call per tensor
    for p, g, buf, (lr, momentum, dampening, weight_decay, nesterov, first) in zip(ps, gs, bufs, hyper.tolist()):
        if buf is None:
            _sgd(p.reshape(-1), g.reshape(-1), lr, weight_decay)
        else:
            _sgd_momentum(p.reshape(-1), g.reshape(-1), buf.reshape(-1), lr, momentum, dampening, weight_decay,
                          bool(nesterov), bool(first))


def adam_update(ps, gs, ms, vs, hyper):
    # ps[i], gs[i], ms[i], vs[i]: one shape per i; hyper: float64 (len(ps), 8) rows ADAM_HYPER -> None,
    # ps, ms, vs updated in place, one kernel call per tensor
    for p, g, m, v, row in zip(ps, gs, ms, vs, hyper.tolist()):
        lr, beta1, beta2, eps, weight_decay, step_size, bias_correction2_sqrt, decoupled = row
        _adam(p.reshape(-1), g.reshape(-1), m.reshape(-1), v.reshape(-1), lr, beta1, beta2, eps, weight_decay,
              bool(decoupled), step_size, bias_correction2_sqrt)
