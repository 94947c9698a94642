"""The driver's Tune callback: keeps results/<experiment>/ tables current while trials run, prints a trial's input
error as one line, and bounds the checkpoints' disk as trials end (hamtune.search.checkpoints)."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import pandas as pd
from ray import tune
from ray.tune.result import AUTO_RESULT_KEYS, DONE, EXPERIMENT_TAG, SHOULD_CHECKPOINT, TRIAL_ID

from hamtune.io import atomic_write_table
from hamtune.search import checkpoints
from hamtune.search import tables as res
from hamtune.search.spec import SearchSpec
from hamtune.vocab import ERROR

# What Tune adds to every report; the history keeps the metrics, the epoch clock and hamtune's own keys (but not
# an input error's traceback: that stays in Tune's result.json of the trial).
TUNE_KEYS = frozenset(AUTO_RESULT_KEYS) | {DONE, TRIAL_ID, EXPERIMENT_TAG, SHOULD_CHECKPOINT, "traceback"}
log = logging.getLogger("hamtune")


class ResultsTablesCallback(tune.Callback):
    """Tables rewritten atomically as trials report (at most every min_interval_s), end, and at the end."""

    def __init__(self, exp_dir: Path, spec: SearchSpec, tune_path: str, min_interval_s: float = 10.0):
        self.exp_dir, self.spec, self.min_interval_s = exp_dir.resolve(), spec, min_interval_s
        self.tune_path = tune_path
        self.history: list[dict] = []
        self.wall: dict[str, float] = {}
        self.ended: set[str] = set()
        self._last_write = 0.0

    def setup(self, **info):
        """Runs at the start and again on resume (Tune restores this object from its own pickle)."""
        previous = self.exp_dir / "history.parquet"
        self.history = pd.read_parquet(previous).to_dict("records") if previous.is_file() else []
        self.ended = set()  # trials that Tune completed (ran out, stopped by ASHA, non-finite, input error)
        trials = self.exp_dir / "trials.parquet"
        if trials.is_file():
            t = pd.read_parquet(trials)
            self.wall = {r.trial_id: float(r.wall_time_s or 0) for r in t.itertuples()}
            self.ended = set(t.loc[res.ended_for_good(t), "trial_id"])

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.history.append({"trial_id": trial.trial_id, **res.metric_values(result, drop=TUNE_KEYS)})
        if result.get("trial_status") == ERROR:
            print(f"hamtune: trial {trial.trial_id}: error: {result.get('message')}", file=sys.stderr, flush=True)
        self.wall[trial.trial_id] = float(result.get("time_total_s", 0.0))
        if time.monotonic() - self._last_write > self.min_interval_s:
            self.write(trials)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.ended.add(trial.trial_id)
        table = self.write(trials)
        try:
            checkpoints.prune(self.tune_path, {t.trial_id: t.path for t in trials}, table, ended=self.ended,
                              metric=self.spec.search.metric, mode=self.spec.search.mode,
                              keep=self.spec.search.keep_best_checkpoints)
        except Exception as exc:  # disk bookkeeping must never end the search; the driver prunes again at the end
            log.warning("could not prune checkpoints: %s", exc)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.write(trials)

    def on_experiment_end(self, trials, **info):
        self.write(trials)

    def _status(self, trial) -> str:
        # on_trial_complete runs while Tune still says RUNNING (or PAUSED: OrderedASHA stops a trial that waited at a
        # rung); and Tune also marks trials TERMINATED when a Ctrl-C ends the experiment, though those are
        # interrupted, not done.
        if trial.trial_id in self.ended and trial.status in ("RUNNING", "TERMINATED", "PAUSED"):
            return "TERMINATED"
        return "INTERRUPTED" if trial.status == "TERMINATED" else trial.status

    def write(self, trials):
        table = write_tables(self.exp_dir, self.spec, self.history, [
            {"trial_id": t.trial_id, "trial_index": i, "config": t.config, "tune_status": self._status(t),
             "wall_time_s": self.wall.get(t.trial_id)} for i, t in enumerate(trials)])
        self._last_write = time.monotonic()
        return table


def write_tables(exp_dir: Path, spec: SearchSpec, history_rows: list[dict], trial_rows: list[dict]):
    history = res.history_table(history_rows)
    trials = res.trials_table(trial_rows, history, metric=spec.search.metric, mode=spec.search.mode,
                              max_epochs=spec.max_epochs)
    atomic_write_table(history, exp_dir / "history.parquet")
    atomic_write_table(trials, exp_dir / "trials.parquet")
    return trials
