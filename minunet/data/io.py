"""minunet.data.io: reading image and mask files with Pillow, the way every minunet dataset does.

Images: PNG, TIFF, GIF or JPEG; 1-bit, 8-bit or 16-bit grayscale, or RGB. `decode_image`
returns the pixels as stored (uint8, uint16, or float32 for float TIFFs) with their full-scale
value, and `to_float` turns them into the float32 (C, H, W) array a model reads: scaled to
[0, 1] by their bit depth (/255, /65535; float TIFFs are kept as stored), converted to
`channels` (1: ITU-R 601 luminance, as Pillow's "L"; 3: a gray channel repeated; None: as
stored), and normalised (`'image'`: each image per channel to zero mean and unit variance;
`(mean, std)`: fixed per-channel values). `read_image` is the two in a row, for prediction.

`resize_image` and `resize_labels` resize pixels as stored and class labels (the `scale`
option of FolderDataset and read_image): images by area averaging when shrinking (bilinear
when enlarging), labels by taking the nearest pixel, so labels stay labels.

`decode_mask` returns mask pixels as stored (class indices, gray levels, or RGB colours for
palette masks); minunet.data.folder maps them to classes. `read_palette` reads a palette of
class colours from a list or a JSON/text file.

Every failure is a ValueError that names the file.
"""
import json
import math
import os
import pathlib
import re

import numpy as np
from PIL import Image, UnidentifiedImageError

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


def open_image(path, what):
    """Open an image file lazily (header only); a ValueError naming the file if it cannot."""
    try:
        return Image.open(path)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot read {what} {path}: {e}") from e


def _is_gray_palette(im):
    pal = im.getpalette() or []
    return all(pal[k] == pal[k + 1] == pal[k + 2] for k in range(0, len(pal) - 2, 3))


def image_channels(im):
    if im.mode == "P":
        return 1 if _is_gray_palette(im) else 3
    return 1 if im.mode in _GRAY_MODES else 3


def decode_image(path):
    """Pixels of an image file as stored: (array (H, W) or (H, W, 3), full-scale value)."""
    im = open_image(path, "image")
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


def to_float(pixels, scale, channels, normalize):
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


def scaled_size(hw, scale):
    """(H, W) times `scale`, each rounded half up and at least 1: the size `scale` resizes to."""
    return tuple(max(1, int(math.floor(n * scale + 0.5))) for n in hw)


def resize_image(pixels, hw):
    """Image pixels (H, W) or (H, W, 3), any dtype, resized to hw = (h, w) with Pillow: by area
    averaging when shrinking (each output pixel the mean of the input area it covers, as
    OpenCV's INTER_AREA), bilinearly when enlarging; the dtype is kept (integers rounded)."""
    h, w = hw
    how = Image.Resampling.BOX if h * w < pixels.shape[0] * pixels.shape[1] else Image.Resampling.BILINEAR
    planes = pixels[..., None] if pixels.ndim == 2 else pixels
    out = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(planes[..., c], np.float32)).resize((w, h), how))
                    for c in range(planes.shape[-1])], -1)
    if pixels.dtype.kind in "ui":
        info = np.iinfo(pixels.dtype)
        out = np.clip(np.rint(out), info.min, info.max)
    out = out.astype(pixels.dtype)
    return out[..., 0] if pixels.ndim == 2 else out


def resize_labels(labels, hw):
    """Labels (H, W) resized to hw = (h, w): output pixel (i, j) takes the label at the input
    pixel nearest its centre, ((i + 1/2) H / h, (j + 1/2) W / w), so labels stay labels."""
    H, W = labels.shape
    h, w = hw
    rows = np.minimum(((np.arange(h) + 0.5) * (H / h)).astype(np.int64), H - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * (W / w)).astype(np.int64), W - 1)
    return np.ascontiguousarray(labels[rows[:, None], cols[None, :]])


def read_image(path, channels=None, normalize=None, scale=None):
    """One image file -> float32 (C, H, W), preprocessed exactly as FolderDataset does it
    (scaled by bit depth, `channels` 1/3/None, `normalize` None/'image'/(mean, std), resized
    by `scale`): the function to prepare images for a trained model."""
    pixels, full_scale = decode_image(path)
    if scale is not None and scale != 1:
        pixels = resize_image(pixels, scaled_size(pixels.shape[:2], scale))
    return to_float(pixels, full_scale, channels, normalize)


def decode_mask(path, rgb):
    """Mask pixels as stored: (H, W) values, or (H, W, 3) colours when rgb is True."""
    im = open_image(path, "mask")
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
    packed = pack_rgb(colours)
    if len(np.unique(packed)) != len(packed):
        raise ValueError(f"{where}: the same colour is listed for two classes")
    return colours, names


def pack_rgb(c):
    c = np.asarray(c, dtype=np.int64)
    return (c[..., 0] << 16) | (c[..., 1] << 8) | c[..., 2]

