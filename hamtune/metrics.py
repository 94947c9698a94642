"""Classification metrics for imbalanced 7-class data, robust to splits where a class is absent.

Why balanced accuracy and macro scores: with 67% nv, plain accuracy rewards predicting nv for everything. A small
validation split (or a fold of the 140-image sample) can lack a class entirely; metrics whose per-class term is then
undefined (recall, one-vs-rest AUC) average over the classes PRESENT in y_true rather than failing or counting 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)

from hamtune.data.ham10000 import CLASSES


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str] = CLASSES) -> dict:
    """Scores of class probabilities `probs` (N, C) against integer labels `y_true` (N,).

    Keys: accuracy, balanced_accuracy (mean recall over classes present in y_true), macro_f1 (over classes present in
    y_true or predicted, as sklearn), macro_auc (mean one-vs-rest ROC AUC over present classes; nan when fewer than
    two are present or probs are not finite), precision_<cls>, recall_<cls> (nan when cls is absent from y_true),
    f1_<cls>, support_<cls>, and confusion_matrix (list of lists over all classes; rows true, columns predicted).
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    num_classes = len(classes)
    if probs.ndim != 2 or probs.shape != (len(y_true), num_classes):
        raise ValueError(f"probs must have shape ({len(y_true)}, {num_classes}), got {probs.shape}")
    all_labels = list(range(num_classes))
    if len(y_true) == 0:
        nan = float("nan")
        result = {"accuracy": nan, "balanced_accuracy": nan, "macro_f1": nan, "macro_auc": nan}
        for name in classes:
            result.update({f"precision_{name}": nan, f"recall_{name}": nan, f"f1_{name}": nan, f"support_{name}": 0.0})
        result["confusion_matrix"] = [[0] * num_classes for _ in range(num_classes)]
        return result

    y_pred = probs.argmax(axis=1)
    present = np.unique(y_true)
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=all_labels, zero_division=0
    )
    recall = recall.astype(np.float64)
    recall[support == 0] = np.nan  # no positives: recall is undefined, not 0

    result = {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(np.mean(recall[present])),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        "macro_auc": _macro_auc(y_true, probs, present),
    }
    for i, name in enumerate(classes):
        result[f"precision_{name}"] = float(precision[i])
        result[f"recall_{name}"] = float(recall[i])
        result[f"f1_{name}"] = float(f1[i])
        result[f"support_{name}"] = float(support[i])
    result["confusion_matrix"] = confusion_matrix(y_true, y_pred, labels=all_labels).tolist()
    return result


def _macro_auc(y_true: np.ndarray, probs: np.ndarray, present: np.ndarray) -> float:
    """Mean one-vs-rest AUC over present classes (each needs positives and negatives to be defined)."""
    if len(present) < 2 or not np.isfinite(probs).all():
        return float("nan")
    aucs = [roc_auc_score(y_true == c, probs[:, c]) for c in present]
    value = float(np.mean(aucs))
    return value if math.isfinite(value) else float("nan")


def per_class_table(y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str] = CLASSES) -> pd.DataFrame:
    """precision / recall / f1 / support per class, plus "macro avg" and "weighted avg" rows, for reports.

    A class absent from y_true has support 0 and recall nan. "macro avg" averages over classes present in y_true or
    y_pred as sklearn does, except that recall skips absent classes (so it equals balanced accuracy); "weighted avg"
    weights by support.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    labels = list(range(len(classes)))
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    recall = recall.astype(np.float64)
    recall[support == 0] = np.nan
    table = pd.DataFrame(
        {"precision": precision, "recall": recall, "f1": f1, "support": support.astype(np.int64)},
        index=pd.Index(list(classes), name="class"),
    )
    seen = np.union1d(y_true, y_pred)  # sklearn's macro classes; recall of a class only predicted is nan, skipped
    macro = table.iloc[seen][["precision", "recall", "f1"]].mean(skipna=True)
    table.loc["macro avg"] = [macro["precision"], macro["recall"], macro["f1"], int(support.sum())]
    p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, average="weighted", zero_division=0)
    table.loc["weighted avg"] = [p, r, f, int(support.sum())]
    table["support"] = table["support"].astype(np.int64)
    return table
