"""What a search paid and what it learned: trial-epochs saved by early stopping, hyperparameter importance, and the
finished trials of an earlier search turned into points a new searcher starts from (warm start).

Everything here is computed from an experiment's own tables (trials.parquet, history.parquet) and its
experiment.json; nothing talks to Ray.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from hamtune.errors import HamtuneError
from hamtune.io import plain, save_figure

ENDED = ("completed", "stopped")  # trials that ran to their end: all epochs, or until ASHA cut them
MIN_IMPORTANCE_TRIALS = 5  # fANOVA's forest needs a handful of points before its split shares mean anything
IMPORTANCE_FILE = "importance.png"


# ---------------------------------------------------------------------------------------------------------------
# Savings


@dataclass
class Payoff:
    """The compute a search spent against running every trial to max epochs, from the trials table."""

    by_status: dict[str, int]
    trials: int
    max_epochs: int
    trial_epochs: int  # epochs the trials actually ran
    full_trial_epochs: int  # every trial run to max_epochs
    wall_time_s: float | None
    epoch_time_s: float | None  # mean measured time of one trial-epoch (train + validation)
    max_concurrent: int
    cut_at: dict[int, int] = field(default_factory=dict)  # epoch -> stopped trials cut there

    @property
    def saved_fraction(self) -> float:
        return 1 - self.trial_epochs / self.full_trial_epochs if self.full_trial_epochs else 0.0

    @property
    def full_wall_time_s(self) -> float | None:
        """Wall time had every trial run to max_epochs: the real wall time plus the epochs not run, at the measured
        mean epoch time, spread over the concurrent trials (an estimate)."""
        if self.wall_time_s is None or self.epoch_time_s is None:
            return None
        skipped = self.full_trial_epochs - self.trial_epochs
        return self.wall_time_s + skipped * self.epoch_time_s / max(1, self.max_concurrent)

    def to_dict(self) -> dict[str, Any]:
        return {"by_status": self.by_status, "trials": self.trials, "max_epochs": self.max_epochs,
                "trial_epochs": self.trial_epochs, "full_trial_epochs": self.full_trial_epochs,
                "saved_fraction": round(self.saved_fraction, 4), "wall_time_s": self.wall_time_s,
                "full_wall_time_s_estimate": None if self.full_wall_time_s is None else round(self.full_wall_time_s, 1),
                "cut_at_epoch": {str(k): v for k, v in self.cut_at.items()}}


def compute_payoff(trials: pd.DataFrame, history: pd.DataFrame, record: Mapping[str, Any]) -> Payoff:
    max_epochs = int(record.get("max_epochs") or record.get("spec", {}).get("train", {}).get("epochs", 1))
    epochs = trials["epochs"].fillna(0).astype(int) if "epochs" in trials.columns else pd.Series(dtype=int)
    stopped = epochs[trials["status"] == "stopped"] if "status" in trials.columns else epochs.iloc[:0]
    epoch_time = None
    if "epoch_time_s" in history.columns and history["epoch_time_s"].notna().any():
        epoch_time = float(history["epoch_time_s"].dropna().mean())
    wall = record.get("wall_time_s")
    return Payoff(
        by_status={str(k): int(v) for k, v in trials["status"].value_counts().items()},
        trials=len(trials), max_epochs=max_epochs, trial_epochs=int(epochs.sum()),
        full_trial_epochs=len(trials) * max_epochs, wall_time_s=None if wall is None else float(wall),
        epoch_time_s=epoch_time, max_concurrent=int(record.get("spec", {}).get("search", {}).get("max_concurrent", 1)),
        cut_at={int(k): int(v) for k, v in sorted(stopped.value_counts().items())})


def describe_payoff(p: Payoff) -> list[str]:
    """A few lines for the end of a search and for `hamtune results NAME`."""
    order = ["completed", "stopped", "non_finite", "error", "running", "pending", "interrupted"]
    statuses = sorted(p.by_status, key=lambda s: order.index(s) if s in order else len(order))
    words = {"stopped": "stopped early by ASHA", "completed": f"ran all {p.max_epochs} epochs"}
    lines = [f"trials: {p.trials} ({', '.join(f'{p.by_status[s]} {words.get(s, s)}' for s in statuses)})"]
    lines.append(f"trial-epochs: {p.trial_epochs} spent of {p.full_trial_epochs} had every trial run all "
                 f"{p.max_epochs} epochs ({p.saved_fraction:.0%} saved)")
    if p.wall_time_s is not None:
        full = p.full_wall_time_s
        lines.append(f"wall time: {p.wall_time_s:.0f} s" + (
            f"; about {full:.0f} s had every trial run all epochs (estimated from the mean epoch time, "
            f"{p.epoch_time_s:.1f} s, {p.max_concurrent} at a time)" if full is not None else ""))
    if p.cut_at:
        lines.append("stopped trials were cut at " + ", ".join(
            f"epoch {e} ({n} trial{'s' if n != 1 else ''})" for e, n in p.cut_at.items()))
    elif p.by_status.get("completed", 0) == p.trials:
        lines.append("no trial was stopped early")
    return lines


# ---------------------------------------------------------------------------------------------------------------
# The spec's space as Optuna distributions (importance and warm start both need it)


def optuna_distributions(space: Mapping[str, Any]) -> dict[str, Any]:
    """Optuna distributions for the searched keys of a spec's space (fixed values are left out)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out = {}
    for key, value in space.items():
        if not isinstance(value, Mapping):
            continue
        (dist, args), = value.items()
        if dist == "choice":
            out[key] = CategoricalDistribution(list(args))
        elif dist == "randint":
            out[key] = IntDistribution(int(args[0]), int(args[1]) - 1)
        else:
            out[key] = FloatDistribution(float(args[0]), float(args[1]), log=dist in ("loguniform", "qloguniform"))
    return out


