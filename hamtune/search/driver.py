"""The search's driver: which experiment (new, resumed, warm-started), Ray's environment, the Tuner, the tables.

This module, its callback and searcher modules and hamtune.search.trainable (the function Ray runs in its workers)
are the only ones that talk to Ray Tune, and Ray is imported and configured when a search starts, not when this
module is imported. The driver decodes nothing itself: it asks the data layer for the cached arrays, puts train and
val into the object store once (tune.with_parameters), and every trial reads them zero-copy. The test split is never
handed to Ray.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from hamtune.data.cache import prepare_spec_data
from hamtune.errors import HamtuneError
from hamtune.io import atomic_write_bytes, atomic_write_json, atomic_write_table, now_iso
from hamtune.reports.search_plots import write_search_plots
from hamtune.search import preflight
from hamtune.search import tables as res
from hamtune.search.lock import experiment_lock, refuse_if_busy
from hamtune.search.savings import compute_payoff
from hamtune.search.spec import SearchSpec, load_spec, spec_from_dict
from hamtune.search.startup import coverage_note
from hamtune.search.warm_start import warm_start_points
from hamtune.vocab import ENDED, ERROR, INTERRUPTED

log = logging.getLogger("hamtune")
MEMORY_KILL = res.MEMORY_KILL
Echo = Callable[[str], None]
SMOKE_TEST = {"search.num_samples": 2, "train.epochs": 2, "data.synthetic_size": 300, "data.image_size": 16,
              "search.grace_period": 1}
SMOKE_NAME = "smoke-test"  # the smoke test's experiment: renamed smoke-test-2, ... when it is there already


@dataclass
class SearchOutcome:
    exp_dir: Path
    spec: SearchSpec
    state: str  # finished | interrupted
    wall_time_s: float
    trials: Any  # pandas DataFrame
    warm_start: Path | None = None


def start_search(space: Path | None, *, resume: str | None = None, overrides: Mapping[str, Any] | None = None,
                 smoke_test: bool = False, warm_start: str | None = None, results_dir: Path = res.RESULTS_DIR,
                 address: str | None = None, storage_path: str | None = None, echo: Echo = print) -> SearchOutcome:
    """`hamtune search`: a new experiment from a spec file (under an unused name), or `resume` (a name, or "" for
    the latest) continued with its own recorded spec; then run_search."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    if smoke_test:
        overrides = {**SMOKE_TEST, **overrides}
        overrides.setdefault("experiment", SMOKE_NAME)
    warm_dir = res.experiment_dir(warm_start, results_dir) if warm_start else None
    if resume is not None:
        if space:
            raise HamtuneError("--resume continues an experiment with its own recorded spec; drop --space")
        exp_dir = res.experiment_dir(resume or None, results_dir)
        refuse_if_busy(exp_dir)
        spec = spec_from_dict(res.read_experiment(exp_dir)["spec"], source=str(exp_dir / res.EXPERIMENT_FILE))
    else:
        if not space:
            raise HamtuneError("search needs --space FILE (e.g. search_spaces/default.yaml) or --resume [NAME]")
        spec = load_spec(space, overrides)
        refuse_if_busy(results_dir / spec.experiment)
        if "experiment" in overrides and overrides["experiment"] != SMOKE_NAME:  # asked for by name: never renamed
            existing = results_dir / spec.experiment / res.EXPERIMENT_FILE
            if existing.is_file():
                state = res.read_experiment(existing.parent).get("state")
                raise HamtuneError(f"{existing.parent} already holds experiment '{spec.experiment}' ({state}): "
                                   f"continue it with `hamtune search --resume {spec.experiment}` or give another "
                                   "--name")
        name = res.unused_name(spec.experiment, results_dir)
        if name != spec.experiment:
            state = res.read_experiment(results_dir / spec.experiment).get("state")
            hint = (f" (it is {state}: `hamtune search --resume {spec.experiment}` continues it)"
                    if state != "finished" else "")
            echo(f"results/{spec.experiment} already holds an experiment{hint}; this search is '{name}'")
            spec.experiment = name
        note = coverage_note(spec)
        if note:
            echo(f"hamtune: note: {note}")
    return run_search(spec, results_dir=results_dir, address=address, storage_path=storage_path,
                      resume=resume is not None, warm_start=warm_dir)


# ---------------------------------------------------------------------------------------------------------------
# Ray


