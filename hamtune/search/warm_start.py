"""Warm start: an earlier experiment's finished trials, checked against a new spec's space, as points the new
searcher knows before its first suggestion (PruningAwareOptunaSearch adds them to its Optuna study).

Read from the earlier experiment's own tables; nothing here imports Ray or Optuna, so a bad --warm-start is refused
before Ray starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from hamtune.errors import HamtuneError
from hamtune.io import plain
from hamtune.search.spec import SearchSpec
from hamtune.search.tables import load_tables
from hamtune.training.config import TrainConfig
from hamtune.vocab import RAN_TO_END, STOPPED


@dataclass
class WarmPoint:
    """One finished trial of an earlier experiment, as Tune's OptunaSearch.add_evaluated_point takes it."""

    params: dict[str, Any]
    value: float
    pruned: bool
    intermediate_values: list[float]


def warm_start_points(exp_dir: Path, record: Mapping[str, Any], spec: SearchSpec) -> list[WarmPoint]:
    """The earlier experiment's finished trials, checked against the new spec's space.

    Completed trials come in with their last value (what Tune tells Optuna at a trial's end), ASHA-stopped ones as
    pruned with their per-epoch values; non-finite, errored and unfinished trials are left out. A searched key the
    earlier experiment did not search takes the value it was fixed at there.
    """
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
    dists = spec.distributions()
    points = []
    for row in trials[trials["status"].isin(RAN_TO_END)].to_dict("records"):
        last = row.get(f"last_{metric}")
        if last is None or not math.isfinite(float(last)):
            continue
        params = {}
        where = f"--warm-start {exp_dir.name}, trial {row['trial_id']}"
        for key, dist in dists.items():
            value = row.get(f"config.{key}", old_fixed.get(key))
            if value is None or (isinstance(value, float) and math.isnan(value)):
                value = old_fixed.get(key)
            params[key] = dist.contains(key, value, where)
        for key, fixed in spec.space.items():
            if key not in dists and f"config.{key}" in row:
                _check_fixed(key, row[f"config.{key}"], fixed, where)
        steps = history[history["trial_id"] == row["trial_id"]].sort_values("epoch")[metric].astype(float)
        points.append(WarmPoint(params=params, value=float(last), pruned=row["status"] == STOPPED,
                                intermediate_values=[float(v) for v in steps]))
    if not points:
        raise HamtuneError(f"--warm-start {exp_dir.name}: no finished trial with a finite {metric} to start from")
    return points


def _check_fixed(key: str, value: Any, fixed: Any, where: str) -> None:
    if plain(value) != fixed:
        raise HamtuneError(f"{where}: {key}={plain(value)!r} is outside the new space, which fixes {key} at {fixed!r}")

