"""minunet.data: datasets, augmentation, border weight maps and a prefetching batch loader.

Everything here works on NumPy arrays on the host; the training loop moves batches to the
device. A dataset is anything with `__len__` and `__getitem__(i) -> (image, mask)` (or
`(image, mask, weight)`), where

    image  float32 (C, H, W)     roughly zero-mean, unit-scale intensities
    mask   int64   (H, W)        class indices in [0, num_classes), or the ignore label
    weight float32 (H, W)        optional per-pixel loss weights (see `unet_weight_map`)

and `num_classes`, `class_names` and `in_channels` attributes. Two datasets ship:

SyntheticDataset
    The built-in default of `minunet train` (no download). Item i is drawn on demand from
    its own generator, `numpy.random.default_rng([seed, i])`, so it is the same on every
    machine and in every run, whatever order the items are asked for. Each image is a
    smooth textured background (a random gradient plus low-frequency noise) with a few
    shapes pasted on: class 1 discs, 2 rotated rectangles, 3 triangles, 4 rings (as many
    kinds as `num_classes - 1`, at least one of each per image). A shape's contrast has a
    random size and sign, the whole image is smoothed and then Gaussian noise is added, so
    no intensity threshold separates the classes: the network must use shape and context.

FolderDataset
    Images and masks in two folders, paired by file name, decoded lazily with Pillow and
    kept in an LRU cache (`cache_mb`, 512 MB by default, which holds each of the three real
    sets below whole: the cache stores the decoded uint8/uint16 pixels and the labels, not
    float32). Every file header is read when the dataset is built, so files that do not
    pair, differ in size or cannot be opened fail at once with a ValueError naming them;
    a file whose pixel data is damaged fails when it is first loaded, also naming it.

    Pairing. `pairing='stem'` (default): image `<stem>.<ext>` pairs with the mask named
    `<mask_prefix><stem><mask_suffix>.<any image ext>`. `pairing='sorted'`: the i-th image
    pairs with the i-th mask, both folders in natural order. Items are in the natural
    order of the image names ("2" before "10"), so item i of ISBI is slice i.

    Images: PNG, TIFF, GIF or JPEG; 1-bit, 8-bit or 16-bit grayscale, or RGB. Pixels are
    scaled to [0, 1] by their bit depth (/255, /65535; float TIFFs are kept as stored).
    `channels=1` converts RGB to luminance (ITU-R 601, as Pillow's "L"), `channels=3`
    repeats a gray channel; `normalize='image'` standardises each image per channel to
    zero mean and unit variance, `normalize=(mean, std)` applies fixed per-channel values.

    Masks (`mask_mode`):
      'index'    pixel value = class index; needs `num_classes`. A value equal to
                 `ignore_index` is kept as the ignore label.
      'binary'   0 -> class 0, 255 (or True in a 1-bit PNG) -> class 1.
                 (A 1-bit mask reads as 0/255 in 'binary' and 'gray' modes, 0/1 in 'index'.)
      'gray'     `gray_levels[k]` -> class k.
      'palette'  the RGB colour `palette[k]` -> class k. `palette` is a list of (r, g, b)
                 or a file: JSON (a list of [r, g, b], or {"name": [r, g, b], ...}) or text
                 (one "r g b [name]" per line, commas allowed, '#' starts a comment).
    In 'binary', 'gray' and 'palette' modes a value outside the table becomes `ignore_index`
    when one is given; otherwise, and in every mode for a value outside the classes, the
    load fails with a ValueError naming the file and the offending values. `ignore_index`
    must lie outside [0, num_classes).

The three real datasets of ../shared/data (see its README.md), with `root` that folder:

    ISBI 2012 EM membranes (30 slices, 512x512 gray; 255 = cell, 0 = membrane):
        FolderDataset(root / "isbi2012/train/image", root / "isbi2012/train/label",
                      mask_mode="binary", class_names=("membrane", "cell"))
        Class 1 is "cell interior", class 0 "membrane"; for the U-Net paper's border
        weights add weight_map=dict(w0=10.0, sigma=5.0) (cells = class 1 = foreground).
        Validation: hold out a contiguous block of slices, e.g. the last five:
        split_indices(30, 1 / 6, mode="contiguous") -> slices 0-24 train, 25-29 val.

    Drosophila VNC ssTEM stack 1 (20 sections, 1024x1024 gray TIFF; labels00000NN.png):
        FolderDataset(root / "drosophila_vnc/stack1/raw", root / "drosophila_vnc/stack1/labels",
                      mask_prefix="labels000000", mask_mode="gray",
                      gray_levels=(0, 32, 64, 96, 128, 159, 191, 223, 255),
                      class_names=("membrane |", "membrane /", "membrane -", "membrane \\\\",
                                   "membrane junction", "glia", "mitochondria", "synapse",
                                   "intracellular"))
        (raw/07.tif pairs with labels/labels00000007.png: prefix "labels000000" + stem "07".)
        The 1-bit membrane masks pair with the same stems:
        FolderDataset(root / "drosophila_vnc/stack1/raw", root / "drosophila_vnc/stack1/membranes",
                      mask_mode="binary", class_names=("other", "membrane"))

    CamVid (SegNet split; 480x360 RGB; annotation has the image's file name; 11 = void):
        FolderDataset(root / "camvid/train", root / "camvid/trainannot",
                      mask_mode="index", num_classes=11, ignore_index=11,
                      class_names=("Sky", "Building", "Pole", "Road", "Pavement", "Tree",
                                   "SignSymbol", "Fence", "Car", "Pedestrian", "Bicyclist"))
        and "camvid/val" + "camvid/valannot" for the validation split.

Augment flips, rotates by multiples of 90 degrees, crops and elastically deforms an image
together with its mask (and weight map); `unet_weight_map` computes the U-Net paper's
border-emphasising loss weights; `split_indices` makes train/validation splits; and
`DataLoader` shuffles by (seed, epoch), augments each item with its own generator and
assembles (N, C, H, W) batches in a background thread. `read_image` and `list_images` read
single files and folders the way FolderDataset does, for prediction.
"""
import collections
import json
import math
import os
import pathlib
import queue
import re
import threading

import numba
import numpy as np
from PIL import Image, UnidentifiedImageError


# --------------------------------------------------------------------------------------
# The synthetic dataset
# --------------------------------------------------------------------------------------

