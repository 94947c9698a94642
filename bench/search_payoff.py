"""Search payoff on real HAM10000: TPE+ASHA, random+ASHA, TPE+FIFO and random+FIFO, same space, many seeds.

How the curves are obtained (two stages, both real):

1. record: every configuration of a finite grid is trained with hamtune.train.fit (resnet10t, 32 px, the fixed,
   lesion-grouped subsample below, one torch thread), once per training seed in RECORDINGS (two recordings of the
   whole grid: the second is what tells a better configuration from a lucky run), and its per-epoch validation
   metrics are kept in an on-disk memo (bench/out/payoff/curves/, one JSON per configuration and seed; an
   interrupted recording resumes). The replay stage gathers them into bench/search_payoff_curves.json, which is
   committed, so the replay (and anyone's re-analysis) runs without recording again.
2. replay: the real Ray Tune searchers and schedulers, built by hamtune.search.make_searcher / make_scheduler from a
   hamtune spec (so OptunaSearch is hamtune's PruningAwareOptunaSearch), run over a replay trainable. The searcher
   samples the product's own continuous space (lr log-uniform, augment_strength uniform, imbalance a choice); the
   trainable snaps lr and augment_strength to the grid cell they fall in (bins of equal width on the sampled scale)
   and reports that cell's recorded curve epoch by epoch, sleeping a fixed fraction of each recorded epoch time so
   concurrent trials interleave as they would for real. ASHA stops a replayed trial exactly where it would stop the
   real one: the curve up to that epoch is the same run.

The x axis everywhere is trial-epochs (one epoch of one trial), counted in the order Tune received the reports.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np

import common

DATA = common.ROOT.parent / "shared" / "data" / "ham10000-200x150"
IMAGE_SIZE = 32
MAX_EPOCHS = 8
TRAIN_IMAGES = 1500  # lesion-grouped subsample of the train split (the val split is used whole)
SUBSAMPLE_SEED = 0
METRIC = "val_balanced_accuracy"
TOLERANCE = 0.01
LOOSE_TOLERANCE = 0.02  # about the seed-to-seed spread of one configuration's best: the cells a search must tell apart
RECORDINGS = [0, 1]  # training seeds: the whole grid is recorded once per seed
# The product's space (search_spaces/default.yaml minus weight_decay, fixed here) and the grid it is snapped to.
# lr cells are a third of a decade wide; the full grid has 6 over 3e-4..3e-2, recorded middle cells first, and a
# replay may use the inner 4 (6.5e-4..1.4e-2) when the machine did not afford all of them (--lr-cells).
LR_FULL_RANGE = (3.0e-4, 3.0e-2)
LR_FULL_CELLS = 6
LR_CELLS = 6  # set by --lr-cells
AUGMENT_CELLS = 2  # [0, 0.5) and [0.5, 1]
IMBALANCE = ["none", "weighted_loss", "oversample", "focal"]
FIXED_TRAIN = {"model": "resnet10t", "pretrained": False, "head_hidden": 128, "head_dropout": 0.2,
               "epochs": MAX_EPOCHS, "batch_size": 64, "optimizer": "adamw", "warmup_epochs": 1,
               "weight_decay": 1e-4, "seed": 0, "device": "cpu", "num_threads": 1}
OUT = common.OUT / "payoff"
HEADING = "## Search payoff on real HAM10000: TPE+ASHA vs random+FIFO (and the two in between)"
CURVES = OUT / "curves"
CURVE_ARCHIVE = common.ROOT / "bench" / "search_payoff_curves.json"
KEEP = ("epoch", "train_loss", "val_loss", "val_accuracy", METRIC, "val_macro_f1", "epoch_time_s")


# ---------------------------------------------------------------------------------------------------------------
# The grid


def lr_range() -> tuple[float, float]:
    """The searched lr range: the full range, less (6 - LR_CELLS) / 2 outer cells at each end."""
    lo, hi = (math.log10(x) for x in LR_FULL_RANGE)
    drop = (LR_FULL_CELLS - LR_CELLS) / 2 * (hi - lo) / LR_FULL_CELLS
    return 10 ** (lo + drop), 10 ** (hi - drop)


def lr_grid() -> list[float]:
    lo, hi = (math.log10(x) for x in LR_FULL_RANGE)
    width = (hi - lo) / LR_FULL_CELLS
    full = [float(f"{10 ** (lo + width * (k + 0.5)):.3g}") for k in range(LR_FULL_CELLS)]
    drop = (LR_FULL_CELLS - LR_CELLS) // 2
    return full[drop:LR_FULL_CELLS - drop]


def augment_grid() -> list[float]:
    return [round((k + 0.5) / AUGMENT_CELLS, 3) for k in range(AUGMENT_CELLS)]


def snap(config: dict) -> dict:
    """The grid cell a sampled config falls in: lr by log-scale bin, augment_strength by linear bin."""
    lo, hi = (math.log10(x) for x in lr_range())
    k = min(LR_CELLS - 1, max(0, int((math.log10(config["lr"]) - lo) / (hi - lo) * LR_CELLS)))
    a = min(AUGMENT_CELLS - 1, max(0, int(config["augment_strength"] * AUGMENT_CELLS)))
    return {"lr": lr_grid()[k], "augment_strength": augment_grid()[a], "imbalance": config["imbalance"]}


def grid_configs() -> list[dict]:
    """Every cell, middle learning rates first, so a recording cut short still covers the interesting part."""
    lrs = lr_grid()
    order = sorted(range(len(lrs)), key=lambda k: abs(k - (len(lrs) - 1) / 2))
    return [{"lr": lrs[k], "augment_strength": a, "imbalance": imb}
            for k in order for a in augment_grid() for imb in IMBALANCE]


def fixed_train(seed: int) -> dict:
    return {**FIXED_TRAIN, "seed": seed}


def curve_path(config: dict, data_key: str, seed: int = 0) -> Path:
    blob = json.dumps({"data": data_key, "fixed": fixed_train(seed), **config}, sort_keys=True)
    name = f"lr{config['lr']:g}-aug{config['augment_strength']:g}-{config['imbalance']}"
    return CURVES / f"{name}-{hashlib.sha1(blob.encode()).hexdigest()[:8]}.json"


# ---------------------------------------------------------------------------------------------------------------
# Stage 1: record


def load_data():
    """Train subsample + the whole val split, from hamtune's own lesion-grouped split of the real set."""
    from hamtune.data import SplitSpec, prepare
    from hamtune.data.arrays import SplitArrays

    prepared = prepare(DATA, IMAGE_SIZE, cache_dir=common.out_dir("cache"), split=SplitSpec(0.15, 0.15, 0),
                       strict=True, workers=1, progress=False)
    table = prepared.table
    train_rows = np.flatnonzero(table["split"].to_numpy() == "train")
    lesions = table.iloc[train_rows].groupby("lesion_id")["dx"].first()
    fraction = TRAIN_IMAGES / len(train_rows)
    rng = np.random.default_rng(SUBSAMPLE_SEED)
    chosen = []
    for dx in sorted(lesions.unique()):  # the same fraction of lesions from every class: natural class balance
        ids = np.sort(lesions.index[lesions == dx].to_numpy())
        chosen.extend(rng.choice(ids, max(1, round(fraction * len(ids))), replace=False))
    keep = np.sort(train_rows[table.iloc[train_rows]["lesion_id"].isin(set(chosen)).to_numpy()])
    train_all = prepared.arrays("train")
    pos = np.searchsorted(train_all.index, keep)
    train = SplitArrays(np.ascontiguousarray(train_all.images[pos]), train_all.labels[pos], train_all.meta[pos],
                        train_all.index[pos])
    val = prepared.arrays("val")
    counts = table.iloc[keep]["dx"].value_counts().sort_index().to_dict()
    info = {"source": "../shared/data/ham10000-200x150 (all 10,015 HAM10000 images at 200x150)",
            "image_size": IMAGE_SIZE, "fingerprint": prepared.fingerprint,
            "split": "hamtune's lesion-grouped, class-stratified split, val 0.15 / test 0.15, seed 0 (test unused)",
            "train_images": len(train), "train_lesions": len(chosen), "train_per_class": counts,
            "val_images": len(val), "val_per_class": table.loc[table["split"] == "val", "dx"].value_counts()
            .sort_index().to_dict(),
            "subsample": f"{fraction:.1%} of the train split's lesions per class, seed {SUBSAMPLE_SEED}"}
    return train, val, info


