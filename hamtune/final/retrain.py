"""Retrain the chosen configuration on train+val, test it once, and write the final model and its report.

The test split exists for exactly one purpose: the single, final estimate of the chosen configuration. The search
never sees it (the search driver hands Ray only train and val); the retrain trains on train+val and checks, before a single
step, that no test image and no test lesion is among its training rows. Model selection never looks at test
results: with several seeds every model is tested, all are reported, and the saved model is the first seed's,
whatever its score.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from hamtune.data.arrays import SplitArrays
from hamtune.data.cache import prepare_spec_data
from hamtune.errors import HamtuneError
from hamtune.final.audit import audit
from hamtune.final.calibration import (
    CALIBRATION_FRACTION, apply_calibration, argmax_preserving_weights, calibration_holdout, calibration_summary,
    fit_calibration, fit_temperature,
)
from hamtune.final.modelfile import ensemble_record, member_record, save_record
from hamtune.io import atomic_write_bytes, now_iso, remove_abandoned_temps, replace_folder, temp_sibling
from hamtune.reports.final import write_final_report
from hamtune.search import tables as res
from hamtune.search.choose import BestChoice
from hamtune.search.spec import spec_from_dict
from hamtune.training.config import TrainConfig
from hamtune.training.metrics import ECE_BINS, HEADLINE_METRICS, bootstrap_difference, decide, evaluation_metrics, summary_line
from hamtune.vocab import CLASSES

BEST_DIR = "best"
COMPLETE = ".complete"  # written last into the finished folder: a best/ without it is not a retrain's output
Echo = Callable[[str], None]


def prepare_recorded_data(choice: BestChoice, *, progress: bool = True):
    """The experiment's data, prepared with its recorded settings (a cache hit), refused if it has changed since."""
    record_path = choice.exp_dir / res.EXPERIMENT_FILE
    spec = spec_from_dict(choice.record["spec"], source=str(record_path))
    recorded_cache = choice.record.get("data", {}).get("cache")
    data = prepare_spec_data(spec.data, cache_dir=Path(recorded_cache).parent if recorded_cache else None,
                             progress=progress)
    recorded = choice.record.get("data", {}).get("fingerprint")
    if recorded != data.fingerprint:
        raise HamtuneError(f"{record_path}: the data changed since the search (fingerprint {recorded} -> "
                           f"{data.fingerprint}); retraining on other data would not test the searched configuration")
    return data


def check_no_test_leak(table: pd.DataFrame, train_index: np.ndarray, test_index: np.ndarray, where: Path | str) -> dict:
    """Raise unless train+val and test share no image row and no lesion; return both sizes (images, lesions)."""
    train_index, test_index = np.asarray(train_index), np.asarray(test_index)
    if len(test_index) == 0:
        raise HamtuneError(f"{where}: the test split is empty; nothing to evaluate the retrained model on")
    shared_rows = np.intersect1d(train_index, test_index)
    if len(shared_rows):
        first = table["image_id"].iloc[int(shared_rows[0])]
        raise HamtuneError(f"{where}: {len(shared_rows)} test image(s) are also in train+val (first: {first}); "
                           "refusing to retrain on test images")
    train_lesions = set(table["lesion_id"].iloc[train_index])
    test_lesions = set(table["lesion_id"].iloc[test_index])
    shared_lesions = sorted(train_lesions & test_lesions)
    if shared_lesions:
        raise HamtuneError(f"{where}: {len(shared_lesions)} lesion(s) have images in both train+val and test (first: "
                           f"{shared_lesions[0]}); expected a lesion-grouped split")
    return {"train_val": {"images": int(len(train_index)), "lesions": len(train_lesions)},
            "test": {"images": int(len(test_index)), "lesions": len(test_lesions)},
            "disjoint_images": True, "disjoint_lesions": True}


def retrain_config(choice: BestChoice, *, epochs: int, seed: int):
    """The best trial's full config with the retrain's epochs and seed (warm-up clipped to fit the epochs)."""
    config = {**choice.config, "epochs": int(epochs), "seed": int(seed)}
    if float(config.get("warmup_epochs", TrainConfig.default("warmup_epochs"))) > epochs:
        config["warmup_epochs"] = float(epochs)
    return TrainConfig.from_dict(config)