def _cubic_weights(n_out, n_in):
    """(n_out, n_in) matrix resampling n_in evenly spaced samples (first and last at the two
    ends) to n_out positions with Keys' cubic convolution (a = -0.5, edge samples repeated)."""
    m = np.zeros((n_out, n_in))
    if n_in == 1:
        m[:, 0] = 1.0
        return m
    u = np.arange(n_out) * ((n_in - 1) / max(n_out - 1, 1))
    base = np.floor(u).astype(np.int64)
    for offset in (-1, 0, 1, 2):
        t = np.abs(u - (base + offset))
        w = np.where(t <= 1, 1.5 * t**3 - 2.5 * t**2 + 1,
                     np.where(t < 2, -0.5 * t**3 + 2.5 * t**2 - 4 * t + 2, 0.0))
        np.add.at(m, (np.arange(n_out), np.clip(base + offset, 0, n_in - 1)), w)
    return m


def _smooth3(a):
    """Separable [1, 2, 1] / 4 smoothing over the last two axes, edges repeated."""
    p = np.pad(a, [(0, 0)] * (a.ndim - 2) + [(1, 1), (1, 1)], mode="edge")
    p = 0.25 * p[..., :-2, :] + 0.5 * p[..., 1:-1, :] + 0.25 * p[..., 2:, :]
    return 0.25 * p[..., :-2] + 0.5 * p[..., 1:-1] + 0.25 * p[..., 2:]


class SyntheticDataset:
    """Procedural shapes on textured backgrounds: a dataset that needs no download.

    >>> ds = SyntheticDataset(num_samples=512, image_size=64, num_classes=3)
    >>> x, y = ds[0]          # x: float32 (1, 64, 64), y: int64 (64, 64) in {0, 1, 2}

    num_classes counts the background: 2 (discs), 3 (+ rectangles), 4 (+ triangles) or 5
    (+ rings). Item i depends only on (seed, i). Shape sizes scale with the image (radii
    between 9% and 18% of its shorter side), so a 128x128 image looks like a 64x64 one
    magnified; wide images get more shapes.
    """

    class_names_all = ("background", "disc", "rectangle", "triangle", "ring")

    def __init__(self, num_samples=512, image_size=64, num_classes=3, in_channels=1, seed=0):
        h, w = (image_size, image_size) if np.isscalar(image_size) else tuple(image_size)
        if min(h, w) < 16:
            raise ValueError(f"SyntheticDataset: image_size {image_size} is too small (16 at least)")
        if not 2 <= num_classes <= len(self.class_names_all):
            raise ValueError(f"SyntheticDataset: num_classes={num_classes}; it draws 2 to "
                             f"{len(self.class_names_all)} classes {self.class_names_all}")
        if in_channels < 1:
            raise ValueError(f"SyntheticDataset: in_channels={in_channels} must be >= 1")
        if num_samples < 1:
            raise ValueError(f"SyntheticDataset: num_samples={num_samples} must be >= 1")
        self.num_samples, self.image_size = int(num_samples), (int(h), int(w))
        self.num_classes, self.in_channels, self.seed = int(num_classes), int(in_channels), int(seed)
        self.class_names = self.class_names_all[:num_classes]
        self._yy, self._xx = np.mgrid[0:h, 0:w].astype(np.float32)
        # low-frequency texture: a 6x6 grid of random values upsampled to (h, w)
        self._up_h = _cubic_weights(h, 6).astype(np.float32)
        self._up_w = _cubic_weights(w, 6).astype(np.float32)

    def __len__(self):
        return self.num_samples

    def __getitem__(self, i):
        i = _check_index(i, self.num_samples, "SyntheticDataset")
        rng = np.random.default_rng([self.seed, i])
        h, w = self.image_size
        c = self.in_channels
        # background: a level, a linear gradient and a smooth random texture per channel
        # x: (C, H, W), float32 throughout
        g = rng.normal(0.0, 0.5, size=(c, 2))
        x = (rng.uniform(-0.5, 0.5, size=(c, 1, 1))
             + g[:, 0, None, None] * (self._yy / h - 0.5) + g[:, 1, None, None] * (self._xx / w - 0.5)
             + 0.3 * (self._up_h @ rng.normal(size=(c, 6, 6)) @ self._up_w.T))
        x = x.astype(np.float32)
        y = np.zeros((h, w), dtype=np.int64)
        for kind, cy, cx, r, angle, aspect in self._layout(rng):
            inside, (y0, y1, x0, x1) = self._render(kind, cy, cx, r, angle, aspect)
            amplitude = rng.uniform(0.6, 1.2) * rng.choice((-1.0, 1.0))
            colour = amplitude * (1.0 if c == 1 else _unit(rng.normal(size=c)) * math.sqrt(c))
            window = x[:, y0:y1, x0:x1]
            window[:, inside] += np.asarray(colour, dtype=np.float32).reshape(c, 1)
            y[y0:y1, x0:x1][inside] = kind
        x = _smooth3(x) + rng.normal(0.0, 0.15, size=x.shape)
        x = (x - x.mean(axis=(1, 2), keepdims=True)) / (x.std(axis=(1, 2), keepdims=True) + 1e-6)
        return x.astype(np.float32), y

    def _layout(self, rng):
        """Yield (kind, centre y, centre x, radius, angle, aspect) per shape: one of each kind
        first, then up to two more of random kinds (more on wide images); centres are kept
        apart so that shapes overlap a little at most. Later shapes are painted on top."""
        h, w = self.image_size
        s = min(h, w)
        required = list(range(1, self.num_classes))
        rng.shuffle(required)
        extra = rng.integers(0, 3) * round(max(h, w) / s)
        kinds = required + list(rng.integers(1, self.num_classes, size=extra))
        placed = []
        for k, kind in enumerate(kinds):
            r = rng.uniform(0.09, 0.18) * s
            reach = r * (1.2 if kind == 3 else 1.0)  # a triangle's corners stick out
            for _ in range(20):
                cy, cx = rng.uniform(reach, h - reach), rng.uniform(reach, w - reach)
                if all(math.hypot(cy - py, cx - px) >= 0.8 * (reach + pr) for py, px, pr in placed):
                    break
            else:
                if k >= len(required):
                    continue  # an extra shape that found no room is left out
            placed.append((cy, cx, reach))
            yield int(kind), cy, cx, r, rng.uniform(0, 2 * math.pi), rng.uniform(0.55, 0.9)

    def _render(self, kind, cy, cx, r, angle, aspect):
        """Boolean mask of one shape over its bounding window, and that window."""
        h, w = self.image_size
        reach = 1.2 * r + 1
        y0, y1 = max(0, int(cy - reach)), min(h, int(cy + reach) + 2)
        x0, x1 = max(0, int(cx - reach)), min(w, int(cx + reach) + 2)
        dy, dx = self._yy[y0:y1, x0:x1] - cy, self._xx[y0:y1, x0:x1] - cx
        if kind == 1:  # disc of radius r
            inside = dy * dy + dx * dx <= r * r
        elif kind == 2:  # rectangle with half sides 0.9 r and 0.9 r * aspect, rotated
            u = dx * math.cos(angle) + dy * math.sin(angle)
            v = -dx * math.sin(angle) + dy * math.cos(angle)
            inside = (np.abs(u) <= 0.9 * r) & (np.abs(v) <= 0.9 * r * aspect)
        elif kind == 3:  # equilateral triangle, inradius 0.6 r: the meet of three half-planes
            inside = np.ones(dy.shape, dtype=bool)
            for k in range(3):
                phi = angle + 2 * math.pi * k / 3
                inside &= dx * math.cos(phi) + dy * math.sin(phi) <= 0.6 * r
        else:  # ring: an annulus between 0.55 r and r
            d2 = dy * dy + dx * dx
            inside = (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
        return inside, (y0, y1, x0, x1)


def _unit(v):
    return v / (np.linalg.norm(v) + 1e-12)


def _check_index(i, n, who):
    i = int(i)
    if not -n <= i < n:
        raise IndexError(f"{who}: index {i} out of range for {n} items")
    return i % n


# --------------------------------------------------------------------------------------
# Reading image and mask files
# --------------------------------------------------------------------------------------

IMAGE_EXTENSIONS = (".png", ".tif", ".tiff", ".gif", ".jpg", ".jpeg")
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}


