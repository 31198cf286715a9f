"""minunet.data: synthetic and folder datasets, augmentation, weight maps, splits, the loader.

Folder tests write tiny images into tmp_path; the `data` tests load the real datasets of
../shared/data (skipped where absent) through their recipes (minunet/data/recipes.py).
"""
import json
import threading

import numpy as np
import pytest
from PIL import Image

from minunet.data import (Augment, DataLoader, FolderDataset, SyntheticDataset, camvid, connected_components,
                          drosophila_vnc, isbi2012, read_image, resize_image, resize_labels, scaled_size,
                          split_indices, unet_weight_map)


def save(path, a):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)


# ---------------------------------------------------------------------------- synthetic

def test_synthetic_is_deterministic_by_seed_and_index():
    a, b = SyntheticDataset(6, 48, num_classes=5, seed=3), SyntheticDataset(6, 48, num_classes=5, seed=3)
    for i in (4, 0, 4):  # any order, any number of times
        (xa, ya), (xb, yb) = a[i], b[i]
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    assert not np.array_equal(a[0][0], a[1][0])
    assert not np.array_equal(a[0][0], SyntheticDataset(6, 48, num_classes=5, seed=4)[0][0])


def test_synthetic_values_and_classes():
    ds = SyntheticDataset(4, (40, 56), num_classes=5, in_channels=3)
    assert len(ds) == 4 and ds.class_names == ("background", "disc", "rectangle", "triangle", "ring")
    seen = set()
    for x, y in ds:
        assert x.dtype == np.float32 and x.shape == (3, 40, 56)
        assert y.dtype == np.int64 and y.shape == (40, 56)
        np.testing.assert_allclose(x.mean(axis=(1, 2)), 0, atol=1e-4)
        np.testing.assert_allclose(x.std(axis=(1, 2)), 1, atol=1e-3)
        assert 0 <= y.min() and y.max() < 5
        seen |= set(np.unique(y).tolist())
    assert seen == {0, 1, 2, 3, 4}
    with pytest.raises(ValueError, match="num_classes"):
        SyntheticDataset(4, 64, num_classes=6)
    with pytest.raises(IndexError):
        ds[4]


# ---------------------------------------------------------------------------- folders

@pytest.fixture
def gray_set(tmp_path):
    """Three 6x5 gray images; mask values 0..2; mask name = 'lab_' + stem."""
    rng = np.random.default_rng(0)
    images, masks = {}, {}
    for stem in ("1", "10", "2"):
        images[stem] = rng.integers(0, 256, (6, 5), dtype=np.uint8)
        masks[stem] = rng.integers(0, 3, (6, 5), dtype=np.uint8)
        save(tmp_path / "img" / f"{stem}.png", images[stem])
        save(tmp_path / "lab" / f"lab_{stem}.png", masks[stem])
    return tmp_path, images, masks


def test_stem_pairing_with_prefix_in_natural_order(gray_set):
    root, images, masks = gray_set
    ds = FolderDataset(root / "img", root / "lab", mask_prefix="lab_", num_classes=3)
    assert ds.names == ["1", "2", "10"] and ds.in_channels == 1 and ds.num_classes == 3
    for i, stem in enumerate(ds.names):
        x, y = ds[i]
        assert x.dtype == np.float32 and x.shape == (1, 6, 5) and y.dtype == np.int64
        np.testing.assert_allclose(x[0], images[stem] / 255.0, rtol=1e-6)
        np.testing.assert_array_equal(y, masks[stem])


def test_sorted_pairing(tmp_path):
    for k in range(3):
        save(tmp_path / "a" / f"img_{k:02d}.tif", np.full((4, 4), 10 * k, np.uint8))
        save(tmp_path / "b" / f"z{k}.png", np.full((4, 4), k, np.uint8))
    ds = FolderDataset(tmp_path / "a", tmp_path / "b", pairing="sorted", num_classes=3)
    for k in range(3):
        x, y = ds[k]
        assert np.all(y == k) and np.allclose(x, 10 * k / 255)


