"""minunet changes nothing in the user's process when it is imported, and the CPU kernels' own
thread settings (minunet/cpu/runtime.py) are made at the first launch and scoped:

- importing minunet (and its CPU kernels, data and command modules) sets no environment
  variable, changes no numba setting, starts no thread pool and changes no BLAS setting, in
  either import order (NumPy first or minunet first);
- the first kernel launch starts numba's pool and leaves the environment, numba's settings
  and the BLAS thread count as they were;
- a GEMM of the v2 convolution runs with BLAS limited to one thread, and the limit is lifted
  after it;
- runtime.empty's pool hands a large buffer out again only once every array over it is gone;
- scratch buffers are reused from call to call, and from 2 MB up (pooled ones too) start on a
  huge page's boundary, marked for transparent huge pages where Linux has them.

Each check of the settings runs in a fresh interpreter, as this test process has long since launched kernels.
threadpoolctl, which the checks use to read the BLAS settings, sets an environment variable
as it is imported, so a check imports it only after it has compared the environment.
"""
import json
import subprocess
import sys
import textwrap

import pytest

HELPERS = """
import os
ENV = dict(os.environ)
import numba
PRIORITY = list(numba.config.THREADING_LAYER_PRIORITY)

def unchanged(what):
    changed = {k: (ENV.get(k), os.environ.get(k)) for k in ENV.keys() | os.environ.keys() if ENV.get(k) != os.environ.get(k)}
    assert not changed, f"{what} changed the environment: {changed}"
    assert numba.config.THREADING_LAYER_PRIORITY == PRIORITY, f"{what} changed numba's THREADING_LAYER_PRIORITY"

def pool_started():
    try:
        numba.threading_layer()
        return True
    except ValueError:
        return False

def blas_threads():
    import json, threadpoolctl
    return json.dumps({lib["filepath"]: lib["num_threads"] for lib in threadpoolctl.threadpool_info()
                       if lib["user_api"] == "blas"})
"""


def run(code):
    """Run HELPERS then `code` in a fresh interpreter; an assertion error there fails the test.
    Returns what it printed."""
    out = subprocess.run([sys.executable, "-c", HELPERS + textwrap.dedent(code)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip()


def same_blas(printed, default):
    """The BLAS thread counts `printed` (JSON) agree with `default` on every library both list (a
    process that imported more may have loaded another BLAS, SciPy's, which is new, not changed)."""
    a, b = json.loads(printed), json.loads(default)
    return a.keys() & b.keys() and all(a[k] == b[k] for k in a.keys() & b.keys())


@pytest.fixture(scope="module")
def default_blas_threads():
    """The BLAS thread counts of a process that only imported numpy."""
    return run("import numpy\nprint(blas_threads())")


@pytest.mark.parametrize("first", ["numpy", "minunet"])
def test_importing_minunet_changes_nothing(first, default_blas_threads):
    printed = run(f"""
        {"import numpy" if first == "numpy" else ""}
        import minunet, minunet.cpu, minunet.data, minunet.cli, minunet.train
        import numpy
        unchanged("importing minunet")
        assert not pool_started(), "importing minunet started numba's thread pool"
        print(blas_threads())
    """)
    assert same_blas(printed, default_blas_threads), "importing minunet changed the BLAS thread counts"


def test_first_launch_starts_the_pool_and_restores_the_settings(default_blas_threads):
    printed = run("""
        import numpy as np
        import minunet.cpu as cpu
        x, w = np.ones((2, 3, 8, 8), np.float32), np.ones((4, 3, 3, 3), np.float32)
        cpu.conv2d_forward(x, w, None, (1, 1), (1, 1), version=2)   # a kernel launch and a GEMM
        unchanged("the first kernel launch")
        assert pool_started()
        assert cpu.configure() == numba.threading_layer()   # later calls change nothing
        print(blas_threads())
    """)
    assert same_blas(printed, default_blas_threads), "a kernel launch left the BLAS thread counts changed"


def test_gemms_run_on_one_blas_thread(default_blas_threads):
    printed = run("""
        import numpy as np
        import json
        from minunet.cpu import runtime
        seen = []
        @runtime.one_blas_thread
        def gemm(a):
            seen.append(blas_threads())
            return a @ a
        gemm(np.ones((64, 64)))
        assert seen and set(json.loads(seen[0]).values()) == {1}, seen
        print(blas_threads())
    """)
    assert same_blas(printed, default_blas_threads)


def test_pooled_arrays_are_fresh_while_any_view_lives():
    """runtime.empty hands a large buffer out again only once every array over it is gone (a
    reshaped, sliced or transposed view keeps it), and then to the next array of its size;
    small arrays and other sizes come from malloc as usual."""
    import gc

    import numpy as np

    from minunet.cpu import runtime
    shape = (4, 16, 64, 64)                                 # 1 MB of float32: pooled
    a = runtime.empty(shape, np.float32)
    view = a[1:3].reshape(2, 16, -1).transpose(0, 2, 1)   # a view of a view of a view: no copy
    address = a.__array_interface__["data"][0]
    assert np.shares_memory(view, a)
    del a
    gc.collect()
    b = runtime.empty(shape, np.float32)
    assert b.__array_interface__["data"][0] != address, "a buffer was handed out while a view of it lived"
    view[...] = 1.0                                         # the view's memory is still its own
    assert not np.shares_memory(view, b)
    del view, b
    gc.collect()
    held = [runtime.empty(shape, np.float32) for _ in range(2)]   # the two buffers freed above
    assert address in {h.__array_interface__["data"][0] for h in held}, \
        "a buffer whose arrays were all gone was not used again"
    z = runtime.zeros((256, 1024), np.float32)              # same bytes, another shape: pooled too, and zeroed
    assert z.shape == (256, 1024) and not z.any()
    small = runtime.empty((3, 5), np.float64)
    assert small.shape == (3, 5) and small.flags.owndata


def _vm_flags(address):
    """The VmFlags of the mapping of this process that holds address (Linux's /proc/self/smaps)."""
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(v, 16) for v in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    return None


def test_scratch_is_reused_and_large_buffers_are_on_huge_pages():
    """runtime.scratch hands the same memory to the next call of its slot, and a larger buffer only
    when asked for more; thread_scratch's rows (one per numba thread) start on cache lines; from
    2 MB up, scratch and pooled buffers start on a 2 MB boundary in a mapping of their own marked
    for transparent huge pages (VmFlags 'hg'), where Linux offers them."""
    import mmap

    import numba
    import numpy as np

    from minunet.cpu import runtime
    a = runtime.scratch((1000,), np.float32, slot=7)
    b = runtime.scratch((10, 50), np.float64, slot=7)       # the same bytes, another shape
    assert b.shape == (10, 50) and b.__array_interface__["data"][0] == a.__array_interface__["data"][0]
    rows = runtime.thread_scratch(1001, np.float32, slot=7)
    assert rows.shape[0] == numba.get_num_threads() and rows.shape[1] >= 1001
    assert rows.strides[0] % 64 == 0
    big = runtime.scratch((3 << 20,), np.uint8, slot=7)     # 3 MB
    pooled = runtime.empty((3 << 18,), np.float32)          # 3 MB
    for arr in (big, pooled):
        address = arr.__array_interface__["data"][0]
        assert address % (2 << 20) == 0
        if hasattr(mmap, "MADV_HUGEPAGE") and _vm_flags(address) is not None:
            assert "hg" in _vm_flags(address)
    runtime._scratch_space.bufs.pop(7)