def _natural_key(name):
    """Sort key that orders embedded numbers by value: "2.png" before "10.png"."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name) if t]


def list_images(folder, who="list_images"):
    """The PNG/TIFF/GIF/JPEG files of a folder (not hidden ones), in natural name order."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{who}: {folder} is not a folder")
    files = sorted((p for p in folder.iterdir()
                    if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS),
                   key=lambda p: _natural_key(p.name))
    if not files:
        raise ValueError(f"{who}: no {'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} files in {folder}")
    return files


def _by_stem(files, who):
    stems = {}
    for p in files:
        if p.stem in stems:
            raise ValueError(f"{who}: two files share the stem {p.stem!r}: {stems[p.stem].name} and {p.name}")
        stems[p.stem] = p
    return stems


def _open(path, what):
    """Open an image file lazily (header only); a ValueError naming the file if it cannot."""
    try:
        return Image.open(path)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot read {what} {path}: {e}") from e


def _is_gray_palette(im):
    pal = im.getpalette() or []
    return all(pal[k] == pal[k + 1] == pal[k + 2] for k in range(0, len(pal) - 2, 3))


def _image_channels(im):
    if im.mode == "P":
        return 1 if _is_gray_palette(im) else 3
    return 1 if im.mode in _GRAY_MODES else 3


def _decode_image(path):
    """Pixels of an image file as stored: (array (H, W) or (H, W, 3), full-scale value)."""
    im = _open(path, "image")
    try:
        with im:
            mode = im.mode
            if mode == "P":
                im, mode = (im.convert("L"), "L") if _is_gray_palette(im) else (im.convert("RGB"), "RGB")
            elif mode == "LA":
                im, mode = im.convert("L"), "L"
            elif mode not in _GRAY_MODES and mode != "RGB":
                im, mode = im.convert("RGB"), "RGB"  # RGBA, CMYK, YCbCr, ...
            a = np.asarray(im)
    except (OSError, SyntaxError, ValueError) as e:  # truncated or damaged pixel data
        raise ValueError(f"cannot read image {path}: {e}") from e
    if mode == "1":
        return a.astype(np.uint8), 1.0
    if mode.startswith("I;16"):
        return a.astype(np.uint16), 65535.0
    if mode == "I":  # 32-bit integer pixels: minunet reads them as 16-bit data
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise ValueError(f"image {path}: 32-bit integer pixels outside 0..65535 "
                             f"(min {a.min()}, max {a.max()}); convert it to 8 or 16 bits")
        return a.astype(np.uint16), 65535.0
    if mode == "F":
        return a.astype(np.float32), 1.0
    return a, 255.0  # L, RGB: uint8


def _to_float(pixels, scale, channels, normalize):
    # pixels: (H, W) or (H, W, 3) as stored -> x: (C, H, W) float32, [0, 1] before `normalize`
    x = pixels.astype(np.float32) * np.float32(1.0 / scale)
    x = x[None] if x.ndim == 2 else x.transpose(2, 0, 1)
    if channels == 1 and x.shape[0] == 3:
        x = np.tensordot(np.asarray([0.299, 0.587, 0.114], np.float32), x, axes=1)[None]
    elif channels == 3 and x.shape[0] == 1:
        x = np.repeat(x, 3, axis=0)
    if normalize == "image":
        x = (x - x.mean(axis=(1, 2), keepdims=True)) / (x.std(axis=(1, 2), keepdims=True) + 1e-6)
    elif normalize is not None:
        mean, std = (np.asarray(v, np.float32).reshape(-1, 1, 1) for v in normalize)
        x = (x - mean) / std
    return np.ascontiguousarray(x, dtype=np.float32)


def read_image(path, channels=None, normalize=None):
    """One image file -> float32 (C, H, W), preprocessed exactly as FolderDataset does it
    (scaled by bit depth, `channels` 1/3/None, `normalize` None/'image'/(mean, std)): the
    function to prepare images for a trained model."""
    pixels, scale = _decode_image(path)
    return _to_float(pixels, scale, channels, normalize)


def _decode_mask(path, rgb):
    """Mask pixels as stored: (H, W) values, or (H, W, 3) colours when rgb is True."""
    im = _open(path, "mask")
    try:
        with im:
            if rgb:
                return np.asarray(im.convert("RGB"))
            if im.mode == "P":  # palette indices ARE the labels in index masks (e.g. VOC)
                return np.asarray(im)
            if im.mode in ("LA", "RGBA"):
                im = im.convert(im.mode[:-1])
            a = np.asarray(im)
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot read mask {path}: {e}") from e
    if a.ndim == 3:
        if not ((a[..., 0] == a[..., 1]).all() and (a[..., 0] == a[..., 2]).all()):
            raise ValueError(f"mask {path} is a colour image; for colour-coded masks use "
                             f"mask_mode='palette' with a palette file")
        a = a[..., 0]
    return a


