"""End-to-end searches on a real local Ray: tables, ASHA stops, checkpoints, crash retry, NaN trials, kill -9 + resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from hamtune.search import tables as res

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def tiny_spec(tmp_path: Path, cache_dir: Path, **changes) -> dict:
    spec = {
        "experiment": "tiny",
        "data": {"source": "synthetic", "synthetic_size": 400, "image_size": 16, "cache_dir": str(cache_dir)},
        "model": {"name": "resnet10t", "head_hidden": 32, "head_dropout": 0.1},
        "train": {"epochs": 3, "batch_size": 32, "warmup_epochs": 0.5},
        "search": {"num_samples": 6, "max_concurrent": 1, "grace_period": 1, "reduction_factor": 2, "seed": 3,
                   "max_failures": 1},
        "resources": {"cpu": 1},
        "space": {"lr": {"loguniform": [1e-4, 3e-2]}, "augment_strength": {"uniform": [0, 1]},
                  "imbalance": {"choice": ["none", "weighted_loss", "oversample", "focal"]}},
    }
    for dotted, value in changes.items():
        node = spec
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return spec


def write_spec(tmp_path: Path, spec: dict, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def crash_marker(tmp_path_factory):
    """Arms the one-shot crash injection; Ray workers inherit the variable, so it is set before Ray starts."""
    marker = tmp_path_factory.mktemp("inject") / "crashed"
    os.environ["HAMTUNE_INJECT_CRASH"] = str(marker)
    yield marker
    os.environ.pop("HAMTUNE_INJECT_CRASH", None)


@pytest.fixture(scope="module")
def ray_worker_env(crash_marker):
    """This module's workers need the crash switch (conftest's ray_local starts Ray after this)."""
    return {"HAMTUNE_INJECT_CRASH": str(crash_marker)}


@pytest.fixture(scope="module")
def finished_search(tmp_path_factory, ray_local, crash_marker):
    """One real search with ASHA and a crash injected once into a trial, shared by the assertions below."""
    from hamtune.search.driver import run_search
    from hamtune.search.spec import spec_from_dict

    tmp = tmp_path_factory.mktemp("search")
    spec = spec_from_dict(tiny_spec(tmp, tmp / "cache", **{"search.mlflow": f"file:{tmp / 'mlruns'}"}),
                          source="tiny.yaml")
    outcome = run_search(spec, results_dir=tmp / "results", verbose=0)
    return tmp, spec, outcome, crash_marker


def test_search_writes_tables_and_asha_stops_some_trials(finished_search):
    tmp, spec, outcome, _ = finished_search
    exp = tmp / "results" / "tiny"
    assert outcome.state == "finished"
    trials, history = res.load_tables(exp)
    assert len(trials) == 6 and trials["trial_id"].is_unique
    assert set(trials["status"]) <= {"completed", "stopped"}
    # history: one row per trial and epoch, epochs consecutive from 1
    assert len(history) == trials["epochs"].sum()
    for trial_id, h in history.groupby("trial_id"):
        assert list(h["epoch"]) == list(range(1, len(h) + 1))
    assert (trials.loc[trials["status"] == "completed", "epochs"] == 3).all()
    assert (trials["status"] == "stopped").any(), "ASHA stopped no trial"
    assert trials["epochs"].nunique() > 1
    for col in ("config.lr", "config.augment_strength", "config.imbalance", "best_val_balanced_accuracy",
                "last_val_balanced_accuracy", "best_epoch", "wall_time_s", "best_checkpoint", "last_train_loss"):
        assert col in trials.columns, col
    assert trials["best_val_balanced_accuracy"].between(0, 1).all()
    for name in ("trials.parquet", "trials.csv", "history.parquet", "history.csv", "experiment.json", "curves.png", "params.png"):
        assert (exp / name).is_file(), name
    pd.testing.assert_frame_equal(pd.read_csv(exp / "trials.csv")[["trial_id", "epochs"]], trials[["trial_id", "epochs"]])


def test_crashed_trial_was_retried_from_its_checkpoint(finished_search):
    import json

    tmp, _, _, marker = finished_search
    assert marker.exists(), "the injected crash never fired"
    # Tune's own per-trial log: after the crash (right after epoch 1's checkpoint) the retried trial's first report
    # is epoch 2, i.e. it resumed from the checkpoint instead of starting over.
    resumed = []
    for log in (tmp / "results" / "tiny" / "tune").glob("*/result.json"):
        reports = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        resumed += [r for r in reports if r["iterations_since_restore"] == 1 and r["training_iteration"] > 1]
    assert len(resumed) == 1, "exactly one trial should have been restored"
    assert resumed[0]["epoch"] == resumed[0]["training_iteration"] == 2
    trials, history = res.load_tables(tmp / "results" / "tiny")
    assert "error" not in set(trials["status"])
    crashed = history[history["trial_id"] == resumed[0]["trial_id"]]
    assert list(crashed["epoch"]) == list(range(1, len(crashed) + 1))


def test_best_checkpoint_reproduces_reported_metric(finished_search):
    from hamtune.data import SplitSpec, prepare
    from hamtune.training.metrics import classification_metrics
    from hamtune.training.config import TrainConfig
    from hamtune.training.model import build_model
    from hamtune.training.predict import predict_proba
    from hamtune.training.state import load_state

    tmp, spec, _, _ = finished_search
    trials, _ = res.load_tables(tmp / "results" / "tiny")
    best = res.best_trial(trials, metric="val_balanced_accuracy", mode="max")
    state = load_state(Path(best["best_checkpoint"]) / "state.pt")
    config = TrainConfig.from_dict(state["config"])
    model = build_model(config)
    model.load_state_dict(state["model"])
    d = spec.data
    data = prepare("synthetic", d.image_size, cache_dir=Path(d.cache_dir), split=SplitSpec(d.val, d.test, d.split_seed),
                   synthetic_size=d.synthetic_size, synthetic_seed=d.synthetic_seed, progress=False)
    assert data.decoded == 0  # the search already decoded it
    val = data.arrays("val")
    probs = predict_proba(model, val.images, val.meta, batch_size=64)
    got = classification_metrics(val.labels, probs)["balanced_accuracy"]
    assert got == pytest.approx(best["best_val_balanced_accuracy"], abs=1e-6)


def test_results_command_prints_leaderboard(finished_search):
    tmp, *_ = finished_search
    run = lambda *a: subprocess.run([sys.executable, "-m", "hamtune.cli", "results", *a, "--results-dir",
                                     str(tmp / "results")], capture_output=True, text=True, timeout=120)
    listing = run()
    assert listing.returncode == 0 and "tiny" in listing.stdout and "finished" in listing.stdout
    board = run("tiny", "--top", "3")
    assert board.returncode == 0, board.stderr
    lines = board.stdout.strip().splitlines()
    assert lines[-4].split()[0] == "trial_id" and len(lines[-3:]) == 3  # ... header, 3 trials
    assert "trial-epochs:" in board.stdout  # the payoff lines between the title and the table
    csv = run("tiny", "--format", "csv", "--sort", "config.lr")
    table = pd.read_csv(__import__("io").StringIO(csv.stdout))
    assert list(table["lr"]) == sorted(table["lr"])
    md = run("tiny", "--format", "markdown")
    assert md.stdout.startswith("| trial_id |")
    missing = run("nope")
    assert missing.returncode == 2 and "no experiment named 'nope'" in missing.stderr


def test_non_finite_trial_ends_alone(tmp_path, ray_local):
    from hamtune.search.driver import run_search
    from hamtune.search.spec import spec_from_dict

    raw = tiny_spec(tmp_path, tmp_path / "cache", **{
        "search.searcher": "random", "search.scheduler": "fifo", "search.num_samples": 4, "search.max_concurrent": 2,
        "train.epochs": 2, "space": {"lr": {"choice": [1e-3, 1e12]}}, "search.seed": 1})
    outcome = run_search(spec_from_dict(raw), results_dir=tmp_path / "results", verbose=0)
    trials = outcome.trials
    lrs = trials["config.lr"]
    assert (lrs == 1e12).any() and (lrs == 1e-3).any(), "seeded random search should draw both values"
    assert set(trials.loc[lrs == 1e12, "status"]) == {"non_finite"}
    assert set(trials.loc[lrs == 1e-3, "status"]) == {"completed"}
    assert trials.loc[lrs == 1e-3, "best_val_balanced_accuracy"].notna().all()


def test_kill_9_driver_then_resume_keeps_finished_trials(tmp_path):
    spec = tiny_spec(tmp_path, tmp_path / "cache", **{"search.num_samples": 6, "experiment": "killed"})
    spec_path = write_spec(tmp_path, spec)
    cmd = [sys.executable, "-m", "hamtune.cli", "search", "--results-dir", str(tmp_path / "results")]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen([*cmd, "--space", str(spec_path)], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    exp = tmp_path / "results" / "killed"
    before = None
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if (exp / "trials.parquet").is_file():
                t = pd.read_parquet(exp / "trials.parquet")
                done = t[t["status"].isin(["completed", "stopped"])]
                if len(done) >= 2:
                    before = t
                    # a second process reads the study while the search writes it
                    live = load_journal_study(exp, "killed")
                    finished_live = [x for x in live.trials if x.state.is_finished()]
                    assert proc.poll() is None and len(finished_live) >= 2
                    # Tune snapshots its experiment state at least every TUNE_GLOBAL_CHECKPOINT_S=5 s: trials
                    # that ended 6 s before the kill are on record; later ones may legitimately run again.
                    time.sleep(6)
                    break
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started, as in a reboot
        proc.wait(timeout=60)
    assert before is not None, "the search finished or stalled before it could be killed"
    assert res.read_experiment(exp)["state"] == "running"
    finished_before = before[before["status"].isin(["completed", "stopped"])]
    assert len(finished_before) < 6

    resumed = subprocess.run([*cmd, "--resume", "killed"], env=env, capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after, history = res.load_tables(exp)
    assert res.read_experiment(exp)["state"] == "finished"
    assert len(after) == 6 and set(after["status"]) <= {"completed", "stopped"}, after.get("message")
    # the Optuna study (journal) continued too: six trials, none left running, the same per-epoch values
    study = load_journal_study(exp, "killed")
    assert len(study.trials) == 6 and {t.state.name for t in study.trials} <= {"COMPLETE", "PRUNED"}
    by_params = {round(t.params["lr"], 12): t for t in study.trials}
    for row in after.itertuples():
        curve = history[history["trial_id"] == row.trial_id].sort_values("epoch")
        got = by_params[round(after.loc[row.Index, "config.lr"], 12)]
        assert list(got.intermediate_values) == list(curve["epoch"])
        assert list(got.intermediate_values.values()) == pytest.approx(list(curve["val_balanced_accuracy"]))
        assert got.state.name == ("PRUNED" if row.status == "stopped" else "COMPLETE")
    merged = finished_before.merge(after, on="trial_id", suffixes=("_before", "_after"))
    assert len(merged) == len(finished_before)
    for col in ("epochs", "best_val_balanced_accuracy", "config.lr", "status"):
        assert (merged[f"{col}_before"] == merged[f"{col}_after"]).all(), col
    assert not history.duplicated(["trial_id", "epoch"]).any()


def test_ctrl_c_stops_cleanly_and_marks_the_experiment_resumable(tmp_path):
    spec = tiny_spec(tmp_path, tmp_path / "cache", **{"search.num_samples": 4, "search.max_concurrent": 2,
                                                      "experiment": "interrupted"})
    proc = subprocess.Popen([sys.executable, "-m", "hamtune.cli", "search", "--space", str(write_spec(tmp_path, spec)),
                             "--results-dir", str(tmp_path / "results")], start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    exp = tmp_path / "results" / "interrupted"
    deadline = time.monotonic() + 180
    while proc.poll() is None and time.monotonic() < deadline and not (exp / "history.parquet").is_file():
        time.sleep(0.3)
    assert proc.poll() is None, "the search ended before it could be interrupted"
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C sends to the terminal's foreground process group
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-2000:]
    assert "resume with: hamtune search --resume interrupted" in out
    assert "Traceback" not in out
    assert res.read_experiment(exp)["state"] == "interrupted"
    trials, _ = res.load_tables(exp)
    assert "interrupted" in set(trials["status"]), trials[["trial_id", "status", "epochs"]]


def test_a_trial_no_node_can_hold_is_refused_before_it_runs(tmp_path, ray_local):
    from hamtune.errors import HamtuneError
    from hamtune.search.driver import run_search
    from hamtune.search.spec import spec_from_dict

    raw = tiny_spec(tmp_path, tmp_path / "cache", **{"resources": {"cpu": 1, "gpu": 1}})
    with pytest.raises(HamtuneError, match=r"a trial asks for \{'CPU': 1.0, 'GPU': 1.0\} .* this machine has"):
        run_search(spec_from_dict(raw), results_dir=tmp_path / "results", verbose=0)
    assert not (tmp_path / "results" / "tiny").exists()


def load_journal_study(exp: Path, name: str):
    """The study as any other process reads it: Optuna's own loader on the experiment's journal file."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return optuna.load_study(study_name=name, storage=JournalStorage(JournalFileBackend(str(exp / "optuna.journal"))))


