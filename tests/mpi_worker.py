"""A few data-parallel training steps, run by tests/test_distributed.py under `mpiexec -n 2`
and in the test's own process (one rank), on the same global batches.

    mpiexec -n 2 python tests/mpi_worker.py OUT_DIR

Each rank trains a tiny float64 U-Net (batch norm over the global batch, per-pixel and
class weights, an ignore label, a Dice term: everything the loss normalisation must get
right) on its share of an odd-sized global batch, with gradient buckets small enough that
there are several, and writes its parameters to OUT_DIR/rank<r>.npz. It also checks the
collectives one by one and writes what it saw to OUT_DIR/collectives<r>.json.
"""
import json
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))

from minunet import distributed, optim  # noqa: E402
from minunet.autograd import tensor  # noqa: E402
from minunet.train import TrainConfig, segmentation_loss  # noqa: E402
from minunet.unet import UNet  # noqa: E402
from minunet import nn  # noqa: E402

GLOBAL_BATCH, SIZE, CLASSES, IGNORE = 5, 12, 3, 255


def global_batches(steps):
    """The same (x, y, pixel weights) global batches on every rank and in one process."""
    rng = np.random.default_rng(7)
    for _ in range(steps):
        x = rng.standard_normal((GLOBAL_BATCH, 1, SIZE, SIZE))
        y = rng.integers(0, CLASSES, size=(GLOBAL_BATCH, SIZE, SIZE))
        y[rng.random(y.shape) < 0.2] = IGNORE  # unevenly many ignored pixels per image
        w = rng.uniform(0.5, 3.0, size=y.shape)
        yield x, y, w


def train_steps(group, steps=3):
    """`steps` Adam steps on this rank's shares; returns the parameters by name."""
    nn.manual_seed(0 if group.rank == 0 else 1)  # different on purpose: broadcast_state must fix it
    model = UNet(in_channels=1, num_classes=CLASSES, base_channels=4, depth=1, batch_norm=True).double()
    distributed.convert_sync_batch_norm(model, group)
    optimizer = optim.Adam(model.parameters(), lr=1e-2)
    distributed.broadcast_state(group, model, optimizer)
    reducer = distributed.Reducer(group, model.parameters(), bucket_mib=1e-3)  # ~1 KiB: several buckets
    cfg = TrainConfig(ignore_index=IGNORE, dice_weight=0.5)
    class_weights = np.array([1.0, 2.0, 0.5])
    part = distributed.share(GLOBAL_BATCH, group.rank, group.size)
    for step, (x, y, w) in enumerate(global_batches(steps)):
        optimizer.zero_grad()
        pixel_weights = w[part] if step % 2 else None  # both normalisations of the cross-entropy
        loss = segmentation_loss(model(tensor(x[part])), y[part], cfg, class_weights, pixel_weights, group)
        loss.backward()
        reducer.wait()
        optimizer.step()
    state = {name: p.numpy() for name, p in model.named_parameters()}
    state.update({f"buffer.{name}": b.numpy() for name, b in model.named_buffers()})
    state["buckets"] = np.array(len(reducer.buckets) if group.size > 1 else 0)
    return state


def check_collectives(group):
    """What each collective gave this rank."""
    r = group.rank
    seen = {}
    seen["allreduce_f32"] = group.allreduce(np.full(3, r + 1, np.float32)).tolist()
    seen["allreduce_i64"] = group.allreduce(np.array([[r, 10 * r]], np.int64)).tolist()
    seen["broadcast"] = group.broadcast(np.arange(4.0) * (r + 1), root=1).tolist()
    seen["object"] = group.broadcast_object({"from": r} if r == 0 else None)
    seen["sum_values"] = group.sum_values([r, 0.5]).tolist()
    x = tensor(np.full(2, float(r + 1)), requires_grad=True)
    y = distributed.all_sum(x, group)
    (y * (r + 1)).sum().backward()  # rank r's loss is (r + 1) * sum over ranks of x
    seen["all_sum"], seen["all_sum_grad"] = y.numpy().tolist(), x.grad.tolist()
    return seen


if __name__ == "__main__":
    out = pathlib.Path(sys.argv[1])
    group = distributed.init()
    (out / f"collectives{group.rank}.json").write_text(json.dumps(check_collectives(group)))
    np.savez(out / f"rank{group.rank}.npz", **train_steps(group))
