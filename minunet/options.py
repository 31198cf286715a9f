"""minunet.options: what each option of `minunet train` means, checked before any work starts.

The command line speaks in flags (`--val-fraction 0.01`), the library in arguments
(`split_indices(val_fraction=0.01)`). A user who typed a flag must read about that flag, so
every check here names the flag and the value given, and runs before data is read, a model
built or a folder made: a bad value costs the user a second, not a run.

    flag(field)          TrainConfig field -> its command-line flag ('val_fraction' -> '--val-fraction')
    check_config(cfg)    ranges, signs, choices and lengths of every TrainConfig value
    check_out(...)       the run folder: not a file, creatable, not already holding a run
    check_folder         an output folder (predict --output) is a writable folder or can be made
    check_writable_file  an output file (eval --json FILE) can be written, before the work that fills it

    check_data(cfg)      the data options: folders that exist and hold images, what each
                         --mask-mode needs, class counts that agree (--classes, --gray-levels,
                         --palette, --class-names, --class-weights, --ignore-index), and, for
                         training, a split that leaves images on both sides; it reads only file
                         headers, and returns what it found
    check_crop           the training crop (--image-size) fits every image of the dataset
    read_palette_file    a --palette file in any of its accepted forms
"""
import dataclasses
import json
import math
import os
import pathlib

from minunet.data import IMAGE_EXTENSIONS, list_images, read_palette, split_indices
from minunet.data.io import image_channels, open_image, scaled_size

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
               "pairing": ("stem", "sorted"), "mask_mode": ("index", "binary", "gray", "palette"),
               "precision": ("fp32", "tf32")}
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"{flag(name)} {getattr(cfg, name)!r}: expected one of {', '.join(allowed)}")
    if cfg.channels not in (None, 1, 3):
        raise ValueError(f"--channels must be 1 or 3, got {cfg.channels!r}")
    if cfg.scale is not None and (not _is_number(cfg.scale) or not 0 < cfg.scale <= 16):
        raise ValueError(f"--scale must be a number in (0, 16], got {cfg.scale!r}")
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
    if path.is_dir():
        held = [name for name in RUN_FILES if (path / name).exists()]
        own = resumed_from is not None and path.resolve() == pathlib.Path(resumed_from).resolve()
        if held and not own and not overwrite:
            raise ValueError(f"--out {path} already holds a run ({', '.join(held)}); continue it with "
                             f"`minunet train --resume {path}`, give another --out, or add --overwrite "
                             f"to replace it")
    check_folder(path, "--out")


def check_folder(path, option):
    """The output folder `path` that `option` names is a writable folder, or can be made."""
    path = pathlib.Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{option} {path}: a file of that name exists; give a folder")
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise ValueError(f"{option} {path}: the folder is not writable")
        return
    parent = path.parent
    while not parent.exists():  # the nearest folder that exists must let us create the rest
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{option} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path}: cannot create it, {parent} is not writable (read-only or not yours)")


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


# ---- the data options -----------------------------------------------------------------------------

PALETTE_FORMS = ('a JSON file: {"name": [r, g, b], ...}, [[r, g, b], ...], [{"name": [r, g, b]}, ...] or '
                 '[{"name": ..., "color": [r, g, b]}, ...]; or a text file of "r g b [name]" lines')
SYNTHETIC_ONLY_NOT = ("pairing", "mask_prefix", "mask_suffix", "mask_mode", "gray_levels", "palette", "ignore_index",
                      "scale")


@dataclasses.dataclass
class DataPlan:
    """What check_data found: the folders, the number of classes and images, the palette
    colours (palette masks) and the class names (given, or from the palette file)."""
    images: pathlib.Path = None
    masks: pathlib.Path = None
    classes: int = None
    count: int = None
    colours: list = None
    class_names: tuple = None


