"""`hamtune best` on a real finished search: choose, retrain on train+val, test once, report; no test image seen."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from sklearn.metrics import (
    accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support, roc_auc_score,
)

from hamtune.search import tables as res
from hamtune.cli import main
from hamtune.vocab import CLASSES
from hamtune.errors import HamtuneError

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT.parent / "shared/data/ham10000-sample"
REPORT_FILES = ("model.pt", "metrics.json", "classification_report.csv", "predictions.csv", "confusion_matrix.png",
                "training_curve.png", "reliability.png", "roc_melanoma.png", "split.csv", "report.md")


def tiny_spec(cache_dir: Path) -> dict:
    return {
        "experiment": "tiny",
        "data": {"source": "synthetic", "synthetic_size": 300, "image_size": 16, "cache_dir": str(cache_dir)},
        "model": {"name": "resnet10t", "head_hidden": 32, "head_dropout": 0.1},
        # one thread: on a shared 2-core machine two OpenMP threads per process thrash (10x slower epochs)
        "train": {"epochs": 2, "batch_size": 32, "warmup_epochs": 0.5, "num_threads": 1},
        "search": {"num_samples": 3, "max_concurrent": 1, "searcher": "random", "scheduler": "fifo", "seed": 0},
        "resources": {"cpu": 1},
        "space": {"lr": {"loguniform": [1e-3, 3e-2]}, "augment_strength": {"uniform": [0, 1]}},
    }


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> Path:
    """A real 3-trial search (Ray Tune in-process); returns the results folder holding experiment 'tiny'."""
    import ray

    from hamtune.search.driver import init_ray, run_search
    from hamtune.search.spec import spec_from_dict

    tmp = tmp_path_factory.mktemp("best")
    started_here = not ray.is_initialized()
    init_ray(None, 2)
    try:
        outcome = run_search(spec_from_dict(tiny_spec(tmp / "cache"), source="tiny.yaml"), results_dir=tmp / "results",
                             verbose=0)
    finally:
        if started_here:
            ray.shutdown()  # the retrain below never uses Ray: give the cores back
    assert outcome.state == "finished" and len(outcome.trials) == 3
    return tmp / "results"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.run([sys.executable, "-m", "hamtune.cli", *args], capture_output=True, text=True, env=env,
                          timeout=400, cwd=ROOT)


@pytest.fixture(scope="module")
def retrained(experiment) -> tuple[Path, subprocess.CompletedProcess]:
    """`hamtune best --retrain` over what earlier runs left: an old best/ with a file the retrain does not write, and
    the temp folder of a retrain killed (its process gone) while writing, holding a half-written metrics.json."""
    best_dir = experiment / "tiny" / "best"
    best_dir.mkdir()
    (best_dir / "stale.txt").write_text("from an older retrain")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # its pid no longer runs
    killed = best_dir.with_name(f".tmp-best-{socket.gethostname()}-{gone.pid}")
    killed.mkdir()
    (killed / "metrics.json").write_text('{"balanced_accuracy": ')
    proc = run_cli("best", "tiny", "--retrain", "--results-dir", str(experiment))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return best_dir, proc


def copy_experiment(results: Path, dest: Path) -> Path:
    """The experiment's record and tables without Tune's folder or an earlier report (all `best` reads)."""
    target = dest / "tiny"
    target.mkdir(parents=True)
    for name in ("experiment.json", "trials.parquet", "history.parquet"):
        shutil.copy(results / "tiny" / name, target / name)
    return dest


def test_best_prints_the_best_trial(experiment, capsys):
    trials, history = res.load_tables(experiment / "tiny")
    best = res.best_trial(trials, metric="val_balanced_accuracy", mode="max")
    assert main(["best", "--results-dir", str(experiment)]) == 0  # no name: the latest experiment
    out = capsys.readouterr().out
    assert f"trial {best['trial_id']}: completed, 2 epochs, val_balanced_accuracy peaked at epoch {int(best['best_epoch'])}" in out
    assert f"best {best['best_val_balanced_accuracy']:.4f}" in out
    assert re.search(rf"^  lr +{best['config.lr']:.4g}$", out, re.M) and "model=resnet10t" in out

    # --metric: rank by another column; its peak epoch comes from that metric's history
    assert main(["best", "tiny", "--metric", "val_loss", "--results-dir", str(experiment)]) == 0
    out = capsys.readouterr().out
    by_loss = trials.loc[trials["best_val_loss"].idxmin()]
    h = history[history["trial_id"] == by_loss["trial_id"]]
    assert "best of 3 trials by val_loss (min)" in out
    assert f"trial {by_loss['trial_id']}:" in out and f"peaked at epoch {int(h.loc[h['val_loss'].idxmin(), 'epoch'])}" in out

    assert main(["best", "tiny", "--epochs", "3", "--results-dir", str(experiment)]) == 2
    assert "add --retrain" in capsys.readouterr().err
    assert main(["best", "tiny", "--metric", "val_nope", "--results-dir", str(experiment)]) == 2
    assert "val_nope" in capsys.readouterr().err


def test_retrain_writes_the_report(retrained, experiment):
    out_dir, proc = retrained
    for name in REPORT_FILES:
        assert (out_dir / name).is_file() and (out_dir / name).stat().st_size > 0, name
    assert "(decoded 0)" in proc.stdout  # re-prepared with the recorded settings: a cache hit
    assert "seed 0: 100%" in proc.stderr  # the per-seed epoch bar

    record = res.read_experiment(experiment / "tiny")
    trials, _ = res.load_tables(experiment / "tiny")
    best = res.best_trial(trials, metric=record["metric"], mode=record["mode"])
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["trial_id"] == best["trial_id"] and metrics["epochs"] == int(best["best_epoch"])
    assert metrics["seeds"] == [0] and metrics["data"]["fingerprint"] == record["data"]["fingerprint"]
    assert metrics["config"]["lr"] == pytest.approx(best["config.lr"])
    assert metrics["config"]["head_hidden"] == 32 and metrics["config"]["epochs"] == metrics["epochs"]
    assert metrics["bootstrap"] == {"resamples": 1000, "seed": 0, "method": "percentile", "unit": "lesion"}
    lo, hi = metrics["balanced_accuracy_ci95"]
    assert 0 <= lo <= hi <= 1

    # model.pt: plain tensors and primitives, everything needed to use the weights
    saved = torch.load(out_dir / "model.pt", map_location="cpu", weights_only=True)
    assert saved["classes"] == list(CLASSES) and saved["image_size"] == 16 and saved["model"] == "resnet10t"
    assert saved["use_meta"] is False and saved["data_fingerprint"] == record["data"]["fingerprint"]
    [member] = saved["members"]
    assert member["head_hidden"] == 32 and member["config"] == metrics["config"]
    assert torch.allclose(torch.tensor(member["mean"]), member["state_dict"]["mean"].flatten())
    assert len(member["std"]) == 3
    assert saved["temperature"] == pytest.approx(metrics["calibration"]["temperature"]) and saved["temperature"] != 1.0
    assert saved["class_bias"] == pytest.approx(metrics["calibration"]["class_bias"]) and saved["class_bias"][0] == 0
    # decision weights exp(-b) (mean 1): the calibration changes no prediction
    expected_weights = np.exp(-np.array(saved["class_bias"]))
    assert saved["decision_weights"] == pytest.approx(expected_weights / expected_weights.mean())

    for picture in ("confusion_matrix.png", "training_curve.png"):
        with Image.open(out_dir / picture) as image:
            assert image.format == "PNG" and image.width > 300
    report = (out_dir / "report.md").read_text()
    split = metrics["split"]
    assert "![Confusion matrix (test)](confusion_matrix.png)" in report and "(training_curve.png)" in report
    assert f"train+val: {split['train_val']['images']} images, {split['train_val']['lesions']} lesions" in report
    assert f"test: {split['test']['images']} images, {split['test']['lesions']} lesions" in report
    assert f"{metrics['balanced_accuracy']:.4f}" in report


def test_best_folder_is_swapped_in_whole(retrained):
    """The retrain builds best/ beside it and renames it into place: nothing of the older folder survives, the killed
    run's temp folder is removed (never read), and the completion marker lists exactly what the folder holds."""
    out_dir, _ = retrained
    assert not (out_dir / "stale.txt").exists()
    assert [p.name for p in out_dir.parent.iterdir() if p.name.startswith(".tmp-")] == []
    marker = json.loads((out_dir / ".complete").read_text())
    assert sorted(marker["files"]) == sorted(p.name for p in out_dir.iterdir() if p.name != ".complete")
    assert set(REPORT_FILES) | {"probabilities.npz"} == set(marker["files"])
    assert marker["experiment"] == "tiny" and json.loads((out_dir / "metrics.json").read_text())["n_test"] > 0