def test_16bit_rgb_channels_and_normalize(tmp_path):
    rng = np.random.default_rng(1)
    deep = rng.integers(0, 65536, (5, 7), dtype=np.uint16)
    save(tmp_path / "i16" / "a.tif", deep)
    save(tmp_path / "m" / "a.png", np.zeros((5, 7), np.uint8))
    x, _ = FolderDataset(tmp_path / "i16", tmp_path / "m", num_classes=2)[0]
    np.testing.assert_allclose(x[0], deep / 65535.0, rtol=1e-6)
    x3, _ = FolderDataset(tmp_path / "i16", tmp_path / "m", num_classes=2, channels=3)[0]
    assert x3.shape == (3, 5, 7) and np.array_equal(x3[0], x3[2])

    rgb = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    save(tmp_path / "rgb" / "a.png", rgb)
    ds = FolderDataset(tmp_path / "rgb", tmp_path / "m", num_classes=2)
    assert ds.in_channels == 3
    np.testing.assert_allclose(ds[0][0], rgb.transpose(2, 0, 1) / 255.0, rtol=1e-6)
    gray, _ = FolderDataset(tmp_path / "rgb", tmp_path / "m", num_classes=2, channels=1)[0]
    np.testing.assert_allclose(gray[0], rgb @ np.array([0.299, 0.587, 0.114]) / 255.0, atol=1e-6)
    np.testing.assert_array_equal(read_image(tmp_path / "rgb" / "a.png", channels=1), gray)
    z, _ = FolderDataset(tmp_path / "rgb", tmp_path / "m", num_classes=2, normalize="image")[0]
    np.testing.assert_allclose(z.mean(axis=(1, 2)), 0, atol=1e-5)
    np.testing.assert_allclose(z.std(axis=(1, 2)), 1, atol=1e-3)


def test_scale_resizes_images_by_area_and_masks_by_nearest(tmp_path):
    # 2x2 blocks of one value: halving averages each block exactly and keeps each label
    rng = np.random.default_rng(3)
    blocks = rng.integers(0, 256, (3, 5, 3), dtype=np.uint8)
    labels = rng.integers(0, 4, (3, 5), dtype=np.uint8)
    save(tmp_path / "img" / "a.png", np.kron(blocks, np.ones((2, 2, 1), np.uint8)))
    save(tmp_path / "lab" / "a.png", np.kron(labels, np.ones((2, 2), np.uint8)))
    x, y = FolderDataset(tmp_path / "img", tmp_path / "lab", num_classes=4, scale=0.5)[0]
    assert x.shape == (3, 3, 5) and y.shape == (3, 5)
    np.testing.assert_allclose(x, blocks.transpose(2, 0, 1) / 255.0, atol=1e-6)
    np.testing.assert_array_equal(y, labels)
    # shrinking averages areas: a checkerboard halves to its mean, a ramp to its pair means
    checker = (np.indices((8, 8)).sum(0) % 2 * 200).astype(np.uint16)
    np.testing.assert_array_equal(resize_image(checker, (4, 4)), np.full((4, 4), 100, np.uint16))
    ramp = np.tile(np.arange(12, dtype=np.float32), (6, 1))
    np.testing.assert_allclose(resize_image(ramp, (3, 6)), np.tile(2 * np.arange(6) + 0.5, (3, 1)), atol=1e-5)
    np.testing.assert_allclose(resize_image(ramp, (12, 24))[:, 1:-1], np.tile(np.arange(1, 23) / 2 - 0.25, (12, 1)),
                               atol=1e-5)  # bilinear: output x reads input (x + 1/2) / 2 - 1/2
    # labels take the pixel nearest each output centre; halves round up (5 x 7 -> 3 x 4)
    a = np.arange(35).reshape(5, 7)
    assert scaled_size(a.shape, 0.5) == (3, 4) and scaled_size(a.shape, 0.01) == (1, 1)
    np.testing.assert_array_equal(resize_labels(a, (3, 4)), a[np.ix_([0, 2, 4], [0, 2, 4, 6])])
    assert np.array_equal(resize_labels(a, (10, 14))[::2, ::2], a)
    np.testing.assert_array_equal(read_image(tmp_path / "img" / "a.png", scale=0.5), x)
    with pytest.raises(ValueError, match="scale=0"):
        FolderDataset(tmp_path / "img", tmp_path / "lab", num_classes=4, scale=0)


