"""The audit of a final test against a hand computation: subgroup balanced accuracy with its lesion-bootstrap
interval, melanoma sensitivity at fixed specificities with theirs, and what report.md says about both.

The expected numbers are computed here with plain loops over lesions and thresholds, not with hamtune's functions:
the same procedure (seed 0, 1000 resamples, whole lesions drawn with replacement, a count per lesion from one
multinomial per resample, 100 resamples a batch), written out the slow, obvious way.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from hamtune.final.audit import (
    AGE_BANDS,
    MIN_LESIONS,
    audit,
    melanoma_operating_points,
    subgroup_performance,
)
from hamtune.io import json_ready
from hamtune.reports.audit import audit_sections, plot_roc_melanoma
from hamtune.training.metrics import evaluation_metrics
from hamtune.vocab import CLASSES

MEL = CLASSES.index("mel")


def hand_draws(lesion_of_image: list[str], resamples: int = 1000, seed: int = 0):
    """Per resample, how often each image is drawn: its lesion's count, lesions numbered by first appearance."""
    order = list(dict.fromkeys(lesion_of_image))
    number = {lesion: k for k, lesion in enumerate(order)}
    rng = np.random.default_rng(seed)
    for _ in range(resamples // 100):
        for counts in rng.multinomial(len(order), [1 / len(order)] * len(order), size=100):
            yield np.array([counts[number[lesion]] for lesion in lesion_of_image], dtype=float)


def hand_balanced_accuracy(y_true, y_pred, weight=None) -> float:
    """Mean recall over the classes present (weighted by how often each image is drawn)."""
    weight = np.ones(len(y_true)) if weight is None else weight
    recalls = []
    for c in range(len(CLASSES)):
        support = sum(w for t, w in zip(y_true, weight) if t == c)
        if support > 0:
            recalls.append(sum(w for t, p, w in zip(y_true, y_pred, weight) if t == c and p == c) / support)
    return float(np.mean(recalls))


@pytest.fixture(scope="module")
def fixture_rows():
    """70 lesions, 1-3 images each (same patient data per lesion), a classifier that is often right; one
    body site and one sex small enough (< 10 lesions) to be listed but not scored."""
    rng = np.random.default_rng(7)
    ages = [12, 29, 30, 41, 49, 50, 63, 69, 70, 88, np.nan]
    rows, y_true = [], []
    for k in range(70):
        dx = int(rng.choice(7, p=[0.05, 0.08, 0.12, 0.03, 0.17, 0.5, 0.05]))
        lesion = {"lesion_id": f"L{k:03d}", "age": ages[k % len(ages)],
                  "sex": "unknown" if k % 12 == 5 else ("male" if k % 2 else "female"),
                  "localization": "scalp" if k % 9 == 4 else ("back" if k % 3 else "lower extremity"),
                  "dx_type": "histo" if dx != CLASSES.index("nv") else ("follow_up" if k % 2 else "consensus")}
        for _ in range(1 + int(rng.integers(0, 3))):
            rows.append(lesion)
            y_true.append(dx)
    y_true = np.array(y_true)
    logits = rng.normal(size=(len(y_true), 7))
    logits[np.arange(len(y_true)), y_true] += rng.normal(1.5, 1.5, len(y_true))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    probs = np.round(probs, 2)  # ties in P(mel), which the thresholds must handle
    return pd.DataFrame(rows), y_true, probs


def test_age_bands_and_subgroups_match_a_hand_computation(fixture_rows):
    rows, y_true, probs = fixture_rows
    out = subgroup_performance(rows, y_true, probs)
    assert out["unit"] == "lesion" and out["min_lesions"] == MIN_LESIONS == 10
    y_pred = probs.argmax(axis=1)

    def band(age: float) -> str:
        if np.isnan(age):
            return "unknown"
        return "<30" if age < 30 else "30-49" if age < 50 else "50-69" if age < 70 else "70+"

    assert [band(a) for a in (29, 30, 49, 50, 69, 70)] == ["<30", "30-49", "30-49", "50-69", "50-69", "70+"]
    groups_of = {"sex": rows["sex"], "age": rows["age"].map(band), "localization": rows["localization"],
                 "dx_type": rows["dx_type"]}
    scored = 0
    for attribute, values in groups_of.items():
        got = out["attributes"][attribute]
        assert got["available"]
        assert sorted(g["group"] for g in got["groups"]) == sorted(set(values))  # every group listed, none hidden
        if attribute == "age":
            assert [g["group"] for g in got["groups"]] == [*AGE_BANDS, "unknown"]
        for g in got["groups"]:
            members = [i for i, v in enumerate(values) if v == g["group"]]
            lesions = [rows["lesion_id"][i] for i in members]
            assert g["images"] == len(members) and g["lesions"] == len(set(lesions))
            if len(set(lesions)) < 10:
                assert not g["enough_lesions"] and g["balanced_accuracy"] is None and g["note"]
                continue
            scored += 1
            t, p = y_true[members], y_pred[members]
            assert g["balanced_accuracy"] == pytest.approx(hand_balanced_accuracy(t, p))
            assert g["accuracy"] == pytest.approx(np.mean(t == p))
            draws = [hand_balanced_accuracy(t, p, w) for w in hand_draws(lesions)]
            assert g["balanced_accuracy_ci95"] == pytest.approx(list(np.percentile(draws, [2.5, 97.5])))
    assert scored >= 8
    small = {g["group"]: g for a in out["attributes"].values() for g in a["groups"]}
    assert not small["scalp"]["enough_lesions"] and not small["unknown"]["enough_lesions"]


def test_melanoma_operating_points_match_a_hand_computation(fixture_rows):
    rows, y_true, probs = fixture_rows
    lesions = list(rows["lesion_id"])
    out = melanoma_operating_points(y_true, probs, lesions)
    score, positive = probs[:, MEL], y_true == MEL
    candidates = sorted(set(score)) + [np.inf]  # mel when P(mel) >= t

    def best_sensitivity(weight, target):
        """Highest sensitivity with specificity >= target, over every threshold; and that threshold."""
        neg, pos = weight * ~positive, weight * positive
        best = None
        for t in candidates:
            specificity = neg[score < t].sum() / neg.sum()
            sensitivity = pos[score >= t].sum() / pos.sum()
            if specificity >= target - 1e-12 and (best is None or sensitivity > best[0]):
                best = (sensitivity, specificity, t)
        return best

    def hand_auc(weight):
        """P(a melanoma outscores another diagnosis), ties half: the Mann-Whitney form of the ROC AUC."""
        p, n = np.flatnonzero(positive), np.flatnonzero(~positive)
        pairs = weight[p][:, None] * weight[n][None, :]
        wins = (score[p][:, None] > score[n][None, :]) + 0.5 * (score[p][:, None] == score[n][None, :])
        return (pairs * wins).sum() / pairs.sum()

    ones = np.ones(len(y_true))
    assert out["available"] and out["positives"]["images"] == positive.sum()
    assert out["positives"]["lesions"] == len({lesion for lesion, p in zip(lesions, positive) if p})
    assert out["roc_auc"] == pytest.approx(hand_auc(ones))
    draws = [w for w in hand_draws(lesions) if (w * positive).sum() and (w * ~positive).sum()]
    assert out["roc_auc_ci95"] == pytest.approx(list(np.percentile([hand_auc(w) for w in draws], [2.5, 97.5])))
    for point, target in zip(out["operating_points"], (0.80, 0.90, 0.95)):
        sensitivity, specificity, threshold = best_sensitivity(ones, target)
        assert point["target_specificity"] == target
        assert point["sensitivity"] == pytest.approx(sensitivity) and point["specificity"] == pytest.approx(specificity)
        assert point["threshold"] == pytest.approx(threshold) and point["specificity"] >= target
        assert point["true_positives"] == (positive & (score >= threshold)).sum()
        assert point["false_positives"] == (~positive & (score >= threshold)).sum()
        resampled = [best_sensitivity(w, target)[0] for w in draws]
        assert point["sensitivity_ci95"] == pytest.approx(list(np.percentile(resampled, [2.5, 97.5])))

    only_rest = melanoma_operating_points(np.full(5, CLASSES.index("nv")), probs[:5])
    assert not only_rest["available"] and "not melanoma" in only_rest["reason"]


def test_audit_goes_into_metrics_json_and_report_sections(fixture_rows, tmp_path):
    rows, y_true, probs = fixture_rows
    metrics = evaluation_metrics(y_true, probs, rows["lesion_id"])
    out = audit(rows, y_true, probs, metrics, weights=None, splits={"test": {"images": len(rows), "lesions": 70}},
                source="synthetic", model={"architecture": "resnet10t", "networks": 1})
    assert set(out) == {"subgroups", "melanoma_operating_points", "model_card"}
    json.dumps(json_ready(out), allow_nan=False)  # strict JSON, as metrics.json is written

    card = out["model_card"]
    assert "not for diagnosis" in card["intended_use"].lower()
    assert any("skin type" in limit for limit in card["limits"]) and any("Synthetic" in x for x in card["limits"])
    kinds = rows["dx_type"].value_counts()
    assert card["confirmation_mix"] == {k: {"images": int(n), "fraction": pytest.approx(n / len(rows))}
                                        for k, n in kinds.items()}

    before, after = audit_sections({**metrics, **out})
    text = "\n".join(body for _, body in before + after)
    assert [h for h, _ in before] == ["Subgroups", "Melanoma versus rest"] and [h for h, _ in after] == ["Model card"]
    scalp = next(g for g in out["subgroups"]["attributes"]["localization"]["groups"] if g["group"] == "scalp")
    assert f"| scalp | {scalp['images']} | {scalp['lesions']} |" in text and "too few lesions" in text
    for g in out["subgroups"]["attributes"]["sex"]["groups"]:
        if g["enough_lesions"]:
            lo, hi = g["balanced_accuracy_ci95"]
            assert f"| {g['group']} | {g['images']} | {g['lesions']} |" in text
            assert f"{g['balanced_accuracy']:.4f} ({lo:.4f}–{hi:.4f})" in text
    p90 = out["melanoma_operating_points"]["operating_points"][1]
    lo, hi = p90["sensitivity_ci95"]
    assert f"| 90% | {p90['sensitivity']:.4f} ({lo:.4f}–{hi:.4f}) |" in text and "(roc_melanoma.png)" in text
    assert "not for diagnosis" in text and "Fitzpatrick" in text

    with Image.open(plot_roc_melanoma(tmp_path / "roc.png", out["melanoma_operating_points"])) as image:
        assert image.format == "PNG" and image.width > 300


def test_labels_without_metadata_say_so_instead_of_guessing(fixture_rows):
    _, y_true, probs = fixture_rows
    bare = pd.DataFrame({"lesion_id": [None] * len(y_true), "sex": "", "age": np.nan, "localization": "",
                         "dx_type": ""})  # the ISIC ground-truth form: no lesions, no patient data
    out = subgroup_performance(bare, y_true, probs)
    assert not out["available"] and out["unit"] == "image"
    assert all(not a["available"] and a["groups"] == [] for a in out["attributes"].values())
    text = audit_sections({"subgroups": out})[0][0][1]
    assert "Not recorded: the labels carry no sex" in text and "every image counts as a lesion" in text
