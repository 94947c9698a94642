"""What a search paid: trial-epochs and wall time spent against running every trial to its last epoch.

Computed from an experiment's own tables (trials.parquet, history.parquet) and its experiment.json; nothing here
talks to Ray.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import pandas as pd

from hamtune.vocab import COMPLETED, ERROR, INTERRUPTED, NON_FINITE, PENDING, RUNNING, STOPPED


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
    stopped = epochs[trials["status"] == STOPPED] if "status" in trials.columns else epochs.iloc[:0]
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
    order = [COMPLETED, STOPPED, NON_FINITE, ERROR, RUNNING, PENDING, INTERRUPTED]
    statuses = sorted(p.by_status, key=lambda s: order.index(s) if s in order else len(order))
    words = {STOPPED: "stopped early by ASHA", COMPLETED: f"ran all {p.max_epochs} epochs"}
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
    elif p.by_status.get(COMPLETED, 0) == p.trials:
        lines.append("no trial was stopped early")
    return lines