def test_the_optuna_study_is_stored_with_pruned_trials_and_their_epochs(finished_search):
    tmp, *_ = finished_search
    exp = tmp / "results" / "tiny"
    trials, history = res.load_tables(exp)
    assert res.read_experiment(exp)["optuna_storage"] == str((exp / "optuna.journal").resolve())
    study = load_journal_study(exp, "tiny")
    assert len(study.trials) == len(trials)
    by_lr = {round(t.params["lr"], 12): t for t in study.trials}
    for row in trials.itertuples():
        got = by_lr[round(trials.loc[row.Index, "config.lr"], 12)]
        curve = history[history["trial_id"] == row.trial_id].sort_values("epoch")
        assert got.state.name == {"stopped": "PRUNED", "completed": "COMPLETE"}[row.status]
        # every epoch, the one ASHA stopped a trial on included, at its epoch number
        assert list(got.intermediate_values) == list(curve["epoch"])
        assert list(got.intermediate_values.values()) == pytest.approx(list(curve["val_balanced_accuracy"]))
        if row.status == "completed":
            assert got.value == pytest.approx(curve["val_balanced_accuracy"].iloc[-1])
    assert (trials["status"] == "stopped").any() and (trials["status"] == "completed").any()


def test_hamtune_dashboard_serves_the_study(finished_search):
    """optuna-dashboard's own HTTP API, served by `hamtune dashboard`, lists the study and its trials."""
    import json
    import socket
    import urllib.request

    tmp, *_ = finished_search
    trials, _ = res.load_tables(tmp / "results" / "tiny")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "hamtune.cli", "dashboard", "tiny", "--port", str(port),
                               "--results-dir", str(tmp / "results")], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        studies = None
        for _ in range(150):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as answer:
                    studies = json.load(answer)["study_summaries"]
                break
            except OSError:
                assert server.poll() is None, server.communicate()[1][-2000:]
                time.sleep(0.2)
        assert studies is not None and [s["study_name"] for s in studies] == ["tiny"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{studies[0]['study_id']}",
                                    timeout=30) as answer:
            detail = json.load(answer)
        states = sorted(t["state"] for t in detail["trials"])
        assert states == sorted(["Pruned"] * int((trials["status"] == "stopped").sum())
                                + ["Complete"] * int((trials["status"] == "completed").sum()))
        assert all(t["intermediate_values"] for t in detail["trials"])
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_an_input_error_ends_its_trial_once_with_the_reason(tmp_path, ray_local, capfd):
    """device: cuda where a trial runs and there is no GPU (a valid spec the driver cannot refuse: on a cluster the
    trials' nodes may have the GPU the driver lacks): every retry would fail alike."""
    import json

    from hamtune.cli import main

    raw = tiny_spec(tmp_path, tmp_path / "cache", **{
        "experiment": "input-error", "train.device": "cuda", "search.searcher": "random",
        "search.scheduler": "fifo", "search.num_samples": 2, "search.max_failures": 3, "train.epochs": 1,
        "space": {"lr": {"choice": [1e-3, 2e-3]}}})
    # Through the CLI: a search whose every trial failed exits 2 with one line that says why, not a leaderboard error.
    capfd.readouterr()
    assert main(["search", "--space", str(write_spec(tmp_path, raw)), "--results-dir", str(tmp_path / "results")]) == 2
    err = capfd.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("hamtune: error:")]
    assert len(errors) == 1 and errors[0].startswith(
        "hamtune: error: no completed or stopped trial reported 'val_balanced_accuracy' (trials: 2 error); first "
        "error: train config: device='cuda' but CUDA is not available on this machine"), errors
    trials, _ = res.load_tables(tmp_path / "results" / "input-error")
    assert res.read_experiment(tmp_path / "results" / "input-error")["state"] == "finished"
    assert len(trials) == 2 and set(trials["status"]) == {"error"}
    reason = "train config: device='cuda' but CUDA is not available on this machine"
    assert all(m.startswith(reason) and "\n" not in m for m in trials["message"]), trials["message"]
    assert (tmp_path / "results" / "input-error" / "trials.csv").read_text().count(reason) == 2
    # Tune's own records: one attempt per trial (a retry would have started the trainable again and reported again),
    # no failure, and the traceback only in the trial's log (its result.json), not in the tables.
    trial_dirs = sorted((tmp_path / "results" / "input-error" / "tune").glob("train_trial_*"))
    assert len(trial_dirs) == 2
    for trial_dir in trial_dirs:
        reports = [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines() if line]
        assert [(r["trial_status"], r["training_iteration"], r["iterations_since_restore"]) for r in reports] == \
            [("error", 1, 1)]
        assert "Traceback" in reports[0]["traceback"] and "HamtuneError" in reports[0]["traceback"]
        assert not (trial_dir / "error.txt").exists()  # Tune writes that for a trial that raised
    _, history = res.load_tables(tmp_path / "results" / "input-error")
    assert "traceback" not in history.columns
    for trial_id in trials["trial_id"]:
        assert f"hamtune: trial {trial_id}: error: {reason}" in err
    assert "Traceback" not in err


