"""CUDA graphs: the emulator's model of stream capture, and the training step captured as a graph.

The first part runs the emulator's stand-in for CuPy directly (like tests/test_cuda_emulator.py,
in the ordinary CPU suite): a capture records and does not run, graph.launch() replays with
what the arrays hold then, blocks freed during a capture serve its later allocations, and what
CUDA forbids inside a capture is an error (a wait for the device, a host-to-device copy, fresh
device memory). The second part (marked gpu; on the emulator or a GPU) trains with
minunet.cuda_graph.CudaGraphStep and with the eager step side by side: N replayed steps with
new data each give the parameters, optimizer state, batch-norm statistics and losses of N eager
steps, under a learning-rate schedule; planted bugs (a batch copied into a fresh buffer instead
of the captured one, a learning rate that stops reaching the graph) make them differ; and
`minunet train --cuda-graph` refuses the CPU in one line.
"""
import itertools
import platform
import shutil

import numpy as np
import pytest

from minunet import backend, nn, optim
from minunet.autograd import tensor
from minunet.checkpoint import read_checkpoint
from minunet.cli import main
from minunet.cuda_graph import CudaGraphStep
from minunet.train import TrainConfig, segmentation_loss
from minunet.unet import UNet

needs_gxx = pytest.mark.skipif(platform.machine() != "x86_64" or shutil.which("g++") is None,
                               reason="the CUDA emulator needs g++ on x86-64")


# ---- the emulator's model of stream capture -------------------------------------------------

@pytest.fixture
def cp():
    from cuda_emulator import fake_cupy
    return fake_cupy


@needs_gxx
def test_a_capture_records_and_a_launch_replays(cp):
    stream, pool = cp.cuda.Stream(non_blocking=True), cp.cuda.MemoryPool()
    x, y = cp.zeros(3), cp.zeros(3)
    with stream, cp.cuda.using_allocator(pool.malloc):
        (x + 1) * 2  # the warm-up: the pool now holds free blocks of these sizes
        stream.begin_capture()
        t = (x + 1) * 2  # a new array: its block comes from the pool
        y[...] = t
        x += 1
        graph = stream.end_capture()
    np.testing.assert_array_equal(x.get(), [0, 0, 0], err_msg="the capture ran an in-place operation")
    np.testing.assert_array_equal(y.get(), [0, 0, 0], err_msg="the capture ran a copy")
    for expected in ([2, 2, 2], [4, 4, 4], [6, 6, 6]):
        graph.launch(stream)
        np.testing.assert_array_equal(y.get(), expected)


@needs_gxx
def test_blocks_freed_in_a_capture_serve_its_later_allocations(cp):
    """Five temporaries of one size, each freed before the next is made, need one block: the
    capture is served by the warm-up's blocks, and the replay still computes right."""
    stream, pool = cp.cuda.Stream(non_blocking=True), cp.cuda.MemoryPool()
    x, out = cp.asarray(np.arange(4.0)), cp.zeros(4)

    def work():
        v = x
        for _ in range(5):
            v = v + 1  # the previous v is freed here
        out[...] = v

    with stream, cp.cuda.using_allocator(pool.malloc):
        work()
        free = pool.free_bytes()
        stream.begin_capture()
        work()
        graph = stream.end_capture()
    assert 0 < free <= 2 * 2048, f"the warm-up left {free} bytes free for 5 temporaries of 32 bytes"
    out[...] = 0
    graph.launch()
    np.testing.assert_array_equal(out.get(), np.arange(4.0) + 5)


