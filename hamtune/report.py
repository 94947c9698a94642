"""The files of an evaluation report: predictions and per-class tables, metrics.json, the two pictures, report.md.

retrain.py and inference.py compute; this module only writes what it is given, every file through hamtune.io
(atomically), so a report folder never holds half a file. Plots use matplotlib's Agg backend: no display needed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from hamtune.data.ham10000 import CLASSES, DIAGNOSES
from hamtune.io import atomic_write_bytes, atomic_write_json, save_figure, write_csv

PROB_PREFIX = "prob_"


def predictions_table(image_ids: Sequence[str], lesion_ids: Sequence[str | None] | None, y_true: np.ndarray | None,
                      probs: np.ndarray, classes: Sequence[str] = CLASSES, *,
                      weights: np.ndarray | None = None) -> pd.DataFrame:
    """One row per image: ids, true and predicted diagnosis code (metrics.decide), one probability column per class."""
    from hamtune.metrics import decide

    y_pred = decide(probs, weights)
    table = pd.DataFrame({"image_id": list(image_ids)})
    if lesion_ids is not None:
        table["lesion_id"] = list(lesion_ids)
    if y_true is not None:
        table["true_dx"] = [classes[i] for i in y_true]
    table["predicted_dx"] = [classes[i] for i in y_pred]
    for i, name in enumerate(classes):
        table[f"{PROB_PREFIX}{name}"] = probs[:, i]
    return table


def write_evaluation(out_dir: Path, predictions: pd.DataFrame, metrics: Mapping[str, Any],
                     classification_report: pd.DataFrame) -> list[Path]:
    """metrics.json, classification_report.csv, predictions.csv and confusion_matrix.png in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report = classification_report.reset_index().rename(columns={"index": "class"})
    written = [
        atomic_write_json(out_dir / "metrics.json", metrics),
        write_csv(out_dir / "classification_report.csv", report),
        write_csv(out_dir / "predictions.csv", predictions),
        plot_confusion_matrix(out_dir / "confusion_matrix.png", np.asarray(metrics["confusion_matrix"]),
                              title=f"n = {int(np.asarray(metrics['confusion_matrix']).sum())} images"),
    ]
    return written


# ---------------------------------------------------------------------------------------------------------------
# Pictures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion_matrix(path: Path, counts: np.ndarray, classes: Sequence[str] = CLASSES, title: str = "") -> Path:
    """Counts and row-normalised (recall per true class) side by side (scikit-learn's ConfusionMatrixDisplay)."""
    from sklearn.metrics import ConfusionMatrixDisplay

    plt = _pyplot()
    counts = np.asarray(counts, dtype=np.int64)
    rows = counts.sum(axis=1, keepdims=True)
    normalised = counts / np.maximum(rows, 1)  # a class with no true images shows a row of zeros
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.2))
    for ax, values, name, fmt in ((axes[0], counts, "counts", "d"), (axes[1], normalised, "row-normalised (recall)",
                                                                       ".2f")):
        ConfusionMatrixDisplay(values, display_labels=list(classes)).plot(
            ax=ax, cmap="Blues", values_format=fmt, xticks_rotation=45, colorbar=True)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(name)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path


def plot_training_curve(path: Path, histories: Mapping[Any, Sequence[Mapping[str, Any]]]) -> Path:
    """Training loss per epoch, one line per seed (int keys) or per named run (str keys, e.g. ensemble members);
    the retrain has no validation split to plot."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for seed, history in histories.items():
        epochs = [int(h["epoch"]) for h in history]
        losses = [float(h["train_loss"]) for h in history]
        ax.plot(epochs, losses, marker="o", ms=4, label=f"seed {seed}" if isinstance(seed, int) else str(seed))
    ax.set_xlabel("epoch")
    ax.set_ylabel("train loss")
    ax.set_title("retrain on train+val: training loss")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------------------
# report.md


def format_value(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def metrics_markdown(metrics: Mapping[str, Any]) -> str:
    """The headline metrics as a table: value (with CI) and, with several seeds, mean ± std across seeds."""
    across = metrics.get("across_seeds") or {}
    header = "| metric | value |" + (" mean ± std over seeds |" if across else "")
    lines = [header, "|---|---|" + ("---|" if across else "")]
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc"):
        value = format_value(metrics.get(key))
        if key == "balanced_accuracy" and metrics.get("balanced_accuracy_ci95"):
            lo, hi = metrics["balanced_accuracy_ci95"]
            value += f" (95% CI {format_value(lo)}–{format_value(hi)})"
        row = f"| {key} | {value} |"
        if across:
            s = across.get(key, {})
            row += f" {format_value(s.get('mean'))} ± {format_value(s.get('std'))} |"
        lines.append(row)
    return "\n".join(lines)


def per_class_markdown(classification_report: pd.DataFrame) -> str:
    lines = ["| class | diagnosis | precision | recall | F1 | support |", "|---|---|---|---|---|---|"]
    for name, row in classification_report.iterrows():
        lines.append(f"| {name} | {DIAGNOSES.get(name, '')} | {format_value(float(row['precision']))} | "
                     f"{format_value(float(row['recall']))} | {format_value(float(row['f1']))} | {int(row['support'])} |")
    return "\n".join(lines)


def write_report_md(path: Path, *, title: str, intro: Sequence[str], metrics: Mapping[str, Any],
                    classification_report: pd.DataFrame, sections: Sequence[tuple[str, str]] = (),
                    pictures: Sequence[tuple[str, str]] = (), files: Sequence[str] = ()) -> Path:
    """A short report tying the files together: intro lines, metrics, extra sections, pictures, file list."""
    parts = [f"# {title}", "", *intro, "", "## Test metrics" if "n_test" in metrics else "## Metrics", "",
             metrics_markdown(metrics), ""]
    boot = metrics.get("bootstrap")
    if boot:
        parts += [f"Balanced-accuracy CI: percentile bootstrap, {boot['resamples']} resamples (seed {boot['seed']}), "
                  f"resampling {boot['unit']}s{' (images of one lesion are correlated)' if boot['unit'] == 'lesion' else ''}.", ""]
    parts += ["### Per class", "", per_class_markdown(classification_report), ""]
    for heading, body in sections:
        parts += [f"## {heading}", "", body, ""]
    for caption, file in pictures:
        parts += [f"### {caption}", "", f"![{caption}]({file})", ""]
    if files:
        parts += ["## Files", "", *[f"- `{f}`" for f in files], ""]
    atomic_write_bytes(path, "\n".join(parts).encode())
    return path


def config_markdown(config: Mapping[str, Any], searched: Sequence[str] = ()) -> str:
    lines = ["| setting | value |", "|---|---|"]
    for key in sorted(config):
        mark = " (searched)" if key in searched else ""
        value = config[key]
        lines.append(f"| {key}{mark} | {f'{value:.4g}' if isinstance(value, float) else format_value(value)} |")
    return "\n".join(lines)
