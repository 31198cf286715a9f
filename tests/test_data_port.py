"""TEMPORARY: minunet.data's scipy.ndimage port against the hand-written code it replaced.

The old implementations (copied verbatim from minunet/data.py as of 63f82fb) sit below; each
test runs old and new on the same inputs. This file goes once the port is in: it is the
record that the port keeps the results (exactly, or within the stated tolerance).
"""
import math

import numba
import numpy as np
import pytest

import minunet.data as data
from minunet.data import augment, synthetic, weight_map

# ----------------------------------------------------------------------- the old code, verbatim

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




def old_synthetic_item(ds, i):
    """SyntheticDataset.__getitem__ as it was (Keys-cubic texture, hand-written smoothing)."""
    rng = np.random.default_rng([ds.seed, i])
    h, w = ds.image_size
    c = ds.in_channels
    up_h, up_w = _cubic_weights(h, 6).astype(np.float32), _cubic_weights(w, 6).astype(np.float32)
    g = rng.normal(0.0, 0.5, size=(c, 2))
    x = (rng.uniform(-0.5, 0.5, size=(c, 1, 1))
         + g[:, 0, None, None] * (ds._yy / h - 0.5) + g[:, 1, None, None] * (ds._xx / w - 0.5)
         + 0.3 * (up_h @ rng.normal(size=(c, 6, 6)) @ up_w.T))
    x = x.astype(np.float32)
    y = np.zeros((h, w), dtype=np.int64)
    for kind, cy, cx, r, angle, aspect in ds._layout(rng):
        inside, (y0, y1, x0, x1) = ds._render(kind, cy, cx, r, angle, aspect)
        amplitude = rng.uniform(0.6, 1.2) * rng.choice((-1.0, 1.0))
        colour = amplitude * (1.0 if c == 1 else synthetic._unit(rng.normal(size=c)) * math.sqrt(c))
        window = x[:, y0:y1, x0:x1]
        window[:, inside] += np.asarray(colour, dtype=np.float32).reshape(c, 1)
        y[y0:y1, x0:x1][inside] = kind
    x = _smooth3(x) + rng.normal(0.0, 0.15, size=x.shape)
    x = (x - x.mean(axis=(1, 2), keepdims=True)) / (x.std(axis=(1, 2), keepdims=True) + 1e-6)
    return x.astype(np.float32), y


# ----------------------------------------------------------------------------- comparisons

def test_smoothing_is_unchanged(rng):
    x = rng.standard_normal((3, 17, 23)).astype(np.float32)
    new = x
    for axis in (1, 2):
        new = synthetic.ndimage.correlate1d(new, [0.25, 0.5, 0.25], axis=axis, mode="nearest")
    np.testing.assert_allclose(new, _smooth3(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("n_in, n_out", [(6, 64), (6, 40), (3, 256), (3, 24)])
def test_cubic_zoom_keeps_the_knots_and_stays_close(rng, n_in, n_out):
    """Keys' cubic convolution became scipy's cubic spline: both pass through the knots (the
    grid's values at evenly spaced places, corners on corners); between them they differ, by
    at most a fifth of the grid's largest value on these random grids."""
    grid = rng.standard_normal((n_in, n_in))
    m = _cubic_weights(n_out, n_in)
    old = m @ grid @ m.T
    new = synthetic.ndimage.zoom(grid, n_out / n_in, order=3, mode="nearest", grid_mode=False)
    assert new.shape == old.shape
    z = augment.zoom_matrix(n_out, n_in)
    np.testing.assert_allclose(z @ grid @ z.T, new, atol=1e-12)  # the separable form is the same zoom
    knots = [round(k * (n_out - 1) / (n_in - 1)) for k in range(n_in)]
    exact = [k for k, p in enumerate(knots) if p * (n_in - 1) == k * (n_out - 1)]
    rows = np.ix_([knots[k] for k in exact], [knots[k] for k in exact])
    np.testing.assert_allclose(new[rows], old[rows], atol=1e-12)
    assert np.abs(new - old).max() < 0.2 * np.abs(grid).max()


def test_bilinear_and_nearest_sampling_are_unchanged(rng):
    a = rng.standard_normal((2, 13, 9)).astype(np.float32)
    mask = rng.integers(0, 5, (13, 9))
    sy = rng.uniform(-6, 19, (20, 30))   # inside and far outside on both sides: mirrored
    sx = rng.uniform(-5, 14, (20, 30))
    ry, rx = _reflect(sy, 13), _reflect(sx, 9)
    np.testing.assert_allclose(augment.warp(a, sy, sx, order=1), _bilinear(a, ry, rx), rtol=0, atol=2e-6)
    np.testing.assert_array_equal(augment.warp(mask, sy, sx, order=0),
                                  mask[np.rint(ry).astype(np.int64), np.rint(rx).astype(np.int64)])


@pytest.mark.parametrize("connectivity", [4, 8])
def test_connected_components_are_unchanged(rng, connectivity):
    for p in (0.3, 0.55, 0.7):
        fg = rng.random((60, 47)) < p
        labels, k = _label_components(fg, connectivity)
        new, k_new = data.connected_components(fg, connectivity)
        assert k_new == k and new.dtype == np.int32
        np.testing.assert_array_equal(new, labels)


def test_two_nearest_distances_are_unchanged(rng):
    for p, reach in ((0.05, 5), (0.3, 27), (0.5, 3)):
        labels, k = _label_components(rng.random((50, 64)) < p, 4)
        d1, d2 = _two_nearest(labels, k, reach)
        n1, n2 = weight_map._two_nearest(labels, reach)
        np.testing.assert_array_equal(np.isinf(n1), np.isinf(d1))
        np.testing.assert_array_equal(np.isinf(n2), np.isinf(d2))
        np.testing.assert_allclose(n1[np.isfinite(d1)], d1[np.isfinite(d1)], rtol=1e-12)
        np.testing.assert_allclose(n2[np.isfinite(d2)], d2[np.isfinite(d2)], rtol=1e-12)


def test_synthetic_masks_are_unchanged_and_images_close():
    for ds in (data.SyntheticDataset(8, 64, num_classes=5), data.SyntheticDataset(4, (40, 96), 3, in_channels=3, seed=2)):
        for i in range(len(ds)):
            (x, y), (x_old, y_old) = ds[i], old_synthetic_item(ds, i)
            np.testing.assert_array_equal(y, y_old)
            assert x.dtype == x_old.dtype and x.shape == x_old.shape
            corr = np.corrcoef(x.ravel(), x_old.ravel())[0, 1]
            assert corr > 0.99, f"item {i}: new and old images correlate {corr:.3f}"


@pytest.mark.data
def test_isbi_weight_maps_are_unchanged(data_dir):
    ds = data.isbi2012(data_dir / "isbi2012")
    for i in (0, 29):
        _, y = ds[i]
        labels, k = _label_components(y == 1, 4)
        reach = int(math.ceil(5.0 * math.sqrt(2 * math.log(1e6))))
        d1, d2 = _two_nearest(labels, k, reach)
        old = np.zeros(y.shape)
        near = np.isfinite(d2)
        old[near] = 10.0 * np.exp(-(d1[near] + d2[near]) ** 2 / (2.0 * 5.0**2))
        np.testing.assert_allclose(data.unet_weight_map(y, w0=10.0, sigma=5.0), 1 + old, rtol=1e-6)