def check_in_space(key: str, value: Any, spec_value: Any, where: str) -> Any:
    """The value as the new space's distribution holds it, or one HamtuneError line naming the key."""
    if not isinstance(spec_value, Mapping):
        if plain(value) != spec_value:
            raise HamtuneError(f"{where}: {key}={plain(value)!r} is outside the new space, which fixes {key} at "
                               f"{spec_value!r}")
        return spec_value
    (dist, args), = spec_value.items()
    v = plain(value)
    if dist == "choice":
        if v not in list(args):
            raise HamtuneError(f"{where}: {key}={v!r} is outside the new space (expected one of {list(args)})")
        return v
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    low, high = args[0], args[1]
    if dist == "randint":
        ok = ok and float(v).is_integer() and low <= v < high
        expected = f"an integer in [{low}, {high})"
    else:
        ok = ok and low <= v <= high
        expected = f"a number in [{low}, {high}]"
    if not ok:
        raise HamtuneError(f"{where}: {key}={v!r} is outside the new space (expected {expected})")
    return int(v) if dist == "randint" else float(v)


# ---------------------------------------------------------------------------------------------------------------
# Importance (Optuna's fANOVA on a study rebuilt from the trials table)


def param_importance(trials: pd.DataFrame, record: Mapping[str, Any]) -> tuple[dict[str, float] | None, str]:
    """Importance of each searched hyperparameter for the experiment's metric, and a line saying what it used.

    Every trial that ran to its end (all epochs, or until ASHA stopped it) counts with its best value: ASHA stopped
    the ones it stopped for being worse than their peers at the same epoch, so their best is a fair low score.
    Returns (None, reason) when there are too few such trials.
    """
    import optuna
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances

    metric, mode = record["metric"], record.get("mode", "max")
    space = record.get("spec", {}).get("space", {})
    distributions = optuna_distributions(space)
    if not distributions:
        return None, "importance: this experiment searched no hyperparameter (its space holds fixed values only)"
    col = f"best_{metric}"
    ended = trials[trials["status"].isin(ENDED)] if "status" in trials.columns else trials.iloc[:0]
    if col in ended.columns:
        ended = ended[ended[col].notna() & np.isfinite(ended[col].astype(float))]
    else:
        ended = ended.iloc[:0]
    if len(ended) < MIN_IMPORTANCE_TRIALS:
        return None, (f"importance: too few finished trials ({len(ended)} ran to their end with a finite {metric}; "
                      f"fANOVA needs at least {MIN_IMPORTANCE_TRIALS}): run a longer search")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize" if mode == "max" else "minimize")
    for row in ended.to_dict("records"):
        params = {key: plain(row[f"config.{key}"]) for key in distributions}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions, value=float(row[col])))
    scores = get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0), normalize=True)
    found = {k: float(v) for k, v in scores.items()}
    for key in distributions:  # a parameter with one value in every trial has no variance to explain
        found.setdefault(key, 0.0)
    return found, (f"importance of each hyperparameter for {metric} (Optuna's fANOVA over {len(ended)} trials that "
                   f"ran to their end, all epochs or until ASHA cut them, each with its best value; shares sum to 1)")


