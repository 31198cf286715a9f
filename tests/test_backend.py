"""minunet.backend: devices, array modules, and a clear error when the device asked for is not
usable (the kernel contract itself is tests/test_contract.py's)."""
import types

import numpy as np
import pytest

from minunet import backend


def test_kernels_for_picks_the_array_module():
    from minunet import cpu
    assert backend.kernels_for(np.zeros(3)).module is cpu
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
    assert backend.kernels_for(np.zeros(1)).module.__name__ == "minunet.cpu"


def test_normalize_device_cuda_with_a_gpu(monkeypatch):
    monkeypatch.setattr(backend, "_cupy", _fake_cupy(lambda: 1))
    monkeypatch.setattr(backend, "_cuda_status", None)
    assert backend.normalize_device("cuda") == "cuda"
    assert backend.normalize_device("cuda:0") == "cuda"
    assert backend.normalize_device("auto") == "cuda"


def test_conv_precision_leaves_the_cpu_alone_and_checks_its_name():
    """conv_precision('tf32') changes nothing on the CPU (no TF32 there: the same bits); an
    unknown precision is a clear error (the GPU side is in tests/test_cuda_backend.py)."""
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((1, 3, 6, 6)).astype(np.float32), rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    k = backend.kernels_for(x)
    with backend.conv_precision("tf32"):
        y = k.conv2d_forward(x, w, None, (1, 1), (1, 1))
    np.testing.assert_array_equal(y, k.conv2d_forward(x, w, None, (1, 1), (1, 1)))
    with pytest.raises(ValueError, match="precision 'fp16': expected one of fp32, tf32"):
        with backend.conv_precision("fp16"):
            pass