def hand_sensitivity_at(score: np.ndarray, positive: np.ndarray, target: float) -> float:
    """The highest sensitivity of "mel when score >= t" over every threshold t whose specificity reaches target."""
    best = 0.0
    for t in [*np.unique(score), np.inf]:
        if (score[~positive] < t).mean() >= target - 1e-12:
            best = max(best, (score[positive] >= t).mean())
    return best


def test_retrain_report_audits_subgroups_melanoma_and_the_model_card(retrained, experiment):
    """Every sex, age band and body site with >= 10 test lesions gets a balanced accuracy with its interval (as
    sklearn scores the predictions of that subgroup), smaller ones are listed as too few; the melanoma operating
    points are those of the calibrated P(mel) in predictions.csv; report.md and metrics.json say the same."""
    from hamtune.data import SplitSpec, prepare

    out_dir, proc = retrained
    metrics = json.loads((out_dir / "metrics.json").read_text())
    report = (out_dir / "report.md").read_text()
    assert {"subgroups", "melanoma_operating_points", "model_card"} <= set(metrics)
    for heading in ("## Subgroups", "### By sex", "### By age band", "### By body site",
                    "### By diagnosis confirmation", "## Melanoma versus rest", "## Model card"):
        assert heading in report, heading
    with Image.open(out_dir / "roc_melanoma.png") as image:
        assert image.format == "PNG" and image.width > 300
    assert "![ROC curve, melanoma versus rest](roc_melanoma.png)" in report

    d = res.read_experiment(experiment / "tiny")["spec"]["data"]
    data = prepare("synthetic", d["image_size"], cache_dir=Path(d["cache_dir"]), progress=False,
                   split=SplitSpec(d["val"], d["test"], d["split_seed"]), synthetic_size=d["synthetic_size"])
    meta = data.table.set_index("image_id")
    pred = pd.read_csv(out_dir / "predictions.csv")
    rows = meta.loc[pred["image_id"]].reset_index()
    bands = pd.cut(rows["age"], [0, 30, 50, 70, 200], right=False, labels=["<30", "30-49", "50-69", "70+"])
    groups_of = {"sex": rows["sex"], "age": bands.astype(object).fillna("unknown"), "localization": rows["localization"],
                 "dx_type": rows["dx_type"]}
    scored = 0
    for attribute, values in groups_of.items():
        got = {g["group"]: g for g in metrics["subgroups"]["attributes"][attribute]["groups"]}
        assert set(got) == set(values)  # every subgroup listed, the small ones too
        for group, g in got.items():
            mask = (values == group).to_numpy()
            lesions = rows.loc[mask, "lesion_id"].nunique()
            assert (g["images"], g["lesions"], g["enough_lesions"]) == (mask.sum(), lesions, lesions >= 10)
            if lesions < 10:
                assert g["balanced_accuracy"] is None and f"| {group} | {g['images']} | {lesions} |" in report
                assert f"too few lesions to say anything ({lesions} < 10 lesions)" in report
                continue
            scored += attribute != "dx_type"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # sklearn warns when a subgroup lacks a predicted diagnosis
                expected = balanced_accuracy_score(pred.loc[mask, "true_dx"], pred.loc[mask, "predicted_dx"])
            lo, hi = g["balanced_accuracy_ci95"]
            assert g["balanced_accuracy"] == pytest.approx(expected) and 0 <= lo <= hi <= 1
            assert f"| {group} | {g['images']} | {lesions} |" in report
            assert f"{g['balanced_accuracy']:.4f} ({lo:.4f}–{hi:.4f})" in report
    assert scored >= 3  # the tiny test split still has subgroups big enough to score

    mel = metrics["melanoma_operating_points"]
    score, positive = pred["prob_mel"].to_numpy(), (pred["true_dx"] == "mel").to_numpy()
    assert mel["available"] and mel["positives"]["images"] == positive.sum() > 0
    assert mel["roc_auc"] == pytest.approx(roc_auc_score(positive, score))
    for point in mel["operating_points"]:
        assert point["sensitivity"] == pytest.approx(hand_sensitivity_at(score, positive, point["target_specificity"]),
                                                     abs=1e-6)
        lo, hi = point["sensitivity_ci95"]
        assert 0 <= lo <= hi <= 1 and f"| {point['target_specificity']:.0%} | {point['sensitivity']:.4f}" in report
    assert "melanoma versus rest: ROC AUC" in proc.stdout

    card = metrics["model_card"]
    assert card["data"]["source"] == "synthetic" and card["data"]["splits"]["test"] == metrics["split"]["test"]
    assert card["model"]["architecture"] == "resnet10t" and card["metrics"]["headline"]["balanced_accuracy"] == \
        metrics["balanced_accuracy"]
    assert "not for diagnosis" in report and "Fitzpatrick" in report and "Synthetic data" in report
    assert f"test: {metrics['split']['test']['images']} images, {metrics['split']['test']['lesions']} lesions" in report


