"""After the search: pick the best trial, retrain it on train+val, test it once; evaluate and predict with the result.

The test split exists for exactly one purpose: the single, final estimate of the chosen configuration. The search
never sees it (search.py hands Ray only train and val); the retrain trains on train+val and checks, before a single
step, that no test image and no test lesion is among its training rows. Model selection never looks at test
results: with several seeds every model is tested, all are reported, and the saved model is the first seed's,
whatever its score.

`evaluate` and `predict` decode images with the cache's own decoder (hamtune.data.cache.decode_image, through the
same decode_all that fills the cache), so a model sees at inference exactly the pixels it was trained on.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from hamtune import report
from hamtune import results as res
from hamtune.data.ham10000 import CLASSES, DIAGNOSES, IMAGE_SUFFIXES, NUM_CLASSES
from hamtune.errors import HamtuneError

BEST_DIR = "best"
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
HEADLINE_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc")
ISIC_COLUMNS = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")  # ISIC 2018 Task 3 ground-truth order

Echo = Callable[[str], None]


# ---------------------------------------------------------------------------------------------------------------
# Choosing the best trial


@dataclass
class BestChoice:
    """The best trial of an experiment and the full training config it ran with."""

    exp_dir: Path
    record: dict[str, Any]
    trial: pd.Series
    metric: str
    mode: str
    best_epoch: int
    searched: dict[str, Any]  # the trial's sampled hyperparameters
    config: dict[str, Any]  # {**spec.train, **searched}: a complete TrainConfig dict
    n_trials: int


def choose_best(exp_dir: Path, *, metric: str | None = None, mode: str | None = None) -> BestChoice:
    """The trial with the best value of `metric` (default: the experiment's), among completed and stopped trials."""
    record = res.read_experiment(exp_dir)
    trials, history = res.load_tables(exp_dir)
    metric = metric or record["metric"]
    if f"best_{metric}" not in trials.columns and f"best_val_{metric}" in trials.columns:
        metric = f"val_{metric}"  # "balanced_accuracy" means the validation score: test scores are not in the table
    if f"best_{metric}" not in trials.columns:
        known = sorted(c.removeprefix("best_") for c in trials.columns if c.startswith("best_val_"))
        raise HamtuneError(f"--metric {metric!r}: not in {exp_dir / 'trials.parquet'} (expected one of: {', '.join(known)})")
    if mode is None:
        mode = record["mode"] if metric == record["metric"] else ("min" if metric.endswith("loss") else "max")
    trial = res.best_trial(trials, metric=metric, mode=mode)
    searched = {k.removeprefix("config."): _plain(v) for k, v in trial.items()
                if k.startswith("config.") and not _is_missing(v)}
    config = {**record["spec"].get("train", {}), **searched}
    return BestChoice(exp_dir=exp_dir, record=record, trial=trial, metric=metric, mode=mode,
                      best_epoch=_peak_epoch(trial, history, metric, mode, record), searched=searched, config=config,
                      n_trials=len(trials))


def _peak_epoch(trial: pd.Series, history: pd.DataFrame, metric: str, mode: str, record: dict) -> int:
    """The epoch at which the trial's `metric` peaked (from history; the table's best_epoch as a fallback)."""
    if len(history) and metric in history.columns:
        h = history[(history["trial_id"] == trial["trial_id"]) & history[metric].notna()]
        if len(h):
            return int(h.loc[h[metric].idxmax() if mode == "max" else h[metric].idxmin(), "epoch"])
    if not _is_missing(trial.get("best_epoch")) and metric == record["metric"]:
        return int(trial["best_epoch"])
    return int(trial.get("epochs") or record.get("max_epochs") or 1)


def describe_best(choice: BestChoice) -> str:
    """What `hamtune best` prints: the trial, its validation scores (best and last), its config."""
    t, rec = choice.trial, choice.record
    lines = [
        f"experiment {rec['name']} ({rec.get('state', '?')}): best of {choice.n_trials} trials by "
        f"{choice.metric} ({choice.mode})",
        f"trial {t['trial_id']}: {t['status']}, {int(t['epochs'])} epochs, {choice.metric} peaked at epoch "
        f"{choice.best_epoch}",
    ]
    shown = [choice.metric] + [m for m in ("val_balanced_accuracy", "val_accuracy", "val_macro_f1", "val_macro_auc",
                                           "val_loss") if m != choice.metric]
    width = max(len(m) for m in shown)
    for m in shown:
        if f"best_{m}" in t.index and not _is_missing(t[f"best_{m}"]):
            lines.append(f"  {m:<{width}}  best {t[f'best_{m}']:.4f}   last {t.get(f'last_{m}', math.nan):.4f}")
    if not _is_missing(t.get("best_checkpoint")):
        lines.append(f"  checkpoint (best epoch of the search): {t['best_checkpoint']}")
    lines.append("searched hyperparameters:")
    width = max([len(k) for k in choice.searched] or [0])
    lines += [f"  {k:<{width}}  {_short(v)}" for k, v in sorted(choice.searched.items())]
    fixed = {k: v for k, v in choice.config.items() if k not in choice.searched}
    if fixed:
        lines.append("fixed settings: " + ", ".join(f"{k}={_short(v)}" for k, v in sorted(fixed.items())))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Metrics of a set of predictions


def bootstrap_balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray, groups: Sequence | None = None, *,
                                resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                                num_classes: int = NUM_CLASSES) -> tuple[float, float]:
    """95% percentile-bootstrap interval of balanced accuracy (mean recall over classes present in the resample).

    With `groups` (lesion ids) whole lesions are resampled with replacement, because images of one lesion are
    near-duplicates and resampling them independently would make the interval too narrow; without, images are.
    A resample is a count per group (multinomial), so each resample costs two matrix products, not a Python loop.
    """
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    if len(y_true) == 0:
        return math.nan, math.nan
    codes = np.arange(len(y_true)) if groups is None else pd.factorize(pd.Series(list(groups)))[0]
    n_groups = int(codes.max()) + 1
    onehot = np.eye(num_classes)[y_true]
    hits = onehot * (y_true == y_pred)[:, None]
    rng = np.random.default_rng(seed)
    scores = []
    for start in range(0, resamples, 100):
        counts = rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=min(100, resamples - start))
        weights = counts[:, codes].astype(np.float64)  # (B, N): how often each image is drawn
        with np.errstate(invalid="ignore", divide="ignore"):
            recall = (weights @ hits) / (weights @ onehot)  # nan for classes absent from the resample
        scores.append(np.nanmean(recall, axis=1))
    lo, hi = np.percentile(np.concatenate(scores), [2.5, 97.5])
    return float(lo), float(hi)


