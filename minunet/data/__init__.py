"""minunet.data: datasets, augmentation, border weight maps and a prefetching batch loader.

Everything here works on NumPy arrays on the host; the training loop moves batches to the
device. One module per concern:

    synthetic.py   SyntheticDataset: the built-in default of `minunet train`, drawn procedurally
    io.py          reading image and mask files (read_image, list_images, read_palette)
    folder.py      FolderDataset: images and masks in two folders, paired by name
    recipes.py     the three real datasets of ../shared/data: isbi2012, drosophila_vnc, camvid
    augment.py     Augment: crops, flips, rotations and elastic deformation, mask in step
    weight_map.py  unet_weight_map: the U-Net paper's loss weights; connected_components
    loader.py      the dataset protocol, split_indices and the DataLoader

The image algorithms (resampling, smoothing, connected components, distance transforms)
are scipy.ndimage's; this package writes by hand only what is particular to minunet.
"""
from minunet.data.augment import Augment
from minunet.data.folder import FolderDataset
from minunet.data.io import (IMAGE_EXTENSIONS, list_images, read_image, read_palette, resize_image, resize_labels,
                             scaled_size)
from minunet.data.loader import DataLoader, split_indices
from minunet.data.recipes import camvid, drosophila_vnc, isbi2012
from minunet.data.synthetic import SyntheticDataset
from minunet.data.weight_map import connected_components, unet_weight_map

__all__ = ["Augment", "DataLoader", "FolderDataset", "IMAGE_EXTENSIONS", "SyntheticDataset", "camvid",
           "connected_components", "drosophila_vnc", "isbi2012", "list_images", "read_image", "read_palette",
           "resize_image", "resize_labels", "scaled_size", "split_indices", "unet_weight_map"]