def test_only_the_best_trials_keep_their_best_weights(finished_search):
    """search.keep_best_checkpoints (3 by default): 3 slim checkpoints are all that is left of 6 trials."""
    from hamtune.training.config import TrainConfig
    from hamtune.training.model import build_model
    from hamtune.training.state import load_state

    tmp, spec, outcome, _ = finished_search
    exp = tmp / "results" / "tiny"
    trials, _ = res.load_tables(exp)
    left = sorted(str(p) for p in (exp / "tune").glob("*/checkpoint_*"))
    kept = trials.dropna(subset=["best_checkpoint"])
    assert len(left) == 3 and sorted(kept["best_checkpoint"]) == left
    ranked = trials.sort_values("best_val_balanced_accuracy", ascending=False, kind="stable")
    assert set(kept["trial_id"]) == set(ranked["trial_id"].head(3))
    for row in kept.itertuples():
        state = load_state(Path(row.best_checkpoint) / "state.pt")
        assert sorted(state) == ["config", "epoch", "format", "history", "model"]  # no optimiser state, no RNGs
        assert state["epoch"] == row.best_epoch
    model = build_model(TrainConfig.from_dict(load_state(Path(left[0]) / "state.pt")["config"]))
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    total = sum(f.stat().st_size for f in exp.rglob("*") if f.is_file())
    checkpoint_bytes = sum(f.stat().st_size for p in left for f in Path(p).rglob("*") if f.is_file())
    # each kept checkpoint is its weights plus a little pickling; everything else (tables, plots, Tune's logs) is small
    assert checkpoint_bytes < 3 * weights * 1.05 + 3 * 50_000
    assert total - checkpoint_bytes < 3_000_000, f"{total - checkpoint_bytes} bytes besides the checkpoints"
    print(f"experiment folder: {total / 1e6:.1f} MB, of it {checkpoint_bytes / 1e6:.1f} MB in 3 checkpoints "
          f"({weights / 1e6:.1f} MB of weights each)")