def test_metrics_equal_sklearn_on_the_predictions(retrained):
    out_dir, _ = retrained
    metrics = json.loads((out_dir / "metrics.json").read_text())
    pred = pd.read_csv(out_dir / "predictions.csv")
    probs = pred[[f"prob_{c}" for c in CLASSES]].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-9)
    codes = {c: i for i, c in enumerate(CLASSES)}
    y_true, y_pred = pred["true_dx"].map(codes).to_numpy(), pred["predicted_dx"].map(codes).to_numpy()
    weights = np.array(metrics["calibration"]["decision_weights"])
    assert (y_pred == (probs * weights).argmax(axis=1)).all() and (weights != 1).any()  # the networks' decision
    assert metrics["n_test"] == len(pred)
    assert metrics["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert metrics["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y_true, y_pred))
    assert metrics["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro", zero_division=0))
    present = np.unique(y_true)
    assert metrics["macro_auc"] == pytest.approx(np.mean([roc_auc_score(y_true == c, probs[:, c]) for c in present]))
    assert metrics["confusion_matrix"] == confusion_matrix(y_true, y_pred, labels=range(len(CLASSES))).tolist()
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=range(len(CLASSES)), zero_division=0)
    report = pd.read_csv(out_dir / "classification_report.csv").set_index("class")
    for i, c in enumerate(CLASSES):
        got = metrics["per_class"][c]
        assert got["precision"] == pytest.approx(p[i]) and got["f1"] == pytest.approx(f[i]) and got["support"] == s[i]
        assert got["recall"] == (pytest.approx(r[i]) if s[i] else None)
        assert report.loc[c, "precision"] == pytest.approx(p[i]) and report.loc[c, "support"] == s[i]