@needs_gxx
@pytest.mark.parametrize("what, work, message", [
    ("item", lambda cp, x: x.item(), r"a device-to-host copy \(item\) during a stream capture"),
    ("bool", lambda cp, x: bool(x), r"a device-to-host copy \(bool\) during a stream capture"),
    ("float", lambda cp, x: float(x), r"a device-to-host copy \(float\) during a stream capture"),
    ("get", lambda cp, x: cp.asnumpy(x), r"a device-to-host copy \(get\) during a stream capture"),
    ("synchronize", lambda cp, x: cp.cuda.Device().synchronize(), r"Device.synchronize\(\) during a stream capture"),
    ("host to device", lambda cp, x: cp.asarray(np.ones(3)), r"cupy.array / cupy.asarray of host data during a "
                                                               r"stream capture: a host-to-device copy"),
    ("set", lambda cp, x: x.set(np.ones(1)), r"ndarray.set during a stream capture: a host-to-device copy"),
    ("no pool", lambda cp, x: cp.empty(3), r"a device allocation of \d+ bytes during a stream capture, with no "
                                           r"memory pool in use"),
    ("random", lambda cp, x: cp.random.random_sample(3), r"cupy.random.random_sample during a stream capture"),
])
def test_what_a_capture_forbids_is_an_error(cp, what, work, message):
    stream, x = cp.cuda.Stream(non_blocking=True), cp.zeros(1)
    with stream:
        stream.begin_capture()
        try:
            with pytest.raises(cp.EmulatorError, match=message):
                work(cp, x)
        finally:
            stream.end_capture()


@needs_gxx
def test_a_pool_without_a_free_block_cannot_allocate_in_a_capture(cp):
    stream, pool = cp.cuda.Stream(non_blocking=True), cp.cuda.MemoryPool()
    with stream, cp.cuda.using_allocator(pool.malloc):
        stream.begin_capture()
        try:
            with pytest.raises(cp.EmulatorError, match=r"a device allocation of \d+ bytes \(cudaMalloc\) during a "
                                                       r"stream capture: the memory pool holds no free block"):
                cp.empty(1000)
        finally:
            stream.end_capture()


@needs_gxx
def test_the_null_stream_cannot_capture(cp):
    with pytest.raises(cp.EmulatorError, match="begin_capture on the legacy null stream"):
        cp.cuda.Stream.null.begin_capture()


# ---- the training step as a graph -----------------------------------------------------------

needs_cuda = pytest.mark.skipif(not backend.cuda_available(), reason=f"no usable GPU: {backend.cuda_status()[1]}")
STEPS, BATCH, SIZE, CLASSES = 4, 2, 16, 3


def _batches(seed=7):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((BATCH, 1, SIZE, SIZE)).astype(np.float32),
             rng.integers(0, CLASSES, (BATCH, SIZE, SIZE)).astype(np.int64)) for _ in range(STEPS)]


def _setup(make_optimizer):
    nn.manual_seed(3)
    model = UNet(in_channels=1, num_classes=CLASSES, base_channels=4, depth=2, batch_norm=True).to("cuda")
    optimizer = make_optimizer(list(model.parameters()))
    return model, optimizer, optim.CosineAnnealingLR(optimizer, T_max=STEPS)


def _loss(logits, y):
    return segmentation_loss(logits, y, TrainConfig(), None)


def _eager(make_optimizer):
    model, optimizer, schedule = _setup(make_optimizer)
    losses = []
    for x, y in _batches():
        optimizer.zero_grad()
        loss = _loss(model(tensor(x, device="cuda")), backend.to_device(y, "cuda"))
        loss.backward()
        optimizer.step()
        schedule.step()  # a new learning rate every step
        losses.append(loss.item())
    return model, optimizer, losses


def _graphed(make_optimizer):
    model, optimizer, schedule = _setup(make_optimizer)
    step = CudaGraphStep(model, optimizer, _loss)
    losses = []
    for x, y in _batches():
        step(x, y)
        schedule.step()
        losses.append(step.item())
    assert step.graph is not None and step.steps == STEPS
    return model, optimizer, losses


def _state(model, optimizer):
    """Every array a training step changes: parameters, buffers (batch-norm statistics and
    counters) and optimizer state, as host arrays by name."""
    out = {f"param {n}": p.numpy() for n, p in model.named_parameters()}
    out.update({f"buffer {n}": b.numpy() for n, b in model.named_buffers()})
    for i, s in optimizer.state_dict()["state"].items():
        out.update({f"state {i} {k}": np.asarray(v) for k, v in s.items()})
    return out


