"""Shared fixtures: the `device` fixture runs a test on 'cpu' and, where a GPU is usable, on
'cuda' (marked `gpu`, so `pytest -m gpu` selects exactly the GPU cases)."""
import os
import pathlib

import numpy as np
import pytest

from minunet import backend

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
