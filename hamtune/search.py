"""The search's driver: Ray's environment, OptunaSearch + ASHA, the Tuner, resume, results tables.

This module and hamtune.trainable (the function Ray runs in its workers) are the only ones that talk to Ray Tune. The driver decodes nothing itself: it asks the data layer for the
cached arrays, puts train and val into the object store once (tune.with_parameters), and every trial reads them
zero-copy. The test split is never handed to Ray.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def ray_environment() -> None:
    """Every environment variable hamtune sets for Ray, in one place, applied before Ray is first imported.

    Ray reads some of them at import time, so this module applies them before its own `import ray`; Ray's workers
    inherit them. A user's own settings win (setdefault). Without RAY_ADDRESS (set by `--address`), Ray stays on
    127.0.0.1 instead of the machine's network address: that switch is how Ray itself stays on loopback on macOS.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Save the experiment state often, so a killed driver loses at most a few seconds of bookkeeping.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "5")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Per-epoch checkpoints force frequent experiment snapshots by design; Tune's warning about it is noise here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if not os.environ.get("RAY_ADDRESS"):
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


ray_environment()

import ray  # noqa: E402 - after ray_environment(), which Ray reads at import
from optuna.trial import TrialState  # noqa: E402
from ray import tune  # noqa: E402
from ray.tune.result import AUTO_RESULT_KEYS, DONE, EXPERIMENT_TAG, SHOULD_CHECKPOINT, TRIAL_ID  # noqa: E402
from ray.tune.search.optuna import OptunaSearch  # noqa: E402

from hamtune import checkpoints, preflight  # noqa: E402
from hamtune import results as res  # noqa: E402
from hamtune.data.cache import prepare_spec_data  # noqa: E402
from hamtune.errors import HamtuneError  # noqa: E402
from hamtune.io import atomic_write_json, atomic_write_table  # noqa: E402
from hamtune.space import SearchSpec  # noqa: E402
from hamtune.trainable import train_trial  # noqa: E402

# What Tune adds to every report; the history keeps the metrics, the epoch clock and hamtune's own keys (but not
# an input error's traceback: that stays in Tune's result.json of the trial).
TUNE_KEYS = frozenset(AUTO_RESULT_KEYS) | {DONE, TRIAL_ID, EXPERIMENT_TAG, SHOULD_CHECKPOINT, "traceback"}
log = logging.getLogger("hamtune")


# ---------------------------------------------------------------------------------------------------------------
# Searcher, scheduler, results callback


