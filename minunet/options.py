"""minunet.options: what each option of `minunet train` means, checked before any work starts.

The command line speaks in flags (`--val-fraction 0.01`), the library in arguments
(`split_indices(val_fraction=0.01)`). A user who typed a flag must read about that flag, so
every check here names the flag and the value given, and runs before data is read, a model
built or a folder made: a bad value costs the user a second, not a run.

    flag(field)          TrainConfig field -> its command-line flag ('val_fraction' -> '--val-fraction')
    check_config(cfg)    ranges, signs, choices and lengths of every TrainConfig value
    check_out(...)       the run folder: not a file, creatable, not already holding a run
    check_writable_file  an output file (eval --json FILE) can be written, before the work that fills it

The data options (folders, mask formats, palettes, class counts) are checked by
minunet.train.check_data, which needs to look at the files.
"""
import math
import os
import pathlib

# The files a run folder receives; a folder holding any of them holds a run.
RUN_FILES = ("last.safetensors", "best.safetensors", "metrics.jsonl", "curves.png", "predictions.png")


def flag(field):
    """The command-line flag of a TrainConfig field."""
    return "--" + field.replace("_", "-")


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_config(cfg):
    """Raise ValueError, naming the flag and the value, for any TrainConfig value that cannot
    mean anything (the data-dependent checks are minunet.train.check_data's)."""
    for name in ("epochs", "batch_size", "image_size", "samples", "base_channels", "depth"):
        v = getattr(cfg, name)
        if not _is_int(v) or v < 1:
            raise ValueError(f"{flag(name)} must be a positive integer, got {v!r}")
    if not _is_number(cfg.lr) or cfg.lr <= 0:
        raise ValueError(f"--lr must be a positive number, got {cfg.lr!r}")
    if not _is_number(cfg.val_fraction) or not 0 < cfg.val_fraction < 1:
        raise ValueError(f"--val-fraction must lie strictly between 0 and 1, got {cfg.val_fraction!r}")
    for name in ("dice_weight", "weight_decay"):
        v = getattr(cfg, name)
        if not _is_number(v) or v < 0:
            raise ValueError(f"{flag(name)} must be a number >= 0, got {v!r}")
    if not _is_number(cfg.momentum) or not 0 <= cfg.momentum < 1:
        raise ValueError(f"--momentum must lie in [0, 1), got {cfg.momentum!r}")
    if not _is_int(cfg.seed) or cfg.seed < 0:
        raise ValueError(f"--seed must be an integer >= 0, got {cfg.seed!r}")
    choices = {"padding": ("same", "valid"), "val_split": ("random", "contiguous"),
               "optimizer": ("sgd", "adam", "adamw"), "schedule": ("cosine", "constant"),
               "pairing": ("stem", "sorted"), "mask_mode": ("index", "binary", "gray", "palette")}
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"{flag(name)} {getattr(cfg, name)!r}: expected one of {', '.join(allowed)}")
    if cfg.channels not in (None, 1, 3):
        raise ValueError(f"--channels must be 1 or 3, got {cfg.channels!r}")
    if cfg.classes is not None and (not _is_int(cfg.classes) or cfg.classes < 1):
        raise ValueError(f"--classes must be a positive integer, got {cfg.classes!r}")
    if cfg.class_weights is not None:
        w = list(cfg.class_weights)
        if not w or not all(_is_number(v) and v >= 0 for v in w) or not any(v > 0 for v in w):
            raise ValueError(f"--class-weights {','.join(str(v) for v in w)}: expected numbers >= 0, "
                             f"not all 0, one for each class")
    if cfg.class_names is not None:
        names = list(cfg.class_names)
        if not names or not all(isinstance(n, str) and n.strip() for n in names):
            raise ValueError(f"--class-names {names!r}: expected one non-empty name for each class")
        if len(set(names)) != len(names):
            twice = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"--class-names {','.join(names)}: {', '.join(twice)} named twice")


def check_out(path, overwrite=False, resumed_from=None):
    """The run folder `path` (or None: a fresh runs/<timestamp>) can receive this run:
    it is not a file, it can be created, and it holds no other run unless `overwrite`
    (a resumed run may write into its own folder, `resumed_from`)."""
    if path is None:
        return
    path = pathlib.Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {path}: a file of that name exists; give a folder")
    if path.is_dir():
        held = [name for name in RUN_FILES if (path / name).exists()]
        own = resumed_from is not None and path.resolve() == pathlib.Path(resumed_from).resolve()
        if held and not own and not overwrite:
            raise ValueError(f"--out {path} already holds a run ({', '.join(held)}); continue it with "
                             f"`minunet train --resume {path}`, give another --out, or add --overwrite "
                             f"to replace it")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ValueError(f"--out {path}: the folder is not writable")
        return
    parent = path.parent
    while not parent.exists():  # the nearest folder that exists must let us create the rest
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"--out {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--out {path}: cannot create it, {parent} is not writable (read-only or not yours)")


def check_writable_file(path, option):
    """The file `path` that `option` names can be written: its folder exists and is writable,
    and it is not itself a folder."""
    path = pathlib.Path(path)
    if path.is_dir():
        raise ValueError(f"{option} {path}: that is a folder; give a file name")
    folder = path.parent
    if not folder.is_dir():
        raise ValueError(f"{option} {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ValueError(f"{option} {path}: not writable")