def read_palette(palette):
    """A palette as (colours int array (K, 3), class names or None).

    `palette` is a sequence of (r, g, b) or a file: JSON, either [[r, g, b], ...] or
    {"name": [r, g, b], ...} (class order = file order); or text, one "r g b [name]" per
    line (commas allowed, '#' starts a comment, blank lines skipped).
    """
    names = None
    if isinstance(palette, (str, os.PathLike)):
        path = pathlib.Path(palette)
        try:
            text = path.read_text()
        except OSError as e:
            raise ValueError(f"cannot read palette file {path}: {e}") from e
        if path.suffix.lower() == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"palette file {path} is not valid JSON: {e}") from e
            if isinstance(data, dict):
                names, colours = list(data), list(data.values())
            else:
                colours = data
        else:
            colours, names = [], []
            for n, line in enumerate(text.splitlines(), 1):
                fields = line.split("#", 1)[0].replace(",", " ").split()
                if not fields:
                    continue
                try:
                    rgb = [int(v) for v in fields[:3]]
                except ValueError:
                    rgb = []
                if len(rgb) != 3:
                    raise ValueError(f"palette file {path}, line {n}: expected 'r g b [name]', got {line!r}")
                colours.append(rgb)
                names.append(" ".join(fields[3:]) or None)
            names = names if all(names) else None
        where = f"palette file {path}"
    else:
        colours, where = palette, "palette"
    try:
        colours = np.asarray(colours, dtype=np.int64)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: expected a list of (r, g, b) colours") from None
    if colours.ndim != 2 or colours.shape[1] != 3 or len(colours) == 0:
        raise ValueError(f"{where}: expected a list of (r, g, b) colours, got shape {colours.shape}")
    if colours.min() < 0 or colours.max() > 255:
        raise ValueError(f"{where}: colour components must lie in 0..255")
    packed = _pack_rgb(colours)
    if len(np.unique(packed)) != len(packed):
        raise ValueError(f"{where}: the same colour is listed for two classes")
    return colours, names


def _pack_rgb(c):
    c = np.asarray(c, dtype=np.int64)
    return (c[..., 0] << 16) | (c[..., 1] << 8) | c[..., 2]


# --------------------------------------------------------------------------------------
# FolderDataset
# --------------------------------------------------------------------------------------