def ray_environment(address: str | None) -> None:
    """Every environment variable hamtune sets for Ray, in one place, applied before Ray starts (its workers
    inherit them). A user's own settings win (setdefault). Locally Ray stays on 127.0.0.1 instead of the machine's
    network address: that switch is how Ray itself stays on loopback on macOS."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Save the experiment state often, so a killed driver loses at most a few seconds of bookkeeping.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "5")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Tune logs each failed trial's whole traceback on the console; hamtune says it in one line (the results
    # callback) and the whole error stays in the trial's error.txt. HAMTUNE_WORKER_LOGS=1 brings both back.
    os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "1" if worker_logs() else "0")
    # Per-epoch checkpoints force frequent experiment snapshots by design; Tune's warning about it is noise here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if not address and not os.environ.get("RAY_ADDRESS"):
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        # A local Ray on 127.0.0.1 turns token authentication on by itself and says so on every start, before
        # hamtune's own lines; the setting stays (Ray's default), the notice goes.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)


def worker_logs() -> bool:
    """HAMTUNE_WORKER_LOGS=1: forward Ray's worker output and Tune's per-trial tracebacks to the console."""
    return os.environ.get("HAMTUNE_WORKER_LOGS", "").strip().lower() in ("1", "true", "yes")


def init_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Local Ray on 127.0.0.1 by default; --address joins a running cluster.

    The workers' own output stays in Ray's session logs (HAMTUNE_WORKER_LOGS=1 forwards it): what a trial has to
    say reaches the user through its reports and the tables, and forwarding let through what Ray's workers print
    as they are shut down or killed (a SIGTERM landing in a weakref callback prints "Exception ignored ...
    SystemExit" with a traceback), which buried hamtune's one-line outcome."""
    ray_environment(address)
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"log_to_driver": worker_logs(), "logging_level": logging.WARNING}
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1", **kwargs)


def alive_nodes() -> list[dict]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


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
    values = spec.possible_values("use_meta")
    return values is None or any(bool(v) for v in values)


# ---------------------------------------------------------------------------------------------------------------
# The search


def run_search(spec: SearchSpec, *, results_dir: Path = res.RESULTS_DIR, address: str | None = None,
               storage_path: str | None = None, resume: bool = False, num_cpus: int | None = None,
               verbose: int = 1, reuse_actors: bool = True, warm_start: Path | None = None,
               mlflow: str | None = None) -> SearchOutcome:
    """Prepare the data once, start (or resume) the Tuner, keep the tables current, return the outcome.

    warm_start: an earlier experiment's folder; its finished trials seed the searcher (hamtune.search.searcher).
    mlflow: an MLflow tracking URI to log every trial to (a resume keeps the one the search started with).
    """
    exp_dir = results_dir / spec.experiment
    record_path = exp_dir / res.EXPERIMENT_FILE
    refuse_if_busy(exp_dir)  # before any decoding or Ray: a search of this name is writing it now
    if resume:
        if not record_path.is_file():
            raise HamtuneError(f"{exp_dir}: nothing to resume (no {res.EXPERIMENT_FILE}); start it with hamtune "
                               "search --space ...")
        storage_path = storage_path or res.read_experiment(exp_dir).get("storage_path")
    elif record_path.is_file():
        raise HamtuneError(f"{exp_dir} already holds experiment '{spec.experiment}': continue it with "
                           f"`hamtune search --resume {spec.experiment}` or start another with --name NEW_NAME")
    warm_points, warm_record = None, None
    if warm_start is not None:
        if resume:
            raise HamtuneError("--warm-start starts a new search; --resume continues one with the searcher it had")
        warm_points = warm_start_points(warm_start, res.read_experiment(warm_start), spec)
        warm_record = {"experiment": warm_start.name, "path": str(warm_start.resolve()), "trials": len(warm_points)}
    mlflow = mlflow or spec.search.mlflow
    if mlflow:
        from hamtune.search.tracking import require_mlflow

        require_mlflow(mlflow)
    trial_resources = {"CPU": spec.resources.cpu, "GPU": spec.resources.gpu}
    # Read once here, shipped to every trial through the object store: missing weights are one line before Ray starts.
    weights = preflight.read_requested_weights(spec.train, spec.space)
    data = None
    if not address:
        # Locally, bad data is refused before Ray starts (nothing of Ray's on the console but the one line).
        data = prepare_spec_data(spec.data, needs_meta=uses_meta(spec))
    init_ray(address, num_cpus)
    check_cluster(address, storage_path, trial_resources)
    if address:  # on a cluster, what Ray's nodes can hold is checked before any decoding
        data = prepare_spec_data(spec.data, needs_meta=uses_meta(spec))
    # What goes to the object store; _search takes it out of here, so the driver keeps no copy while trials run.
    payload = {"train": data.arrays("train"), "val": data.arrays("val"), "weights": weights}  # no test split
    del weights
    with experiment_lock(exp_dir):
        if not resume and record_path.is_file():  # another search of this name got here first and has finished
            raise HamtuneError(f"{exp_dir} already holds experiment '{spec.experiment}': start another with --name")
        return _search(spec, exp_dir, data, payload, storage_path=storage_path, resume=resume, verbose=verbose,
                       reuse_actors=reuse_actors, warm_start=warm_start, warm_points=warm_points,
                       warm_record=warm_record, mlflow=mlflow)


