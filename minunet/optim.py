"""minunet.optim: SGD, Adam, AdamW and two learning-rate schedules, with PyTorch's semantics.

An optimizer holds `param_groups`, a list of dicts as in PyTorch: each has 'params' (the
Parameters it updates) and its hyperparameters ('lr', 'momentum', ...), which a schedule may
change between steps. `state` maps each Parameter to its per-parameter state (the momentum
buffer for SGD; the step count and the first and second moment estimates for Adam), arrays
on the parameter's device made on its first step.

step() does no arithmetic on the arrays itself. It has two halves:

  prepare()  the host's part: check the gradients, make missing state, count the step, and
             write one row of hyperparameters per tensor (learning rate, Adam's bias
             corrections for this step, ...) into an array on the parameters' device, the
             same array every step;
  launch()   the device's part: one call of the update kernel of the parameters' backend
             (kernels_for(p.data).sgd_update / adam_update, see minunet/backend.py) for all
             the tensors of one device and dtype, which updates every parameter and its state
             in place in one pass over memory: on the GPU one kernel launch for the whole
             model (kernels/optim.cu).

The split exists for CUDA graphs (minunet/cuda_graph.py): a captured training step holds
launch() only, and prepare() runs on the host before each replay, so the rows the kernel reads
from memory carry the current learning rate even though the launch itself is frozen. The
rules, for g the gradient and p the parameter:

  SGD     d = g + weight_decay p; with momentum, buf = d on the first step, else
          buf = momentum buf + (1 - dampening) d, and d = d + momentum buf (nesterov) or buf;
          p -= lr d
  Adam    g += weight_decay p  (AdamW instead: p *= 1 - lr weight_decay);
          m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2; with t the step (from 1),
          p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

state_dict() is PyTorch's layout with parameters numbered across the groups in order and
state arrays copied to host NumPy arrays; load_state_dict() puts the exact values back on
the parameters' devices, so a resumed run continues bit for bit.

The schedules are epoch-based, as in PyTorch: create one after the optimizer, call
scheduler.step() once per epoch after optimizer.step(). Both are computed in closed form
from the epoch counter `last_epoch`, so resuming from a state_dict gives the same rates.
"""
import math

import numpy as np

from minunet import backend
from minunet.autograd import Tensor


