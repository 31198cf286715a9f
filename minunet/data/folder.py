"""minunet.data.folder: FolderDataset, images and label masks in two folders, paired by name.

Files are decoded lazily with Pillow (minunet.data.io) and kept in an LRU cache (`cache_mb`,
512 MB by default, which holds each of the three real sets of minunet.data.recipes whole: the
cache stores the decoded uint8/uint16 pixels and the labels, not float32). Every file header
is read when the dataset is built, so files that do not pair, differ in size or cannot be
opened fail at once with a ValueError naming them; a file whose pixel data is damaged fails
when it is first loaded, also naming it.

Pairing. `pairing='stem'` (default): image `<stem>.<ext>` pairs with the mask named
`<mask_prefix><stem><mask_suffix>.<any image ext>`. `pairing='sorted'`: the i-th image pairs
with the i-th mask, both folders in natural order. Items are in the natural order of the
image names ("2" before "10"), so item i of ISBI is slice i.

Images are read as minunet.data.io describes (`channels`, `normalize`). `scale=s` resizes
every image and its mask to round(s * H) x round(s * W) when they are loaded (before caching
and weight maps): images by area averaging (bilinear when enlarging), masks by taking the
nearest pixel, so labels stay labels. CamVid at scale=0.5 (240x180) trains about four
times faster.

Masks (`mask_mode`):
  'index'    pixel value = class index; needs `num_classes`. A value equal to
             `ignore_index` is kept as the ignore label.
  'binary'   0 -> class 0, 255 (or True in a 1-bit PNG) -> class 1.
             (A 1-bit mask reads as 0/255 in 'binary' and 'gray' modes, 0/1 in 'index'.)
  'gray'     `gray_levels[k]` -> class k.
  'palette'  the RGB colour `palette[k]` -> class k. `palette` is a list of (r, g, b) or a
             file: JSON (a list of [r, g, b], or {"name": [r, g, b], ...}) or text (one
             "r g b [name]" per line, commas allowed, '#' starts a comment).
In 'binary', 'gray' and 'palette' modes a value outside the table becomes `ignore_index`
when one is given; otherwise, and in every mode for a value outside the classes, the load
fails with a ValueError naming the file and the offending values. `ignore_index` must lie
outside [0, num_classes).
"""
import collections
import threading

import numpy as np

from minunet.data.io import (decode_image, decode_mask, image_channels, list_images, open_image, pack_rgb,
                             read_palette, resize_image, resize_labels, scaled_size, to_float)
from minunet.data.loader import check_index
from minunet.data.weight_map import unet_weight_map


def _by_stem(files, who):
    stems = {}
    for p in files:
        if p.stem in stems:
            raise ValueError(f"{who}: two files share the stem {p.stem!r}: {stems[p.stem].name} and {p.name}")
        stems[p.stem] = p
    return stems



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
                 weight_map=None, cache_mb=512, scale=None):
        who = "FolderDataset"
        if scale is not None and not (isinstance(scale, (int, float)) and 0 < scale <= 16):
            raise ValueError(f"{who}: scale={scale!r}; expected a number in (0, 16] (0.5 halves each side)")
        self.scale = None if scale is None or scale == 1 else float(scale)
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
                with open_image(image_path, "image") as im, open_image(mask_path, "mask") as m:
                    if im.size != m.size:
                        raise ValueError(f"image {image_path} is {im.size[0]}x{im.size[1]} but mask "
                                         f"{mask_path} is {m.size[0]}x{m.size[1]} (W x H)")
                    seen.setdefault(image_channels(im), image_path)
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
        i = check_index(i, len(self.pairs), "FolderDataset")
        pixels, scale, y, weight = self._load(i)
        x = to_float(pixels, scale, self.channels, self.normalize)
        y = y.astype(np.int64)
        return (x, y) if weight is None else (x, y, weight.copy())

    def _load(self, i):
        with self._lock:
            if i in self._cache:
                self._cache.move_to_end(i)
                return self._cache[i]
        image_path, mask_path = self.pairs[i]
        pixels, scale = decode_image(image_path)
        y = self._labels(decode_mask(mask_path, rgb=self._colours is not None), mask_path)
        if pixels.shape[:2] != y.shape:
            raise ValueError(f"FolderDataset: image {image_path} is {pixels.shape[:2]} but mask "
                             f"{mask_path} is {y.shape} (H, W)")
        if self.scale is not None:
            hw = scaled_size(y.shape, self.scale)
            pixels, y = resize_image(pixels, hw), resize_labels(y, hw)
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
            packed, table = pack_rgb(a), pack_rgb(self._colours)
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