def test_best_retrain_works_with_the_pruned_checkpoints(finished_search):
    tmp, *_ = finished_search
    done = subprocess.run([sys.executable, "-m", "hamtune.cli", "best", "tiny", "--retrain", "--epochs", "1",
                           "--results-dir", str(tmp / "results")], capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "checkpoint (best epoch of the search)" in done.stdout
    # MLflow (search.mlflow): one run per trial from the search, and one for the final model, read back with
    # MLflow's own client from the file: store
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"file:{tmp / 'mlruns'}")
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id])
    trials, history = res.load_tables(tmp / "results" / "tiny")
    trial_runs = [r for r in runs if r.data.tags.get("hamtune.kind") == "trial"]
    final = [r for r in runs if r.data.tags.get("hamtune.kind") == "final model"]
    assert len(trial_runs) == len(trials) and len(final) == 1
    by_id = trials.set_index("trial_id")
    assert {r.data.tags["trial_name"].rsplit("_", 1)[-1] for r in trial_runs} == set(trials["trial_id"])
    for run in trial_runs:
        trial_id = run.data.tags["trial_name"].rsplit("_", 1)[-1]  # Tune names the run <trainable>_<trial id>
        curve = client.get_metric_history(run.info.run_id, "val_balanced_accuracy")
        want = history[history["trial_id"] == trial_id].sort_values("epoch")["val_balanced_accuracy"]
        assert [m.value for m in sorted(curve, key=lambda m: m.step)] == pytest.approx(list(want))
        assert float(run.data.params["lr"]) == pytest.approx(by_id.loc[trial_id, "config.lr"])
    metrics = json.loads((tmp / "results" / "tiny" / "best" / "metrics.json").read_text())
    assert final[0].data.metrics["test_balanced_accuracy"] == pytest.approx(metrics["balanced_accuracy"])
    assert {"report.md", "metrics.json"} <= {a.path for a in client.list_artifacts(final[0].info.run_id)}