@dataclass
class RetrainOutcome:
    out_dir: Path
    metrics: dict[str, Any]
    files: list[Path] = field(default_factory=list)


def _subset(arrays: SplitArrays, rows: np.ndarray) -> SplitArrays:
    """The rows of `arrays` whose table index is in `rows` (in arrays' order)."""
    keep = np.isin(arrays.index, rows)
    return SplitArrays(images=arrays.images[keep], labels=arrays.labels[keep], meta=arrays.meta[keep],
                       index=arrays.index[keep])


def _sizes(table: pd.DataFrame, arrays: SplitArrays | None) -> dict | None:
    if arrays is None:
        return None
    return {"images": int(len(arrays)), "lesions": int(table["lesion_id"].iloc[arrays.index].nunique())}


def retrain(choices: BestChoice | Sequence[BestChoice], *, epochs: int | None = None,
            seeds: Sequence[int] | None = None, tta: bool = False, calibration: float | None = None,
            out_dir: Path | None = None, progress: bool = True, echo: Echo = print) -> RetrainOutcome:
    """Train each chosen config once per seed, average their probabilities, calibrate them, test once, report.

    The members train on train+val less a lesion-grouped, class-stratified `calibration` fraction of it, on which
    the temperature and class biases of the averaged probabilities are fitted (hamtune.final.calibration); the
    predicted diagnosis stays the argmax of the uncalibrated average; 0 = no hold-out, no calibration (None: the
    default fraction, CALIBRATION_FRACTION). Every member and the
    ensemble are tested once; the saved model.pt is the first seed's ensemble.
    """
    import torch
    from tqdm import tqdm

    from hamtune.training.device import resolve_device
    from hamtune.training.loop import fit
    from hamtune.training.predict import predict_proba

    choices = [choices] if isinstance(choices, BestChoice) else list(choices)
    choice = choices[0]  # the best trial: the experiment, the data, the headline config
    if epochs is not None and epochs < 1:
        raise HamtuneError(f"--epochs {epochs}: expected a whole number of epochs >= 1")
    seeds = list(seeds) if seeds else [int(choice.config.get("seed", TrainConfig.default("seed")))]
    if len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
        raise HamtuneError(f"--seeds {' '.join(map(str, seeds))}: expected distinct integers >= 0")
    calibration = CALIBRATION_FRACTION if calibration is None else calibration
    if not 0 <= calibration < 0.5:
        raise HamtuneError(f"--calibration {calibration}: expected a fraction of train+val in [0, 0.5) (0 = none)")
    out_dir = out_dir or choice.exp_dir / BEST_DIR

    data = prepare_recorded_data(choice, progress=progress)
    train_val, test = data.arrays("train", "val"), data.arrays("test")
    split = check_no_test_leak(data.table, train_val.index, test.index, data.path)
    echo(f"data: {len(data.table)} images from cache {data.path} (decoded {data.decoded}); train+val "
         f"{split['train_val']['images']} images / {split['train_val']['lesions']} lesions, test "
         f"{split['test']['images']} images / {split['test']['lesions']} lesions (disjoint)")
    train, held = train_val, None
    if calibration > 0:
        fit_rows, held_rows = calibration_holdout(data.table, train_val.index, calibration,
                                                  seed=int(data.split.seed))
        train, held = _subset(train_val, fit_rows), _subset(train_val, held_rows)
        check_no_calibration_leak(data.table, train.index, held.index, test.index, data.path)
        echo(f"calibration: {len(held)} images / {_sizes(data.table, held)['lesions']} lesions of train+val held "
             f"back (lesion-grouped, per diagnosis) to fit the calibration; the retrain trains on the other "
             f"{len(train)}")
    split["train"], split["calibration"] = _sizes(data.table, train), _sizes(data.table, held)
    member_epochs = [int(epochs or c.best_epoch) for c in choices]
    names = [f"trial {c.trial['trial_id']}" for c in choices]
    if len(choices) > 1:
        echo(f"ensemble of the top {len(choices)} trials by {choice.metric}: {', '.join(names)}")
    source = "--epochs" if epochs else "the epoch at which each trial peaked"
    echo(f"retrain: {', '.join(map(str, member_epochs))} epochs ({source}), seed{'s' if len(seeds) > 1 else ''} "
         f"{' '.join(map(str, seeds))}{', test-time augmentation' if tta else ''}")

    lesions = data.table["lesion_id"].iloc[test.index].tolist()
    runs, saved = [], None
    for seed in seeds:
        members = []
        for rank, (c, n_epochs, name) in enumerate(zip(choices, member_epochs, names)):
            config = retrain_config(c, epochs=n_epochs, seed=seed)
            label = f"seed {seed}" if len(choices) == 1 else f"{name} seed {seed}"
            with tqdm(total=n_epochs, desc=label, unit="epoch", disable=not progress, file=sys.stderr,
                      dynamic_ncols=True) as bar:
                def on_epoch(metrics: dict, _make_state) -> None:
                    bar.set_postfix(train_loss=f"{metrics['train_loss']:.4f}")
                    bar.update(1)

                result = fit(config, train, None, on_epoch=on_epoch)
            if result.status != "completed":
                raise HamtuneError(f"retrain of trial {c.trial['trial_id']} with seed {seed} failed: {result.message} "
                                   "(try another --seeds value or fewer --epochs)")
            device = resolve_device(config.device)
            test_probs, held_probs = (
                None if arrays is None else predict_proba(result.model, arrays.images,
                                                          arrays.meta if config.use_meta else None, device=device,
                                                          tta=tta)
                for arrays in (test, held))
            metrics = evaluation_metrics(test.labels, test_probs, lesions)
            if len(choices) > 1:
                echo(f"test, {name}, seed {seed} ({len(test)} images): {summary_line(metrics)}")
            members.append({"rank": rank + 1, "trial_id": c.trial["trial_id"], "seed": seed, "epochs": n_epochs,
                            "config": config, "history": result.history, "test_probs": test_probs,
                            "held_probs": held_probs, "metrics": metrics,
                            f"search_{c.metric}": float(c.trial[f"best_{c.metric}"]),
                            "model": result.model.to("cpu") if saved is None else None})
            del result
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

        raw = np.mean([m["test_probs"] for m in members], axis=0)
        if held is not None:
            held_raw = np.mean([m["held_probs"] for m in members], axis=0)
            temperature, bias = fit_calibration(held_raw, held.labels)
            t_only = fit_temperature(held_raw, held.labels)  # for comparison: what a temperature alone would do
            scaling = {"temperature": temperature, "class_bias": bias.tolist(),
                       "calibration_slice": calibration_summary(held_raw, held.labels, temperature, bias),
                       "test": calibration_summary(raw, test.labels, temperature, bias),
                       "temperature_only": {"temperature": t_only,
                                            "calibration_slice": calibration_summary(held_raw, held.labels, t_only),
                                            "test": calibration_summary(raw, test.labels, t_only)}}
        else:
            temperature, bias = 1.0, np.zeros(len(CLASSES))
            scaling = {"temperature": 1.0, "class_bias": bias.tolist(),
                       "test": calibration_summary(raw, test.labels, 1.0)}
        weights = argmax_preserving_weights(bias)  # the calibration changes no prediction
        scaling["decision_weights"] = weights.tolist()
        probs = apply_calibration(raw, temperature, bias)
        metrics = evaluation_metrics(test.labels, probs, lesions, weights=weights)
        if len(members) > 1:  # does the ensemble beat each member? paired: the same lesion resamples for both
            for m in members:
                m["metrics"]["ensemble_minus_member_ci95"] = list(bootstrap_difference(
                    test.labels, decide(probs, weights), m["test_probs"].argmax(axis=1), lesions))
        what = "ensemble" if len(choices) > 1 else "model"
        echo(f"test, {what}, seed {seed} ({len(test)} images): {summary_line(metrics)}")
        if held is not None:
            t = scaling["test"]
            echo(f"calibration (temperature {temperature:.3f} and class biases, fitted on the held-back slice): test "
                 f"ECE {t['ece_before']:.4f} -> {t['ece_after']:.4f}, NLL {t['nll_before']:.4f} -> "
                 f"{t['nll_after']:.4f} (predictions unchanged)")
        runs.append({"seed": seed, "members": members, "metrics": metrics, "scaling": scaling})
        if saved is None:  # the first seed's models are the ones kept, chosen before any test score was seen
            saved = {"seed": seed, "members": members, "probs": probs, "raw_probs": raw, "metrics": metrics,
                     "scaling": scaling, "temperature": temperature, "class_bias": bias, "weights": weights}

    first = saved["members"][0]
    metrics = {
        "experiment": choice.record["name"], "trial_id": choice.trial["trial_id"], "selected_by": choice.metric,
        "mode": choice.mode, "n_test": len(test), "model_seed": saved["seed"], **saved["metrics"],
        "seeds": seeds, "tta": tta, "epochs": first["epochs"], "split": split,
        "data": {"fingerprint": data.fingerprint, "cache": str(data.path), "decoded": data.decoded},
        "top": len(choices), "trial_ids": [c.trial["trial_id"] for c in choices],
        "members": [{k: m[k] for k in ("rank", "trial_id", "seed", "epochs", f"search_{choice.metric}")}
                    | {k: m["metrics"][k] for k in (*HEADLINE_METRICS, "balanced_accuracy_ci95")}
                    | ({"ensemble_minus_member_ci95": m["metrics"]["ensemble_minus_member_ci95"]}
                       if len(saved["members"]) > 1 else {})
                    for m in saved["members"]],
        "calibration": {"fraction": calibration, "bins": ECE_BINS,
                        "method": "temperature and one bias per class on the log of the averaged probabilities "
                                  "(bias-corrected temperature scaling), fitted by NLL on the held-back slice of "
                                  "train+val; predicted diagnosis: argmax of probability * decision_weights "
                                  "(exp(-class_bias): the argmax of the uncalibrated average)" if held is not None
                                  else "none (--calibration 0)", **saved["scaling"]},
    }
    if len(seeds) > 1:
        metrics["per_seed"] = [{"seed": r["seed"], **{k: r["metrics"][k] for k in HEADLINE_METRICS},
                                "balanced_accuracy_ci95": r["metrics"]["balanced_accuracy_ci95"],
                                "temperature": r["scaling"]["temperature"]} for r in runs]
        metrics["across_seeds"] = {k: _mean_std([r["metrics"][k] for r in runs]) for k in HEADLINE_METRICS}
        for k in HEADLINE_METRICS:
            s = metrics["across_seeds"][k]
            echo(f"across seeds {' '.join(map(str, seeds))}: {k} {s['mean']:.4f} ± {s['std']:.4f}")
    metrics["config"] = first["config"].to_dict()
    metrics |= audit(data.table.iloc[test.index], test.labels, saved["probs"], metrics, weights=saved["weights"],
                     splits=split, source=str(choice.record["spec"].get("data", {}).get("source", "unknown")),
                     model={"architecture": first["config"].model, "networks": len(saved["members"]),
                            "image_size": data.image_size, "uses_metadata": first["config"].use_meta,
                            "calibration": "temperature and class biases" if held is not None else "none",
                            "test_time_augmentation": tta})
    mel = metrics["melanoma_operating_points"]
    if mel["available"]:
        at = ", ".join(f"{p['sensitivity']:.2f} at {p['target_specificity']:.0%}" for p in mel["operating_points"])
        echo(f"melanoma versus rest: ROC AUC {mel['roc_auc']:.4f}; sensitivity {at} specificity (thresholds chosen "
             "on the test split itself)")

    files = _write_outputs(out_dir, choices, data, train, held, test, saved, runs, metrics)
    echo(f"wrote {out_dir}/: {', '.join(p.name for p in files)}")
    return RetrainOutcome(out_dir=out_dir, metrics=metrics, files=files)


