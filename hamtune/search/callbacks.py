"""The driver's Tune callback: keeps results/<experiment>/ tables current while trials run, prints a trial's input
error as one line, and bounds the checkpoints' disk as trials end (hamtune.search.checkpoints)."""

from __future__ import annotations

import json
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
    """Tables rewritten atomically as trials report, end, and at the end. Every report is written at once (at most
    every min_interval_s, 0 by default): Tune keeps a trial's checkpoint of an epoch, so a table that lagged behind
    it would lose that epoch's row for good when the driver is killed and the trial resumes after it."""

    def __init__(self, exp_dir: Path, spec: SearchSpec, tune_path: str, min_interval_s: float = 0.0):
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
        known = {(row["trial_id"], int(row["epoch"])) for row in self.history}
        # a report the driver's last write missed (killed between Tune's flush and ours) is in Tune's result.json
        self.history += [row for row in self._tune_reports() if (row["trial_id"], row["epoch"]) not in known]
        self.ended = set()  # trials that Tune completed (ran out, stopped by ASHA, non-finite, input error)
        trials = self.exp_dir / "trials.parquet"
        if trials.is_file():
            t = pd.read_parquet(trials)
            self.wall = {r.trial_id: float(r.wall_time_s or 0) for r in t.itertuples()}
            self.ended = set(t.loc[res.ended_for_good(t), "trial_id"])
        # Pruning slims an ended trial's checkpoint to weights only, so it must wait until Tune's own snapshot says
        # the trial ended: a driver killed in between would resume the trial from that checkpoint. Tune calls
        # get_state() as it writes each snapshot; trials that had ended by then become safe to prune.
        self.awaiting_snapshot: set[str] = set(self.ended)
        self.prunable: set[str] = set()
        self.pruned_count = 0

    def _tune_reports(self) -> list[dict]:
        """Every report in the trials' result.json files (Tune flushes one line per report); none on a fresh start
        or when Tune's storage is not a local folder."""
        rows = []
        for path in sorted(Path(self.tune_path).glob("*/result.json")) if Path(self.tune_path).is_dir() else []:
            for line in path.read_text(errors="replace").splitlines():
                try:
                    result = json.loads(line)
                except ValueError:  # the line a kill cut short
                    continue
                if isinstance(result, dict) and result.get(TRIAL_ID) and ("epoch" in result or "training_iteration" in result):
                    rows.append({"trial_id": result[TRIAL_ID], **res.metric_values(result, drop=TUNE_KEYS)})
        return rows

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.history.append({"trial_id": trial.trial_id, **res.metric_values(result, drop=TUNE_KEYS)})
        if result.get("trial_status") == ERROR:
            print(f"hamtune: trial {trial.trial_id}: error: {result.get('message')}", file=sys.stderr, flush=True)
        self.wall[trial.trial_id] = float(result.get("time_total_s", 0.0))
        if time.monotonic() - self._last_write > self.min_interval_s:
            self.write(trials)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.ended.add(trial.trial_id)
        self.awaiting_snapshot.add(trial.trial_id)
        self.write(trials)

    def get_state(self):
        """Tune is writing its experiment snapshot: every trial ended so far is on record in it."""
        self.prunable |= self.awaiting_snapshot
        self.awaiting_snapshot = set()
        return None  # nothing of ours to save: setup() rebuilds from the tables

    def on_step_end(self, iteration, trials, **info):
        if len(self.prunable) == self.pruned_count:
            return
        self.pruned_count = len(self.prunable)
        over = {t.trial_id for t in trials if t.status in ("TERMINATED", "ERROR")}  # never one Tune runs again
        try:
            checkpoints.prune(self.tune_path, {t.trial_id: t.path for t in trials},
                              pd.read_parquet(self.exp_dir / "trials.parquet"), ended=self.prunable & over,
                              metric=self.spec.search.metric, mode=self.spec.search.mode,
                              keep=self.spec.search.keep_best_checkpoints)
        except Exception as exc:  # disk bookkeeping must never end the search; the driver prunes again at the end
            log.warning("could not prune checkpoints: %s", exc)

    def on_trial_error(self, iteration, trials, trial, **info):
        log.warning("trial %s failed: %s", trial.trial_id, self._failure(trial))
        self.write(trials)

    def on_trial_recover(self, iteration, trials, trial, **info):
        log.warning("trial %s failed (%s); it starts again from its last checkpoint", trial.trial_id,
                    self._failure(trial))

    @staticmethod
    def _failure(trial) -> str:
        """One line for a failed trial: the cause in its error.txt, and where the whole error is."""
        folder = getattr(trial, "local_path", None)
        reason = res.crash_reason(folder) or "see its error.txt"
        return f"{reason} (the whole error: {folder}/error.txt)" if folder else reason

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
        # rows of a trial Tune does not know are a killed driver's, from after Tune's last snapshot: the searcher
        # proposes that trial again under a new id, and the old rows would count it twice
        known = {t.trial_id for t in trials}
        table = write_tables(self.exp_dir, self.spec, [r for r in self.history if r["trial_id"] in known], [
            {"trial_id": t.trial_id, "trial_index": res.creation_index(t.experiment_tag, i), "config": t.config, "tune_status": self._status(t),
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


def tracking_callbacks(mlflow_uri: str | None, spec: SearchSpec) -> list:
    """Tune's own MLflow callback when the search logs to MLflow: one MLflow run per trial (its config as params, its
    per-epoch metrics), in an MLflow experiment named after hamtune's."""
    if not mlflow_uri:
        return []
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    from hamtune.search.tracking import mlflow_environment

    mlflow_environment(mlflow_uri)
    return [MLflowLoggerCallback(tracking_uri=mlflow_uri, experiment_name=spec.experiment,
                                 tags={"hamtune.experiment": spec.experiment, "hamtune.kind": "trial"})]
