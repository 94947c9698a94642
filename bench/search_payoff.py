"""Search payoff on real HAM10000: TPE+ASHA, random+ASHA, TPE+FIFO and random+FIFO, same space, many seeds.

How the curves are obtained (two stages, both real):

1. record: every configuration of a finite grid is trained ONCE with hamtune.train.fit (resnet10t, 32 px, the
   fixed, lesion-grouped subsample below, one torch thread), and its per-epoch validation metrics are kept in an
   on-disk memo (bench/out/payoff/curves/, one JSON per configuration; an interrupted recording resumes).
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
LOOSE_TOLERANCE = 0.02  # reported beside: about the seed-to-seed spread of one configuration's best (--stage noise)
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


def curve_path(config: dict, data_key: str) -> Path:
    blob = json.dumps({"data": data_key, "fixed": FIXED_TRAIN, **config}, sort_keys=True)
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


def record(max_configs: int | None = None, deadline: float | None = None, shard: tuple[int, int] = (0, 1)) -> dict:
    """Record the grid's curves not on disk yet; shard (k, n) takes every n-th cell from the k-th, so n processes of
    one thread each can share the recording (each curve is one file, written atomically)."""
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
            if i % n == k and not curve_path(c, info["fingerprint"]).is_file()]
    print(f"record: {len(todo)} curves to record in shard {k}/{n} of a {len(grid_configs())}-cell grid; "
          f"{info['train_images']} train / {info['val_images']} val images", flush=True)
    for i, config in enumerate(todo[:max_configs]):
        if deadline is not None and time.time() > deadline:
            print("record: deadline reached, stopping", flush=True)
            break
        started = time.perf_counter()
        result = fit(TrainConfig.from_dict({**FIXED_TRAIN, **config}), train, val)
        history = [{k: float(h[k]) for k in KEEP if k in h} for h in result.history]
        atomic_write_json(curve_path(config, info["fingerprint"]), {
            "config": config, "fixed": FIXED_TRAIN, "data": info["fingerprint"], "status": result.status,
            "message": result.message, "history": history, "wall_s": time.perf_counter() - started})
        best = max((h[METRIC] for h in history), default=float("nan"))
        print(f"record {i + 1}/{len(todo)} {config}: {result.status}, best {best:.3f}, "
              f"{time.perf_counter() - started:.0f} s", flush=True)
    return info


NOISE_SEEDS = [1, 2]  # training seeds for the seed-to-seed spread of the grid's best cells


def record_noise(cells: int = 3) -> dict:
    """The grid's best cells trained again with other training seeds: how far apart one configuration's best
    lands from run to run, against which the replay's tolerance (0.01) can be read."""
    import torch

    from hamtune.io import atomic_write_json
    from hamtune.training.config import TrainConfig
    from hamtune.training.loop import fit

    torch.set_num_threads(1)
    train, val, info = load_data()
    curves = load_curves(info["fingerprint"])
    best = sorted(curves.values(), key=lambda c: -max(h[METRIC] for h in c["history"]))[:cells]
    path = OUT / "noise.json"
    out = json.loads(path.read_text()) if path.is_file() else {}
    for c in best:
        key = f"{c['config']['lr']:g}|{c['config']['augment_strength']:g}|{c['config']['imbalance']}"
        runs = out.setdefault(key, {"seed 0": round(max(h[METRIC] for h in c["history"]), 4)})
        for seed in NOISE_SEEDS:
            if f"seed {seed}" in runs:
                continue
            result = fit(TrainConfig.from_dict({**FIXED_TRAIN, **c["config"], "seed": seed}), train, val)
            runs[f"seed {seed}"] = round(max(float(h[METRIC]) for h in result.history), 4)
            print(f"noise {key} seed {seed}: {runs[f'seed {seed}']}", flush=True)
            atomic_write_json(path, out)
    return out


