"""The backend contract: minunet.cpu and minunet.cuda define exactly the kernel functions that
minunet.backend.KERNELS lists, with exactly the signatures written there; their VERSIONS and
DEFAULT_VERSION tables agree with those signatures; and asking for a device that is not
usable fails with an error that says what is missing.

minunet.cuda is checked wherever CuPy imports (it needs no GPU to import: its kernels compile
lazily, and CI compiles them with NVRTC alone).
"""
import ast
import importlib
import inspect
import types

import numpy as np
import pytest

from minunet import backend


def contract_parameters(name):
    """[(name, kind, default)] of the parameter list written in KERNELS[name], e.g.
    '(x, w, b, stride, padding, version=None) -> y'."""
    params = backend.KERNELS[name].split("->")[0].strip()
    namespace = {}
    exec(compile(ast.parse(f"def {name}{params}: pass"), "<KERNELS>", "exec"), namespace)
    return parameters(namespace[name])


def parameters(fn):
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


def public_functions(module):
    """Names of the public functions a module (or a package's modules) defines itself, not
    ones it imports from elsewhere."""
    return {name for name, obj in vars(module).items()
            if not name.startswith("_") and inspect.isfunction(obj)
            and (obj.__module__ == module.__name__ or obj.__module__.startswith(module.__name__ + "."))}


def cuda_module():
    pytest.importorskip("cupy", reason="CuPy is not installed: no minunet.cuda to check")
    try:
        return importlib.import_module("minunet.cuda")
    except ModuleNotFoundError as e:
        if e.name != "minunet.cuda":
            raise
        pytest.skip("minunet/cuda.py does not exist yet")


@pytest.fixture(params=["cpu", "cuda"])
def kernel_module(request):
    if request.param == "cuda":
        return cuda_module()
    from minunet import cpu
    return cpu


def test_contract_text_parses():
    for name, text in backend.KERNELS.items():
        assert "->" in text, f"KERNELS[{name!r}] has no '-> outputs' part"
        assert contract_parameters(name), f"KERNELS[{name!r}] lists no parameters"


def test_kernel_names_match_contract(kernel_module):
    missing = set(backend.KERNELS) - public_functions(kernel_module)
    extra = public_functions(kernel_module) - set(backend.KERNELS)
    assert not missing, f"{kernel_module.__name__} lacks kernels {sorted(missing)}"
    assert not extra, f"{kernel_module.__name__} has public functions outside the contract: {sorted(extra)}"


@pytest.mark.parametrize("name", sorted(backend.KERNELS))
def test_kernel_signature_matches_contract(kernel_module, name):
    fn = getattr(kernel_module, name, None)
    assert fn is not None, f"{kernel_module.__name__}.{name} is missing"
    assert parameters(fn) == contract_parameters(name), (
        f"{kernel_module.__name__}.{name}{inspect.signature(fn)} differs from the contract {backend.KERNELS[name]}")


def test_cpu_and_cuda_agree():
    from minunet import cpu
    cuda = cuda_module()
    assert public_functions(cpu) == public_functions(cuda)
    for name in sorted(public_functions(cpu)):
        assert parameters(getattr(cpu, name)) == parameters(getattr(cuda, name)), name
    assert set(cpu.VERSIONS) == set(cuda.VERSIONS), "cpu and cuda version a different set of kernels"


def test_versions_tables(kernel_module):
    versions, default = kernel_module.VERSIONS, kernel_module.DEFAULT_VERSION
    versioned = {name for name in backend.KERNELS
                 if "version" in [p[0] for p in contract_parameters(name)]}
    assert set(versions) == versioned, "VERSIONS must list exactly the kernels that take version="
    assert set(default) == versioned, "DEFAULT_VERSION must name a default for every versioned kernel"
    for name, vs in versions.items():
        assert isinstance(vs, tuple) and vs, f"VERSIONS[{name!r}] must be a non-empty tuple"
        assert all(isinstance(v, int) for v in vs) and len(set(vs)) == len(vs), f"VERSIONS[{name!r}] = {vs}"
        assert default[name] in vs, f"DEFAULT_VERSION[{name!r}] = {default[name]} is not in VERSIONS {vs}"


