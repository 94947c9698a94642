"""What proposes the trials and what stops them: OptunaSearch (TPE) or random search, ASHA or FIFO. The points a
warm start feeds the searcher come from hamtune.search.warm_start.

Only the driver imports this module (it loads Optuna and Ray Tune's searchers); a trial's worker never does.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from pathlib import Path

from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from hamtune.search.spec import SearchSpec
from hamtune.search.startup import start_up_points
from hamtune.vocab import ERROR, NON_FINITE

log = logging.getLogger("hamtune")


class PruningAwareOptunaSearch(OptunaSearch):
    """OptunaSearch that tells Optuna the truth: ASHA-stopped trials are PRUNED, non-finite ones FAILED.

    Tune's OptunaSearch marks every trial that reported a value COMPLETE, so Optuna's TPE would treat a trial
    cut at epoch 1 as if its epoch-1 score were final.
    """

    def __init__(self, *args, max_epochs: int, warm_start: list | None = None, journal: Path | None = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self._max_epochs = max_epochs
        self._warm_start = list(warm_start or [])  # WarmPoint: an earlier search's finished trials
        self._journal = str(journal) if journal is not None else None
        self._journal_bytes = 0  # how much of the journal the last saved state had seen

    def _setup_study(self, mode):
        """Tune builds the study once it knows the space; the earlier search's trials go in before any suggestion,
        their per-epoch values on the same epoch steps (1, 2, ...) this search's own trials report."""
        import optuna

        super()._setup_study(mode)
        for point in self._warm_start:
            self._ot_study.add_trial(optuna.trial.create_trial(
                state=TrialState.PRUNED if point.pruned else TrialState.COMPLETE,
                value=point.value, params=point.params, distributions=self._space,
                intermediate_values={epoch: v for epoch, v in enumerate(point.intermediate_values, start=1)}))
        self._warm_start = []  # in the study now (and in the searcher's saved state, for a resume)

    def save(self, checkpoint_path: str):
        """Tune's searcher snapshot, with how far the journal had got: a resume cuts the journal back to it."""
        if self._journal and os.path.exists(self._journal):
            self._journal_bytes = os.path.getsize(self._journal)
        super().save(checkpoint_path)

    def restore(self, checkpoint_path: str):
        """The snapshot, and the journal cut back to what the snapshot had seen. A killed driver may have written
        more (trials that ended, or began, after Tune's last snapshot); Tune runs those again, so the study must
        not already hold them, or Optuna refuses the repeated reports and start-up points would be skipped."""
        super().restore(checkpoint_path)
        if self._journal and os.path.exists(self._journal) and os.path.getsize(self._journal) > self._journal_bytes:
            os.truncate(self._journal, self._journal_bytes)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials or not result:
            return super().on_trial_complete(trial_id, result, error)
        state = None
        if result.get("trial_status") in (NON_FINITE, ERROR):
            state = TrialState.FAIL
        elif not error and int(result.get("epoch", self._max_epochs)) < self._max_epochs:
            state = TrialState.PRUNED
        if state is None:
            return super().on_trial_complete(trial_id, result, error)
        try:
            trial, step, value = self._ot_trials[trial_id], result.get("training_iteration"), result.get(self.metric)
            if state == TrialState.PRUNED and step is not None and value is not None and math.isfinite(value):
                # Tune passes the result that made ASHA stop a trial here, not to on_trial_result: without this
                # report the study would lack the very epoch the trial was judged on (a trial OrderedASHA held at
                # its rung and cut later has reported it already: Optuna keeps the first and warns, said nothing)
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message="The reported value is ignored")
                    trial.report(float(value), int(step))
            self._ot_study.tell(trial, state=state)
        except Exception as exc:  # a trial Optuna already closed
            log.warning("optuna: %s", exc)
        self._completed_trials.add(trial_id)


def make_searcher(spec: SearchSpec, warm_start: list | None = None, storage: Path | None = None):
    """The searcher, limited to search.max_concurrent trials at once. Deterministic (search.deterministic): Optuna
    proposes in waves of max_concurrent, each wave after the last one ended, so every suggestion sees the same
    results whatever the timing; random search never looks at results, so its order is fixed anyway.

    storage: a journal file for Optuna's study (trials, pruned ones and their per-epoch values), which another
    process (optuna-dashboard, `hamtune dashboard`) can read while the search runs; None keeps it in memory."""
    from ray.tune.search import ConcurrencyLimiter

    s = spec.search
    if s.searcher == "random":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        # a generator is not a Searcher: Tune would ignore TuneConfig.max_concurrent_trials, so it goes here
        return BasicVariantGenerator(random_state=s.seed, max_concurrent=s.max_concurrent,
                                     points_to_evaluate=start_up_points(spec) if s.cover_choices else None)
    import optuna

    # a warm start's earlier trials already cover the space (and the same seed would propose the very same start-up
    # points again), so they take the start-up points' place
    points = start_up_points(spec) if s.cover_choices and not warm_start else []
    startup = max(min(s.startup_trials, s.num_samples), len(points))
    sampler = optuna.samplers.TPESampler(
        seed=s.seed, n_startup_trials=startup, multivariate=s.multivariate,
        constant_liar=s.constant_liar) if s.sampler == "tpe" else optuna.samplers.RandomSampler(seed=s.seed)
    journal = None
    if storage is not None:
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        journal = JournalStorage(JournalFileBackend(str(storage)))
    searcher = PruningAwareOptunaSearch(metric=s.metric, mode=s.mode, sampler=sampler, max_epochs=spec.max_epochs,
                                        warm_start=warm_start, points_to_evaluate=points or None, storage=journal,
                                        journal=storage,
                                        study_name=spec.experiment if journal is not None else None)
    return ConcurrencyLimiter(searcher, max_concurrent=s.max_concurrent, batch=s.deterministic)


def make_scheduler(spec: SearchSpec, history: Path | None = None):
    """FIFO, or ASHA on the epoch clock: OrderedASHA (decisions in trial order, rebuilt from `history` on resume)
    when search.deterministic, else Tune's own ASHAScheduler."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    s = spec.search
    if s.scheduler == "fifo":
        return FIFOScheduler()
    if s.deterministic:
        from hamtune.search.scheduler import OrderedASHA

        return OrderedASHA(metric=s.metric, mode=s.mode, max_t=spec.max_epochs, grace_period=s.grace_period,
                           reduction_factor=s.reduction_factor, history=history)
    return ASHAScheduler(time_attr="training_iteration", metric=s.metric, mode=s.mode, max_t=spec.max_epochs,
                         grace_period=s.grace_period, reduction_factor=s.reduction_factor)
