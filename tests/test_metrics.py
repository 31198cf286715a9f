"""ConfusionMatrix and the scores read off it, against matrices and scores worked out by hand."""
import math

import numpy as np
import pytest

from minunet.metrics import (ChallengeScores, ConfusionMatrix, binary_prediction, format_table, pixel_error,
                             rand_error)
import reference


# 3 classes, 12 pixels (two 2x3 images), with one class-2 pixel confused and class 2
# predicted once where it is class 0:
TARGET = np.array([[[0, 0, 1], [1, 1, 2]],
                   [[0, 0, 0], [2, 2, 1]]])
PRED = np.array([[[0, 0, 1], [1, 0, 2]],
                 [[0, 2, 0], [2, 1, 1]]])
# rows: true class, columns: predicted class
#   true 0 (5 px): predicted 0 x4, 2 x1
#   true 1 (4 px): predicted 1 x3, 0 x1
#   true 2 (3 px): predicted 2 x2, 1 x1
MATRIX = np.array([[4, 0, 1],
                   [1, 3, 0],
                   [0, 1, 2]])


def test_matrix_counts_each_pixel_once():
    cm = ConfusionMatrix(3).update(PRED, TARGET)
    np.testing.assert_array_equal(cm.matrix, MATRIX)


def test_scores_by_hand():
    cm = ConfusionMatrix(3).update(PRED, TARGET)
    # class 0: tp 4, fp 1 (true 1), fn 1 (pred 2) -> IoU 4/6, Dice 8/10
    # class 1: tp 3, fp 1 (true 2), fn 1 (pred 0) -> IoU 3/5, Dice 6/8
    # class 2: tp 2, fp 1 (true 0), fn 1 (pred 1) -> IoU 2/4, Dice 4/6
    np.testing.assert_allclose(cm.iou(), [4 / 6, 3 / 5, 2 / 4])
    np.testing.assert_allclose(cm.dice(), [8 / 10, 6 / 8, 4 / 6])
    assert cm.mean_iou() == pytest.approx((4 / 6 + 3 / 5 + 2 / 4) / 3)
    assert cm.mean_dice() == pytest.approx((8 / 10 + 6 / 8 + 4 / 6) / 3)
    assert cm.pixel_accuracy() == pytest.approx(9 / 12)


def test_accumulates_over_batches_and_resets():
    cm = ConfusionMatrix(3)
    cm.update(PRED[:1], TARGET[:1]).update(PRED[1:], TARGET[1:])
    np.testing.assert_array_equal(cm.matrix, MATRIX)
    cm.reset()
    assert cm.matrix.sum() == 0 and math.isnan(cm.pixel_accuracy())


def test_logits_are_argmaxed_over_the_class_axis():
    logits = np.eye(3)[PRED].transpose(0, 3, 1, 2) * 5.0 - 1.0  # (N, C, H, W), peak at PRED
    cm = ConfusionMatrix(3).update(logits, TARGET)
    np.testing.assert_array_equal(cm.matrix, MATRIX)


def test_ignore_index_leaves_pixels_out():
    target = TARGET.copy()
    target[0, 1, 1] = 255  # the (true 1, predicted 0) pixel becomes void
    cm = ConfusionMatrix(3, ignore_index=255).update(PRED, target)
    expected = MATRIX.copy()
    expected[1, 0] -= 1
    np.testing.assert_array_equal(cm.matrix, expected)
    assert cm.pixel_accuracy() == pytest.approx(9 / 11)


def test_absent_class_is_nan_and_left_out_of_the_means():
    target = np.array([[0, 0, 1, 1]])
    pred = np.array([[0, 1, 1, 1]])
    cm = ConfusionMatrix(4).update(pred, target)   # classes 2 and 3 never occur
    iou = cm.iou()
    assert np.isnan(iou[2]) and np.isnan(iou[3])
    np.testing.assert_allclose(iou[:2], [1 / 2, 2 / 3])
    assert cm.mean_iou() == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert cm.mean_dice() == pytest.approx((2 / 3 + 4 / 5) / 2)


def test_predicted_but_absent_class_scores_zero():
    cm = ConfusionMatrix(3).update(np.array([[0, 2]]), np.array([[0, 0]]))
    np.testing.assert_allclose(cm.iou(), [1 / 2, np.nan, 0.0])


def test_out_of_range_labels_are_an_error():
    with pytest.raises(ValueError, match=r"target holds label 3, outside \[0, 3\)"):
        ConfusionMatrix(3).update(np.array([[0, 1]]), np.array([[0, 3]]))
    with pytest.raises(ValueError, match="differ in shape"):
        ConfusionMatrix(3).update(np.zeros((1, 2, 2), int), np.zeros((1, 2, 3), int))


