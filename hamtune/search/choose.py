"""Choosing the best trial of a finished (or interrupted) search, and describing it.

Model selection reads only the validation scores in the trials and history tables: test results are never in them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hamtune.errors import HamtuneError
from hamtune.io import plain
from hamtune.search import tables as res
from hamtune.vocab import RAN_TO_END


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
    return choose_top(exp_dir, 1, metric=metric, mode=mode)[0]


def choose_top(exp_dir: Path, k: int, *, metric: str | None = None, mode: str | None = None) -> list[BestChoice]:
    """The k trials with the best values of `metric`, best first (ties: the earlier trial), among completed and
    stopped trials; fewer when fewer qualify."""
    if k < 1:
        raise HamtuneError(f"--top {k}: expected a number of trials >= 1")
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
    res.best_trial(trials, metric=metric, mode=mode)  # the one-line error when no trial qualifies
    ok = trials[trials["status"].isin(RAN_TO_END) & trials[f"best_{metric}"].notna()]
    ranked = ok.sort_values(f"best_{metric}", ascending=mode == "min", kind="stable")  # stable: ties as best_trial
    choices = []
    for _, trial in ranked.head(k).iterrows():
        searched = {c.removeprefix("config."): plain(v) for c, v in trial.items()
                    if c.startswith("config.") and not _is_missing(v)}
        config = {**record["spec"].get("train", {}), **searched}
        choices.append(BestChoice(exp_dir=exp_dir, record=record, trial=trial, metric=metric, mode=mode,
                                  best_epoch=_peak_epoch(trial, history, metric, mode, record), searched=searched,
                                  config=config, n_trials=len(trials)))
    return choices


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


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, (float, np.floating)) and math.isnan(value))


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