def check_no_calibration_leak(table: pd.DataFrame, train_index: np.ndarray, held_index: np.ndarray,
                              test_index: np.ndarray, where: Path | str) -> None:
    """Raise unless the calibration slice shares no image and no lesion with the training rows or the test."""
    for other, name in ((train_index, "the retrain's training rows"), (test_index, "the test split")):
        shared = np.intersect1d(held_index, other)
        lesions = set(table["lesion_id"].iloc[held_index]) & set(table["lesion_id"].iloc[other])
        if len(shared) or lesions:
            raise HamtuneError(f"{where}: the calibration slice shares {len(shared)} image(s) and {len(lesions)} "
                               f"lesion(s) with {name}; expected disjoint, lesion-grouped slices")


def _write_outputs(out_dir: Path, choices: list[BestChoice], data, train, held, test, saved: dict,
                   runs: list, metrics: dict) -> list[Path]:
    """The whole output folder, built beside out_dir and swapped in at the end (hamtune.io.replace_folder): a retrain
    killed while writing leaves the previous folder whole, never new weights beside an old report. Returns the files'
    paths in out_dir."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned_temps(out_dir, COMPLETE)  # the half-written folders of killed retrains
    tmp = temp_sibling(out_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        files = _write_files(tmp, choices, data, train, held, test, saved, runs, metrics)
        marker = {"experiment": metrics["experiment"], "trial_ids": metrics["trial_ids"], "created": now_iso(),
                  "files": [p.name for p in files]}
        replace_folder(tmp, out_dir, COMPLETE, json.dumps(marker, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [out_dir / p.name for p in files]


def _write_files(out_dir: Path, choices: list[BestChoice], data, train, held, test, saved: dict,
                 runs: list, metrics: dict) -> list[Path]:
    """model.pt and probabilities.npz (what the retrain made), then the report files (hamtune.reports.final)."""
    choice = choices[0]
    members = [member_record(m["model"], config=m["config"].to_dict(),
                             extra={"trial_id": m["trial_id"], "seed": m["seed"], "epochs": m["epochs"]})
               for m in saved["members"]]
    written = [save_record(out_dir / "model.pt", ensemble_record(
        members, image_size=data.image_size, fingerprint=data.fingerprint, temperature=saved["temperature"],
        class_bias=saved["class_bias"], decision_weights=saved["weights"], calibration=metrics["calibration"],
        extra={"experiment": choice.record["name"], "trial_id": choice.trial["trial_id"], "seed": saved["seed"],
               "epochs": metrics["epochs"]}))]
    written.append(_write_member_probabilities(out_dir / "probabilities.npz", data.table, test, held, saved))
    if len(choices) == 1:
        curves = {r["seed"]: r["members"][0]["history"] for r in runs}
    else:
        curves = {f"trial {m['trial_id']}, seed {r['seed']}": m["history"] for r in runs for m in r["members"]}
    # Which rows trained, which calibrated and which tested, from the very index arrays used: the proof that no
    # test image was seen and that the temperature was fitted on rows the weights never trained on.
    parts = [(train.index, "train"), (test.index, "test")] + ([(held.index, "calibration")] if held is not None else [])
    used = np.concatenate([index for index, _ in parts])
    split_rows = data.table.iloc[used][["image_id", "lesion_id", "dx"]].copy()
    split_rows.insert(0, "row", used)
    split_rows["role"] = np.concatenate([[role] * len(index) for index, role in parts])
    return written + write_final_report(
        out_dir, metrics=metrics, searched=list(choice.searched), test_rows=data.table.iloc[test.index],
        test_labels=test.labels, probs=saved["probs"], raw_probs=saved["raw_probs"], weights=saved["weights"],
        curves=curves, split_rows=split_rows, calibrated=held is not None, written=written)


def _write_member_probabilities(path: Path, table: pd.DataFrame, test: SplitArrays, held: SplitArrays | None,
                                saved: dict) -> Path:
    """Every member's own probabilities (before averaging and temperature) on the test split and the calibration
    slice, with image ids and labels: so other ways to combine or calibrate the members can be studied without
    retraining. Arrays are (members, images, classes), members in rank order."""
    import io

    arrays = {"classes": np.asarray(CLASSES), "temperature": np.float64(saved["temperature"]),
              "trial_ids": np.asarray([m["trial_id"] for m in saved["members"]]),
              "test_image_ids": table["image_id"].iloc[test.index].to_numpy(dtype=str),
              "test_labels": np.asarray(test.labels), "test_probs": np.stack([m["test_probs"] for m in saved["members"]])}
    if held is not None:
        arrays |= {"calibration_image_ids": table["image_id"].iloc[held.index].to_numpy(dtype=str),
                   "calibration_labels": np.asarray(held.labels),
                   "calibration_probs": np.stack([m["held_probs"] for m in saved["members"]])}
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return atomic_write_bytes(path, buffer.getvalue())


def _mean_std(values: list[float]) -> dict[str, Any]:
    """Mean and sample standard deviation (ddof=1) over seeds."""
    array = np.asarray(values, dtype=np.float64)
    return {"mean": float(np.mean(array)), "std": float(np.std(array, ddof=1)) if len(array) > 1 else 0.0,
            "ddof": 1, "values": array.tolist()}