def test_retrain_never_saw_a_test_image(retrained, experiment):
    from hamtune.final.retrain import check_no_test_leak
    from hamtune.data import SplitSpec, prepare

    out_dir, _ = retrained
    metrics = json.loads((out_dir / "metrics.json").read_text())
    split = pd.read_csv(out_dir / "split.csv")
    assert set(split["role"]) == {"train", "calibration", "test"} and split["row"].is_unique
    train_val, test = split[split["role"].isin(["train", "calibration"])], split[split["role"] == "test"]
    assert set(train_val["image_id"]).isdisjoint(test["image_id"])
    assert set(train_val["lesion_id"]).isdisjoint(test["lesion_id"])
    assert metrics["split"]["train_val"] == {"images": len(train_val), "lesions": train_val["lesion_id"].nunique()}
    assert metrics["split"]["test"] == {"images": len(test), "lesions": test["lesion_id"].nunique()}
    assert sorted(pd.read_csv(out_dir / "predictions.csv")["image_id"]) == sorted(test["image_id"])

    # What the report says was trained on is exactly the cache's train+val, and what was tested its test split.
    d = res.read_experiment(experiment / "tiny")["spec"]["data"]
    data = prepare("synthetic", d["image_size"], cache_dir=Path(d["cache_dir"]), progress=False,
                   split=SplitSpec(d["val"], d["test"], d["split_seed"]), synthetic_size=d["synthetic_size"])
    table = data.table
    assert set(train_val["image_id"]) == set(table.loc[table["split"].isin(["train", "val"]), "image_id"])
    assert set(test["image_id"]) == set(table.loc[table["split"] == "test", "image_id"])

    # The temperature was fitted on rows the weights never trained on, and the test never reached it.
    train, held = split[split["role"] == "train"], split[split["role"] == "calibration"]
    assert set(held["row"]).isdisjoint(train["row"]) and set(held["row"]).isdisjoint(test["row"])
    assert set(held["lesion_id"]).isdisjoint(train["lesion_id"])
    assert set(held["lesion_id"]).isdisjoint(test["lesion_id"])
    assert metrics["split"]["calibration"] == {"images": len(held), "lesions": held["lesion_id"].nunique()}
    assert 0.10 < len(held) / len(train_val) < 0.20
    cal = metrics["calibration"]
    assert cal["calibration_slice"]["n"] == len(held) and cal["test"]["n"] == len(test)
    assert cal["calibration_slice"]["nll_after"] < cal["calibration_slice"]["nll_before"]

    # And the guard really refuses overlaps.
    train_index, test_index = train_val["row"].to_numpy(), test["row"].to_numpy()
    with pytest.raises(HamtuneError, match="also in train\\+val"):
        check_no_test_leak(table, np.append(train_index, test_index[0]), test_index, "cache")
    shared_lesion = table.copy()
    shared_lesion.loc[train_index[0], "lesion_id"] = table.loc[test_index[0], "lesion_id"]
    with pytest.raises(HamtuneError, match="lesion\\(s\\) have images in both"):
        check_no_test_leak(shared_lesion, train_index, test_index, "cache")