def record(max_configs: int | None = None, deadline: float | None = None, shard: tuple[int, int] = (0, 1),
           seed: int = 0) -> dict:
    """Record the grid's curves (training seed `seed`) not on disk yet; shard (k, n) takes every n-th cell from the
    k-th, so n processes of one thread each can share the recording (each curve is one file, written atomically)."""
    import torch

    from hamtune.io import atomic_write_json
    from hamtune.training.config import TrainConfig
    from hamtune.training.loop import fit

    torch.set_num_threads(1)
    train, val, info = load_data()
    CURVES.mkdir(parents=True, exist_ok=True)
    atomic_write_json(OUT / "data.json", info)
    k, n = shard
    todo = [c for i, c in enumerate(grid_configs())
            if i % n == k and not curve_path(c, info["fingerprint"], seed).is_file()]
    print(f"record: {len(todo)} curves (training seed {seed}) to record in shard {k}/{n} of a "
          f"{len(grid_configs())}-cell grid; "
          f"{info['train_images']} train / {info['val_images']} val images", flush=True)
    for i, config in enumerate(todo[:max_configs]):
        if deadline is not None and time.time() > deadline:
            print("record: deadline reached, stopping", flush=True)
            break
        started = time.perf_counter()
        result = fit(TrainConfig.from_dict({**fixed_train(seed), **config}), train, val)
        history = [{k: float(h[k]) for k in KEEP if k in h} for h in result.history]
        atomic_write_json(curve_path(config, info["fingerprint"], seed), {
            "config": config, "fixed": fixed_train(seed), "data": info["fingerprint"], "status": result.status,
            "message": result.message, "history": history, "wall_s": time.perf_counter() - started})
        best = max((h[METRIC] for h in history), default=float("nan"))
        print(f"record {i + 1}/{len(todo)} {config}: {result.status}, best {best:.3f}, "
              f"{time.perf_counter() - started:.0f} s", flush=True)
    return info


def load_curves(data_key: str, seed: int = 0) -> dict[tuple, dict]:
    """The recorded curves of one training seed: from bench/out/payoff/curves/, else from the committed archive."""
    curves = {}
    for config in grid_configs():
        path = curve_path(config, data_key, seed)
        if path.is_file():
            curves[(config["lr"], config["augment_strength"], config["imbalance"])] = json.loads(path.read_text())
    if len(curves) < len(grid_configs()) and CURVE_ARCHIVE.is_file():
        archive = json.loads(CURVE_ARCHIVE.read_text())
        if archive["data"]["fingerprint"] == data_key and archive["fixed"] == FIXED_TRAIN:
            for key, c in archive["recordings"].get(str(seed), {}).items():
                lr, aug, imb = key.split("|")
                config = {"lr": float(lr), "augment_strength": float(aug), "imbalance": imb}
                history = [dict(zip(c["history"], row)) for row in zip(*c["history"].values())]
                curves.setdefault((config["lr"], config["augment_strength"], imb), {
                    "config": config, "fixed": fixed_train(seed), "data": data_key, "status": c["status"],
                    "message": c.get("message", ""), "history": history, "wall_s": c["wall_s"]})
    return curves


def data_info() -> dict:
    """What was recorded on: bench/out/payoff/data.json, else the archive's copy."""
    if (OUT / "data.json").is_file():
        return json.loads((OUT / "data.json").read_text())
    if CURVE_ARCHIVE.is_file():
        return json.loads(CURVE_ARCHIVE.read_text())["data"]
    raise SystemExit("search_payoff: nothing recorded yet (no bench/out/payoff/data.json, no "
                     f"{CURVE_ARCHIVE.relative_to(common.ROOT)}); run --stage record first")


def archive_curves(info: dict, recordings: dict[int, dict[str, dict]]) -> None:
    """Every recorded curve in one committed file (columns per cell, 5 significant digits): about 100 KB."""
    from hamtune.io import atomic_write_json

    def cell(c: dict) -> dict:
        cols = {k: [float(f"{h[k]:.5g}") for h in c["history"]] for k in KEEP if c["history"] and k in c["history"][0]}
        return {"status": c["status"], "message": c.get("message", ""), "wall_s": round(c["wall_s"], 1),
                "history": cols}

    atomic_write_json(CURVE_ARCHIVE, {
        "about": "bench/search_payoff.py's recorded curves: every grid cell trained for real once per training "
                 "seed; hamtune's fit on real HAM10000 (see data). Derived from HAM10000, CC BY-NC-SA 4.0.",
        "data": info, "fixed": FIXED_TRAIN, "metric": METRIC,
        "recordings": {str(seed): {k: cell(c) for k, c in curves.items()} for seed, curves in recordings.items()}})


