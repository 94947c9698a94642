"""Bounded disk for a search's checkpoints.

While a trial runs, Tune keeps what a resume needs: its latest checkpoint (full state: weights, optimiser, RNGs)
and its best one (CheckpointConfig(num_to_keep=1) in hamtune.search.driver). Once a trial has ended, only its best weights can
still matter, and only if it ranks among the best `search.keep_best_checkpoints` trials: the best checkpoint of
those is slimmed to weights + config + history (no optimiser state), every other checkpoint is deleted. A ResNeXt-101
state with AdamW is three times its weights; keeping 3 trials' weights instead of 32 trials' two full states is what
bounds a search's disk.

Works on the storage path through pyarrow's filesystem (a local folder, s3://, gs://), as Tune itself does. Only
trials that ended for good are touched: a crashed trial that Tune may retry, or an interrupted one a resume
continues, keeps everything.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterable, Mapping

from hamtune.vocab import RAN_TO_END

log = logging.getLogger("hamtune")
STATE_FILE = "state.pt"
INFO_FILE = "checkpoint.json"  # {"epoch": N, "weights_only": bool}: read instead of the (large) state file
WEIGHTS_KEYS = ("format", "epoch", "config", "model", "history")


def checkpoint_info(epoch: int) -> bytes:
    return json.dumps({"epoch": int(epoch), "weights_only": False}).encode()


def _filesystem(uri: str):
    from pyarrow import fs

    return fs.FileSystem.from_uri(uri)[0]


def _read_info(filesystem, path: str) -> dict:
    """A checkpoint's small JSON file through the storage's filesystem (local, s3://, gs://); {} if unreadable."""
    try:
        with filesystem.open_input_stream(path) as f:
            return json.loads(f.read().decode())
    except (OSError, ValueError):
        return {}


def _write_atomically(filesystem, path: str, data: bytes) -> None:
    tmp = f"{path}.tmp"
    with filesystem.open_output_stream(tmp) as f:
        f.write(data)
    filesystem.move(tmp, path)


def _checkpoint_dirs(filesystem, trial_path: str) -> list[str]:
    from pyarrow import fs

    try:
        entries = filesystem.get_file_info(fs.FileSelector(trial_path, allow_not_found=True))
    except OSError:
        return []
    return sorted(e.path for e in entries if e.type == fs.FileType.Directory and e.base_name.startswith("checkpoint_"))


def slim(filesystem, checkpoint_dir: str) -> None:
    """Rewrite a checkpoint's state file with the weights, config and history only (idempotent)."""
    import torch

    info = _read_info(filesystem, f"{checkpoint_dir}/{INFO_FILE}")
    if info.get("weights_only"):
        return
    with filesystem.open_input_stream(f"{checkpoint_dir}/{STATE_FILE}") as f:
        state = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
    buffer = io.BytesIO()
    torch.save({k: state[k] for k in WEIGHTS_KEYS if k in state}, buffer)
    _write_atomically(filesystem, f"{checkpoint_dir}/{STATE_FILE}", buffer.getvalue())
    _write_atomically(filesystem, f"{checkpoint_dir}/{INFO_FILE}",
                      json.dumps({**info, "weights_only": True}).encode())


def prune(storage_uri: str, trial_paths: Mapping[str, str], trials, *, ended: Iterable[str],
          metric: str, mode: str, keep: int) -> dict[str, str]:
    """Apply the rule above to the trials in `ended`; returns {trial_id: best checkpoint dir} of the kept ones.

    trials is the trials table (status, best_<metric>, best_epoch); trial_paths maps trial ids to their folders on
    the filesystem of storage_uri. Idempotent: run after every trial that ends, and once more at the end.
    """
    import pandas as pd  # here, not at import: a trial's worker imports this module for INFO_FILE only

    ended = set(ended)
    column = f"best_{metric}"
    if trials.empty or column not in trials.columns:
        ranked = trials.iloc[0:0]
    else:
        ranked = trials[trials["trial_id"].isin(ended) & trials["status"].isin(RAN_TO_END)
                        & trials[column].notna()].sort_values(column, ascending=mode == "min", kind="stable")
    keepers = set(ranked["trial_id"].head(keep))
    best_epochs = dict(zip(trials["trial_id"], trials["best_epoch"])) if "best_epoch" in trials.columns else {}
    filesystem = _filesystem(storage_uri)
    kept: dict[str, str] = {}
    for trial_id in sorted(ended):
        path = trial_paths.get(trial_id)
        if not path:
            continue
        checkpoints = _checkpoint_dirs(filesystem, path)
        best = None
        if trial_id in keepers:
            wanted = best_epochs.get(trial_id)
            matches = [c for c in checkpoints
                       if pd.notna(wanted) and _read_info(filesystem, f"{c}/{INFO_FILE}").get("epoch") == int(wanted)]
            if not matches:
                continue  # cannot tell which one is the best: delete nothing rather than the wrong one
            best = matches[-1]
        for checkpoint in checkpoints:
            if checkpoint != best:
                try:
                    filesystem.delete_dir(checkpoint)
                except OSError as exc:  # Tune may be deleting the same old checkpoint
                    log.debug("could not delete %s: %s", checkpoint, exc)
        if best is not None:
            slim(filesystem, best)
            kept[trial_id] = best
    return kept
