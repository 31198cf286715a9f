"""minunet.autograd: the Tensor and reverse-mode automatic differentiation, in one page.

A Tensor wraps an array (numpy on 'cpu', cupy on 'cuda'). Every differentiable operation is
a Function subclass with two methods written once for both devices:

    forward(ctx, *args)  -> output array       (args: arrays where Tensors were passed)
    backward(ctx, gy)    -> one gradient per positional argument (None where there is none)

`Function.apply` unwraps the Tensors, runs forward and, when any input requires a gradient
and grad mode is on, records the Function as the output's `_ctx`: the graph is the chain of
`_ctx.parents`. `Tensor.backward` sorts that graph topologically with an explicit stack (so a
chain 10,000 ops deep never touches Python's recursion limit), walks it from the output
back, and sums the gradients of every tensor used more than once. Only leaves (tensors made
by the user, such as parameters) keep `.grad`, and they accumulate into it with `+=`, as in
PyTorch and micrograd. As in PyTorch, `.grad` is itself a Tensor (of the leaf's shape, dtype
and device, with no history); its `.data` is the array that the optimizers update from.

The Tensor speaks PyTorch: `x.sum(dim=1, keepdim=True)` (NumPy's `axis=`/`keepdims=` are
accepted too), `x.view(...)`, `x.T`, `x.permute(...)`, `x.transpose(0, 1)`, `x.float()`,
`x.double()`, and `repr(x)` reads `tensor([1., 2.], requires_grad=True)`.

A leaf is reached once in that walk, after every op that used it, so the moment its `.grad`
is written it is final for this backward pass. `register_post_accumulate_grad_hook` (PyTorch's
name) lets code act at that moment: data-parallel training (minunet.distributed) starts summing
a layer's gradients over the processes there, while backward goes on with the layers below.
"""
import contextlib

import numpy as np

from minunet import backend

_grad_enabled = True


@contextlib.contextmanager
def no_grad():
    """Context manager (and decorator) under which no graph is recorded."""
    global _grad_enabled
    prev, _grad_enabled = _grad_enabled, False
    try:
        yield
    finally:
        _grad_enabled = prev


def is_grad_enabled():
    return _grad_enabled


class Function:
    """One differentiable operation; an instance is the node that records one call.

    `fresh_grads`: True for an op whose backward returns arrays made by that call (kernel
    outputs), each returned once and kept nowhere else. backward() may then keep such an array
    as a leaf's .grad, or add another gradient into it in place, where it would otherwise copy
    it or allocate a sum (PyTorch's engine decides the same by the array's reference count)."""
    fresh_grads = False

    def __init__(self):
        self.parents = ()
        self.needs_input_grad = ()

    def save_for_backward(self, *arrays):
        self.saved = arrays

    def forward(self, *args, **kwargs):
        raise NotImplementedError

    def backward(self, gy):
        raise NotImplementedError

    @classmethod
    def apply(cls, *args, **kwargs):
        tensors = [a for a in args if isinstance(a, Tensor)]
        if tensors:
            devices = {t.device for t in tensors}
            if len(devices) > 1:
                shapes = ", ".join(f"{t.device}:{tuple(t.shape)}" for t in tensors)
                raise ValueError(f"{cls.op_name()}: tensors on different devices ({shapes}); "
                                 f"move them with .to(device) first")
        ctx = cls()
        y = ctx.forward(*(a.data if isinstance(a, Tensor) else a for a in args), **kwargs)
        requires = _grad_enabled and any(t.requires_grad for t in tensors)
        out = Tensor(y, requires_grad=requires)
        if requires:
            ctx.parents = args
            ctx.needs_input_grad = tuple(isinstance(a, Tensor) and a.requires_grad for a in args)
            out._ctx = ctx
        return out

    @classmethod
    def op_name(cls):
        return getattr(cls, "name", cls.__name__.lower())


class _HookHandle:
    """What register_post_accumulate_grad_hook returns: remove() takes the hook out again."""

    def __init__(self, hooks, hook):
        self.hooks, self.hook = hooks, hook

    def remove(self):
        if self.hook in self.hooks:
            self.hooks.remove(self.hook)


