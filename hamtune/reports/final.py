"""The final model's report: what the retrain wrote about the model it made (report.md and the files beside it).

hamtune.final.retrain computes everything and hands it over as plain data (metrics, arrays, tables); this module
only writes: metrics.json, classification_report.csv, predictions.csv, the confusion matrix, the training curves,
the reliability diagram, the melanoma ROC curve, split.csv (which rows trained, calibrated and tested) and report.md
(with the audit: subgroups, melanoma operating points, model card).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from hamtune.io import save_figure, write_csv
from hamtune.reports.audit import audit_sections, format_value, write_audit_figures
from hamtune.reports.evaluation import (
    config_markdown, plot_training_curve, predictions_table, write_evaluation, write_report_md,
)
from hamtune.reports.plots import figure
from hamtune.training.metrics import HEADLINE_METRICS, classification_report_table, expected_calibration_error, reliability
from hamtune.vocab import CLASSES


def write_final_report(out_dir: Path, *, metrics: dict, searched: Sequence[str], test_rows: pd.DataFrame,
                       test_labels: np.ndarray, probs: np.ndarray, raw_probs: np.ndarray, weights: np.ndarray,
                       curves: Mapping[Any, list], split_rows: pd.DataFrame, calibrated: bool,
                       written: Sequence[Path] = ()) -> list[Path]:
    """Every report file of a retrain into out_dir; `written` are the files the retrain wrote itself (model.pt,
    probabilities.npz), listed in report.md too. Returns the files this call wrote."""
    out_dir.mkdir(parents=True, exist_ok=True)
    predictions = predictions_table(test_rows["image_id"], test_rows["lesion_id"], test_labels, probs, weights=weights)
    table = classification_report_table(test_labels, probs, weights=weights)
    files = write_evaluation(out_dir, predictions, metrics, table)
    files.append(plot_training_curve(out_dir / "training_curve.png", curves))
    pictures = [("Confusion matrix (test)", "confusion_matrix.png"), ("Training loss", "training_curve.png")]
    if calibrated:
        cal = metrics["calibration"]
        files.append(plot_reliability(out_dir / "reliability.png", test_labels, raw_probs, probs,
                                      title=f"test split, temperature {cal['temperature']:.3f} + class biases"))
        pictures.append(("Reliability on the test split, before and after calibration", "reliability.png"))
    files += write_audit_figures(out_dir, metrics)
    files.append(write_csv(out_dir / "split.csv", split_rows))

    ensemble = metrics["top"] > 1
    audit_before, audit_after = audit_sections(metrics)
    sections = []
    if "per_seed" in metrics:
        rows = ["| seed | " + " | ".join(HEADLINE_METRICS) + " | temperature |",
                "|---|" + "---|" * (len(HEADLINE_METRICS) + 1)]
        rows += [f"| {r['seed']} | " + " | ".join(format_value(r[k]) for k in HEADLINE_METRICS)
                 + f" | {r['temperature']:.3f} |" for r in metrics["per_seed"]]
        sections.append(("Seeds" + (" (the ensemble's scores)" if ensemble else ""), "\n".join(rows)))
    if ensemble:
        sections.append(("Members and ensemble (test split)", members_markdown(metrics, metrics["selected_by"])))
    sections += audit_before
    if calibrated:
        sections.append(("Calibration", calibration_markdown(metrics["calibration"])))
    sections.append(("Configuration" + (" of the best trial" if ensemble else ""),
                     config_markdown(metrics["config"], list(searched))))
    sections += audit_after
    names = [p.name for p in [*written, *files]] + ["report.md"]
    files.append(write_report_md(
        out_dir / "report.md", title=f"{metrics['experiment']}: final {'ensemble' if ensemble else 'model'}",
        intro=_intro(metrics, calibrated), metrics=metrics, classification_report=table, sections=sections,
        pictures=pictures, files=names))
    return files


def _intro(metrics: dict, calibrated: bool) -> list[str]:
    split = metrics["split"]
    ensemble = metrics["top"] > 1
    trial_ids = ", ".join(f"`{t}`" for t in metrics["trial_ids"])
    epochs_text = ", ".join(str(m["epochs"]) for m in metrics["members"])
    if ensemble:
        trained = (f"An ensemble of the top {metrics['top']} trials of experiment `{metrics['experiment']}` (by "
                   f"{metrics['selected_by']}, {metrics['mode']}: {trial_ids}), each retrained")
    else:
        trained = (f"Best trial `{metrics['trial_id']}` of experiment `{metrics['experiment']}` (by "
                   f"{metrics['selected_by']}, {metrics['mode']}), retrained")
    intro = [
        f"{trained} on train+val for {epochs_text} epochs"
        + (", probabilities averaged," if ensemble else "") + " and evaluated once on the test split.",
        "",
        f"- train+val: {split['train_val']['images']} images, {split['train_val']['lesions']} lesions; "
        f"test: {split['test']['images']} images, {split['test']['lesions']} lesions; no image and no lesion in both "
        "(checked before training; rows in `split.csv`).",
    ]
    if calibrated:
        cal = metrics["calibration"]
        intro.append(
            f"- calibration: {split['calibration']['images']} images / {split['calibration']['lesions']} lesions "
            f"({cal['fraction']:.0%} of train+val, whole lesions, per diagnosis) were held back from training and "
            f"used only to fit the calibration (T = {cal['temperature']:.3f} and one bias per class); the networks "
            "trained on the other "
            f"{split['train']['images']} images. The search's val split could not serve (the retrain trains on it) "
            "and the test split must stay unseen.")
    intro += [
        f"- seeds: {', '.join(map(str, metrics['seeds']))}; `model.pt`, `predictions.csv` and the per-class figures "
        f"are from seed {metrics['model_seed']}." + (" Test-time augmentation: flips averaged." if metrics["tta"] else ""),
        f"- data: fingerprint `{metrics['data']['fingerprint']}`, cache `{metrics['data']['cache']}`.",
    ]
    return intro


def plot_reliability(path: Path, labels: np.ndarray, before: np.ndarray, after: np.ndarray, *, title: str = "") -> Path:
    """Reliability diagram (accuracy against confidence per bin), before and after calibration."""
    fig = figure((9, 4.2))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, probs, name in ((axes[0], before, "before"), (axes[1], after, "after")):
        table = reliability(probs, labels)
        used = table[table["count"] > 0]
        centres = (table["bin_low"] + table["bin_high"]) / 2
        ax.bar(centres, table["accuracy"].fillna(0), width=1 / len(table), edgecolor="#1f4e79", color="#8aa9cc",
               label="accuracy")
        ax.plot([0, 1], [0, 1], "--", color="#888888", label="perfect calibration")
        ax.plot(used["confidence"], used["accuracy"], "o", color="#c0392b", markersize=4,
                label="bin: (mean confidence, accuracy)")
        ece = expected_calibration_error(probs, labels)
        ax.set_title(f"{name} calibration (ECE {ece:.3f})")
        ax.set_xlabel("confidence (top-class probability)")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="upper left", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def members_markdown(metrics: dict, metric: str) -> str:
    """Every member and the ensemble side by side: search score, test scores with the balanced-accuracy interval."""
    def ci(row: dict) -> str:
        lo, hi = row["balanced_accuracy_ci95"]
        return f"{row['balanced_accuracy']:.4f} ({lo:.4f}–{hi:.4f})"

    def gain(row: dict) -> str:
        lo, hi = row["ensemble_minus_member_ci95"]
        return f"{metrics['balanced_accuracy'] - row['balanced_accuracy']:+.4f} ({lo:+.4f} to {hi:+.4f})"

    lines = [f"| model | trial | search {metric} | accuracy | balanced accuracy (95% CI) | macro F1 | macro AUC | "
             "ensemble minus member, balanced accuracy (paired 95% CI) |", "|---|---|---|---|---|---|---|---|"]
    for m in metrics["members"]:
        lines.append(f"| member {m['rank']} | `{m['trial_id']}` | {m[f'search_{metric}']:.4f} | {m['accuracy']:.4f} | "
                     f"{ci(m)} | {m['macro_f1']:.4f} | {format_value(m['macro_auc'])} | {gain(m)} |")
    lines.append(f"| **ensemble** (mean probabilities, calibrated) | all | – | {metrics['accuracy']:.4f} | "
                 f"{ci(metrics)} | {metrics['macro_f1']:.4f} | {format_value(metrics['macro_auc'])} | – |")
    lines += ["", f"Seed {metrics['model_seed']}. The calibration changes no prediction (each diagnosis is the argmax "
              "of the uncalibrated probabilities), so accuracy, balanced accuracy and F1 are those of the plain "
              "average; members' AUCs are of their own uncalibrated probabilities. The last column resamples the "
              "same lesions for the ensemble and the member: an interval above 0 means the ensemble beats that member "
              "on this test set."]
    return "\n".join(lines)


def calibration_markdown(cal: dict) -> str:
    """The calibration, and ECE / NLL before and after on the held-back slice and on the test split, beside what a
    temperature alone would have done."""
    bias = ", ".join(f"{c} {b:+.2f}" for c, b in zip(CLASSES, cal["class_bias"]))
    weights = ", ".join(f"{c} {w:.2f}" for c, w in zip(CLASSES, cal["decision_weights"]))
    only = cal["temperature_only"]
    lines = [f"p -> softmax(log p / T + b) with T = {cal['temperature']:.3f} and class biases b: {bias}; fitted "
             "together by negative log-likelihood on the held-back slice only (bias-corrected temperature scaling: "
             "the biases undo the class mix that weighted losses and oversampling teach a network). The predicted "
             f"diagnosis is the largest probability times its decision weight ({weights}, = exp(-b)): the argmax of "
             "the uncalibrated probabilities, so no prediction changes. ECE: "
             f"{cal['bins']} equal-width confidence bins. For comparison, a temperature alone "
             f"(T = {only['temperature']:.3f}).",
             "", "| data | images | ECE before | ECE, temperature alone | ECE after | ECE of a perfectly calibrated "
             "model (90% range) | NLL before | NLL, temperature alone | NLL after |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key, name in (("calibration_slice", "held-back slice (fitted on)"), ("test", "test split")):
        s, t = cal[key], only[key]
        lo, hi = s["ece_floor"]["p5_p95"]
        lines.append(f"| {name} | {s['n']} | {s['ece_before']:.4f} | {t['ece_after']:.4f} | {s['ece_after']:.4f} | "
                     f"{s['ece_floor']['median']:.4f} ({lo:.4f}–{hi:.4f}) | {s['nll_before']:.4f} | "
                     f"{t['nll_after']:.4f} | {s['nll_after']:.4f} |")
    lines += ["", "The perfectly calibrated model's ECE: labels drawn from the calibrated probabilities themselves, "
              f"{cal['test']['ece_floor']['draws']} times; an ECE inside that range is as good as this many images "
              "can show."]
    return "\n".join(lines)