class FolderDataset:
    """Images and label masks in two folders, paired by name (see the module docstring).

    >>> ds = FolderDataset("data/train/image", "data/train/label", mask_mode="binary")
    >>> x, y = ds[0]     # x: float32 (C, H, W), y: int64 (H, W)

    Attributes: `pairs` (image path, mask path) in item order, `names` (the image stems),
    `num_classes`, `class_names` (or None), `in_channels`, `ignore_index`.
    With `weight_map=dict(w0=..., sigma=...)` (or True for the defaults) items are
    (image, mask, weight) with `unet_weight_map(mask, ignore_index=ignore_index, **weight_map)`,
    computed once per item and cached with it.
    """

    def __init__(self, image_dir, mask_dir, pairing="stem", mask_prefix="", mask_suffix="",
                 mask_mode="index", num_classes=None, gray_levels=None, palette=None,
                 ignore_index=None, class_names=None, channels=None, normalize=None,
                 weight_map=None, cache_mb=512):
        who = "FolderDataset"
        if mask_mode not in ("index", "binary", "gray", "palette"):
            raise ValueError(f"{who}: mask_mode={mask_mode!r}; expected 'index', 'binary', 'gray' or 'palette'")
        if channels not in (None, 1, 3):
            raise ValueError(f"{who}: channels={channels!r}; expected None (as stored), 1 or 3")
        if not (normalize is None or normalize == "image" or
                (isinstance(normalize, (tuple, list)) and len(normalize) == 2)):
            raise ValueError(f"{who}: normalize={normalize!r}; expected None, 'image' or (mean, std)")
        self.mask_mode, self.channels, self.normalize = mask_mode, channels, normalize
        self.ignore_index = None if ignore_index is None else int(ignore_index)
        self._colours = self._lut = None
        if mask_mode == "index":
            if num_classes is None:
                raise ValueError(f"{who}: mask_mode='index' needs num_classes")
            k = int(num_classes)
        elif mask_mode == "binary":
            k = 2
            self._lut = self._make_lut((0, 255))
        elif mask_mode == "gray":
            if gray_levels is None:
                raise ValueError(f"{who}: mask_mode='gray' needs gray_levels, the mask value of each class")
            levels = [int(v) for v in gray_levels]
            if len(set(levels)) != len(levels) or min(levels) < 0 or max(levels) > 65535:
                raise ValueError(f"{who}: gray_levels {levels} must be distinct values in 0..65535")
            k = len(levels)
            self._lut = self._make_lut(levels)
        else:
            if palette is None:
                raise ValueError(f"{who}: mask_mode='palette' needs palette (a file or a list of (r, g, b))")
            self._colours, names = read_palette(palette)
            k = len(self._colours)
            class_names = class_names if class_names is not None else names
        if num_classes is not None and int(num_classes) != k:
            raise ValueError(f"{who}: num_classes={num_classes} but mask_mode={mask_mode!r} defines {k} classes")
        if k < 1:
            raise ValueError(f"{who}: num_classes={k} must be >= 1")
        if self.ignore_index is not None and 0 <= self.ignore_index < k:
            raise ValueError(f"{who}: ignore_index={ignore_index} is one of the classes 0..{k - 1}; "
                             f"pick a value outside them (e.g. 255 or -100)")
        if class_names is not None and len(class_names) != k:
            raise ValueError(f"{who}: {len(class_names)} class_names for {k} classes")
        self.num_classes = k
        self.class_names = None if class_names is None else tuple(class_names)
        self.weight_map = {} if weight_map is True else weight_map

        self.pairs = self._pair(image_dir, mask_dir, pairing, mask_prefix, mask_suffix, who)
        self.names = [p.stem for p, _ in self.pairs]
        self.in_channels = self._check_headers(who)
        self._cache = collections.OrderedDict()
        self._cache_bytes, self._cache_limit = 0, int(cache_mb * 2**20)
        self._lock = threading.Lock()

    # -- construction ------------------------------------------------------------------

    @staticmethod
    def _pair(image_dir, mask_dir, pairing, prefix, suffix, who):
        images, masks = list_images(image_dir, who), list_images(mask_dir, who)
        if pairing == "sorted":
            if len(images) != len(masks):
                raise ValueError(f"{who}: pairing='sorted' needs as many masks as images, but {image_dir} "
                                 f"has {len(images)} and {mask_dir} has {len(masks)}")
            return list(zip(images, masks))
        if pairing != "stem":
            raise ValueError(f"{who}: pairing={pairing!r}; expected 'stem' or 'sorted'")
        image_stems, mask_stems = _by_stem(images, who), _by_stem(masks, who)
        pairs = [(p, mask_stems.get(prefix + s + suffix)) for s, p in image_stems.items()]
        lonely_images = [p.name for p, m in pairs if m is None]
        wanted = {prefix + s + suffix for s in image_stems}
        lonely_masks = [p.name for s, p in mask_stems.items() if s not in wanted]
        if lonely_images or lonely_masks:
            def show(names):
                return ", ".join(names[:10]) + (f" ... ({len(names)} in all)" if len(names) > 10 else "")
            msg = [f"{who}: images and masks do not pair (mask name = {prefix!r} + image stem + {suffix!r})"]
            if lonely_images:
                msg.append(f"images in {image_dir} without a mask: {show(lonely_images)}")
            if lonely_masks:
                msg.append(f"masks in {mask_dir} without an image: {show(lonely_masks)}")
            raise ValueError("; ".join(msg))
        return pairs

    def _check_headers(self, who):
        """Open every file's header: unreadable files, size mismatches and mixed gray/colour
        images fail here, before any training starts. Returns the number of channels."""
        seen = {}
        for image_path, mask_path in self.pairs:
            try:
                with _open(image_path, "image") as im, _open(mask_path, "mask") as m:
                    if im.size != m.size:
                        raise ValueError(f"image {image_path} is {im.size[0]}x{im.size[1]} but mask "
                                         f"{mask_path} is {m.size[0]}x{m.size[1]} (W x H)")
                    seen.setdefault(_image_channels(im), image_path)
            except ValueError as e:
                raise ValueError(f"{who}: {e}") from e
        if self.channels is not None:
            return self.channels
        if len(seen) > 1:
            raise ValueError(f"{who}: the images mix grayscale ({seen[1]}) and colour ({seen[3]}); "
                             f"pass channels=1 or channels=3")
        return next(iter(seen))

    @staticmethod
    def _make_lut(levels):
        """Stored value -> class through a 65536-entry table; -1 marks values of no class."""
        lut = np.full(65536, -1, dtype=np.int64)
        lut[np.asarray(levels)] = np.arange(len(levels))
        return lut

    # -- loading -------------------------------------------------------------------------

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        i = _check_index(i, len(self.pairs), "FolderDataset")
        pixels, scale, y, weight = self._load(i)
        x = _to_float(pixels, scale, self.channels, self.normalize)
        y = y.astype(np.int64)
        return (x, y) if weight is None else (x, y, weight.copy())

    def _load(self, i):
        with self._lock:
            if i in self._cache:
                self._cache.move_to_end(i)
                return self._cache[i]
        image_path, mask_path = self.pairs[i]
        pixels, scale = _decode_image(image_path)
        y = self._labels(_decode_mask(mask_path, rgb=self._colours is not None), mask_path)
        if pixels.shape[:2] != y.shape:
            raise ValueError(f"FolderDataset: image {image_path} is {pixels.shape[:2]} but mask "
                             f"{mask_path} is {y.shape} (H, W)")
        weight = None if self.weight_map is None else unet_weight_map(
            y, **{"ignore_index": self.ignore_index, **self.weight_map})
        entry = (pixels, scale, y, weight)
        size = sum(a.nbytes for a in (pixels, y, weight) if a is not None)
        with self._lock:
            if size <= self._cache_limit and i not in self._cache:
                self._cache[i] = entry
                self._cache_bytes += size
                while self._cache_bytes > self._cache_limit:
                    _, old = self._cache.popitem(last=False)
                    self._cache_bytes -= sum(a.nbytes for a in (old[0], old[2], old[3]) if a is not None)
        return entry

    def _labels(self, a, path):
        """Stored mask values -> class labels (int16, or int64 for an ignore label beyond int16)."""
        k, ignore = self.num_classes, self.ignore_index
        if a.dtype == bool:  # a 1-bit mask: 0/255 as Pillow's convert("L") for binary and gray, 0/1 for index
            a = a.astype(np.uint8) * np.uint8(1 if self.mask_mode == "index" else 255)
        if self._colours is not None:  # palette: (H, W, 3) colours
            packed, table = _pack_rgb(a), _pack_rgb(self._colours)
            order = np.argsort(table)
            pos = np.clip(np.searchsorted(table[order], packed), 0, k - 1)
            labels = order[pos]
            unknown = table[labels] != packed
            bad = lambda: [tuple(int(v) for v in c) for c in np.unique(a[unknown], axis=0)[:10]]
        elif self._lut is not None:  # binary, gray: stored value -> class through a lookup table
            if a.dtype.kind not in "ui":
                raise ValueError(f"mask {path} holds {a.dtype} values; mask_mode={self.mask_mode!r} needs integers")
            if a.size and (a.min() < 0 or a.max() > 65535):
                raise ValueError(f"mask {path} holds values outside 0..65535")
            labels = self._lut[a]
            unknown = labels < 0
            bad = lambda: [int(v) for v in np.unique(a[unknown])[:10]]
        else:  # index
            if a.dtype.kind not in "ui":
                raise ValueError(f"mask {path} holds {a.dtype} values; mask_mode='index' needs integers")
            labels = a.astype(np.int64)
            unknown = (labels < 0) | (labels >= k)
            if ignore is not None:
                unknown &= labels != ignore
            bad = lambda: [int(v) for v in np.unique(a[unknown])[:10]]
        if unknown.any():
            if ignore is not None and self.mask_mode != "index":
                labels = np.where(unknown, ignore, labels)
            else:
                table = {"binary": "the binary values 0 and 255", "gray": "gray_levels",
                         "palette": "the palette colours"}.get(self.mask_mode, f"the classes 0..{k - 1}")
                raise ValueError(f"FolderDataset: mask {path} holds values outside {table}"
                                 f"{'' if ignore is None else f' and ignore_index {ignore}'}: {bad()}")
        fits = -32768 <= (0 if ignore is None else ignore) < 32768
        return labels.astype(np.int16 if fits else np.int64)


# --------------------------------------------------------------------------------------
# Train / validation splits
# --------------------------------------------------------------------------------------

def split_indices(n, val_fraction=0.2, mode="random", seed=0):
    """(train indices, validation indices) of n items, both sorted int64 arrays.

    round(n * val_fraction) items go to validation: a random subset ('random', drawn from
    default_rng(seed)), or the last block ('contiguous'), which is the honest split for
    stacks of correlated slices such as ISBI 2012 (val_fraction=1/6 holds out 25-29).
    """
    n = int(n)
    n_val = int(round(n * val_fraction))
    if not 0 < val_fraction < 1 or not 1 <= n_val <= n - 1:
        raise ValueError(f"split_indices: val_fraction={val_fraction} of n={n} items gives {n_val} "
                         f"validation items; it must leave at least one item on each side")
    if mode == "contiguous":
        return np.arange(n - n_val, dtype=np.int64), np.arange(n - n_val, n, dtype=np.int64)
    if mode != "random":
        raise ValueError(f"split_indices: mode={mode!r}; expected 'random' or 'contiguous'")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_val:]).astype(np.int64), np.sort(order[:n_val]).astype(np.int64)