def unbroadcast(g, shape):
    """Sum a broadcast gradient `g` back down to `shape` (NumPy broadcasting in reverse)."""
    if g.shape == tuple(shape):
        return g
    xp = backend.array_module(g)
    lead = g.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(lead + i for i, s in enumerate(shape) if s == 1 and g.shape[lead + i] != 1)
    g = g.sum(axis=axes, keepdims=True) if axes else g
    return xp.reshape(g, shape)


class Tensor:
    """An n-dimensional array on 'cpu' or 'cuda' that can record its history."""

    __array_priority__ = 100  # numpy scalars on the left defer to Tensor's reflected ops
    _grad_hooks = ()  # register_post_accumulate_grad_hook gives a leaf a list of its own

    def __init__(self, data, requires_grad=False):
        self.data = data
        self._grad = None
        self.requires_grad = bool(requires_grad)
        self._ctx = None

    @property
    def grad(self):
        """The gradient that backward() accumulated: a Tensor of this tensor's shape, or None."""
        return self._grad

    @grad.setter
    def grad(self, value):
        if value is not None and not isinstance(value, Tensor):
            if not hasattr(value, "shape"):
                raise TypeError(f"grad: expected a Tensor, an array or None, got {type(value).__name__}")
            value = Tensor(value)  # an array: wrapped, not copied
        if value is not None and value.shape != self.shape:
            raise ValueError(f"grad: a gradient of shape {value.shape} for a tensor of shape {self.shape}")
        self._grad = value

    # ---- properties ----------------------------------------------------------------
    @property
    def shape(self):
        return tuple(self.data.shape)

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def ndim(self):
        return self.data.ndim

    @property
    def device(self):
        return backend.device_of(self.data)

    @property
    def is_leaf(self):
        return self._ctx is None

    def size(self, dim=None):
        return self.shape if dim is None else self.shape[dim]

    def numel(self):
        return int(self.data.size)

    def __len__(self):
        return self.shape[0]

    def __repr__(self):
        # as PyTorch prints: 4 decimals, dtype only when not the default, then the history
        a = backend.to_numpy(self.data)
        whole = a.dtype.kind != "f" or bool(np.all(a[np.isfinite(a)] == np.round(a[np.isfinite(a)])))
        values = np.array2string(a, separator=", ", prefix="tensor(", precision=4,
                                 floatmode="maxprec" if whole else "fixed")  # 1., 2.  or  0.1235, 2.0000
        extra = [f"device='{self.device}'"] if self.device != "cpu" else []
        if self.dtype not in (np.float32, np.int64, np.bool_):
            extra.append(f"dtype={self.dtype}")
        if self._ctx is not None and self.requires_grad:
            extra.append(f"grad_fn=<{type(self._ctx).__name__}Backward>")
        elif self.requires_grad:
            extra.append("requires_grad=True")
        return f"tensor({', '.join([values] + extra)})"

    # ---- conversion ----------------------------------------------------------------
    def numpy(self):
        """The values as a host NumPy array (copied from the GPU when on 'cuda')."""
        return backend.to_numpy(self.data)

    def tolist(self):
        return self.numpy().tolist()

    def __array__(self, dtype=None, copy=None):
        """NumPy functions take a cpu Tensor as its array; a cuda one is copied only when asked."""
        if self.device != "cpu":
            raise TypeError("a cuda Tensor is not converted to a NumPy array implicitly; call .numpy() (which "
                            "copies it to the host) or .cpu() first")
        a = self.data if dtype is None else self.data.astype(dtype, copy=False)
        return a.copy() if copy else a

    def item(self):
        if self.data.size != 1:
            raise ValueError(f"item(): only a one-element tensor has an item, this one has shape {self.shape}")
        return self.data.reshape(()).item()

    def detach(self):
        return Tensor(self.data, requires_grad=False)

    def to(self, device):
        device = backend.normalize_device(device)
        if device == self.device:
            return self
        return ToDevice.apply(self, device=device)

    def cpu(self):
        return self.to("cpu")

    def cuda(self):
        return self.to("cuda")

    def float(self):
        return self.astype(np.float32)

    def double(self):
        return self.astype(np.float64)

    def astype(self, dtype):
        if self.dtype == np.dtype(dtype):
            return self
        return Cast.apply(self, dtype=np.dtype(dtype))

    # ---- autograd --------------------------------------------------------------------
    def register_post_accumulate_grad_hook(self, hook):
        """Call hook(self) whenever backward() has accumulated this leaf's `.grad`; returns a
        handle whose remove() unregisters it."""
        if not (self.is_leaf and self.requires_grad):
            raise RuntimeError(f"register_post_accumulate_grad_hook: only a leaf tensor that requires grad "
                               f"has a .grad to hook, this one (shape {self.shape}) is "
                               f"{'not a leaf' if not self.is_leaf else 'not requiring grad'}")
        if not self._grad_hooks:
            self._grad_hooks = []
        self._grad_hooks.append(hook)
        return _HookHandle(self._grad_hooks, hook)

    def backward(self, gy=None):
        """Accumulate d(self)/d(leaf) * gy into the .grad of every leaf that requires it."""
        if not self.requires_grad:
            raise RuntimeError("backward(): this tensor does not require grad and has no graph")
        xp = backend.array_module(self.data)
        if gy is None:
            if self.data.size != 1:
                raise RuntimeError(f"backward(): gy can be left out only for a one-element output, "
                                   f"this one has shape {self.shape}")
            gy = xp.ones_like(self.data)
        else:
            gy = gy.data if isinstance(gy, Tensor) else xp.asarray(gy, dtype=self.dtype)
            if gy.shape != self.data.shape:
                raise ValueError(f"backward(): gy has shape {tuple(gy.shape)}, the tensor {self.shape}")

        # grads: id(tensor) -> [its gradient so far, whether this pass owns that array (made
        # by a fresh_grads op, or a sum made here): then it may become .grad as it is, and
        # later gradients are added into it in place]
        grads = {id(self): [gy, False]}
        for node in reversed(self._toposort()):
            entry = grads.pop(id(node), None)
            if entry is None:
                continue
            g, owned = entry
            if node._ctx is None:  # a leaf: accumulate
                if node._grad is None:
                    node._grad = Tensor(g if owned else g.copy())
                else:
                    node._grad.data += g
                for hook in node._grad_hooks:
                    hook(node)
                continue
            ctx = node._ctx
            gxs = ctx.backward(g)
            if not isinstance(gxs, tuple):
                gxs = (gxs,)
            for parent, gx, needed in zip(ctx.parents, gxs, ctx.needs_input_grad):
                if not needed or gx is None:
                    continue
                if gx.shape != parent.data.shape:
                    raise RuntimeError(f"{ctx.op_name()}.backward returned a gradient of shape "
                                       f"{tuple(gx.shape)} for an input of shape {parent.shape}")
                prev = grads.get(id(parent))
                if prev is None:
                    grads[id(parent)] = [gx, ctx.fresh_grads]
                elif prev[1]:
                    prev[0] += gx
                else:
                    grads[id(parent)] = [prev[0] + gx, True]

    def _toposort(self):
        """Tensors reachable from self, every tensor after all the tensors it was made from."""
        order, visited, stack = [], set(), [(self, False)]
        while stack:
            node, expanded = stack.pop()
            if expanded:
                order.append(node)
                continue
            if id(node) in visited:
                continue
            visited.add(id(node))
            stack.append((node, True))
            if node._ctx is not None:
                for p in node._ctx.parents:
                    if isinstance(p, Tensor) and p.requires_grad and id(p) not in visited:
                        stack.append((p, False))
        return order

    # ---- arithmetic (NumPy broadcasting) ---------------------------------------------
    def __add__(self, other):
        return Add.apply(self, other)

    def __radd__(self, other):
        return Add.apply(self, other)

    def __sub__(self, other):
        return Sub.apply(self, other)

    def __rsub__(self, other):
        return Sub.apply(other, self)

    def __mul__(self, other):
        return Mul.apply(self, other)

    def __rmul__(self, other):
        return Mul.apply(self, other)

    def __truediv__(self, other):
        return Div.apply(self, other)

    def __rtruediv__(self, other):
        return Div.apply(other, self)

    def __neg__(self):
        return Neg.apply(self)

    def __pow__(self, exponent):
        if isinstance(exponent, Tensor):
            raise TypeError("pow: only a Python scalar exponent is supported")
        return Pow.apply(self, exponent=exponent)

    def exp(self):
        return Exp.apply(self)

    def log(self):
        return Log.apply(self)

    def sum(self, dim=None, keepdim=False, *, axis=None, keepdims=None):
        """Sum over `dim` (an int, a tuple, or None: all), as torch.sum; NumPy's axis=/keepdims= too."""
        dim, keepdim = _dim_args("sum", dim, keepdim, axis, keepdims)
        return Sum.apply(self, axis=_axes(dim, self.ndim, "sum"), keepdims=keepdim)

    def mean(self, dim=None, keepdim=False, *, axis=None, keepdims=None):
        """Mean over `dim` (an int, a tuple, or None: all), as torch.mean; NumPy's axis=/keepdims= too."""
        dim, keepdim = _dim_args("mean", dim, keepdim, axis, keepdims)
        axes = _axes(dim, self.ndim, "mean")
        n = int(np.prod([self.shape[a] for a in axes])) if axes else 1
        return self.sum(axes, keepdim) / n if n else self.sum(axes, keepdim)

    def reshape(self, *shape):
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        return Reshape.apply(self, shape=tuple(shape))

    def view(self, *shape):
        """As reshape (minunet's arrays are reshaped without a copy wherever NumPy can)."""
        return self.reshape(*shape)

    def flatten(self):
        return self.reshape(-1)

    def permute(self, *dims):
        """The dimensions in the order `dims`, as torch.permute (a view: no copy)."""
        dims = tuple(dims[0]) if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else dims
        in_range = all(isinstance(d, (int, np.integer)) and -self.ndim <= d < self.ndim for d in dims)
        if not in_range or sorted(d % self.ndim for d in dims) != list(range(self.ndim)):
            raise ValueError(f"permute: dims {dims} are not a permutation of the {self.ndim} dimensions "
                             f"of a tensor of shape {self.shape}")
        return Permute.apply(self, dims=tuple(int(d) % self.ndim for d in dims))

    def transpose(self, dim0, dim1):
        """Swap two dimensions, as torch.transpose."""
        dims = list(range(self.ndim))
        for d in (dim0, dim1):
            if not -self.ndim <= d < self.ndim:
                raise ValueError(f"transpose: dim {d} is out of range for a tensor of shape {self.shape}")
        dims[dim0], dims[dim1] = dims[dim1], dims[dim0]
        return self.permute(dims)

    @property
    def T(self):
        """The dimensions reversed (the transpose of a matrix)."""
        return self.permute(tuple(reversed(range(self.ndim))))

    def __getitem__(self, index):
        return GetItem.apply(self, index=index)


