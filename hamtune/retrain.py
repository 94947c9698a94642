"""Retrain the chosen configuration on train+val, test it once, and write the final model and its report.

The test split exists for exactly one purpose: the single, final estimate of the chosen configuration. The search
never sees it (search.py hands Ray only train and val); the retrain trains on train+val and checks, before a single
step, that no test image and no test lesion is among its training rows. Model selection never looks at test
results: with several seeds every model is tested, all are reported, and the saved model is the first seed's,
whatever its score.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from hamtune import report
from hamtune import results as res
from hamtune.choose import BestChoice
from hamtune.config import TrainConfig
from hamtune.data.cache import prepare_spec_data
from hamtune.errors import HamtuneError
from hamtune.io import write_csv
from hamtune.metrics import HEADLINE_METRICS, classification_report_table, evaluation_metrics, summary_line
from hamtune.modelfile import save_model
from hamtune.space import spec_from_dict

BEST_DIR = "best"
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
    if float(config.get("warmup_epochs", TrainConfig.warmup_epochs)) > epochs:
        config["warmup_epochs"] = float(epochs)
    return TrainConfig.from_dict(config)


@dataclass
class RetrainOutcome:
    out_dir: Path
    metrics: dict[str, Any]
    files: list[Path] = field(default_factory=list)


def retrain(choice: BestChoice, *, epochs: int | None = None, seeds: Sequence[int] | None = None, tta: bool = False,
            out_dir: Path | None = None, progress: bool = True, echo: Echo = print) -> RetrainOutcome:
    """Train the best config on train+val once per seed, test each model once, write the report to out_dir."""
    import torch
    from tqdm import tqdm

    from hamtune.train import fit, predict_proba, resolve_device

    if epochs is not None and epochs < 1:
        raise HamtuneError(f"--epochs {epochs}: expected a whole number of epochs >= 1")
    seeds = list(seeds) if seeds else [int(choice.config.get("seed", TrainConfig.seed))]
    if len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
        raise HamtuneError(f"--seeds {' '.join(map(str, seeds))}: expected distinct integers >= 0")
    epochs = int(epochs or choice.best_epoch)
    out_dir = out_dir or choice.exp_dir / BEST_DIR

    data = prepare_recorded_data(choice, progress=progress)
    train_val, test = data.arrays("train", "val"), data.arrays("test")
    split = check_no_test_leak(data.table, train_val.index, test.index, data.path)
    echo(f"data: {len(data.table)} images from cache {data.path} (decoded {data.decoded}); train+val "
         f"{split['train_val']['images']} images / {split['train_val']['lesions']} lesions, test "
         f"{split['test']['images']} images / {split['test']['lesions']} lesions (disjoint)")
    source = "--epochs" if epochs != choice.best_epoch else f"the epoch at which trial {choice.trial['trial_id']} peaked"
    echo(f"retrain: {epochs} epochs ({source}), seed{'s' if len(seeds) > 1 else ''} {' '.join(map(str, seeds))}"
         f"{', test-time augmentation' if tta else ''}")

    test_rows = data.table.iloc[test.index]
    lesions = test_rows["lesion_id"].tolist()
    runs = []
    saved = None
    for seed in seeds:
        config = retrain_config(choice, epochs=epochs, seed=seed)
        with tqdm(total=epochs, desc=f"seed {seed}", unit="epoch", disable=not progress, file=sys.stderr,
                  dynamic_ncols=True) as bar:
            def on_epoch(metrics: dict, _make_state) -> None:
                bar.set_postfix(train_loss=f"{metrics['train_loss']:.4f}")
                bar.update(1)

            result = fit(config, train_val, None, on_epoch=on_epoch)
        if result.status != "completed":
            raise HamtuneError(f"retrain of trial {choice.trial['trial_id']} with seed {seed} failed: {result.message} "
                               "(try another --seeds value or fewer --epochs)")
        device = resolve_device(config.device)
        probs = predict_proba(result.model, test.images, test.meta if config.use_meta else None, device=device, tta=tta)
        metrics = evaluation_metrics(test.labels, probs, lesions)
        echo(f"test, seed {seed} ({len(test)} images): {summary_line(metrics)}")
        runs.append({"seed": seed, "history": result.history, "metrics": metrics})
        if saved is None:  # the first seed's model is the one kept, chosen before any test score was seen
            saved = {"seed": seed, "config": config, "model": result.model.to("cpu"), "probs": probs, "metrics": metrics}
        del result
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    metrics = {
        "experiment": choice.record["name"], "trial_id": choice.trial["trial_id"], "selected_by": choice.metric,
        "mode": choice.mode, "n_test": len(test), "model_seed": saved["seed"], **saved["metrics"],
        "seeds": seeds, "tta": tta, "epochs": epochs, "split": split,
        "data": {"fingerprint": data.fingerprint, "cache": str(data.path), "decoded": data.decoded},
    }
    if len(seeds) > 1:
        metrics["per_seed"] = [{"seed": r["seed"], **{k: r["metrics"][k] for k in HEADLINE_METRICS},
                                "balanced_accuracy_ci95": r["metrics"]["balanced_accuracy_ci95"]} for r in runs]
        metrics["across_seeds"] = {k: _mean_std([r["metrics"][k] for r in runs]) for k in HEADLINE_METRICS}
        for k in HEADLINE_METRICS:
            s = metrics["across_seeds"][k]
            echo(f"across seeds {' '.join(map(str, seeds))}: {k} {s['mean']:.4f} ± {s['std']:.4f}")
    metrics["config"] = saved["config"].to_dict()

    files = _write_retrain_report(out_dir, choice, data, train_val, test, saved, runs, metrics)
    echo(f"wrote {out_dir}/: {', '.join(p.name for p in files)}")
    return RetrainOutcome(out_dir=out_dir, metrics=metrics, files=files)


def _write_retrain_report(out_dir: Path, choice: BestChoice, data, train_val, test, saved: dict, runs: list,
                          metrics: dict) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    test_rows = data.table.iloc[test.index]
    predictions = report.predictions_table(test_rows["image_id"], test_rows["lesion_id"], test.labels, saved["probs"])
    table = classification_report_table(test.labels, saved["probs"])
    files = [save_model(out_dir / "model.pt", saved["model"], config=saved["config"].to_dict(),
                        image_size=data.image_size, fingerprint=data.fingerprint,
                        extra={"experiment": choice.record["name"], "trial_id": choice.trial["trial_id"],
                               "seed": saved["seed"], "epochs": metrics["epochs"]})]
    files += report.write_evaluation(out_dir, predictions, metrics, table)
    files.append(report.plot_training_curve(out_dir / "training_curve.png", {r["seed"]: r["history"] for r in runs}))
    # Which rows trained and which tested, from the very index arrays used: the proof that no test image was seen.
    used = np.concatenate([train_val.index, test.index])
    split_rows = data.table.iloc[used][["image_id", "lesion_id", "dx"]].copy()
    split_rows.insert(0, "row", used)
    split_rows["role"] = ["train_val"] * len(train_val) + ["test"] * len(test)
    files.append(write_csv(out_dir / "split.csv", split_rows))

    split = metrics["split"]
    intro = [
        f"Best trial `{choice.trial['trial_id']}` of experiment `{choice.record['name']}` (by {choice.metric}, "
        f"{choice.mode}), retrained on train+val for {metrics['epochs']} epochs and evaluated once on the test split.",
        "",
        f"- train+val: {split['train_val']['images']} images, {split['train_val']['lesions']} lesions; "
        f"test: {split['test']['images']} images, {split['test']['lesions']} lesions; no image and no lesion in both "
        "(checked before training; rows in `split.csv`).",
        f"- seeds: {', '.join(map(str, metrics['seeds']))}; `model.pt`, `predictions.csv` and the per-class figures "
        f"are from seed {metrics['model_seed']}." + (" Test-time augmentation: flips averaged." if metrics["tta"] else ""),
        f"- data: fingerprint `{data.fingerprint}`, cache `{data.path}`.",
    ]
    sections = [("Configuration", report.config_markdown(metrics["config"], list(choice.searched)))]
    if "per_seed" in metrics:
        rows = ["| seed | " + " | ".join(HEADLINE_METRICS) + " |", "|---|" + "---|" * len(HEADLINE_METRICS)]
        rows += [f"| {r['seed']} | " + " | ".join(report.format_value(r[k]) for k in HEADLINE_METRICS) + " |"
                 for r in metrics["per_seed"]]
        sections.insert(0, ("Seeds", "\n".join(rows)))
    names = [p.name for p in files] + ["report.md"]
    files.append(report.write_report_md(
        out_dir / "report.md", title=f"{choice.record['name']}: final model", intro=intro, metrics=metrics,
        classification_report=table, sections=sections,
        pictures=[("Confusion matrix (test)", "confusion_matrix.png"), ("Training loss", "training_curve.png")],
        files=names))
    return files


def _mean_std(values: list[float]) -> dict[str, Any]:
    """Mean and sample standard deviation (ddof=1) over seeds."""
    array = np.asarray(values, dtype=np.float64)
    return {"mean": float(np.mean(array)), "std": float(np.std(array, ddof=1)) if len(array) > 1 else 0.0,
            "ddof": 1, "values": array.tolist()}
