"""minunet.nn: Module, Parameter and the layers a U-Net is built from, with PyTorch's names.

A Module is a tree. Each node owns three ordered dictionaries, filled by plain attribute
assignment exactly as in PyTorch:

    self.weight = Parameter(...)       -> _parameters['weight']   (trained, has a .grad)
    self.register_buffer('running_mean', ...) -> _buffers[...]     (state, not trained)
    self.conv = Conv2d(...)            -> _modules['conv']         (a child)

Everything else is a walk over that tree: named_parameters() yields dotted names such as
'encoder.0.0.weight', state_dict() copies every parameter and buffer to a host NumPy array
under that name, load_state_dict() checks the names and shapes and copies the values back
onto the module's device and dtype, train()/eval() set `.training` on every node, and to()
moves every array in place (the Parameter objects keep their identity, so an optimizer made
before the move still holds them).

The layers are thin: each forward calls one op of minunet.functional, which holds the
derivative rule. Their parameters start as PyTorch's do, kaiming_uniform_ with a = sqrt(5):
with gain = sqrt(2 / (1 + a^2)) = sqrt(1/3), the bound is gain * sqrt(3 / fan_in) =
1 / sqrt(fan_in), so weight ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), and the bias uses the same
bound. fan_in is weight.shape[1] * kh * kw, which for a transposed convolution, whose weight
is (Cin, Cout, kh, kw), is Cout * kh * kw, as in PyTorch. The draws come from one NumPy
Generator owned by this module; manual_seed(seed) resets it, so a model is reproducible
from its seed.
"""
import collections
import math

import numpy as np

from minunet import backend
from minunet import functional as F
from minunet.autograd import Tensor
from minunet.contract import pair

_generator = np.random.default_rng()


def manual_seed(seed):
    """Reseed the generator that initializes every layer's parameters (and return it)."""
    global _generator
    _generator = np.random.default_rng(seed)
    return _generator


def _uniform(shape, bound):
    """A float32 array of U(-bound, bound) draws from the module's generator."""
    return _generator.uniform(-bound, bound, size=shape).astype(np.float32)


def _unsupported(layer, dilation, groups, padding_mode):
    """Refuse, naming the argument, what the convolution kernels do not compute."""
    for name, value in (("dilation", dilation), ("groups", groups)):
        if value != 1 and value != (1, 1):
            raise ValueError(f"{layer}: {name}={value!r} is not supported (minunet's convolution kernels compute "
                             f"{name}=1 only, on every backend)")
    if padding_mode != "zeros":
        raise ValueError(f"{layer}: padding_mode={padding_mode!r} is not supported; only 'zeros'")


class Parameter(Tensor):
    """A Tensor that a Module registers as trainable: it requires grad by default."""

    # Optimizers key their state by the Parameter object, so hashing is by identity even if
    # Tensor ever grows an elementwise __eq__.
    __hash__ = object.__hash__

    def __init__(self, data, requires_grad=True):
        super().__init__(data.data if isinstance(data, Tensor) else data, requires_grad=requires_grad)

    def __repr__(self):
        return "Parameter containing:\n" + super().__repr__()


IncompatibleKeys = collections.namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])


