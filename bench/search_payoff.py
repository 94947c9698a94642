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


def record(max_configs: int | None = None, deadline: float | None = None) -> dict:
    import torch

    from hamtune.io import atomic_write_json
    from hamtune.training.config import TrainConfig
    from hamtune.training.loop import fit

    torch.set_num_threads(1)
    train, val, info = load_data()
    CURVES.mkdir(parents=True, exist_ok=True)
    atomic_write_json(OUT / "data.json", info)
    todo = [c for c in grid_configs() if not curve_path(c, info["fingerprint"]).is_file()]
    print(f"record: {len(grid_configs()) - len(todo)} of {len(grid_configs())} curves already recorded; "
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


def load_curves(data_key: str) -> dict[tuple, dict]:
    curves = {}
    for config in grid_configs():
        path = curve_path(config, data_key)
        if path.is_file():
            curves[(config["lr"], config["augment_strength"], config["imbalance"])] = json.loads(path.read_text())
    return curves


# ---------------------------------------------------------------------------------------------------------------
# Stage 2: replay through the real Tune searchers and schedulers

TRIALS = 24
SEEDS = [0, 1, 2, 3, 4]
MAX_CONCURRENT = 2  # as search_spaces/default.yaml
TIME_SCALE = 0.003  # a replayed epoch sleeps this fraction of its recorded time, so concurrent trials interleave
# The settings of the four-method comparison: search_spaces/default.yaml's before this study (Optuna 5's TPE
# defaults: multivariate, constant liar; start-up min(5, num_samples // 3) = 5 for 24 trials).
BASE = {"grace_period": 2, "reduction_factor": 2, "startup_trials": 5, "multivariate": True, "constant_liar": True}
METHODS = {
    "TPE+ASHA": {"searcher": "optuna", "scheduler": "asha"},
    "random+ASHA": {"searcher": "random", "scheduler": "asha"},
    "TPE+FIFO": {"searcher": "optuna", "scheduler": "fifo"},
    "random+FIFO": {"searcher": "random", "scheduler": "fifo"},
}
# TPE+ASHA variants tried in replay, each one change from BASE (a combination is added from the winners).
# search_spaces/default.yaml's size (10 trials of 8 epochs): the trial-epochs ASHA spends with each candidate.
SIZING = {"grace 2, reduction 2": {"grace_period": 2, "reduction_factor": 2},
          "grace 1, reduction 2": {"grace_period": 1, "reduction_factor": 2},
          "grace 2, reduction 3": {"grace_period": 2, "reduction_factor": 3},
          "grace 1, reduction 3": {"grace_period": 1, "reduction_factor": 3}}
VARIANTS = {
    "grace 1": {"grace_period": 1}, "grace 3": {"grace_period": 3},
    "reduction 3": {"reduction_factor": 3},
    "grace 1, reduction 3": {"grace_period": 1, "reduction_factor": 3},
    "start-up 3": {"startup_trials": 3}, "start-up 10": {"startup_trials": 10},
    "independent TPE": {"multivariate": False}, "no constant liar": {"constant_liar": False},
    "reduction 3, start-up 10": {"reduction_factor": 3, "startup_trials": 10},
}


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
    epochs = {}
    for r in order:
        epochs[r["trial"]] = max(epochs.get(r["trial"], 0), r["epoch"])
    return {"method": method, "seed": seed, "settings": {**settings}, "trials": len(epochs),
            "trial_epochs": len(order), "best": float(best_so_far[-1]) if len(order) else float("nan"),
            "best_so_far": [float(v) for v in best_so_far],
            "ran_all_epochs": sum(e >= MAX_EPOCHS for e in epochs.values()),
            "cells": len({r["cell"] for r in order}),
            "compute_s": float(sum(r["epoch_time_s"] for r in order)), "replay_wall_s": wall}


def epochs_to_reach(best_so_far: list[float], target: float) -> int | None:
    hit = np.flatnonzero(np.asarray(best_so_far) >= target - 1e-12)
    return int(hit[0]) + 1 if len(hit) else None


def summarise(runs: list[dict], baseline: dict[int, dict]) -> dict:
    """Median figures over seeds, and the headline: trial-epochs to come within TOLERANCE of random+FIFO's best."""
    per_seed, fractions = [], []
    for r in runs:
        ref = baseline[r["seed"]]
        needed = epochs_to_reach(r["best_so_far"], ref["best"] - TOLERANCE)
        fraction = needed / ref["trial_epochs"] if needed is not None else None
        per_seed.append({"seed": r["seed"], "best": round(r["best"], 4), "trial_epochs": r["trial_epochs"],
                         "trials": r["trials"], "ran_all_epochs": r["ran_all_epochs"], "cells": r["cells"],
                         "compute_s": round(r["compute_s"], 1), "replay_wall_s": round(r["replay_wall_s"], 1),
                         "to_reach": needed, "fraction": None if fraction is None else round(fraction, 4)})
        fractions.append(fraction if fraction is not None else math.inf)
    med = float(np.median(fractions))
    return {
        "settings": runs[0]["settings"],
        "final_best_median": round(float(np.median([r["best"] for r in runs])), 4),
        "trial_epochs_median": float(np.median([r["trial_epochs"] for r in runs])),
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
    load_at_start = common.load_average()
    init_ray(None, num_cpus=MAX_CONCURRENT)
    scratch = common.out_dir("payoff", "ray")
    started = time.monotonic()
    results: dict[str, list[dict]] = {}
    for method in METHODS:
        results[method] = [replay(method, seed, BASE, curves, scratch) for seed in args.seeds]
        print(f"{method}: best {[round(r['best'], 3) for r in results[method]]}, trial-epochs "
              f"{[r['trial_epochs'] for r in results[method]]}", flush=True)
    baseline = {r["seed"]: r for r in results["random+FIFO"]}
    methods = {m: summarise(runs, baseline) for m, runs in results.items()}
    recorded = list(by_cell.values())  # the cells of this replay's grid
    best_cells = sorted(recorded, key=lambda c: -max(h[METRIC] for h in c["history"]))[:3]
    out = {
        "data": info, "trials": TRIALS, "seeds": list(args.seeds), "max_epochs": MAX_EPOCHS,
        "max_concurrent": MAX_CONCURRENT, "tolerance": TOLERANCE, "model": FIXED_TRAIN["model"],
        "grid": {"lr": lr_grid(), "augment_strength": augment_grid(), "imbalance": IMBALANCE,
                 "cells": len(grid_configs()), "lr_range": list(lr_range())},
        "best_cells": [{**c["config"], "best": round(max(h[METRIC] for h in c["history"]), 4)} for c in best_cells],
        "methods": methods,
        "fraction_median": methods["TPE+ASHA"]["fraction_median"],
        "seeds_reached": methods["TPE+ASHA"]["seeds_reached"],
        "seeds_within_third": methods["TPE+ASHA"]["seeds_within_third"],
        "variants": {},
        "record_s": round(sum(c["wall_s"] for c in recorded), 1), "replay_s": None,
        "record_min_s": round(min(c["wall_s"] for c in recorded), 1),
        "rank_correlation": rank_correlation(recorded),
        "load_at_start": load_at_start,
        "runs": {m: [{k: v for k, v in r.items() if k != "best_so_far"} for r in runs] for m, runs in results.items()},
    }
    curves_out = {m: [r["best_so_far"] for r in runs] for m, runs in results.items()}

    def save() -> None:  # after the four methods and after every variant: a cut-short run keeps what it has
        out["replay_s"] = round(time.monotonic() - started, 1)
        atomic_write_json(OUT / "replay.json", {**out, "curves": curves_out})
        atomic_write_json(common.ROOT / "bench" / "search_payoff.json", out)

    save()
    plot(results, common.ROOT / "bench" / "search_payoff.png")
    if not args.no_variants:
        for name, change in VARIANTS.items():
            runs = [replay("TPE+ASHA", seed, {**BASE, **change}, curves, scratch) for seed in args.seeds]
            out["variants"][name] = summarise(runs, baseline)
            print(f"variant {name}: {out['variants'][name]['fraction_median']} on "
                  f"{out['variants'][name]['seeds_within_third']} seeds", flush=True)
            save()
        out["sizing"] = {}
        for name, change in SIZING.items():
            runs = [replay("TPE+ASHA", seed, {**BASE, **change, "num_samples": 10}, curves, scratch)
                    for seed in args.seeds]
            out["sizing"][name] = {"trial_epochs": [r["trial_epochs"] for r in runs],
                                   "stopped": [r["trials"] - r["ran_all_epochs"] for r in runs],
                                   "best": [round(r["best"], 4) for r in runs]}
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


def report_main(args) -> None:
    """Rewrite the BENCHMARKS.md section from the last replay's bench/search_payoff.json (no training, no Ray)."""
    out = json.loads((common.ROOT / "bench" / "search_payoff.json").read_text())
    common.publish(HEADING, section(out, out.get("load_at_start", "?")), dry_run=args.dry_run)


def section(out: dict, load_at_start: str) -> str:
    """The BENCHMARKS.md section: how the curves were obtained, the four methods, the headline, the variants."""
    d, m = out["data"], out["methods"]
    budget = TRIALS * MAX_EPOCHS
    rows = []
    for name, r in m.items():
        reached = r["seeds_reached"]
        rows.append([name, f"{r['final_best_median']:.3f}", ", ".join(f"{p['best']:.3f}" for p in r["per_seed"]),
                     f"{r['trial_epochs_median']:.0f}", f"{r['compute_s_median'] / 60:.1f}",
                     "n/a" if r["fraction_median"] is None else f"{r['fraction_median']:.2f}",
                     f"{r['seeds_within_third']} / {len(out['seeds'])} ({reached} at all)"])
    head = m["TPE+ASHA"]
    goal = (head["fraction_median"] is not None and head["fraction_median"] <= 1 / 3
            and head["seeds_reached"] >= 0.8 * len(out["seeds"]))  # 4 of 5
    strict = head["seeds_within_third"] >= 0.8 * len(out["seeds"])
    per_seed = [[p["seed"], p["best"], p["trial_epochs"], f"{p['ran_all_epochs']}/{p['trials']}", p["cells"],
                 p["to_reach"] if p["to_reach"] is not None else "not reached",
                 f"{p['fraction']:.2f}" if p["fraction"] is not None else "n/a"] for p in head["per_seed"]]
    variant_rows = [["TPE+ASHA as compared above", _fmt_settings(head["settings"]),
                     _fmt_fraction(head), f"{head['seeds_within_third']} ({head['seeds_reached']})",
                     f"{head['trial_epochs_median']:.0f}", f"{head['final_best_median']:.3f}"]]
    for name, r in out["variants"].items():
        variant_rows.append([name, _fmt_settings(r["settings"]), _fmt_fraction(r),
                             f"{r['seeds_within_third']} ({r['seeds_reached']})",
                             f"{r['trial_epochs_median']:.0f}", f"{r['final_best_median']:.3f}"])
    inner = out.get("inner_grid")
    quiet_record_s = out.get("record_min_s", out["record_s"] / out["grid"]["cells"]) * out["grid"]["cells"]
    scratch_min = (quiet_record_s + out["replay_s"]) / 60
    ranked = sorted([("TPE+ASHA as compared above", head), *out["variants"].items()], key=_rank)
    winner, best = ranked[0]
    parts = [
        common.run_header(load_at_start),
        f"**How the curves were obtained.** Stage 1 (record): every cell of a finite grid, lr x augment_strength x "
        f"imbalance = {len(out['grid']['lr'])} x {len(out['grid']['augment_strength'])} x "
        f"{len(out['grid']['imbalance'])} = {out['grid']['cells']} configurations (lr {out['grid']['lr']}, "
        f"augment_strength {out['grid']['augment_strength']}, imbalance {', '.join(IMBALANCE)}), was trained once "
        f"for {MAX_EPOCHS} epochs by hamtune.train.fit: {out['model']}, {d['image_size']} px, head 128, AdamW, "
        f"weight_decay 1e-4, batch 64, 1 warm-up epoch then cosine, training seed 0, one torch thread. Data: "
        f"{d['source']}, {d['split']}; training on a fixed, lesion-grouped subsample, {d['subsample']} "
        f"({d['train_images']} images of {d['train_lesions']} lesions: "
        f"{', '.join(f'{k} {v}' for k, v in d['train_per_class'].items())}), validation on the whole val split "
        f"({d['val_images']} images). Every recorded curve is one real run ({out['record_s'] / 60:.0f} min for "
        f"all {out['grid']['cells']}, on one core under `nice`, other jobs sharing the machine). "
        f"Stage 2 (replay): the real Ray Tune searchers and schedulers, built by hamtune.search.make_searcher / "
        f"make_scheduler from a hamtune spec (OptunaSearch is hamtune's PruningAwareOptunaSearch; random is Tune's "
        f"BasicVariantGenerator, as `searcher: random`), sample the product's own continuous space (lr "
        f"log-uniform {out['grid']['lr_range'][0]:.2g}-{out['grid']['lr_range'][1]:.2g}, augment_strength "
        f"uniform 0-1, imbalance a choice of 4); "
        f"a replay trainable snaps lr and augment_strength to the grid cell they fall in (equal-width bins on the "
        f"sampled scale: a third of a decade of lr, halves of augment_strength) and reports that cell's recorded "
        f"per-epoch metrics, sleeping {TIME_SCALE:g} x the recorded epoch time so that the {MAX_CONCURRENT} "
        f"concurrent trials interleave as they would. ASHA therefore stops a replayed trial at the same epoch, with "
        f"the same numbers, as it would stop the real run. Max epochs ({MAX_EPOCHS}) is fixed by the recording "
        f"(the cosine schedule depends on it), so it is not varied below.\n",
        f"Each method: the same space, {TRIALS} trials, at most {MAX_EPOCHS} epochs, {MAX_CONCURRENT} concurrent, "
        f"search seeds {', '.join(map(str, out['seeds']))}. Settings shared by both ASHA methods and both TPE "
        f"methods: {_fmt_settings(BASE)} (search_spaces/default.yaml before this study, with Optuna 5's TPE "
        f"defaults). random+FIFO spends {budget} trial-epochs by construction. \"To reach\": trial-epochs, in "
        f"report order, until the best-so-far came within {TOLERANCE} of random+FIFO's final best on the same "
        f"seed; \"fraction\": that / random+FIFO's trial-epochs (median over seeds, a seed that never got there "
        f"counts as infinite). Compute is the recorded training time of the epochs a method ran (one core).\n",
        common.md_table(["method", "final best, median", "per seed", "trial-epochs, median",
                         "compute (min), median", "fraction to reach random+FIFO's best, median",
                         "seeds reached within 1/3 (at all)"], rows),
        f"**Headline: TPE+ASHA came within {TOLERANCE} of random+FIFO's final best after "
        f"{_fmt_fraction(head)} of random+FIFO's trial-epochs (median over {len(out['seeds'])} seeds), within a "
        f"third on {head['seeds_within_third']} of {len(out['seeds'])} seeds, at all on {head['seeds_reached']}. "
        f"Goal (<= 1/3 median, reached on >= 4 of 5 seeds): {'met' if goal else 'MISSED'}"
        f"{'' if strict else '; read strictly (within a third on >= 4 of 5 seeds): missed'}.** "
        "Anytime curves: `bench/search_payoff.png`. Raw figures: `bench/search_payoff.json`.\n",
        "TPE+ASHA per seed:\n",
        common.md_table(["seed", "best", "trial-epochs", "ran all epochs", "grid cells visited", "to reach",
                         "fraction"], per_seed),
        "**TPE+ASHA settings tried in replay** (each one change from the settings above; same seeds, same "
        "random+FIFO reference):\n",
        common.md_table(["variant", "settings", "fraction, median", "seeds within 1/3 (at all)",
                         "trial-epochs, median", "final best, median"], variant_rows),
        (f"The same replay on the inner grid only (`--lr-cells 4`: lr {inner['lr_range'][0]:.2g}-"
         f"{inner['lr_range'][1]:.2g}, 32 cells, a separate run), fraction median and seeds within 1/3 (at all): "
         + "; ".join(f"{k} {_fmt_fraction(v)}, {v['seeds_within_third']} ({v['seeds_reached']})"
                     for k, v in inner["results"].items())
         + ". Both grids: multivariate beats independent TPE, reduction 3 beats 2, and grace 1 (alone or with "
         "reduction 3) never came within 0.01 on 2 or more of 5 seeds (the best cell is only middling after epoch "
         "1); the start-up count swaps places between grids: with 5 seeds, differences under ~0.1 are noise.\n"
         if inner else ""),
        ("Sizing the default (search_spaces/default.yaml runs 10 trials of at most 8 epochs): TPE+ASHA replayed "
         "here with 10 trials, trial-epochs spent of 80 and trials stopped early, per seed: "
         + "; ".join(f"{k}: {', '.join(map(str, v['trial_epochs']))} (median {np.median(v['trial_epochs']):.0f}; "
                     f"stopped {', '.join(map(str, v['stopped']))})" for k, v in out["sizing"].items()) + ".\n"
         if out.get("sizing") else ""),
        (f"How early a rung can judge: Spearman rank correlation, over the {out['grid']['cells']} cells, between "
         f"the val balanced accuracy at epoch e and the cell's best over {MAX_EPOCHS} epochs: "
         + ", ".join(f"epoch {e + 1}: {r:.2f}" for e, r in enumerate(out["rank_correlation"])) + ".\n"
         if out.get("rank_correlation") else ""),
        "The three best cells of the grid (the ceiling any method can reach): "
        + "; ".join(f"lr {c['lr']:g}, augment {c['augment_strength']:g}, {c['imbalance']}: {c['best']:.3f}"
                    for c in out["best_cells"]) + ".\n",
        (f"Best TPE+ASHA settings in replay: **{winner}** ({_fmt_settings(best['settings'])}): fraction "
         f"{_fmt_fraction(best)} median, within a third on {best['seeds_within_third']} of {len(out['seeds'])} "
         "seeds, "
         f"{best['trial_epochs_median']:.0f} trial-epochs (median), against {_fmt_fraction(head)} / "
         f"{head['seeds_within_third']} / {head['trial_epochs_median']:.0f} for the settings compared above. "
         "Ranked by "
         "the median fraction, then seeds reached, then trial-epochs spent.\n" if out["variants"] else ""),
        "Caveats: (1) snapping makes every config in a grid cell the same run, so TPE re-sampling a good cell costs "
        "trial-epochs but finds nothing new, while a real search would see small differences inside the cell; (2) "
        "\"best\" is the maximum over every epoch of every trial on one validation split (1,500 images, 17 df), "
        "so a method that evaluates more epochs gets more draws of the noise, which favours FIFO; (3) it is one "
        "training seed per cell: the curves are real, the seed-to-seed spread of one configuration is not in them.\n",
        f"Time: recording {out['record_s'] / 60:.0f} min here (one core under `nice`, sharing the machine with other "
        f"jobs; the fastest cell took {out.get('record_min_s', 0):.0f} s), replay {out['replay_s'] / 60:.1f} min; "
        f"from scratch alone on 2 cores about {scratch_min:.0f} min (every cell at the fastest cell's time, plus "
        f"the replay; `make bench-payoff`; the recording resumes from bench/out/payoff/curves/ if interrupted).\n",
    ]
    text = "\n\n".join(part.strip("\n") for part in parts if part)
    return text.replace("(part of `make bench`)", "(`make bench-payoff`)") + "\n"


def _rank(item: tuple[str, dict]) -> tuple:
    r = item[1]
    return (math.inf if r["fraction_median"] is None else r["fraction_median"], -r["seeds_within_third"],
            r["trial_epochs_median"])


def _fmt_settings(s: dict) -> str:
    return (f"grace {s['grace_period']}, reduction {s['reduction_factor']}, start-up {s['startup_trials']}, "
            f"{'multivariate' if s['multivariate'] else 'independent'} TPE, "
            f"constant liar {'on' if s['constant_liar'] else 'off'}")


def _fmt_fraction(r: dict) -> str:
    return "not reached" if r["fraction_median"] is None else f"{r['fraction_median']:.2f}"


# ---------------------------------------------------------------------------------------------------------------
# Command line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=("record", "replay", "all", "report"), default="all",
                        help="report: rewrite the BENCHMARKS.md section from bench/search_payoff.json")
    parser.add_argument("--max-configs", type=int, default=None, help="record at most this many new curves")
    parser.add_argument("--deadline", default=None, help="stop recording new curves after this UTC time (HH:MM)")
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
        record(args.max_configs, deadline)
    if args.stage in ("replay", "all"):
        global LR_CELLS
        LR_CELLS = args.lr_cells
        replay_main(args)
    if args.stage == "report":
        report_main(args)


if __name__ == "__main__":
    main()