def _dim_args(op, dim, keepdim, axis, keepdims):
    """PyTorch's (dim, keepdim) from either spelling, PyTorch's or NumPy's."""
    if axis is not None:
        if dim is not None:
            raise TypeError(f"{op}: give dim or axis (its NumPy name), not both")
        dim = axis
    return dim, keepdim if keepdims is None else keepdims


def _axes(axis, ndim, op="sum"):
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
    out = []
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(f"{op}: dim {a} is out of range for a tensor with {ndim} dimensions")
        out.append(int(a) % ndim)
    return tuple(sorted(set(out)))


def _data(a):
    return a.data if isinstance(a, Tensor) else a


def _shape(a):
    return getattr(a, "shape", ())


# ---- the elementwise primitives ------------------------------------------------------
# Each forward takes arrays (or Python scalars) and each backward reduces a broadcast
# gradient back to its input's shape with `unbroadcast`.

class Add(Function):
    def forward(self, a, b):
        self.shapes = (_shape(a), _shape(b))
        return a + b

    def backward(self, gy):
        na, nb = self.needs_input_grad
        return (unbroadcast(gy, self.shapes[0]) if na else None,
                unbroadcast(gy, self.shapes[1]) if nb else None)


class Sub(Function):
    def forward(self, a, b):
        self.shapes = (_shape(a), _shape(b))
        return a - b

    def backward(self, gy):
        na, nb = self.needs_input_grad
        return (unbroadcast(gy, self.shapes[0]) if na else None,
                unbroadcast(-gy, self.shapes[1]) if nb else None)