def evaluation_metrics(y_true: np.ndarray, probs: np.ndarray, groups: Sequence | None = None) -> dict[str, Any]:
    """Headline metrics, per-class table, confusion matrix and the bootstrap CI of balanced accuracy."""
    from hamtune.metrics import classification_metrics

    scores = classification_metrics(y_true, probs)
    lo, hi = bootstrap_balanced_accuracy(y_true, probs.argmax(axis=1), groups)
    out: dict[str, Any] = {k: scores[k] for k in HEADLINE_METRICS}
    out["balanced_accuracy_ci95"] = [lo, hi]
    out["bootstrap"] = {"resamples": BOOTSTRAP_RESAMPLES, "seed": BOOTSTRAP_SEED, "method": "percentile",
                        "unit": "image" if groups is None else "lesion"}
    out["per_class"] = {c: {"precision": scores[f"precision_{c}"], "recall": scores[f"recall_{c}"],
                            "f1": scores[f"f1_{c}"], "support": int(scores[f"support_{c}"])} for c in CLASSES}
    out["confusion_matrix"] = scores["confusion_matrix"]
    return out


def classification_report_table(y_true: np.ndarray, probs: np.ndarray) -> pd.DataFrame:
    from hamtune.metrics import per_class_table

    return per_class_table(y_true, probs.argmax(axis=1))