def load_curves(data_key: str) -> dict[tuple, dict]:
    curves = {}
    for config in grid_configs():
        path = curve_path(config, data_key)
        if path.is_file():
            curves[(config["lr"], config["augment_strength"], config["imbalance"])] = json.loads(path.read_text())
    return curves


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
}
# search_spaces/default.yaml's size (10 trials of 8 epochs): what ASHA spends and finds with each candidate.
SIZING = {"grace 2, reduction 3": {"grace_period": 2, "reduction_factor": 3},
          "grace 2, reduction 2": {"grace_period": 2, "reduction_factor": 2},
          "grace 1, reduction 3": {"grace_period": 1, "reduction_factor": 3},
          "start-up 4, grace 2, reduction 3": {"startup_trials": 4, "grace_period": 2, "reduction_factor": 3}}


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
    """One search over the recordings; returns every report in the order Tune received it."""
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
    return {"method": method, "seed": seed, "settings": {**settings}, "trials": len(epochs),
            "trial_epochs": len(order), "best": float(best_so_far[-1]) if len(order) else float("nan"),
            "best_so_far": [float(v) for v in best_so_far],
            "ran_all_epochs": sum(e >= MAX_EPOCHS for e in epochs.values()),
            "cells": len({r["cell"] for r in order}),
            "imbalance_trials": {k: list(imbalance.values()).count(k) for k in IMBALANCE},
            "compute_s": float(sum(r["epoch_time_s"] for r in order)), "replay_wall_s": wall}


def epochs_to_reach(best_so_far: list[float], target: float) -> int | None:
    hit = np.flatnonzero(np.asarray(best_so_far) >= target - 1e-12)
    return int(hit[0]) + 1 if len(hit) else None


REPLAY_VERSION = 2  # part of every memo key: bump it when the searcher or the scheduler changes what a replay does
REPLAYS = OUT / "replays"


def memo_replay(method: str, seed: int, settings: dict, curves: dict, scratch: Path, data_key: str) -> dict:
    """replay(), kept on disk (bench/out/payoff/replays/): a study cut short resumes where it stopped."""
    from hamtune.io import atomic_write_json

    blob = json.dumps({"v": REPLAY_VERSION, "method": method, "seed": seed, "settings": settings, "trials": TRIALS,
                       "lr_cells": LR_CELLS, "data": data_key}, sort_keys=True)
    path = REPLAYS / f"{method.replace('+', '-')}-seed{seed}-{hashlib.sha1(blob.encode()).hexdigest()[:10]}.json"
    if path.is_file():
        return json.loads(path.read_text())
    result = replay(method, seed, settings, curves, scratch)
    atomic_write_json(path, result)
    return result


