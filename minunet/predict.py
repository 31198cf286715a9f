"""minunet.predict: segment images of any size, tile by tile, in bounded memory.

The network never sees a whole large image. The image is cut into tiles that the network
accepts, the tiles go through it a few at a time (`batch_size`), and the label map of each
tile is written into one preallocated (H, W) array. Memory is therefore that array, the
image, and one batch of tiles, whatever the image size (a 4096 x 4096 image is about 500
tiles of 256 x 256).

The tiling is the overlap-tile strategy of the U-Net paper (Ronneberger et al. 2015, Fig. 2),
one axis at a time (the two axes are independent):

    tin   the input tile size (the --tile option), a size the network accepts
    tout  = model.output_size(tin): tin itself for padding='same'; tin - 2b for 'valid',
          whose convolutions eat a border of b pixels on each side
    m     a margin of each output tile that is thrown away: the pixels near a tile's edge
          saw less context (zero padding, for 'same' models), so each output pixel is taken
          from the tile where it lies farthest from the edge. 'valid' models need no
          margin (m = 0): every output pixel saw its whole receptive field.

Output tiles start at 0, c, 2c, ... with stride c = tout - 2m (the last one moved back to
end at the image's edge), and each keeps its centre: [start + m, start + tout - m), or out
to the image's edge for the first and last tiles. The input tile for the output tile at
`start` is the image over [start - b, start - b + tin); wherever that runs off the image the
image is mirrored (reflected about its edge pixels), which is how the paper extrapolates
the missing context, so the output covers the whole image, border included. An image
smaller than a tile is mirrored out to the tile size.

Test-time augmentation (`tta=True`, the --tta option): the image is also predicted turned by
90, 180 and 270 degrees and mirrored, the 8 symmetries of a square (the dihedral group D4),
each prediction turned back, and the 8 softmax outputs averaged. Each transformed image goes
through the same overlap-tile prediction (a non-square image turned by 90 degrees is simply
tiled the other way round), so TTA costs 8 forward passes and, unlike plain prediction, holds
the class probabilities of the whole image (K floats a pixel). The U-Net paper averaged over
rotations for its ISBI 2012 entry; a model that is already symmetric gains nothing.

Predicted masks are written as PNGs: <name>_mask.png holds the class indices (8-bit, or
16-bit beyond 256 classes), <name>_color.png the same drawn with a fixed palette, and with
`overlay` <name>_overlay.png the palette blended over the image.
"""
import pathlib

import numpy as np
from PIL import Image
from tqdm import tqdm

from minunet import backend, data
from minunet.autograd import no_grad, tensor
from minunet.checkpoint import read_checkpoint
from minunet.data.io import open_image
from minunet.unet import UNet

