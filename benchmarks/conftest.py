"""Shared fixtures for the benchmarks (CPU and GPU alike).

Benchmarks live outside pytest's testpaths, so a plain `pytest` never runs them; run them with

    PYTHONPATH=. python -m pytest benchmarks/<file>.py --benchmark-only

`torch` is PyTorch, for the benches that also time the same operation in PyTorch as a
yardstick, or None where PyTorch is not installed (the bench then times minunet alone).
`rng` is a seeded generator, so every run times the same data. pytest puts this folder on
sys.path, so a bench can `import flops`.
"""
import isolated

isolated.use_cuda_emulator_if_asked()  # MINUNET_CUDA_EMULATOR=1: the CUDA emulator stands in for a GPU

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from minunet import cpu

cpu.configure()  # numba's thread pool now, before a bench imports PyTorch and its OpenMP (minunet/cpu/runtime.py)


@pytest.fixture(scope="session")
def torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


@pytest.fixture
def rng():
    return np.random.default_rng(0)
