"""The kernel contract (minunet/contract.py) and its checked dispatch:

- both backends implement exactly the contract's kernels with its signatures: minunet.cpu by
  import, minunet/cuda.py statically (its source parsed, so CuPy need not even be installed)
  and, where CuPy imports, by import too;
- every bad argument is refused before any kernel runs, with one line naming the kernel, the
  argument and the shapes, and in the same way on every device (the checks are written once);
- outputs that do not match their declaration are caught after the call;
- the debug counters count calls, FLOPs and bytes per kernel, through minunet.debug() or the
  MINUNET_DEBUG environment variable read at call time.
"""
import ast
import importlib
import inspect
import pathlib
import types

import numpy as np
import pytest

import minunet
from minunet import F, backend, contract, cpu

CUDA_SOURCE = pathlib.Path(contract.__file__).with_name("cuda.py")
SETTINGS = {"VERSIONS", "DEFAULT_VERSION", "configure"}  # what a backend has besides its kernels


def parameters(sig):
    return [(p.name, p.kind, p.default) for p in sig.parameters.values()]


def public_functions(module):
    """The public functions a module (or a package's modules) defines itself."""
    return {name for name, obj in vars(module).items()
            if not name.startswith("_") and inspect.isfunction(obj)
            and (obj.__module__ == module.__name__ or obj.__module__.startswith(module.__name__ + "."))}


# ---------------------------------------------------------------------------- conformance

def test_cpu_implements_the_contract():
    assert public_functions(cpu) - SETTINGS == set(contract.CONTRACT)
    for name in contract.CONTRACT:
        assert parameters(inspect.signature(getattr(cpu, name))) == parameters(contract.signature(name)), name


def test_cuda_source_implements_the_contract():
    """Read from minunet/cuda.py's source: this runs where CuPy is absent too."""
    tree = ast.parse(CUDA_SOURCE.read_text())
    defs = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef) and not node.name.startswith("_")}
    assert set(defs) == set(contract.CONTRACT), "minunet/cuda.py's public functions must be the contract's kernels"
    for name, node in defs.items():
        args = node.args
        names = [a.arg for a in args.args]
        defaults = [None] * (len(names) - len(args.defaults)) + [ast.literal_eval(d) for d in args.defaults]
        expected = [(p.name, p.default if p.default is not inspect.Parameter.empty else None)
                    for p in contract.signature(name).parameters.values()]
        assert list(zip(names, defaults)) == expected, f"cuda.{name}: {names} differs from the contract"
        assert not args.vararg and not args.kwarg and not args.kwonlyargs, name


def test_cuda_module_implements_the_contract_where_cupy_imports():
    pytest.importorskip("cupy", reason="CuPy is not installed: the source test above covers minunet/cuda.py")
    cuda = importlib.import_module("minunet.cuda")
    assert public_functions(cuda) - SETTINGS == set(contract.CONTRACT)
    for name in contract.CONTRACT:
        assert parameters(inspect.signature(getattr(cuda, name))) == parameters(contract.signature(name)), name
    assert set(cuda.VERSIONS) == set(cpu.VERSIONS), "the two backends version different kernels"
    assert all(cuda.DEFAULT_VERSION[name] in cuda.VERSIONS[name] for name in cuda.VERSIONS)


def test_versions_tables():
    versioned = {name for name in contract.CONTRACT if "version" in contract.signature(name).parameters}
    assert set(cpu.VERSIONS) == versioned, "VERSIONS must list exactly the kernels that take version="
    for name, vs in cpu.VERSIONS.items():
        assert isinstance(vs, tuple) and vs and all(isinstance(v, int) for v in vs) and len(set(vs)) == len(vs), name


def test_kernels_for_returns_the_checked_kernels():
    k = backend.kernels_for(np.zeros(1))
    assert isinstance(k, contract.Kernels) and k.module is cpu and k is backend.kernels_for(np.ones(2))
    assert k.VERSIONS is cpu.VERSIONS
    for name in contract.CONTRACT:
        assert parameters(inspect.signature(getattr(k, name))) == parameters(contract.signature(name)), name