def _differences(a, b):
    return [k for k in a if not np.array_equal(a[k], b[k])]


OPTIMIZERS = {
    "adam": lambda params: optim.Adam(params, lr=1e-2, weight_decay=1e-3),
    "sgd": lambda params: optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
}


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_replayed_steps_equal_eager_steps(name):
    """Bit for bit: the graph replays the eager step's kernels on the same data, and its learning
    rate comes from the rows optimizer.prepare() writes before each replay."""
    (m1, o1, losses1), (m2, o2, losses2) = _eager(OPTIMIZERS[name]), _graphed(OPTIMIZERS[name])
    assert losses1 == losses2
    s1, s2 = _state(m1, o1), _state(m2, o2)
    assert s1.keys() == s2.keys()
    assert not _differences(s1, s2), f"differ after {STEPS} steps: {_differences(s1, s2)}"


def _fresh_buffer(self, batch):  # the planted bug: the batch lands in new arrays the graph never reads
    self.inputs = [self.cupy.asarray(a) for a in batch]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("bug", ["batch into a fresh buffer", "learning rate not rewritten"])
def test_planted_bugs_make_the_replay_differ(bug, monkeypatch):
    """A batch copied into new arrays after the capture (the graph reads the captured ones), or
    hyperparameter rows no longer rewritten after it (a learning rate frozen at capture)."""
    eager = _state(*_eager(OPTIMIZERS["adam"])[:2])
    if bug == "batch into a fresh buffer":
        original = CudaGraphStep._copy_in
        monkeypatch.setattr(CudaGraphStep, "_copy_in", lambda self, batch: (
            original(self, batch) if self.steps < 2 else _fresh_buffer(self, batch)))
    else:
        original, rows_written = backend.copy_from_host, itertools.count()
        monkeypatch.setattr(backend, "copy_from_host", lambda dst, src: (
            original(dst, src) if dst.dtype != np.float64 or next(rows_written) < 2 else None))
    graphed = _state(*_graphed(OPTIMIZERS["adam"])[:2])
    assert _differences(eager, graphed), f"the planted bug ({bug}) went unnoticed"


def test_cuda_graph_on_the_cpu_is_one_clear_error(tmp_path, capsys):
    rc = main(["train", "--samples", "8", "--image-size", "16", "--base-channels", "2", "--depth", "1",
               "--epochs", "1", "--device", "cpu", "--no-progress", "--out", str(tmp_path / "g"), "--cuda-graph"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "--cuda-graph captures the training step on a GPU, in one process; this run is on the CPU" in err
    assert not (tmp_path / "g").exists()


@pytest.mark.gpu
@needs_cuda
def test_train_with_cuda_graph_matches_eager_training(tmp_path, capsys):
    """`minunet train --cuda-graph` (3 batches: warm-up, capture, replay; cosine schedule; Adam; batch
    norm) ends an epoch with the weights and optimizer state of the eager run, bit for bit."""
    args = ["train", "--samples", "20", "--image-size", "16", "--base-channels", "4", "--depth", "2", "--epochs", "1",
            "--batch-size", "4", "--val-fraction", "0.25", "--device", "cuda", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "eager")]) == 0
    assert main([*args, "--out", str(tmp_path / "graph"), "--cuda-graph"]) == 0
    assert "cuda graph: the training step is captured" in capsys.readouterr().out
    eager, graph = (read_checkpoint(tmp_path / run / "last.safetensors") for run in ("eager", "graph"))
    assert eager.model_state.keys() == graph.model_state.keys()
    for name, value in eager.model_state.items():
        np.testing.assert_array_equal(graph.model_state[name], value, err_msg=name)
    for i, state in eager.optimizer_state["state"].items():
        for key, value in state.items():
            np.testing.assert_array_equal(graph.optimizer_state["state"][i][key], value, err_msg=f"{i} {key}")
