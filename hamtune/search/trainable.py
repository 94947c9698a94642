"""The trainable: the function Ray Tune runs in its workers, one call per trial; a thin adapter over
hamtune.training.loop.fit.

Kept apart from the driver (hamtune.search.driver) so that a trial's worker imports only what a trial needs: Ray Tune's
reporting, torch and the training loop; not Optuna, the schedulers, the results tables or any plotting.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import tempfile
from pathlib import Path

import torch
from ray import tune

from hamtune.errors import HamtuneError
from hamtune.search import preflight
from hamtune.search.checkpoints import INFO_FILE, STATE_FILE, checkpoint_info
from hamtune.training.config import TrainConfig
from hamtune.training.loop import fit
from hamtune.training.state import load_state
from hamtune.vocab import ERROR, NON_FINITE


# ---------------------------------------------------------------------------------------------------------------
# The trainable: runs inside a Ray worker, one call per trial.


def train_trial(config: dict, *, train, val, fixed: dict, cpus: float, weights: dict | None = None) -> None:
    """Fit one config, reporting every epoch with a checkpoint; resumes from Tune's checkpoint after a failure.

    weights: the pretrained state dicts the driver read, keyed by preflight.weights_key (through the object store,
    like train and val): a trial never reads weights from its node's disk or the network.

    A hamtune input error (bad config, missing weights, a data problem) fails the same way on every retry, so it
    ends the trial normally with status "error" and its one-line reason instead of raising: Tune does not retry
    it. The traceback goes to Tune's log of the trial (its result.json) only. Anything else raises, and Tune
    retries from the last checkpoint (search.max_failures).
    """
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # no "Checkpoint successfully created" every epoch
    logging.getLogger("ray.tune").setLevel(logging.WARNING)
    epochs_done = 0

    def on_epoch(metrics: dict, make_state) -> None:
        nonlocal epochs_done
        epochs_done = int(metrics["epoch"])
        with tempfile.TemporaryDirectory(prefix="hamtune-ckpt-") as d:
            # A scratch folder Tune copies into the experiment and then drops: no atomic write or fsync needed here
            # (an fsync of the ~60 MB state was a third of a short trial's overhead); Tune registers the copy only
            # once it is complete.
            torch.save(make_state(), Path(d) / STATE_FILE)
            (Path(d) / INFO_FILE).write_bytes(checkpoint_info(epochs_done))  # lets the pruning skip the big file
            tune.report({**metrics, "trial_status": "ok"}, checkpoint=tune.Checkpoint.from_directory(d))
        _inject_crash(epochs_done)

    try:
        cfg = TrainConfig.from_dict({**fixed, **config, "num_threads": max(1, int(cpus))})
        torch.set_num_threads(cfg.num_threads)
        state = None
        checkpoint = tune.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                state = load_state(Path(d) / STATE_FILE)
            epochs_done = int(state.get("epoch", 0))
        initial = None
        if state is None and cfg.pretrained is not False:
            initial = (weights or {}).get(preflight.weights_key(cfg.model, cfg.pretrained))
            if initial is None:
                raise HamtuneError(f"pretrained: the search shipped no weights for model {cfg.model!r} with "
                                   f"pretrained={cfg.pretrained!r}")
        result = fit(cfg, train, val, on_epoch=on_epoch, state=state, weights=initial)
    except HamtuneError as exc:
        import traceback

        _report_final(ERROR, str(exc), epochs_done + 1, traceback=traceback.format_exc())
        return
    if result.status == NON_FINITE:
        _report_final(NON_FINITE, result.message, result.epochs_run + 1, result.history[-1] if result.history else {})


def _report_final(status: str, message: str, epoch: int, last_metrics: dict | None = None, **extra: str) -> None:
    """End a trial that cannot go on: NaN metrics (ASHA ignores them in its cutoffs; Optuna records a failure)."""
    nan_metrics = {k: math.nan for k in (last_metrics or {}) if k.startswith("val_")}
    tune.report({**nan_metrics, "val_balanced_accuracy": math.nan, "val_loss": math.nan, "train_loss": math.nan,
                 "epoch": epoch, "trial_status": status, "message": message, **extra})


def _inject_crash(epoch: int) -> None:
    """Fault injection for the fault-tolerance tests, in the spirit of Ray's own RAY_testing_* switches.

    HAMTUNE_INJECT_CRASH=<marker file> makes the first trial that finishes epoch 1 raise once;
    HAMTUNE_INJECT_KILL=<marker file> makes it SIGKILL its own worker process once (what Ray's memory monitor or an
    out-of-memory kill does to it). The marker file records that it happened, across processes; unset in normal use.
    """
    for variable, fault in (("HAMTUNE_INJECT_CRASH", "raise"), ("HAMTUNE_INJECT_KILL", "kill")):
        marker = os.environ.get(variable)
        if not marker or epoch != 1:
            continue
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            continue
        os.close(fd)
        if fault == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError("injected crash (HAMTUNE_INJECT_CRASH)")