def test_pair_has_one_meaning():
    assert contract.pair("op", "stride", 2) == (2, 2)
    assert contract.pair("op", "stride", (1, np.int64(3))) == (1, 3)
    assert all(type(v) is int for v in contract.pair("op", "stride", np.int32(2)))
    for bad, error in [((1, 2, 3), TypeError), ("2", TypeError), ((1.0, 2), TypeError), ((True, 1), TypeError),
                       (-1, ValueError)]:
        with pytest.raises(error, match="op: stride"):
            contract.pair("op", "stride", bad)


# ---------------------------------------------------------------------------- checks, on every device

def _arrays(xp):
    """d(*shape, dtype=float32): a standard-normal array of `xp`."""
    rng = np.random.default_rng(0)
    return lambda *shape, dtype=np.float32: xp.asarray(rng.standard_normal(shape).astype(dtype))


def _bad_calls(xp):
    """(label, call taking the kernels k and the array factory d, error, message): arguments every
    backend must refuse, with the same message."""
    i64 = lambda *shape: xp.zeros(shape, np.int64)  # noqa: E731
    i32 = lambda *shape: xp.zeros(shape, np.int32)  # noqa: E731
    hyper = lambda *shape: xp.zeros(shape, np.float64)  # noqa: E731
    wrong = "numpy" if xp is not np else "float"
    wrong_x = np.zeros((1, 2, 6, 6), np.float32) if xp is not np else 1.5
    name = xp.__name__
    return [
        ("wrong array type", lambda k, d: k.conv2d_forward(wrong_x, d(3, 2, 3, 3), None, 1, 0),
         TypeError, rf"conv2d_forward: x must be a {name}.ndarray on the .*, got {'ndarray' if wrong == 'numpy' else 'float'}"),
        ("float16", lambda k, d: k.relu_forward(d(2, 3, dtype=np.float16)), TypeError,
         r"relu_forward: x has dtype float16"),
        ("mixed dtypes", lambda k, d: k.conv2d_forward(d(1, 2, 6, 6), d(3, 2, 3, 3, dtype=np.float64), None, 1, 0),
         TypeError, r"conv2d_forward: w has dtype float64 but x has float32"),
        ("non-contiguous", lambda k, d: k.conv2d_forward(d(1, 2, 6, 6)[:, :, ::2], d(3, 2, 3, 3), None, 1, 0),
         ValueError, r"conv2d_forward: x of shape \(1, 2, 3, 6\) must be C-contiguous"),
        ("rank", lambda k, d: k.conv2d_forward(d(2, 6, 6), d(3, 2, 3, 3), None, 1, 0),
         ValueError, r"conv2d_forward: x must have 4 dimensions, got shape \(2, 6, 6\)"),
        ("channels", lambda k, d: k.conv2d_forward(d(1, 2, 6, 6), d(3, 4, 3, 3), None, 1, 0),
         ValueError, r"conv2d_forward: x has 2 channels but w \(3, 4, 3, 3\) expects 4"),
        ("empty output", lambda k, d: k.conv2d_forward(d(1, 2, 6, 6), d(3, 2, 7, 7), None, 1, 0),
         ValueError, r"conv2d_forward: input 6x6 with kernel 7x7, stride \(1, 1\) and padding \(0, 0\) gives an empty"),
        ("stride 0", lambda k, d: k.conv2d_forward(d(1, 2, 6, 6), d(3, 2, 3, 3), None, 0, 0),
         ValueError, r"conv2d_forward: stride must be >= 1"),
        ("stride not a pair", lambda k, d: k.max_pool2d_forward(d(1, 2, 6, 6), (2, 2), (2, 2, 2), (0, 0)),
         TypeError, r"max_pool2d_forward: stride must be an int or an \(h, w\) pair of ints"),
        ("gy shape", lambda k, d: k.conv2d_backward_input(d(1, 3, 5, 5), d(3, 2, 3, 3), (1, 2, 6, 6), 1, 0),
         ValueError, r"conv2d_backward_input: gy has shape \(1, 3, 5, 5\), expected \(1, 3, 4, 4\)"),
        ("x_shape", lambda k, d: k.conv2d_backward_input(d(1, 3, 4, 4), d(3, 2, 3, 3), (1, 2, 6), 1, 0),
         ValueError, r"conv2d_backward_input: x_shape must be 4 positive ints, got \(1, 2, 6\)"),
        ("w_shape channels", lambda k, d: k.conv2d_backward_weight(d(1, 2, 6, 6), d(1, 3, 4, 4), (3, 5, 3, 3), 1, 0),
         ValueError, r"conv2d_backward_weight: x has 2 channels but w_shape \(3, 5, 3, 3\) expects 5"),
        ("unknown version", lambda k, d: k.conv2d_forward(d(1, 2, 6, 6), d(3, 2, 3, 3), None, 1, 0, version=9),
         ValueError, r"conv2d_forward: unknown version 9; available"),
        ("bias shape", lambda k, d: k.conv_transpose2d_forward(d(1, 2, 3, 3), d(2, 3, 2, 2), d(4)),
         ValueError, r"conv_transpose2d_forward: b has shape \(4,\), expected \(3,\)"),
        ("patches", lambda k, d: k.conv_transpose2d_backward_input(d(1, 3, 5, 6), d(2, 3, 2, 2)),
         ValueError, r"conv_transpose2d_backward_input: gy \(1, 3, 5, 6\) is not a whole number of 2x2 patches"),
        ("pool padding", lambda k, d: k.max_pool2d_forward(d(1, 2, 6, 6), (2, 2), (2, 2), (2, 2)),
         ValueError, r"max_pool2d_forward: padding \(2, 2\) must be at most half of kernel_size \(2, 2\)"),
        ("argmax dtype", lambda k, d: k.max_pool2d_backward(d(1, 2, 3, 3), i32(1, 2, 3, 3), (1, 2, 6, 6)),
         TypeError, rf"max_pool2d_backward: argmax must be a {name} int64 array, got dtype int32"),
        ("argmax shape", lambda k, d: k.max_pool2d_backward(d(1, 2, 3, 3), i64(1, 1, 3, 3), (1, 2, 6, 6)),
         ValueError, r"max_pool2d_backward: argmax has shape \(1, 1, 3, 3\), expected \(1, 2, 3, 3\)"),
        ("pool x_shape", lambda k, d: k.max_pool2d_backward(d(1, 2, 3, 3), i64(1, 2, 3, 3), (1, 3, 6, 6)),
         ValueError, r"max_pool2d_backward: gy has shape \(1, 2, 3, 3\) but x_shape \(1, 3, 6, 6\)"),
        ("no inputs", lambda k, d: k.concat_forward([], [], (4, 4)),
         ValueError, r"concat_forward: expected at least one input"),
        ("crop window", lambda k, d: k.concat_forward([d(1, 2, 6, 6), d(1, 1, 4, 4)], [(0, 0), (1, 1)], (4, 4)),
         ValueError, r"concat_forward: the 4x4 window at \(top, left\) = \(1, 1\) does not fit input 1"),
        ("batch sizes", lambda k, d: k.concat_forward([d(1, 2, 4, 4), d(2, 1, 4, 4)], [(0, 0), (0, 0)], (4, 4)),
         ValueError, r"concat_forward: input 1 has shape \(2, 1, 4, 4\); every input must be \(N=1"),
        ("offsets", lambda k, d: k.concat_forward([d(1, 2, 4, 4)], [(0, 0), (0, 0)], (4, 4)),
         ValueError, r"concat_forward: 1 inputs but 2 offsets"),
        ("split shapes", lambda k, d: k.concat_backward(d(1, 2, 6, 6), [(1, 1, 6, 6)], [(0, 0)]),
         ValueError, r"concat_backward: x_shapes .* do not split gy"),
        ("relu bias rank", lambda k, d: k.relu_forward(d(2, 3), d(3)),
         ValueError, r"relu_forward: a bias needs x of shape \(N, C, H, W\)"),
        ("relu y shape", lambda k, d: k.relu_backward(d(2, 3), d(3, 2)),
         ValueError, r"relu_backward: y has shape \(3, 2\), expected \(2, 3\)"),
        ("bias rank", lambda k, d: k.bias_backward(d(5)), ValueError, r"bias_backward: gy must be \(N, C, \.\.\.\)"),
        ("target dtype", lambda k, d: k.softmax_cross_entropy_forward(d(1, 2, 6, 6), i32(1, 6, 6), None, -100),
         TypeError, rf"softmax_cross_entropy_forward: target must be a {name} int64 array"),
        ("class weight", lambda k, d: k.softmax_cross_entropy_forward(d(1, 2, 6, 6), i64(1, 6, 6), d(3), -100),
         ValueError, r"softmax_cross_entropy_forward: weight has shape \(3,\), expected \(2,\)"),
        ("gloss shape", lambda k, d: k.softmax_cross_entropy_backward(d(1, 2, 6, 6), i64(1, 6, 6), None, -100, d(1, 6, 5)),
         ValueError, r"softmax_cross_entropy_backward: gloss has shape \(1, 6, 5\), expected \(1, 6, 6\)"),
        ("bn eval stats", lambda k, d: k.batch_norm_forward(d(1, 2, 6, 6), None, None, None, None, 1e-5, False),
         ValueError, r"batch_norm_forward: eval mode"),
        ("bn gamma", lambda k, d: k.batch_norm_forward(d(2, 2, 6, 6), d(3), None, None, None, 1e-5, True),
         ValueError, r"batch_norm_forward: gamma has shape \(3,\), expected \(2,\)"),
        ("bn backward stats", lambda k, d: k.batch_norm_backward(d(2, 2, 3, 3), d(2, 2, 3, 3), None, None, None, 1e-5, True),
         ValueError, r"batch_norm_backward: needs the mean and var"),
        ("buffer list", lambda k, d: k.sgd_update([d(4, 5), d(3)], [d(4, 5), d(3)], [None], hyper(2, 6)),
         ValueError, r"sgd_update: bufs holds 1 arrays for 2 parameters"),
        ("state shape", lambda k, d: k.adam_update([d(4, 5)], [d(4, 5)], [d(4, 5)], [d(5, 4)], hyper(1, 8)),
         ValueError, r"adam_update: vs\[0\] has shape \(5, 4\), expected \(4, 5\)"),
        ("hyper rows", lambda k, d: k.adam_update([d(4, 5)], [d(4, 5)], [d(4, 5)], [d(4, 5)], hyper(1, 6)),
         ValueError, r"adam_update: hyper has shape \(1, 6\), expected \(1, 8\)"),
        ("hyper dtype", lambda k, d: k.sgd_update([d(3)], [d(3)], [None], d(1, 6)),
         TypeError, r"sgd_update: hyper must be a C-contiguous float64"),
        ("twice", lambda k, d: (lambda p: k.sgd_update([p, p], [d(3), d(3)], [None, None], hyper(2, 6)))(d(3)),
         ValueError, r"sgd_update: a parameter appears twice"),
    ]


