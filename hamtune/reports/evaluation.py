"""The files of an evaluation report: predictions and per-class tables, metrics.json, the confusion matrix, report.md
(with the audit's sections and ROC figure, hamtune.reports.audit, when the metrics carry them).

hamtune.final.retrain and hamtune.final.inference compute; this module only writes what it is given, every file
through hamtune.io (atomically), so a report folder never holds half a file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from hamtune.io import atomic_write_bytes, atomic_write_json, save_figure, write_csv
from hamtune.reports.audit import audit_sections, format_value, write_audit_figures
from hamtune.reports.plots import figure
from hamtune.training.metrics import classification_report_table, decide
from hamtune.vocab import CLASSES, DIAGNOSES

PROB_PREFIX = "prob_"


def predictions_table(image_ids: Sequence[str], lesion_ids: Sequence[str | None] | None, y_true: np.ndarray | None,
                      probs: np.ndarray, classes: Sequence[str] = CLASSES, *,
                      weights: np.ndarray | None = None) -> pd.DataFrame:
    """One row per image: ids, true and predicted diagnosis code (metrics.decide), one probability column per class."""
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


def plot_confusion_matrix(path: Path, counts: np.ndarray, classes: Sequence[str] = CLASSES, title: str = "") -> Path:
    """Counts and row-normalised (recall per true class) side by side (scikit-learn's ConfusionMatrixDisplay)."""
    from sklearn.metrics import ConfusionMatrixDisplay

    counts = np.asarray(counts, dtype=np.int64)
    rows = counts.sum(axis=1, keepdims=True)
    normalised = counts / np.maximum(rows, 1)  # a class with no true images shows a row of zeros
    fig = figure((12, 5.2))
    axes = fig.subplots(1, 2)
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
    return save_figure(fig, path)


def plot_training_curve(path: Path, histories: Mapping[Any, Sequence[Mapping[str, Any]]]) -> Path:
    """Training loss per epoch, one line per seed (int keys) or per named run (str keys, e.g. ensemble members);
    the retrain has no validation split to plot."""
    fig = figure((6.5, 4))
    ax = fig.subplots()
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
    return save_figure(fig, path)


# ---------------------------------------------------------------------------------------------------------------
# report.md


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


def write_external_evaluation(out_dir: Path, metrics: Mapping[str, Any], *, image_ids: Sequence[str],
                              lesion_ids: Sequence[str] | None, y_true: np.ndarray, probs: np.ndarray,
                              weights: np.ndarray, submitted: int, also_written: Sequence[Path]) -> list[Path]:
    """The files of `hamtune evaluate` (a saved model on an external labelled set): the evaluation files and a
    report.md that says what was scored and how; also_written are the evaluation's own files (lists, submission)."""
    predictions = predictions_table(image_ids, lesion_ids, y_true, probs, weights=weights)
    table = classification_report_table(y_true, probs, weights=weights)
    written = write_evaluation(out_dir, predictions, metrics, table) + write_audit_figures(out_dir, metrics)
    written += list(also_written)
    zero_weight = metrics["zero_weight_images"]
    size = metrics["image_size"]
    intro = [
        f"Model `{metrics['model']}` ({metrics['model_name']}, {size}px, trained on data `{metrics['trained_on']}`) "
        f"on {metrics['n_test']} labelled images from `{metrics['images']}` (labels: `{metrics['labels']}`, "
        f"{metrics['label_format']} form).",
        "",
        f"- {metrics['unlabelled_images']} image(s) without a label, {metrics['missing_images']} label(s) without an "
        f"image, {metrics['unreadable_images']} unreadable image(s): listed in `unlabelled_images.csv`, "
        "`missing_images.csv`, `unreadable_images.csv`.",
        f"- images decoded as for training: short side to {size}px, centre square "
        "(hamtune.data.images.decode_image)" + ("; test-time augmentation: flips averaged." if metrics["tta"] else "."),
        f"- {describe_model(metrics)}",
        f"- `submission.csv`: all {submitted} images in the ISIC 2018 Task 3 submission format, scored by the "
        "challenge's own `isic-challenge-scoring classification TRUTH submission.csv`; since that scorer takes each "
        "row's argmax as the diagnosis, it holds the probabilities times the decision weights (renormalised), whose "
        "argmax is this model's decision; `predictions.csv` has the calibrated probabilities themselves.",
    ]
    if zero_weight:
        intro.append(f"- {', '.join(zero_weight)}: zero weight, as the official scorer gives it on the ISIC 2018 "
                     "Task 3 test set, so it is left out of every metric here (it stays in `submission.csv`).")
    before, after = audit_sections(metrics)
    written.append(write_report_md(
        out_dir / "report.md", title=f"Evaluation on {Path(metrics['images']).name}", intro=intro, metrics=metrics,
        classification_report=table, sections=before + after, pictures=[("Confusion matrix", "confusion_matrix.png")],
        files=[p.name for p in written] + ["report.md"]))
    return written


def describe_model(metrics: Mapping[str, Any]) -> str:
    """One line on what produced the probabilities and the decisions: members averaged, calibration applied."""
    members = (f"{metrics['members']} networks ({metrics['model_name']}), probabilities averaged"
               if metrics["members"] > 1 else "one network")
    calibrated = metrics["temperature"] != 1.0 or any(b != 0 for b in metrics["class_bias"])
    scaling = (f"calibrated with temperature T = {metrics['temperature']:.3f} and one bias per class (fitted on data "
               "held back from training)" if calibrated else "no calibration")
    rule = ("the predicted diagnosis is the networks' own (the argmax before calibration, which the search selected "
            "for), not always the most probable after it" if any(w != 1.0 for w in metrics["decision_weights"])
            else "the predicted diagnosis is the most probable one")
    return f"model: {members}; {scaling}; {rule}."
