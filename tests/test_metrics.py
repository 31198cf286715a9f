"""ConfusionMatrix and the scores read off it, against matrices and scores worked out by hand."""
import math

import numpy as np
import pytest

from minunet.metrics import ConfusionMatrix, format_table

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