@pytest.mark.parametrize("label", [c[0] for c in _bad_calls(np)])
def test_bad_arguments_are_refused_alike_on_every_device(device, xp, label):
    call, error, message = next(c[1:] for c in _bad_calls(xp) if c[0] == label)
    k = backend.kernels_for(xp.zeros(1))
    with pytest.raises(error, match=message):
        call(k, _arrays(xp))


def test_functional_ops_check_what_only_they_see():
    x = minunet.tensor(np.zeros((1, 3, 4, 4), np.float32))
    with pytest.raises(ValueError, match=r"conv_transpose2d: output_padding \(2, 2\) must be smaller than stride"):
        F.conv_transpose2d(x, minunet.tensor(np.zeros((3, 4, 2, 2), np.float32)), stride=2, output_padding=2)
    with pytest.raises(ValueError, match=r"conv_transpose2d: input x has 3 channels .* weight expects 2"):
        F.conv_transpose2d(x, minunet.tensor(np.zeros((2, 4, 3, 3), np.float32)), stride=2)  # adjoint roles


# ---------------------------------------------------------------------------- outputs

def test_outputs_that_break_their_declaration_are_caught():
    def bad_relu(x, b=None):
        return x[:1].copy()
    fake = types.SimpleNamespace(__name__="fake", VERSIONS=cpu.VERSIONS,
                                 **{name: getattr(cpu, name) for name in contract.CONTRACT})
    fake.relu_forward = bad_relu
    fake.sgd_update = lambda *args: np.zeros(1)
    k = contract.Kernels(fake, np, "CPU")
    with pytest.raises(AssertionError, match=r"relu_forward output 0: ndarray \(1, 3\) float32, declared \(2, 3\) float32"):
        k.relu_forward(np.ones((2, 3), np.float32))
    with pytest.raises(AssertionError, match="sgd_update updates in place and must return None"):
        k.sgd_update([np.ones(3)], [np.ones(3)], [None], np.zeros((1, 6)))
    np.testing.assert_array_equal(k.relu_backward(np.ones(2), np.ones(2)), np.ones(2))  # the others pass through