def summary_line(metrics: dict[str, Any]) -> str:
    lo, hi = metrics["balanced_accuracy_ci95"]
    return (f"accuracy {metrics['accuracy']:.4f}, balanced accuracy {metrics['balanced_accuracy']:.4f} "
            f"(95% CI {lo:.4f}-{hi:.4f}), macro F1 {metrics['macro_f1']:.4f}, macro AUC {metrics['macro_auc']:.4f}")


# ---------------------------------------------------------------------------------------------------------------
# Retrain on train+val, test once


def prepare_recorded_data(choice: BestChoice, *, progress: bool = True):
    """The experiment's data, prepared with its recorded settings (a cache hit), refused if it has changed since."""
    from hamtune.data import SplitSpec, prepare
    from hamtune.space import spec_from_dict

    record_path = choice.exp_dir / res.EXPERIMENT_FILE
    spec = spec_from_dict(choice.record["spec"], source=str(record_path))
    d = spec.data
    recorded_cache = choice.record.get("data", {}).get("cache")
    cache_dir = Path(d.cache_dir) if d.cache_dir else (Path(recorded_cache).parent if recorded_cache else None)
    data = prepare(d.source, d.image_size, cache_dir=cache_dir, split=SplitSpec(val=d.val, test=d.test, seed=d.split_seed),
                   strict=d.strict, progress=progress, synthetic_size=d.synthetic_size, synthetic_seed=d.synthetic_seed)
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
    from hamtune.train import TrainConfig

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

    from hamtune.train import TrainConfig, fit, predict_proba, resolve_device

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
    from hamtune.modelfile import save_model

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
    files.append(report.write_csv(out_dir / "split.csv", split_rows))

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


# ---------------------------------------------------------------------------------------------------------------
# Images on disk -> arrays the model takes


def find_images(inputs: Sequence[Path]) -> list[Path]:
    """Image files named directly, or found recursively (.jpg/.jpeg/.png in any case) under folders; sorted."""
    found: list[Path] = []
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            inside = sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                            and not any(part.startswith(".") for part in p.relative_to(item).parts))
            if not inside:
                raise HamtuneError(f"{item}: folder holds no .jpg/.jpeg/.png image files (searched all subfolders)")
            found += inside
        elif item.is_file():
            found.append(item)
        else:
            raise HamtuneError(f"{item}: no such image file or folder")
    return found


def decode_paths(paths: Sequence[Path], size: int, workdir: Path, progress: bool = False) -> tuple[np.ndarray, list]:
    """Decode with the cache's decode_all/decode_image into workdir; (uint8 images of the readable files, failures).

    failures: (position in `paths`, reason). The images are memory-mapped from workdir, so keep it until done.
    """
    from hamtune.data.cache import decode_all

    workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    npy = workdir / "decoded.npy"
    failures = decode_all([str(p) for p in paths], size, npy, workers, progress)
    images = np.load(npy, mmap_mode="r")
    if failures:
        keep = np.setdiff1d(np.arange(len(paths)), [row for row, _ in failures])
        images = images[keep]
    return images, failures


def unknown_meta(n: int) -> np.ndarray:
    """Metadata features when none are known: age missing, sex and site 'unknown'."""
    from hamtune.data import encode_meta

    return encode_meta(pd.DataFrame({"age": [np.nan] * n, "sex": ["unknown"] * n, "localization": ["unknown"] * n}))


# ---------------------------------------------------------------------------------------------------------------
# evaluate: a saved model on an external labelled set


