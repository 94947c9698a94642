"""`hamtune evaluate` and `hamtune predict` on the real HAM10000 sample; the model file's safety checks; the CI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score

from hamtune.data.labels import read_labels
from hamtune.training.metrics import bootstrap_balanced_accuracy
from hamtune.cli import main
from hamtune.vocab import CLASSES, DIAGNOSES
from hamtune.errors import HamtuneError
from hamtune.final.modelfile import load_model
from model_fixtures import save_tiny_model

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT.parent / "shared/data/ham10000-sample"
METADATA = SAMPLE / "HAM10000_metadata.csv"
needs_sample = pytest.mark.skipif(not SAMPLE.is_dir(), reason="real HAM10000 sample not present")
PROBS = [f"prob_{c}" for c in CLASSES]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    """A real (briefly trained) resnet10t at 16 px saved as model.pt, as `best --retrain` saves it."""
    return save_tiny_model(tmp_path_factory.mktemp("model") / "model.pt")


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_cli(*args) -> subprocess.CompletedProcess:
    """The real command line in its own process: exit code and stderr as a user sees them."""
    return subprocess.run([sys.executable, "-m", "hamtune.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}, check=False)


@pytest.fixture(scope="module")
def labelled_synthetic(tmp_path_factory) -> Path:
    """150 small synthetic images and their HAM10000 metadata (lesion_id, dx_type, age, sex, localization)."""
    from hamtune.data.synthetic import generate_synthetic

    return generate_synthetic(tmp_path_factory.mktemp("labelled"), n_images=150, seed=3, image_size=(24, 18),
                              workers=1)


def test_evaluate_labels_with_metadata_writes_the_audit(model_file, labelled_synthetic, tmp_path, capsys):
    """Labels that carry the patient data get the subgroup tables, the melanoma operating points with
    roc_melanoma.png and the model card, in report.md and metrics.json alike, scored on the predictions written."""
    labels = labelled_synthetic / "HAM10000_metadata.csv"
    code, _, err = run(capsys, "evaluate", "--model", model_file, "--images", labelled_synthetic, "--labels", labels,
                       "--out", tmp_path / "eval")
    assert code == 0, err
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    report = (tmp_path / "eval" / "report.md").read_text()
    assert {"subgroups", "melanoma_operating_points", "model_card"} <= set(metrics)
    for heading in ("## Subgroups", "### By sex", "### By age band", "### By body site",
                    "### By diagnosis confirmation", "## Melanoma versus rest", "## Model card"):
        assert heading in report, heading
    with Image.open(tmp_path / "eval" / "roc_melanoma.png") as image:
        assert image.format == "PNG" and image.width > 300

    pred = pd.read_csv(tmp_path / "eval" / "predictions.csv")
    meta = pd.read_csv(labels).set_index("image_id").loc[pred["image_id"]].reset_index()
    assert metrics["subgroups"]["unit"] == "lesion"
    for attribute in ("sex", "localization", "dx_type"):
        got = {g["group"]: g for g in metrics["subgroups"]["attributes"][attribute]["groups"]}
        assert set(got) == set(meta[attribute].fillna("unknown"))
        for group, g in got.items():
            mask = (meta[attribute].fillna("unknown") == group).to_numpy()
            lesions = meta.loc[mask, "lesion_id"].nunique()
            assert (g["images"], g["lesions"]) == (mask.sum(), lesions)
            if lesions >= 10:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # a subgroup without some predicted diagnosis
                    expected = balanced_accuracy_score(pred.loc[mask, "true_dx"], pred.loc[mask, "predicted_dx"])
                lo, hi = g["balanced_accuracy_ci95"]
                assert g["balanced_accuracy"] == pytest.approx(expected)
                assert f"| {group} | {g['images']} | {lesions} | " in report and f"({lo:.4f}–{hi:.4f})" in report
            else:
                assert g["balanced_accuracy"] is None and f"({lesions} < 10 lesions)" in report
    mel = metrics["melanoma_operating_points"]
    positive = (pred["true_dx"] == "mel").to_numpy()
    assert mel["roc_auc"] == pytest.approx(roc_auc_score(positive, pred["prob_mel"]))
    assert [p["target_specificity"] for p in mel["operating_points"]] == [0.8, 0.9, 0.95]
    card = metrics["model_card"]
    assert card["data"]["splits"] == {"evaluated": {"images": 150, "lesions": meta["lesion_id"].nunique()}}
    assert "not for diagnosis" in report and "Fitzpatrick" in report and "overlaps the model's training" in report


def test_out_paths_of_the_wrong_kind_end_in_one_line_and_exit_2(model_file, labelled_synthetic, tmp_path, capsys):
    """evaluate --out naming a file, predict --out naming a folder: one line naming the path and what was expected,
    exit code 2, no traceback, and nothing written over what stands there."""
    report_file = tmp_path / "report.txt"
    report_file.write_text("not a folder")
    proc = run_cli("evaluate", "--model", model_file, "--images", labelled_synthetic, "--labels",
                   labelled_synthetic / "HAM10000_metadata.csv", "--out", report_file)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stdout == ""
    [line] = proc.stderr.strip().splitlines()
    assert str(report_file) in line and "is a file; expected a folder" in line
    assert report_file.read_text() == "not a folder"

    folder = tmp_path / "pred.csv"
    folder.mkdir()
    image = next(labelled_synthetic.rglob("*.jpg"))
    proc = run_cli("predict", "--model", model_file, image, "--out", folder)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stdout == ""
    [line] = proc.stderr.strip().splitlines()
    assert str(folder) in line and "is a folder; expected a file name ending in .csv or .json" in line
    assert folder.is_dir() and not any(folder.iterdir())

    # a file standing where a folder above --out should be: the same one line (in-process, no new interpreter)
    code, _, err = run(capsys, "predict", "--model", model_file, image, "--out", report_file / "pred.csv")
    assert code == 2 and f"{report_file} is a file" in err and len(err.strip().splitlines()) == 1


def test_model_file_is_plain_data_and_rebuilds_the_same_network(model_file):
    saved = torch.load(model_file, map_location="cpu", weights_only=True)
    assert saved["format"] == "hamtune-model" and saved["format_version"] == 2 and saved["classes"] == list(CLASSES)
    assert saved["diagnoses"] == [DIAGNOSES[c] for c in CLASSES] and saved["temperature"] == 1.0
    assert (saved["model"], saved["image_size"], saved["use_meta"]) == ("resnet10t", 16, False)
    [member] = saved["members"]
    assert (member["model"], member["head_hidden"], member["use_meta"]) == ("resnet10t", 32, False)
    assert member["config"]["head_dropout"] == 0.1 and saved["data_fingerprint"] == "f" * 20
    np.testing.assert_allclose(member["mean"], member["state_dict"]["mean"].flatten().numpy(), rtol=1e-6)
    np.testing.assert_allclose(member["std"], member["state_dict"]["std"].flatten().numpy(), rtol=1e-6)

    loaded = load_model(model_file)
    assert loaded.image_size == 16 and loaded.classes == list(CLASSES) and not loaded.model.training
    for name, tensor in loaded.model.state_dict().items():
        assert torch.equal(tensor, member["state_dict"][name]), name


@needs_sample
def test_evaluate_ham_labels_decodes_exactly_like_the_cache(model_file, tmp_path, capsys):
    from hamtune.data import prepare
    from hamtune.training.predict import predict_proba

    code, out, err = run(capsys, "evaluate", "--model", model_file, "--images", SAMPLE, "--labels", METADATA,
                         "--out", tmp_path / "eval")
    assert code == 0, err
    assert "Warning" not in err and "np.int64" not in out + err  # nothing a user can do nothing about
    assert "0 image(s) without a label" in out and "0 label(s) without an image" in out
    for name in ("metrics.json", "classification_report.csv", "predictions.csv", "confusion_matrix.png", "report.md",
                 "unlabelled_images.csv", "missing_images.csv"):
        assert (tmp_path / "eval" / name).is_file(), name
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    pred = pd.read_csv(tmp_path / "eval" / "predictions.csv")
    assert metrics["n_test"] == len(pred) == 140 and metrics["label_format"] == "HAM10000 metadata"
    assert metrics["bootstrap"]["unit"] == "lesion" and pred["lesion_id"].str.startswith("HAM_").all()
    y_true, y_pred = pred["true_dx"].map(CLASSES.index), pred["predicted_dx"].map(CLASSES.index)
    assert metrics["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert metrics["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y_true, y_pred))
    assert metrics["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro", zero_division=0))
    truth = pd.read_csv(METADATA).set_index("image_id")["dx"]
    assert (pred["true_dx"].to_numpy() == truth.loc[pred["image_id"]].to_numpy()).all()

    # The same images through the decode-once cache at the model's size give the same probabilities.
    data = prepare(SAMPLE, 16, cache_dir=tmp_path / "cache", progress=False)
    cached = predict_proba(load_model(model_file).model, data.images)
    by_id = pd.DataFrame(cached, columns=PROBS, index=data.table["image_id"]).loc[pred["image_id"]]
    np.testing.assert_allclose(pred[PROBS].to_numpy(), by_id.to_numpy(), atol=1e-6)


@needs_sample
def test_evaluate_isic_labels_counts_unpaired_images_and_labels(model_file, tmp_path, capsys):
    meta = pd.read_csv(METADATA)
    chosen = meta.groupby("dx").head(3).sort_values("image_id")  # 21 images, 3 per class
    images = tmp_path / "images" / "nested"
    images.mkdir(parents=True)
    source = {p.stem: p for p in SAMPLE.rglob("*.jpg")}
    for image_id in chosen["image_id"]:
        shutil.copy(source[image_id], images / f"{image_id}.jpg")
    shutil.copy(source[chosen["image_id"].iloc[0]], images / "ISIC_9999999.JPG")  # unlabelled copy, upper-case suffix
    dropped = chosen["image_id"].iloc[5]
    labelled = chosen[chosen["image_id"] != dropped]
    isic = pd.DataFrame({"image": list(labelled["image_id"]) + ["ISIC_0000001"]})
    for code in ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"):
        isic[code] = [float(dx == code.lower()) for dx in labelled["dx"]] + [float(code == "NV")]
    isic.to_csv(tmp_path / "ISIC2018_Task3_GroundTruth.csv", index=False)

    code, out, err = run(capsys, "evaluate", "--model", model_file, "--images", tmp_path / "images", "--labels",
                         tmp_path / "ISIC2018_Task3_GroundTruth.csv", "--out", tmp_path / "eval")
    assert code == 0, err
    assert "2 image(s) without a label" in out and "1 label(s) without an image" in out
    assert sorted(pd.read_csv(tmp_path / "eval" / "unlabelled_images.csv")["image_id"]) == sorted([dropped, "ISIC_9999999"])
    assert list(pd.read_csv(tmp_path / "eval" / "missing_images.csv")["image_id"]) == ["ISIC_0000001"]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["n_test"] == 20 and metrics["label_format"] == "ISIC 2018 Task 3 ground truth"
    assert metrics["bootstrap"]["unit"] == "image"  # the ISIC form has no lesion ids
    pred = pd.read_csv(tmp_path / "eval" / "predictions.csv").set_index("image_id")
    assert (pred["true_dx"] == labelled.set_index("image_id")["dx"].loc[pred.index]).all()


def test_unknown_or_malformed_labels_are_one_line_errors(model_file, tmp_path, capsys):
    odd = tmp_path / "labels.csv"
    odd.write_text("name,diagnosis\nISIC_1,mel\n")
    code, _, err = run(capsys, "evaluate", "--model", model_file, "--images", tmp_path, "--labels", odd)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert str(odd) in err and "unknown label format" in err and "image_id, dx" in err and "image, MEL, NV" in err

    two_hot = tmp_path / "gt.csv"
    two_hot.write_text("image,MEL,NV,BCC,AKIEC,BKL,DF,VASC\nISIC_1,1.0,0.0,0,0,0,0,0\nISIC_2,1.0,1.0,0,0,0,0,0\n")
    with pytest.raises(HamtuneError, match="gt.csv: line 3: expected exactly one 1.0"):
        read_labels(two_hot)
    bad_dx = tmp_path / "meta.csv"
    bad_dx.write_text("image_id,dx\nISIC_1,melanoma\n")
    with pytest.raises(HamtuneError, match="meta.csv: line 2: dx 'melanoma' is not a HAM10000 diagnosis code"):
        read_labels(bad_dx)


@needs_sample
def test_predict_gives_probabilities_and_diagnosis_names(model_file, tmp_path, capsys):
    code, out, err = run(capsys, "predict", "--model", model_file, SAMPLE / "HAM10000_images_part_2")
    assert code == 0, err
    lines = out.strip().splitlines()
    n_images = len(list((SAMPLE / "HAM10000_images_part_2").glob("*.jpg")))
    assert len(lines) == 1 + n_images and lines[0].split()[:3] == ["image_id", "predicted_dx", "diagnosis"]

    code, out, err = run(capsys, "predict", "--model", model_file, SAMPLE, "--out", tmp_path / "pred.csv")
    assert code == 0, err
    table = pd.read_csv(tmp_path / "pred.csv")
    assert len(table) == 140 and table["image_id"].is_unique  # the folder is searched recursively
    np.testing.assert_allclose(table[PROBS].sum(axis=1), 1.0, atol=1e-9)
    assert (table["predicted_dx"] == table[PROBS].idxmax(axis=1).str.removeprefix("prob_")).all()
    assert (table["diagnosis"] == table["predicted_dx"].map(DIAGNOSES)).all()
    assert (table["probability"] == table[PROBS].max(axis=1)).all()

    one = next(SAMPLE.rglob("*.jpg"))
    code, _, err = run(capsys, "predict", "--model", model_file, one, "--out", tmp_path / "pred.json", "--tta")
    assert code == 0, err
    records = json.loads((tmp_path / "pred.json").read_text())
    assert len(records) == 1 and records[0]["image_id"] == one.stem and records[0]["diagnosis"] in DIAGNOSES.values()
    assert sum(records[0][p] for p in PROBS) == pytest.approx(1.0)

    code, _, err = run(capsys, "predict", "--model", model_file, one, "--out", tmp_path / "pred.txt")
    assert code == 2 and ".csv or .json" in err


def test_bad_model_files_are_refused_in_one_line(model_file, tmp_path, capsys):
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (40, 30), (200, 120, 90)).save(image)

    record = torch.load(model_file, map_location="cpu", weights_only=True)
    reordered = tmp_path / "reordered.pt"
    torch.save({**record, "classes": list(reversed(record["classes"]))}, reordered)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(model_file.read_bytes()[: model_file.stat().st_size // 2])
    foreign = tmp_path / "foreign.pt"
    torch.save({"weight": torch.zeros(3)}, foreign)
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    hostile = tmp_path / "hostile.pt"
    torch.save({"format": "hamtune-model", "payload": Payload()}, hostile)

    expected = {reordered: "class order", truncated: "not a readable hamtune model file",
                foreign: "not a hamtune model file", hostile: "not a readable hamtune model file"}
    for path, message in expected.items():
        code, out, err = run(capsys, "predict", "--model", path, image)
        assert code == 2 and out == "", path
        assert len(err.strip().splitlines()) == 1 and str(path) in err and message in err, err
    code, _, err = run(capsys, "evaluate", "--model", truncated, "--images", tmp_path, "--labels", tmp_path / "none.csv")
    assert code == 2 and str(truncated) in err
    assert not marker.exists(), "loading a model file ran code from it"

    code, _, _ = run(capsys, "predict", "--model", model_file, image)  # the good file still works on a PNG
    assert code == 0


def test_bootstrap_resamples_lesions_and_agrees_with_a_plain_loop():
    rng = np.random.default_rng(1)
    lesions = np.repeat(np.arange(60), 3)  # three near-duplicate images per lesion: same label, same outcome
    y_true = np.repeat(rng.integers(0, 4, 60), 3)
    correct = np.repeat(rng.random(60) < 0.6, 3)
    y_pred = np.where(correct, y_true, (y_true + 1) % 4)

    by_lesion = bootstrap_balanced_accuracy(y_true, y_pred, lesions)
    by_image = bootstrap_balanced_accuracy(y_true, y_pred)
    assert by_lesion == bootstrap_balanced_accuracy(y_true, y_pred, lesions)  # seeded
    assert by_lesion[0] < balanced_accuracy_score(y_true, y_pred) < by_lesion[1]
    # correlated images: resampling them one by one understates the uncertainty
    assert by_lesion[1] - by_lesion[0] > 1.3 * (by_image[1] - by_image[0])

    loop_rng = np.random.default_rng(123)
    scores = []
    for _ in range(1000):
        drawn = loop_rng.integers(0, 60, 60)
        rows = np.concatenate([np.flatnonzero(lesions == g) for g in drawn])
        scores.append(balanced_accuracy_score(y_true[rows], y_pred[rows]))
    np.testing.assert_allclose(by_lesion, np.percentile(scores, [2.5, 97.5]), atol=0.03)
    assert bootstrap_balanced_accuracy(y_true, y_true, lesions) == (1.0, 1.0)