# --------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------

def _reflect(s, n):
    """Mirror coordinates into [0, n - 1] (..., 2, 1, 0, 1, 2, ..., n-2, n-1, n-2, ...)."""
    if n == 1:
        return np.zeros_like(s)
    period = 2 * (n - 1)
    s = np.mod(np.abs(s), period)
    return np.where(s > n - 1, period - s, s)


def _bilinear(a, sy, sx):
    """a: (C, H, W) sampled at float positions sy, sx (each (h, w), inside the image) -> (C, h, w)."""
    _, h, w = a.shape
    y0 = np.minimum(np.floor(sy).astype(np.int64), max(h - 2, 0))
    x0 = np.minimum(np.floor(sx).astype(np.int64), max(w - 2, 0))
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    fy, fx = (sy - y0).astype(np.float32), (sx - x0).astype(np.float32)
    top = a[:, y0, x0] * (1 - fx) + a[:, y0, x1] * fx
    bottom = a[:, y1, x0] * (1 - fx) + a[:, y1, x1] * fx
    return top * (1 - fy) + bottom * fy


class Augment:
    """Random geometric augmentation applied to an image and its mask (and weight map) together.

    >>> aug = Augment(flip=True, rot90=True, crop=256, elastic=True)
    >>> x, y = aug(x, y, rng=np.random.default_rng(0))    # x: (C, H, W) -> (C, 256, 256)

    In order, each drawn from `rng` (or the Augment's own generator, seeded by `seed`):
      crop     a random window of size `crop` (int or (h, w)); None keeps the whole image.
      elastic  the U-Net paper's deformation: displacement vectors drawn from N(0,
               elastic_sigma^2) pixels on a coarse elastic_grid x elastic_grid grid over the
               window, upsampled to every pixel with cubic interpolation. Output pixel p reads
               the input at p + displacement(p): images and weight maps bilinearly, masks
               from the nearest pixel (labels stay labels). Positions outside the image are
               mirrored back into it, and a cropped window reads real context from around it.
      flip     a horizontal and a vertical flip, each with probability 1/2.
      rot90    a rotation by k * 90 degrees, k uniform in 0..3 (0 or 2 for a non-square
               window, so that every item keeps its height and width).
    """

    def __init__(self, flip=True, rot90=True, crop=None, elastic=False, elastic_sigma=10.0,
                 elastic_grid=3, seed=0):
        if crop is not None:
            crop = (int(crop), int(crop)) if np.isscalar(crop) else tuple(int(c) for c in crop)
            if len(crop) != 2 or min(crop) < 1:
                raise ValueError(f"Augment: crop={crop}; expected a positive int or (h, w)")
        if elastic and (elastic_grid < 2 or elastic_sigma < 0):
            raise ValueError(f"Augment: elastic_grid={elastic_grid} must be >= 2 and "
                             f"elastic_sigma={elastic_sigma} >= 0")
        self.flip, self.rot90, self.crop, self.elastic = flip, rot90, crop, elastic
        self.elastic_sigma, self.elastic_grid = float(elastic_sigma), int(elastic_grid)
        self.rng = np.random.default_rng(seed)

    def __call__(self, image, mask, weight=None, rng=None):
        # image: (C, H, W), mask: (H, W), weight: (H, W) or None -> the same, cropped to (h, w)
        rng = self.rng if rng is None else rng
        _, H, W = image.shape
        if mask.shape != (H, W) or (weight is not None and weight.shape != (H, W)):
            raise ValueError(f"Augment: image {image.shape}, mask {mask.shape}"
                             f"{'' if weight is None else f', weight {weight.shape}'} do not share (H, W)")
        h, w = self.crop or (H, W)
        if h > H or w > W:
            raise ValueError(f"Augment: crop {(h, w)} is larger than the image {(H, W)}")
        top, left = int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1))
        if self.elastic:
            grid = rng.normal(0.0, self.elastic_sigma, size=(2, self.elastic_grid, self.elastic_grid))
            up_h, up_w = _cubic_weights(h, self.elastic_grid), _cubic_weights(w, self.elastic_grid)
            dy, dx = up_h @ grid[0] @ up_w.T, up_h @ grid[1] @ up_w.T  # (h, w) displacements
            sy = _reflect(top + np.arange(h)[:, None] + dy, H)
            sx = _reflect(left + np.arange(w)[None, :] + dx, W)
            image = _bilinear(image, sy, sx)
            mask = mask[np.rint(sy).astype(np.int64), np.rint(sx).astype(np.int64)]
            weight = None if weight is None else _bilinear(weight[None], sy, sx)[0]
        else:
            image, mask = image[:, top:top + h, left:left + w], mask[top:top + h, left:left + w]
            weight = None if weight is None else weight[top:top + h, left:left + w]
        arrays = [image, mask[None]] + ([] if weight is None else [weight[None]])
        if self.flip:
            for axis in (2, 1):
                if rng.random() < 0.5:
                    arrays = [np.flip(a, axis) for a in arrays]
        if self.rot90:
            k = int(rng.integers(0, 4)) if h == w else 2 * int(rng.integers(0, 2))
            arrays = [np.rot90(a, k, axes=(1, 2)) for a in arrays]
        image, mask = np.ascontiguousarray(arrays[0], np.float32), np.ascontiguousarray(arrays[1][0])
        if weight is None:
            return image, mask
        return image, mask, np.ascontiguousarray(arrays[2][0], np.float32)


# --------------------------------------------------------------------------------------
# The U-Net paper's border weight map
# --------------------------------------------------------------------------------------

@numba.njit(cache=True)
def _label_components(fg, connectivity):
    """fg: bool (H, W) -> (labels int32 (H, W): 0 off the foreground, 1..K per component; K)."""
    H, W = fg.shape
    labels = np.zeros((H, W), np.int32)
    stack = np.empty(H * W, np.int64)  # every pixel is pushed at most once
    k = 0
    for i in range(H):
        for j in range(W):
            if not fg[i, j] or labels[i, j] != 0:
                continue
            k += 1
            labels[i, j] = k
            stack[0] = i * W + j
            top = 1
            while top > 0:  # flood fill from (i, j) with an explicit stack
                top -= 1
                y, x = stack[top] // W, stack[top] % W
                for dy in range(-1, 2):
                    for dx in range(-1, 2):
                        if (dy == 0 and dx == 0) or (connectivity == 4 and dy != 0 and dx != 0):
                            continue
                        yy, xx = y + dy, x + dx
                        if 0 <= yy < H and 0 <= xx < W and fg[yy, xx] and labels[yy, xx] == 0:
                            labels[yy, xx] = k
                            stack[top] = yy * W + xx
                            top += 1
    return labels, k


