"""minunet.data.weight_map: the U-Net paper's border-emphasising loss weights.

Ronneberger et al. (2015) weight the loss of each pixel so that the thin background gaps
between touching cells, which decide whether two cells are told apart, count much more than
the rest, and so that classes of different sizes count alike. `unet_weight_map` computes
those weights from a label mask; the image algorithms underneath come from scipy.ndimage:
`label` (connected components, the "cells") and `distance_transform_edt` (Euclidean
distances to each cell).
"""
import math

import numpy as np
from scipy import ndimage


def connected_components(mask, connectivity=4):
    """Label the connected components of a boolean (H, W) mask: (labels int32 (H, W), count).
    0 marks the background; components are numbered 1.. in raster order of their first pixel
    (scipy.ndimage.label)."""
    if connectivity not in (4, 8):
        raise ValueError(f"connected_components: connectivity={connectivity}; expected 4 or 8")
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"connected_components: expected an (H, W) mask, got shape {mask.shape}")
    structure = ndimage.generate_binary_structure(2, 1 if connectivity == 4 else 2)
    labels, k = ndimage.label(mask.astype(bool), structure, output=np.int32)
    return labels, int(k)


def _two_nearest(labels, reach):
    """Distances from every pixel to the nearest and the second-nearest component of `labels`:
    (d1, d2) float64 (H, W), inf where fewer components lie within `reach` pixels of the
    component's bounding box. Each component gets an exact Euclidean distance transform over
    its bounding box grown by `reach` (which holds the whole component, so the distances
    inside it are exact)."""
    H, W = labels.shape
    d1, d2 = np.full((H, W), np.inf), np.full((H, W), np.inf)
    for c, (rows, cols) in enumerate(ndimage.find_objects(labels), 1):
        window = (slice(max(0, rows.start - reach), min(H, rows.stop + reach)),
                  slice(max(0, cols.start - reach), min(W, cols.stop + reach)))
        d = ndimage.distance_transform_edt(labels[window] != c)
        first, second = d1[window], d2[window]                  # views: updated in place
        np.minimum(second, np.maximum(first, d), out=second)   # d between first and second, or above
        np.minimum(first, d, out=first)
    return d1, d2


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
    labels, _ = connected_components(y == foreground, connectivity)
    reach = int(math.ceil(sigma * math.sqrt(2 * math.log(1e6))))
    d1, d2 = _two_nearest(labels, reach)
    border = np.zeros(y.shape)
    near = np.isfinite(d2)
    border[near] = w0 * np.exp(-(d1[near] + d2[near]) ** 2 / (2.0 * sigma**2))
    return (wc + border).astype(np.float32)


