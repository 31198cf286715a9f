"""Data parallelism (minunet.distributed): shares of the global batch, one process untouched,
and, under `mpiexec -n 2`, two processes that train exactly the one-process model, resume
after Ctrl-C, and end together within seconds when one of them fails.

The multi-process tests start `mpiexec` (MPICH's, from `pip install mpich`, or the system's)
and skip where mpi4py or mpiexec is missing. Their configurations are tiny: starting two
Python processes that import minunet is most of their time."""
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

from minunet import distributed, nn
from minunet.autograd import tensor
from minunet.cli import main
from minunet.data import Augment, DataLoader, SyntheticDataset, split_indices

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import mpi_worker  # noqa: E402  (beside this file)


def _find_mpiexec():
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return None
    return shutil.which("mpiexec", path=str(pathlib.Path(sys.executable).parent)) or shutil.which("mpiexec")


MPIEXEC = _find_mpiexec()
needs_mpi = pytest.mark.skipif(MPIEXEC is None, reason="needs mpi4py and mpiexec: pip install 'minunet[mpi]'")
ENV = {**{k: v for k, v in os.environ.items() if k not in distributed.LAUNCHER_SIZE_VARIABLES},
       "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def mpiexec(*args, n=2, cwd=None, timeout=300):
    """Run `python *args` as n MPI processes; the CompletedProcess (output as text)."""
    return subprocess.run([MPIEXEC, "-n", str(n), sys.executable, *map(str, args)], env=ENV, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def params(run_dir):
    return {k: v for k, v in load_file(run_dir / "last.safetensors").items() if k.startswith("model.")}


def history(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ---- one process --------------------------------------------------------------------------

def test_share_cuts_contiguous_nearly_equal_slices_in_rank_order():
    for n in range(0, 12):
        for size in range(1, 5):
            parts = [range(n)[distributed.share(n, r, size)] for r in range(size)]
            assert [i for p in parts for i in p] == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_sharded_loader_gives_each_rank_its_share_of_every_global_batch():
    ds = SyntheticDataset(num_samples=23, image_size=16, seed=3)
    kwargs = dict(batch_size=5, shuffle=True, seed=4, augment=Augment(seed=4), indices=np.arange(3, 23), prefetch=0)
    whole = DataLoader(ds, **kwargs)
    ranks = [distributed.ShardedLoader(ds, rank=r, size=3, **kwargs) for r in range(3)]
    for loader in [whole, *ranks]:
        loader.set_epoch(1)
    parts = list(zip(*ranks))
    assert len(parts) == len(whole) == 4
    for (x, y), shares in zip(whole, parts):
        assert [len(s[0]) for s in shares] == [1, 2, 2]
        np.testing.assert_array_equal(np.concatenate([s[0] for s in shares]), x)  # augmented alike
        np.testing.assert_array_equal(np.concatenate([s[1] for s in shares]), y)


def test_launcher_variables_say_how_many_processes_were_started():
    assert distributed.launched_processes({}) == (1, None)
    assert distributed.launched_processes({"PMI_SIZE": "1"}) == (1, None)
    assert distributed.launched_processes({"OMPI_COMM_WORLD_SIZE": "4"}) == (4, "OMPI_COMM_WORLD_SIZE")
    assert distributed.launched_processes({"PMI_SIZE": "junk", "SLURM_STEP_NUM_TASKS": "2"})[0] == 2


def test_one_process_group_changes_nothing():
    group = distributed.ProcessGroup()
    a = np.arange(3.0)
    assert group.allreduce(a) is a and group.broadcast(a) is a and a.tolist() == [0, 1, 2]
    w = nn.Parameter(np.ones(3))
    reducer = distributed.Reducer(group, [w])
    assert not w._grad_hooks  # no hook on the parameters
    (tensor(np.arange(3.0)) * w).sum().backward()
    grad = w.grad
    reducer.wait()
    assert w.grad is grad and w.grad.tolist() == [0, 1, 2]


ALONE = r"""
import importlib.abc, sys
tried = []
class Block(importlib.abc.MetaPathFinder):  # records and refuses any import of mpi4py
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "mpi4py":
            tried.append(name)
            raise ImportError("mpi4py is not installed (blocked by the test)")
sys.meta_path.insert(0, Block())
import os, numba
environment = dict(os.environ)
from minunet import distributed
from minunet.cli import main
threads = numba.get_num_threads()
rc = main(["train", "--samples", "12", "--image-size", "16", "--base-channels", "4", "--depth", "1",
           "--epochs", "1", "--batch-size", "4", "--no-progress", "--out", sys.argv[1]])
assert rc == 0 and distributed.init().size == 1, rc
# nothing changed in the process: no thread setting and no environment variable (importing
# threadpoolctl sets KMP_DUPLICATE_LIB_OK; minunet's CPU kernels import it and put it back)
assert not tried and dict(os.environ) == environment and numba.get_num_threads() == threads, tried
os.environ["PMI_SIZE"] = "2"  # as if mpiexec had started two: now mpi4py is needed, and missing
distributed._group = None
sys.exit(main(["train", "--out", sys.argv[1] + "-2"]))
"""


def test_one_process_without_mpi4py_trains_and_imports_nothing(tmp_path):
    out = subprocess.run([sys.executable, "-c", ALONE, str(tmp_path / "run")], env=ENV, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    assert (tmp_path / "run" / "last.safetensors").is_file()
    err = out.stderr.strip().splitlines()
    assert len(err) == 1 and "PMI_SIZE=2" in err[0] and "pip install 'minunet[mpi]'" in err[0], err


NCCL_ONE_GPU = r"""
import cupy, numpy as np
from minunet import distributed
group = distributed.MPIProcessGroup()  # a singleton MPI job: one rank, through MPI's and NCCL's code paths
a = cupy.arange(6, dtype=cupy.float32)
group.allreduce(a)
group.allreduce_async(a).wait()
group.broadcast(a)
host = group.allreduce(np.arange(3, dtype=np.int64))
cupy.cuda.get_current_stream().synchronize()
assert group.size == 1 and a.get().tolist() == list(range(6)) and host.tolist() == [0, 1, 2]
print("nccl ok")
"""


@pytest.mark.gpu
def test_nccl_path_runs_on_one_gpu():
    from minunet import backend
    if os.environ.get("MINUNET_CUDA_EMULATOR") == "1":
        pytest.skip("NCCL needs a real GPU: the CUDA emulator models kernels, not NCCL")
    if not backend.cuda_available() or MPIEXEC is None:
        pytest.skip("needs a GPU, mpi4py and NCCL")
    out = subprocess.run([sys.executable, "-c", NCCL_ONE_GPU], env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "nccl ok" in out.stdout, out.stderr[-3000:]


# ---- two processes ----------------------------------------------------------------------------

@needs_mpi
def test_two_processes_take_one_process_steps_in_float64(tmp_path):
    out = mpiexec(ROOT / "tests" / "mpi_worker.py", tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    for r in (0, 1):
        seen = json.loads((tmp_path / f"collectives{r}.json").read_text())
        assert seen == {"allreduce_f32": [3, 3, 3], "allreduce_i64": [[1, 10]], "broadcast": [0, 2, 4, 6],
                        "object": {"from": 0}, "sum_values": [1, 1], "all_sum": [3, 3],
                        "all_sum_grad": [3, 3]}  # gx = sum over ranks of gy = 1 + 2
    one = mpi_worker.train_steps(distributed.ProcessGroup())
    ranks = [np.load(tmp_path / f"rank{r}.npz") for r in (0, 1)]
    assert int(ranks[0]["buckets"]) > 2
    for name, want in one.items():
        if name != "buckets":
            np.testing.assert_array_equal(ranks[0][name], ranks[1][name])  # the ranks stay identical
            np.testing.assert_allclose(ranks[0][name], want, rtol=1e-10, atol=1e-12 * np.abs(want).max(),
                                       err_msg=name)


# SGD: its step is linear in the gradient, so float32 runs that differ only in the order of the
# gradient's additions (1e-7) stay within 1e-5 for all 15 steps. Adam divides by the gradient's
# running size: where a gradient is near zero those differences flip steps and grow, to 1e-3
# after 15 steps here; the float64 test above holds Adam to 1e-10.
TRAIN = ["-m", "minunet", "train", "--samples", "40", "--image-size", "16", "--base-channels", "4", "--depth", "1",
         "--batch-size", "6", "--val-fraction", "0.25", "--epochs", "3", "--sync-batch-norm", "--optimizer", "sgd",
         "--lr", "0.05", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """A tiny 2-process run with the default run folder (runs/<timestamp> in a fresh folder)."""
    if MPIEXEC is None:
        pytest.skip("needs mpi4py and mpiexec: pip install 'minunet[mpi]'")
    cwd = tmp_path_factory.mktemp("two")
    out = mpiexec(*TRAIN, cwd=cwd)
    assert out.returncode == 0, out.stderr[-3000:]
    return cwd, out


@needs_mpi
def test_two_process_training_equals_one_process_and_writes_one_run_folder(two_process_run, tmp_path):
    cwd, out = two_process_run
    (run,) = list((cwd / "runs").iterdir())  # the ranks agreed on one folder; only rank 0 wrote
    assert out.stdout.count("done: 3 epochs") == 1 and "data parallel: 2 processes" in out.stdout
    assert main(["train", *TRAIN[3:], "--out", str(tmp_path / "one")]) == 0
    one = tmp_path / "one"
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in one.iterdir())
    for name, want in params(one).items():
        got = params(run)[name]
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), name
    for a, b in zip(history(run), history(one)):
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-5 and abs(a["mean_dice"] - b["mean_dice"]) < 1e-3


@needs_mpi
def test_two_process_run_resumes_after_ctrl_c_exactly(two_process_run, tmp_path):
    cwd, _ = two_process_run
    (whole,) = list((cwd / "runs").iterdir())
    run = tmp_path / "run"
    cmd = [MPIEXEC, "-n", "2", sys.executable, *TRAIN, "--out", str(run)]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not ((run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text()):  # epoch 1 done
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)  # mpiexec passes Ctrl-C on to both ranks
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "stopped at epoch" in stdout, stderr[-3000:]
    assert len(history(run)) < 3
    out = mpiexec(*TRAIN[:3], "--resume", run)
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(history(run)) == 3
    for name, want in params(whole).items():
        np.testing.assert_array_equal(params(run)[name], want, err_msg=name)


@needs_mpi
def test_a_failing_rank_ends_the_job_within_seconds(tmp_path):
    # a folder dataset whose one bad mask (a label outside the classes) is rank 1's to load
    n, classes = 12, 2
    for sub in ("images", "masks"):
        (tmp_path / sub).mkdir()
    rng = np.random.default_rng(0)
    train_idx, _ = split_indices(n, 0.25, "random", seed=0)
    bad = DataLoader(range(n), batch_size=2, seed=0, indices=train_idx).batches(0)[1][1]  # batch 1, rank 1
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(tmp_path / "images" / f"im{i:02}.png")
        y = rng.integers(0, classes, (16, 16), dtype=np.uint8)
        y[0, 0] = 7 if i == bad else y[0, 0]
        Image.fromarray(y).save(tmp_path / "masks" / f"im{i:02}.png")
    start = time.monotonic()
    out = mpiexec("-m", "minunet", "train", "--data", tmp_path, "--classes", classes, "--image-size", 16,
                  "--base-channels", 4, "--depth", 1, "--batch-size", 2, "--val-fraction", 0.25,
                  "--no-progress", "--out", tmp_path / "run", timeout=120)
    assert time.monotonic() - start < 60  # startup included; without MPI_Abort rank 0 would wait forever
    assert out.returncode != 0
    ours = [line for line in out.stderr.splitlines() if "minunet: error" in line]
    assert len(ours) == 1 and f"im{bad:02}.png" in ours[0] and ours[0].endswith("[rank 1 of 2]"), out.stderr[-3000:]
