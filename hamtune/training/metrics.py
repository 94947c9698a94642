"""Classification metrics for imbalanced 7-class data, robust to splits where a class is absent.

Why balanced accuracy and macro scores: with 67% nv, plain accuracy rewards predicting nv for everything. A small
validation split (or a fold of the 140-image sample) can lack a class entirely; metrics whose per-class term is then
undefined (recall, one-vs-rest AUC) average over the classes PRESENT in y_true rather than failing or counting 0.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)

from hamtune.vocab import CLASSES, NUM_CLASSES

BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
HEADLINE_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc")
ECE_BINS = 15
TINY = 1e-300  # log(0) guard for probabilities that underflowed in float64


def decide(probs: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """The predicted class of each row: argmax of probs * weights (plain argmax without weights). A calibrated model
    file's weights (hamtune.final.calibration.argmax_preserving_weights) make this the argmax its networks gave."""
    probs = np.asarray(probs, dtype=np.float64)
    return (probs if weights is None else probs * np.asarray(weights, dtype=np.float64)).argmax(axis=1)


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str] = CLASSES, *,
                           weights: np.ndarray | None = None) -> dict:
    """Scores of class probabilities `probs` (N, C) against integer labels `y_true` (N,); the predicted class is
    decide(probs, weights).

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

    y_pred = decide(probs, weights)
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


# ---------------------------------------------------------------------------------------------------------------
# The final test: headline metrics with a lesion-bootstrap interval


def bootstrap_balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray, groups: Sequence | None = None, *,
                                resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                                num_classes: int = NUM_CLASSES) -> tuple[float, float]:
    """95% percentile-bootstrap interval of balanced accuracy (mean recall over classes present in the resample).

    With `groups` (lesion ids) whole lesions are resampled with replacement, because images of one lesion are
    near-duplicates and resampling them independently would make the interval too narrow; without, images are.
    A resample is a count per group (multinomial), so each resample costs two matrix products, not a Python loop.
    Hand-written because scipy.stats.bootstrap and sklearn resample images, not lesions (clusters).
    """
    if len(y_true) == 0:
        return math.nan, math.nan
    scores = bootstrap_scores(y_true, [y_pred], groups, resamples=resamples, seed=seed, num_classes=num_classes)
    lo, hi = np.percentile(scores[:, 0], [2.5, 97.5])
    return float(lo), float(hi)


def bootstrap_difference(y_true: np.ndarray, y_pred_a: np.ndarray, y_pred_b: np.ndarray,
                         groups: Sequence | None = None, **kwargs) -> tuple[float, float]:
    """95% interval of balanced accuracy(a) - balanced accuracy(b) on the same resamples (paired): whether a beats
    b on this test set, which two overlapping single intervals cannot say."""
    if len(y_true) == 0:
        return math.nan, math.nan
    scores = bootstrap_scores(y_true, [y_pred_a, y_pred_b], groups, **kwargs)
    lo, hi = np.percentile(scores[:, 0] - scores[:, 1], [2.5, 97.5])
    return float(lo), float(hi)


def bootstrap_scores(y_true: np.ndarray, y_preds: Sequence[np.ndarray], groups: Sequence | None = None, *,
                     resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                     num_classes: int = NUM_CLASSES) -> np.ndarray:
    """(resamples, len(y_preds)) balanced accuracies of each prediction on the same lesion (or image) resamples."""
    y_true = np.asarray(y_true, dtype=np.int64)
    onehot = np.eye(num_classes)[y_true]
    hits = [onehot * (y_true == np.asarray(y_pred, dtype=np.int64))[:, None] for y_pred in y_preds]
    scores = []
    for weights in bootstrap_weights(len(y_true), groups, resamples=resamples, seed=seed):
        with np.errstate(invalid="ignore", divide="ignore"):
            support = weights @ onehot
            # nan for classes absent from the resample
            scores.append(np.stack([np.nanmean((weights @ h) / support, axis=1) for h in hits], axis=1))
    return np.concatenate(scores)


def bootstrap_weights(n: int, groups: Sequence | None = None, *, resamples: int = BOOTSTRAP_RESAMPLES,
                      seed: int = BOOTSTRAP_SEED) -> Iterator[np.ndarray]:
    """The bootstrap's draws, 100 resamples at a time: (B, n) counts of how often each of n images is drawn when whole
    lesions (`groups`) or, without groups, single images are resampled with replacement. Every interval here, and a
    score that needs more than a balanced accuracy (the melanoma operating points), resamples with these."""
    codes = np.arange(n) if groups is None else pd.factorize(pd.Series(list(groups)))[0]
    n_groups = int(codes.max()) + 1
    rng = np.random.default_rng(seed)
    for start in range(0, resamples, 100):
        counts = rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=min(100, resamples - start))
        yield counts[:, codes].astype(np.float64)


def evaluation_metrics(y_true: np.ndarray, probs: np.ndarray, groups: Sequence | None = None, *,
                       weights: np.ndarray | None = None) -> dict[str, Any]:
    """Headline metrics, per-class table, confusion matrix and the bootstrap CI of balanced accuracy (predicted
    class: decide(probs, weights))."""
    scores = classification_metrics(y_true, probs, weights=weights)
    lo, hi = bootstrap_balanced_accuracy(y_true, decide(probs, weights), groups)
    out: dict[str, Any] = {k: scores[k] for k in HEADLINE_METRICS}
    out["balanced_accuracy_ci95"] = [lo, hi]
    out["bootstrap"] = {"resamples": BOOTSTRAP_RESAMPLES, "seed": BOOTSTRAP_SEED, "method": "percentile",
                        "unit": "image" if groups is None else "lesion"}
    out["per_class"] = {c: {"precision": scores[f"precision_{c}"], "recall": scores[f"recall_{c}"],
                            "f1": scores[f"f1_{c}"], "support": int(scores[f"support_{c}"])} for c in CLASSES}
    out["confusion_matrix"] = scores["confusion_matrix"]
    return out


def classification_report_table(y_true: np.ndarray, probs: np.ndarray, *,
                                weights: np.ndarray | None = None) -> pd.DataFrame:
    return per_class_table(y_true, decide(probs, weights))


def summary_line(metrics: dict[str, Any]) -> str:
    lo, hi = metrics["balanced_accuracy_ci95"]
    return (f"accuracy {metrics['accuracy']:.4f}, balanced accuracy {metrics['balanced_accuracy']:.4f} "
            f"(95% CI {lo:.4f}-{hi:.4f}), macro F1 {metrics['macro_f1']:.4f}, macro AUC {metrics['macro_auc']:.4f}")


# ---------------------------------------------------------------------------------------------------------------
# Calibration: do the probabilities mean what they say? (hamtune.final.calibration fits the correction)


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the true classes."""
    labels = np.asarray(labels, dtype=np.int64)
    picked = np.asarray(probs, dtype=np.float64)[np.arange(len(labels)), labels]
    return float(-np.mean(np.log(np.clip(picked, TINY, None))))


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> pd.DataFrame:
    """Per equal-width confidence bin (top-class probability): count, mean confidence, accuracy."""
    probs = np.asarray(probs, dtype=np.float64)
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == np.asarray(labels)
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)  # (k/bins, (k+1)/bins]
    rows = []
    for k in range(bins):
        mask = which == k
        rows.append({"bin_low": k / bins, "bin_high": (k + 1) / bins, "count": int(mask.sum()),
                     "confidence": float(confidence[mask].mean()) if mask.any() else math.nan,
                     "accuracy": float(correct[mask].mean()) if mask.any() else math.nan})
    return pd.DataFrame(rows)


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE: the count-weighted mean |accuracy - confidence| over `bins` equal-width confidence bins."""
    table = reliability(probs, labels, bins)
    used = table[table["count"] > 0]
    return float((used["count"] * (used["accuracy"] - used["confidence"]).abs()).sum() / max(1, len(labels)))