@numba.njit(cache=True)
def _lower_envelope(f, d, v, z):
    """Felzenszwalb & Huttenlocher's 1-D squared distance transform:
    d[q] = min_p (q - p)^2 + f[p], via the lower envelope of the parabolas rooted at (p, f[p])."""
    n = f.shape[0]
    k = 0
    v[0] = 0
    z[0] = -np.inf
    z[1] = np.inf
    for q in range(1, n):
        # where the parabola from q overtakes the envelope's last one; drop those it hides
        s = ((f[q] + q * q) - (f[v[k]] + v[k] * v[k])) / (2.0 * (q - v[k]))
        while s <= z[k]:  # z[0] = -inf ends the loop at k = 0
            k -= 1
            s = ((f[q] + q * q) - (f[v[k]] + v[k] * v[k])) / (2.0 * (q - v[k]))
        k += 1
        v[k] = q
        z[k] = s
        z[k + 1] = np.inf
    k = 0
    for q in range(n):
        while z[k + 1] < q:
            k += 1
        d[q] = (q - v[k]) ** 2 + f[v[k]]


@numba.njit(cache=True)
def _two_nearest(labels, k, reach):
    """Distances from every pixel to the nearest and second-nearest of the K components:
    (d1, d2) float64 (H, W), inf where fewer components lie within `reach` pixels.
    Each component gets an exact Euclidean distance transform (a column pass, then the
    lower envelope along rows) over its bounding box grown by `reach`."""
    H, W = labels.shape
    big = 1e20  # "no pixel here": finite, so the envelope arithmetic never meets inf - inf
    y0 = np.full(k + 1, H, np.int64)
    y1 = np.full(k + 1, -1, np.int64)
    x0 = np.full(k + 1, W, np.int64)
    x1 = np.full(k + 1, -1, np.int64)
    for i in range(H):
        for j in range(W):
            c = labels[i, j]
            if c > 0:
                y0[c], y1[c] = min(y0[c], i), max(y1[c], i)
                x0[c], x1[c] = min(x0[c], j), max(x1[c], j)
    d1 = np.full((H, W), np.inf)
    d2 = np.full((H, W), np.inf)
    n = max(H, W)
    f, d = np.empty(n), np.empty(n)
    v, z = np.empty(n, np.int64), np.empty(n + 1)
    for c in range(1, k + 1):
        top, bottom = max(0, y0[c] - reach), min(H, y1[c] + reach + 1)
        left, right = max(0, x0[c] - reach), min(W, x1[c] + reach + 1)
        h, w = bottom - top, right - left
        g = np.empty((h, w))
        for j in range(w):  # squared distance to component c along each column
            last = -1
            for i in range(h):
                if labels[top + i, left + j] == c:
                    last = i
                g[i, j] = big if last < 0 else (i - last) ** 2
            last = -1
            for i in range(h - 1, -1, -1):
                if labels[top + i, left + j] == c:
                    last = i
                if last >= 0:
                    g[i, j] = min(g[i, j], (last - i) ** 2)
        for i in range(h):  # then along each row: exact squared Euclidean distance
            for j in range(w):
                f[j] = g[i, j]
            _lower_envelope(f[:w], d[:w], v[:w], z[:w + 1])
            for j in range(w):
                if d[j] >= big:
                    continue
                dist = np.sqrt(d[j])
                y, x = top + i, left + j
                if dist < d1[y, x]:
                    d2[y, x] = d1[y, x]
                    d1[y, x] = dist
                elif dist < d2[y, x]:
                    d2[y, x] = dist
    return d1, d2


def connected_components(mask, connectivity=4):
    """Label the connected components of a boolean (H, W) mask: (labels int32 (H, W), count).
    0 marks the background; components are numbered 1.. in raster order of their first pixel."""
    if connectivity not in (4, 8):
        raise ValueError(f"connected_components: connectivity={connectivity}; expected 4 or 8")
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"connected_components: expected an (H, W) mask, got shape {mask.shape}")
    labels, k = _label_components(np.ascontiguousarray(mask, dtype=np.bool_), connectivity)
    return labels, int(k)


def unet_weight_map(mask, w0=10.0, sigma=5.0, class_weights=None, foreground=1, ignore_index=None,
                    connectivity=4):
    """The U-Net paper's loss weights (Ronneberger et al. 2015, eq. 2), float32 (H, W):

        w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))^2 / (2 sigma^2))

    d1, d2: Euclidean distances from pixel x to the nearest and the second-nearest "cell",
    a connected component (4-connected by default, so a one-pixel diagonal membrane still
    separates two cells) of the pixels whose label is `foreground`. The second term makes
    the thin gaps between touching cells expensive to get wrong; it is 0 where fewer than
    two cells exist. w_c balances the classes: None -> 1 everywhere; 'balanced' -> for each
    class present, (number of labelled pixels) / (classes present * its pixel count); or a
    sequence of per-class weights. Pixels labelled `ignore_index` get w_c = 0.

    Distances are exact, but each cell is only looked for within R = sigma * sqrt(2 ln 1e6)
    (about 5.3 sigma) of its bounding box: beyond that the border term is below 1e-6 * w0,
    so leaving it out changes no weight by more than that, and the map costs about
    (number of cells) x (cell size + 2R)^2 operations instead of cells x H x W.
    """
    y = np.asarray(mask)
    if y.ndim != 2:
        raise ValueError(f"unet_weight_map: expected an (H, W) mask, got shape {y.shape}")
    if sigma <= 0:
        raise ValueError(f"unet_weight_map: sigma={sigma} must be > 0")
    valid = np.ones(y.shape, bool) if ignore_index is None else y != ignore_index
    if class_weights is None:
        wc = valid.astype(np.float64)
    elif isinstance(class_weights, str):
        if class_weights != "balanced":
            raise ValueError(f"unet_weight_map: class_weights={class_weights!r}; expected None, "
                             f"'balanced' or a sequence of per-class weights")
        labels = y[valid].astype(np.int64)
        if labels.size and labels.min() < 0:
            raise ValueError(f"unet_weight_map: mask holds negative labels {np.unique(labels[labels < 0])[:10]}")
        counts = np.bincount(labels)
        table = np.zeros(max(len(counts), 1))
        present = counts > 0
        table[present] = labels.size / (present.sum() * counts[present])
        wc = np.where(valid, table[np.where(valid, y, 0)], 0.0)
    else:
        table = np.asarray(class_weights, dtype=np.float64)
        bad = valid & ((y < 0) | (y >= len(table)))
        if bad.any():
            raise ValueError(f"unet_weight_map: mask labels {np.unique(y[bad])[:10]} have no entry in "
                             f"class_weights (length {len(table)})")
        wc = np.where(valid, table[np.where(valid, y, 0)], 0.0)
    labels, k = connected_components(y == foreground, connectivity)
    reach = int(math.ceil(sigma * math.sqrt(2 * math.log(1e6))))
    d1, d2 = _two_nearest(labels, k, reach)
    border = np.zeros(y.shape)
    near = np.isfinite(d2)
    border[near] = w0 * np.exp(-(d1[near] + d2[near]) ** 2 / (2.0 * sigma**2))
    return (wc + border).astype(np.float32)