def _versioned_calls(xp):
    """A valid call (positional arguments) for each kernel that takes version=."""
    x, w = xp.ones((1, 2, 4, 4)), xp.ones((3, 2, 3, 3))   # conv2d: y is (1, 3, 2, 2)
    gy = xp.ones((1, 3, 2, 2))
    wt = xp.ones((2, 3, 2, 2))                             # transposed: x (1, 2, 4, 4) -> (1, 3, 8, 8)
    yt = xp.ones((1, 3, 8, 8))
    one, zero = (1, 1), (0, 0)
    return {
        "conv2d_forward": (x, w, None, one, zero),
        "conv2d_backward_input": (gy, w, x.shape, one, zero),
        "conv2d_backward_weight": (x, gy, w.shape, one, zero),
        "conv_transpose2d_forward": (x, wt, None, (2, 2), zero, zero),
        "conv_transpose2d_backward_input": (yt, wt, (2, 2), zero),
        "conv_transpose2d_backward_weight": (x, yt, wt.shape, (2, 2), zero),
    }


def test_unknown_version_is_a_clear_error(device):
    xp = backend.xp_for(device)
    k = backend.kernels_for(xp.zeros(1))
    for name, args in _versioned_calls(xp).items():
        getattr(k, name)(*args, version=None)  # the call itself is valid
        with pytest.raises(ValueError, match=name):
            getattr(k, name)(*args, version=max(k.VERSIONS[name]) + 1)


def test_kernels_for_picks_the_array_module():
    from minunet import cpu
    assert backend.kernels_for(np.zeros(3)) is cpu
    assert backend.array_module(np.zeros(3)) is np
    assert backend.device_of(np.zeros(3)) == "cpu"


@pytest.mark.parametrize("name, expected", [("cpu", "cpu"), ("CPU", "cpu")])
def test_normalize_device_cpu(name, expected):
    assert backend.normalize_device(name) == expected


@pytest.mark.parametrize("name", ["tpu", "cuda:1", ""])
def test_normalize_device_rejects_unknown_names(name):
    with pytest.raises(ValueError, match="device"):
        backend.normalize_device(name)


def test_normalize_device_cuda_here():
    """On this machine: 'cuda' works where a GPU is usable and otherwise names what is missing."""
    usable, reason = backend.cuda_status()
    if usable:
        assert backend.normalize_device("cuda") == "cuda" == backend.normalize_device("auto")
        return
    assert "CuPy" in reason and ("not installed" in reason or "CUDA device" in reason), reason
    with pytest.raises(RuntimeError, match="cuda") as err:
        backend.normalize_device("cuda")
    assert reason in str(err.value)
    assert backend.normalize_device("auto") == "cpu"


def _fake_cupy(get_device_count):
    """Just enough of CuPy for backend's probe: cuda.runtime.getDeviceCount and an ndarray type."""
    runtime = types.SimpleNamespace(getDeviceCount=get_device_count)
    return types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=runtime), ndarray=type("ndarray", (), {}))


def _no_driver():
    raise RuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")


@pytest.mark.parametrize("cupy, missing", [
    (None, "CuPy is not installed"),
    (_fake_cupy(lambda: 0), "no CUDA device is present"),
    (_fake_cupy(_no_driver), "no usable CUDA device"),
])
def test_normalize_device_cuda_names_what_is_missing(monkeypatch, cupy, missing):
    monkeypatch.setattr(backend, "_cupy", cupy)
    monkeypatch.setattr(backend, "_cuda_status", None)  # probe again under the fake
    assert not backend.cuda_available()
    with pytest.raises(RuntimeError, match=missing):
        backend.normalize_device("cuda")
    with pytest.raises(RuntimeError, match=missing):
        backend.xp_for("cuda")
    assert backend.normalize_device("auto") == "cpu"
    assert backend.kernels_for(np.zeros(1)).__name__ == "minunet.cpu"


def test_normalize_device_cuda_with_a_gpu(monkeypatch):
    monkeypatch.setattr(backend, "_cupy", _fake_cupy(lambda: 1))
    monkeypatch.setattr(backend, "_cuda_status", None)
    assert backend.normalize_device("cuda") == "cuda"
    assert backend.normalize_device("cuda:0") == "cuda"
    assert backend.normalize_device("auto") == "cuda"