def read_labels(path: Path) -> tuple[pd.DataFrame, str]:
    """Labels from a HAM10000 metadata CSV or an ISIC 2018 Task 3 ground-truth CSV.

    Returns (table with image_id, lesion_id (None when unknown), label, dx, age, sex, localization; form name).
    """
    path = Path(path)
    expected = ("expected HAM10000 metadata columns image_id, dx (optionally lesion_id, age, sex, localization) or "
                f"ISIC 2018 Task 3 ground-truth columns image, {', '.join(ISIC_COLUMNS)}")
    if not path.is_file():
        raise HamtuneError(f"{path}: labels file not found; {expected}")
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise HamtuneError(f"{path}: cannot be read as CSV ({first}); {expected}") from None
    raw.columns = [str(c).strip() for c in raw.columns]
    line = np.arange(len(raw)) + 2  # file line of each row; line 1 is the header
    if {"image_id", "dx"} <= set(raw.columns):
        form = "HAM10000 metadata"
        table = pd.DataFrame({"image_id": raw["image_id"].str.strip(), "dx": raw["dx"].str.strip().str.lower()})
        unknown = ~table["dx"].isin(CLASSES)
        if unknown.any():
            i = int(np.argmax(unknown.to_numpy()))
            raise HamtuneError(f"{path}: line {line[i]}: dx {raw['dx'].iloc[i]!r} is not a HAM10000 diagnosis code; "
                               f"expected one of {', '.join(CLASSES)}")
        if "lesion_id" in raw.columns:
            lesion = raw["lesion_id"].str.strip()
            table["lesion_id"] = lesion.mask(lesion == "", None)
        else:
            table["lesion_id"] = None
        for column in ("age", "sex", "localization"):
            table[column] = raw[column] if column in raw.columns else ("" if column != "age" else np.nan)
    elif "image" in raw.columns and set(ISIC_COLUMNS) <= set(raw.columns):
        form = "ISIC 2018 Task 3 ground truth"
        try:
            onehot = raw[list(ISIC_COLUMNS)].apply(lambda c: c.str.strip().astype(float)).to_numpy()
        except ValueError as exc:
            raise HamtuneError(f"{path}: class columns {', '.join(ISIC_COLUMNS)} must hold numbers 0/1 ({exc})") from None
        valid = np.isin(onehot, (0.0, 1.0)).all(axis=1) & (onehot.sum(axis=1) == 1)
        if not valid.all():
            i = int(np.argmin(valid))
            raise HamtuneError(f"{path}: line {line[i]}: expected exactly one 1.0 among {', '.join(ISIC_COLUMNS)}, "
                               f"got {onehot[i].tolist()}")
        codes = [c.lower() for c in ISIC_COLUMNS]
        table = pd.DataFrame({"image_id": raw["image"].str.strip(), "dx": [codes[j] for j in onehot.argmax(axis=1)]})
        table["lesion_id"] = None
        table["age"], table["sex"], table["localization"] = np.nan, "", ""
    else:
        raise HamtuneError(f"{path}: unknown label format (columns: {', '.join(raw.columns) or 'none'}); {expected}")
    if table.empty:
        raise HamtuneError(f"{path}: has a header but no rows; expected one row per labelled image")
    empty = table["image_id"] == ""
    if empty.any():
        raise HamtuneError(f"{path}: line {line[int(np.argmax(empty.to_numpy()))]}: empty image id")
    duplicated = table["image_id"].duplicated()
    if duplicated.any():
        i = int(np.argmax(duplicated.to_numpy()))
        raise HamtuneError(f"{path}: line {line[i]}: image {table['image_id'].iloc[i]} is labelled twice; "
                           "expected each image once")
    table["label"] = table["dx"].map({c: i for i, c in enumerate(CLASSES)}).astype(np.int64)
    return table, form


@dataclass
class EvaluationOutcome:
    out_dir: Path
    metrics: dict[str, Any]
    files: list[Path]


