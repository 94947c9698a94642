"""The final model in MLflow: when its experiment's search logged to MLflow (experiment.json's `mlflow`), the retrain
logs one more run there, "final model", with its headline metrics, its settings and its report files."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

from hamtune.search.tracking import mlflow_environment, require_mlflow

HEADLINE = ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc")


def log_final_model(uri: str, experiment: str, metrics: dict, files: Iterable[Path]) -> str:
    """One MLflow run for the final model; returns its run id."""
    require_mlflow(uri)
    mlflow_environment(uri)
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name="final model", tags={"hamtune.experiment": experiment,
                                                        "hamtune.kind": "final model"}) as run:
        numbers = {f"test_{k}": float(metrics[k]) for k in HEADLINE if isinstance(metrics.get(k), (int, float))}
        lo, hi = metrics.get("balanced_accuracy_ci95") or (math.nan, math.nan)
        numbers |= {"test_balanced_accuracy_ci95_low": float(lo), "test_balanced_accuracy_ci95_high": float(hi)}
        mlflow.log_metrics({k: v for k, v in numbers.items() if math.isfinite(v)})
        mlflow.log_params({"trial_ids": ",".join(map(str, metrics.get("trial_ids", []))),
                           "top": metrics.get("top"), "seeds": ",".join(map(str, metrics.get("seeds", []))),
                           **{k: v for k, v in (metrics.get("config") or {}).items() if v is not None}})
        for path in files:
            if Path(path).is_file() and Path(path).suffix in (".md", ".json", ".csv", ".png"):
                mlflow.log_artifact(str(path))
        return run.info.run_id