class Module:
    """Base class of every layer and model: subclasses set attributes in __init__ and define forward."""

    def __init__(self):
        # object.__setattr__: our own __setattr__ needs these dictionaries to exist already
        object.__setattr__(self, "_parameters", collections.OrderedDict())
        object.__setattr__(self, "_buffers", collections.OrderedDict())
        object.__setattr__(self, "_modules", collections.OrderedDict())
        object.__setattr__(self, "training", True)

    # ---- registration ------------------------------------------------------------------
    def __setattr__(self, name, value):
        if "_parameters" not in self.__dict__:
            raise AttributeError(f"cannot assign {name!r} before Module.__init__() has run; "
                                 f"call super().__init__() first in {type(self).__name__}.__init__")
        if isinstance(value, Parameter):
            self.register_parameter(name, value)
        elif isinstance(value, Module):
            self.register_module(name, value)
        elif name in self._parameters or name in self._modules:
            if value is not None:
                kind = "parameter" if name in self._parameters else "submodule"
                raise TypeError(f"cannot assign a {type(value).__name__} to {kind} {name!r} of "
                                f"{type(self).__name__}: use a Parameter, a Module or None")
            (self._parameters if name in self._parameters else self._modules)[name] = None
        elif name in self._buffers:
            self._buffers[name] = _as_buffer(name, value)
        else:
            object.__setattr__(self, name, value)

    def _forget(self, name, keep=None):
        # drop `name` from every registry but `keep`, where a re-assignment keeps its place
        # (PyTorch's order: replacing model.conv1 leaves it first in parameters())
        self.__dict__.pop(name, None)
        for d in (self._parameters, self._buffers, self._modules):
            if d is not keep:
                d.pop(name, None)

    def __getattr__(self, name):  # only called when ordinary lookup fails
        for key in ("_parameters", "_buffers", "_modules"):
            d = self.__dict__.get(key)
            if d is not None and name in d:
                return d[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __delattr__(self, name):
        for d in (self._parameters, self._buffers, self._modules):
            if name in d:
                del d[name]
                return
        object.__delattr__(self, name)

    def register_parameter(self, name, param):
        """Register `param` (a Parameter, or None for an absent one such as bias=False)."""
        if param is not None and not isinstance(param, Parameter):
            raise TypeError(f"register_parameter({name!r}): expected a Parameter or None, got {type(param).__name__}")
        self._forget(name, keep=self._parameters)
        self._parameters[name] = param

    def register_buffer(self, name, value):
        """Register non-trained state (a Tensor or array, stored as a Tensor) saved in state_dict."""
        self._forget(name, keep=self._buffers)
        self._buffers[name] = _as_buffer(name, value)

    def register_module(self, name, module):
        if not isinstance(module, Module):
            raise TypeError(f"register_module({name!r}): expected a Module, got {type(module).__name__}")
        self._forget(name, keep=self._modules)
        self._modules[name] = module

    # ---- walking the tree --------------------------------------------------------------
    def named_modules(self, prefix=""):
        """(dotted name, module) for this module and every descendant, depth first; each once."""
        seen, stack = set(), [(prefix, self)]
        while stack:
            name, m = stack.pop()
            if id(m) in seen:
                continue
            seen.add(id(m))
            yield name, m
            children = [(f"{name}.{n}" if name else n, c) for n, c in m._modules.items() if c is not None]
            stack.extend(reversed(children))

    def modules(self):
        return (m for _, m in self.named_modules())

    def named_children(self):
        return ((n, m) for n, m in self._modules.items() if m is not None)

    def children(self):
        return (m for _, m in self.named_children())

    def _named_members(self, key):
        seen = set()
        for prefix, m in self.named_modules():
            for n, t in getattr(m, key).items():
                if t is None or id(t) in seen:
                    continue
                seen.add(id(t))
                yield (f"{prefix}.{n}" if prefix else n), t

    def named_parameters(self):
        """(dotted name, Parameter) for every parameter in the tree; a shared one once."""
        return self._named_members("_parameters")

    def parameters(self):
        return (p for _, p in self.named_parameters())

    def named_buffers(self):
        return self._named_members("_buffers")

    def buffers(self):
        return (b for _, b in self.named_buffers())

    # ---- modes, devices, gradients -----------------------------------------------------
    def train(self, mode=True):
        """Set training mode (Dropout drops, BatchNorm uses and updates batch statistics)."""
        for m in self.modules():
            object.__setattr__(m, "training", bool(mode))
        return self

    def eval(self):
        return self.train(False)

    def to(self, device=None, dtype=None):
        """Move every parameter, gradient and buffer to `device` and/or cast the floating ones to
        `dtype`, in place; returns self. to('cuda'), to(np.float64), to('cpu', np.float32)."""
        if device is not None and not isinstance(device, str):  # to(np.float64)
            device, dtype = None, device
        device = backend.normalize_device(device) if device is not None else None  # raises before any move
        dtype = np.dtype(dtype) if dtype is not None else None
        if dtype is not None and dtype.kind != "f":
            raise TypeError(f"Module.to: dtype must be a floating type, got {dtype}")

        def move(a):
            if dtype is not None and a.dtype.kind == "f" and a.dtype != dtype:
                a = a.astype(dtype)
            return backend.to_device(a, device) if device is not None else a

        for t in list(self.parameters()) + list(self.buffers()):
            t.data = move(t.data)
            if t.grad is not None:
                t.grad = move(t.grad.data)
        return self

    def cuda(self):
        return self.to("cuda")

    def cpu(self):
        return self.to("cpu")

    def double(self):
        return self.to(dtype=np.float64)

    def float(self):
        return self.to(dtype=np.float32)

    def zero_grad(self, set_to_none=True):
        """Drop every parameter's gradient (or zero it in place with set_to_none=False)."""
        for p in self.parameters():
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.data[...] = 0

    # ---- checkpoints -------------------------------------------------------------------
    def state_dict(self):
        """OrderedDict of dotted name -> host NumPy copy of every parameter and buffer."""
        out = collections.OrderedDict()
        for prefix, m in self.named_modules():
            for n, t in list(m._parameters.items()) + list(m._buffers.items()):
                if t is not None:
                    out[f"{prefix}.{n}" if prefix else n] = np.array(t.numpy(), copy=True)
        return out

    def load_state_dict(self, state_dict, strict=True):
        """Copy values (NumPy arrays or Tensors) into the parameters and buffers of the same
        names, in place, on their device and in their dtype. Shapes must match. With strict,
        the key sets must match too. Nothing is copied unless every check passes. Returns
        (missing_keys, unexpected_keys)."""
        own = collections.OrderedDict()
        for prefix, m in self.named_modules():
            for n, t in list(m._parameters.items()) + list(m._buffers.items()):
                if t is not None:
                    own[f"{prefix}.{n}" if prefix else n] = t
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        errors = []
        if strict and missing:
            errors.append("missing keys: " + ", ".join(repr(k) for k in missing))
        if strict and unexpected:
            errors.append("unexpected keys: " + ", ".join(repr(k) for k in unexpected))
        values = {}
        for k, t in own.items():
            if k not in state_dict:
                continue
            v = state_dict[k]
            v = v.numpy() if isinstance(v, Tensor) else backend.to_numpy(v)
            if tuple(v.shape) != t.shape:
                errors.append(f"size mismatch for {k!r}: the checkpoint has shape {tuple(v.shape)}, "
                              f"the model has shape {t.shape}")
            values[k] = v
        if errors:
            raise RuntimeError(f"Error(s) in loading state_dict for {type(self).__name__}:\n  " + "\n  ".join(errors))
        for k, v in values.items():
            t = own[k]
            t.data[...] = backend.to_device(np.ascontiguousarray(v, dtype=t.dtype), t.device)
        return IncompatibleKeys(missing, unexpected)

    # ---- calling and printing ----------------------------------------------------------
    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} does not define forward()")

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def extra_repr(self):
        """The constructor arguments shown inside the parentheses of repr()."""
        return ""

    def __repr__(self):
        lines = [f"({n}): " + repr(m).replace("\n", "\n  ") for n, m in self.named_children()]
        if not lines:
            return f"{type(self).__name__}({self.extra_repr()})"
        head = f"{type(self).__name__}({self.extra_repr()}"
        return head + "\n  " + "\n  ".join(lines) + "\n)"