def evaluate_external(model_path: Path, images_dir: Path, labels_path: Path, *, out_dir: Path | None = None,
                      tta: bool = False, echo: Echo = print) -> EvaluationOutcome:
    """Score a saved model on a labelled image folder; write the same metrics and pictures as the retrain."""
    from hamtune.data import encode_meta
    from hamtune.modelfile import load_model
    from hamtune.train import predict_proba, resolve_device

    device = resolve_device("auto")
    loaded = load_model(model_path, device=device)
    labels, form = read_labels(labels_path)
    if not Path(images_dir).is_dir():
        raise HamtuneError(f"{images_dir}: images folder not found")
    out_dir = out_dir or Path(model_path).parent / f"eval-{Path(images_dir).resolve().name}"

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
    listed = [report.write_csv(out_dir / "unlabelled_images.csv",
                               pd.DataFrame({"image_id": unlabelled, "path": [str(files[i]) for i in unlabelled]})),
              report.write_csv(out_dir / "missing_images.csv", pd.DataFrame({"image_id": missing}))]
    echo(f"{len(unlabelled)} image(s) without a label (listed in {listed[0]})")
    echo(f"{len(missing)} label(s) without an image (listed in {listed[1]})")

    rows = labels[labels["image_id"].isin(files.keys())].reset_index(drop=True)
    if rows.empty:
        raise HamtuneError(f"{images_dir}: none of the {len(labels)} images labelled in {labels_path} is there; "
                           "expected image files named <image id>.jpg/.jpeg/.png")
    with tempfile.TemporaryDirectory(prefix="hamtune-eval-") as workdir:
        images, failures = decode_paths([files[i] for i in rows["image_id"]], loaded.image_size, Path(workdir))
        unreadable = rows.iloc[[i for i, _ in failures]].assign(reason=[r for _, r in failures])
        rows = rows.drop(index=[i for i, _ in failures]).reset_index(drop=True)
        listed.append(report.write_csv(out_dir / "unreadable_images.csv", unreadable[["image_id", "reason"]]))
        echo(f"{len(unreadable)} unreadable image(s) skipped (listed in {listed[2]})")
        if rows.empty:
            raise HamtuneError(f"{images_dir}: none of the labelled images could be decoded (see {listed[2]})")
        meta = encode_meta(rows) if loaded.use_meta else None
        probs = predict_proba(loaded.model, images, meta, device=device, tta=tta)

    has_lesions = rows["lesion_id"].notna().all()
    y_true = rows["label"].to_numpy()
    metrics = {
        "model": str(model_path), "images": str(images_dir), "labels": str(labels_path), "label_format": form,
        "n_test": len(rows), "tta": tta, **evaluation_metrics(y_true, probs, rows["lesion_id"] if has_lesions else None),
        "unlabelled_images": len(unlabelled), "missing_images": len(missing), "unreadable_images": len(unreadable),
        "duplicate_files_ignored": duplicates, "image_size": loaded.image_size,
        "metadata": ("from the labels file" if form.startswith("HAM") else "unknown (all 'unknown')") if loaded.use_meta
        else "not used by the model",
    }
    predictions = report.predictions_table(rows["image_id"], rows["lesion_id"] if has_lesions else None, y_true, probs)
    table = classification_report_table(y_true, probs)
    written = report.write_evaluation(out_dir, predictions, metrics, table) + listed
    intro = [
        f"Model `{model_path}` ({loaded.info.get('model')}, {loaded.image_size}px, trained on data "
        f"`{loaded.fingerprint}`) on {len(rows)} labelled images from `{images_dir}` (labels: `{labels_path}`, {form} form).",
        "",
        f"- {len(unlabelled)} image(s) without a label, {len(missing)} label(s) without an image, {len(unreadable)} "
        "unreadable image(s): listed in `unlabelled_images.csv`, `missing_images.csv`, `unreadable_images.csv`.",
        f"- images decoded as for training: short side to {loaded.image_size}px, centre square "
        "(hamtune.data.cache.decode_image)" + ("; test-time augmentation: flips averaged." if tta else "."),
    ]
    written.append(report.write_report_md(
        out_dir / "report.md", title=f"Evaluation on {Path(images_dir).name}", intro=intro, metrics=metrics,
        classification_report=table, pictures=[("Confusion matrix", "confusion_matrix.png")],
        files=[p.name for p in written] + ["report.md"]))
    echo(f"evaluated {len(rows)} images: {summary_line(metrics)}")
    echo(f"report: {out_dir / 'report.md'}")
    return EvaluationOutcome(out_dir=out_dir, metrics=metrics, files=written)


