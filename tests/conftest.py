"""Shared fixtures: the `device` fixture runs a test on 'cpu' and, where a GPU is usable, on
'cuda' (marked `gpu`, so `pytest -m gpu` selects exactly the GPU cases).

With MINUNET_CUDA_EMULATOR=1 the CUDA emulator (tests/cuda_emulator) stands in for CuPy and a
GPU: it is installed here, before minunet is imported, so 'cuda' is usable and every kernel
runs on the CPU under its checks (`MINUNET_CUDA_EMULATOR=1 python -m pytest -m gpu`)."""
import os
import pathlib

import numpy as np
import pytest

if os.environ.get("MINUNET_CUDA_EMULATOR") == "1":
    import cuda_emulator

    cuda_emulator.install()

from minunet import backend  # noqa: E402

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
