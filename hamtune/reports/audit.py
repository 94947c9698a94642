"""The audit of a final test in report.md: subgroups, melanoma versus rest (with roc_melanoma.png), the model card.

hamtune.final.audit computes the three metrics.json entries (subgroups, melanoma_operating_points, model_card) as
plain dicts; this module only renders them, so report.md and metrics.json always say the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hamtune.io import save_figure
from hamtune.reports.plots import figure

ROC_FIGURE = "roc_melanoma.png"


def format_value(value: Any) -> str:
    """A score to 4 decimals, a missing one (None, NaN) as "–", anything else as it prints (hamtune.reports.evaluation
    writes report.md's other tables with this, importing it from here)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _interval(value: Any, ci: Any) -> str:
    if value is None or not ci:
        return format_value(value)
    return f"{format_value(value)} ({format_value(ci[0])}–{format_value(ci[1])})"


def subgroups_markdown(subgroups: Mapping[str, Any]) -> str:
    """One table per attribute (sex, age band, body site, diagnosis confirmation); a subgroup with too few lesions
    keeps its row, with its size and the reason it is not scored."""
    unit, least = subgroups["unit"], subgroups["min_lesions"]
    boot = subgroups["bootstrap"]
    lines = [(f"Balanced accuracy is the {subgroups['balanced_accuracy']}; 95% interval: percentile bootstrap, "
              f"{boot['resamples']} resamples (seed {boot['seed']}), resampling {unit}s within the subgroup. A subgroup "
              f"with fewer than {least} {unit}s is listed but not scored: its interval would span most of [0, 1].")]
    if unit == "image":
        lines[0] += " The labels carry no lesion ids, so every image counts as a lesion here."
    for attribute in subgroups["attributes"].values():
        lines += ["", f"### By {attribute['title']}", ""]
        if not attribute["available"]:
            lines.append(f"Not recorded: the labels carry no {attribute['title']} for these images.")
            continue
        lines += [(f"| {attribute['title']} | images | {unit}s | diagnoses present | balanced accuracy (95% CI) | "
                   "accuracy |"), "|---|---|---|---|---|---|"]
        for g in attribute["groups"]:
            scored = (_interval(g["balanced_accuracy"], g["balanced_accuracy_ci95"]) if g["enough_lesions"]
                      else f"{g['note']} ({g['lesions']} < {least} {unit}s)")
            lines.append(f"| {g['group']} | {g['images']} | {g['lesions']} | {', '.join(g['diagnoses'])} | {scored} | "
                         f"{format_value(g['accuracy'])} |")
    return "\n".join(lines)


def melanoma_markdown(points: Mapping[str, Any], figure_file: str | None = ROC_FIGURE) -> str:
    """Sensitivity at each target specificity with its interval and threshold, the ROC AUC, and the ROC figure."""
    if not points["available"]:
        return f"Not computed: {points['reason']}."
    pos, neg = points["positives"], points["negatives"]
    boot = points["bootstrap"]
    lines = [(f"Melanoma (mel) against the other six diagnoses, ranked by the {points['score']}: {pos['images']} "
              f"melanoma images ({pos['lesions']} lesions) and {neg['images']} others ({neg['lesions']} lesions). "
              f"ROC AUC {_interval(points['roc_auc'], points['roc_auc_ci95'])}."), "",
             ("| target specificity | sensitivity (95% CI) | specificity reached | threshold: mel when P(mel) ≥ | "
              "melanomas flagged | others flagged |"), "|---|---|---|---|---|---|"]
    for p in points["operating_points"]:
        threshold = "none (above every score)" if p["threshold"] is None else f"{p['threshold']:.4f}"
        lines.append(f"| {p['target_specificity']:.0%} | {_interval(p['sensitivity'], p['sensitivity_ci95'])} | "
                     f"{p['specificity']:.4f} | {threshold} | {p['true_positives']} / {pos['images']} | "
                     f"{p['false_positives']} / {neg['images']} |")
    lines += ["", ("Each threshold is the one that reaches the target specificity with the highest sensitivity on "
               f"{points['threshold_chosen_on']}. Intervals: percentile bootstrap, {boot['resamples']} resamples "
               f"(seed {boot['seed']}) of {boot['unit']}s, the threshold {boot['threshold']}.")]
    if points.get("note"):
        lines += ["", f"Few melanomas: {points['note']}."]
    if figure_file:
        lines += ["", f"![ROC curve, melanoma versus rest]({figure_file})"]
    return "\n".join(lines)


def model_card_markdown(card: Mapping[str, Any]) -> str:
    """Intended use, the model, data and splits, the headline metrics and where the rest are, known limits."""
    head = card["metrics"]["headline"]
    model = ", ".join(f"{k.replace('_', ' ')} " + ({True: "yes", False: "no"}[v] if isinstance(v, bool)
                                                   else format_value(v)) for k, v in card["model"].items())
    splits = "; ".join(f"{name.replace('_', '+')}: {s['images']} images"
                       + (f", {s['lesions']} lesions" if s.get("lesions") is not None else "")
                       for name, s in card["data"]["splits"].items() if isinstance(s, Mapping))
    lines = [f"**Intended use.** {card['intended_use']}", "",
             f"**Not intended for.** {card['not_intended_for']}", "",
             f"**Model.** {model}.", "",
             (f"**Data and splits.** Source `{card['data']['source']}`; {splits}; grouping "
              f"{card['data']['grouping']}."), "",
             f"**Metrics** (on {card['metrics']['evaluated_on']}). Balanced accuracy "
             f"{_interval(head['balanced_accuracy'], head['balanced_accuracy_ci95'])}, accuracy "
             f"{format_value(head['accuracy'])}, macro F1 {format_value(head['macro_f1'])}, macro AUC "
             f"{format_value(head['macro_auc'])}, melanoma ROC AUC {format_value(head['melanoma_roc_auc'])}. "
             + " ".join(f"{what.replace('_', ' ').capitalize()}: {where}." for what, where
                        in card["metrics"]["where"].items()), "",
             "**Known limits.**", ""]
    lines += [f"- {limit}" for limit in card["limits"]]
    return "\n".join(lines)


def audit_sections(metrics: Mapping[str, Any]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """The report's sections from metrics' audit entries: (sections before the configuration, the model card at the
    end); empty when metrics carry none."""
    before, after = [], []
    if "subgroups" in metrics:
        before.append(("Subgroups", subgroups_markdown(metrics["subgroups"])))
    if "melanoma_operating_points" in metrics:
        points = metrics["melanoma_operating_points"]
        before.append(("Melanoma versus rest", melanoma_markdown(points, ROC_FIGURE if points["available"] else None)))
    if "model_card" in metrics:
        after.append(("Model card", model_card_markdown(metrics["model_card"])))
    return before, after


def write_audit_figures(out_dir: Path, metrics: Mapping[str, Any]) -> list[Path]:
    """roc_melanoma.png when metrics carry melanoma operating points that could be computed."""
    points = metrics.get("melanoma_operating_points")
    if not points or not points["available"]:
        return []
    return [plot_roc_melanoma(Path(out_dir) / ROC_FIGURE, points)]


def plot_roc_melanoma(path: Path, points: Mapping[str, Any]) -> Path:
    """The ROC curve of melanoma versus rest, the chance diagonal, and the operating points of the table."""
    fig = figure((5.6, 5.2))
    ax = fig.subplots()
    curve = points["roc_curve"]
    ax.plot(curve["fpr"], curve["tpr"], color="#1f4e79", lw=2,
            label=f"ROC, AUC {points['roc_auc']:.3f}")
    ax.plot([0, 1], [0, 1], "--", color="#888888", label="chance")
    for p, marker, colour in zip(points["operating_points"], "osD", ("#c0392b", "#e67e22", "#8e44ad")):
        ax.plot([1.0 - p["specificity"]], [p["sensitivity"]], marker, color=colour, markersize=6, linestyle="none",
                label=f"{p['target_specificity']:.0%} specificity: sensitivity {p['sensitivity']:.2f}")
    ax.set_xlabel("1 - specificity (other diagnoses flagged as melanoma)")
    ax.set_ylabel("sensitivity (melanomas flagged)")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_title(f"melanoma versus rest ({points['positives']['images']} mel, "
                 f"{points['negatives']['images']} other images)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