def _search(spec: SearchSpec, exp_dir: Path, data, payload: dict, *, storage_path, resume, verbose, reuse_actors,
            warm_start, warm_points, warm_record, mlflow) -> SearchOutcome:
    """The Tuner over the prepared data, with the experiment locked: record, fit, tables."""
    # Ray is up: the modules that import it (Tune's searchers, callbacks, the trainable) may load now.
    from ray import tune

    from hamtune.search.callbacks import ResultsTablesCallback, tracking_callbacks
    from hamtune.search.searcher import make_scheduler, make_searcher
    from hamtune.search.trainable import train_trial

    record_path = exp_dir / res.EXPERIMENT_FILE
    if storage_path:
        tune_storage, tune_name = storage_path, spec.experiment
    else:
        tune_storage, tune_name = str((exp_dir).resolve()), "tune"
    tune_path = f"{tune_storage.rstrip('/')}/{tune_name}"

    previous = res.read_experiment(exp_dir) if resume else {}
    if previous.get("data", {}).get("fingerprint") not in (None, data.fingerprint):
        raise HamtuneError(f"{record_path}: the data changed since this experiment started (fingerprint "
                           f"{previous['data']['fingerprint']} -> {data.fingerprint}); start a new experiment with "
                           "--name")
    record = {
        "name": spec.experiment, "state": "running", "metric": spec.search.metric, "mode": spec.search.mode,
        "created": previous.get("created") or now_iso(), "wall_time_s": previous.get("wall_time_s"),
        "updated": now_iso(), "spec": spec.to_dict(), "spec_file": spec.source_file, "tune_path": tune_path,
        "storage_path": storage_path, "data": {"fingerprint": data.fingerprint, "cache": str(data.path),
                                                "sizes": data.split_sizes()},
        "max_epochs": spec.max_epochs, "searched": spec.searched_keys(),
        "warm_start": warm_record if not resume else previous.get("warm_start"),
        "optuna_storage": str(optuna_journal(exp_dir)) if spec.search.searcher == "optuna" else None,
        "mlflow": mlflow,
    }
    atomic_write_json(record_path, record)

    trainable = tune.with_resources(
        tune.with_parameters(train_trial, fixed=dict(spec.train), cpus=spec.resources.cpu, **payload),
        {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu})
    payload.clear()  # with_parameters has put them in the object store; the driver needs no copy
    start = time.monotonic()
    journal = optuna_journal(exp_dir)
    # the experiment lock is held: a journal lock left by a killed driver is stale (Optuna would wait 30 s on it)
    journal.with_name(journal.name + ".lock").unlink(missing_ok=True)
    if resume and tune.Tuner.can_restore(tune_path):
        # Finished trials, the searcher's state and our results callback all come back from Tune's own records.
        tuner = tune.Tuner.restore(tune_path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        # Tune needs the metric itself only when neither the searcher nor the scheduler carries it; the progress
        # reporter may then not carry it too (Tune refuses both), and Tune hands it to the reporter instead.
        journal.unlink(missing_ok=True)  # a fresh start: no study from an attempt Tune kept nothing of
        tune_metric = ({} if spec.search.searcher == "optuna" or spec.search.scheduler == "asha"
                       else {"metric": spec.search.metric, "mode": spec.search.mode})
        tuner = tune.Tuner(
            trainable,
            param_space=spec.tune_space(),
            tune_config=tune.TuneConfig(  # the searcher limits how many trials run at once (make_searcher)
                search_alg=make_searcher(spec, warm_points, storage=journal),
                scheduler=make_scheduler(spec, history=exp_dir.resolve() / "history.parquet"),
                num_samples=spec.search.num_samples, reuse_actors=reuse_actors, **tune_metric),
            run_config=tune.RunConfig(
                name=tune_name, storage_path=tune_storage, verbose=verbose,
                callbacks=[ResultsTablesCallback(exp_dir, spec, tune_path), *tracking_callbacks(record["mlflow"], spec)],
                failure_config=tune.FailureConfig(max_failures=spec.search.max_failures),
                checkpoint_config=tune.CheckpointConfig(
                    num_to_keep=1, checkpoint_score_attribute=spec.search.metric,
                    checkpoint_score_order=spec.search.mode),  # keeps the best and, always, the latest
                progress_reporter=_reporter(spec, with_metric=not tune_metric) if verbose else None),
        )
    try:
        grid = tuner.fit()
    except Exception as exc:  # Tune gave up (workers killed, a full disk, a lost head): the tables must say so
        _stopped(spec, exp_dir, record, time.monotonic() - start, resume, exc)
    wall = time.monotonic() - start
    paths = {r.metrics["trial_id"]: r.path for r in grid if (r.metrics or {}).get("trial_id") and r.path}
    return _finish(spec, exp_dir, record, tune_path, paths, wall, resume, warm_start)


def optuna_journal(exp_dir: Path) -> Path:
    """Where an Optuna search keeps its study: a journal file another process (optuna-dashboard) can read live."""
    return exp_dir.resolve() / "optuna.journal"


def _stopped(spec: SearchSpec, exp_dir: Path, record: dict, wall: float, resume: bool, exc: Exception) -> None:
    """The search cannot go on: the tables say which trials were cut short (never `running` once the driver has
    gone), the record says interrupted, and the user gets one line: what happened and how to continue."""
    trials_file = exp_dir / "trials.parquet"
    memory = False
    if trials_file.is_file():
        trials = res.load_tables(exp_dir)[0]
        trials.loc[~trials["status"].isin(ENDED), "status"] = INTERRUPTED
        atomic_write_table(trials, trials_file)
        memory = trials.get("message", pd.Series(dtype=object)).astype(str).str.contains(MEMORY_KILL).any()
    record.update(state=INTERRUPTED, updated=now_iso(),
                  wall_time_s=round(wall + (float(record.get("wall_time_s") or 0) if resume else 0.0), 1))
    atomic_write_json(exp_dir / res.EXPERIMENT_FILE, record)
    reason = res.cause_line(str(exc)) or type(exc).__name__  # the whole text is kept in stopped.log
    log_file = exp_dir / "stopped.log"
    atomic_write_bytes(log_file, "".join(traceback.format_exception(exc)).encode())
    memory = memory or MEMORY_KILL in str(exc)
    advice = res.MEMORY_ADVICE if memory else ""
    raise HamtuneError(f"the search of experiment '{spec.experiment}' stopped: {reason} (whole error: {log_file}).{advice} "
                       f"Finished trials are kept in {exp_dir}; continue with `hamtune search --resume {spec.experiment}`") from None


def _finish(spec: SearchSpec, exp_dir: Path, record: dict, tune_path: str, paths: dict[str, str], wall: float,
            resume: bool, warm_start: Path | None) -> SearchOutcome:
    """After the Tuner: prune checkpoints once more, record the kept ones, the state and the savings, draw plots."""
    from hamtune.search import checkpoints

    # The callback wrote the tables and pruned checkpoints as trials ended; prune once more now that every trial
    # has stopped (also those of an earlier run of a resumed search), and record the kept best checkpoints.
    trials, history = res.load_tables(exp_dir)
    best_ckpts = checkpoints.prune(tune_path, paths, trials, ended=trials.loc[res.ended_for_good(trials), "trial_id"],
                                   metric=spec.search.metric, mode=spec.search.mode,
                                   keep=spec.search.keep_best_checkpoints)
    trials["best_checkpoint"] = trials["trial_id"].map(best_ckpts)
    # a trial whose worker died (Ray's memory monitor, a crash after its retries) left no message of ours: Tune's
    # error.txt in its folder says why, in its last "SomeError: ..." line
    crashed = (trials["status"] == ERROR) & trials.get("message", pd.Series(index=trials.index)).isna()
    for i in trials.index[crashed]:
        reason = res.crash_reason(paths.get(trials.at[i, "trial_id"]))
        if reason:
            trials.at[i, "message"] = reason
    atomic_write_table(trials, exp_dir / "trials.parquet")
    finished = bool(trials["status"].isin(ENDED).all()) and len(trials) >= spec.search.num_samples
    record.update(state="finished" if finished else "interrupted", updated=now_iso(),
                  wall_time_s=round(wall + (float(record.get("wall_time_s") or 0) if resume else 0.0), 1))
    record["payoff"] = compute_payoff(trials, history, record).to_dict()
    atomic_write_json(exp_dir / res.EXPERIMENT_FILE, record)
    try:
        write_search_plots(exp_dir, trials, history, metric=spec.search.metric, params=spec.searched_keys())
    except Exception as exc:  # a plot is never worth losing the search over
        log.warning("could not draw the search plots: %s", exc)
    return SearchOutcome(exp_dir=exp_dir, spec=spec, state=record["state"], wall_time_s=wall, trials=trials,
                         warm_start=warm_start)


def _reporter(spec: SearchSpec, *, with_metric: bool = True):
    from ray import tune

    cols = {"epoch": "epoch", spec.search.metric: spec.search.metric.removeprefix("val_"), "val_loss": "val_loss",
            "train_images_per_s": "img/s"}
    metric = {"metric": spec.search.metric, "mode": spec.search.mode} if with_metric else {}
    return tune.CLIReporter(metric_columns=cols, parameter_columns=spec.searched_keys(), max_report_frequency=30,
                            sort_by_metric=True, max_progress_rows=12, **metric)
