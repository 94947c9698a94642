"""A search's figures: every trial's validation curve, the metric against each searched hyperparameter, and the
hyperparameters' importance; drawn from the tables the search wrote."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

from hamtune.io import save_figure
from hamtune.reports.plots import figure
from hamtune.vocab import COMPLETED, STOPPED


def write_search_plots(path: Path, trials: pd.DataFrame, history: pd.DataFrame, *, metric: str,
                       params: list[str]) -> list[Path]:
    """Every trial's validation curve over epochs (ASHA's stops show as short curves) and metric vs each param."""
    written: list[Path] = []
    if history.empty or metric not in history.columns:
        return written
    fig = figure((7, 4.5))
    ax = fig.subplots()
    best_id = None
    col = f"best_{metric}"
    if col in trials.columns and trials[col].notna().any():
        best_id = trials.loc[trials[col].idxmax(), "trial_id"]
    for trial_id, h in history.groupby("trial_id"):
        is_best = trial_id == best_id
        ax.plot(h["epoch"], h[metric], marker="o", ms=3, lw=2.2 if is_best else 1, alpha=1 if is_best else 0.6,
                label=f"{trial_id} (best)" if is_best else None, zorder=3 if is_best else 2)
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per trial (short curves: stopped early)")
    ax.grid(alpha=0.3)
    if best_id is not None:
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    written.append(save_figure(fig, path / "curves.png"))

    params = [p for p in params if f"config.{p}" in trials.columns]
    if params and col in trials.columns:
        n = len(params)
        fig = figure((3.6 * n, 3.4))
        axes = fig.subplots(1, n, squeeze=False)
        for ax, p in zip(axes[0], params):
            x = trials[f"config.{p}"]
            y = trials[col]
            status = trials["status"]
            colors = status.map({COMPLETED: "tab:blue", STOPPED: "tab:orange"}).fillna("tab:red")
            if pd.api.types.is_numeric_dtype(x) and not pd.api.types.is_bool_dtype(x):
                ax.scatter(x, y, c=colors, s=25)
                if p in ("lr", "weight_decay") and (x > 0).all():
                    ax.set_xscale("log")
            else:
                cats = sorted(x.astype(str).unique())
                pos = x.astype(str).map({c: i for i, c in enumerate(cats)})
                ax.scatter(pos + np.random.default_rng(0).uniform(-0.15, 0.15, len(pos)), y, c=colors, s=25)
                ax.set_xticks(range(len(cats)), cats, rotation=30, ha="right", fontsize=8)
            ax.set_xlabel(p)
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel(col)
        fig.suptitle(f"{col} vs hyperparameters (blue: completed, orange: stopped by ASHA, red: failed)", fontsize=9)
        fig.tight_layout()
        written.append(save_figure(fig, path / "params.png"))
    return written


def plot_importance(importance: Mapping[str, float], path: Path, title: str) -> Path:
    """Each hyperparameter's share of the metric's variance (hamtune.search.importance), as horizontal bars."""
    items = sorted(importance.items(), key=lambda kv: kv[1])
    fig = figure((6, 0.5 * len(items) + 1.2))
    ax = fig.subplots()
    ax.barh([k for k, _ in items], [v for _, v in items], color="tab:blue")
    for i, (_, v) in enumerate(items):
        ax.text(v, i, f" {v:.2f}", va="center", fontsize=8)
    ax.set_xlabel("share of the metric's variance (fANOVA)")
    ax.set_xlim(0, max(1.0, max(v for _, v in items) * 1.15))
    ax.set_title(title, fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    return save_figure(fig, path, tight=True)
