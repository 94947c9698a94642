"""What proposes the trials and what stops them: OptunaSearch (TPE) or random search, ASHA or FIFO. The points a
warm start feeds the searcher come from hamtune.search.warm_start.

Only the driver imports this module (it loads Optuna and Ray Tune's searchers); a trial's worker never does.
"""

from __future__ import annotations

import logging

from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from hamtune.search.spec import SearchSpec
from hamtune.vocab import ERROR, NON_FINITE

log = logging.getLogger("hamtune")


class PruningAwareOptunaSearch(OptunaSearch):
    """OptunaSearch that tells Optuna the truth: ASHA-stopped trials are PRUNED, non-finite ones FAILED.

    Tune's OptunaSearch marks every trial that reported a value COMPLETE, so Optuna's TPE would treat a trial
    cut at epoch 1 as if its epoch-1 score were final.
    """

    def __init__(self, *args, max_epochs: int, warm_start: list | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._max_epochs = max_epochs
        self._warm_start = list(warm_start or [])  # WarmPoint: an earlier search's finished trials

    def _setup_study(self, mode):
        """Tune builds the study once it knows the space; the earlier search's trials go in before any suggestion."""
        super()._setup_study(mode)
        for point in self._warm_start:
            self.add_evaluated_point(point.params, point.value, pruned=point.pruned,
                                     intermediate_values=point.intermediate_values)
        self._warm_start = []  # in the study now (and in the searcher's saved state, for a resume)

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
            self._ot_study.tell(self._ot_trials[trial_id], state=state)
        except Exception as exc:  # a trial Optuna already closed
            log.warning("optuna: %s", exc)
        self._completed_trials.add(trial_id)


def make_searcher(spec: SearchSpec, warm_start: list | None = None):
    s = spec.search
    if s.searcher == "random":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        # Tune ignores TuneConfig.max_concurrent_trials when handed a generator, so it goes here too.
        return BasicVariantGenerator(random_state=s.seed, max_concurrent=s.max_concurrent)
    import optuna

    sampler = optuna.samplers.TPESampler(
        seed=s.seed, n_startup_trials=min(s.startup_trials, s.num_samples), multivariate=s.multivariate,
        constant_liar=s.constant_liar) if s.sampler == "tpe" else optuna.samplers.RandomSampler(seed=s.seed)
    return PruningAwareOptunaSearch(metric=s.metric, mode=s.mode, sampler=sampler, max_epochs=spec.max_epochs,
                                    warm_start=warm_start)


def make_scheduler(spec: SearchSpec):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    s = spec.search
    if s.scheduler == "fifo":
        return FIFOScheduler()
    # The epoch is ASHA's clock: trials report once per epoch.
    return ASHAScheduler(time_attr="training_iteration", metric=s.metric, mode=s.mode, max_t=spec.max_epochs,
                         grace_period=s.grace_period, reduction_factor=s.reduction_factor)