class Mul(Function):
    def forward(self, a, b):
        self.a, self.b = a, b
        return a * b

    def backward(self, gy):
        ga = unbroadcast(gy * self.b, _shape(self.a)) if self.needs_input_grad[0] else None
        gb = unbroadcast(gy * self.a, _shape(self.b)) if self.needs_input_grad[1] else None
        return ga, gb


class Div(Function):
    def forward(self, a, b):
        self.a, self.b = a, b
        return a / b

    def backward(self, gy):
        ga = unbroadcast(gy / self.b, _shape(self.a)) if self.needs_input_grad[0] else None
        gb = unbroadcast(-gy * self.a / (self.b * self.b), _shape(self.b)) if self.needs_input_grad[1] else None
        return ga, gb


class Neg(Function):
    def forward(self, a):
        return -a

    def backward(self, gy):
        return -gy


class Pow(Function):
    def forward(self, a, exponent):
        self.a, self.p = a, exponent
        return a ** exponent

    def backward(self, gy):
        return gy * self.p * self.a ** (self.p - 1)


class Exp(Function):
    def forward(self, a):
        self.y = backend.array_module(a).exp(a)
        return self.y

    def backward(self, gy):
        return gy * self.y


class Log(Function):
    def forward(self, a):
        self.a = a
        return backend.array_module(a).log(a)

    def backward(self, gy):
        return gy / self.a


