"""Run one benchmark measurement in a fresh Python process and read its result back.

Timing minunet and PyTorch side by side in one process measures their interference as much as
their speed. On the CPU both bring thread pools: OpenBLAS's workers (numpy's GEMMs, under
minunet) used to spin after each call, and PyTorch timed after minunet in one process once
read 1.3 images/s instead of ~25; and the library imported first sets up the OpenMP runtime
(libgomp) that the other then shares. So a script built on this module times each library
in a process of its own, which imports that library first, and alternates them: on a shared
machine whose speed drifts, the ratio of two back-to-back measurements is far steadier than
either one.

A script that uses it accepts `--library=minunet` or `--library=pytorch`; given one, it
imports that library before anything else (see `argv_option`), measures it alone, and prints
one JSON line last. `median_seconds` is the timing loop such a measurement runs. A script may
import numpy before the library, as most user scripts do (`--import-first=numpy`): importing
minunet changes nothing in the process, so the order must not matter, and
bench_train_step.py --compare-import-order checks that it does not.
"""
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def use_cuda_emulator_if_asked():
    """With MINUNET_CUDA_EMULATOR=1, put the CUDA emulator (tests/cuda_emulator) in CuPy's place
    before minunet is imported, as tests/conftest.py does: the GPU check's plumbing then runs
    without a GPU (its timings mean nothing there)."""
    if os.environ.get("MINUNET_CUDA_EMULATOR") == "1" and "cupy" not in sys.modules:
        sys.path.insert(0, str(ROOT / "tests"))
        import cuda_emulator
        cuda_emulator.install()


def argv_option(name, default=None):
    """The value of option `name` (e.g. '--library') this process was started with as
    `name=VALUE`, or `default`: read from sys.argv before argparse runs, so that the script can
    import that library first."""
    return next((a.split("=", 1)[1] for a in sys.argv if a.startswith(name + "=")), default)


def measure(script, library, args=()):
    """Run `script --library=library *args` in a fresh interpreter (with this checkout on
    PYTHONPATH) and return the JSON object of its last line of output."""
    cmd = [sys.executable, str(script), f"--library={library}", *map(str, args)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"timing {library} in a subprocess failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def median_seconds(fn, rounds, warmup=2):
    """The median wall time of `rounds` calls of fn(), after `warmup` untimed calls (which
    compile numba kernels, fill caches and grow scratch buffers)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
