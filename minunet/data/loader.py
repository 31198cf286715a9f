"""minunet.data.loader: the dataset protocol, train/validation splits and the batch loader.

A dataset is anything with `__len__` and `__getitem__(i) -> (image, mask)` (or
`(image, mask, weight)`), where

    image  float32 (C, H, W)     roughly zero-mean, unit-scale intensities
    mask   int64   (H, W)        class indices in [0, num_classes), or the ignore label
    weight float32 (H, W)        optional per-pixel loss weights (minunet.data.weight_map)

and `num_classes`, `class_names` and `in_channels` attributes. Everything here works on NumPy
arrays on the host; the training loop moves batches to the device. `split_indices` makes
train/validation splits, and `DataLoader` shuffles by (seed, epoch), augments each item with
its own generator and assembles (N, C, H, W) batches in a background thread.
"""
import queue
import threading

import numpy as np


def check_index(i, n, who):
    """Item number i of n as an int in [0, n) (negative i counts from the end), or an IndexError."""
    i = int(i)
    if not -n <= i < n:
        raise IndexError(f"{who}: index {i} out of range for {n} items")
    return i % n


def split_indices(n, val_fraction=0.2, mode="random", seed=0):
    """(train indices, validation indices) of n items, both sorted int64 arrays.

    round(n * val_fraction) items go to validation: a random subset ('random', drawn from
    default_rng(seed)), or the last block ('contiguous'), which is the honest split for
    stacks of correlated slices such as ISBI 2012 (val_fraction=1/6 holds out 25-29).
    """
    n = int(n)
    n_val = int(round(n * val_fraction))
    if not 0 < val_fraction < 1 or not 1 <= n_val <= n - 1:
        raise ValueError(f"split_indices: val_fraction={val_fraction} of n={n} items gives {n_val} "
                         f"validation items; it must leave at least one item on each side")
    if mode == "contiguous":
        return np.arange(n - n_val, dtype=np.int64), np.arange(n - n_val, n, dtype=np.int64)
    if mode != "random":
        raise ValueError(f"split_indices: mode={mode!r}; expected 'random' or 'contiguous'")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_val:]).astype(np.int64), np.sort(order[:n_val]).astype(np.int64)




