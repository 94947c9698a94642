"""Figures of a final model (`hamtune best NAME --retrain --top K`) recomputed from its probabilities.npz and split.csv
with hamtune's own functions: members and ensemble with lesion-bootstrap intervals, the paired (ensemble - member)
intervals, ECE / NLL before, after a temperature alone and after the temperature + class-bias calibration, and the
ECE a perfectly calibrated model would show on the same test images (calibration_summary's ece_floor).
Also compares, on the calibration slice only (the data a choice may be made on), the argmax decision with the
"balanced" one (largest calibrated probability / class frequency).

    .venv/bin/python bench/final_model.py results/ham10000/best
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from hamtune.final.calibration import apply_calibration, argmax_preserving_weights, calibration_summary, fit_calibration, fit_temperature
from hamtune.training.metrics import bootstrap_difference, classification_metrics, decide, evaluation_metrics


def main(best_dir: Path) -> dict:
    saved = np.load(best_dir / "probabilities.npz")
    split = pd.read_csv(best_dir / "split.csv").set_index("image_id")
    lesions = split.loc[saved["test_image_ids"], "lesion_id"].tolist()
    y, cal_y = saved["test_labels"], saved["calibration_labels"]
    members, cal_members = saved["test_probs"], saved["calibration_probs"]
    raw, cal_raw = members.mean(axis=0), cal_members.mean(axis=0)
    temperature, bias = fit_calibration(cal_raw, cal_y)
    weights = argmax_preserving_weights(bias)
    probs = apply_calibration(raw, temperature, bias)
    ensemble = evaluation_metrics(y, probs, lesions, weights=weights)
    out = {"members": [], "ensemble": {k: ensemble[k] for k in ("balanced_accuracy", "balanced_accuracy_ci95",
                                                                "accuracy", "macro_auc")}}
    for k, (trial, test_k) in enumerate(zip(saved["trial_ids"], members)):
        m = evaluation_metrics(y, test_k, lesions)
        out["members"].append({"rank": k + 1, "trial_id": str(trial), "balanced_accuracy": m["balanced_accuracy"],
                               "balanced_accuracy_ci95": m["balanced_accuracy_ci95"], "accuracy": m["accuracy"],
                               "ensemble_minus_member_ci95": bootstrap_difference(
                                   y, decide(probs, weights), test_k.argmax(axis=1), lesions)})
    t_only = fit_temperature(cal_raw, cal_y)
    out["calibration"] = {"temperature": temperature, "class_bias": bias.tolist(), "temperature_only": t_only,
                          "test": calibration_summary(raw, y, temperature, bias),
                          "test_temperature_only": calibration_summary(raw, y, t_only),
                          "calibration_slice": calibration_summary(cal_raw, cal_y, temperature, bias)}
    # The decision rule, judged on the calibration slice only: plain argmax against largest p_cal / frequency.
    prior = np.bincount(cal_y, minlength=raw.shape[1]) / len(cal_y)
    rules = {}
    for name, c in [(f"member {k + 1}", c) for k, c in enumerate(cal_members)] + [("ensemble", cal_raw)]:
        t, b = fit_calibration(c, cal_y)
        rules[name] = {"argmax": classification_metrics(cal_y, c)["balanced_accuracy"],
                       "balanced": classification_metrics(cal_y, apply_calibration(c, t, b),
                                                          weights=1 / np.maximum(prior, 1e-12))["balanced_accuracy"]}
    out["decision_rule_on_calibration_slice"] = rules
    return out


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1])), indent=1))
