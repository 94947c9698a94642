"""A saved model on new images: `evaluate` on an external labelled set, `predict` on unlabelled images.

Images are found and decoded by the data layer (hamtune.data.images) with the same decoder that filled the training
cache, so a model sees at inference exactly the pixels it was trained on. Reports are written by
hamtune.reports.evaluation.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from hamtune.data.arrays import encode_meta, unknown_meta
from hamtune.data.download import official_test_set
from hamtune.data.images import decode_files, find_images
from hamtune.data.isic2018 import official_weights, write_submission
from hamtune.data.labels import read_labels
from hamtune.errors import HamtuneError
from hamtune.final.audit import audit
from hamtune.final.modelfile import load_model
from hamtune.io import atomic_write_json, write_csv
from hamtune.reports.evaluation import PROB_PREFIX, write_external_evaluation
from hamtune.training.device import resolve_device
from hamtune.training.metrics import evaluation_metrics, summary_line
from hamtune.vocab import CLASSES, DIAGNOSES

Echo = Callable[[str], None]


@dataclass
class EvaluationOutcome:
    out_dir: Path
    metrics: dict[str, Any]
    files: list[Path]


def evaluate_external(model_path: Path, images_dir: Path | None, labels_path: Path | None, *,
                      official_test: bool = False, out_dir: Path | None = None, tta: bool = False,
                      echo: Echo = print) -> EvaluationOutcome:
    """Score a saved model on a labelled image folder (or, official_test, on the downloaded ISIC 2018 Task 3 test
    set); write the same metrics and pictures as the retrain."""
    if official_test:
        if images_dir or labels_path:
            raise HamtuneError("--isic2018-test names the images and labels itself; drop --images and --labels")
        images_dir, labels_path = official_test_set()
    elif not (images_dir and labels_path):
        raise HamtuneError("evaluate needs --images DIR and --labels CSV, or --isic2018-test")
    out_dir = Path(out_dir or Path(model_path).parent / f"eval-{Path(images_dir).resolve().name}")
    _check_out(out_dir, folder=True)  # before minutes of decoding and scoring, not after
    device = resolve_device("auto")
    loaded = load_model(model_path, device=device)
    labels, form = read_labels(labels_path)
    if not Path(images_dir).is_dir():
        raise HamtuneError(f"{images_dir}: images folder not found")

    files: dict[str, Path] = {}
    duplicates = 0
    for p in find_images([images_dir]):
        if p.stem in files:
            duplicates += 1  # Kaggle ships every image twice (part_1 and its lower-case copy): first one wins
        else:
            files[p.stem] = p
    labelled = set(labels["image_id"])
    unlabelled = sorted(set(files) - labelled)
    missing = labels.loc[~labels["image_id"].isin(files.keys()), "image_id"].tolist()
    echo(f"labels: {labels_path} ({form}, {len(labels)} rows); images: {len(files)} under {images_dir}"
         + (f" ({duplicates} duplicate files ignored)" if duplicates else ""))
    out_dir.mkdir(parents=True, exist_ok=True)
    listed = [write_csv(out_dir / "unlabelled_images.csv",
                               pd.DataFrame({"image_id": unlabelled, "path": [str(files[i]) for i in unlabelled]})),
              write_csv(out_dir / "missing_images.csv", pd.DataFrame({"image_id": missing}))]
    echo(f"{len(unlabelled)} image(s) without a label (listed in {listed[0]})")
    echo(f"{len(missing)} label(s) without an image (listed in {listed[1]})")

    rows = labels[labels["image_id"].isin(files.keys())].reset_index(drop=True)
    if rows.empty:
        raise HamtuneError(f"{images_dir}: none of the {len(labels)} images labelled in {labels_path} is there; "
                           "expected image files named <image id>.jpg/.jpeg/.png")
    with tempfile.TemporaryDirectory(prefix="hamtune-eval-") as workdir:
        images, failures = decode_files([files[i] for i in rows["image_id"]], loaded.image_size, Path(workdir))
        unreadable = rows.iloc[[i for i, _ in failures]].assign(reason=[r for _, r in failures])
        rows = rows.drop(index=[i for i, _ in failures]).reset_index(drop=True)
        listed.append(write_csv(out_dir / "unreadable_images.csv", unreadable[["image_id", "reason"]]))
        echo(f"{len(unreadable)} unreadable image(s) skipped (listed in {listed[2]})")
        if rows.empty:
            raise HamtuneError(f"{images_dir}: none of the labelled images could be decoded (see {listed[2]})")
        meta = encode_meta(rows) if loaded.use_meta else None
        probs = loaded.predict_proba(images, meta, device=device, tta=tta)

    # The official scorer takes each row's argmax as the diagnosis, so the submission holds the scores whose argmax is
    # this model's decision: the calibrated probabilities times the decision weights, renormalised.
    weights = loaded.decision_weights
    scores = probs * weights
    submission = write_submission(out_dir / "submission.csv", rows["image_id"], scores / scores.sum(1, keepdims=True))
    scored = official_weights(rows["image_id"], form) > 0  # the official scorer's zero-weight rule (ISIC truth)
    zero_weight = rows.loc[~scored, "image_id"].tolist()
    if zero_weight:
        echo(f"{', '.join(zero_weight)}: zero weight, as in the official ISIC scorer; left out of the metrics "
             "(kept in submission.csv)")
    all_rows, rows, probs = rows, rows[scored].reset_index(drop=True), probs[scored]
    has_lesions = rows["lesion_id"].notna().all()
    y_true = rows["label"].to_numpy()
    metrics = {
        "model": str(model_path), "images": str(images_dir), "labels": str(labels_path), "label_format": form,
        "n_test": len(rows), "zero_weight_images": zero_weight, "tta": tta,
        **evaluation_metrics(y_true, probs, rows["lesion_id"] if has_lesions else None, weights=weights),
        "unlabelled_images": len(unlabelled), "missing_images": len(missing), "unreadable_images": len(unreadable),
        "duplicate_files_ignored": duplicates, "image_size": loaded.image_size,
        "members": len(loaded.members), "temperature": loaded.temperature,
        "class_bias": loaded.class_bias.tolist(), "decision_weights": weights.tolist(),
        "metadata": ("from the labels file" if form.startswith("HAM") else "unknown (all 'unknown')") if loaded.use_meta
        else "not used by the model",
    }
    metrics["model_name"], metrics["trained_on"] = loaded.info.get("model"), loaded.fingerprint
    # The audit: subgroups where the labels carry sex, age, body site or dx_type; melanoma operating points; card.
    lesions = rows["lesion_id"].nunique() if has_lesions else None
    metrics |= audit(rows, y_true, probs, metrics, weights=weights, external=True, source=str(images_dir),
                     splits={"evaluated": {"images": len(rows), "lesions": lesions}},
                     model={"architecture": loaded.info.get("model"), "networks": len(loaded.members),
                            "image_size": loaded.image_size, "uses_metadata": loaded.use_meta,
                            "calibration": "temperature and class biases" if loaded.calibrated else "none",
                            "trained_on_data": loaded.fingerprint, "test_time_augmentation": tta})
    written = write_external_evaluation(
        out_dir, metrics, image_ids=rows["image_id"], lesion_ids=rows["lesion_id"] if has_lesions else None,
        y_true=y_true, probs=probs, weights=weights, submitted=len(all_rows), also_written=[*listed, submission])
    echo(f"evaluated {len(rows)} images: {summary_line(metrics)}")
    echo(f"report: {out_dir / 'report.md'}")
    return EvaluationOutcome(out_dir=out_dir, metrics=metrics, files=written)


# ---------------------------------------------------------------------------------------------------------------
# predict: class probabilities for unlabelled images


def predict(model_path: Path, inputs: Sequence[Path], *, tta: bool = False, echo: Echo = print) -> pd.DataFrame:
    """One row per readable image: path, predicted class code (the file's decision rule), its diagnosis name and
    probability, all probabilities."""
    device = resolve_device("auto")
    loaded = load_model(model_path, device=device)
    paths = find_images(inputs)
    with tempfile.TemporaryDirectory(prefix="hamtune-predict-") as workdir:
        images, failures = decode_files(paths, loaded.image_size, Path(workdir))
        if failures and len(failures) == len(paths):  # one line: the first reason stands for all
            raise HamtuneError(f"{paths[0]}: no readable image among the {len(paths)} given ({failures[0][1]})")
        for i, reason in failures:
            echo(f"skipped {paths[i]}: unreadable image ({reason})")
        meta = unknown_meta(len(images)) if loaded.use_meta else None
        probs = loaded.predict_proba(images, meta, device=device, tta=tta)
    bad = {i for i, _ in failures}
    kept = [p for i, p in enumerate(paths) if i not in bad]
    top = loaded.decide(probs)
    if np.any(loaded.decision_weights != 1.0):
        echo("predicted_dx is the networks' own choice (the argmax before calibration, which the search selected "
             "for); the probabilities are calibrated to HAM10000's mix of diagnoses, so it is not always the most "
             "probable one")
    table = pd.DataFrame({
        "path": [str(p) for p in kept], "image_id": [p.stem for p in kept],
        "predicted_dx": [CLASSES[i] for i in top], "diagnosis": [DIAGNOSES[CLASSES[i]] for i in top],
        "probability": probs[np.arange(len(top)), top],
    })
    for i, name in enumerate(CLASSES):
        table[f"{PROB_PREFIX}{name}"] = probs[:, i]
    return table


def _check_out(path: Path, *, folder: bool) -> None:
    """Refuse, in one line, an --out that cannot be written: a file where the report folder should go, a folder where
    the predictions file should go, or a file in the way of a folder above it."""
    if folder and path.exists() and not path.is_dir():
        raise HamtuneError(f"--out {path}: is a file; expected a folder for the report (new or existing)")
    if not folder and path.is_dir():
        raise HamtuneError(f"--out {path}: is a folder; expected a file name ending in .csv or .json")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise HamtuneError(f"--out {path}: {parent} is a file, so nothing can be written under it")
            break


def predict_to(model_path: Path, inputs: Sequence[Path], out: Path | None, *, tta: bool = False, echo: Echo = print,
               warn: Echo = print) -> pd.DataFrame:
    """`hamtune predict`: the predictions printed as a table (echo), or written to `out` (.csv or .json); notes on
    skipped images and the decision rule go to `warn`."""
    if out is not None:
        _check_out(Path(out), folder=False)
        if out.suffix.lower() not in (".csv", ".json"):
            raise HamtuneError(f"--out {out}: expected a file name ending in .csv or .json")
    table = predict(model_path, inputs, tta=tta, echo=warn)
    if out is None:
        shown = table.drop(columns=["path"])
        floats = [c for c in shown.columns if c == "probability" or c.startswith(PROB_PREFIX)]
        echo(shown.to_string(index=False, formatters={c: "{:.4f}".format for c in floats}))
    else:
        if out.suffix.lower() == ".csv":
            write_csv(out, table)
        else:
            atomic_write_json(out, table.to_dict(orient="records"))
        echo(f"wrote {len(table)} predictions to {out}")
    return table
