"""minunet.train: the training loop behind `minunet train`.

`train(TrainConfig(...))` builds everything from one flat configuration and runs it:

    data        SyntheticDataset (the default: no download) or FolderDataset (images + masks)
    split       split_indices: a random or a contiguous validation block
    batches     DataLoader with Augment (flips, 90-degree turns, crops for folder images)
    model       UNet(in_channels, classes, base_channels, depth, padding, batch_norm)
    optimizer   SGD (momentum) / Adam / AdamW, and a cosine learning-rate schedule stepped
                every batch (T_max = epochs x batches per epoch)
    loss        cross-entropy (class weights, ignore label), times the U-Net paper's border
                weight map if asked, plus dice_weight x soft Dice loss if asked

Each epoch trains, then evaluates on the validation split: the network runs over each
validation image with the overlap-tile Tiler of minunet.predict (so images of any size
work, and 'valid' models are scored on the whole image), and the scores come from a
ConfusionMatrix. The run folder then gets, every epoch:

    last.safetensors   everything needed to continue (model, optimizer, schedule, position,
                       history), written atomically: a crash never leaves a broken file
    best.safetensors   the same, at the best validation mean Dice so far
    metrics.jsonl      one JSON object per epoch: epoch, train_loss, val_loss, per-class
                       dice/iou, mean_iou, mean_dice, pixel_accuracy, lr, seconds
    curves.png         loss and scores per epoch
    predictions.png    a few validation images: image | ground truth | prediction

Exact resume. Every random choice is keyed by numbers, never by a generator's history:
the weights by `seed` (nn.manual_seed), the split by `seed`, the order of epoch e by
(seed, e), the augmentation of item i in epoch e by (seed, e, i). So a checkpoint needs
only the position, (epoch, batches done in it), besides the model, optimizer and schedule
state; resuming replays the data loader up to that batch without training on it and goes
on. The result equals the uninterrupted run's, bit for bit on the CPU.

Extending a run. Resuming with a larger `epochs` plans the cosine schedule anew, over the new
total, from the step the run stands at: the learning rate at step t is always
lr * (1 + cos(pi * t / (epochs * batches per epoch))) / 2 for the run's current `epochs`, so
an extended run goes on as if it had been started with the larger number: its learning rate
jumps once, at the resumed step, to that schedule's value there and then decays to 0 at the
new last epoch. A finished run resumed without a larger `epochs` is an error that says so.

Ctrl-C and SIGTERM. The first Ctrl-C (SIGINT), or the SIGTERM that a job scheduler or
`timeout` sends, asks the loop to stop: it finishes the step in flight, writes
last.safetensors at that exact position and returns (`interrupted`); `--resume` goes on from
there. A second signal stops at once, keeping the last checkpoint written.

Nothing lost, nothing silent. The run folder is checked at the start (it must not hold
another run unless `overwrite`) but created only at the first write, the end of epoch 1 or
a stop, so a run that fails on its data leaves nothing behind. A loss or gradient that is
not finite (NaN, infinity) stops training at once with `Diverged`, which names the step,
the last finite loss and the likely cause; the step is not taken, and the checkpoints of the
last good epoch stay as they were. A checkpoint is never written from non-finite weights.
"""
import dataclasses
import datetime
import functools
import json
import math
import pathlib
import signal
import threading
import time

import numpy as np
from tqdm import tqdm

from minunet import backend, distributed, nn, optim
from minunet import functional as F
from minunet.autograd import Tensor, tensor
from minunet.checkpoint import atomic_write, check_finite, load_checkpoint, read_checkpoint, save_checkpoint
from minunet.cuda_graph import CudaGraphStep
from minunet.data import (Augment, DataLoader, FolderDataset, SyntheticDataset, split_indices,
                          unet_weight_map)