class Optimizer:
    """Base class: param_groups, per-parameter state, zero_grad, step and state_dict."""

    def __init__(self, params, defaults):
        self.defaults = dict(defaults)
        self.state = {}
        self._hyper = {}  # (device, dtype) -> the array prepare() writes the rows into
        self.param_groups = []
        params = list(params)
        if not params:
            raise ValueError(f"{type(self).__name__}: got an empty parameter list")
        for group in (params if isinstance(params[0], dict) else [{"params": params}]):
            self.add_param_group(group)

    def add_param_group(self, group):
        """Add a dict with 'params' and any hyperparameters that differ from the defaults."""
        group = dict(group)
        params = group["params"]
        group["params"] = [params] if isinstance(params, Tensor) else list(params)
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        for p in group["params"]:
            if not isinstance(p, Tensor) or not p.requires_grad or not p.is_leaf:
                raise TypeError(f"{type(self).__name__}: can only optimize leaf Tensors that require grad "
                                f"(e.g. module.parameters()), got {type(p).__name__}")
            if id(p) in seen:
                raise ValueError(f"{type(self).__name__}: a parameter appears in more than one group or twice")
            seen.add(id(p))
        for k, v in self.defaults.items():
            group.setdefault(k, v)
        self.param_groups.append(group)

    def zero_grad(self, set_to_none=True):
        for group in self.param_groups:
            for p in group["params"]:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.data[...] = 0

    def step(self):
        """Update every parameter that has a gradient; those whose grad is None are skipped."""
        self.launch(self.prepare())

    def prepare(self):
        """The host half of a step: for every parameter with a gradient, check it, make its missing
        state, advance its step and write its row of hyperparameters to its device. Returns the
        plan launch() carries out: a list of (ps, gs, states, hyper) per device and dtype."""
        batches = {}  # (device, dtype) -> ([p], [row], [state arrays])
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.shape != p.data.shape or p.grad.dtype != p.data.dtype:
                    raise ValueError(f"{type(self).__name__}.step: a parameter of shape {p.shape} and dtype "
                                     f"{p.dtype} has a gradient of shape {tuple(p.grad.shape)} and dtype "
                                     f"{p.grad.dtype}")
                params, rows, states = batches.setdefault((p.device, p.dtype), ([], [], []))
                row, arrays = self._prepare(p, group, self.state.setdefault(p, {}))
                params.append(p)
                rows.append(row)
                states.append(arrays)
        plan = []
        for key, (params, rows, states) in batches.items():
            hyper = self._hyper.get(key)
            if hyper is None or hyper.shape[0] != len(rows):  # the same device array every step
                hyper = self._hyper[key] = backend.xp_for(key[0]).empty((len(rows), len(rows[0])), np.float64)
            backend.copy_from_host(hyper, np.array(rows, np.float64))
            plan.append(([p.data for p in params], [p.grad.data for p in params], states, hyper))
        return plan

    def launch(self, plan):
        """The device half of a step: the update kernel, once per entry of prepare()'s plan. It copies
        nothing between host and device and waits for nothing, so a CUDA graph can capture it."""
        for ps, gs, states, hyper in plan:
            self._launch(backend.kernels_for(ps[0]), ps, gs, [list(s) for s in zip(*states)], hyper)

    def _prepare(self, p, group, state):
        """Make p's missing state and count its step; return (its row of hyperparameters, the state
        arrays the update kernel takes for it, in the kernel's order, None for one it lacks)."""
        raise NotImplementedError(f"{type(self).__name__} does not define _prepare()")

    def _launch(self, kernels, ps, gs, states, hyper):
        raise NotImplementedError(f"{type(self).__name__} does not define _launch()")

    # ---- checkpoints -------------------------------------------------------------------
    def _params(self):
        return [p for g in self.param_groups for p in g["params"]]

    def state_dict(self):
        """{'state': {index: {name: host array or int}}, 'param_groups': [{hyperparameters, 'params': [index]}]}."""
        index = {id(p): i for i, p in enumerate(self._params())}
        state = {index[id(p)]: {k: np.array(backend.to_numpy(v), copy=True) if hasattr(v, "shape") else v
                                for k, v in s.items()}
                 for p, s in self.state.items() if s}
        groups, start = [], 0
        for g in self.param_groups:
            saved = {k: v for k, v in g.items() if k != "params"}
            saved["params"] = list(range(start, start + len(g["params"])))
            start += len(g["params"])
            groups.append(saved)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict):
        """Restore hyperparameters and state saved by state_dict() from an optimizer built over
        parameters of the same shapes, in the same order and groups."""
        name = type(self).__name__
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"{name}.load_state_dict: the state has {len(saved_groups)} parameter groups, "
                             f"this optimizer {len(self.param_groups)}")
        for i, (g, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(g["params"]) != len(saved["params"]):
                raise ValueError(f"{name}.load_state_dict: group {i} holds {len(saved['params'])} parameters "
                                 f"in the state, {len(g['params'])} in this optimizer")
        params = {i: p for g, saved in zip(self.param_groups, saved_groups) for i, p in zip(saved["params"], g["params"])}
        state = {}
        for i, s in state_dict["state"].items():
            p = params[int(i)]
            state[p] = {}
            for k, v in s.items():
                if hasattr(v, "shape") and len(v.shape) > 0:
                    if tuple(v.shape) != p.shape:
                        raise ValueError(f"{name}.load_state_dict: state {k!r} of parameter {i} has shape "
                                         f"{tuple(v.shape)}, the parameter {p.shape}")
                    v = backend.to_device(np.array(backend.to_numpy(v), dtype=p.dtype, copy=True), p.device)
                elif hasattr(v, "shape"):  # a 0-d array, e.g. a step count read back from a file
                    v = v.item()
                state[p][k] = v
        for g, saved in zip(self.param_groups, saved_groups):
            g.update({k: v for k, v in saved.items() if k != "params"})
        self.state = state


def _check(name, ok, what, value):
    if not ok:
        raise ValueError(f"{name}: invalid {what}: {value}")


class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum, dampening, Nesterov and weight decay."""

    def __init__(self, params, lr, momentum=0, dampening=0, weight_decay=0, nesterov=False):
        _check("SGD", lr >= 0, "learning rate", lr)
        _check("SGD", momentum >= 0, "momentum", momentum)
        _check("SGD", weight_decay >= 0, "weight_decay", weight_decay)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("SGD: Nesterov momentum requires a momentum > 0 and zero dampening")
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      weight_decay=weight_decay, nesterov=nesterov))

    def _prepare(self, p, group, state):
        first = group["momentum"] != 0 and "momentum_buffer" not in state
        if first:  # the kernel writes buf = d on the first step
            state["momentum_buffer"] = backend.array_module(p.data).zeros_like(p.data)
        row = (group["lr"], group["momentum"], group["dampening"], group["weight_decay"], group["nesterov"], first)
        return row, (state["momentum_buffer"] if group["momentum"] != 0 else None,)

    def _launch(self, kernels, ps, gs, states, hyper):
        kernels.sgd_update(ps, gs, states[0], hyper)


class Adam(Optimizer):
    """Adam (Kingma & Ba) with bias correction; weight_decay is an L2 term added to the gradient."""

    decoupled = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0):
        name = type(self).__name__
        _check(name, lr >= 0, "learning rate", lr)
        _check(name, eps >= 0, "epsilon", eps)
        _check(name, 0 <= betas[0] < 1, "beta1", betas[0])
        _check(name, 0 <= betas[1] < 1, "beta2", betas[1])
        _check(name, weight_decay >= 0, "weight_decay", weight_decay)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def _prepare(self, p, group, state):
        if not state:
            xp = backend.array_module(p.data)
            state["step"] = 0
            state["exp_avg"] = xp.zeros_like(p.data)
            state["exp_avg_sq"] = xp.zeros_like(p.data)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        step_size = group["lr"] / (1 - beta1 ** state["step"])
        bias_correction2_sqrt = math.sqrt(1 - beta2 ** state["step"])
        row = (group["lr"], beta1, beta2, group["eps"], group["weight_decay"], step_size, bias_correction2_sqrt,
               self.decoupled)
        return row, (state["exp_avg"], state["exp_avg_sq"])

    def _launch(self, kernels, ps, gs, states, hyper):
        kernels.adam_update(ps, gs, states[0], states[1], hyper)


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter): p *= 1 - lr weight_decay each step."""

    decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


# ------------------------------------------------------------------------------ schedules

class LRScheduler:
    """Base class: sets every group's 'lr' from the epoch counter. Creating one applies epoch 0."""

    def __init__(self, optimizer):
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"{type(self).__name__}: expected an Optimizer, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
        self.last_epoch = -1
        self.step()

    def lr_at(self, base_lr, epoch):
        raise NotImplementedError(f"{type(self).__name__} does not define lr_at()")

    def step(self):
        """Advance one epoch and set each group's lr."""
        self.last_epoch += 1
        self._last_lr = [self.lr_at(base, self.last_epoch) for base in self.base_lrs]
        for group, lr in zip(self.optimizer.param_groups, self._last_lr):
            group["lr"] = lr

    def get_last_lr(self):
        return list(self._last_lr)

    def state_dict(self):
        return {k: (list(v) if isinstance(v, list) else v) for k, v in self.__dict__.items() if k != "optimizer"}

    def load_state_dict(self, state_dict):
        self.__dict__.update({k: (list(v) if isinstance(v, list) else v) for k, v in state_dict.items()})


class StepLR(LRScheduler):
    """lr = base_lr * gamma ** (epoch // step_size)."""

    def __init__(self, optimizer, step_size, gamma=0.1):
        if int(step_size) < 1:
            raise ValueError(f"StepLR: step_size must be a positive int, got {step_size}")
        self.step_size, self.gamma = int(step_size), gamma
        super().__init__(optimizer)

    def lr_at(self, base_lr, epoch):
        return base_lr * self.gamma ** (epoch // self.step_size)


class CosineAnnealingLR(LRScheduler):
    """lr = eta_min + (base_lr - eta_min) * (1 + cos(pi * epoch / T_max)) / 2."""

    def __init__(self, optimizer, T_max, eta_min=0):
        if int(T_max) < 1:
            raise ValueError(f"CosineAnnealingLR: T_max must be a positive int, got {T_max}")
        self.T_max, self.eta_min = int(T_max), eta_min
        super().__init__(optimizer)

    def lr_at(self, base_lr, epoch):
        return self.eta_min + (base_lr - self.eta_min) * (1 + math.cos(math.pi * epoch / self.T_max)) / 2
