"""minunet.data.recipes: the three real datasets of ../shared/data, as FolderDatasets.

Each function takes the dataset's own folder (where its README.txt lies) and returns a
FolderDataset with the pairing and mask options that set needs; more FolderDataset options
(`weight_map`, `normalize`, `cache_mb`, ...) pass through. The `minunet train` options that
do the same are in the README's worked examples.

    ISBI 2012 EM membranes: 30 labelled slices, 512x512 gray; mask 255 = cell, 0 = membrane.
        isbi2012(root / "isbi2012")
        Hold out a contiguous block of slices for validation, as neighbouring slices look
        alike: split_indices(30, 1 / 6, mode="contiguous") -> slices 0-24 train, 25-29 val.
        For the U-Net paper's border weights add weight_map=dict(w0=10.0, sigma=5.0) (cells
        are class 1, the foreground).

    Drosophila VNC ssTEM stack 1: 20 sections, 1024x1024 gray TIFF, labels as PNG named
    labels00000NN.png for raw/NN.tif.
        drosophila_vnc(root / "drosophila_vnc")                        9 classes by gray level
        drosophila_vnc(root / "drosophila_vnc", labels="membranes")    the 1-bit masks: other, membrane
        (likewise "mitochondria" and "synapses")

    CamVid (SegNet split): 367 train and 101 val RGB images (and 233 test, where a copy has
    them), 480x360; the annotation has the image's file name and holds class indices 0-10,
    with 11 = void (not scored).
        camvid(root / "camvid", split="train")
"""
import pathlib

from minunet.data.folder import FolderDataset

ISBI2012_CLASSES = ("membrane", "cell")

VNC_GRAY_LEVELS = (0, 32, 64, 96, 128, 159, 191, 223, 255)
VNC_CLASSES = ("membrane |", "membrane /", "membrane -", "membrane \\", "membrane junction", "glia",
               "mitochondria", "synapse", "intracellular")
VNC_BINARY_LABELS = {"membranes": "membrane", "mitochondria": "mitochondrion", "synapses": "synapse"}

CAMVID_CLASSES = ("Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
                  "Pedestrian", "Bicyclist")
CAMVID_VOID = 11


def isbi2012(root, **options):
    """The 30 labelled ISBI 2012 slices (root/train/image, root/train/label): class 0 membrane,
    class 1 cell interior; item i is slice i."""
    root = pathlib.Path(root)
    return FolderDataset(root / "train/image", root / "train/label", mask_mode="binary",
                         class_names=ISBI2012_CLASSES, **options)


def drosophila_vnc(root, labels="labels", **options):
    """Stack 1 of the Drosophila VNC set: `labels='labels'` for the 9 classes of its gray-level
    masks, or one of 'membranes', 'mitochondria', 'synapses' for that structure against the rest."""
    stack = pathlib.Path(root) / "stack1"
    if labels == "labels":
        return FolderDataset(stack / "raw", stack / "labels", mask_prefix="labels000000", mask_mode="gray",
                             gray_levels=VNC_GRAY_LEVELS, class_names=VNC_CLASSES, **options)
    if labels not in VNC_BINARY_LABELS:
        raise ValueError(f"drosophila_vnc: labels={labels!r}; expected 'labels' or one of {tuple(VNC_BINARY_LABELS)}")
    return FolderDataset(stack / "raw", stack / labels, mask_mode="binary",
                         class_names=("other", VNC_BINARY_LABELS[labels]), **options)


def camvid(root, split="train", **options):
    """One split of CamVid ('train', 'val' or 'test'): 11 classes, void (11) ignored."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"camvid: split={split!r}; expected 'train', 'val' or 'test'")
    root = pathlib.Path(root)
    return FolderDataset(root / split, root / f"{split}annot", mask_mode="index", num_classes=len(CAMVID_CLASSES),
                         ignore_index=CAMVID_VOID, class_names=CAMVID_CLASSES, **options)