# ---------------------------------------------------------------------------------------------------------------
# Stage 2: replay through the real Tune searchers and schedulers

TRIALS = 16  # the real-data recipe's budget (search_spaces/ham10000-scratch.yaml)
DEFAULT_TRIALS = 10  # search_spaces/default.yaml's
SEEDS = list(range(20))
MAX_CONCURRENT = 2  # as both specs
TIME_SCALE = 0.003  # a replayed epoch sleeps this fraction of its recorded time, so concurrent trials interleave
# The settings every method shares unless a variant changes one: the scratch recipe's as this study found them
# (Optuna 5's TPE defaults: multivariate, constant liar), with the product's defaults for the start-up design
# (every choice covered, continuous keys quasi-random) and for timing-free decisions (waves, OrderedASHA).
BASE = {"grace_period": 2, "reduction_factor": 3, "startup_trials": 5, "multivariate": True, "constant_liar": True,
        "cover_choices": True, "deterministic": True}
METHODS = {
    "TPE+ASHA": {"searcher": "optuna", "scheduler": "asha"},
    "random+ASHA": {"searcher": "random", "scheduler": "asha"},
    "TPE+FIFO": {"searcher": "optuna", "scheduler": "fifo"},
    "random+FIFO": {"searcher": "random", "scheduler": "fifo"},
}
# TPE+ASHA variants, each one change from BASE.
VARIANTS = {
    "random start-up": {"cover_choices": False},
    "start-up 4": {"startup_trials": 4}, "start-up 8": {"startup_trials": 8},
    "grace 1": {"grace_period": 1}, "grace 3": {"grace_period": 3},
    "reduction 2": {"reduction_factor": 2}, "reduction 4": {"reduction_factor": 4},
    "grace 1, reduction 4": {"grace_period": 1, "reduction_factor": 4},
    "independent TPE": {"multivariate": False}, "no constant liar": {"constant_liar": False},
    "timing-dependent (Tune's ASHA, no waves)": {"deterministic": False},
    "independent TPE, grace 1, reduction 4": {"multivariate": False, "grace_period": 1, "reduction_factor": 4},
}
# search_spaces/default.yaml's size (10 trials of 8 epochs): what ASHA spends and finds with each candidate.
SIZING = {"grace 2, reduction 3": {"grace_period": 2, "reduction_factor": 3},
          "grace 2, reduction 2": {"grace_period": 2, "reduction_factor": 2},
          "grace 1, reduction 3": {"grace_period": 1, "reduction_factor": 3},
          "start-up 4, grace 2, reduction 3": {"startup_trials": 4, "grace_period": 2, "reduction_factor": 3},
          "independent TPE, grace 2, reduction 3": {"multivariate": False, "grace_period": 2, "reduction_factor": 3},
          "independent TPE, grace 1, reduction 4": {"multivariate": False, "grace_period": 1, "reduction_factor": 4}}


def cell_key(config: dict) -> str:
    c = snap(config)
    return f"{c['lr']:g}|{c['augment_strength']:g}|{c['imbalance']}"


def replay_trial(config: dict, *, curves: dict, scale: float) -> None:
    """Report the recorded curve of the grid cell this config falls in, one epoch at a time."""
    from ray import tune

    recorded = curves[cell_key(config)]
    for h in recorded["history"]:
        time.sleep(h.get("epoch_time_s", 0.0) * scale)
        tune.report({**h, "trial_status": "ok", "cell": cell_key(config)})
    if recorded["status"] == "non_finite":
        tune.report({METRIC: math.nan, "val_loss": math.nan, "epoch": float(len(recorded["history"]) + 1),
                     "trial_status": "non_finite"})


def make_spec(method: str, seed: int, settings: dict):
    """A hamtune spec for one replayed search; settings may also change num_samples (the default's sizing)."""
    from hamtune.search.spec import spec_from_dict

    raw = {
        "experiment": f"payoff-{method.replace('+', '-')}-seed{seed}",
        "data": {"image_size": IMAGE_SIZE},  # unused: the replay trainable holds the recorded curves
        "train": {k: v for k, v in FIXED_TRAIN.items() if k != "num_threads"},
        "search": {"num_samples": settings.get("num_samples", TRIALS), "metric": METRIC, "mode": "max",
                   "max_concurrent": MAX_CONCURRENT,
                   "seed": seed, **METHODS[method], **settings},
        "space": {"lr": {"loguniform": list(lr_range())}, "augment_strength": {"uniform": [0.0, 1.0]},
                  "imbalance": {"choice": list(IMBALANCE)}},
    }
    return spec_from_dict(raw, source="bench/search_payoff.py")