class Sum(Function):
    def forward(self, a, axis, keepdims):
        self.shape, self.axis = a.shape, axis
        return a.sum(axis=axis, keepdims=keepdims)

    def backward(self, gy):
        xp = backend.array_module(gy)
        g = xp.expand_dims(gy, self.axis) if gy.ndim != len(self.shape) else gy
        return xp.broadcast_to(g, self.shape).copy()


class Reshape(Function):
    def forward(self, a, shape):
        self.shape = a.shape
        return a.reshape(shape)

    def backward(self, gy):
        return gy.reshape(self.shape)


class Permute(Function):
    def forward(self, a, dims):
        self.dims = dims
        return backend.array_module(a).transpose(a, dims)

    def backward(self, gy):
        return backend.array_module(gy).transpose(gy, tuple(int(d) for d in np.argsort(self.dims)))


class GetItem(Function):
    name = "getitem"

    def forward(self, a, index):
        self.shape, self.dtype, self.index = a.shape, a.dtype, index
        return a[index]

    def backward(self, gy):
        xp = backend.array_module(gy)
        gx = xp.zeros(self.shape, dtype=self.dtype)
        xp.add.at(gx, self.index, gy)  # an index may pick one element twice: add, don't assign
        return gx


class ToDevice(Function):
    name = "to"

    def forward(self, a, device):
        self.src = backend.device_of(a)
        return backend.to_device(a, device)

    def backward(self, gy):
        return backend.to_device(gy, self.src)


class Cast(Function):
    name = "astype"

    def forward(self, a, dtype):
        self.src = a.dtype
        return a.astype(dtype)

    def backward(self, gy):
        return gy.astype(self.src)


def tensor(data, dtype=None, device="cpu", requires_grad=False):
    """Make a leaf Tensor from array_like data, as torch.tensor does.

    Python floats become float32 (minunet's default dtype) and Python ints int64; NumPy or
    CuPy arrays keep their dtype unless `dtype` is given. The data is always copied, into a C-contiguous array.
    """
    device = backend.normalize_device(device)
    if isinstance(data, Tensor):
        data = data.data
    if dtype is None and not hasattr(data, "dtype"):
        a = np.asarray(data)
        dtype = np.float32 if a.dtype.kind == "f" else a.dtype
        data = a
    xp = backend.xp_for(device)
    src = backend.to_numpy(data) if xp is np else data
    arr = xp.array(src, dtype=dtype, copy=True, order="C")
    if requires_grad and arr.dtype.kind != "f":
        raise TypeError(f"tensor(): only floating tensors can require grad, got dtype {arr.dtype}")
    return Tensor(arr, requires_grad=requires_grad)