# ---------------------------------------------------------------------------------------------------------------
# predict: class probabilities for unlabelled images


def predict(model_path: Path, inputs: Sequence[Path], *, tta: bool = False, echo: Echo = print) -> pd.DataFrame:
    """One row per readable image: path, top class code, its diagnosis name and probability, all probabilities."""
    from hamtune.modelfile import load_model
    from hamtune.train import predict_proba, resolve_device

    device = resolve_device("auto")
    loaded = load_model(model_path, device=device)
    paths = find_images(inputs)
    with tempfile.TemporaryDirectory(prefix="hamtune-predict-") as workdir:
        images, failures = decode_paths(paths, loaded.image_size, Path(workdir))
        for i, reason in failures:
            echo(f"skipped {paths[i]}: unreadable image ({reason})")
        if len(failures) == len(paths):
            raise HamtuneError(f"{paths[0]}: no readable image among the {len(paths)} given ({failures[0][1]})")
        meta = unknown_meta(len(images)) if loaded.use_meta else None
        probs = predict_proba(loaded.model, images, meta, device=device, tta=tta)
    bad = {i for i, _ in failures}
    kept = [p for i, p in enumerate(paths) if i not in bad]
    top = probs.argmax(axis=1)
    table = pd.DataFrame({
        "path": [str(p) for p in kept], "image_id": [p.stem for p in kept],
        "predicted_dx": [CLASSES[i] for i in top], "diagnosis": [DIAGNOSES[CLASSES[i]] for i in top],
        "probability": probs[np.arange(len(top)), top],
    })
    for i, name in enumerate(CLASSES):
        table[f"{report.PROB_PREFIX}{name}"] = probs[:, i]
    return table


# ---------------------------------------------------------------------------------------------------------------
# The three commands (argument handling only; the work is above)


def cmd_best(args) -> int:
    if not args.retrain and (args.epochs is not None or args.seeds or args.tta):
        raise HamtuneError("--epochs, --seeds and --tta apply to the retrain: add --retrain")
    exp_dir = res.experiment_dir(args.name, args.results_dir)
    choice = choose_best(exp_dir, metric=args.metric, mode=args.mode)
    print(describe_best(choice), flush=True)
    if args.retrain:
        print(flush=True)
        retrain(choice, epochs=args.epochs, seeds=args.seeds, tta=args.tta,
                echo=lambda line: print(line, flush=True))
    return 0


def cmd_evaluate(args) -> int:
    evaluate_external(args.model, args.images, args.labels, out_dir=args.out, tta=args.tta,
                      echo=lambda line: print(line, flush=True))
    return 0


def cmd_predict(args) -> int:
    out = args.out
    if out is not None and out.suffix.lower() not in (".csv", ".json"):
        raise HamtuneError(f"--out {out}: expected a file name ending in .csv or .json")
    table = predict(args.model, args.inputs, tta=args.tta, echo=lambda line: print(line, file=sys.stderr))
    if out is None:
        shown = table.drop(columns=["path"])
        floats = [c for c in shown.columns if c == "probability" or c.startswith(report.PROB_PREFIX)]
        print(shown.to_string(index=False, formatters={c: "{:.4f}".format for c in floats}))
    elif out.suffix.lower() == ".csv":
        report.write_csv(out, table)
        print(f"wrote {len(table)} predictions to {out}")
    else:
        report.write_json(out, table.to_dict(orient="records"))
        print(f"wrote {len(table)} predictions to {out}")
    return 0


# ---------------------------------------------------------------------------------------------------------------


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, (float, np.floating)) and math.isnan(value))


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
