"""Shared fixtures: the `device` fixture runs a test on 'cpu' and, where a GPU is usable, on
'cuda' (marked `gpu`, so `pytest -m gpu` selects exactly the GPU cases).

With MINUNET_CUDA_EMULATOR=1 the CUDA emulator (tests/cuda_emulator) stands in for CuPy and a
GPU: it is installed here, before minunet is imported, so 'cuda' is usable and every kernel
runs on the CPU under its checks (`MINUNET_CUDA_EMULATOR=1 python -m pytest -m gpu`)."""
import os
import pathlib

import numpy as np
import pytest

EMULATED = os.environ.get("MINUNET_CUDA_EMULATOR") == "1"
if EMULATED:
    import cuda_emulator

    cuda_emulator.install()
    collect_ignore = ["test_cuda_compile.py"]  # NVRTC needs the real CuPy: the plain run compiles with it

from minunet import backend  # noqa: E402

if os.environ.get("MINUNET_CUPY_POOL") == "0" and backend.cuda_available():
    # every array its own device allocation, so that compute-sanitizer's memcheck sees each
    # array's bounds (benchmarks/gpu_check.py sets this); CuPy's pool would hide them
    import cupy

    cupy.cuda.set_allocator(None)

DATA = pathlib.Path(os.environ.get("MINUNET_DATA", pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"))


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request):
    if request.param == "cuda" and not backend.cuda_available():
        pytest.skip(f"no usable GPU: {backend.cuda_status()[1]}")
    return request.param


@pytest.fixture
def xp(device):
    """numpy or cupy, matching `device`."""
    return backend.xp_for(device)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def data_dir():
    """The real datasets (../shared/data); tests that need them skip where they are absent."""
    if not DATA.is_dir():
        pytest.skip(f"real datasets not found at {DATA}")
    return DATA


def pytest_sessionfinish(session, exitstatus):
    """Under the emulator: say which of minunet.cuda's kernels ran (each family's every kernel in
    float and double); with MINUNET_EMU_REQUIRE_ALL_KERNELS=1 a kernel that never ran fails the run."""
    if not EMULATED:
        return
    import cupy
    from minunet import cuda

    expected = {e for _family, _source, names, _options in cuda._compile_table() for e in names}
    launched = expected & cupy.settings.launched
    missing = sorted(expected - launched)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"\nCUDA emulator: {len(launched)} of the {len(expected)} kernel instantiations of "
                            f"minunet.cuda ran ({cupy.settings.launches} launches, block order "
                            f"{cupy.settings.block_order}, {cupy.settings.sms} SMs)"
                            + (f"; never launched: {', '.join(missing)}" if missing else ""))
    if missing and os.environ.get("MINUNET_EMU_REQUIRE_ALL_KERNELS") == "1" and session.exitstatus == 0:
        session.exitstatus = 1
