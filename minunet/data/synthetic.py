"""minunet.data.synthetic: the built-in dataset, drawn procedurally (no download).

Item i of a SyntheticDataset comes from its own generator, `numpy.random.default_rng([seed, i])`,
so it is the same on every machine and in every run, whatever order the items are asked for.
Each image is a smooth textured background (a level, a linear gradient and low-frequency
noise: a 6x6 grid of random values zoomed to the image with cubic splines, see
minunet.data.augment.zoom_matrix) with a few shapes
pasted on: class 1 discs, 2 rotated rectangles, 3 triangles, 4 rings (as many kinds as
`num_classes - 1`, at least one of each per image). A shape's contrast has a random size and
sign, the whole image is smoothed and then Gaussian noise is added, so no intensity
threshold separates the classes: the network must use shape and context.
"""
import math

import numpy as np
from scipy import ndimage

from minunet.data.augment import zoom_matrix
from minunet.data.loader import check_index


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
        self._zoom_h, self._zoom_w = zoom_matrix(h, 6).astype(np.float32), zoom_matrix(w, 6).astype(np.float32)

    def __len__(self):
        return self.num_samples

    def __getitem__(self, i):
        i = check_index(i, self.num_samples, "SyntheticDataset")
        rng = np.random.default_rng([self.seed, i])
        h, w = self.image_size
        c = self.in_channels
        # background: a level, a linear gradient and a smooth random texture per channel
        # x: (C, H, W), float32 throughout
        g = rng.normal(0.0, 0.5, size=(c, 2))
        level = rng.uniform(-0.5, 0.5, size=(c, 1, 1))
        texture = self._zoom_h @ rng.normal(size=(c, 6, 6)) @ self._zoom_w.T  # the 6x6 grid spans the image
        x = (level + g[:, 0, None, None] * (self._yy / h - 0.5) + g[:, 1, None, None] * (self._xx / w - 0.5)
             + 0.3 * texture)
        x = x.astype(np.float32)
        y = np.zeros((h, w), dtype=np.int64)
        for kind, cy, cx, r, angle, aspect in self._layout(rng):
            inside, (y0, y1, x0, x1) = self._render(kind, cy, cx, r, angle, aspect)
            amplitude = rng.uniform(0.6, 1.2) * rng.choice((-1.0, 1.0))
            colour = amplitude * (1.0 if c == 1 else _unit(rng.normal(size=c)) * math.sqrt(c))
            window = x[:, y0:y1, x0:x1]
            window[:, inside] += np.asarray(colour, dtype=np.float32).reshape(c, 1)
            y[y0:y1, x0:x1][inside] = kind
        # a [1, 2, 1] / 4 blur along each image axis (edges repeated), then noise
        for axis in (1, 2):
            x = ndimage.correlate1d(x, [0.25, 0.5, 0.25], axis=axis, mode="nearest")
        x = x + rng.normal(0.0, 0.15, size=x.shape)
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