def test_seeds_report_mean_and_std(retrained, experiment, tmp_path, capsys):
    results = copy_experiment(experiment, tmp_path)
    assert main(["best", "tiny", "--retrain", "--seeds", "0", "1", "--results-dir", str(results)]) == 0
    out = capsys.readouterr().out
    metrics = json.loads((results / "tiny" / "best" / "metrics.json").read_text())
    assert metrics["seeds"] == [0, 1] and [r["seed"] for r in metrics["per_seed"]] == [0, 1]
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc"):
        values = [r[key] for r in metrics["per_seed"]]
        assert metrics["across_seeds"][key]["mean"] == pytest.approx(np.mean(values))
        assert metrics["across_seeds"][key]["std"] == pytest.approx(np.std(values, ddof=1))
        assert f"{key} {np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}" in out
    # the saved model and top-level metrics are seed 0's, and seed 0 reproduces the single-seed run exactly
    single = json.loads((retrained[0] / "metrics.json").read_text())
    assert metrics["model_seed"] == 0 and metrics["balanced_accuracy"] == metrics["per_seed"][0]["balanced_accuracy"]
    assert metrics["per_seed"][0]["accuracy"] == pytest.approx(single["accuracy"])
    assert "| seed |" in (results / "tiny" / "best" / "report.md").read_text()