class DataLoader:
    """Batches of a dataset as NumPy arrays, assembled ahead of time in a background thread.

    >>> loader = DataLoader(ds, batch_size=8, augment=Augment(crop=128), seed=0)
    >>> for epoch in range(start_epoch, epochs):
    ...     loader.set_epoch(epoch)
    ...     for x, y in loader:      # x: float32 (N, C, H, W), y: int64 (N, H, W)
    ...         ...

    Items with a weight map give (x, y, weight) batches, weight float32 (N, H, W).
    `indices` restricts the loader to those items (e.g. one side of `split_indices`).

    Determinism: the pass over epoch e visits the items in the order
    `default_rng([seed, e]).permutation(indices)` (or as given, without shuffle), and item i
    of epoch e is augmented with its own generator `default_rng([seed, e, i])`. So a run that
    resumes at epoch e sees exactly the batches it would have seen, whatever the thread
    timing. Each pass uses the loader's current epoch and then advances it by one, so plain
    `for epoch ...: for batch in loader` reshuffles too; `set_epoch(e)` picks the next pass's,
    and `set_epoch(e, start_batch=b)` makes it begin at batch b (for resuming mid-epoch).

    Threading: with prefetch > 0 one thread loads up to `prefetch` batches ahead into a
    bounded queue (image decoding and NumPy release the GIL, so this overlaps with the
    training step); prefetch=0 loads in the caller's thread. An exception raised while
    loading is re-raised in the consumer as the same exception object. Leaving the loop
    early (break, an exception in the training step) stops the thread and joins it.

    Batching needs items of one size: with images of different sizes, crop them (Augment's
    crop) or use batch_size=1.
    """

    def __init__(self, dataset, batch_size=4, shuffle=True, seed=0, augment=None, drop_last=False,
                 prefetch=2, indices=None):
        if batch_size < 1:
            raise ValueError(f"DataLoader: batch_size={batch_size} must be >= 1")
        if prefetch < 0:
            raise ValueError(f"DataLoader: prefetch={prefetch} must be >= 0")
        n = len(dataset)
        self.indices = np.arange(n, dtype=np.int64) if indices is None else np.asarray(indices, dtype=np.int64)
        if self.indices.ndim != 1 or (self.indices.size and (self.indices.min() < 0 or self.indices.max() >= n)):
            raise ValueError(f"DataLoader: indices must be a 1-D list of item numbers in 0..{n - 1}")
        self.dataset, self.batch_size, self.shuffle, self.seed = dataset, int(batch_size), shuffle, int(seed)
        self.augment, self.drop_last, self.prefetch = augment, drop_last, int(prefetch)
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch, start_batch=0):
        """Make the next pass the one of epoch `epoch` (its shuffle and its augmentations),
        beginning at batch `start_batch`: a resumed run skips the batches it has trained on
        without loading them (the batches after it are the same, as nothing depends on them)."""
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"DataLoader.set_epoch: start_batch={start_batch} outside 0..{len(self)}")
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def __len__(self):
        n = len(self.indices)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def batches(self, epoch):
        """The item numbers of each batch of epoch `epoch`: a list of int64 arrays."""
        order = np.random.default_rng([self.seed, epoch]).permutation(self.indices) if self.shuffle else self.indices
        return [order[k:k + self.batch_size] for k in range(0, len(self) * self.batch_size, self.batch_size)]

    def __iter__(self):
        epoch, start = self.epoch, self.start_batch
        self.epoch, self.start_batch = epoch + 1, 0
        batches = self.batches(epoch)[start:]
        if self.prefetch == 0:
            for items in batches:
                yield self._assemble(items, epoch)
            return
        q, stop = queue.Queue(maxsize=self.prefetch), threading.Event()
        worker = threading.Thread(target=self._produce, args=(batches, epoch, q, stop), daemon=True,
                                  name="minunet-DataLoader")
        worker.start()
        try:
            for _ in batches:
                ok, payload = q.get()
                if not ok:
                    raise payload
                yield payload
        finally:
            stop.set()
            while worker.is_alive():  # drain, so a producer blocked on a full queue sees `stop`
                try:
                    q.get_nowait()
                except queue.Empty:
                    worker.join(timeout=0.01)

    def _produce(self, batches, epoch, q, stop):
        try:
            for items in batches:
                if stop.is_set():
                    return
                self._put(q, stop, (True, self._assemble(items, epoch)))
        except BaseException as e:  # hand every failure to the consumer, which re-raises it
            self._put(q, stop, (False, e))

    @staticmethod
    def _put(q, stop, message):
        while not stop.is_set():
            try:
                q.put(message, timeout=0.05)
                return
            except queue.Full:
                continue

    def _assemble(self, items, epoch):
        # items: B item numbers -> (x (B, C, H, W) float32, y (B, H, W) int64[, weight (B, H, W)])
        samples = []
        for i in items:
            sample = self.dataset[int(i)]
            if self.augment is not None:
                sample = self.augment(*sample, rng=np.random.default_rng([self.seed, epoch, int(i)]))
            samples.append(sample)
        arity = {len(s) for s in samples}
        if len(arity) != 1 or arity.pop() not in (2, 3):
            raise ValueError("DataLoader: items must all be (image, mask) or all (image, mask, weight)")
        batch = []
        for k, dtype in zip(range(len(samples[0])), (np.float32, np.int64, np.float32)):
            shapes = [s[k].shape for s in samples]
            if len(set(shapes)) != 1:
                first = shapes[0]
                odd = next(j for j, s in enumerate(shapes) if s != first)
                raise ValueError(f"DataLoader: items of different sizes in one batch: item {int(items[0])} "
                                 f"has {('image', 'mask', 'weight')[k]} shape {first}, item {int(items[odd])} "
                                 f"has {shapes[odd]}; crop them to one size (Augment(crop=...)) or use batch_size=1")
            batch.append(np.stack([s[k] for s in samples]).astype(dtype, copy=False))
        return tuple(batch)