def _as_buffer(name, value):
    if value is None or isinstance(value, Tensor):
        return value
    if not hasattr(value, "dtype"):
        raise TypeError(f"buffer {name!r}: expected a Tensor or an array, got {type(value).__name__}")
    return Tensor(value)


# ---------------------------------------------------------------------------- containers

class Sequential(Module):
    """Modules applied one after another; children are named '0', '1', ...

    A Conv2d directly followed by a ReLU runs as one fused op (F.conv2d_relu): the same values,
    with the ReLU, its backward and the bias gradient folded into the convolution's kernels."""

    def __init__(self, *modules):
        super().__init__()
        for i, m in enumerate(modules):
            self.register_module(str(i), m)

    def __getitem__(self, i):
        modules = list(self._modules.values())
        return Sequential(*modules[i]) if isinstance(i, slice) else modules[i]

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())

    def forward(self, x):
        modules = list(self)
        i = 0
        while i < len(modules):
            if type(modules[i]) is Conv2d and i + 1 < len(modules) and type(modules[i + 1]) is ReLU:
                x = modules[i].forward(x, relu=True)
                i += 2
            else:
                x = modules[i](x)
                i += 1
        return x


class ModuleList(Module):
    """A list of modules, registered as children '0', '1', ... (iterate it in your forward)."""

    def __init__(self, modules=()):
        super().__init__()
        for m in modules:
            self.append(m)

    def append(self, module):
        self.register_module(str(len(self._modules)), module)
        return self

    def __getitem__(self, i):
        return list(self._modules.values())[i]

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())


# ---------------------------------------------------------------------------- layers

class Identity(Module):
    def forward(self, x):
        return x


class ReLU(Module):
    def forward(self, x):
        # x: (N, C, H, W) -> y: (N, C, H, W)
        return F.relu(x)


