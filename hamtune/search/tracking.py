"""MLflow, when a user tracks experiments there: checked before a search starts, set up for a `file:` store.

MLflow is an optional extra (`pip install 'hamtune[tracking]'`); hamtune's own tables stay the record of a search,
MLflow is where a team compares runs across experiments. Trials are logged by Tune's own MLflowLoggerCallback
(hamtune.search.callbacks); the final model by hamtune.final.tracking.
"""

from __future__ import annotations

import importlib.util
import os

from hamtune.errors import HamtuneError


def require_mlflow(uri: str) -> None:
    """One line, before anything runs, when MLflow is asked for and not installed."""
    if importlib.util.find_spec("mlflow") is None:
        raise HamtuneError(f"--mlflow {uri}: MLflow is not installed; install it with `pip install "
                           "'hamtune[tracking]'` (or mlflow), or leave out --mlflow")


def mlflow_environment(uri: str) -> None:
    """MLflow 3 refuses a `file:` store unless told it is wanted; hamtune supports it for local, serverless use."""
    if uri.startswith("file:") or "://" not in uri:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