class PruningAwareOptunaSearch(OptunaSearch):
    """OptunaSearch that tells Optuna the truth: ASHA-stopped trials are PRUNED, non-finite ones FAILED.

    Tune's OptunaSearch marks every trial that reported a value COMPLETE, so Optuna's TPE would treat a trial
    cut at epoch 1 as if its epoch-1 score were final.
    """

    def __init__(self, *args, max_epochs: int, warm_start: list | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._max_epochs = max_epochs
        self._warm_start = list(warm_start or [])  # hamtune.payoff.WarmPoint: an earlier search's finished trials

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
        if result.get("trial_status") in ("non_finite", "error"):
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


class ResultsTablesCallback(tune.Callback):
    """Keeps results/<experiment>/ tables current (rewritten atomically as trials finish and at the end), prints a
    trial's input error as one line, and bounds the checkpoints' disk as trials end (hamtune.checkpoints)."""

    def __init__(self, exp_dir: Path, spec: SearchSpec, tune_path: str, min_interval_s: float = 10.0):
        self.exp_dir, self.spec, self.min_interval_s = exp_dir.resolve(), spec, min_interval_s
        self.tune_path = tune_path
        self.history: list[dict] = []
        self.wall: dict[str, float] = {}
        self.ended: set[str] = set()
        self._last_write = 0.0

    def setup(self, **info):
        """Runs at the start and again on resume (Tune restores this object from its own pickle)."""
        import pandas as pd

        previous = self.exp_dir / "history.parquet"
        self.history = pd.read_parquet(previous).to_dict("records") if previous.is_file() else []
        self.ended: set[str] = set()  # trials that Tune completed (ran out, stopped by ASHA, or non-finite)
        trials = self.exp_dir / "trials.parquet"
        if trials.is_file():
            t = pd.read_parquet(trials)
            self.wall = {r.trial_id: float(r.wall_time_s or 0) for r in t.itertuples()}
            # "error" with a message is an input error that ended the trial; without one Tune may retry it
            ended = t["status"].isin(["completed", "stopped", "non_finite"])
            if "message" in t.columns:
                ended |= (t["status"] == "error") & t["message"].notna()
            self.ended = set(t.loc[ended, "trial_id"])

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.history.append({"trial_id": trial.trial_id, **res.metric_values(result, drop=TUNE_KEYS)})
        if result.get("trial_status") == "error":
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
        except Exception as exc:  # disk bookkeeping must never end the search; run_search prunes again at the end
            log.warning("could not prune checkpoints: %s", exc)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.write(trials)

    def on_experiment_end(self, trials, **info):
        self.write(trials)

    def _status(self, trial) -> str:
        # on_trial_complete runs while Tune still says RUNNING; and Tune also marks trials TERMINATED when a
        # Ctrl-C ends the experiment, though those are interrupted, not done.
        if trial.trial_id in self.ended and trial.status in ("RUNNING", "TERMINATED"):
            return "TERMINATED"
        return "INTERRUPTED" if trial.status == "TERMINATED" else trial.status

    def write(self, trials):
        table = write_tables(self.exp_dir, self.spec, self.history, [
            {"trial_id": t.trial_id, "config": t.config, "tune_status": self._status(t),
             "wall_time_s": self.wall.get(t.trial_id)} for t in trials])
        self._last_write = time.monotonic()
        return table


def write_tables(exp_dir: Path, spec: SearchSpec, history_rows: list[dict], trial_rows: list[dict]):
    history = res.history_table(history_rows)
    trials = res.trials_table(trial_rows, history, metric=spec.search.metric, mode=spec.search.mode,
                              max_epochs=spec.max_epochs)
    atomic_write_table(history, exp_dir / "history.parquet")
    atomic_write_table(trials, exp_dir / "trials.parquet")
    return trials


# ---------------------------------------------------------------------------------------------------------------
# The driver


@dataclass
class SearchOutcome:
    exp_dir: Path
    state: str  # finished | interrupted
    wall_time_s: float
    trials: Any  # pandas DataFrame


def init_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Local Ray on 127.0.0.1 by default; --address joins a running cluster."""
    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"log_to_driver": True, "logging_level": logging.WARNING}
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1", **kwargs)


def alive_nodes() -> list[dict]:
    return [n for n in ray.nodes() if n.get("Alive")]


def trial_nodes(trial_resources: dict[str, float]) -> list[dict]:
    """The live nodes that can hold one trial (a GPU trial never runs on a CPU-only head)."""
    wanted = {k: v for k, v in trial_resources.items() if v > 0}
    return [n for n in alive_nodes() if all(n["Resources"].get(k, 0.0) >= v for k, v in wanted.items())]


def check_cluster(address: str | None, storage_path: str | None, trial_resources: dict[str, float]) -> None:
    """Refuse, before any trial starts, a search that could never run or could not checkpoint.

    Locally, some node must hold one trial. On a cluster, trials need storage every node can reach; an
    autoscaling cluster may be a lone head now and grow GPU workers later, so a trial that no live node can hold
    counts as multi-node too.
    """
    nodes = alive_nodes()
    wanted = {k: v for k, v in trial_resources.items() if v > 0}
    fits = [n for n in nodes if all(n["Resources"].get(k, 0.0) >= v for k, v in wanted.items())]
    if not address and not fits:
        have = {k: nodes[0]["Resources"].get(k, 0.0) for k in wanted} if nodes else {}
        raise HamtuneError(f"a trial asks for {wanted} (resources.cpu/gpu) but this machine has {have}: lower "
                           "resources in the spec (--cpus-per-trial/--gpus-per-trial) or join a cluster with --address")
    if address and not storage_path and (len(nodes) > 1 or not fits):
        why = (f"this Ray cluster has {len(nodes)} nodes" if len(nodes) > 1
               else f"no live node can hold a trial ({wanted}), so trials will run on nodes the cluster adds later")
        raise HamtuneError(
            f"{why}, so trials need shared storage for checkpoints: pass --storage-path s3://bucket/prefix "
            "(or gs://..., or an NFS folder mounted at the same path on every node)")


def uses_meta(spec: SearchSpec) -> bool:
    """Whether any trial can have use_meta on (fixed in train, or among the searched values)."""
    searched = spec.space.get("use_meta", spec.train.get("use_meta", False))
    if isinstance(searched, dict):
        return any(bool(v) for values in searched.values() for v in (values if isinstance(values, list) else [values]))
    return bool(searched)


def run_search(spec: SearchSpec, *, results_dir: Path = res.RESULTS_DIR, address: str | None = None,
               storage_path: str | None = None, resume: bool = False, num_cpus: int | None = None,
               verbose: int = 1, reuse_actors: bool = True, warm_start: Path | None = None) -> SearchOutcome:
    """Prepare the data once, start (or resume) the Tuner, keep the tables current, return the leaderboard.

    warm_start: an earlier experiment's folder; its finished trials seed the searcher (hamtune.payoff).
    """
    exp_dir = results_dir / spec.experiment
    record_path = exp_dir / res.EXPERIMENT_FILE
    if resume:
        if not record_path.is_file():
            raise HamtuneError(f"{exp_dir}: nothing to resume (no {res.EXPERIMENT_FILE}); start it with hamtune search --space ...")
        storage_path = storage_path or res.read_experiment(exp_dir).get("storage_path")
    elif record_path.is_file():
        raise HamtuneError(f"{exp_dir} already holds experiment '{spec.experiment}': continue it with "
                           f"`hamtune search --resume {spec.experiment}` or start another with --name NEW_NAME")
    warm_points, warm_record = None, None
    if warm_start is not None:
        from hamtune.payoff import warm_start_points

        if resume:
            raise HamtuneError("--warm-start starts a new search; a resumed one keeps the searcher it had")
        warm_points = warm_start_points(warm_start, res.read_experiment(warm_start), spec)
        warm_record = {"experiment": warm_start.name, "path": str(warm_start.resolve()), "trials": len(warm_points)}
    trial_resources = {"CPU": spec.resources.cpu, "GPU": spec.resources.gpu}
    data = None
    if not address:
        preflight.check_on_driver(spec.train, spec.space)  # local trials see this machine's files and caches
        # Locally, bad data is refused before Ray starts (nothing of Ray's on the console but the one line).
        data = prepare_spec_data(spec.data, needs_meta=uses_meta(spec))
    init_ray(address, num_cpus)
    check_cluster(address, storage_path, trial_resources)
    if address:  # on a cluster the nodes are checked first: a missing weights file fails fast, before any decoding
        preflight.check_on_nodes(spec.train, spec.space, trial_nodes(trial_resources))
        data = prepare_spec_data(spec.data, needs_meta=uses_meta(spec))
    train, val = data.arrays("train"), data.arrays("val")  # the test split stays on disk, out of Ray's reach
    exp_dir.mkdir(parents=True, exist_ok=True)
    if storage_path:
        tune_storage, tune_name = storage_path, spec.experiment
    else:
        tune_storage, tune_name = str((exp_dir).resolve()), "tune"
    tune_path = f"{tune_storage.rstrip('/')}/{tune_name}"

    previous = res.read_experiment(exp_dir) if resume else {}
    if previous.get("data", {}).get("fingerprint") not in (None, data.fingerprint):
        raise HamtuneError(f"{record_path}: the data changed since this experiment started (fingerprint "
                           f"{previous['data']['fingerprint']} -> {data.fingerprint}); start a new experiment with --name")
    record = {
        "name": spec.experiment, "state": "running", "metric": spec.search.metric, "mode": spec.search.mode,
        "created": previous.get("created") or _now(), "wall_time_s": previous.get("wall_time_s"),
        "updated": _now(), "spec": spec.to_dict(), "spec_file": spec.source_file, "tune_path": tune_path,
        "storage_path": storage_path, "data": {"fingerprint": data.fingerprint, "cache": str(data.path),
                                                "sizes": data.split_sizes()},
        "max_epochs": spec.max_epochs, "searched": spec.searched_keys(),
        "warm_start": warm_record if not resume else previous.get("warm_start"),
    }
    atomic_write_json(record_path, record)

    trainable = tune.with_resources(
        tune.with_parameters(train_trial, train=train, val=val, fixed=dict(spec.train), cpus=spec.resources.cpu),
        {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu})
    del train, val  # with_parameters has put them in the object store; the driver's copy is no longer needed
    start = time.monotonic()
    if resume and tune.Tuner.can_restore(tune_path):
        # Finished trials, the searcher's state and our results callback all come back from Tune's own records.
        tuner = tune.Tuner.restore(tune_path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        # Tune needs the metric itself only when neither the searcher nor the scheduler carries it; the progress
        # reporter may then not carry it too (Tune refuses both), and Tune hands it to the reporter instead.
        tune_metric = ({} if spec.search.searcher == "optuna" or spec.search.scheduler == "asha"
                       else {"metric": spec.search.metric, "mode": spec.search.mode})
        tuner = tune.Tuner(
            trainable,
            param_space=spec.tune_space(),
            tune_config=tune.TuneConfig(
                search_alg=make_searcher(spec, warm_points), scheduler=make_scheduler(spec),
                num_samples=spec.search.num_samples,
                max_concurrent_trials=spec.search.max_concurrent, reuse_actors=reuse_actors, **tune_metric),
            run_config=tune.RunConfig(
                name=tune_name, storage_path=tune_storage, verbose=verbose,
                callbacks=[ResultsTablesCallback(exp_dir, spec, tune_path)],
                failure_config=tune.FailureConfig(max_failures=spec.search.max_failures),
                checkpoint_config=tune.CheckpointConfig(
                    num_to_keep=1, checkpoint_score_attribute=spec.search.metric,
                    checkpoint_score_order=spec.search.mode),  # keeps the best and, always, the latest
                progress_reporter=_reporter(spec, with_metric=not tune_metric) if verbose else None),
        )
    grid = tuner.fit()
    wall = time.monotonic() - start

    # The callback wrote the tables and pruned checkpoints as trials ended; prune once more now that every trial
    # has stopped (also those of an earlier run of a resumed search), and record the kept best checkpoints.
    trials, history = res.load_tables(exp_dir)
    paths = {r.metrics["trial_id"]: r.path for r in grid if (r.metrics or {}).get("trial_id") and r.path}
    ended = trials["status"].isin(["completed", "stopped", "non_finite"])
    if "message" in trials.columns:
        ended |= (trials["status"] == "error") & trials["message"].notna()
    best_ckpts = checkpoints.prune(tune_path, paths, trials, ended=trials.loc[ended, "trial_id"],
                                   metric=spec.search.metric, mode=spec.search.mode,
                                   keep=spec.search.keep_best_checkpoints)
    trials["best_checkpoint"] = trials["trial_id"].map(best_ckpts)
    atomic_write_table(trials, exp_dir / "trials.parquet")
    done = trials["status"].isin(["completed", "stopped", "non_finite", "error"])
    finished = bool(done.all()) and len(trials) >= spec.search.num_samples
    record.update(state="finished" if finished else "interrupted", updated=_now(),
                  wall_time_s=round(wall + (float(record.get("wall_time_s") or 0) if resume else 0.0), 1))
    from hamtune.payoff import compute_payoff

    record["payoff"] = compute_payoff(trials, history, record).to_dict()
    atomic_write_json(record_path, record)
    try:
        res.write_search_plots(exp_dir, trials, history, metric=spec.search.metric, params=spec.searched_keys())
    except Exception as exc:  # a plot is never worth losing the search over
        log.warning("could not draw the search plots: %s", exc)
    return SearchOutcome(exp_dir=exp_dir, state=record["state"], wall_time_s=wall, trials=trials)


def _reporter(spec: SearchSpec, *, with_metric: bool = True):
    cols = {"epoch": "epoch", spec.search.metric: spec.search.metric.removeprefix("val_"), "val_loss": "val_loss",
            "train_images_per_s": "img/s"}
    metric = {"metric": spec.search.metric, "mode": spec.search.mode} if with_metric else {}
    return tune.CLIReporter(metric_columns=cols, parameter_columns=spec.searched_keys(), max_report_frequency=30,
                            sort_by_metric=True, max_progress_rows=12, **metric)


def _now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")
