"""minunet.data.augment: random geometric augmentation of an image with its mask (and weights).

The U-Net paper trains on few images and leans on augmentation, above all on smooth elastic
deformations. Here every random choice comes from a generator the caller passes (the
DataLoader gives item i of epoch e its own, so augmentation is reproducible whatever the
thread timing). The resampling is scipy.ndimage's: `zoom` with cubic splines turns a coarse
grid of random displacements into a smooth field (through `zoom_matrix`), and
`map_coordinates` reads the image (bilinearly) and the mask (nearest pixel) at the displaced
positions, mirroring positions that fall outside the image back into it.
"""
import functools

import numpy as np
from scipy import ndimage


@functools.lru_cache(maxsize=64)
def zoom_matrix(n_out, n_in):
    """The (n_out, n_in) matrix M of scipy.ndimage.zoom's cubic-spline resampling of n_in evenly
    spaced samples to n_out places, the first and last on the ends (grid_mode=False; beyond the
    ends the edge sample repeats). Zooming is linear, so zooming the identity gives M, and as
    the 2-D spline is the product of 1-D ones, M_h @ grid @ M_w.T is ndimage.zoom(grid), at the
    cost of two small matrix products instead of 16 taps per output place."""
    m = ndimage.zoom(np.eye(n_in), (n_out / n_in, 1), order=3, mode="nearest", grid_mode=False)
    if m.shape != (n_out, n_in):
        raise ValueError(f"zoom_matrix: cannot zoom {n_in} samples to exactly {n_out}")
    m.flags.writeable = False  # shared by every caller through the cache
    return m


def warp(a, sy, sx, order):
    """a (..., H, W) read at the float positions (sy, sx) (each (h, w)) -> (..., h, w) of a's dtype.

    order 1 interpolates bilinearly (images, weight maps); order 0 takes the nearest pixel (label
    masks, whose values must stay labels). A position outside the image is mirrored back into
    it about the edge pixels (..., 1, 0, 1, ..., H-2, H-1, H-2, ...)."""
    planes = a.reshape(-1, *a.shape[-2:])
    out = np.empty((len(planes), *sy.shape), a.dtype)
    for plane, o in zip(planes, out):
        ndimage.map_coordinates(plane, (sy, sx), output=o, order=order, mode="mirror")
    return out.reshape(*a.shape[:-2], *sy.shape)


class Augment:
    """Random geometric augmentation applied to an image and its mask (and weight map) together.

    >>> aug = Augment(flip=True, rot90=True, crop=256, elastic=True)
    >>> x, y = aug(x, y, rng=np.random.default_rng(0))    # x: (C, H, W) -> (C, 256, 256)

    In order, each drawn from `rng` (or the Augment's own generator, seeded by `seed`):
      crop     a random window of size `crop` (int or (h, w)); None keeps the whole image.
      elastic  the U-Net paper's deformation: displacement vectors drawn from N(0,
               elastic_sigma^2) pixels on a coarse elastic_grid x elastic_grid grid over the
               window (its corners on the window's corners), zoomed to every pixel with cubic
               splines. Output pixel p reads the input at p + displacement(p): images and
               weight maps bilinearly, masks from the nearest pixel (labels stay labels).
               Positions outside the image are mirrored back into it, and a cropped window
               reads real context from around it.
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
            g = self.elastic_grid
            grid = rng.normal(0.0, self.elastic_sigma, size=(2, g, g))
            dy, dx = zoom_matrix(h, g) @ grid @ zoom_matrix(w, g).T  # (h, w) each
            sy, sx = top + np.arange(h)[:, None] + dy, left + np.arange(w)[None, :] + dx
            image, mask = warp(image, sy, sx, order=1), warp(mask, sy, sx, order=0)
            weight = None if weight is None else warp(weight, sy, sx, order=1)
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