def read_palette_file(path, option="--palette"):
    """(colours [[r, g, b], ...], names or None) from a palette file in any accepted form."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ValueError(f"{option} {path}: no such file")
    if path.suffix.lower() != ".json":
        try:
            colours, names = read_palette(path)  # text: "r g b [name]" lines
        except ValueError as e:
            raise ValueError(f"{option}: {e}; accepted: {PALETTE_FORMS}") from None
        return colours.tolist(), names
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{option} {path}: not valid JSON ({e})") from None
    entries = list(doc.items()) if isinstance(doc, dict) else doc if isinstance(doc, list) else None
    colours, names = [], []
    for entry in entries or [None]:
        name, rgb = None, entry
        if isinstance(entry, tuple):                                  # {"name": [r, g, b], ...}
            name, rgb = entry
        elif isinstance(entry, dict) and len(entry) == 1:             # [{"name": [r, g, b]}, ...]
            (name, rgb), = entry.items()
        elif isinstance(entry, dict):                                 # [{"name": ..., "color": [r, g, b]}]
            name = entry.get("name")
            rgb = next((entry[k] for k in ("color", "colour", "rgb") if k in entry), None)
        if not (isinstance(rgb, list) and len(rgb) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in rgb)):
            raise ValueError(f"{option} {path}: {json.dumps(entry)} is not a colour of three integers 0..255; "
                             f"accepted: {PALETTE_FORMS}")
        colours.append(rgb)
        names.append(None if name is None else str(name))
    if len({tuple(c) for c in colours}) != len(colours):
        raise ValueError(f"{option} {path}: the same colour is listed for two classes")
    return colours, (tuple(names) if all(names) else None)


def _folders(cfg):
    """(images folder, masks folder, how the user named each) from --data / --images / --masks."""
    if cfg.data is not None:
        root = pathlib.Path(cfg.data)
        if not root.is_dir():
            raise ValueError(f"--data {root}: not a folder")
    for field in ("images", "masks"):
        given = getattr(cfg, field)
        if given is None and cfg.data is None:
            raise ValueError("give --data DIR (with DIR/images and DIR/masks) or both --images and --masks")
        path = pathlib.Path(given) if given is not None else pathlib.Path(cfg.data) / field
        named = f"--{field} {path}" if given is not None else f"--data {cfg.data} (its {field}/ folder)"
        if not path.is_dir():
            raise ValueError(f"{named}: not a folder" if given is not None else f"{named}: there is no {path}")
        yield path, named


def _class_count(cfg):
    """The number of classes the mask options define, and the palette found (colours, names)."""
    mode, classes = cfg.mask_mode, cfg.classes
    for field, wanted in (("gray_levels", "gray"), ("palette", "palette")):
        if getattr(cfg, field) is not None and mode != wanted:
            raise ValueError(f"{flag(field)} is for --mask-mode {wanted}, but the mask mode is {mode}")
    colours = names = None
    if mode == "index":
        if classes is None:
            raise ValueError("--mask-mode index (the default) needs --classes K, the number of classes in the masks")
        return classes, None, None
    if mode == "binary":
        k, what = 2, "--mask-mode binary (0 and 255)"
    elif mode == "gray":
        if cfg.gray_levels is None:
            raise ValueError("--mask-mode gray needs --gray-levels V0,V1,..., the mask value of each class")
        levels = list(cfg.gray_levels)
        if len(set(levels)) != len(levels) or min(levels) < 0 or max(levels) > 65535:
            raise ValueError(f"--gray-levels {','.join(map(str, levels))}: the values must be distinct and lie "
                             f"in 0..65535")
        k, what = len(levels), f"--gray-levels {','.join(map(str, levels))}"
    else:
        if cfg.palette is None:
            raise ValueError("--mask-mode palette needs --palette FILE, the colour of each class")
        colours, names = read_palette_file(cfg.palette)
        k, what = len(colours), f"--palette {cfg.palette}"
    if classes is not None and classes != k:
        raise ValueError(f"--classes {classes}, but {what} defines {k} classes")
    return k, colours, names


def check_crop(cfg, image_paths):
    """The training crop (--image-size) fits every one of the images (read: their headers),
    as --scale resizes them."""
    headers = [(path, scaled_size(wh, cfg.scale or 1)) for path, wh, _ in _headers(image_paths)]
    if headers:
        path, (w, h) = min(headers, key=lambda e: min(e[1]))
        if cfg.image_size > min(w, h):
            scaled = "" if cfg.scale in (None, 1) else f" at --scale {cfg.scale}"
            raise ValueError(f"--image-size {cfg.image_size}, the training crop, is larger than image {path} "
                             f"({w}x{h}{scaled}); give at most --image-size {min(w, h)}")


def _check_classes(cfg, k):
    """The options whose length or value depends on the number of classes k."""
    if cfg.class_names is not None and len(cfg.class_names) != k:
        raise ValueError(f"--class-names gives {len(cfg.class_names)} names for {k} classes")
    if cfg.ignore_index is not None and 0 <= cfg.ignore_index < k:
        raise ValueError(f"--ignore-index {cfg.ignore_index} is one of the classes 0..{k - 1}; "
                         f"give a label outside them (e.g. 255)")
    if cfg.class_weights is not None and len(cfg.class_weights) != k:
        raise ValueError(f"--class-weights gives {len(cfg.class_weights)} values for {k} classes")


def _headers(files):
    """(W, H, channels) of each image file that opens; the data layer reports the ones that don't."""
    for path in files:
        try:
            with open_image(path, "image") as im:
                yield path, im.size, image_channels(im)
        except ValueError:
            continue


