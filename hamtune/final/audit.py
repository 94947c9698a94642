"""What a dermatology reviewer asks of a final test beyond the headline: does the model hold up in every patient
subgroup (sex, age band, body site, how the diagnosis was confirmed), how sensitive is it to melanoma at the
specificities a clinic would run it at, and what is it for and where does it stop (the model card).

Plain functions over the tested rows, their labels and probabilities, returning plain dicts: metrics.json keeps them
as they are and hamtune.reports.audit renders them. Scores come from hamtune.training.metrics (classification_metrics,
decide, the lesion bootstrap of balanced accuracy) and ROC from scikit-learn; the melanoma operating points re-choose
their threshold in every resample, so they resample with the bootstrap's own draws (bootstrap_weights: the same
lesions, the same seed as every other interval of the report).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import auc, roc_auc_score, roc_curve

from hamtune.training.metrics import (
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    bootstrap_balanced_accuracy,
    bootstrap_weights,
    classification_metrics,
    decide,
)
from hamtune.vocab import CLASSES, DX_TYPES, HAM10000_FREQUENCIES, SEXES

MIN_LESIONS = 10  # below this a subgroup's interval spans most of [0, 1]: listed, not scored
TOO_FEW = "too few lesions to say anything"
AGE_BANDS = ("<30", "30-49", "50-69", "70+")
UNKNOWN = "unknown"
SPECIFICITIES = (0.80, 0.90, 0.95)
MELANOMA = CLASSES.index("mel")
# The subgroup attributes: the table column and how the report names it.
ATTRIBUTES = {"sex": "sex", "age": "age band", "localization": "body site", "dx_type": "diagnosis confirmation"}

INTENDED_USE = ("Research on automated classification of dermoscopic images of pigmented skin lesions into the seven "
                "HAM10000 diagnoses. Not a medical device and not for diagnosis: it must not decide, or be shown as "
                "deciding, the care of any patient.")
NOT_INTENDED = ("Screening or triage of patients; clinical (non-dermoscopic) photographs; lesions outside the seven "
                "diagnoses (the model always answers one of them); populations unlike HAM10000's.")


def age_bands(ages: pd.Series) -> pd.Series:
    """Age in years -> "<30", "30-49", "50-69", "70+"; missing or unreadable -> "unknown"."""
    years = pd.to_numeric(pd.Series(ages), errors="coerce")
    bands = pd.cut(years, [-np.inf, 30, 50, 70, np.inf], right=False, labels=list(AGE_BANDS))
    return bands.astype(object).where(bands.notna(), UNKNOWN).astype(str)


def _values(rows: pd.DataFrame, column: str) -> pd.Series | None:
    """The subgroup of each row for one attribute, or None when the rows carry no such information at all."""
    if column not in rows.columns:
        return None
    if column == "age":
        values = age_bands(rows["age"])
    else:
        text = rows[column].astype(object).where(rows[column].notna(), "").astype(str).str.strip().str.lower()
        values = text.where(text != "", UNKNOWN)
    return None if (values == UNKNOWN).all() else values.reset_index(drop=True)


def _order(attribute: str, values: pd.Series) -> list[str]:
    """Groups in a reader's order: the vocabulary's for sex, age and confirmation, largest first for body site;
    "unknown" last."""
    counts = values.value_counts()
    known = {"sex": SEXES, "age": AGE_BANDS, "dx_type": DX_TYPES}.get(attribute, ())
    first = [g for g in known if g in counts.index and g != UNKNOWN]
    rest = sorted((g for g in counts.index if g not in first and g != UNKNOWN), key=lambda g: (-counts[g], g))
    return first + rest + ([UNKNOWN] if UNKNOWN in counts.index else [])


def subgroup_performance(rows: pd.DataFrame, y_true: np.ndarray, probs: np.ndarray, *,
                         weights: np.ndarray | None = None, min_lesions: int = MIN_LESIONS) -> dict[str, Any]:
    """Images, lesions, balanced accuracy (lesion-bootstrap 95% interval) and accuracy per subgroup of each attribute.

    `rows` are the tested rows in the order of y_true / probs (columns lesion_id, dx_type, age, sex, localization;
    any may be missing). Balanced accuracy is the mean recall over the diagnoses present in the subgroup, so a
    subgroup of one diagnosis (follow_up is nearly all nv) scores that diagnosis' recall alone. A subgroup with fewer
    than `min_lesions` lesions is listed with its size and no scores.
    """
    rows = rows.reset_index(drop=True)
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = decide(probs, weights)
    lesions = rows["lesion_id"] if "lesion_id" in rows.columns and rows["lesion_id"].notna().all() else None
    unit = "image" if lesions is None else "lesion"
    attributes = {}
    for attribute, title in ATTRIBUTES.items():
        values = _values(rows, attribute)
        if values is None:
            attributes[attribute] = {"title": title, "available": False, "groups": []}
            continue
        groups = []
        for group in _order(attribute, values):
            mask = (values == group).to_numpy()
            units = pd.Series(lesions[mask]).nunique() if lesions is not None else int(mask.sum())
            entry = {"group": group, "images": int(mask.sum()), "lesions": int(units),
                     "diagnoses": [CLASSES[c] for c in np.unique(y_true[mask])], "enough_lesions": units >= min_lesions,
                     "balanced_accuracy": None, "balanced_accuracy_ci95": None, "accuracy": None, "note": None}
            if units >= min_lesions:
                scores = classification_metrics(y_true[mask], np.asarray(probs)[mask], weights=weights)
                lo, hi = bootstrap_balanced_accuracy(y_true[mask], y_pred[mask],
                                                     None if lesions is None else list(lesions[mask]))
                entry |= {"balanced_accuracy": scores["balanced_accuracy"], "balanced_accuracy_ci95": [lo, hi],
                          "accuracy": scores["accuracy"]}
            else:
                entry["note"] = TOO_FEW
            groups.append(entry)
        attributes[attribute] = {"title": title, "available": True, "groups": groups}
    return {"available": any(a["available"] for a in attributes.values()), "unit": unit, "min_lesions": min_lesions,
            "balanced_accuracy": "mean recall over the diagnoses present in the subgroup",
            "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "seed": BOOTSTRAP_SEED, "method": "percentile",
                          "unit": unit},
            "attributes": attributes}


def _at_specificity(fpr: np.ndarray, tpr: np.ndarray, target: float) -> int:
    """Index of the ROC point with the highest sensitivity whose specificity reaches `target` (fpr rises along the
    curve, so the last point that qualifies)."""
    return int(np.flatnonzero(1.0 - fpr >= target - 1e-12)[-1])


def melanoma_operating_points(y_true: np.ndarray, probs: np.ndarray, lesions: Sequence | None = None, *,
                              specificities: Sequence[float] = SPECIFICITIES, resamples: int = BOOTSTRAP_RESAMPLES,
                              seed: int = BOOTSTRAP_SEED, tested: str = "the evaluated rows") -> dict[str, Any]:
    """Melanoma versus the rest, scored by the probability of mel: ROC AUC, and the sensitivity at each specificity
    in `specificities` with the threshold that gives it (mel when P(mel) >= threshold). `tested` names the rows in
    what the report says.

    The thresholds are chosen on these very rows, so the sensitivities are what the best threshold for this set
    achieves, optimistic for new data. Intervals: percentile lesion bootstrap, the threshold re-chosen in each
    resample (the uncertainty of "sensitivity at 90% specificity" itself, not of one fixed threshold).
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    positive = y_true == MELANOMA
    score = np.asarray(probs, dtype=np.float64)[:, MELANOMA]
    if positive.all() or not positive.any():
        return {"available": False, "reason": f"the {len(y_true)} images are all {'' if positive.all() else 'not '}"
                                              "melanoma; an ROC needs both"}
    fpr, tpr, thresholds = roc_curve(positive, score, drop_intermediate=False)
    picked = [_at_specificity(fpr, tpr, s) for s in specificities]
    drawn_sensitivity, drawn_auc = [], []
    for batch in bootstrap_weights(len(y_true), lesions, resamples=resamples, seed=seed):
        for counts in batch:
            drawn_pos, drawn_neg = counts[positive].sum(), counts[~positive].sum()
            if drawn_pos == 0 or drawn_neg == 0:  # a resample without melanoma (or without the rest) has no ROC
                drawn_sensitivity.append([np.nan] * len(specificities))
                drawn_auc.append(np.nan)
                continue
            f, t, _ = roc_curve(positive, score, sample_weight=counts, drop_intermediate=False)
            drawn_sensitivity.append([t[_at_specificity(f, t, s)] for s in specificities])
            drawn_auc.append(auc(f, t))
    drawn_sensitivity = np.asarray(drawn_sensitivity)
    points = []
    for k, (target, i) in enumerate(zip(specificities, picked)):
        lo, hi = np.nanpercentile(drawn_sensitivity[:, k], [2.5, 97.5])
        # the first ROC point flags nothing (sklearn's threshold there is inf, written as null)
        threshold = float(thresholds[i]) if np.isfinite(thresholds[i]) else None
        points.append({"target_specificity": float(target), "threshold": threshold,
                       "sensitivity": float(tpr[i]), "specificity": float(1.0 - fpr[i]),
                       "sensitivity_ci95": [float(lo), float(hi)],
                       "true_positives": round(float(tpr[i] * positive.sum())),
                       "false_positives": round(float(fpr[i] * (~positive).sum()))})
    curve_fpr, curve_tpr, _ = roc_curve(positive, score)  # the figure's points (collinear ones dropped)
    unit = "image" if lesions is None else "lesion"
    group_ids = pd.Series(range(len(y_true)) if lesions is None else list(lesions))
    auc_lo, auc_hi = np.nanpercentile(drawn_auc, [2.5, 97.5])
    n_mel = int(group_ids[positive].nunique())
    return {
        "available": True, "score": "probability of mel the model file gives (calibrated when it carries a calibration)",
        "positives": {"images": int(positive.sum()), "lesions": n_mel},
        "negatives": {"images": int((~positive).sum()), "lesions": int(group_ids[~positive].nunique())},
        "roc_auc": float(roc_auc_score(positive, score)), "roc_auc_ci95": [float(auc_lo), float(auc_hi)],
        "operating_points": points,
        "threshold_chosen_on": f"{tested} itself (optimistic for new data)",
        "note": None if n_mel >= MIN_LESIONS else (f"only {n_mel} melanoma {unit}s, each worth about {1 / n_mel:.0%} "
                                                   "of sensitivity: the intervals are wide"),
        "bootstrap": {"resamples": resamples, "seed": seed, "method": "percentile", "unit": unit,
                      "threshold": "re-chosen in each resample"},
        "roc_curve": {"fpr": curve_fpr.tolist(), "tpr": curve_tpr.tolist()},
    }