def test_top_k_ensemble_reports_every_member_and_its_file_predicts_their_average(experiment, tmp_path, capsys):
    from hamtune.final.calibration import apply_calibration, fit_calibration
    from hamtune.data import SplitSpec, prepare
    from hamtune.final.modelfile import load_model

    results = copy_experiment(experiment, tmp_path)
    assert main(["best", "tiny", "--top", "5", "--results-dir", str(results)]) == 2
    assert "--top 5: experiment tiny has only 3" in capsys.readouterr().err
    assert main(["best", "tiny", "--retrain", "--top", "2", "--results-dir", str(results)]) == 0
    out = capsys.readouterr().out
    best_dir = results / "tiny" / "best"
    metrics = json.loads((best_dir / "metrics.json").read_text())
    record = res.read_experiment(results / "tiny")
    trials, _ = res.load_tables(results / "tiny")
    ranked = trials.sort_values(f"best_{record['metric']}", ascending=record["mode"] == "min", kind="stable")
    assert metrics["trial_ids"] == list(ranked["trial_id"][:2]) == [m["trial_id"] for m in metrics["members"]]
    assert "top 2 of 3 trials" in out and "\n#1 trial " in out and "\n#2 trial " in out
    assert "test, ensemble, seed 0" in out

    report = (best_dir / "report.md").read_text()
    assert "## Members and ensemble (test split)" in report and "| **ensemble**" in report
    for row in (*metrics["members"], metrics):
        lo, hi = row["balanced_accuracy_ci95"]
        assert f"{row['balanced_accuracy']:.4f} ({lo:.4f}–{hi:.4f})" in report
    for member in metrics["members"]:  # the paired interval of (ensemble - member), around the observed difference
        lo, hi = member["ensemble_minus_member_ci95"]
        difference = metrics["balanced_accuracy"] - member["balanced_accuracy"]
        assert lo <= difference <= hi and f"{difference:+.4f} ({lo:+.4f} to {hi:+.4f})" in report
    assert "## Calibration" in report and "(reliability.png)" in report

    # The file holds both members and the calibration, and predicts the calibrated mean of its members: exactly the
    # probabilities the report scored, and the diagnoses it decided.
    loaded = load_model(best_dir / "model.pt")
    assert len(loaded.members) == 2 and loaded.temperature == pytest.approx(metrics["calibration"]["temperature"])
    d = record["spec"]["data"]
    data = prepare("synthetic", d["image_size"], cache_dir=Path(d["cache_dir"]), progress=False,
                   split=SplitSpec(d["val"], d["test"], d["split_seed"]), synthetic_size=d["synthetic_size"])
    test = data.arrays("test")
    each = loaded.member_proba(test.images)
    expected = apply_calibration(np.mean(each, axis=0), loaded.temperature, loaded.class_bias)
    np.testing.assert_allclose(loaded.predict_proba(test.images), expected, atol=1e-12)
    pred = pd.read_csv(best_dir / "predictions.csv").set_index("image_id").loc[data.table["image_id"].iloc[test.index]]
    np.testing.assert_allclose(pred[[f"prob_{c}" for c in CLASSES]].to_numpy(), expected, atol=1e-6)
    decided = (expected * loaded.decision_weights).argmax(1)
    assert (decided == np.mean(each, axis=0).argmax(1)).all()  # calibrated, yet the same diagnoses as the plain mean
    assert list(pred["predicted_dx"]) == [CLASSES[i] for i in decided]
    assert metrics["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(test.labels, decided))
    for member, probs in zip(metrics["members"], each):
        assert member["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(test.labels, probs.argmax(1)))
    # probabilities.npz keeps each member's own probabilities, on the test split and on the calibration slice
    with np.load(best_dir / "probabilities.npz") as saved:
        assert list(saved["trial_ids"]) == metrics["trial_ids"]
        assert list(saved["test_image_ids"]) == list(data.table["image_id"].iloc[test.index])
        np.testing.assert_allclose(saved["test_probs"], each, atol=1e-6)
        split = pd.read_csv(best_dir / "split.csv")
        assert set(saved["calibration_image_ids"]) == set(split.loc[split["role"] == "calibration", "image_id"])
        held_mean = saved["calibration_probs"].mean(axis=0)
        temperature, bias = fit_calibration(held_mean, saved["calibration_labels"])
        assert temperature == pytest.approx(loaded.temperature) and bias == pytest.approx(loaded.class_bias)


def test_calibration_zero_trains_on_all_of_train_val_and_keeps_temperature_one(experiment, tmp_path, capsys):
    results = copy_experiment(experiment, tmp_path)
    assert main(["best", "tiny", "--retrain", "--calibration", "0", "--results-dir", str(results)]) == 0
    capsys.readouterr()
    best_dir = results / "tiny" / "best"
    split = pd.read_csv(best_dir / "split.csv")
    metrics = json.loads((best_dir / "metrics.json").read_text())
    assert set(split["role"]) == {"train", "test"} and metrics["split"]["calibration"] is None
    assert metrics["split"]["train"] == metrics["split"]["train_val"]
    saved = torch.load(best_dir / "model.pt", weights_only=True)
    assert saved["temperature"] == 1.0 and saved["class_bias"] == [0.0] * 7 and saved["decision_weights"] == [1.0] * 7
    assert not (best_dir / "reliability.png").exists() and "## Calibration" not in (best_dir / "report.md").read_text()
    assert main(["best", "tiny", "--retrain", "--calibration", "0.6", "--results-dir", str(results)]) == 2
    assert "--calibration 0.6" in capsys.readouterr().err


def test_retrain_refuses_changed_data(experiment, tmp_path, capsys):
    results = copy_experiment(experiment, tmp_path)
    path = results / "tiny" / "experiment.json"
    record = json.loads(path.read_text())
    record["data"]["fingerprint"] = "0" * 20
    path.write_text(json.dumps(record))
    assert main(["best", "tiny", "--retrain", "--results-dir", str(results)]) == 2
    err = capsys.readouterr().err.strip()
    assert "data changed since the search" in err and str(path) in err and len(err.splitlines()) == 1
    assert not (results / "tiny" / "best").exists()


@pytest.mark.skipif(not SAMPLE.is_dir(), reason="real HAM10000 sample not present")
def test_retrained_model_evaluates_and_predicts_real_images(retrained, tmp_path, capsys):
    model = retrained[0] / "model.pt"
    assert main(["evaluate", "--model", str(model), "--images", str(SAMPLE), "--labels",
                 str(SAMPLE / "HAM10000_metadata.csv"), "--out", str(tmp_path / "eval")]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["n_test"] == 140 and metrics["unlabelled_images"] == 0 and metrics["missing_images"] == 0
    capsys.readouterr()
    assert main(["predict", "--model", str(model), str(SAMPLE), "--out", str(tmp_path / "p.csv")]) == 0
    assert len(pd.read_csv(tmp_path / "p.csv")) == 140
    assert "predicted_dx is the networks' own choice" in capsys.readouterr().err  # a calibrated file says so