def test_trials_train_from_the_weights_the_driver_read_once(tmp_path, ray_local, monkeypatch):
    """The weights file is read by the driver and deleted before any trial starts: the trials still start from it
    (it reached them through the object store), and their first epoch is not a random-init run's."""
    import timm
    import torch

    import hamtune.data.cache
    from hamtune.search.driver import run_search
    from hamtune.search.spec import spec_from_dict
    from hamtune.training.model import build_model
    from hamtune.training.config import TrainConfig
    from hamtune.training.state import load_state

    torch.manual_seed(123)
    weights = tmp_path / "weights.pth"
    pretrained = timm.create_model("resnet10t").state_dict()
    torch.save(pretrained, weights)
    real_prepare = hamtune.data.cache.prepare

    def prepare_then_delete(*args, **kwargs):
        data = real_prepare(*args, **kwargs)
        weights.unlink(missing_ok=True)
        return data

    monkeypatch.setattr(hamtune.data.cache, "prepare", prepare_then_delete)
    runs = {}
    for name, setting in (("shipped", str(weights)), ("random-init", False)):
        raw = tiny_spec(tmp_path, tmp_path / "cache", **{
            "experiment": name, "model.pretrained": setting, "search.searcher": "random", "search.scheduler": "fifo",
            "search.num_samples": 1, "train.epochs": 1, "space": {"lr": 1e-5}})
        runs[name] = run_search(spec_from_dict(raw), results_dir=tmp_path / "results", verbose=0)
    assert not weights.exists()
    shipped, random_init = runs["shipped"].trials.iloc[0], runs["random-init"].trials.iloc[0]
    assert shipped["status"] == random_init["status"] == "completed"
    assert shipped["best_val_loss"] != random_init["best_val_loss"]
    state = load_state(Path(shipped["best_checkpoint"]) / "state.pt")
    trained = build_model(TrainConfig.from_dict({**state["config"], "pretrained": False}))
    trained.load_state_dict(state["model"])
    stem = trained.backbone.state_dict()["conv1.0.weight"].flatten()
    start = pretrained["conv1.0.weight"].flatten()
    # one epoch at lr 1e-5 moves the stem a hair: it is the shipped weights, not a fresh random draw
    assert torch.nn.functional.cosine_similarity(stem, start, dim=0) > 0.99