# The first colours are the 10 of matplotlib's "tab10" cycle, with black for class 0 (the
# usual background); further classes get colours spread by the bit-reversal trick of the
# PASCAL VOC palette, so any class index up to 65535 has a fixed colour.
_FIRST = [(0, 0, 0), (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
          (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def palette(num_classes):
    """A (num_classes, 3) uint8 colour table, the same for every run."""
    colours = list(_FIRST[:num_classes])
    for k in range(len(colours), num_classes):
        r = g = b = 0
        c = k
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        colours.append((r, g, b))
    return np.asarray(colours, dtype=np.uint8)


def colorize(labels, num_classes):
    """(H, W) class indices -> (H, W, 3) uint8 RGB; a label outside the classes (e.g. the
    ignore label) is drawn white."""
    labels = np.asarray(labels)
    if labels.dtype == np.uint8:  # one lookup in a 256-entry table, no temporaries
        table = np.full((256, 3), 255, dtype=np.uint8)
        table[:min(num_classes, 256)] = palette(min(num_classes, 256))
        return table[labels]
    table = np.concatenate([palette(num_classes), np.full((1, 3), 255, dtype=np.uint8)])
    return table[np.where((labels >= 0) & (labels < num_classes), labels, num_classes)]


def to_display(image, value_range=None):
    """A float (C, H, W) network input -> (H, W, 3) uint8 for viewing, its value range (by
    default its own min and max) stretched to 0..255."""
    image = np.asarray(image, dtype=np.float32)
    x = image[:3] if image.shape[0] >= 3 else np.repeat(image[:1], 3, axis=0)
    lo, hi = value_range if value_range is not None else (float(x.min()), float(x.max()))
    x = (x - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(x)
    return (x.transpose(1, 2, 0) + 0.5).astype(np.uint8)


def overlay(image, labels, num_classes, alpha=0.45, rows=256):
    """The palette colours of `labels` blended over the image (class 0 left clear), drawn
    `rows` rows at a time so that a huge image needs no full-size float temporaries."""
    image, labels = np.asarray(image), np.asarray(labels)
    shown = image[:3] if image.shape[0] >= 3 else image[:1]
    value_range = (float(shown.min()), float(shown.max()))
    out = np.empty(labels.shape + (3,), dtype=np.uint8)
    for r in range(0, labels.shape[0], rows):
        base = to_display(image[:, r:r + rows], value_range).astype(np.float32)
        colour = colorize(labels[r:r + rows], num_classes).astype(np.float32)
        a = np.where(labels[r:r + rows, :, None] > 0, np.float32(alpha), np.float32(0))
        out[r:r + rows] = (base * (1 - a) + colour * a + 0.5).astype(np.uint8)
    return out


# ---- the tiling ---------------------------------------------------------------------------

def _reflect(i, n):
    """Mirror indices into [0, n): ... 2 1 | 0 1 2 ... n-2 n-1 | n-2 ..."""
    if n == 1:
        return np.zeros_like(i)
    period = 2 * (n - 1)
    i = np.mod(i, period)
    return np.where(i > n - 1, period - i, i)


def _axis_tiles(length, tout, margin):
    """[(start, keep_from, keep_to)] along one axis: output tiles of size tout and the part of
    each (in image coordinates) that is kept; the kept parts cover [0, length) exactly once."""
    if length <= tout:
        return [(0, 0, length)]
    stride = tout - 2 * margin
    starts = list(range(0, length - tout, stride)) + [length - tout]
    tiles, kept = [], 0
    for k, s in enumerate(starts):
        end = length if k == len(starts) - 1 else s + tout - margin
        tiles.append((s, kept, end))
        kept = end
    return tiles


# The 8 symmetries of the square as (quarter turns k, mirror first): x -> rot90(flip?(x), k).
D4 = tuple((k, mirror) for mirror in (False, True) for k in range(4))


def d4_transform(a, k, mirror):
    """a (..., H, W) mirrored left-right if `mirror`, then turned k quarter turns anticlockwise."""
    return np.rot90(a[..., ::-1] if mirror else a, k, axes=(-2, -1))


def d4_inverse(a, k, mirror):
    """Undoes d4_transform(., k, mirror): turned back, then mirrored back."""
    a = np.rot90(a, -k, axes=(-2, -1))
    return a[..., ::-1] if mirror else a


def softmax(logits, axis=1):
    """Host softmax over the class axis, shifted by the maximum (no overflow)."""
    e = np.exp(logits - logits.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


class Tiler:
    """Runs `model` over images of any size tile by tile (see the module docstring).

    tile: the input tile size (int or (h, w)), checked against the model; margin: pixels
    dropped at each edge of an output tile (default: tout // 8 for 'same' models, 0 for
    'valid'); batch_size: tiles per forward pass; tta: average the softmax over the 8 D4
    transforms of each image (see the module docstring).
    """

    def __init__(self, model, tile, margin=None, batch_size=4, tta=False):
        self.model = model
        self.tin = (int(tile), int(tile)) if np.isscalar(tile) else tuple(int(t) for t in tile)
        self.tout = model.check_input_size(*self.tin)
        self.border = tuple((i - o) // 2 for i, o in zip(self.tin, self.tout))
        if margin is None:
            margin = 0 if model.config["padding"] == "valid" else min(self.tout) // 8
        if not 0 <= 2 * int(margin) < min(self.tout):
            raise ValueError(f"predict: margin {margin} leaves nothing of a {self.tout} output tile")
        self.margin = int(margin)
        self.batch_size = int(batch_size)
        self.tta = bool(tta)
        self.device = next(iter(model.parameters())).device

    def _tiles(self, H, W):
        """Every tile of an H x W image, row by row, as a pair of _axis_tiles entries:
        ((top, rows kept from, to), (left, columns kept from, to))."""
        rows = _axis_tiles(H, self.tout[0], self.margin)
        cols = _axis_tiles(W, self.tout[1], self.margin)
        return [(r, c) for r in rows for c in cols]

    def _input_tile(self, image, top, left, out):
        # image: (C, H, W) -> out: (C, tin_h, tin_w), mirrored where the window leaves the image
        _, H, W = image.shape
        ys = _reflect(np.arange(top - self.border[0], top - self.border[0] + self.tin[0]), H)
        xs = _reflect(np.arange(left - self.border[1], left - self.border[1] + self.tin[1]), W)
        out[...] = image[:, ys[:, None], xs[None, :]]

    def count(self, H, W):
        """The number of tiles that run() passes through the model for an H x W image; with
        TTA, for all 8 transforms, of which 4 turn it a quarter (to W x H)."""
        n = len(self._tiles(H, W))
        return 4 * (n + len(self._tiles(W, H))) if self.tta else n

    def run(self, images, logits=False, progress=None):
        """images: float32 (N, C, H, W) on the host -> labels (N, H, W) (uint8 up to 256 classes,
        else int32), or with logits=True the class scores float32 (N, K, H, W): the model's
        logits, or with TTA the log of the averaged probabilities (whose softmax they are).
        progress: called with the number of tiles done after each forward pass (a progress
        bar's update; count() gives the total)."""
        images = np.asarray(images, dtype=np.float32)
        if self.tta:
            N, _, H, W = images.shape
            probs = np.zeros((N, self.model.config["num_classes"], H, W), np.float32)
            for k, mirror in D4:  # predict the transformed image, transform the softmax back
                x = np.ascontiguousarray(d4_transform(images, k, mirror))
                probs += d4_inverse(softmax(self._run(x, True, progress)), k, mirror)
            probs /= len(D4)
            if logits:
                return np.log(np.maximum(probs, np.finfo(np.float32).tiny)).astype(np.float32)
            K = self.model.config["num_classes"]
            return probs.argmax(axis=1).astype(np.uint8 if K <= 256 else np.int32)
        return self._run(images, logits, progress)

    def _run(self, images, logits, progress):
        # images: (N, C, H, W) -> labels (N, H, W) or scores (N, K, H, W), one pass, tile by tile
        N, _, H, W = images.shape
        K = self.model.config["num_classes"]
        shape, dtype = ((N, K, H, W), np.float32) if logits else ((N, H, W), np.uint8 if K <= 256 else np.int32)
        out = np.empty(shape, dtype=dtype)  # every tile writes its kept part straight into place
        jobs = [(n, r, c) for n in range(N) for r, c in self._tiles(H, W)]
        was_training = self.model.training
        self.model.eval()
        try:
            with no_grad():
                for k in range(0, len(jobs), self.batch_size):
                    chunk = jobs[k:k + self.batch_size]
                    x = np.empty((len(chunk), images.shape[1]) + self.tin, dtype=np.float32)  # C-contiguous
                    for b, (n, r, c) in enumerate(chunk):
                        self._input_tile(images[n], r[0], c[0], out=x[b])
                    # x: (B, C, tin_h, tin_w) -> y: (B, K, tout_h, tout_w)
                    y = self.model(tensor(x, device=self.device)).data
                    y = y if logits else y.argmax(axis=1)  # labels cross the bus, not scores
                    y = backend.to_numpy(y)
                    for b, (n, (top, r0, r1), (left, c0, c1)) in enumerate(chunk):
                        out[n, ..., r0:r1, c0:c1] = y[b, ..., r0 - top:r1 - top, c0 - left:c1 - left]
                    if progress is not None:
                        progress(len(chunk))
        finally:
            self.model.train(was_training)
        return out


# ---- models from checkpoints, and the predict command ---------------------------------------

def load_model(path, device="cpu"):
    """(model in eval mode on `device`, Checkpoint) from a checkpoint file."""
    ckpt = read_checkpoint(path)
    return UNet.from_checkpoint(ckpt, device), ckpt


def check_tile(model, tile):
    """The --tile option: None (auto_tile chooses) or an input size the model accepts."""
    if tile is not None:
        try:
            model.check_input_size(tile, tile)
        except ValueError as e:
            raise ValueError(f"--tile {tile} does not fit the model: {e}") from None


def auto_tile(model, image_hw, at_least):
    """The input tile for an image of size image_hw: at least `at_least` (the training crop)
    and 256 pixels, since fewer, larger tiles waste less on overlap, but no larger than the
    image needs; rounded up to a size the model accepts."""
    want = min(max(int(at_least), 256), max(image_hw))
    return model.nearest_input_sizes(want)[-1]


def list_inputs(path):
    """The image files to predict: `path` itself, or the images in the folder `path`."""
    path = pathlib.Path(path)
    if path.is_dir():
        return data.list_images(path, who=f"--input {path}")
    if not path.exists():
        raise ValueError(f"--input {path} does not exist")
    return [path]


def save_mask(labels, num_classes, out_dir, stem, image=None):
    """Write <stem>_mask.png (indices), <stem>_color.png and, given the image, <stem>_overlay.png."""
    out_dir = pathlib.Path(out_dir)
    index = labels.astype(np.uint8 if num_classes <= 256 else np.uint16)
    Image.fromarray(index).save(out_dir / f"{stem}_mask.png")
    Image.fromarray(colorize(labels, num_classes)).save(out_dir / f"{stem}_color.png")
    if image is not None:
        Image.fromarray(overlay(image, labels, num_classes)).save(out_dir / f"{stem}_overlay.png")


def predict_files(model_path, inputs, out_dir, tile=None, overlay_images=False, device="cpu", batch_size=4,
                  progress=None, tta=False, bar=False):
    """Predict every image of `inputs` (a file or a folder) into `out_dir`; returns the written
    stems. tile: the input tile size, by default auto_tile's choice for each image; tta: average
    over the 8 flips and quarter turns. progress(path, labels) is called after each image;
    `bar` shows a progress bar over the tiles of all the images (their sizes are read from the
    file headers first)."""
    model, ckpt = load_model(model_path, device)
    check_tile(model, tile)
    tc = ckpt.train_config or {}
    channels = model.config["in_channels"]
    normalize = tc.get("normalize", "image")
    files = list_inputs(inputs)
    scale = tc.get("scale")  # a model trained on resized images sees them resized the same way
    tilers = []  # one per file, for the size the model sees it at
    for path in files:
        with open_image(path, "image") as im:
            hw = im.size[::-1]
        if scale is not None and scale != 1:
            hw = data.scaled_size(hw, scale)
        size = tile if tile is not None else auto_tile(model, hw, tc.get("image_size") or 0)
        tilers.append((Tiler(model, size, batch_size=batch_size, tta=tta), hw))
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    total = sum(tiler.count(*hw) for tiler, hw in tilers)
    with tqdm(total=total, unit="tile", disable=not bar, dynamic_ncols=True, leave=False) as tiles_bar:
        for k, (path, (tiler, _)) in enumerate(zip(files, tilers)):
            tiles_bar.set_description(f"image {k + 1}/{len(files)} {path.name}")
            image = data.read_image(path, channels=channels, normalize=normalize, scale=scale)
            if image.shape[0] != channels:
                raise ValueError(f"predict: image {path} has {image.shape[0]} channels, the model takes {channels}")
            labels = tiler.run(image[None], progress=tiles_bar.update)[0]
            if scale is not None:  # back to the image's own size
                image = data.read_image(path, channels=channels, normalize=normalize)
                labels = data.resize_labels(labels, image.shape[1:])
            save_mask(labels, model.config["num_classes"], out_dir, path.stem, image if overlay_images else None)
            if progress is not None:
                progress(path, labels)
    return [p.stem for p in files]
