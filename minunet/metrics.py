"""minunet.metrics: segmentation scores from a confusion matrix, accumulated on the host.

Every per-pixel segmentation score is a function of one K x K confusion matrix M, where
M[t, p] counts the pixels whose true class is t and whose predicted class is p. So we never
keep predictions around: each batch is folded into M with one `np.bincount` over the index
t * K + p, and the scores are read off M at the end of an epoch:

    TP_k = M[k, k]                 (true k, predicted k)
    FN_k = sum_p M[k, p] - TP_k    (true k, predicted something else)
    FP_k = sum_t M[t, k] - TP_k    (predicted k, truly something else)

    IoU_k  = TP_k / (TP_k + FP_k + FN_k)          (Jaccard index)
    Dice_k = 2 TP_k / (2 TP_k + FP_k + FN_k)      (F1 score; Dice = 2 IoU / (1 + IoU))
    pixel accuracy = trace(M) / sum(M)

Conventions (the same as most segmentation benchmarks):

- Pixels whose target is `ignore_index` (e.g. CamVid's "void") are left out entirely: they
  are counted neither as right nor as wrong, whatever the network predicts there.
- A class that appears in neither the predictions nor the targets (TP + FP + FN = 0) has no
  defined IoU or Dice: it is reported as NaN, and the means (mIoU, mean Dice) average over
  the classes that are defined only (np.nanmean). A class that is absent from the targets
  but predicted somewhere scores 0, as it should: those pixels are false positives.

The accumulator lives on the host in int64 (exact counts, no float rounding however many
pixels); CuPy arrays are accepted and copied to the host, after the argmax on the device,
so only the (N, H, W) labels cross the bus.
"""
import numpy as np

from minunet import backend
from minunet.autograd import Tensor


class ConfusionMatrix:
    """Accumulates a (num_classes, num_classes) confusion matrix: rows true, columns predicted.

    >>> cm = ConfusionMatrix(num_classes=3, ignore_index=255)
    >>> cm.update(pred, target)      # label maps (N, H, W), or logits (N, C, H, W) for pred
    >>> cm.mean_iou(), cm.dice()     # per-class arrays have NaN where a class never occurs
    """

    def __init__(self, num_classes, ignore_index=None):
        if int(num_classes) < 1:
            raise ValueError(f"ConfusionMatrix: num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = None if ignore_index is None else int(ignore_index)
        self.matrix = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def reset(self):
        self.matrix[...] = 0

    def update(self, pred, target):
        """Fold one batch in. pred: labels (N, H, W) or logits/probabilities (N, C, H, W);
        target: labels (N, H, W). NumPy or CuPy arrays, or minunet Tensors."""
        pred, target = _array(pred), _array(target)
        if pred.ndim == target.ndim + 1:  # scores over the class axis: take the argmax first
            if pred.shape[1] != self.num_classes:
                raise ValueError(f"ConfusionMatrix.update: pred has {pred.shape[1]} class scores "
                                 f"(shape {tuple(pred.shape)}), expected {self.num_classes}")
            pred = pred.argmax(axis=1)
        pred, target = backend.to_numpy(pred), backend.to_numpy(target)
        if pred.shape != target.shape:
            raise ValueError(f"ConfusionMatrix.update: pred labels {tuple(pred.shape)} and target "
                             f"{tuple(target.shape)} differ in shape")
        pred = pred.reshape(-1).astype(np.int64, copy=False)
        target = target.reshape(-1).astype(np.int64, copy=False)
        if self.ignore_index is not None:
            keep = target != self.ignore_index
            pred, target = pred[keep], target[keep]
        k = self.num_classes
        for name, a in (("target", target), ("pred", pred)):
            if a.size and (a.min() < 0 or a.max() >= k):
                bad = a[(a < 0) | (a >= k)][0]
                hint = "" if self.ignore_index is None else f" (ignore_index is {self.ignore_index})"
                raise ValueError(f"ConfusionMatrix.update: {name} holds label {bad}, outside "
                                 f"[0, {k}){hint}")
        self.matrix += np.bincount(target * k + pred, minlength=k * k).reshape(k, k)
        return self

    # ---- the counts -------------------------------------------------------------------
    def _counts(self):
        m = self.matrix.astype(np.float64)
        tp = np.diag(m)
        fp = m.sum(axis=0) - tp
        fn = m.sum(axis=1) - tp
        return tp, fp, fn

    # ---- the scores -------------------------------------------------------------------
    def iou(self):
        """Per-class IoU (num_classes,), NaN for a class in neither prediction nor target."""
        tp, fp, fn = self._counts()
        return _ratio(tp, tp + fp + fn)

    def dice(self):
        """Per-class Dice (num_classes,), NaN for a class in neither prediction nor target."""
        tp, fp, fn = self._counts()
        return _ratio(2 * tp, 2 * tp + fp + fn)

    def mean_iou(self):
        """Mean IoU over the classes that occur (NaN when no pixel has been counted)."""
        return _nanmean(self.iou())

    def mean_dice(self):
        return _nanmean(self.dice())

    def pixel_accuracy(self):
        total = self.matrix.sum()
        return float(np.trace(self.matrix) / total) if total else float("nan")

    def summary(self):
        """All the scores as a JSON-ready dict (NaN stays NaN; json writes it as NaN)."""
        return {
            "dice": [float(v) for v in self.dice()],
            "iou": [float(v) for v in self.iou()],
            "mean_dice": self.mean_dice(),
            "mean_iou": self.mean_iou(),
            "pixel_accuracy": self.pixel_accuracy(),
        }


def _array(a):
    return a.data if isinstance(a, Tensor) else a


def _ratio(num, den):
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _nanmean(v):
    v = v[~np.isnan(v)]
    return float(v.mean()) if v.size else float("nan")


def format_table(summary, class_names=None):
    """The per-class Dice and IoU, then the means, as a plain-text table."""
    dice, iou = summary["dice"], summary["iou"]
    names = class_names or [str(k) for k in range(len(dice))]
    width = max(5, max(len(n) for n in names))
    lines = [f"{'class':<{width}}  {'Dice':>7}  {'IoU':>7}"]
    for name, d, j in zip(names, dice, iou):
        lines.append(f"{name:<{width}}  {_fmt(d)}  {_fmt(j)}")
    lines.append(f"{'mean':<{width}}  {_fmt(summary['mean_dice'])}  {_fmt(summary['mean_iou'])}")
    lines.append(f"pixel accuracy {summary['pixel_accuracy']:.4f}")
    return "\n".join(lines)


def _fmt(v):
    return f"{'n/a':>7}" if np.isnan(v) else f"{v:7.4f}"
