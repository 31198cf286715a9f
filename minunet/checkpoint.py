"""minunet.checkpoint: training state in one safetensors file, written atomically.

Why safetensors: a checkpoint is data, and loading it must never run code. Python's pickle
(what torch.save uses by default) can execute anything on load; a safetensors file is an
8-byte little-endian header length, a JSON header (tensor name -> dtype, shape, byte range,
plus a free-form string -> string "__metadata__" map), then the raw tensor bytes. Nothing
in it is executable, and a truncated file is detected because the header's byte ranges
no longer fit in the file.

What one checkpoint holds
-------------------------
tensors
    model.<name>                      the model's state dict (Module.state_dict())
    optim.state.<idx>.<name>          the optimizer's per-parameter arrays (momentum buffer,
                                      Adam's exp_avg / exp_avg_sq, ...), idx = parameter index
metadata (JSON strings)
    minunet.format                    "minunet-checkpoint/1"
    model_config                      the model's constructor arguments (UNet.config), so a
                                      checkpoint can rebuild its own model (predict, eval)
    optimizer                         the optimizer's class, param_groups and per-parameter
                                      scalars (e.g. Adam's "step")
    scheduler                         the LR scheduler's state dict
    epoch, best_metric                epochs completed, best validation score so far
    train_config                      the training configuration (TrainConfig as a dict)
    train_state                       what an exact resume needs besides the above: the
                                      random generator states and the data order position

Atomic writes
-------------
`save_checkpoint` serialises to bytes, writes them to a temporary file in the SAME folder
(a rename is atomic only within one file system), flushes and fsyncs it, then
`os.replace`s it over the target and fsyncs the folder. A crash (or Ctrl-C) at any moment
leaves either the old complete file or the new complete file, never a half-written one.
"""
import dataclasses
import json
import os
import tempfile

import numpy as np
import safetensors.numpy
from safetensors import SafetensorError, safe_open

from minunet import backend

FORMAT = "minunet-checkpoint/1"
MODEL_PREFIX = "model."
OPTIM_PREFIX = "optim.state."


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that does not fit the model it is loaded into."""


@dataclasses.dataclass
class Checkpoint:
    """The contents of one checkpoint file, as host NumPy arrays and plain Python values."""
    path: str
    model_state: dict
    model_config: dict
    optimizer_state: dict = None    # in Optimizer.state_dict() form, or None
    scheduler_state: dict = None
    epoch: int = 0
    best_metric: float = None
    train_config: dict = None
    train_state: dict = None


# ---- saving ------------------------------------------------------------------------------

def save_checkpoint(path, model, optimizer=None, scheduler=None, *, epoch=0, best_metric=None,
                    train_config=None, train_state=None):
    """Write model (+ optimizer, scheduler, progress) to `path` atomically."""
    tensors = {MODEL_PREFIX + name: _host(a) for name, a in model.state_dict().items()}
    metadata = {
        "minunet.format": FORMAT,
        "model_config": _dumps(getattr(model, "config", {})),
        "epoch": _dumps(int(epoch)),
        "best_metric": _dumps(best_metric),
        "train_config": _dumps(train_config),
        "train_state": _dumps(train_state),
        "scheduler": _dumps(scheduler.state_dict() if scheduler is not None else None),
    }
    if optimizer is not None:
        optim_tensors, optim_meta = _flatten_optimizer(optimizer)
        tensors.update(optim_tensors)
        metadata["optimizer"] = _dumps(optim_meta)
    payload = safetensors.numpy.save(tensors, metadata=metadata)
    atomic_write(os.fspath(path), payload)


def _flatten_optimizer(optimizer):
    """Optimizer.state_dict() -> ({"optim.state.<idx>.<name>": array}, JSON-ready rest)."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            if hasattr(value, "shape") and getattr(value, "ndim", 0) > 0:
                tensors[f"{OPTIM_PREFIX}{int(idx)}.{name}"] = _host(value)
            else:
                scalars.setdefault(str(int(idx)), {})[name] = value
    meta = {"type": type(optimizer).__name__, "param_groups": sd["param_groups"], "scalars": scalars}
    return tensors, meta