def plot_importance(importance: Mapping[str, float], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = sorted(importance.items(), key=lambda kv: kv[1])
    fig, ax = plt.subplots(figsize=(6, 0.5 * len(items) + 1.2))
    ax.barh([k for k, _ in items], [v for _, v in items], color="tab:blue")
    for i, (_, v) in enumerate(items):
        ax.text(v, i, f" {v:.2f}", va="center", fontsize=8)
    ax.set_xlabel("share of the metric's variance (fANOVA)")
    ax.set_xlim(0, max(1.0, max(v for _, v in items) * 1.15))
    ax.set_title(title, fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    written = save_figure(fig, path, tight=True)
    plt.close(fig)
    return written


def describe_importance(importance: Mapping[str, float]) -> list[str]:
    width = max(len(k) for k in importance)
    return [f"  {k:<{width}}  {v:.3f}" for k, v in sorted(importance.items(), key=lambda kv: -kv[1])]


# ---------------------------------------------------------------------------------------------------------------
# Warm start


@dataclass
class WarmPoint:
    """One finished trial of an earlier experiment, as Tune's OptunaSearch.add_evaluated_point takes it."""

    params: dict[str, Any]
    value: float
    pruned: bool
    intermediate_values: list[float]


def warm_start_points(exp_dir: Path, record: Mapping[str, Any], spec) -> list[WarmPoint]:
    """The earlier experiment's finished trials, checked against the new spec's space.

    Completed trials come in with their last value (what Tune tells Optuna at a trial's end), ASHA-stopped ones as
    pruned with their per-epoch values; non-finite, errored and unfinished trials are left out. A searched key the
    earlier experiment did not search takes the value it was fixed at there.
    """
    from hamtune.config import TrainConfig
    from hamtune.results import load_tables

    if spec.search.searcher != "optuna":
        raise HamtuneError(f"--warm-start needs search.searcher: optuna (this spec has '{spec.search.searcher}': "
                           "random search cannot learn from earlier results)")
    if record.get("metric") != spec.search.metric or record.get("mode") != spec.search.mode:
        raise HamtuneError(f"--warm-start {exp_dir.name}: it optimised {record.get('metric')} ({record.get('mode')}), "
                           f"this spec {spec.search.metric} ({spec.search.mode}); expected the same metric and mode")
    trials, history = load_tables(exp_dir)
    metric = spec.search.metric
    old_spec = record.get("spec", {})
    old_fixed = {**TrainConfig().to_dict(), **old_spec.get("train", {}),
                 **{k: v for k, v in old_spec.get("space", {}).items() if not isinstance(v, Mapping)}}
    searched = spec.searched_keys()
    points = []
    ended = trials[trials["status"].isin(ENDED)]
    for row in ended.to_dict("records"):
        last = row.get(f"last_{metric}")
        if last is None or not math.isfinite(float(last)):
            continue
        params = {}
        where = f"--warm-start {exp_dir.name}, trial {row['trial_id']}"
        for key in searched:
            value = row.get(f"config.{key}", old_fixed.get(key))
            if value is None or (isinstance(value, float) and math.isnan(value)):
                value = old_fixed.get(key)
            params[key] = check_in_space(key, value, spec.space[key], where)
        for key, fixed in spec.space.items():
            if key not in searched and f"config.{key}" in row:
                check_in_space(key, row[f"config.{key}"], fixed, where)
        steps = history[history["trial_id"] == row["trial_id"]].sort_values("epoch")[metric].astype(float)
        points.append(WarmPoint(params=params, value=float(last), pruned=row["status"] == "stopped",
                                intermediate_values=[float(v) for v in steps]))
    if not points:
        raise HamtuneError(f"--warm-start {exp_dir.name}: no finished trial with a finite {metric} to start from")
    return points