from minunet.figures import plot_curves, plot_predictions
from minunet.metrics import ChallengeScores, ConfusionMatrix, binary_prediction
from minunet.options import RUN_FILES, check_config, check_crop, check_data, check_out
from minunet.predict import Tiler, auto_tile
from minunet.unet import UNet


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a training run. The defaults train the synthetic task to a validation
    mean Dice above 0.9 in a few minutes on two CPU cores."""
    # data: the synthetic set unless `data` (a folder with images/ and masks/) or images+masks
    data: str = None
    images: str = None
    masks: str = None
    pairing: str = "stem"                 # 'stem' | 'sorted'
    mask_prefix: str = ""                 # 'stem' pairing: mask name = prefix + image stem + suffix
    mask_suffix: str = ""
    mask_mode: str = "index"              # 'index' | 'binary' | 'gray' | 'palette'
    gray_levels: tuple = None
    palette: str = None                   # file or None
    ignore_index: int = None
    channels: int = None                  # input channels (folder: as stored; synthetic: 1)
    normalize: str = "image"              # per-image standardisation, as the synthetic set
    classes: int = None                   # folder 'index' masks need it; synthetic default 3
    class_names: tuple = None             # folder: names for tables and pictures (else indices)
    scale: float = None                   # folder: resize images and masks by this factor on loading
    samples: int = 384                    # synthetic images
    image_size: int = 64                  # synthetic size / folder training crop / tile size
    val_fraction: float = 0.2
    val_split: str = "random"             # 'random' | 'contiguous'
    augment: bool = True                  # flips and 90-degree rotations
    elastic: bool = False                 # the U-Net paper's elastic deformation
    # model
    base_channels: int = 16
    depth: int = 3
    padding: str = "same"
    batch_norm: bool = True               # converges in far fewer steps on the synthetic task
    sync_batch_norm: bool = False         # several processes: statistics of the global batch, not the share
    # optimisation
    epochs: int = 10
    batch_size: int = 8
    lr: float = 3e-3
    optimizer: str = "adam"               # 'sgd' | 'adam' | 'adamw'
    momentum: float = 0.9                 # SGD only
    weight_decay: float = 0.0
    schedule: str = "cosine"              # 'cosine' | 'constant'
    class_weights: tuple = None
    dice_weight: float = 0.0
    border_weights: bool = False          # U-Net paper's weight map (w0, sigma below)
    border_w0: float = 10.0
    border_sigma: float = 5.0
    # run
    device: str = "auto"
    precision: str = "fp32"               # 'tf32': CUDA convolutions on the TF32 tensor cores
    cuda_graph: bool = False              # the training step captured once as a CUDA graph, then replayed
    seed: int = 0
    out: str = None                       # run folder; default runs/<timestamp>
    previews: int = 4                     # validation images drawn in predictions.png
    progress: bool = True                 # tqdm bar

    def num_classes(self):
        return self.classes if self.classes is not None else (3 if self.is_synthetic() else None)

    def is_synthetic(self):
        return self.data is None and self.images is None and self.masks is None


# Options that may differ between a run and its resumption; everything else must match.
RESUMABLE_CHANGES = ("epochs", "device", "precision", "cuda_graph", "out", "progress", "previews")


# ---- building the pieces ---------------------------------------------------------------

class BorderWeights:
    """A dataset wrapper adding the U-Net paper's weight map to each (image, mask) item; the
    "cells" are the connected regions of non-background (label != 0) pixels."""

    def __init__(self, dataset, w0, sigma, ignore_index=None):
        self.dataset, self.w0, self.sigma, self.ignore_index = dataset, w0, sigma, ignore_index
        self.num_classes, self.in_channels = dataset.num_classes, dataset.in_channels
        self.class_names = dataset.class_names

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        x, y = self.dataset[i]
        cells = (y != 0).astype(np.int64)
        if self.ignore_index is not None:
            cells[y == self.ignore_index] = self.ignore_index
        return x, y, unet_weight_map(cells, self.w0, self.sigma, ignore_index=self.ignore_index)


def build_dataset(cfg, training=False):
    """The dataset a config names (synthetic or folder), with weight maps if asked. Its options
    are checked first (options.check_data; with `training`, the crop and the split too)."""
    plan = check_data(cfg, training=training)
    if cfg.is_synthetic():
        ds = SyntheticDataset(num_samples=cfg.samples, image_size=cfg.image_size, num_classes=plan.classes,
                              in_channels=cfg.channels or 1, seed=cfg.seed)
        if cfg.border_weights:
            ds = BorderWeights(ds, cfg.border_w0, cfg.border_sigma)
        return ds
    weight_map = None
    if cfg.border_weights:
        weight_map = dict(w0=cfg.border_w0, sigma=cfg.border_sigma, ignore_index=cfg.ignore_index)
    ds = FolderDataset(plan.images, plan.masks, pairing=cfg.pairing, mask_prefix=cfg.mask_prefix,
                       mask_suffix=cfg.mask_suffix, mask_mode=cfg.mask_mode, num_classes=cfg.classes,
                       gray_levels=cfg.gray_levels, palette=plan.colours, ignore_index=cfg.ignore_index,
                       channels=cfg.channels, normalize=cfg.normalize, weight_map=weight_map,
                       class_names=plan.class_names, scale=cfg.scale)
    if training:
        check_crop(cfg, [image for image, _ in ds.pairs])
    return ds


def build_model(cfg, dataset):
    nn.manual_seed(cfg.seed)
    return UNet(in_channels=dataset.in_channels, num_classes=dataset.num_classes, base_channels=cfg.base_channels,
                depth=cfg.depth, padding=cfg.padding, batch_norm=cfg.batch_norm)


def build_optimizer(cfg, model):
    params = list(model.parameters())
    if cfg.optimizer == "sgd":
        return optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    adam = optim.Adam if cfg.optimizer == "adam" else optim.AdamW
    return adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_scheduler(cfg, optimizer, steps_per_epoch):
    """Cosine annealing stepped every batch, or None for a constant learning rate."""
    if cfg.schedule == "constant":
        return None
    return optim.CosineAnnealingLR(optimizer, T_max=cfg.epochs * steps_per_epoch)


def replan_schedule(scheduler, total_steps):
    """Plan a resumed cosine schedule over `total_steps` (the run's epochs may have grown) from
    the step it stands at, and set the optimizer's learning rate to the plan's value there.
    With an unchanged total this sets the very value the schedule already holds."""
    scheduler.T_max = int(total_steps)
    scheduler.last_epoch -= 1
    scheduler.step()  # recomputes and applies lr_at(last_epoch) under the new T_max


def _valid_crop(y, out_hw):
    """Centre-crop labels (or weights) (N, H, W) to the model's output size ('valid' models)."""
    H, W = y.shape[-2:]
    top, left = (H - out_hw[0]) // 2, (W - out_hw[1]) // 2
    return y[..., top:top + out_hw[0], left:left + out_hw[1]]


def segmentation_loss(logits, y, cfg, class_weights, pixel_weights=None, group=None):
    """Cross-entropy (class weights, ignore label, optional per-pixel weights) + dice_weight x Dice.

    The cross-entropy is a sum over the pixels divided by how many count (their summed class
    weights, with class weights). In data-parallel training (`group` of N > 1 processes, each
    with its share of the global batch) the divisor is the count over all the processes and
    the Dice term is 1/N of the global batch's Dice: the N losses add up to the loss of the
    global batch, and their gradients to its gradient (see minunet.distributed)."""
    group = group or distributed.ProcessGroup()
    ignore = -100 if cfg.ignore_index is None else cfg.ignore_index
    xp = backend.array_module(logits.data)
    valid = y != ignore
    if pixel_weights is None:
        total = F.cross_entropy(logits, y, weight=class_weights, ignore_index=ignore, reduction="sum")
        count = valid.sum() if class_weights is None else (class_weights[xp.where(valid, y, 0)] * valid).sum()
    else:
        per_pixel = F.cross_entropy(logits, y, weight=class_weights, ignore_index=ignore, reduction="none")
        total = (per_pixel * xp.asarray(pixel_weights, dtype=logits.dtype)).sum()
        count = valid.sum()
    if group.size > 1:
        count = float(group.sum_values([float(count)])[0])
    else:  # kept on the device: nothing here waits for it (a CUDA graph captures this)
        count = count.astype(logits.dtype)
    loss = total / (count if pixel_weights is None else xp.maximum(count, 1.0))
    if cfg.dice_weight:
        all_sum = None if group.size == 1 else functools.partial(distributed.all_sum, group=group)
        dice = F.dice_loss(logits, y, ignore_index=cfg.ignore_index, all_sum=all_sum)
        loss = loss + (cfg.dice_weight / group.size) * dice
    return loss


# ---- evaluation ------------------------------------------------------------------------

def evaluate(model, dataset, indices, cfg, tile=None, keep=0, should_stop=None, group=None, tta=False,
             challenge=False, threshold=None):
    """Score `model` on the items `indices` of `dataset`; returns (summary dict with 'loss',
    the first `keep` (image, target, prediction) triples). tile: the input tile size, by
    default auto_tile's choice for each image size; tta: the Tiler's test-time augmentation;
    challenge: add the ISBI 2012 pixel and Rand errors (2-class data); threshold: 2-class
    data, predict class 1 where its probability is at least this (None: the argmax). With a
    process group each rank scores its contiguous share of `indices` and the confusion
    matrices, losses and challenge sums are summed over the ranks (rank 0's share holds the
    first images: its triples are one process's)."""
    group = group or distributed.ProcessGroup()
    indices = np.asarray(indices)[distributed.share(len(indices), group.rank, group.size)]
    num_classes = model.config["num_classes"]
    tilers = {}  # one per image size
    cm = ConfusionMatrix(num_classes, ignore_index=cfg.ignore_index)
    if (challenge or threshold is not None) and num_classes != 2:
        raise ValueError(f"the challenge scores and --threshold are for 2-class data; the model has "
                         f"{num_classes} classes")
    scores = ChallengeScores(ignore_index=cfg.ignore_index) if challenge else None
    class_weights = None if cfg.class_weights is None else np.asarray(cfg.class_weights, np.float32)
    batch = cfg.batch_size if cfg.is_synthetic() else 1  # folder images may differ in size
    loader = DataLoader(dataset, batch_size=batch, shuffle=False, indices=indices, prefetch=1)
    loss_sum, count, samples = 0.0, 0, []
    batches = iter(loader)
    try:
        for x, y, *w in batches:
            hw = x.shape[2:]
            if hw not in tilers:
                size = tile or auto_tile(model, hw, cfg.image_size)
                tilers[hw] = Tiler(model, size, batch_size=cfg.batch_size, tta=tta)
            logits = tilers[hw].run(x, logits=True)  # (N, K, H, W) on the host, the whole image
            loss = segmentation_loss(tensor(logits), y, cfg, class_weights, w[0] if w else None)
            loss_sum, count = loss_sum + loss.item() * len(x), count + len(x)
            pred = logits.argmax(axis=1) if threshold is None else binary_prediction(logits, threshold)
            cm.update(pred, y)
            if scores is not None:
                scores.update(pred, y)
            for i in range(min(keep - len(samples), len(x))):
                samples.append((x[i], y[i], pred[i]))
            if should_stop is not None and should_stop():
                raise _Stop
    finally:
        batches.close()
    group.allreduce(cm.matrix)
    loss_sum, count = group.sum_values([loss_sum, count])
    summary = cm.summary()
    if scores is not None:
        scores.totals[...] = group.sum_values(scores.totals)
        summary.update(scores.summary())
    summary["loss"] = loss_sum / max(count, 1)
    return summary, samples


# ---- what the run folder gets ------------------------------------------------------------

def json_safe(v):
    """NaN (a class absent from the validation split) -> null, so metrics.jsonl is strict JSON."""
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, list):
        return [json_safe(u) for u in v]
    return v