class Conv2d(Module):
    """2-D convolution (cross-correlation, as in PyTorch), zero padding; weight (K, C, kh, kw).
    PyTorch's signature; dilation, groups and padding_mode other than 1, 1, 'zeros' are refused."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1, bias=True,
                 padding_mode="zeros"):
        super().__init__()
        _unsupported("Conv2d", dilation, groups, padding_mode)
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = pair("Conv2d", "kernel_size", kernel_size, 1)
        self.stride = pair("Conv2d", "stride", stride, 1)
        self.padding = pair("Conv2d", "padding", padding, 0)
        kh, kw = self.kernel_size
        bound = 1 / math.sqrt(self.in_channels * kh * kw)
        self.weight = Parameter(_uniform((self.out_channels, self.in_channels, kh, kw), bound))
        self.register_parameter("bias", Parameter(_uniform((self.out_channels,), bound)) if bias else None)

    def forward(self, x, relu=False):
        # x: (N, C, H, W) -> y: (N, K, Ho, Wo), Ho = (H + 2 ph - kh) // sh + 1; relu: max(y, 0), fused
        conv = F.conv2d_relu if relu else F.conv2d
        return conv(x, self.weight, self.bias, self.stride, self.padding)

    def extra_repr(self):
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        s += f", padding={self.padding}" if self.padding != (0, 0) else ""
        return s + (", bias=False" if self.bias is None else "")


class ConvTranspose2d(Module):
    """2-D transposed convolution (the adjoint of Conv2d in x); weight (Cin, Cout, kh, kw).
    PyTorch's signature; groups, dilation and padding_mode other than 1, 1, 'zeros' are refused."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, output_padding=0, groups=1,
                 bias=True, dilation=1, padding_mode="zeros"):
        super().__init__()
        _unsupported("ConvTranspose2d", dilation, groups, padding_mode)
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = pair("ConvTranspose2d", "kernel_size", kernel_size, 1)
        self.stride = pair("ConvTranspose2d", "stride", stride, 1)
        self.padding = pair("ConvTranspose2d", "padding", padding, 0)
        self.output_padding = pair("ConvTranspose2d", "output_padding", output_padding, 0)
        kh, kw = self.kernel_size
        bound = 1 / math.sqrt(self.out_channels * kh * kw)  # fan_in from weight dim 1, as PyTorch
        self.weight = Parameter(_uniform((self.in_channels, self.out_channels, kh, kw), bound))
        self.register_parameter("bias", Parameter(_uniform((self.out_channels,), bound)) if bias else None)

    def forward(self, x):
        # x: (N, Cin, H, W) -> y: (N, Cout, Ho, Wo), Ho = (H - 1) sh - 2 ph + kh + oph
        return F.conv_transpose2d(x, self.weight, self.bias, self.stride, self.padding, self.output_padding)

    def extra_repr(self):
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        s += f", padding={self.padding}" if self.padding != (0, 0) else ""
        s += f", output_padding={self.output_padding}" if self.output_padding != (0, 0) else ""
        return s + (", bias=False" if self.bias is None else "")


class MaxPool2d(Module):
    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = kernel_size if stride is None else stride
        self.padding = padding

    def forward(self, x):
        # x: (N, C, H, W) -> y: (N, C, Ho, Wo), Ho = (H + 2 ph - kh) // sh + 1
        return F.max_pool2d(x, self.kernel_size, self.stride, self.padding)

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class BatchNorm2d(Module):
    """Per-channel normalisation over (N, H, W) with a learned scale (weight) and shift (bias).

    Training mode normalises with the batch mean and biased variance and updates the running
    statistics, r = (1 - momentum) r + momentum * s, with the unbiased variance; eval mode
    normalises with the running statistics. momentum=None uses the cumulative average, a
    factor of 1 / num_batches_tracked, as PyTorch does.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1):
        super().__init__()
        self.num_features, self.eps, self.momentum = int(num_features), float(eps), momentum
        self.weight = Parameter(np.ones(self.num_features, dtype=np.float32))
        self.bias = Parameter(np.zeros(self.num_features, dtype=np.float32))
        self.register_buffer("running_mean", np.zeros(self.num_features, dtype=np.float32))
        self.register_buffer("running_var", np.ones(self.num_features, dtype=np.float32))
        self.register_buffer("num_batches_tracked", np.zeros((), dtype=np.int64))

    def forward(self, x):
        # x: (N, C, H, W) -> y: (N, C, H, W)
        if x.ndim != 4 or x.shape[1] != self.num_features:
            raise ValueError(f"BatchNorm2d({self.num_features}): expected input (N, {self.num_features}, H, W), "
                             f"got {x.shape}")
        momentum = self.momentum
        if self.training:
            self.num_batches_tracked.data += 1
            if momentum is None:
                momentum = 1.0 / int(self.num_batches_tracked.item())
        return F.batch_norm(x, self.running_mean.data, self.running_var.data, self.weight, self.bias,
                            training=self.training, momentum=momentum, eps=self.eps)

    def extra_repr(self):
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"


class Dropout(Module):
    """Zero each element with probability p in training mode and scale the rest by 1/(1-p)."""

    def __init__(self, p=0.5):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"Dropout: p must be in [0, 1), got {p}")
        self.p = float(p)

    def forward(self, x):
        # x: (...) -> y: (...)
        return F.dropout(x, self.p, self.training)

    def extra_repr(self):
        return f"p={self.p}"