def test_table_lists_each_class_and_the_means():
    cm = ConfusionMatrix(3).update(PRED, TARGET)
    table = format_table(cm.summary(), ["bg", "cell", "edge"])
    assert "cell" in table and "0.6000" in table and "pixel accuracy 0.7500" in table


# ---- the ISBI 2012 challenge's scores ---------------------------------------------------------

def test_pixel_error_is_the_share_of_wrong_pixels():
    rng = np.random.default_rng(0)
    pred, target = rng.integers(0, 2, (2, 9, 11)), rng.integers(0, 2, (2, 9, 11))
    target[0, :3] = 255
    wrong = sum(int(p != t) for p, t in zip(pred.ravel(), target.ravel()) if t != 255)
    assert pixel_error(pred, target, ignore_index=255) == pytest.approx(wrong / (2 * 99 - 11 * 3))
    scores = ChallengeScores(ignore_index=255).update(pred, target).summary()
    assert scores["pixel_error"] == pytest.approx(wrong / (2 * 99 - 11 * 3))


def test_rand_error_by_hand():
    # two true cells {0, 1} and {3, 4} split by a membrane pixel
    target = np.array([[1, 1, 0, 1, 1]])
    assert rand_error(target, target) == 0.0
    # the membrane missed: one segment. 4 counted pixels, 2 of each cell in it: pairs together
    # in both 2, in the prediction 6, in the truth 2 -> precision 1/3, recall 1 -> error 1/2
    assert rand_error(np.ones_like(target), target) == pytest.approx(0.5)
    # every cell cut in two (the middle pixels called membrane): no true pair kept -> error 1
    assert rand_error(np.array([[1, 0, 1, 0, 1]]), target) == pytest.approx(1.0)
    # components are 4-connected: two cells touching at a corner stay two (merged: 1/2)
    assert rand_error(np.array([[1, 1, 1, 1], [0, 0, 1, 1]]), np.array([[1, 1, 0, 0], [0, 0, 1, 1]])) == 0.5
    # no true pair: undefined; no predicted pair: every true pair lost
    assert np.isnan(rand_error(np.ones((2, 2), int), np.array([[1, 0], [0, 1]])))
    assert rand_error(np.array([[1, 0, 1]]), np.array([[1, 1, 1]])) == 1.0


@pytest.mark.parametrize("seed", range(6))
def test_rand_error_agrees_with_scikit_image_and_pair_counting(seed):
    from skimage.measure import label
    from skimage.metrics import adapted_rand_error
    rng = np.random.default_rng(seed)
    target = (rng.random((7, 9)) < 0.7).astype(np.int64)
    pred = np.where(rng.random((7, 9)) < 0.2, 1 - target, target)
    expected = adapted_rand_error(label(target == 1, connectivity=1), label(pred == 1, connectivity=1))[0]
    assert rand_error(pred, target) == pytest.approx(expected, abs=1e-12)
    pairs = reference.adapted_rand_error_pairs(label(target == 1, connectivity=1), label(pred == 1, connectivity=1))
    assert rand_error(pred, target) == pytest.approx(pairs, abs=1e-12)


def test_rand_error_leaves_ignored_pixels_out():
    target = np.array([[1, 1, 0, 1, 1, 255, 1]])
    pred = np.array([[1, 1, 0, 1, 1, 1, 1]])   # joins the last pixel to the second cell across the void
    assert rand_error(pred, target, ignore_index=255) == pytest.approx(
        reference.adapted_rand_error_pairs(np.array([1, 1, 0, 2, 2, 0, 3]), np.array([1, 1, 0, 2, 2, 2, 2])))


def test_challenge_scores_average_rand_error_over_images():
    target = np.array([[[1, 1, 0, 1, 1]], [[1, 1, 0, 1, 1]]])
    pred = np.array([[[1, 1, 0, 1, 1]], [[1, 1, 1, 1, 1]]])
    scores = ChallengeScores().update(pred[:1], target[:1]).update(pred[1:], target[1:]).summary()
    assert scores["rand_error"] == pytest.approx((0.0 + 0.5) / 2)
    assert scores["pixel_error"] == pytest.approx(1 / 10)
    table = format_table({**ConfusionMatrix(2).update(pred, target).summary(), **scores})
    assert "pixel error 0.1000" in table and "Rand error 0.2500" in table


def test_binary_prediction_thresholds_the_class_1_probability():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 2, 5, 6)) * 3
    p1 = np.exp(logits[:, 1]) / np.exp(logits).sum(axis=1)
    np.testing.assert_array_equal(binary_prediction(logits, 0.5), logits.argmax(axis=1))
    for t in (0.1, 0.3, 0.8):
        np.testing.assert_array_equal(binary_prediction(logits, t), (p1 >= t).astype(int))
    with pytest.raises(ValueError, match="2-class"):
        binary_prediction(np.zeros((1, 3, 2, 2)))
