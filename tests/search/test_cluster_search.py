"""The multi-node path of `hamtune search`, end to end, on a REAL two-node Ray cluster started on this machine.

Two raylets (ray.cluster_utils.Cluster), one CPU each, token authentication like cluster.yaml. A tiny search runs
against them with a shared storage path and must (a) run trials on both nodes, (b) hand the trials decoded arrays
through the object store so that no trial reads an image or the cache, and (c) be refused without a storage path.
A resume then continues from the shared storage path the first run recorded.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from hamtune.search import tables as res

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
HIDDEN_MARK = "the cache was moved away once the driver had prepared the data\n"


def tiny_spec(cache_dir: Path, experiment: str = "tiny-cluster") -> dict:
    return {
        "experiment": experiment,
        "data": {"source": "synthetic", "synthetic_size": 300, "image_size": 16, "cache_dir": str(cache_dir)},
        "model": {"name": "resnet10t", "head_hidden": 16, "head_dropout": 0.1},
        "train": {"epochs": 2, "batch_size": 32, "warmup_epochs": 0.5},
        # 2 concurrent trials x 1 CPU on two 1-CPU nodes: Ray has to place one trial on each node.
        "search": {"num_samples": 4, "max_concurrent": 2, "grace_period": 1, "reduction_factor": 2, "seed": 0},
        "resources": {"cpu": 1},
        "space": {"lr": {"loguniform": [1e-3, 3e-2]}, "augment_strength": {"uniform": [0.0, 1.0]}},
    }


def _refresh_ray_auth() -> None:
    """Ray caches the auth mode and token per process; make this process see the environment as it is now."""
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


@pytest.fixture(scope="module")
def cluster():
    """Head + one worker node, like cluster.yaml's head and GPU worker: same RAY_AUTH_MODE and token everywhere.

    RAY_TMPDIR keeps this cluster's sessions and its address file out of /tmp/ray, so no other local Ray (another
    test, another user of this machine) ever finds or joins it. The nodes listen on the machine's own address:
    Ray rewrites a 127.0.0.1 bootstrap address to that address when a driver connects.

    Each node has its own weights store and caches (HAMTUNE_WEIGHTS_DIR, HF_HOME, TORCH_HOME in its raylet's
    environment, which its workers inherit), as two machines would; here they stay empty.
    """
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()  # a local Ray left by an earlier test module would make init_ray skip connecting
    ray_tmp = tempfile.mkdtemp(prefix="hamtune-ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 chars
    caches = {node: {"HF_HOME": f"{ray_tmp}/{node}-hf", "TORCH_HOME": f"{ray_tmp}/{node}-torch",
                     "HAMTUNE_WEIGHTS_DIR": f"{ray_tmp}/{node}-weights"} for node in ("head", "worker")}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_TMPDIR", ray_tmp)
        mp.setenv("RAY_AUTH_MODE", "token")
        mp.setenv("RAY_AUTH_TOKEN", secrets.token_hex(32))
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        mp.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
        mp.delenv("RAY_ADDRESS", raising=False)
        _refresh_ray_auth()
        c = Cluster(initialize_head=True, shutdown_at_exit=True,
                    head_node_args={"num_cpus": 1, "include_dashboard": False, "env_vars": caches["head"]})
        try:
            worker = c.add_node(num_cpus=1, env_vars=caches["worker"])
            c.wait_for_nodes()
            yield SimpleNamespace(address=c.address, env=dict(os.environ),
                                  node_ids={c.head_node.node_id, worker.node_id}, head_id=c.head_node.node_id,
                                  worker_id=worker.node_id, node_caches=caches, ray_cluster=c, worker=worker)
        finally:
            ray.shutdown()
            c.shutdown()
    _refresh_ray_auth()  # back to the environment as the next test module sees it
    shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def search_run(cluster, tmp_path_factory):
    """One real search on the cluster, with the data moved out of reach as soon as the driver has prepared it.

    Synthetic data is written as JPEGs into the cache folder, decoded into the cache entry, and memory-mapped by
    the driver. Right after prepare() returns, the whole cache folder is renamed and a plain FILE takes its path:
    a trial that opened the images or the cache, or tried to rebuild them (prepare() would regenerate synthetic
    data into an empty folder), fails. Only arrays already in the driver's memory can reach the trials, and
    tune.with_parameters sends them through the object store.
    """
    import ray

    import hamtune.data.cache
    from hamtune.search.driver import run_search
    from hamtune.search.spec import spec_from_dict

    tmp = tmp_path_factory.mktemp("cluster-search")
    cache, hidden = tmp / "cache", tmp / "cache-moved-away"
    storage, results = tmp / "shared-storage", tmp / "results"
    spec = spec_from_dict(tiny_spec(cache), source="tiny-cluster.yaml")
    real_prepare = hamtune.data.cache.prepare
    prepared = {}

    def prepare_then_hide(*args, **kwargs):
        data = real_prepare(*args, **kwargs)
        prepared["images"] = len(data.table)
        cache.rename(hidden)
        cache.write_text(HIDDEN_MARK)
        return data

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hamtune.data.cache, "prepare", prepare_then_hide)
        outcome = run_search(spec, results_dir=results, address=cluster.address, storage_path=str(storage), verbose=0)
    # Which node ran each trial: Tune writes the trainable's pid into every result, and the cluster's GCS actor
    # table (dead actors included) knows each actor's pid and node.
    actor_nodes = {a["Pid"]: a["Address"]["NodeID"] for a in ray._private.state.actors().values()}
    ray.shutdown()

    placeholder_intact = cache.is_file() and cache.read_text() == HIDDEN_MARK
    cache.unlink()
    hidden.rename(cache)  # back in place for the resume below
    return SimpleNamespace(spec=spec, outcome=outcome, storage=storage, results=results, cache=cache,
                           actor_nodes=actor_nodes, placeholder_intact=placeholder_intact, prepared=prepared)


def tune_results(storage: Path, experiment: str) -> list[dict]:
    """Every result Tune recorded in the shared storage path (one result.json per trial, one line per report)."""
    rows = []
    for path in sorted((storage / experiment).glob("*/result.json")):
        rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows


def run_cli(args: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hamtune.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=240)


def test_trials_ran_on_both_nodes(search_run, cluster):
    reports = tune_results(search_run.storage, search_run.spec.experiment)
    assert reports, "no trial results in the shared storage path"
    nodes_per_trial: dict[str, set] = {}
    for r in reports:
        assert r["pid"] in search_run.actor_nodes, f"trial {r['trial_id']}: pid {r['pid']} is no actor of this cluster"
        nodes_per_trial.setdefault(r["trial_id"], set()).add(search_run.actor_nodes[r["pid"]])
    assert len(nodes_per_trial) == 4
    assert all(len(nodes) == 1 for nodes in nodes_per_trial.values())
    assert set().union(*nodes_per_trial.values()) == cluster.node_ids


def test_trials_trained_on_object_store_arrays_not_files(search_run):
    outcome = search_run.outcome
    assert search_run.placeholder_intact, "something replaced the file standing in for the cache folder"
    assert outcome.state == "finished"
    trials = outcome.trials
    assert len(trials) == 4
    assert set(trials["status"]) <= {"completed", "stopped"}, trials[["trial_id", "status"]]
    assert trials["best_val_balanced_accuracy"].notna().all()
    assert (trials["epochs"] >= 1).all() and (trials["epochs"] == 2).any()
    # The trials' checkpoints went to the shared storage path, not into the results folder.
    assert list((search_run.storage / search_run.spec.experiment).glob("*/checkpoint_*"))
    assert not (search_run.results / search_run.spec.experiment / "tune").exists()
    record = res.read_experiment(search_run.results / search_run.spec.experiment)
    assert record["storage_path"] == str(search_run.storage)
    assert sum(s["images"] for s in record["data"]["sizes"].values()) == search_run.prepared["images"] == 300


def test_multi_node_search_without_storage_path_is_refused(cluster, tmp_path):
    spec_path = tmp_path / "tiny.yaml"
    spec_path.write_text(yaml.safe_dump(tiny_spec(tmp_path / "cache", experiment="no-storage")))
    done = run_cli(["search", "--space", str(spec_path), "--address", cluster.address,
                    "--results-dir", str(tmp_path / "results")], cluster.env, tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("hamtune: error:")]
    assert len(errors) == 1, done.stderr[-3000:]
    assert "2 nodes" in errors[0] and "--storage-path" in errors[0]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "results" / "no-storage" / res.EXPERIMENT_FILE).exists()  # refused before anything ran


def test_resume_continues_from_the_recorded_storage_path(search_run, cluster):
    exp_dir = search_run.results / search_run.spec.experiment
    before = res.read_experiment(exp_dir)
    # No --storage-path: the resume must take it from experiment.json, or the multi-node check refuses it.
    done = run_cli(["search", "--resume", search_run.spec.experiment, "--address", cluster.address,
                    "--results-dir", str(search_run.results)], cluster.env, search_run.results.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    after = res.read_experiment(exp_dir)
    assert after["state"] == "finished" and after["storage_path"] == str(search_run.storage)
    assert after["created"] == before["created"]
    trials, _ = res.load_tables(exp_dir)
    assert sorted(trials["trial_id"]) == sorted(search_run.outcome.trials["trial_id"])


def test_pretrained_trials_get_their_weights_through_the_object_store(cluster, tmp_path):
    """pretrained: true, with tf_efficientnet_lite0's ImageNet weights installed in the driver's store only: neither
    node has them, yet every trial trains from them, and its first epoch is not a random-init trial's."""
    store = tmp_path / "driver-store"
    env = {**cluster.env, "HAMTUNE_WEIGHTS_DIR": str(store), "HF_HOME": str(tmp_path / "hf"),
           "HF_ENDPOINT": "http://127.0.0.1:9"}
    installed = run_cli(["weights", "install", "tf_efficientnet_lite0"], env, tmp_path)
    assert installed.returncode == 0, installed.stderr[-3000:]
    first_epoch = {}
    for name, pretrained in (("pretrained", True), ("random-init", False)):
        raw = tiny_spec(tmp_path / "cache", experiment=name)
        raw["model"].update(name="tf_efficientnet_lite0", pretrained=pretrained)
        raw["search"].update(num_samples=2, searcher="random", scheduler="fifo")
        raw["train"]["epochs"] = 1
        spec_path = tmp_path / f"{name}.yaml"
        spec_path.write_text(yaml.safe_dump(raw))
        done = run_cli(["search", "--space", str(spec_path), "--address", cluster.address, "--storage-path",
                        str(tmp_path / "shared-storage"), "--results-dir", str(tmp_path / "results")], env, tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        trials, history = res.load_tables(tmp_path / "results" / name)
        assert len(trials) == 2 and set(trials["status"]) == {"completed"}, trials[["status", "message"]]
        configs = trials.set_index("trial_id")[["config.lr", "config.augment_strength"]].round(12)
        losses = history.set_index("trial_id")["val_loss"]
        first_epoch[name] = {tuple(configs.loc[t]): losses[t] for t in trials["trial_id"]}
    assert first_epoch["pretrained"].keys() == first_epoch["random-init"].keys()  # same seed, same configs
    for config, loss in first_epoch["pretrained"].items():
        assert loss != first_epoch["random-init"][config], config
    for node_env in cluster.node_caches.values():  # no node ever held the weights
        assert not Path(node_env["HAMTUNE_WEIGHTS_DIR"]).exists()
        assert not list(Path(node_env["HF_HOME"]).rglob("*.safetensors"))


def test_trials_on_a_lost_node_continue_on_the_head_from_their_checkpoints(cluster, tmp_path):
    """A spot reclaim: the worker node's raylet is killed while a trial runs there. Tune retries the trial
    (search.max_failures) from its last checkpoint on the head, and the search ends with every trial completed and
    no epoch run twice. (Last in this module: the cluster has one node left afterwards.)"""
    import threading
    import time

    import ray

    from hamtune.search.driver import run_search
    from hamtune.search.spec import spec_from_dict

    raw = tiny_spec(tmp_path / "cache", experiment="node-loss")
    raw["train"]["epochs"] = 5
    raw["search"].update(num_samples=2, searcher="random", scheduler="fifo", max_failures=2)
    storage = tmp_path / "shared-storage"
    lost: dict = {}

    def kill_the_worker_node_mid_trial() -> None:
        """Once a trial on the worker node has checkpointed an epoch (its report is in Tune's result.json) and is
        still short of the last, remove that node as a cloud provider would."""
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not lost:
            try:
                nodes = {a["Pid"]: a["Address"]["NodeID"] for a in ray._private.state.actors().values()}
                for r in tune_results(storage, "node-loss"):
                    if nodes.get(r["pid"]) == cluster.worker_id and 1 <= r["epoch"] < 4:
                        lost.update(trial_id=r["trial_id"], epoch=int(r["epoch"]))
                        cluster.ray_cluster.remove_node(cluster.worker)
                        return
            except Exception:  # Ray's state API between its own updates, a result.json line being written
                pass
            time.sleep(0.05)

    killer = threading.Thread(target=kill_the_worker_node_mid_trial, daemon=True)
    killer.start()
    outcome = run_search(spec_from_dict(raw), results_dir=tmp_path / "results", address=cluster.address,
                         storage_path=str(storage), verbose=0)
    killer.join(timeout=60)
    head_actors = {a["Pid"] for a in ray._private.state.actors().values()
                   if a["Address"]["NodeID"] == cluster.head_id}
    ray.shutdown()
    assert lost, "no trial ran on the worker node long enough to lose it"
    trials, history = outcome.trials, res.load_tables(tmp_path / "results" / "node-loss")[1]
    assert outcome.state == "finished" and set(trials["status"]) == {"completed"}, trials[["status", "message"]]
    mine = history[history["trial_id"] == lost["trial_id"]]
    assert list(mine["epoch"]) == [1, 2, 3, 4, 5]
    reports = [r for r in tune_results(storage, "node-loss") if r["trial_id"] == lost["trial_id"]]
    reported = [int(r["epoch"]) for r in reports]
    # resumed from its checkpoint, not restarted: the epochs it had checkpointed before the loss ran once
    assert all(reported.count(e) == 1 for e in range(1, lost["epoch"] + 1)), reported
    later = [r for r in reports if r["epoch"] > lost["epoch"] + 1]
    assert later and all(r["pid"] in head_actors for r in later)  # the rest ran on the head