def check_data(cfg, training=True):
    """Check the data options of `cfg` before any data is read; returns a DataPlan.
    training: also check the training crop (--image-size) and the validation split."""
    default = type(cfg)()
    if cfg.is_synthetic():
        given = [flag(k) for k in SYNTHETIC_ONLY_NOT if getattr(cfg, k) != getattr(default, k)]
        if given:
            raise ValueError(f"{', '.join(given)} describe{'s' if len(given) == 1 else ''} folder data, and no "
                             f"folder is given: add --data DIR "
                             f"(or --images and --masks)")
        if cfg.class_names is not None:
            raise ValueError("--class-names names the classes of a folder dataset; the synthetic set names its own")
        k = cfg.num_classes()
        if not 2 <= k <= 5:
            raise ValueError(f"--classes {k}: the synthetic set draws 2 to 5 classes")
        if cfg.image_size < 16:
            raise ValueError(f"--image-size {cfg.image_size}: the synthetic images are 16 pixels at least")
        plan = DataPlan(classes=k, count=cfg.samples)
    else:
        (images, images_named), (masks, masks_named) = _folders(cfg)
        files = {}
        for path, named in ((images, images_named), (masks, masks_named)):
            try:
                files[path] = list_images(path, named)
            except ValueError:
                kinds = ", ".join(e[1:].upper() for e in IMAGE_EXTENSIONS)
                raise ValueError(f"{named}: holds no image files ({kinds})") from None
        k, colours, palette_names = _class_count(cfg)
        names = cfg.class_names if cfg.class_names is not None else palette_names
        plan = DataPlan(images, masks, k, len(files[images]), colours, None if names is None else tuple(names))
    _check_classes(cfg, plan.classes)
    if not cfg.is_synthetic() and cfg.channels is None:
        kinds = {}
        for path, _, c in _headers(files[plan.images]):
            kinds.setdefault(c, path)  # the first image of each kind
        if len(kinds) > 1:
            raise ValueError(f"the images in {plan.images} mix grayscale ({kinds[1].name}) and colour "
                             f"({kinds[3].name}); give --channels 1 or --channels 3")
    if training:
        try:
            split_indices(plan.count, cfg.val_fraction, cfg.val_split, seed=cfg.seed)
        except ValueError:
            n_val = int(round(plan.count * cfg.val_fraction))
            raise ValueError(f"--val-fraction {cfg.val_fraction} holds out {n_val} of the {plan.count} images; it "
                             f"must leave at least one for validation and one for training") from None
    return plan