def replay(method: str, seed: int, settings: dict, curves: dict, scratch: Path) -> dict:
    """One search over one recording; returns every report in the order Tune received it, and the winner: the
    cell of the best report (what `hamtune best --retrain` would retrain)."""
    import shutil

    from ray import tune

    from hamtune.search.searcher import make_scheduler, make_searcher

    spec = make_spec(method, seed, settings)
    order: list[dict] = []
    if __name__ != "__main__":  # imported (tests, a notebook): Ray's workers cannot import bench/, ship it by value
        from ray import cloudpickle

        cloudpickle.register_pickle_by_value(sys.modules[__name__])

    class ReportOrder(tune.Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            order.append({"trial": trial.trial_id, "epoch": int(result["epoch"]), "value": float(result[METRIC]),
                          "epoch_time_s": float(result.get("epoch_time_s", 0.0)), "cell": result.get("cell")})

    s = spec.search
    trainable = tune.with_resources(tune.with_parameters(replay_trial, curves=curves, scale=TIME_SCALE), {"cpu": 1})
    tuner = tune.Tuner(
        trainable, param_space=spec.tune_space(),
        tune_config=tune.TuneConfig(
            search_alg=make_searcher(spec), scheduler=make_scheduler(spec), num_samples=s.num_samples,
            max_concurrent_trials=s.max_concurrent, reuse_actors=True,
            **({} if s.searcher == "optuna" or s.scheduler == "asha" else {"metric": s.metric, "mode": s.mode})),
        run_config=tune.RunConfig(name=spec.experiment, storage_path=str(scratch), verbose=0,
                                  callbacks=[ReportOrder()]))
    started = time.monotonic()
    tuner.fit()
    wall = time.monotonic() - started
    shutil.rmtree(scratch / spec.experiment, ignore_errors=True)
    values = np.array([r["value"] for r in order], dtype=float)
    best_so_far = np.fmax.accumulate(np.where(np.isfinite(values), values, -np.inf))
    epochs, imbalance = {}, {}
    for r in order:
        epochs[r["trial"]] = max(epochs.get(r["trial"], 0), r["epoch"])
        imbalance[r["trial"]] = str(r["cell"]).rsplit("|", 1)[-1]
    finite = [r for r in order if math.isfinite(r["value"])]
    return {"method": method, "seed": seed, "settings": {**settings}, "trials": len(epochs),
            "trial_epochs": len(order), "best": float(best_so_far[-1]) if len(order) else float("nan"),
            "winner": max(finite, key=lambda r: r["value"])["cell"] if finite else None,
            "best_so_far": [float(v) for v in best_so_far],
            "ran_all_epochs": sum(e >= MAX_EPOCHS for e in epochs.values()),
            "cells": len({r["cell"] for r in order}),
            "imbalance_trials": {k: list(imbalance.values()).count(k) for k in IMBALANCE},
            "compute_s": float(sum(r["epoch_time_s"] for r in order)), "replay_wall_s": wall}


def epochs_to_reach(best_so_far: list[float], target: float) -> int | None:
    hit = np.flatnonzero(np.asarray(best_so_far) >= target - 1e-12)
    return int(hit[0]) + 1 if len(hit) else None


REPLAY_VERSION = 3  # part of every memo key: bump it when the searcher or the scheduler changes what a replay does
REPLAYS = OUT / "replays"


def memo_replay(method: str, seed: int, settings: dict, curves: dict, scratch: Path, data_key: str,
                recording: int) -> dict:
    """replay() over one recording, kept on disk (bench/out/payoff/replays/): a study cut short resumes."""
    from hamtune.io import atomic_write_json

    blob = json.dumps({"v": REPLAY_VERSION, "method": method, "seed": seed, "settings": settings, "trials": TRIALS,
                       "lr_cells": LR_CELLS, "data": data_key, "recording": recording}, sort_keys=True)
    path = REPLAYS / (f"{method.replace('+', '-')}-rec{recording}-seed{seed}-"
                      f"{hashlib.sha1(blob.encode()).hexdigest()[:10]}.json")
    if path.is_file():
        return json.loads(path.read_text())
    result = {**replay(method, seed, settings, curves, scratch), "recording": recording}
    atomic_write_json(path, result)
    return result


def cell_values(recordings: dict[int, dict[str, dict]]) -> dict:
    """Each cell's best val balanced accuracy per recording, and its mean over the recordings: the mean is the
    nearest thing to a configuration's true worth that the study has (one recording's best is partly luck)."""
    by_rec = {rec: {k: max(h[METRIC] for h in c["history"]) for k, c in curves.items()}
              for rec, curves in recordings.items()}
    cells = list(next(iter(by_rec.values())))
    mean = {k: float(np.mean([by_rec[rec][k] for rec in by_rec])) for k in cells}
    return {"by_rec": by_rec, "mean": mean, "best_mean": max(mean.values()),
            "grid_best": {rec: max(v.values()) for rec, v in by_rec.items()}}


def summarise(runs: list[dict], baseline: dict[tuple, dict], values: dict) -> dict:
    """Per method over the seeds and recordings: how often it ends within TOLERANCE of the grid's best cell (the
    issue's measure of consistency: the search's best against its own recording's best), how often its winner is
    a configuration within TOLERANCE of the best one (cells valued by their mean over the recordings), what the
    winner scores on the recording the search did not see (what a retrain with a new seed gets), what it spends,
    and the old headline (trial-epochs to come within TOLERANCE of random+FIFO's final best on the same seed and
    recording, as a fraction of random+FIFO's trial-epochs)."""
    per_seed, fractions = [], []
    for r in runs:
        rec = r["recording"]
        ref = baseline[(rec, r["seed"])]
        grid_best = values["grid_best"][rec]
        needed = epochs_to_reach(r["best_so_far"], ref["best"] - TOLERANCE)
        fraction = needed / ref["trial_epochs"] if needed is not None else None
        others = [v[r["winner"]] for o, v in values["by_rec"].items() if o != rec and r["winner"]]
        winner_mean = values["mean"].get(r["winner"], math.nan)
        per_seed.append({"seed": r["seed"], "recording": rec, "best": round(r["best"], 4),
                         "trial_epochs": r["trial_epochs"],
                         "trials": r["trials"], "ran_all_epochs": r["ran_all_epochs"], "cells": r["cells"],
                         "winner": r["winner"], "winner_mean": round(winner_mean, 4),
                         "winner_unseen": round(float(np.mean(others)), 4) if others else None,
                         "at_best_config": bool(winner_mean >= values["best_mean"] - TOLERANCE - 1e-12),
                         "at_grid_best": bool(r["best"] >= grid_best - TOLERANCE - 1e-12),
                         "missed_choices": [k for k, n in r.get("imbalance_trials", {}).items() if n == 0],
                         "compute_s": round(r["compute_s"], 1), "replay_wall_s": round(r["replay_wall_s"], 1),
                         "to_reach": needed, "fraction": None if fraction is None else round(fraction, 4)})
        fractions.append(fraction if fraction is not None else math.inf)
    med = float(np.median(fractions))
    unseen = [p["winner_unseen"] for p in per_seed if p["winner_unseen"] is not None]
    return {
        "settings": runs[0]["settings"],
        "searches": len(per_seed),
        "at_grid_best": sum(p["at_grid_best"] for p in per_seed),
        "at_grid_best_by_rec": {str(rec): sum(p["at_grid_best"] for p in per_seed if p["recording"] == rec)
                                for rec in sorted({p["recording"] for p in per_seed})},
        "at_best_config": sum(p["at_best_config"] for p in per_seed),
        "winner_unseen_median": round(float(np.median(unseen)), 4) if unseen else None,
        "winner_mean_median": round(float(np.median([p["winner_mean"] for p in per_seed])), 4),
        "missed_a_choice": sum(bool(p["missed_choices"]) for p in per_seed),
        "final_best_median": round(float(np.median([r["best"] for r in runs])), 4),
        "trial_epochs_median": float(np.median([r["trial_epochs"] for r in runs])),
        "trial_epochs_max": int(max(r["trial_epochs"] for r in runs)),
        "compute_s_median": round(float(np.median([r["compute_s"] for r in runs])), 1),
        "fraction_median": None if math.isinf(med) else round(med, 4),
        "seeds_reached": sum(math.isfinite(f) for f in fractions),  # came within TOLERANCE at all
        "seeds_within_third": sum(f <= 1 / 3 for f in fractions),
        "per_seed": per_seed,
    }


def plot(results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hamtune.io import save_figure

    colours = {"TPE+ASHA": "tab:blue", "random+ASHA": "tab:green", "TPE+FIFO": "tab:purple",
               "random+FIFO": "tab:orange"}
    budget = TRIALS * MAX_EPOCHS
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for method, runs in results.items():
        grid = np.full((len(runs), budget), np.nan)
        for i, r in enumerate(runs):
            b = np.asarray(r["best_so_far"], dtype=float)
            grid[i, :len(b)] = b
            grid[i, len(b):] = b[-1] if len(b) else np.nan  # a search that ended early stays at its best
        x = np.arange(1, budget + 1)
        ends = int(np.median([r["trial_epochs"] for r in runs]))
        med = np.median(grid, axis=0)
        ax.fill_between(x, grid.min(axis=0), grid.max(axis=0), color=colours[method], alpha=0.12, step="post")
        ax.step(x[:ends], med[:ends], where="post", color=colours[method], lw=2,
                label=f"{method}: median of {len(runs)} seeds (band: min-max)")
        if ends < budget:
            ax.step(x[ends - 1:], med[ends - 1:], where="post", color=colours[method], lw=1, ls=":")
    ax.axvline(budget / 3, color="grey", ls="--", lw=1, label="a third of random+FIFO's trial-epochs")
    ax.set_xlabel("trial-epochs spent (in the order Tune received the reports)")
    ax.set_ylabel("best val balanced accuracy so far")
    ax.set_title(f"Search payoff on HAM10000 ({IMAGE_SIZE} px, resnet10t, {TRIALS} trials, {MAX_EPOCHS} epochs max)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    save_figure(fig, path, dpi=100, tight=True)
    plt.close(fig)


def replay_main(args) -> None:
    from hamtune.io import atomic_write_json
    from hamtune.search.driver import init_ray

    info = data_info()
    recordings: dict[int, dict[str, dict]] = {}
    for rec in RECORDINGS:
        by_cell = load_curves(info["fingerprint"], rec)
        missing = len(grid_configs()) - len(by_cell)
        if missing:
            raise SystemExit(f"search_payoff: {missing} of {len(grid_configs())} curves of training seed {rec} are "
                             f"not recorded yet; run --stage record --train-seed {rec} first")
        recordings[rec] = {f"{k[0]:g}|{k[1]:g}|{k[2]}": v for k, v in by_cell.items()}
    archive_curves(info, recordings)
    values = cell_values(recordings)
    recorded = list(recordings[RECORDINGS[0]].values())  # the first recording: rank correlation, the late bloomer
    best_cells = sorted(values["mean"], key=lambda k: -values["mean"][k])[:6]
    load_at_start = common.load_average()
    init_ray(None, num_cpus=MAX_CONCURRENT)
    scratch = common.out_dir("payoff", "ray")
    started = time.monotonic()

    def runs_of(method: str, settings: dict) -> list[dict]:
        return [memo_replay(method, seed, settings, recordings[rec], scratch, info["fingerprint"], rec)
                for rec in RECORDINGS for seed in args.seeds]

    results: dict[str, list[dict]] = {}
    for method in METHODS:
        results[method] = runs_of(method, BASE)
        print(f"{method}: best {[round(r['best'], 3) for r in results[method]]}, trial-epochs "
              f"{[r['trial_epochs'] for r in results[method]]}", flush=True)
    baseline = {(r["recording"], r["seed"]): r for r in results["random+FIFO"]}
    out = {
        "data": info, "trials": TRIALS, "seeds": list(args.seeds), "recordings": RECORDINGS,
        "max_epochs": MAX_EPOCHS, "max_concurrent": MAX_CONCURRENT, "tolerance": TOLERANCE,
        "model": FIXED_TRAIN["model"], "base": BASE,
        "grid": {"lr": lr_grid(), "augment_strength": augment_grid(), "imbalance": IMBALANCE,
                 "cells": len(grid_configs()), "lr_range": list(lr_range())},
        "grid_best": {str(k): round(v, 4) for k, v in values["grid_best"].items()},
        "best_mean": round(values["best_mean"], 4),
        "best_cells": [{"cell": k, "mean": round(values["mean"][k], 4),
                        **{f"seed {rec}": round(values["by_rec"][rec][k], 4) for rec in RECORDINGS}}
                       for k in best_cells],
        "seed_spread": seed_spread(values),
        "methods": {m: summarise(runs, baseline, values) for m, runs in results.items()},
        "variants": {}, "sizing": {},
        "record_s": round(sum(c["wall_s"] for curves in recordings.values() for c in curves.values()), 1),
        "replay_s": None,
        "record_min_s": round(min(c["wall_s"] for c in recorded), 1),
        "rank_correlation": rank_correlation(recorded),
        "best_cell_rank": best_cell_rank(recorded),
        "load_at_start": load_at_start,  # every search's own figures: per_seed under methods, variants
    }

    def save() -> None:  # after the four methods and after every variant: a cut-short run keeps what it has
        out["replay_s"] = round(time.monotonic() - started, 1)
        atomic_write_json(common.ROOT / "bench" / "search_payoff.json", out)

    save()
    plot(results, common.ROOT / "bench" / "search_payoff.png")
    if not args.no_variants:
        for name, change in VARIANTS.items():
            out["variants"][name] = summarise(runs_of("TPE+ASHA", {**BASE, **change}), baseline, values)
            v = out["variants"][name]
            print(f"variant {name}: at the grid's best on {v['at_grid_best']}, at the best configuration on "
                  f"{v['at_best_config']}, trial-epochs {v['trial_epochs_median']}", flush=True)
            save()
        for name, change in SIZING.items():
            v = summarise(runs_of("TPE+ASHA", {**BASE, **change, "num_samples": DEFAULT_TRIALS}), baseline, values)
            out["sizing"][name] = {k: v[k] for k in ("settings", "searches", "trial_epochs_median", "at_grid_best",
                                                     "at_best_config", "winner_unseen_median", "final_best_median",
                                                     "missed_a_choice")}
            print(f"sizing {name}: {out['sizing'][name]}", flush=True)
            save()
    out["header"] = common.run_header(load_at_start)  # what --stage report reprints: this run's command and machine
    save()
    common.publish(HEADING, section(out, load_at_start), dry_run=args.dry_run)


def seed_spread(values: dict) -> dict:
    """How far one configuration's best moves between the two training seeds: over every cell, and over the cells
    within LOOSE_TOLERANCE of the best mean (the ones a search has to tell apart)."""
    a, b = (values["by_rec"][rec] for rec in RECORDINGS[:2])
    diffs = {k: abs(a[k] - b[k]) for k in a}
    top = [k for k, m in values["mean"].items() if m >= values["best_mean"] - LOOSE_TOLERANCE]
    rank_a = sorted(a, key=lambda k: -a[k])
    return {"median_abs_diff": round(float(np.median(list(diffs.values()))), 4),
            "max_abs_diff": round(max(diffs.values()), 4),
            "top_median_abs_diff": round(float(np.median([diffs[k] for k in top])), 4),
            "cells_within_tolerance_of_best_mean": sorted(
                k for k, m in values["mean"].items() if m >= values["best_mean"] - TOLERANCE),
            "best_of_seed_0_ranks_in_seed_1": 1 + sum(b[k] > b[rank_a[0]] for k in b),
            "best_of_seed_1": max(b, key=lambda k: b[k]), "best_of_seed_0": rank_a[0]}


def rank_correlation(recorded: list[dict]) -> list[float]:
    """Spearman correlation, over the grid's cells, between the metric at epoch e and the cell's best over all
    epochs: how well an early rung ranks configurations (what ASHA's grace period and rungs rely on)."""
    import pandas as pd

    m = pd.DataFrame([[h[METRIC] for h in c["history"]] for c in recorded if len(c["history"]) == MAX_EPOCHS])
    best = m.max(axis=1)
    return [round(float(m[e].corr(best, method="spearman")), 3) for e in m.columns]


def best_cell_rank(recorded: list[dict]) -> list[int]:
    """Where the grid's best cell ranks among all cells at each epoch (1 = top): an ASHA rung sees these ranks."""
    full = [c for c in recorded if len(c["history"]) == MAX_EPOCHS]
    best = max(full, key=lambda c: max(h[METRIC] for h in c["history"]))
    return [1 + sum(c["history"][e][METRIC] > best["history"][e][METRIC] for c in full) for e in range(MAX_EPOCHS)]


def report_main(args) -> None:
    """Rewrite the BENCHMARKS.md section from the last replay's bench/search_payoff.json (no training, no Ray)."""
    out = json.loads((common.ROOT / "bench" / "search_payoff.json").read_text())
    common.publish(HEADING, section(out, out.get("load_at_start", "?")), dry_run=args.dry_run)


def _rank(item: tuple[str, dict]) -> tuple:
    """Settings ranked for a default: the winner is a best configuration most often, then the winner's score on
    the unseen seed, then the fewest trial-epochs."""
    r = item[1]
    return (-r["at_best_config"], -(r["winner_unseen_median"] or 0.0), r["trial_epochs_median"])


def _fmt_settings(s: dict) -> str:
    return (f"grace {s['grace_period']}, reduction {s['reduction_factor']}, start-up {s['startup_trials']} "
            f"({'covering every choice' if s.get('cover_choices', True) else 'random'}), "
            f"{'multivariate' if s['multivariate'] else 'independent'} TPE, "
            f"constant liar {'on' if s['constant_liar'] else 'off'}, "
            f"{'decisions in trial order, waves' if s.get('deterministic', True) else 'Tune ASHA, no waves'}")


def _fmt_fraction(r: dict) -> str:
    return "not reached" if r["fraction_median"] is None else f"{r['fraction_median']:.2f}"


def _cell(key: str) -> str:
    lr, aug, imb = key.split("|")
    return f"lr {lr}, augment {aug}, {imb}"


def what_noise_says(out: dict) -> str:
    """The two recordings side by side: how far one configuration moves between training seeds, against the
    0.01 target, and where the first recording's best cell ranks at each rung."""
    spread, cells, n_cells = out["seed_spread"], out["best_cells"], out["grid"]["cells"]
    rec = out["recordings"]
    ranks = out.get("best_cell_rank") or []
    text = (f"**What two recordings say about the {TOLERANCE} target.** Every cell was trained twice, with "
            f"training seeds {rec[0]} and {rec[1]}. One configuration's best val balanced accuracy moves between "
            f"the two by {spread['median_abs_diff']:.3f} (median over the {n_cells} cells; at most "
            f"{spread['max_abs_diff']:.3f}; {spread['top_median_abs_diff']:.3f} among the cells within "
            f"{LOOSE_TOLERANCE} of the best), so {TOLERANCE} is finer than one recording can rank configurations: "
            f"seed {rec[0]}'s best cell ({_cell(spread['best_of_seed_0'])}) ranks "
            f"{spread['best_of_seed_0_ranks_in_seed_1']} of {n_cells} with seed {rec[1]}, whose best is "
            f"{_cell(spread['best_of_seed_1'])}. The best configurations by the mean of the two seeds: "
            + "; ".join(f"{_cell(c['cell'])}: {c['mean']:.3f} ("
                        + ", ".join(f"{k} {v:.3f}" for k, v in c.items() if k.startswith("seed ")) + ")"
                        for c in cells)
            + f". \"At the grid's best\" (the issue's measure) asks a search to end at one recording's luckiest "
            f"run; \"winner at a best configuration\" asks whether the configuration the search picks (the one "
            f"`hamtune best --retrain` retrains) is within {TOLERANCE} of the best by the two-seed mean "
            f"({len(spread['cells_within_tolerance_of_best_mean'])} cell(s) qualify), and \"winner on the unseen "
            "seed\" is what that pick scores in the recording the search never saw: what a user gets by retraining "
            "it.")
    if ranks:
        text += (f" Seed {rec[0]}'s best cell ranks " + ", ".join(f"{r} at epoch {e + 1}" for e, r in enumerate(ranks))
                 + f" of {n_cells} cells: it blooms late, so an ASHA rung cuts it unless it comes early.")
    return text + "\n"


def section(out: dict, load_at_start: str) -> str:
    """The BENCHMARKS.md section: how the curves were obtained, the four methods, the goals, the variants."""
    d, m = out["data"], out["methods"]
    n = len(out["seeds"])
    recs = out["recordings"]
    searches = m["TPE+ASHA"]["searches"]
    budget = out["trials"] * MAX_EPOCHS
    fifo_epochs = m["random+FIFO"]["trial_epochs_median"]

    def row(name: str, r: dict, settings: bool = False) -> list:
        by_rec = " + ".join(str(v) for v in r["at_grid_best_by_rec"].values())
        return [name, *([_fmt_settings(r["settings"])] if settings else []),
                f"{r['at_grid_best']} / {r['searches']} ({by_rec})", f"{r['at_best_config']} / {r['searches']}",
                f"{r['winner_unseen_median']:.3f}", f"{r['final_best_median']:.3f}",
                f"{r['trial_epochs_median']:.0f} (max {r['trial_epochs_max']})",
                _fmt_fraction(r), f"{r['seeds_within_third']} ({r['seeds_reached']})", r["missed_a_choice"]]

    columns = ["at the grid's best (seed 0 + seed 1 recordings)", "winner at a best configuration",
               "winner on the unseen seed, median", "final best, median", "trial-epochs, median",
               "fraction to reach random+FIFO's best, median", "searches within 1/3 (at all)", "missed a choice"]
    head = m["TPE+ASHA"]
    literal = head["at_grid_best"] >= math.ceil(0.9 * searches) and head["trial_epochs_median"] <= fifo_epochs / 2
    by_config = head["at_best_config"] >= math.ceil(0.9 * searches) and head["trial_epochs_median"] <= fifo_epochs / 2
    third = head["fraction_median"] is not None and head["fraction_median"] <= 1 / 3
    rate = head["at_best_config"] / searches
    count_se = math.sqrt(rate * (1 - rate) * searches)
    per_seed = [[p["seed"], p["best"], "yes" if p["at_grid_best"] else "no", _cell(p["winner"]),
                 "yes" if p["at_best_config"] else "no", f"{p['winner_unseen']:.3f}", p["trial_epochs"],
                 f"{p['ran_all_epochs']}/{p['trials']}", p["cells"], ", ".join(p["missed_choices"]) or "-",
                 p["to_reach"] if p["to_reach"] is not None else "not reached",
                 f"{p['fraction']:.2f}" if p["fraction"] is not None else "n/a"]
                for p in head["per_seed"] if p["recording"] == recs[0]]
    ranked = sorted([("as compared above", head), *out["variants"].items()], key=_rank)
    affordable = [(k, v) for k, v in ranked if v["trial_epochs_median"] <= fifo_epochs / 2]
    winner, best = (affordable or ranked)[0]
    wall_record = out["record_s"] / 2  # two shards of one thread each
    parts = [
        out.get("header") or common.run_header(load_at_start),
        f"**How the curves were obtained.** Stage 1 (record): every cell of a finite grid, lr x augment_strength x "
        f"imbalance = {len(out['grid']['lr'])} x {len(out['grid']['augment_strength'])} x "
        f"{len(out['grid']['imbalance'])} = {out['grid']['cells']} configurations (lr {out['grid']['lr']}, "
        f"augment_strength {out['grid']['augment_strength']}, imbalance {', '.join(IMBALANCE)}), was trained "
        f"for {MAX_EPOCHS} epochs by hamtune's fit, twice (training seeds {recs[0]} and {recs[1]}: two whole "
        f"recordings): {out['model']}, {d['image_size']} px, head 128, AdamW, weight_decay 1e-4, batch 64, 1 "
        f"warm-up epoch then cosine, one torch thread. Data: {d['source']}, {d['split']}; training on a fixed, "
        f"lesion-grouped subsample, {d['subsample']} ({d['train_images']} images of {d['train_lesions']} lesions: "
        f"{', '.join(f'{k} {v}' for k, v in d['train_per_class'].items())}), validation on the whole val split "
        f"({d['val_images']} images). Every recorded curve is one real run (the {2 * out['grid']['cells']} runs "
        f"took {out['record_s'] / 60:.0f} min in all, about {wall_record / 60:.0f} min of wall time in two "
        "processes of one thread each); they are committed as `bench/search_payoff_curves.json`, so the replay "
        "reruns without recording. These are from-scratch curves: recording the pretrained recipe's "
        "(EfficientNet-Lite2 at 112 px, about 5 min per epoch here) for 48 cells would take about 30 hours of "
        "this machine, so the study runs on these and says so. "
        f"Stage 2 (replay): the real Ray Tune searchers and schedulers, built by hamtune.search.make_searcher / "
        f"make_scheduler from a hamtune spec (OptunaSearch is hamtune's PruningAwareOptunaSearch with its "
        f"start-up design; random is Tune's BasicVariantGenerator, as `searcher: random`), sample the product's "
        f"own continuous space (lr log-uniform {out['grid']['lr_range'][0]:.2g}-{out['grid']['lr_range'][1]:.2g}, "
        f"augment_strength uniform 0-1, imbalance a choice of 4); a replay trainable snaps lr and "
        f"augment_strength to the grid cell they fall in (equal-width bins on the sampled scale: a third of a "
        f"decade of lr, halves of augment_strength) and reports that cell's recorded per-epoch metrics, sleeping "
        f"{TIME_SCALE:g} x the recorded epoch time so that the {MAX_CONCURRENT} concurrent trials interleave. ASHA "
        f"therefore stops a replayed trial at the same epoch, with the same numbers, as it would stop the real "
        f"run. Max epochs ({MAX_EPOCHS}) is fixed by the recording (the cosine schedule depends on it).\n",
        f"Each method: the same space, {out['trials']} trials (the real-data recipe's budget), at most "
        f"{MAX_EPOCHS} epochs, {MAX_CONCURRENT} concurrent, search seeds {out['seeds'][0]}-{out['seeds'][-1]} "
        f"({n}) over each of the two recordings ({searches} searches). Settings shared by the methods where they "
        f"apply: {_fmt_settings(out['base'])}. \"At the grid's best\": the search's best val balanced accuracy is "
        f"within {TOLERANCE} of the best cell of the recording it searched (seed {recs[0]}: "
        f"{out['grid_best'][str(recs[0])]:.3f}, seed {recs[1]}: {out['grid_best'][str(recs[1])]:.3f}). \"Winner at "
        f"a best configuration\": the cell of the search's best trial has a two-seed mean within {TOLERANCE} of "
        f"the best mean ({out['best_mean']:.3f}). \"Winner on the unseen seed\": that cell's best in the other "
        f"recording. random+FIFO spends {budget} trial-epochs by construction. \"Fraction\": trial-epochs, in "
        f"report order, until the best so far came within {TOLERANCE} of random+FIFO's final best on the same "
        f"seed and recording, over random+FIFO's trial-epochs (median; a search that never got there counts as "
        "infinite). \"Missed a choice\": searches in which some imbalance strategy got no trial.\n",
        common.md_table(["method", *columns], [row(k, v) for k, v in m.items()]),
        f"**Goals.** TPE+ASHA at the grid's best on at least 18 of 20 seeds ({math.ceil(0.9 * searches)} of "
        f"{searches} searches over the two recordings), spending at most half of random+FIFO's trial-epochs "
        f"({fifo_epochs / 2:.0f}): {head['at_grid_best']} of {searches} "
        f"({' + '.join(str(v) for v in head['at_grid_best_by_rec'].values())} by recording) at "
        f"{head['trial_epochs_median']:.0f} (median; random+FIFO's own rate: {m['random+FIFO']['at_grid_best']} "
        f"of {searches}): **{'met' if literal else 'MISSED'}**. Read on configurations rather than on one "
        f"recording's luck (the winner is within {TOLERANCE} of the best configuration by the two-seed mean): "
        f"{head['at_best_config']} of {searches}, **"
        f"{'met' if by_config else 'MISSED'}** (random+FIFO: {m['random+FIFO']['at_best_config']}, TPE+FIFO: "
        f"{m['TPE+FIFO']['at_best_config']}). Fraction to reach random+FIFO's best, median over {searches} "
        f"searches, at most 1/3: {_fmt_fraction(head)}: **{'met' if third else 'MISSED'}** (the setting chosen "
        f"below: {_fmt_fraction(best)}). Anytime curves: "
        "`bench/search_payoff.png`. Raw figures: `bench/search_payoff.json`.\n",
        what_noise_says(out),
        f"TPE+ASHA per seed, over the seed-{recs[0]} recording:\n",
        common.md_table(["seed", "best", "at the grid's best", "winner", "a best configuration",
                         "winner on seed 1", "trial-epochs", "ran all epochs", "grid cells visited",
                         "choices never tried", "to reach", "fraction"], per_seed),
        "**TPE+ASHA settings tried in replay** (each one change from the settings above; same seeds and "
        f"recordings, same random+FIFO reference; at these rates a count out of {searches} has a binomial "
        f"standard error of about {count_se:.0f}, so settings a few searches apart are not told apart):\n",
        common.md_table(["variant", "settings", *columns],
                        [row("as compared above", head, True)]
                        + [row(k, v, True) for k, v in out["variants"].items()]),
        (f"Chosen by this replay (the winner at a best configuration most often, then its score on the unseen "
         f"seed, then fewest trial-epochs, among settings that spend at most half of random+FIFO's): **{winner}** "
         f"({_fmt_settings(best['settings'])}): {best['at_best_config']} of {searches} searches picked a best "
         f"configuration, {best['winner_unseen_median']:.3f} on the unseen seed, "
         f"{best['trial_epochs_median']:.0f} trial-epochs (median).\n" if out["variants"] else ""),
        ("Sizing search_spaces/default.yaml (10 trials of at most 8 epochs: 80 trial-epochs without ASHA), TPE+ASHA "
         f"over the same {searches} searches: "
         + "; ".join(f"{k}: {v['trial_epochs_median']:.0f} trial-epochs (median), winner at a best "
                     f"configuration on {v['at_best_config']}, on the unseen seed {v['winner_unseen_median']:.3f} "
                     f"(median), at the grid's best on {v['at_grid_best']}, missed a choice on "
                     f"{v['missed_a_choice']}" for k, v in out["sizing"].items()) + ".\n"
         if out.get("sizing") else ""),
        (f"How early a rung can judge: Spearman rank correlation, over the {out['grid']['cells']} cells of the "
         f"seed-{recs[0]} recording, between the val balanced accuracy at epoch e and the cell's best over "
         f"{MAX_EPOCHS} epochs: "
         + ", ".join(f"epoch {e + 1}: {r:.2f}" for e, r in enumerate(out["rank_correlation"])) + ".\n"
         if out.get("rank_correlation") else ""),
        "Caveats: (1) snapping makes every config in a grid cell the same run, so TPE re-sampling a good cell costs "
        "trial-epochs but finds nothing new, while a real search would see small differences inside the cell; (2) "
        "\"best\" is the maximum over every epoch of every trial on one validation split (1,500 images, 17 df), "
        "so a method that evaluates more epochs gets more draws of the noise, which favours FIFO; (3) two training "
        "seeds per cell measure the seed-to-seed spread but only roughly rank the top cells: the two-seed mean is "
        "itself noisy by about the spread over the square root of two.\n",
        f"Time: recording {wall_record / 60:.0f} min (two shards per seed; the fastest cell took "
        f"{out.get('record_min_s', 0):.0f} s), replay {out['replay_s'] / 60:.1f} min (`make bench-payoff`; the "
        "recording resumes from bench/out/payoff/curves/ and the replay from bench/out/payoff/replays/).\n",
    ]
    text = "\n\n".join(part.strip("\n") for part in parts if part)
    return text.replace("(part of `make bench`)", "(`make bench-payoff`)") + "\n"


# ---------------------------------------------------------------------------------------------------------------
# Command line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=("record", "replay", "all", "report"), default="all",
                        help="report: rewrite the BENCHMARKS.md section from bench/search_payoff.json")
    parser.add_argument("--max-configs", type=int, default=None, help="record at most this many new curves")
    parser.add_argument("--deadline", default=None, help="stop recording new curves after this UTC time (HH:MM)")
    parser.add_argument("--shard", default="0/1", help="K/N: record every N-th cell from the K-th (N processes)")
    parser.add_argument("--train-seed", type=int, choices=RECORDINGS, default=None,
                        help="record only this training seed's curves (default: every seed in turn)")
    parser.add_argument("--seeds", type=int, nargs="+", default=SEEDS)
    parser.add_argument("--lr-cells", type=int, choices=(2, 4, 6), default=6,
                        help="replay over the inner 2/4 or all 6 lr cells (record always works through all 6)")
    parser.add_argument("--no-variants", action="store_true", help="replay only the four methods")
    parser.add_argument("--dry-run", action="store_true", help="print the section instead of writing BENCHMARKS.md")
    args = parser.parse_args()
    deadline = None
    if args.deadline:
        import datetime as dt

        now = dt.datetime.now(dt.timezone.utc)
        hh, mm = map(int, args.deadline.split(":"))
        deadline = now.replace(hour=hh, minute=mm, second=0, microsecond=0).timestamp()
    if args.stage in ("record", "all"):
        k, n = map(int, args.shard.split("/"))
        for seed in RECORDINGS if args.train_seed is None else [args.train_seed]:
            record(args.max_configs, deadline, (k, n), seed)
    if args.stage in ("replay", "all"):
        global LR_CELLS
        LR_CELLS = args.lr_cells
        replay_main(args)
    if args.stage == "report":
        report_main(args)


if __name__ == "__main__":
    main()
