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

The ISBI 2012 challenge's scores, for 2-class (boundary / object) data such as EM membranes,
where class 1 is the object (the cell interior) and class 0 what separates objects:

- pixel error: the share of scored pixels whose predicted class is wrong (1 - pixel
  accuracy), the challenge's squared distance between two binary label maps.
- Rand error: how far the segmentation into objects differs from the true one, which pixel
  counts cannot see (one wrong pixel can merge two cells). The objects are the connected
  components (4-connected) of class 1 in the prediction and in the target. For every pair of
  pixels inside true objects ask "same object?" in both: with n_ij the pixels of true object
  i in predicted segment j, a_i = sum_j n_ij, b_j = sum_i n_ij and N the pixels counted,

      pairs together in both   P = sum_ij n_ij^2 - N
      precision = P / (sum_j b_j^2 - N)      recall = P / (sum_i a_i^2 - N)
      Rand error = 1 - F-score = 1 - 2 precision recall / (precision + recall)

  the "adapted Rand error" of the ISBI 2012 and SNEMI3D challenges (Arganda-Carreras et al.
  2015), computed by scikit-image's `adapted_rand_error`. Pixels on true boundaries are not
  counted; predicted-boundary pixels inside true objects count as one more segment
  (scikit-image's convention; SNEMI3D's script counts each as its own segment). The error is
  computed per image (a 2D slice) and averaged over the images.

`binary_prediction` turns class scores into labels at a threshold on the class-1
probability (0.5 is the argmax), as the challenge thresholds probability maps.
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


def binary_prediction(logits, threshold=0.5):
    """Labels (N, H, W) int64 from 2-class scores (N, 2, H, W): class 1 where its softmax
    probability, 1 / (1 + exp(s0 - s1)), is at least `threshold`."""
    logits = backend.to_numpy(_array(logits))
    if logits.ndim != 4 or logits.shape[1] != 2:
        raise ValueError(f"binary_prediction: expected 2-class scores (N, 2, H, W), got shape {tuple(logits.shape)}")
    if not 0 < threshold < 1:
        raise ValueError(f"binary_prediction: threshold {threshold} must lie strictly between 0 and 1")
    # P(class 1) >= t  <=>  s1 - s0 >= log(t / (1 - t)), computed without overflow
    margin = logits[:, 1].astype(np.float64) - logits[:, 0]
    return (margin >= np.log(threshold / (1 - threshold))).astype(np.int64)


def pixel_error(pred, target, ignore_index=None):
    """The share of pixels whose predicted label differs from the target, pixels labelled
    `ignore_index` left out (NaN when none is left)."""
    pred, target = backend.to_numpy(_array(pred)), backend.to_numpy(_array(target))
    scored = np.ones(target.shape, bool) if ignore_index is None else target != ignore_index
    n = int(scored.sum())
    return float(np.count_nonzero((pred != target) & scored) / n) if n else float("nan")


def rand_error(pred, target, ignore_index=None):
    """The adapted Rand error (see the module docstring) of one (H, W) prediction against its
    target: 1 - F-score of the Rand index over the 4-connected components of class 1. NaN
    when no two pixels share a true object (no pairs to count); 1 when no two of them
    share a predicted segment."""
    from skimage.measure import label  # scikit-image loads in about a second: only when scored
    from skimage.metrics import adapted_rand_error
    pred, target = backend.to_numpy(_array(pred)), backend.to_numpy(_array(target))
    if pred.shape != target.shape or target.ndim != 2:
        raise ValueError(f"rand_error: pred {pred.shape} and target {target.shape} must be one (H, W) image each")
    true_objects = label(target == 1, connectivity=1)
    if ignore_index is not None:
        true_objects[target == ignore_index] = 0  # not counted, as true boundaries
    pred_objects = label(pred == 1, connectivity=1)
    counted = true_objects > 0
    sizes = np.bincount(true_objects[counted])
    if (sizes * (sizes - 1)).sum() == 0:
        return float("nan")  # no two pixels share a true object: no pairs to count
    sizes = np.bincount(pred_objects[counted])
    if (sizes * (sizes - 1)).sum() == 0:
        return 1.0  # no two counted pixels share a predicted segment: no true pair is kept
    error, _, _ = adapted_rand_error(true_objects, pred_objects)
    return float(error)


class ChallengeScores:
    """The ISBI 2012 challenge's pixel error and Rand error of 2-class label maps, accumulated
    image by image: pixel error over all pixels, Rand error averaged over the images (those
    where it is defined). `totals` holds the sums (wrong pixels, scored pixels, sum of the
    Rand errors, images with one), so that processes can add theirs up.

    >>> scores = ChallengeScores(ignore_index=None)
    >>> scores.update(pred, target)     # labels (N, H, W), 0 = boundary, 1 = object
    >>> scores.summary()                # {'pixel_error': ..., 'rand_error': ...}
    """

    def __init__(self, ignore_index=None):
        self.ignore_index = None if ignore_index is None else int(ignore_index)
        self.totals = np.zeros(4, dtype=np.float64)

    def update(self, pred, target):
        pred, target = backend.to_numpy(_array(pred)), backend.to_numpy(_array(target))
        if pred.shape != target.shape or target.ndim != 3:
            raise ValueError(f"ChallengeScores.update: pred {pred.shape} and target {target.shape} "
                             f"must be label maps (N, H, W) of one shape")
        scored = np.ones(target.shape, bool) if self.ignore_index is None else target != self.ignore_index
        self.totals[0] += np.count_nonzero((pred != target) & scored)
        self.totals[1] += np.count_nonzero(scored)
        for p, t in zip(pred, target):
            error = rand_error(p, t, self.ignore_index)
            if not np.isnan(error):
                self.totals[2:] += (error, 1)
        return self

    def summary(self):
        wrong, counted, rand_sum, rand_images = self.totals
        return {"pixel_error": float(wrong / counted) if counted else float("nan"),
                "rand_error": float(rand_sum / rand_images) if rand_images else float("nan")}


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
    """The per-class Dice and IoU, then the means, pixel accuracy and the challenge scores
    (pixel error, Rand error) where the summary has them, as plain text."""
    dice, iou = summary["dice"], summary["iou"]
    names = class_names or [str(k) for k in range(len(dice))]
    width = max(5, max(len(n) for n in names))
    lines = [f"{'class':<{width}}  {'Dice':>7}  {'IoU':>7}"]
    for name, d, j in zip(names, dice, iou):
        lines.append(f"{name:<{width}}  {_fmt(d)}  {_fmt(j)}")
    lines.append(f"{'mean':<{width}}  {_fmt(summary['mean_dice'])}  {_fmt(summary['mean_iou'])}")
    lines.append(f"pixel accuracy {summary['pixel_accuracy']:.4f}")
    for key, what in (("pixel_error", "pixel error"), ("rand_error", "Rand error")):
        if key in summary:
            lines.append(f"{what} {summary[key]:.4f}" if not np.isnan(summary[key]) else f"{what} n/a")
    return "\n".join(lines)


def _fmt(v):
    return f"{'n/a':>7}" if np.isnan(v) else f"{v:7.4f}"