def atomic_write(path, payload):
    """Replace the file `path` by the bytes `payload` so that it is never seen half-written."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give it an ordinary file's mode
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # includes KeyboardInterrupt: never leave the temporary behind
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_folder(folder)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_folder(folder):
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _host(a):
    """A C-contiguous host copy (np.ascontiguousarray would turn a 0-d array into 1-d)."""
    return np.require(backend.to_numpy(a), requirements="C")


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"checkpoint metadata: cannot store a {type(o).__name__} as JSON")


def _dumps(obj):
    return json.dumps(obj, default=_json_default)


# ---- loading -----------------------------------------------------------------------------

def read_checkpoint(path):
    """Read a checkpoint file into a Checkpoint; CheckpointError if it is missing or broken."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with safe_open(path, framework="numpy") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is truncated or not a safetensors file ({e})") from None
    if metadata.get("minunet.format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is a safetensors file but not a minunet checkpoint "
                              f"(format {metadata.get('minunet.format')!r}, expected {FORMAT!r})")
    try:
        meta = {key: json.loads(value) for key, value in metadata.items() if key != "minunet.format"}
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {path} has corrupt metadata ({e})") from None

    model_state = {k[len(MODEL_PREFIX):]: v for k, v in tensors.items() if k.startswith(MODEL_PREFIX)}
    optimizer_state = None
    if meta.get("optimizer") is not None:
        optimizer_state = _unflatten_optimizer(tensors, meta["optimizer"])
    return Checkpoint(path=path, model_state=model_state, model_config=meta.get("model_config") or {},
                      optimizer_state=optimizer_state, scheduler_state=meta.get("scheduler"),
                      epoch=int(meta.get("epoch") or 0), best_metric=meta.get("best_metric"),
                      train_config=meta.get("train_config"), train_state=meta.get("train_state"))


def _unflatten_optimizer(tensors, meta):
    state = {}
    for key, value in tensors.items():
        if key.startswith(OPTIM_PREFIX):
            idx, name = key[len(OPTIM_PREFIX):].split(".", 1)
            state.setdefault(int(idx), {})[name] = value
    for idx, scalars in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(scalars)
    return {"type": meta["type"], "state": dict(sorted(state.items())), "param_groups": meta["param_groups"]}


def check_architecture(ckpt, model):
    """Raise CheckpointError naming what differs if `ckpt` was not saved from a model like `model`."""
    config = getattr(model, "config", None)
    if config and ckpt.model_config:
        fields = sorted(set(config) | set(ckpt.model_config))
        diff = [f"{f}: checkpoint {ckpt.model_config.get(f, '(absent)')!r}, model {config.get(f, '(absent)')!r}"
                for f in fields if _jsonable(ckpt.model_config.get(f)) != _jsonable(config.get(f))]
        if diff:
            raise CheckpointError(f"checkpoint {ckpt.path} is for another architecture: " + "; ".join(diff))
    expected = {name: tuple(a.shape) for name, a in model.state_dict().items()}
    found = {name: tuple(a.shape) for name, a in ckpt.model_state.items()}
    problems = []
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing:
        problems.append("missing keys " + ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))
    if unexpected:
        problems.append("unexpected keys " + ", ".join(unexpected[:5]) + (" ..." if len(unexpected) > 5 else ""))
    shapes = [f"{k} checkpoint {found[k]} vs model {expected[k]}"
              for k in sorted(set(expected) & set(found)) if expected[k] != found[k]]
    if shapes:
        problems.append("shape mismatch " + ", ".join(shapes[:5]) + (" ..." if len(shapes) > 5 else ""))
    if problems:
        raise CheckpointError(f"checkpoint {ckpt.path} does not fit this model: " + "; ".join(problems))


def check_finite(ckpt):
    """Raise CheckpointError if a floating tensor of the model holds NaN or infinity: such a
    checkpoint comes from a training run that diverged, and its predictions mean nothing."""
    for name, a in ckpt.model_state.items():
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise CheckpointError(f"checkpoint {ckpt.path} holds non-finite weights ({name} has NaN or infinite "
                                  f"values): it was saved by a training run that diverged, most often from too "
                                  f"high a learning rate; train again with a lower one")


def _jsonable(v):
    """Compare configs as JSON sees them (a tuple in the model equals a list in the file)."""
    return json.loads(_dumps(v))


def load_checkpoint(path, model=None, optimizer=None, scheduler=None):
    """Read `path` and restore it into whichever of model / optimizer / scheduler are given.

    The architecture is checked before anything is touched, so a mismatch leaves the model
    as it was. Returns the Checkpoint (epoch, best_metric, train_state ... for resuming).
    """
    ckpt = read_checkpoint(path)
    if model is not None:
        check_architecture(ckpt, model)
        model.load_state_dict(ckpt.model_state, strict=True)
    if optimizer is not None:
        if ckpt.optimizer_state is None:
            raise CheckpointError(f"checkpoint {ckpt.path} holds no optimizer state")
        saved = ckpt.optimizer_state["type"]
        if saved != type(optimizer).__name__:
            raise CheckpointError(f"checkpoint {ckpt.path} holds {saved} state, "
                                  f"the optimizer is {type(optimizer).__name__}")
        optimizer.load_state_dict({"state": ckpt.optimizer_state["state"],
                                   "param_groups": ckpt.optimizer_state["param_groups"]})
    if scheduler is not None and ckpt.scheduler_state is not None:
        scheduler.load_state_dict(ckpt.scheduler_state)
    return ckpt
