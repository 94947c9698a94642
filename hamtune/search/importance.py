"""How much each searched hyperparameter mattered: Optuna's fANOVA over the trials that ran to their end.

Computed from an experiment's own trials table and record; the plot is hamtune.reports.search_plots'.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import pandas as pd

from hamtune.io import plain
from hamtune.search import space as space_form
from hamtune.vocab import RAN_TO_END

MIN_IMPORTANCE_TRIALS = 5  # fANOVA's forest needs a handful of points before its split shares mean anything


def optuna_distributions(space: Mapping[str, Any]) -> dict[str, Any]:
    """Optuna distributions for the searched keys of a spec's space (fixed values are left out)."""
    return {key: dist.to_optuna() for key, dist in space_form.searched(space).items()}


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
    ended = trials[trials["status"].isin(RAN_TO_END)] if "status" in trials.columns else trials.iloc[:0]
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


def describe_importance(importance: Mapping[str, float]) -> list[str]:
    width = max(len(k) for k in importance)
    return [f"  {k:<{width}}  {v:.3f}" for k, v in sorted(importance.items(), key=lambda kv: -kv[1])]