# ---------------------------------------------------------------------------- counting

def _conv_problem():
    rng = np.random.default_rng(0)
    x = minunet.tensor(rng.standard_normal((2, 3, 8, 8)).astype(np.float32))
    w = minunet.tensor(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), requires_grad=True)
    return x, w


def test_debug_counts_calls_flops_and_bytes():
    x, w = _conv_problem()
    with minunet.debug() as counts:
        y = F.relu(F.conv2d(x, w, padding=1))
        y.sum().backward()
    F.conv2d(x, w, padding=1)  # after the block: not counted
    assert counts.calls["conv2d_forward"] == 1 and counts.calls["conv2d_backward_weight"] == 1
    assert "conv2d_backward_input" not in counts.calls  # x needs no gradient
    assert counts.flops["conv2d_forward"] == 2 * 2 * 4 * 8 * 8 * 3 * 3 * 3
    assert counts.bytes["conv2d_forward"] == x.data.nbytes + w.data.nbytes + y.data.nbytes
    assert counts.calls["relu_forward"] == 1 and counts.flops["relu_forward"] == y.data.size
    table = counts.table()
    assert table.splitlines()[1].startswith("conv2d_") and "total" in table.splitlines()[-1]


def test_minunet_debug_environment_variable_is_read_at_call_time(monkeypatch, capsys):
    x, w = _conv_problem()
    monkeypatch.setattr(contract, "_env_counts", None)
    monkeypatch.setattr(contract.atexit, "register", lambda fn: None)
    F.conv2d(x, w)
    assert contract._env_counts is None, "nothing is counted without MINUNET_DEBUG"
    monkeypatch.setenv("MINUNET_DEBUG", "2")
    F.conv2d(x, w)
    assert contract._env_counts.calls["conv2d_forward"] == 1
    assert "minunet kernel conv2d_forward" in capsys.readouterr().err  # level 2: one line per call
    monkeypatch.setenv("MINUNET_DEBUG", "0")
    F.conv2d(x, w)
    assert contract._env_counts.calls["conv2d_forward"] == 1