# --------------------------------------------------------------------------------------
# DataLoader
# --------------------------------------------------------------------------------------

class DataLoader:
    """Batches of a dataset as NumPy arrays, assembled ahead of time in a background thread.

    >>> loader = DataLoader(ds, batch_size=8, augment=Augment(crop=128), seed=0)
    >>> for epoch in range(start_epoch, epochs):
    ...     loader.set_epoch(epoch)
    ...     for x, y in loader:      # x: float32 (N, C, H, W), y: int64 (N, H, W)
    ...         ...

    Items with a weight map give (x, y, weight) batches, weight float32 (N, H, W).
    `indices` restricts the loader to those items (e.g. one side of `split_indices`).

    Determinism: the pass over epoch e visits the items in the order
    `default_rng([seed, e]).permutation(indices)` (or as given, without shuffle), and item i
    of epoch e is augmented with its own generator `default_rng([seed, e, i])`. So a run that
    resumes at epoch e sees exactly the batches it would have seen, whatever the thread
    timing. Each pass uses the loader's current epoch and then advances it by one, so plain
    `for epoch ...: for batch in loader` reshuffles too; `set_epoch(e)` picks the next pass's,
    and `set_epoch(e, start_batch=b)` makes it begin at batch b (for resuming mid-epoch).

    Threading: with prefetch > 0 one thread loads up to `prefetch` batches ahead into a
    bounded queue (image decoding and NumPy release the GIL, so this overlaps with the
    training step); prefetch=0 loads in the caller's thread. An exception raised while
    loading is re-raised in the consumer as the same exception object. Leaving the loop
    early (break, an exception in the training step) stops the thread and joins it.

    Batching needs items of one size: with images of different sizes, crop them (Augment's
    crop) or use batch_size=1.
    """

    def __init__(self, dataset, batch_size=4, shuffle=True, seed=0, augment=None, drop_last=False,
                 prefetch=2, indices=None):
        if batch_size < 1:
            raise ValueError(f"DataLoader: batch_size={batch_size} must be >= 1")
        if prefetch < 0:
            raise ValueError(f"DataLoader: prefetch={prefetch} must be >= 0")
        n = len(dataset)
        self.indices = np.arange(n, dtype=np.int64) if indices is None else np.asarray(indices, dtype=np.int64)
        if self.indices.ndim != 1 or (self.indices.size and (self.indices.min() < 0 or self.indices.max() >= n)):
            raise ValueError(f"DataLoader: indices must be a 1-D list of item numbers in 0..{n - 1}")
        self.dataset, self.batch_size, self.shuffle, self.seed = dataset, int(batch_size), shuffle, int(seed)
        self.augment, self.drop_last, self.prefetch = augment, drop_last, int(prefetch)
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch, start_batch=0):
        """Make the next pass the one of epoch `epoch` (its shuffle and its augmentations),
        beginning at batch `start_batch`: a resumed run skips the batches it has trained on
        without loading them (the batches after it are the same, as nothing depends on them)."""
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"DataLoader.set_epoch: start_batch={start_batch} outside 0..{len(self)}")
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def __len__(self):
        n = len(self.indices)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def batches(self, epoch):
        """The item numbers of each batch of epoch `epoch`: a list of int64 arrays."""
        order = np.random.default_rng([self.seed, epoch]).permutation(self.indices) if self.shuffle else self.indices
        return [order[k:k + self.batch_size] for k in range(0, len(self) * self.batch_size, self.batch_size)]

    def __iter__(self):
        epoch, start = self.epoch, self.start_batch
        self.epoch, self.start_batch = epoch + 1, 0
        batches = self.batches(epoch)[start:]
        if self.prefetch == 0:
            for items in batches:
                yield self._assemble(items, epoch)
            return
        q, stop = queue.Queue(maxsize=self.prefetch), threading.Event()
        worker = threading.Thread(target=self._produce, args=(batches, epoch, q, stop), daemon=True,
                                  name="minunet-DataLoader")
        worker.start()
        try:
            for _ in batches:
                ok, payload = q.get()
                if not ok:
                    raise payload
                yield payload
        finally:
            stop.set()
            while worker.is_alive():  # drain, so a producer blocked on a full queue sees `stop`
                try:
                    q.get_nowait()
                except queue.Empty:
                    worker.join(timeout=0.01)

    def _produce(self, batches, epoch, q, stop):
        try:
            for items in batches:
                if stop.is_set():
                    return
                self._put(q, stop, (True, self._assemble(items, epoch)))
        except BaseException as e:  # hand every failure to the consumer, which re-raises it
            self._put(q, stop, (False, e))

    @staticmethod
    def _put(q, stop, message):
        while not stop.is_set():
            try:
                q.put(message, timeout=0.05)
                return
            except queue.Full:
                continue

    def _assemble(self, items, epoch):
        # items: B item numbers -> (x (B, C, H, W) float32, y (B, H, W) int64[, weight (B, H, W)])
        samples = []
        for i in items:
            sample = self.dataset[int(i)]
            if self.augment is not None:
                sample = self.augment(*sample, rng=np.random.default_rng([self.seed, epoch, int(i)]))
            samples.append(sample)
        arity = {len(s) for s in samples}
        if len(arity) != 1 or arity.pop() not in (2, 3):
            raise ValueError("DataLoader: items must all be (image, mask) or all (image, mask, weight)")
        batch = []
        for k, dtype in zip(range(len(samples[0])), (np.float32, np.int64, np.float32)):
            shapes = [s[k].shape for s in samples]
            if len(set(shapes)) != 1:
                first = shapes[0]
                odd = next(j for j, s in enumerate(shapes) if s != first)
                raise ValueError(f"DataLoader: items of different sizes in one batch: item {int(items[0])} "
                                 f"has {('image', 'mask', 'weight')[k]} shape {first}, item {int(items[odd])} "
                                 f"has {shapes[odd]}; crop them to one size (Augment(crop=...)) or use batch_size=1")
            batch.append(np.stack([s[k] for s in samples]).astype(dtype, copy=False))
        return tuple(batch)
