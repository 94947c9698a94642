"""ASHA whose decisions depend on the trials' results and their order alone, never on which trial finished first.

Tune's ASHAScheduler decides for a trial at a rung against whatever other trials happened to reach that rung before
it, so the same seed stops different trials on a quiet machine and on a loaded one. OrderedASHA numbers the trials in
the order the searcher created them and decides for trial j at rung r against the trials i < j at rung r only (the
same quantile rule as Tune's: j goes on if it is in the top 1/reduction_factor of them). When trial j reaches rung r
while some i < j is still short of it, j is PAUSED until every such i has reached r or ended, then decided; so the
decision is the one a sequential run would make. With the searcher proposing in waves (ConcurrencyLimiter with
batch=True) the suggestions are timing-free too, and a search is a function of its spec and seed.

The rungs are rebuilt from the experiment's history table when a resumed search starts (Tune does not keep a
scheduler's state across a restore), so a resumed search stops the trials an uninterrupted one would.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from hamtune.search.tables import creation_index

log = logging.getLogger("hamtune")


def rungs(max_t: int, grace_period: int, reduction_factor: int) -> list[int]:
    """The epochs at which ASHA decides (Tune's milestones grace * rf^k), below max_t: a trial at max_t is done."""
    out, t = [], grace_period
    while t < max_t:
        out.append(int(t))
        t *= reduction_factor
    return out


def goes_on(value: float, earlier: list[float], reduction_factor: int) -> bool:
    """ASHA's rule, as Tune's _Bracket applies it: on, unless below the (1 - 1/rf) quantile of the earlier values."""
    if not earlier or value is None or math.isnan(value):
        return True
    return not value < np.nanpercentile(earlier, (1 - 1 / reduction_factor) * 100)


class OrderedASHA(FIFOScheduler):
    """Successive halving on a fixed trial order (see the module docstring)."""

    def __init__(self, *, metric: str, mode: str, max_t: int, grace_period: int, reduction_factor: int,
                 history: Path | None = None, time_attr: str = "training_iteration") -> None:
        super().__init__()
        self._metric, self._mode, self._time_attr = metric, mode, time_attr
        self._sign = 1.0 if mode == "max" else -1.0
        self._max_t, self._rf = max_t, reduction_factor
        self._rungs = rungs(max_t, grace_period, reduction_factor)
        self._history = history  # results/<experiment>/history.parquet: the rungs of an earlier run of this search
        self._order: dict[str, int] = {}  # trial id -> position in the searcher's order
        self._values: dict[int, dict[str, float]] = {r: {} for r in self._rungs}  # rung -> trial id -> signed value
        self._reached: dict[str, int] = {}  # trial id -> the last epoch it reported
        self._ended: set[str] = set()
        self._waiting: dict[str, int] = {}  # paused trial id -> the rung it waits at
        self._decided: dict[tuple[str, int], bool] = {}  # (trial id, rung) -> goes on
        self._rebuilt = False

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return True  # metric and mode are this scheduler's own

    # -- Tune's calls -----------------------------------------------------------------------------------------

    def on_trial_add(self, tune_controller, trial: Trial) -> None:
        # no rebuild here: on a resume Tune adds its restored trials one by one, and the rebuild must know them all
        self._order.setdefault(trial.trial_id, creation_index(trial.experiment_tag, len(self._order)))

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        self._rebuild_once(tune_controller)
        if self._time_attr not in result or self._metric not in result:
            return TrialScheduler.CONTINUE
        epoch = int(result[self._time_attr])
        self._record(trial.trial_id, epoch, result[self._metric])
        if self._cut(trial.trial_id):  # cut at a rung before a restore
            return TrialScheduler.STOP
        action = TrialScheduler.CONTINUE
        pending = self._undecided(trial.trial_id, epoch)
        if pending is not None:
            if self._blocked(trial.trial_id, pending):
                self._waiting[trial.trial_id] = pending
                action = TrialScheduler.PAUSE
            elif not self._decide(trial.trial_id, pending):
                action = TrialScheduler.STOP
        self._release(tune_controller, but=trial.trial_id)
        return action

    def on_trial_complete(self, tune_controller, trial: Trial, result: dict) -> None:
        self._rebuild_once(tune_controller)
        if result and self._time_attr in result and self._metric in result:
            self._record(trial.trial_id, int(result[self._time_attr]), result[self._metric])
        self._end(tune_controller, trial.trial_id)

    def on_trial_error(self, tune_controller, trial: Trial) -> None:
        self._end(tune_controller, trial.trial_id)

    def on_trial_remove(self, tune_controller, trial: Trial) -> None:
        self._end(tune_controller, trial.trial_id)

    def choose_trial_to_run(self, tune_controller) -> Trial | None:
        """Pending trials first, in order; then paused trials no longer waiting for a predecessor. A restored trial
        that the replayed decisions cut is stopped instead of run."""
        self._rebuild_once(tune_controller)
        trials = sorted(tune_controller.get_trials(), key=lambda t: self._order.get(t.trial_id, math.inf))
        for status in (Trial.PENDING, Trial.PAUSED):
            for trial in trials:
                if trial.status != status or trial.trial_id in self._waiting:
                    continue
                if self._cut(trial.trial_id):
                    tune_controller.stop_trial(trial)
                    continue
                return trial
        return None

    def debug_string(self) -> str:
        cut = " | ".join(f"epoch {r}: {len(v)} recorded" for r, v in self._values.items())
        return f"OrderedASHA (decisions in trial order): {cut}; {len(self._waiting)} waiting"

    # -- decisions ----------------------------------------------------------------------------------------------

    def _record(self, trial_id: str, epoch: int, value) -> None:
        self._reached[trial_id] = max(epoch, self._reached.get(trial_id, 0))
        if epoch in self._values:
            v = float(value) if value is not None else math.nan
            self._values[epoch][trial_id] = self._sign * v if math.isfinite(v) else math.nan

    def _undecided(self, trial_id: str, epoch: int) -> int | None:
        """The rung at or below `epoch` this trial reached and has no decision for (at most one: rungs are epochs)."""
        for rung in self._rungs:
            if rung <= epoch and (trial_id, rung) not in self._decided and trial_id in self._values[rung]:
                return rung
        return None

    def _blocked(self, trial_id: str, rung: int) -> bool:
        """Whether a trial earlier in the order may still reach `rung` and has not yet."""
        mine = self._order.get(trial_id, math.inf)
        return any(order < mine and other not in self._ended and self._reached.get(other, 0) < rung
                   for other, order in self._order.items())

    def _cut(self, trial_id: str) -> bool:
        return any(not on for (other, _), on in self._decided.items() if other == trial_id)

    def _decide(self, trial_id: str, rung: int) -> bool:
        mine = self._order.get(trial_id, math.inf)
        earlier = [v for other, v in self._values[rung].items() if self._order.get(other, math.inf) < mine]
        on = goes_on(self._values[rung][trial_id], earlier, self._rf)
        self._decided[(trial_id, rung)] = on
        return on

    def _end(self, tune_controller, trial_id: str) -> None:
        self._ended.add(trial_id)
        self._waiting.pop(trial_id, None)
        self._release(tune_controller, but=trial_id)

    def _release(self, tune_controller, but: str) -> None:
        """Decide for the paused trials whose predecessors have now all passed their rung, in order; a trial cut
        there is stopped (Tune tells the searcher it was pruned), the others may run again (choose_trial_to_run)."""
        for trial_id in sorted(self._waiting, key=lambda t: self._order.get(t, math.inf)):
            rung = self._waiting[trial_id]
            if trial_id == but or self._blocked(trial_id, rung):
                continue
            del self._waiting[trial_id]
            if not self._decide(trial_id, rung) and tune_controller is not None:
                trial = next((t for t in tune_controller.get_trials() if t.trial_id == trial_id), None)
                if trial is not None:
                    tune_controller.stop_trial(trial)

    # -- resume -------------------------------------------------------------------------------------------------

    def _rebuild_once(self, tune_controller) -> None:
        """After a restore: every rung value and end an earlier run of this search recorded, from its tables, with
        the decisions replayed in order (so an interrupted decision is made as it would have been).

        Only the trials Tune restored count. The tables are written on every report, Tune's snapshot every few
        seconds, so a driver killed in between leaves rows of trials Tune never heard of (the searcher proposes
        them again under new ids, at the same place in the order); their rung values would skew the decisions
        of every later trial, and a ghost that never ends would hold them at their rung."""
        if self._rebuilt:
            return
        self._rebuilt = True
        if self._history is None or not Path(self._history).is_file():
            return
        import pandas as pd

        from hamtune.search.tables import ended_for_good

        known = {t.trial_id for t in tune_controller.get_trials()} if tune_controller is not None else set()
        history = pd.read_parquet(self._history)
        trials_file = Path(self._history).with_name("trials.parquet")
        if history.empty or self._metric not in history.columns or not trials_file.is_file():
            return
        trials = pd.read_parquet(trials_file)
        trials = trials[trials["trial_id"].isin(known)]
        history = history[history["trial_id"].isin(known)]
        self._ended |= set(trials.loc[ended_for_good(trials), "trial_id"])
        for trial_id, epoch, value in zip(history["trial_id"], history["epoch"], history[self._metric]):
            self._record(trial_id, int(epoch), value)
        for rung in self._rungs:  # every decision an uninterrupted run would have made by now, in order
            for trial_id in sorted(self._values[rung], key=lambda t: self._order.get(t, math.inf)):
                if self._blocked(trial_id, rung):
                    self._waiting[trial_id] = rung  # it was paused there: it waits again
                else:
                    self._decide(trial_id, rung)
