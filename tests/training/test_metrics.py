"""Metrics against values worked out by hand, and splits where classes are missing."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from hamtune.vocab import CLASSES
from hamtune.training.metrics import classification_metrics, per_class_table

# akiec=0, bcc=1, bkl=2, nv=5 present; df, mel, vasc absent from y_true and never predicted
Y_TRUE = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 5])
Y_PRED = np.array([0, 0, 1, 1, 0, 2, 2, 5, 2, 5])
CONFUSION = [  # rows: true class, columns: predicted class (by hand from the pairs above)
    [2, 1, 0, 0, 0, 0, 0],
    [1, 1, 0, 0, 0, 0, 0],
    [0, 0, 3, 0, 0, 1, 0],
    [0, 0, 0, 0, 0, 0, 0],
    [0, 0, 0, 0, 0, 0, 0],
    [0, 0, 0, 0, 0, 1, 0],
    [0, 0, 0, 0, 0, 0, 0],
]


def _one_hot_probs(y_pred: np.ndarray) -> np.ndarray:
    probs = np.full((len(y_pred), len(CLASSES)), 0.02)
    probs[np.arange(len(y_pred)), y_pred] = 0.88
    return probs


@pytest.fixture(autouse=True)
def _no_warnings():
    """Absent classes must be handled, not warned about (sklearn's UndefinedMetricWarning would fail here)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def test_hand_computed_scores():
    m = classification_metrics(Y_TRUE, _one_hot_probs(Y_PRED))
    assert m["confusion_matrix"] == CONFUSION
    assert m["accuracy"] == pytest.approx(7 / 10)
    # recall akiec 2/3, bcc 1/2, bkl 3/4, nv 1/1 -> mean over the four present classes
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 3 / 4 + 1) / 4)
    assert m["recall_akiec"] == pytest.approx(2 / 3) and m["recall_bkl"] == pytest.approx(3 / 4)
    # precision: akiec 2 of 3 predicted, bcc 1 of 2, bkl 3 of 3, nv 1 of 2
    assert [m[f"precision_{c}"] for c in ("akiec", "bcc", "bkl", "nv")] == pytest.approx([2 / 3, 1 / 2, 1, 1 / 2])
    f1 = [2 / 3, 1 / 2, 2 * 0.75 / 1.75, 2 * 0.5 / 1.5]
    assert [m[f"f1_{c}"] for c in ("akiec", "bcc", "bkl", "nv")] == pytest.approx(f1)
    assert m["macro_f1"] == pytest.approx(np.mean(f1))
    assert [m[f"support_{c}"] for c in CLASSES] == [3, 2, 4, 0, 0, 1, 0]


def test_absent_classes_have_undefined_recall_and_do_not_enter_the_averages():
    m = classification_metrics(Y_TRUE, _one_hot_probs(Y_PRED))
    for absent in ("df", "mel", "vasc"):
        assert math.isnan(m[f"recall_{absent}"])
        assert m[f"support_{absent}"] == 0
    assert math.isfinite(m["macro_auc"]) and math.isfinite(m["balanced_accuracy"])


def test_macro_auc_one_vs_rest_by_hand():
    # two classes present. akiec scores: positives 0.9, 0.4; negatives 0.6, 0.2 -> 3 of 4 pairs ordered right.
    # bcc scores (1 - akiec): positives 0.4, 0.8; negatives 0.1, 0.6 -> 3 of 4 pairs ordered right.
    y_true = np.array([0, 0, 1, 1])
    probs = np.zeros((4, len(CLASSES)))
    probs[:, 0] = [0.9, 0.4, 0.6, 0.2]
    probs[:, 1] = 1 - probs[:, 0]
    m = classification_metrics(y_true, probs)
    assert m["macro_auc"] == pytest.approx(0.75)
    assert m["accuracy"] == pytest.approx(0.5)  # argmax: 0, 1, 0, 1


def test_single_class_split_and_non_finite_probabilities_give_nan_auc_not_an_error():
    m = classification_metrics(np.array([5, 5, 5]), _one_hot_probs(np.array([5, 5, 0])))
    assert math.isnan(m["macro_auc"])
    assert m["balanced_accuracy"] == pytest.approx(2 / 3)
    probs = _one_hot_probs(Y_PRED)
    probs[0, 0] = np.nan
    assert math.isnan(classification_metrics(Y_TRUE, probs)["macro_auc"])


def test_empty_split():
    m = classification_metrics(np.array([], dtype=np.int64), np.zeros((0, len(CLASSES))))
    assert math.isnan(m["accuracy"]) and m["support_nv"] == 0


def test_wrong_probability_shape_is_rejected():
    with pytest.raises(ValueError, match="shape"):
        classification_metrics(Y_TRUE, np.zeros((len(Y_TRUE), 3)))


def test_per_class_table():
    table = per_class_table(Y_TRUE, Y_PRED)
    assert list(table.columns) == ["precision", "recall", "f1", "support"]
    assert list(table.index) == [*CLASSES, "macro avg", "weighted avg"]
    assert table.loc["bkl", "recall"] == pytest.approx(0.75)
    assert table.loc["bkl", "support"] == 4
    assert math.isnan(table.loc["df", "recall"])
    m = classification_metrics(Y_TRUE, _one_hot_probs(Y_PRED))
    assert table.loc["macro avg", "recall"] == pytest.approx(m["balanced_accuracy"])
    assert table.loc["macro avg", "f1"] == pytest.approx(m["macro_f1"])
    assert table.loc["weighted avg", "recall"] == pytest.approx(m["accuracy"])
    assert table.loc["macro avg", "support"] == len(Y_TRUE)


def test_paired_bootstrap_difference_is_zero_for_a_model_against_itself_and_positive_for_a_better_one():
    from hamtune.training.metrics import bootstrap_balanced_accuracy, bootstrap_difference, bootstrap_scores

    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 7, 400)
    lesions = [f"L{i // 2}" for i in range(400)]
    good = np.where(rng.random(400) < 0.8, y_true, (y_true + 1) % 7)
    poor = np.where(rng.random(400) < 0.4, y_true, (y_true + 1) % 7)
    assert bootstrap_difference(y_true, good, good, lesions) == (0.0, 0.0)
    lo, hi = bootstrap_difference(y_true, good, poor, lesions)
    assert 0 < lo < 0.4 < hi < 0.6
    # the paired scores are the single-model bootstrap's, resample for resample
    scores = bootstrap_scores(y_true, [good, poor], lesions)
    assert tuple(np.percentile(scores[:, 0], [2.5, 97.5])) == bootstrap_balanced_accuracy(y_true, good, lesions)