def confirmation_mix(rows: pd.DataFrame) -> dict[str, dict[str, float]]:
    """How the diagnoses of `rows` were confirmed (dx_type): images and fraction per kind; {} when unrecorded."""
    values = _values(rows, "dx_type")
    if values is None:
        return {}
    counts = values.value_counts()
    return {g: {"images": int(counts[g]), "fraction": float(counts[g] / len(values))}
            for g in _order("dx_type", values)}


def model_card(*, metrics: Mapping[str, Any], rows: pd.DataFrame, splits: Mapping[str, Any], source: str,
               model: Mapping[str, Any], external: bool = False) -> dict[str, Any]:
    """What the model is for, what it was trained and tested on, how well it did, and where it stops.

    `metrics` holds the headline scores and the melanoma operating points, `rows` the tested rows, `splits` images
    and lesions per split, `source` the data ("synthetic" or a folder), `model` a short description of the network.
    external: `rows` are a labelled set scored with a saved model (`hamtune evaluate`), not the retrain's test split.
    """
    mix = confirmation_mix(rows)
    tested = "the evaluated set" if external else "the test split"
    mel = metrics.get("melanoma_operating_points") or {}
    headline = {k: metrics.get(k) for k in ("balanced_accuracy", "balanced_accuracy_ci95", "accuracy", "macro_f1",
                                            "macro_auc")}
    headline["melanoma_roc_auc"] = mel.get("roc_auc")
    limits = []
    if source == "synthetic":
        limits.append("Synthetic data: trained and tested on hamtune's generated HAM10000-shaped images, not on "
                      "dermoscopy; these numbers check the pipeline and say nothing about skin lesions.")
    limits += [
        ("No skin-type labels: HAM10000 records no Fitzpatrick skin type (nor ethnicity), and its patients come from "
         "predominantly fair-skinned populations; how the model does on darker skin is unknown and cannot be "
         "measured on this data."),
        ("Dermoscopic images only: not clinical close-ups, wide-field or smartphone photographs, and only lesions of "
         "the seven diagnoses (anything else is still given one of them)."),
        ("Two sites: HAM10000 comes mostly from two places, the Department of Dermatology of the Medical University "
         "of Vienna (Austria) and a skin-cancer practice in Queensland (Australia), with their devices, patients and "
         "selection of which lesions were photographed."),
        "Diagnoses are confirmed by histopathology for only part of the images; the others by follow-up, expert "
        f"consensus or confocal microscopy. In {tested}: "
        + (", ".join(f"{g} {v['fraction']:.0%} ({v['images']} images)" for g, v in mix.items()) if mix
           else "not recorded (the labels carry no dx_type)") + ".",
        ("The evaluated set is whatever the labels file names; the model file cannot tell whether it overlaps the "
         "model's training images (HAM10000 images scored by a model trained on HAM10000 probably do, and then this "
         "is no test)." if external else
         "The test split is a lesion-grouped, held-out part of the same data set (same sites, devices and era), not "
         "an external set: expect lower performance on another clinic's images, and measure it there."),
        "The probabilities answer for the training data's mix of diagnoses (HAM10000's: "
        + ", ".join(f"{c} {HAM10000_FREQUENCIES[c]:.0%}" for c in ("nv", "mel", "bkl")) + ", ...): where melanoma is "
        "more or less common (a screening or a referral clinic) the probabilities, and the share of flagged lesions "
        "that are melanoma at any threshold, do not carry over.",
        ("Melanoma thresholds in this report are chosen on the tested rows themselves; a threshold for use must be "
         "fixed on other data and then tested."),
    ]
    rare = [c for c in CLASSES if 0 < metrics.get("per_class", {}).get(c, {}).get("support", 0) < 30]
    if rare:
        limits.append("Rare diagnoses have few tested images (" + ", ".join(
            f"{c} {metrics['per_class'][c]['support']}" for c in rare) + "): their recalls are uncertain.")
    return {
        "intended_use": INTENDED_USE, "not_intended_for": NOT_INTENDED, "model": dict(model),
        "data": {"source": source, "splits": dict(splits),
                 "grouping": "by lesion: no lesion has images in two splits (checked)" if not external
                 else "an external labelled set scored with the saved model"},
        "metrics": {"headline": headline, "evaluated_on": tested,
                    "where": {"per_class": "report.md 'Per class', classification_report.csv",
                              "subgroups": "report.md 'Subgroups', metrics.json 'subgroups'",
                              "melanoma": "report.md 'Melanoma versus rest', metrics.json "
                                          "'melanoma_operating_points', roc_melanoma.png"}},
        "confirmation_mix": mix,
        "limits": limits,
    }


def audit(rows: pd.DataFrame, y_true: np.ndarray, probs: np.ndarray, metrics: Mapping[str, Any], *,
          weights: np.ndarray | None, splits: Mapping[str, Any], source: str, model: Mapping[str, Any],
          external: bool = False) -> dict[str, Any]:
    """The three additions to metrics.json: subgroups, melanoma_operating_points, model_card."""
    rows = rows.reset_index(drop=True)
    lesions = list(rows["lesion_id"]) if "lesion_id" in rows.columns and rows["lesion_id"].notna().all() else None
    out = {"subgroups": subgroup_performance(rows, y_true, probs, weights=weights),
           "melanoma_operating_points": melanoma_operating_points(
               y_true, probs, lesions, tested="the evaluated set" if external else "the test split")}
    out["model_card"] = model_card(metrics={**metrics, **out}, rows=rows, splits=splits, source=source, model=model,
                                   external=external)
    return out