def summarise(runs: list[dict], baseline: dict[int, dict], grid_best: float) -> dict:
    """Per method over the seeds: how often it ends within TOLERANCE of the grid's best cell (the issue's measure of
    consistency), what it spends, and the old headline (trial-epochs to come within TOLERANCE of random+FIFO's
    final best on the same seed, as a fraction of random+FIFO's trial-epochs)."""
    per_seed, fractions = [], []
    for r in runs:
        ref = baseline[r["seed"]]
        needed = epochs_to_reach(r["best_so_far"], ref["best"] - TOLERANCE)
        fraction = needed / ref["trial_epochs"] if needed is not None else None
        per_seed.append({"seed": r["seed"], "best": round(r["best"], 4), "trial_epochs": r["trial_epochs"],
                         "trials": r["trials"], "ran_all_epochs": r["ran_all_epochs"], "cells": r["cells"],
                         "at_grid_best": bool(r["best"] >= grid_best - TOLERANCE - 1e-12),
                         "within_loose": bool(r["best"] >= grid_best - LOOSE_TOLERANCE - 1e-12),
                         "missed_choices": [k for k, n in r.get("imbalance_trials", {}).items() if n == 0],
                         "compute_s": round(r["compute_s"], 1), "replay_wall_s": round(r["replay_wall_s"], 1),
                         "to_reach": needed, "fraction": None if fraction is None else round(fraction, 4)})
        fractions.append(fraction if fraction is not None else math.inf)
    med = float(np.median(fractions))
    return {
        "settings": runs[0]["settings"],
        "at_grid_best": sum(p["at_grid_best"] for p in per_seed),
        "within_loose": sum(p["within_loose"] for p in per_seed),
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

    info = json.loads((OUT / "data.json").read_text())
    by_cell = load_curves(info["fingerprint"])
    missing = len(grid_configs()) - len(by_cell)
    if missing:
        raise SystemExit(f"search_payoff: {missing} of {len(grid_configs())} curves are not recorded yet; "
                         "run --stage record first")
    curves = {f"{k[0]:g}|{k[1]:g}|{k[2]}": v for k, v in by_cell.items()}
    recorded = list(by_cell.values())  # the cells of this replay's grid
    grid_best = max(max(h[METRIC] for h in c["history"]) for c in recorded)
    best_cells = sorted(recorded, key=lambda c: -max(h[METRIC] for h in c["history"]))[:3]
    load_at_start = common.load_average()
    init_ray(None, num_cpus=MAX_CONCURRENT)
    scratch = common.out_dir("payoff", "ray")
    started = time.monotonic()

    def runs_of(method: str, settings: dict) -> list[dict]:
        return [memo_replay(method, seed, settings, curves, scratch, info["fingerprint"]) for seed in args.seeds]

    results: dict[str, list[dict]] = {}
    for method in METHODS:
        results[method] = runs_of(method, BASE)
        print(f"{method}: best {[round(r['best'], 3) for r in results[method]]}, trial-epochs "
              f"{[r['trial_epochs'] for r in results[method]]}", flush=True)
    baseline = {r["seed"]: r for r in results["random+FIFO"]}
    out = {
        "data": info, "trials": TRIALS, "seeds": list(args.seeds), "max_epochs": MAX_EPOCHS,
        "max_concurrent": MAX_CONCURRENT, "tolerance": TOLERANCE, "model": FIXED_TRAIN["model"], "base": BASE,
        "grid": {"lr": lr_grid(), "augment_strength": augment_grid(), "imbalance": IMBALANCE,
                 "cells": len(grid_configs()), "lr_range": list(lr_range())},
        "grid_best": round(grid_best, 4),
        "best_cells": [{**c["config"], "best": round(max(h[METRIC] for h in c["history"]), 4)} for c in best_cells],
        "methods": {m: summarise(runs, baseline, grid_best) for m, runs in results.items()},
        "variants": {}, "sizing": {},
        "record_s": round(sum(c["wall_s"] for c in recorded), 1), "replay_s": None,
        "record_min_s": round(min(c["wall_s"] for c in recorded), 1),
        "rank_correlation": rank_correlation(recorded),
        "best_cell_rank": best_cell_rank(recorded),
        "noise": json.loads((OUT / "noise.json").read_text()) if (OUT / "noise.json").is_file() else {},
        "load_at_start": load_at_start,
        "runs": {m: [{k: v for k, v in r.items() if k != "best_so_far"} for r in runs] for m, runs in results.items()},
    }

    def save() -> None:  # after the four methods and after every variant: a cut-short run keeps what it has
        out["replay_s"] = round(time.monotonic() - started, 1)
        atomic_write_json(common.ROOT / "bench" / "search_payoff.json", out)

    save()
    plot(results, common.ROOT / "bench" / "search_payoff.png")
    if not args.no_variants:
        for name, change in VARIANTS.items():
            out["variants"][name] = summarise(runs_of("TPE+ASHA", {**BASE, **change}), baseline, grid_best)
            v = out["variants"][name]
            print(f"variant {name}: at the grid's best on {v['at_grid_best']}, trial-epochs "
                  f"{v['trial_epochs_median']}, fraction {v['fraction_median']}", flush=True)
            save()
        for name, change in SIZING.items():
            runs = runs_of("TPE+ASHA", {**BASE, **change, "num_samples": DEFAULT_TRIALS})
            out["sizing"][name] = {
                "trial_epochs": [r["trial_epochs"] for r in runs],
                "trial_epochs_median": float(np.median([r["trial_epochs"] for r in runs])),
                "at_grid_best": sum(r["best"] >= grid_best - TOLERANCE - 1e-12 for r in runs),
                "best_median": round(float(np.median([r["best"] for r in runs])), 4),
                "missed_a_choice": sum(any(n == 0 for n in r["imbalance_trials"].values()) for r in runs)}
            print(f"sizing {name}: {out['sizing'][name]}", flush=True)
            save()
    common.publish(HEADING, section(out, load_at_start), dry_run=args.dry_run)


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
    """Settings ranked for a default: ends at the grid's best most often, then spends the fewest trial-epochs."""
    r = item[1]
    return (-r["at_grid_best"], r["trial_epochs_median"],
            math.inf if r["fraction_median"] is None else r["fraction_median"])


def _fmt_settings(s: dict) -> str:
    return (f"grace {s['grace_period']}, reduction {s['reduction_factor']}, start-up {s['startup_trials']} "
            f"({'covering every choice' if s.get('cover_choices', True) else 'random'}), "
            f"{'multivariate' if s['multivariate'] else 'independent'} TPE, "
            f"constant liar {'on' if s['constant_liar'] else 'off'}, "
            f"{'decisions in trial order, waves' if s.get('deterministic', True) else 'Tune ASHA, no waves'}")


def _fmt_fraction(r: dict) -> str:
    return "not reached" if r["fraction_median"] is None else f"{r['fraction_median']:.2f}"


def why_missed(out: dict) -> str:
    """What the recording says about the 0.01 target: how the best cell ranks at the rungs, and the seed noise."""
    ranks, noise = out.get("best_cell_rank"), out.get("noise") or {}
    if not ranks:
        return ""
    cells = out["best_cells"]
    text = (f"What the recording says about the {TOLERANCE} target: the grid's best cell (lr {cells[0]['lr']:g}, "
            f"augment {cells[0]['augment_strength']:g}, {cells[0]['imbalance']}: {cells[0]['best']:.3f}) ranks "
            + ", ".join(f"{r} at epoch {e + 1}" for e, r in enumerate(ranks))
            + f" of {out['grid']['cells']} cells: it blooms late, so an ASHA rung before it overtakes cuts it unless "
            f"it comes early in the trial order. The runner-up scores {cells[1]['best']:.3f} "
            f"({cells[0]['best'] - cells[1]['best']:.3f} below).")
    if noise:
        spread = [max(v.values()) - min(v.values()) for v in noise.values()]
        text += (" The same cells trained again with other training seeds (best val balanced accuracy per seed): "
                 + "; ".join(f"{k.replace('|', ', ')}: " + ", ".join(f"{s} {v:.3f}" for s, v in runs.items())
                             for k, runs in noise.items())
                 + f": one configuration's best moves by {min(spread):.3f}-{max(spread):.3f} between seeds, so "
                 f"{TOLERANCE} is finer than one recording can tell the best cells apart; the within-"
                 f"{LOOSE_TOLERANCE} column counts the searches that ended at a cell as good as the best within "
                 "that spread.")
    return text + "\n"


def section(out: dict, load_at_start: str) -> str:
    """The BENCHMARKS.md section: how the curves were obtained, the four methods, the goals, the variants."""
    d, m = out["data"], out["methods"]
    n = len(out["seeds"])
    budget = out["trials"] * MAX_EPOCHS
    fifo_epochs = m["random+FIFO"]["trial_epochs_median"]

    def row(name: str, r: dict, settings: bool = False) -> list:
        return [name, *([_fmt_settings(r["settings"])] if settings else []), f"{r['at_grid_best']} / {n}",
                f"{r.get('within_loose', 'n/a')} / {n}", f"{r['final_best_median']:.3f}", f"{r['trial_epochs_median']:.0f} (max {r['trial_epochs_max']})",
                _fmt_fraction(r), f"{r['seeds_within_third']} ({r['seeds_reached']})", r["missed_a_choice"]]

    head = m["TPE+ASHA"]
    consistent = head["at_grid_best"] >= 0.9 * n and head["trial_epochs_median"] <= fifo_epochs / 2
    third = head["fraction_median"] is not None and head["fraction_median"] <= 1 / 3
    per_seed = [[p["seed"], p["best"], "yes" if p["at_grid_best"] else "no", p["trial_epochs"],
                 f"{p['ran_all_epochs']}/{p['trials']}", p["cells"], ", ".join(p["missed_choices"]) or "-",
                 p["to_reach"] if p["to_reach"] is not None else "not reached",
                 f"{p['fraction']:.2f}" if p["fraction"] is not None else "n/a"] for p in head["per_seed"]]
    ranked = sorted([("as compared above", head), *out["variants"].items()], key=_rank)
    affordable = [(k, v) for k, v in ranked if v["trial_epochs_median"] <= fifo_epochs / 2]
    winner, best = (affordable or ranked)[0]
    wall_record = out["record_s"] / 2  # two shards of one thread each
    parts = [
        common.run_header(load_at_start),
        f"**How the curves were obtained.** Stage 1 (record): every cell of a finite grid, lr x augment_strength x "
        f"imbalance = {len(out['grid']['lr'])} x {len(out['grid']['augment_strength'])} x "
        f"{len(out['grid']['imbalance'])} = {out['grid']['cells']} configurations (lr {out['grid']['lr']}, "
        f"augment_strength {out['grid']['augment_strength']}, imbalance {', '.join(IMBALANCE)}), was trained once "
        f"for {MAX_EPOCHS} epochs by hamtune's fit: {out['model']}, {d['image_size']} px, head 128, AdamW, "
        f"weight_decay 1e-4, batch 64, 1 warm-up epoch then cosine, training seed 0, one torch thread. Data: "
        f"{d['source']}, {d['split']}; training on a fixed, lesion-grouped subsample, {d['subsample']} "
        f"({d['train_images']} images of {d['train_lesions']} lesions: "
        f"{', '.join(f'{k} {v}' for k, v in d['train_per_class'].items())}), validation on the whole val split "
        f"({d['val_images']} images). Every recorded curve is one real run (the cells took "
        f"{out['record_s'] / 60:.0f} min in all, about {wall_record / 60:.0f} min of wall time in two processes of "
        f"one thread each: `--stage record --shard 0/2` and `--shard 1/2`). These are from-scratch curves: "
        "recording the pretrained recipe's (EfficientNet-Lite2 at 112 px, about 5 min per epoch here) for 48 cells "
        "would take about 30 hours of this machine, so the study runs on these and says so. "
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
        f"({n}). Settings shared by the methods where they apply: {_fmt_settings(out['base'])}. The grid's best "
        f"cell scores {out['grid_best']:.3f}; \"at the grid's best\": the search's best val balanced accuracy is "
        f"within {TOLERANCE} of it. random+FIFO spends {budget} trial-epochs by construction. \"Fraction\": "
        f"trial-epochs, in report order, until the best so far came within {TOLERANCE} of random+FIFO's final "
        f"best on the same seed, over random+FIFO's trial-epochs (median over seeds; a seed that never got there "
        "counts as infinite). \"Missed a choice\": searches in which some imbalance strategy got no trial.\n",
        common.md_table(["method", "at the grid's best (seeds)", f"within {LOOSE_TOLERANCE}", "final best, median", "trial-epochs, median",
                         "fraction to reach random+FIFO's best, median", "seeds within 1/3 (at all)",
                         "missed a choice"], [row(k, v) for k, v in m.items()]),
        f"**Goals.** TPE+ASHA at the grid's best on at least {int(0.9 * n)} of {n} seeds, spending at most half of "
        f"random+FIFO's trial-epochs ({fifo_epochs / 2:.0f}): {head['at_grid_best']} of {n} at "
        f"{head['trial_epochs_median']:.0f} (median; random+FIFO's own rate: {m['random+FIFO']['at_grid_best']} "
        f"of {n}): **{'met' if consistent else 'MISSED'}**. Fraction to reach random+FIFO's best, median over {n} "
        f"seeds, at most 1/3: {_fmt_fraction(head)}: **{'met' if third else 'MISSED'}**. Anytime curves: "
        "`bench/search_payoff.png`. Raw figures: `bench/search_payoff.json`.\n",
        why_missed(out),
        "TPE+ASHA per seed:\n",
        common.md_table(["seed", "best", "at the grid's best", "trial-epochs", "ran all epochs",
                         "grid cells visited", "choices never tried", "to reach", "fraction"], per_seed),
        "**TPE+ASHA settings tried in replay** (each one change from the settings above; same seeds, same "
        "random+FIFO reference):\n",
        common.md_table(["variant", "settings", "at the grid's best (seeds)", f"within {LOOSE_TOLERANCE}",
                         "final best, median",
                         "trial-epochs, median", "fraction, median", "seeds within 1/3 (at all)",
                         "missed a choice"],
                        [row("as compared above", head, True)]
                        + [row(k, v, True) for k, v in out["variants"].items()]),
        (f"Chosen by this replay (most seeds at the grid's best, then fewest trial-epochs, among settings that "
         f"spend at most half of random+FIFO's): **{winner}** ({_fmt_settings(best['settings'])}): "
         f"{best['at_grid_best']} of {n} seeds at the grid's best, {best['trial_epochs_median']:.0f} trial-epochs "
         f"(median).\n" if out["variants"] else ""),
        ("Sizing search_spaces/default.yaml (10 trials of at most 8 epochs: 80 trial-epochs without ASHA), TPE+ASHA "
         f"over the same {n} seeds: "
         + "; ".join(f"{k}: {v['trial_epochs_median']:.0f} trial-epochs (median), at the grid's best on "
                     f"{v['at_grid_best']} of {n}, best {v['best_median']:.3f} (median), missed a choice on "
                     f"{v['missed_a_choice']}" for k, v in out["sizing"].items()) + ".\n"
         if out.get("sizing") else ""),
        (f"How early a rung can judge: Spearman rank correlation, over the {out['grid']['cells']} cells, between "
         f"the val balanced accuracy at epoch e and the cell's best over {MAX_EPOCHS} epochs: "
         + ", ".join(f"epoch {e + 1}: {r:.2f}" for e, r in enumerate(out["rank_correlation"])) + ".\n"
         if out.get("rank_correlation") else ""),
        "The three best cells of the grid (the ceiling any method can reach): "
        + "; ".join(f"lr {c['lr']:g}, augment {c['augment_strength']:g}, {c['imbalance']}: {c['best']:.3f}"
                    for c in out["best_cells"]) + ".\n",
        "Caveats: (1) snapping makes every config in a grid cell the same run, so TPE re-sampling a good cell costs "
        "trial-epochs but finds nothing new, while a real search would see small differences inside the cell; (2) "
        "\"best\" is the maximum over every epoch of every trial on one validation split (1,500 images, 17 df), "
        "so a method that evaluates more epochs gets more draws of the noise, which favours FIFO; (3) it is one "
        "training seed per cell: the curves are real, the seed-to-seed spread of one configuration is not in them; "
        "(4) the seeds are search seeds over one recording, so \"at the grid's best on k of 20\" measures the "
        "search, not the training noise.\n",
        f"Time: recording {wall_record / 60:.0f} min (two shards; the fastest cell took "
        f"{out.get('record_min_s', 0):.0f} s), replay {out['replay_s'] / 60:.1f} min (`make bench-payoff`; the "
        "recording resumes from bench/out/payoff/curves/ and the replay from bench/out/payoff/replays/).\n",
    ]
    text = "\n\n".join(part.strip("\n") for part in parts if part)
    return text.replace("(part of `make bench`)", "(`make bench-payoff`)") + "\n"


# ---------------------------------------------------------------------------------------------------------------
# Command line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=("record", "noise", "replay", "all", "report"), default="all",
                        help="report: rewrite the BENCHMARKS.md section from bench/search_payoff.json")
    parser.add_argument("--max-configs", type=int, default=None, help="record at most this many new curves")
    parser.add_argument("--deadline", default=None, help="stop recording new curves after this UTC time (HH:MM)")
    parser.add_argument("--shard", default="0/1", help="K/N: record every N-th cell from the K-th (N processes)")
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
        record(args.max_configs, deadline, (k, n))
    if args.stage in ("noise", "all"):
        record_noise()
    if args.stage in ("replay", "all"):
        global LR_CELLS
        LR_CELLS = args.lr_cells
        replay_main(args)
    if args.stage == "report":
        report_main(args)


if __name__ == "__main__":
    main()