def test_mask_modes(tmp_path):
    img = np.zeros((4, 6), np.uint8)
    save(tmp_path / "img" / "a.png", img)

    def load(mask, **kw):
        save(tmp_path / "lab" / "a.png", mask)
        return FolderDataset(tmp_path / "img", tmp_path / "lab", **kw)

    bits = np.arange(24).reshape(4, 6) % 3 == 0
    y = load(np.where(bits, 255, 0).astype(np.uint8), mask_mode="binary")[0][1]
    np.testing.assert_array_equal(y, bits)
    y = load(bits, mask_mode="binary")[0][1]  # a bool array saves as a 1-bit PNG
    np.testing.assert_array_equal(y, bits)

    levels = (0, 32, 159, 255)
    want = np.arange(24).reshape(4, 6) % 4
    y = load(np.asarray(levels, np.uint8)[want], mask_mode="gray", gray_levels=levels)[0][1]
    np.testing.assert_array_equal(y, want)

    colours = [[0, 0, 0], [128, 64, 128], [60, 40, 222]]
    (tmp_path / "pal.json").write_text(json.dumps({"void": colours[0], "road": colours[1], "walk": colours[2]}))
    (tmp_path / "pal.txt").write_text("# r g b name\n0 0 0 void\n128,64,128 road\n\n60 40 222 walk\n")
    rgb = np.asarray(colours, np.uint8)[want % 3]
    for pal in ("pal.json", "pal.txt"):
        ds = load(rgb, mask_mode="palette", palette=tmp_path / pal)
        assert ds.num_classes == 3 and ds.class_names == ("void", "road", "walk")
        np.testing.assert_array_equal(ds[0][1], want % 3)
    rgb[0, 1] = (1, 2, 3)  # colours not in the palette (this and black) -> the ignore label
    expected = np.where(want % 3 == 0, 255, want % 3 - 1)
    expected[0, 1] = 255
    y = load(rgb, mask_mode="palette", palette=colours[1:], ignore_index=255)[0][1]
    np.testing.assert_array_equal(y, expected)

    index = (want + 9).astype(np.uint8) % 12  # 9, 10, 11, 0: 11 is the void label
    y = load(index, num_classes=11, ignore_index=11)[0][1]
    np.testing.assert_array_equal(y, index)