def write_metrics(path, history):
    lines = "".join(json.dumps({k: json_safe(v) for k, v in rec.items()}) + "\n" for rec in history)
    atomic_write(path, lines.encode())


def default_run_dir():
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path, n = pathlib.Path("runs") / stamp, 1
    while path.exists():
        n += 1
        path = pathlib.Path("runs") / f"{stamp}-{n}"
    return path


# ---- Ctrl-C and SIGTERM ----------------------------------------------------------------------

class _Stop(Exception):
    """Raised inside the loop when a stop was asked for, at a point where the state is whole."""


class Diverged(Exception):
    """Training met a loss, gradient or weight that is not finite; the message says where and why."""


class StopRequest:
    """While active, the first SIGINT (Ctrl-C) or SIGTERM only sets `requested` (to the
    signal's name); a second one raises KeyboardInterrupt. Outside the main thread signals
    cannot be caught: inactive."""

    SIGNALS = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}

    def __init__(self, log):
        self.requested, self.log, self._previous = None, log, {}

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = name = self.SIGNALS[signum]
        self.log(f"\n{name}: stopping after this step and saving last.safetensors ({name} again to abort)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handler) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        return False


def first_nonfinite(named_arrays):
    """The name of the first (name, array) pair whose floating array holds a NaN or an
    infinity, or None. One float64 sum per array (any NaN or infinity makes it non-finite,
    and finite float32 values cannot overflow it) and one transfer to the host in all."""
    named = [(n, a.data if isinstance(a, Tensor) else a) for n, a in named_arrays if a is not None]
    named = [(n, a) for n, a in named if a.dtype.kind == "f"]
    if not named:
        return None
    xp = backend.array_module(named[0][1])
    sums = backend.to_numpy(xp.stack([a.sum(dtype=xp.float64) for _, a in named]))
    bad = np.flatnonzero(~np.isfinite(sums))
    return named[bad[0]][0] if len(bad) else None


# ---- the run folder --------------------------------------------------------------------------

class RunFolder:
    """Where a run writes. check_out has vetted it; it is made at the first write, so that a
    run failing before it (bad data, a diverged first epoch) leaves no folder behind. With
    `clear`, the run files of the run it replaces (--overwrite) are deleted at that moment."""

    def __init__(self, path, clear=False):
        self.path, self.clear, self.created = pathlib.Path(path), clear, False

    def file(self, name):
        if not self.created:
            try:
                self.path.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ValueError(f"--out {self.path}: cannot create the folder ({e.strerror})") from None
            if self.clear:
                for old in RUN_FILES:
                    (self.path / old).unlink(missing_ok=True)
            self.created = True
        return self.path / name


# ---- the loop ------------------------------------------------------------------------------

def resolve_resume(path):
    """--resume takes a checkpoint file or a run folder (its last.safetensors)."""
    path = pathlib.Path(path)
    if path.is_dir():
        path = path / "last.safetensors"
    if not path.is_file():
        raise ValueError(f"--resume {path}: no such checkpoint")
    return path


def _read_resume(resume, cfg):
    """The checkpoint to resume from, checked: it holds training progress, finite weights, and
    the run has epochs left to do (or says how to give it more)."""
    ckpt = read_checkpoint(resolve_resume(resume))
    if ckpt.train_state is None:
        raise ValueError(f"--resume {ckpt.path}: the checkpoint holds a model but no training progress")
    check_finite(ckpt)
    done = ckpt.train_state["epoch"]
    if done >= cfg.epochs:
        run = pathlib.Path(ckpt.path).parent
        if cfg.epochs == done:
            raise ValueError(f"--resume {run}: the run has already done its {done} epochs; to train it longer, give "
                             f"a larger --epochs (e.g. minunet train --resume {run} --epochs {2 * done}), and the "
                             f"cosine learning-rate schedule is planned anew over the new total")
        raise ValueError(f"--epochs {cfg.epochs} is fewer than the {done} epochs the resumed run has done; "
                         f"give more to train it longer")
    return ckpt


def train(cfg, log=print, resume=None, overwrite=False):
    """Run training as `cfg` says; `resume` is a checkpoint (or run folder) to continue from;
    `overwrite` lets the run replace another run in cfg.out. Returns a dict: run_dir, epochs,
    interrupted (None, 'Ctrl-C' or 'SIGTERM'), final (last epoch's record), best_mean_dice,
    best_epoch, seconds. Raises Diverged when the loss or a gradient stops being finite.

    Started as several processes (`mpiexec -n N minunet train`), the processes train one
    model data-parallel (minunet.distributed): `batch_size` is the global batch, each process
    takes its contiguous share of it, and only rank 0 logs and writes the run folder."""
    group = distributed.init()
    with distributed.cpu_threads(group), backend.conv_precision(cfg.precision):
        return _train(cfg, log if group.rank == 0 else (lambda *args, **kwargs: None), resume, overwrite, group)


def _train(cfg, log, resume, overwrite, group):
    check_config(cfg)
    if cfg.batch_size < group.size:
        raise ValueError(f"--batch-size {cfg.batch_size} is the global batch, shared by {group.size} processes: "
                         f"it must be at least {group.size}")
    ckpt = _read_resume(resume, cfg) if resume is not None else None
    resumed_from = pathlib.Path(ckpt.path).parent if ckpt is not None else None
    check_out(cfg.out, overwrite=overwrite, resumed_from=resumed_from)
    device = backend.normalize_device(cfg.device)
    if device == "cuda":
        group.use_gpu()
    if cfg.device == "auto" and device == "cpu":
        log(f"device: cpu ({backend.cuda_status()[1]})")
    else:
        log(f"device: {device}")
    if cfg.precision == "tf32":
        log("precision: tf32 (the convolutions on the TF32 tensor cores)" if device == "cuda"
            else "precision: tf32 has no effect on the CPU (float32 throughout)")
    if cfg.cuda_graph and (device != "cuda" or group.size > 1):
        raise ValueError("--cuda-graph captures the training step on a GPU, in one process; this run is "
                         + ("on the CPU" if device != "cuda" else f"{group.size} processes"))
    dataset = build_dataset(cfg, training=True)
    train_idx, val_idx = split_indices(len(dataset), cfg.val_fraction, cfg.val_split, seed=cfg.seed)
    model = build_model(cfg, dataset)
    try:
        out_hw = model.check_input_size(cfg.image_size, cfg.image_size)  # the training crop must fit
    except ValueError as e:
        raise ValueError(f"--image-size {cfg.image_size} does not fit the model: {e}") from None
    model.to(device)
    if cfg.sync_batch_norm:
        distributed.convert_sync_batch_norm(model, group)
    optimizer = build_optimizer(cfg, model)
    crop = None if cfg.is_synthetic() else cfg.image_size
    augment = Augment(flip=cfg.augment, rot90=cfg.augment, crop=crop, elastic=cfg.elastic, seed=cfg.seed)
    if len(train_idx) < group.size:
        raise ValueError(f"{len(train_idx)} training images cannot be shared by {group.size} processes")
    loader = distributed.ShardedLoader(dataset, rank=group.rank, size=group.size, batch_size=cfg.batch_size,
                                       shuffle=True, seed=cfg.seed, augment=augment,
                                       drop_last=len(train_idx) >= cfg.batch_size, indices=train_idx)
    scheduler = build_scheduler(cfg, optimizer, len(loader))
    class_weights = None
    if cfg.class_weights is not None:
        class_weights = backend.to_device(np.asarray(cfg.class_weights, np.float32), device)

    # where we are: epoch index, batches done in it, and the running train loss of that epoch
    epoch, done, loss_sum, loss_count, history = 0, 0, 0.0, 0, []
    best, best_epoch = -math.inf, None
    if ckpt is not None:
        if group.rank == 0:  # broadcast_state below gives the other ranks what it reads
            load_checkpoint(ckpt.path, model, optimizer, scheduler)
        if scheduler is not None:
            replan_schedule(scheduler, cfg.epochs * len(loader))
        state = ckpt.train_state
        epoch, done = state["epoch"], state["batch"]
        loss_sum, loss_count, history = state["loss_sum"], state["loss_count"], state["history"]
        best = ckpt.best_metric if ckpt.best_metric is not None else -math.inf
        best_epoch = state["best_epoch"]
        log(f"resuming from {ckpt.path}: epoch {epoch + 1}, batch {done}")
    distributed.broadcast_state(group, model, optimizer, scheduler)  # every rank starts from rank 0's state
    graph_step = None
    if cfg.cuda_graph:
        graph_step = CudaGraphStep(model, optimizer, lambda logits, y, *w: segmentation_loss(
            logits, y, cfg, class_weights, w[0] if w else None))
        log("cuda graph: the training step is captured at its second batch and replayed from then on")
    reducer = distributed.Reducer(group, model.parameters())  # sums the gradients over the ranks
    run_dir = pathlib.Path(group.broadcast_object(str(cfg.out or default_run_dir())))  # one folder for all
    own = resumed_from is not None and run_dir.resolve() == resumed_from.resolve()
    folder = RunFolder(run_dir, clear=overwrite and not own)
    cfg = dataclasses.replace(cfg, out=str(run_dir))  # so the checkpoints name their folder
    log(f"run folder: {run_dir}")
    arch = ", ".join(f"{k}={v!r}" for k, v in model.config.items())
    log(f"data: {'synthetic' if cfg.is_synthetic() else 'folder'}, {len(train_idx)} train / {len(val_idx)} "
        f"validation images, {dataset.num_classes} classes; model: UNet({arch})")
    if group.size > 1:
        log(f"data parallel: {group.size} processes, each with its share of the global batch of {cfg.batch_size}; "
            f"batch norm {'over the global batch' if cfg.sync_batch_norm else 'per process'}")
    saved_epoch = epoch if ckpt is not None else None  # the epoch the newest last.safetensors holds
    last_loss = None  # (step, value) of the last finite training loss

    def checkpoint(name, best_metric):
        bad = first_nonfinite(list(model.named_parameters()) + list(model.named_buffers()))
        if bad is not None:
            raise Diverged(f"training diverged in epoch {epoch}: {bad} holds NaN or infinite values, so it is not "
                           f"saved; {_likely_cause(cfg)} {_kept(folder, saved_epoch)}")
        if group.rank != 0:  # the weights are the same on every rank (so is the check above)
            return
        state = dict(epoch=epoch, batch=done, loss_sum=loss_sum, loss_count=loss_count, history=history,
                     best_epoch=best_epoch)
        save_checkpoint(folder.file(name), model, optimizer, scheduler, epoch=epoch, best_metric=best_metric,
                        train_config=dataclasses.asdict(cfg), train_state=state)

    def diverged(what, taken=False):
        step = epoch * len(loader) + done + 1
        before = (f"the last finite loss was {last_loss[1]:.4g}, at step {last_loss[0]}" if last_loss else
                  "no finite loss came before it" + (" since resuming" if ckpt is not None else ""))
        result = ("The step was taken (--cuda-graph checks after its graph ran); no checkpoint holds it."
                  if taken else "The step was not taken.")
        return Diverged(f"training diverged at epoch {epoch + 1}, batch {done + 1} (step {step}): {what}; {before}. "
                        f"{_likely_cause(cfg)} {result} {_kept(folder, saved_epoch)}")

    def stop_asked():
        """Whether to stop now. Several ranks must stop at the same step: they vote, and a
        signal that reached any of them stops them all."""
        if group.size == 1:
            return stop.requested is not None
        ctrl_c, sigterm = group.sum_values([stop.requested == "Ctrl-C", stop.requested == "SIGTERM"])
        voted = "SIGTERM" if sigterm else "Ctrl-C" if ctrl_c else None
        if voted:
            stop.requested = voted
        return voted is not None

    start = time.perf_counter()
    interrupted = None
    with StopRequest(log) as stop:
        try:
            while epoch < cfg.epochs:
                t0, seen = time.perf_counter(), 0
                model.train()
                loader.set_epoch(epoch)
                bar = tqdm(total=len(loader), initial=done, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                           unit="batch", disable=not cfg.progress or group.rank != 0, leave=False,
                           dynamic_ncols=True)
                batches = iter(loader)
                try:
                    for b, (x, y, *w) in enumerate(batches):
                        if b < done:
                            continue  # replaying a resumed epoch up to where it stopped
                        if cfg.padding == "valid":
                            y, w = _valid_crop(y, out_hw), [_valid_crop(w[0], out_hw)] if w else w
                        if graph_step is not None:  # the batch into the graph's buffers, one launch, checked after
                            F.check_class_indices(y, dataset.num_classes, -100 if cfg.ignore_index is None
                                                  else cfg.ignore_index, "--cuda-graph: ")
                            graph_step(x, y, *w)
                            value, images = graph_step.item(), x.shape[0]
                            bad = first_nonfinite((n, p.grad) for n, p in model.named_parameters())
                            if not math.isfinite(value) or bad is not None:
                                raise diverged(f"the loss is {value}" if bad is None else
                                               f"the gradient of {bad} holds NaN or infinite values", taken=True)
                        else:
                            x, y = tensor(x, device=device), backend.to_device(y, device)
                            weights = backend.to_device(w[0], device) if w else None
                            optimizer.zero_grad()
                            loss = segmentation_loss(model(x), y, cfg, class_weights, weights, group)
                            value, images = loss.item(), x.shape[0]
                            if group.size > 1:  # the global batch's loss and size: every rank decides alike
                                value, images = (float(v) for v in group.sum_values([value, images]))
                            if not math.isfinite(value):
                                raise diverged(f"the loss is {value}")
                            loss.backward()
                            reducer.wait()  # the gradients summed over the ranks
                            bad = first_nonfinite((n, p.grad) for n, p in model.named_parameters())
                            if bad is not None:
                                raise diverged(f"the gradient of {bad} holds NaN or infinite values (loss {value:.4g})")
                            optimizer.step()
                        if scheduler is not None:
                            scheduler.step()
                        loss_sum, loss_count, done = loss_sum + value, loss_count + 1, done + 1
                        last_loss = (epoch * len(loader) + done, value)
                        seen += int(images)
                        rate = seen / (time.perf_counter() - t0)
                        bar.update(1)
                        bar.set_postfix(loss=f"{loss_sum / loss_count:.4f}", img_s=f"{rate:.1f}")
                        if stop_asked():
                            raise _Stop
                finally:
                    batches.close()
                    bar.close()
                train_seconds = time.perf_counter() - t0
                distributed.average_buffers(group, model)  # batch norm's running statistics
                val, samples = evaluate(model, dataset, val_idx, cfg, keep=cfg.previews, group=group,
                                        should_stop=(lambda: stop.requested) if group.size == 1 else None)
                record = dict(epoch=epoch + 1, train_loss=loss_sum / max(loss_count, 1), val_loss=val["loss"],
                              dice=val["dice"], iou=val["iou"], mean_iou=val["mean_iou"],
                              mean_dice=val["mean_dice"], pixel_accuracy=val["pixel_accuracy"],
                              lr=optimizer.param_groups[0]["lr"], seconds=time.perf_counter() - t0,
                              images_per_s=seen / train_seconds if seen else None)
                history.append(record)
                improved = not math.isnan(val["mean_dice"]) and val["mean_dice"] > best
                if improved:
                    best, best_epoch = val["mean_dice"], epoch + 1
                epoch, done, loss_sum, loss_count = epoch + 1, 0, 0.0, 0
                checkpoint("last.safetensors", best)
                saved_epoch = epoch
                if improved:
                    checkpoint("best.safetensors", best)
                if group.rank == 0:
                    write_metrics(folder.file("metrics.jsonl"), history)
                    plot_curves(folder.file("curves.png"), history, dataset.class_names, best_epoch)
                    if samples:
                        plot_predictions(folder.file("predictions.png"), samples, dataset.num_classes,
                                         dataset.class_names)
                log(f"epoch {record['epoch']}/{cfg.epochs}: train loss {record['train_loss']:.4f}, "
                    f"val loss {record['val_loss']:.4f}, mean Dice {record['mean_dice']:.4f}, "
                    f"mIoU {record['mean_iou']:.4f}, pixel acc {record['pixel_accuracy']:.4f}, "
                    f"{record['seconds']:.1f} s")
                if stop_asked():
                    raise _Stop
        except _Stop:
            interrupted = stop.requested
            distributed.average_buffers(group, model)
            checkpoint("last.safetensors", best if best > -math.inf else None)
            log(f"stopped at epoch {epoch + 1}, batch {done}: saved {run_dir / 'last.safetensors'}; "
                f"continue with: minunet train --resume {run_dir}")
    reducer.remove()
    return dict(run_dir=str(run_dir), epochs=epoch, interrupted=interrupted, final=history[-1] if history else None,
                best_mean_dice=best if best > -math.inf else None, best_epoch=best_epoch,
                seconds=time.perf_counter() - start)


def _likely_cause(cfg):
    return (f"The likely cause is a learning rate too high for this model and data (--lr {cfg.lr:g}): "
            f"try a lower one, e.g. --lr {cfg.lr / 10:g}.")


def _kept(folder, saved_epoch):
    if saved_epoch is None or not (folder.path / "last.safetensors").exists():
        return "No checkpoint had been written yet."
    best = " and best.safetensors" if (folder.path / "best.safetensors").exists() else ""
    return (f"Kept as they were: {folder.path / 'last.safetensors'} (epoch {saved_epoch}, the last good state)"
            f"{best}.")
