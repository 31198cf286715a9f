"""Check before timing (llm.c's habit in dev/cuda): every bench runs what it is about to time
once, at the timed shape, and compares the result with tests/reference.py (NumPy float64, the
same oracle the tests use) before it starts the clock. A fast wrong kernel then fails its
bench instead of posting a figure.

The reference of a large layer takes seconds in float64, so `reference(key, fn)` computes each
once per process and keeps it.
"""
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
import reference  # noqa: E402,F401  (tests/reference.py: the oracle; re-exported for the benches)

_cache = {}


def reference_of(key, fn):
    """fn() (a reference computation), computed once per process for `key`."""
    if key not in _cache:
        _cache[key] = fn()
    return _cache[key]


def check(actual, expected, what, rtol=1e-4):
    """A float32 result (NumPy or CuPy) against the float64 reference: within rtol, and rtol times
    the reference's largest magnitude absolutely (sums of many terms of both signs cancel)."""
    actual = actual.get() if hasattr(actual, "get") else np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape}, expected {expected.shape}"
    scale = float(np.abs(expected).max(initial=0.0)) or 1.0
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale,
                               err_msg=f"{what}: differs from tests/reference.py at the timed shape")