def test_clear_errors(tmp_path, gray_set):
    root, _, _ = gray_set
    with pytest.raises(ValueError, match=r"without a mask: 1.png, 2.png, 10.png.*without an image: lab_1.png"):
        FolderDataset(root / "img", root / "lab", num_classes=3)
    (root / "lab" / "extra.png").write_bytes((root / "lab" / "lab_1.png").read_bytes())
    with pytest.raises(ValueError, match="as many masks as images"):
        FolderDataset(root / "img", root / "lab", pairing="sorted", num_classes=3)

    save(tmp_path / "s" / "img" / "a.png", np.zeros((4, 4), np.uint8))
    save(tmp_path / "s" / "lab" / "a.png", np.zeros((4, 5), np.uint8))
    with pytest.raises(ValueError, match=r"a.png is 4x4 but mask .*a.png is 5x4"):
        FolderDataset(tmp_path / "s" / "img", tmp_path / "s" / "lab", num_classes=2)

    (tmp_path / "c" / "img").mkdir(parents=True)
    (tmp_path / "c" / "img" / "a.png").write_bytes(b"not a png at all")
    save(tmp_path / "c" / "lab" / "a.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match=r"cannot read image .*c/img/a.png"):
        FolderDataset(tmp_path / "c" / "img", tmp_path / "c" / "lab", num_classes=2)
    save(tmp_path / "c" / "img" / "a.png", np.random.default_rng(0).integers(0, 256, (64, 64), np.uint8))
    save(tmp_path / "c" / "lab" / "a.png", np.zeros((64, 64), np.uint8))
    whole = (tmp_path / "c" / "img" / "a.png").read_bytes()  # keep the header, cut the pixel data
    (tmp_path / "c" / "img" / "a.png").write_bytes(whole[:len(whole) // 2])
    ds = FolderDataset(tmp_path / "c" / "img", tmp_path / "c" / "lab", num_classes=2)
    with pytest.raises(ValueError, match=r"cannot read image .*c/img/a.png"):
        ds[0]

    save(tmp_path / "v" / "img" / "a.png", np.zeros((3, 3), np.uint8))
    save(tmp_path / "v" / "lab" / "a.png", np.array([[0, 1, 7], [2, 200, 0], [11, 0, 0]], np.uint8))
    with pytest.raises(ValueError, match=r"v/lab/a.png holds values outside the classes 0..2 and ignore_index 11: \[7, 200\]"):
        FolderDataset(tmp_path / "v" / "img", tmp_path / "v" / "lab", num_classes=3, ignore_index=11)[0]
    with pytest.raises(ValueError, match=r"outside gray_levels: \[1, 2, 7, 11, 200\]"):
        FolderDataset(tmp_path / "v" / "img", tmp_path / "v" / "lab", mask_mode="gray", gray_levels=[0, 255])[0]
    with pytest.raises(ValueError, match=r"outside the palette colours: \[\(1, 1, 1\)"):
        FolderDataset(tmp_path / "v" / "img", tmp_path / "v" / "lab", mask_mode="palette", palette=[(0, 0, 0)])[0]
    with pytest.raises(ValueError, match="needs num_classes"):
        FolderDataset(tmp_path / "v" / "img", tmp_path / "v" / "lab")
    with pytest.raises(ValueError, match="ignore_index=1 is one of the classes"):
        FolderDataset(tmp_path / "v" / "img", tmp_path / "v" / "lab", num_classes=3, ignore_index=1)


# ---------------------------------------------------------------------------- augmentation

@pytest.mark.parametrize("elastic", [False, True])
def test_augment_keeps_image_mask_and_weight_aligned(elastic):
    # channel 0 holds each pixel's row, channel 1 its column, and the mask its id row * W + col:
    # bilinear sampling reproduces coordinates exactly, so the image must round to the mask's pixel
    H, W = 40, 52
    rows, cols = np.mgrid[0:H, 0:W]
    image = np.stack([rows, cols]).astype(np.float32)
    mask = (rows * W + cols).astype(np.int64)
    aug = Augment(crop=(24, 24), elastic=elastic, elastic_sigma=4.0)
    moved = 0
    for seed in range(6):
        x, y, w = aug(image, mask, image[0], rng=np.random.default_rng(seed))
        assert x.shape == (2, 24, 24) and y.shape == (24, 24) and w.shape == (24, 24)
        np.testing.assert_array_equal(np.rint(x[0]), y // W)
        np.testing.assert_array_equal(np.rint(x[1]), y % W)
        np.testing.assert_allclose(w, x[0], atol=1e-4)
        if not elastic:  # a crop of a flip/rotation: rows and columns stay whole pixels
            np.testing.assert_array_equal(x[0], y // W)
        moved += np.abs(x[0] - np.rint(x[0])).mean() > 0.05
        x2, y2, _ = aug(image, mask, image[0], rng=np.random.default_rng(seed))
        assert np.array_equal(x, x2) and np.array_equal(y, y2)
    assert (moved > 0) == elastic


def test_augment_elastic_keeps_labels_and_rectangles():
    rng = np.random.default_rng(0)
    mask = np.repeat(np.repeat(rng.choice([0, 3, 255], (6, 8)), 5, 0), 5, 1)  # blocks, 255 = ignore
    image = rng.normal(size=(1, 30, 40)).astype(np.float32)
    for seed in range(4):
        x, y = Augment(crop=(20, 30), elastic=True)(image, mask, rng=np.random.default_rng(seed))
        assert x.shape == (1, 20, 30) and y.shape == (20, 30)  # not square: rotations by 0 or 180 only
        assert set(np.unique(y)) <= {0, 3, 255}
    x, y = Augment(crop=24, elastic=True, elastic_sigma=0.0, flip=False, rot90=False)(image, mask, rng=np.random.default_rng(5))
    rng = np.random.default_rng(5)
    top, left = int(rng.integers(0, 7)), int(rng.integers(0, 17))
    np.testing.assert_allclose(x, image[:, top:top + 24, left:left + 24], atol=1e-5)
    with pytest.raises(ValueError, match="larger than the image"):
        Augment(crop=64)(image, mask)


# ---------------------------------------------------------------------------- weight map

def test_connected_components_connectivity():
    fg = np.array([[1, 0, 0], [0, 1, 1], [0, 0, 0], [1, 1, 0]], bool)
    labels, k = connected_components(fg)
    assert k == 3 and labels[1, 1] == labels[1, 2] == 2 and labels[3, 0] == labels[3, 1] == 3
    assert connected_components(fg, connectivity=8)[1] == 2


def brute_force_weights(mask, w0, sigma, wc):
    labels, k = connected_components(mask == 1)
    rows, cols = np.mgrid[0:mask.shape[0], 0:mask.shape[1]]
    dist = []
    for c in range(1, k + 1):
        py, px = np.nonzero(labels == c)
        dist.append(np.sqrt(((rows[..., None] - py) ** 2 + (cols[..., None] - px) ** 2).min(-1)))
    d = np.sort(np.stack(dist), axis=0)
    return wc + w0 * np.exp(-(d[0] + d[1]) ** 2 / (2 * sigma**2))


def test_unet_weight_map_two_blobs_matches_brute_force():
    mask = np.zeros((24, 30), np.int64)
    mask[5:12, 4:11] = 1
    mask[6:16, 14:22] = 1  # a gap of three background columns
    mask[20:23, 0:30] = 255  # ignored strip
    w = unet_weight_map(mask, w0=10.0, sigma=5.0, class_weights=[1.0, 2.0], ignore_index=255)
    assert w.dtype == np.float32 and w.shape == mask.shape
    wc = np.select([mask == 0, mask == 1], [1.0, 2.0], 0.0)
    np.testing.assert_allclose(w, brute_force_weights(mask, 10.0, 5.0, wc), atol=1e-5)
    assert w[8, 12] > 8 and w[8, 12] > w[18, 28] + 5  # the gap between cells weighs most
    single = np.zeros((10, 10), np.int64)
    single[3:6, 3:6] = 1
    np.testing.assert_allclose(unet_weight_map(single, class_weights="balanced"),
                               np.where(single == 1, 100 / (2 * 9), 100 / (2 * 91)), rtol=1e-6)


# ---------------------------------------------------------------------------- splits and loader

def test_split_indices():
    train, val = split_indices(30, 1 / 6, mode="contiguous")
    assert train.tolist() == list(range(25)) and val.tolist() == list(range(25, 30))
    train, val = split_indices(20, 0.25, seed=1)
    assert len(val) == 5 and sorted(train.tolist() + val.tolist()) == list(range(20))
    assert np.array_equal(val, split_indices(20, 0.25, seed=1)[1])
    assert not np.array_equal(val, split_indices(20, 0.25, seed=2)[1])
    with pytest.raises(ValueError, match="at least one item"):
        split_indices(3, 0.01)


class Numbered:
    """Item i: an image filled with i, a mask filled with i % 3; records what was loaded."""

    def __init__(self, n, fail_at=None, sizes=None):
        self.n, self.fail_at, self.sizes, self.loaded = n, fail_at, sizes or {}, []

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.loaded.append(i)
        if i == self.fail_at:
            raise KeyError(f"boom at item {i}")
        h = self.sizes.get(i, 4)
        return np.full((1, h, 4), i, np.float32), np.full((h, 4), i % 3, np.uint8)


def firsts(loader):
    return [x[:, 0, 0, 0].astype(int).tolist() for x, _ in loader]


def test_loader_batches_and_shuffle_determinism():
    loader = DataLoader(Numbered(10), batch_size=4, seed=7)
    assert len(loader) == 3 and len(DataLoader(Numbered(10), 4, drop_last=True)) == 2
    epochs = [firsts(loader) for _ in range(3)]  # each pass advances the epoch
    for batches in epochs:
        assert [len(b) for b in batches] == [4, 4, 2] and sorted(sum(batches, [])) == list(range(10))
    assert epochs[0] != epochs[1]
    again = DataLoader(Numbered(10), batch_size=4, seed=7, prefetch=0)
    again.set_epoch(2)  # a run resumed at epoch 2 sees epoch 2's order
    assert firsts(again) == epochs[2]
    again.set_epoch(1, start_batch=2)  # resuming mid-epoch: the batches not yet trained on
    assert firsts(again) == epochs[1][2:]
    x, y = next(iter(DataLoader(Numbered(10), 3, shuffle=False, indices=[5, 1, 8])))
    assert x.dtype == np.float32 and y.dtype == np.int64 and x.shape == (3, 1, 4, 4) and y.shape == (3, 4, 4)
    assert x[:, 0, 0, 0].tolist() == [5, 1, 8] and y[:, 0, 0].tolist() == [2, 1, 2]


def test_loader_augmentation_is_reproducible_whatever_the_prefetch():
    ds = SyntheticDataset(6, 32)
    runs = [list(DataLoader(ds, 3, seed=1, augment=Augment(crop=24, elastic=True), prefetch=p)) for p in (0, 3)]
    for (xa, ya), (xb, yb) in zip(*runs):
        assert xa.shape == (3, 1, 24, 24) and np.array_equal(xa, xb) and np.array_equal(ya, yb)


def test_loader_errors_propagate_and_threads_stop():
    with pytest.raises(KeyError, match="boom at item 5"):
        list(DataLoader(Numbered(8, fail_at=5), 2, shuffle=False))
    ds = Numbered(40)
    it = iter(DataLoader(ds, batch_size=2, shuffle=False, prefetch=2))
    next(it)
    it.close()  # what leaving a for loop early does
    assert not any(t.name == "minunet-DataLoader" for t in threading.enumerate())
    assert len(ds.loaded) <= 2 * (1 + 2 + 1)  # the batch taken, a full queue, one in the making
    with pytest.raises(ValueError, match=r"item 0 has image shape \(1, 4, 4\), item 1 has \(1, 6, 4\).*crop"):
        list(DataLoader(Numbered(2, sizes={1: 6}), 2, shuffle=False))


# ---------------------------------------------------------------------------- real datasets

@pytest.mark.data
def test_isbi2012(data_dir):
    ds = isbi2012(data_dir / "isbi2012", weight_map=dict(w0=10.0, sigma=5.0))
    assert len(ds) == 30 and ds.names == [str(i) for i in range(30)] and ds.in_channels == 1
    assert ds.class_names == ("membrane", "cell")
    x, y, w = ds[29]
    assert x.shape == (1, 512, 512) and set(np.unique(y)) == {0, 1}
    assert 0.1 < (y == 0).mean() < 0.3  # membranes are about a fifth of the pixels
    assert w.min() >= 1.0 and w[y == 0].mean() > w[y == 1].mean()
    train, val = split_indices(len(ds), 1 / 6, mode="contiguous")
    x, y, w = next(iter(DataLoader(ds, 2, augment=Augment(crop=128, elastic=True), indices=val)))
    assert x.shape == (2, 1, 128, 128) and y.shape == w.shape == (2, 128, 128)


@pytest.mark.data
def test_drosophila_vnc(data_dir):
    ds = drosophila_vnc(data_dir / "drosophila_vnc")
    assert len(ds) == 20 and ds.num_classes == 9 and ds.pairs[7][1].name == "labels00000007.png"
    x, y = ds[0]
    assert x.shape == (1, 1024, 1024) and set(np.unique(y)) == set(range(9))
    assert 0.6 < (y == 8).mean() < 0.9  # intracellular dominates
    membranes = drosophila_vnc(data_dir / "drosophila_vnc", labels="membranes")
    assert membranes.class_names == ("other", "membrane") and set(np.unique(membranes[0][1])) == {0, 1}
    with pytest.raises(ValueError, match="labels='cells'"):
        drosophila_vnc(data_dir / "drosophila_vnc", labels="cells")


@pytest.mark.data
def test_camvid(data_dir):
    for split, n in (("train", 367), ("val", 101)):
        ds = camvid(data_dir / "camvid", split)
        assert len(ds) == n and ds.in_channels == 3 and ds.num_classes == 11 and ds.ignore_index == 11
    assert ds.class_names[0] == "Sky" and ds.class_names[-1] == "Bicyclist"
    x, y = ds[0]
    assert x.shape == (3, 360, 480) and 0 <= x.min() and x.max() <= 1
    assert set(np.unique(y)) <= set(range(12)) and (y == 11).any()
