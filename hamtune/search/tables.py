"""Experiment results as tables a person can read: trials (one row per trial) and history (one row per epoch), and
the experiment record (experiment.json) beside them.

Tables are plain pandas; this module knows nothing of Ray. The driver's callback feeds it reported results;
`hamtune results` and `hamtune best` read what it wrote.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import pandas as pd

from hamtune.errors import HamtuneError
from hamtune.vocab import COMPLETED, ERROR, INTERRUPTED, NON_FINITE, PAUSED, PENDING, RAN_TO_END, RUNNING, STOPPED

RESULTS_DIR = Path("results")
EXPERIMENT_FILE = "experiment.json"


def metric_values(result: Mapping[str, Any], drop: Iterable[str] = ()) -> dict[str, Any]:
    """The metrics of one report without the `drop` keys (the searcher's bookkeeping); `epoch` is the epoch clock."""
    drop = set(drop)
    row = {k: v for k, v in result.items() if k not in drop and not isinstance(v, (dict, list))}
    row["epoch"] = int(result.get("epoch", result.get("training_iteration", 0)))
    return row


def creation_index(experiment_tag: str | None, fallback: int) -> int:
    """A trial's place in the searcher's order, 0-based, from Tune's experiment tag ("<counter>_<params>"): Tune's
    list of trials comes back in another order after a restore, the tag never changes."""
    head = str(experiment_tag or "").split("_", 1)[0]
    return int(head) - 1 if head.isdigit() and int(head) > 0 else fallback


def history_table(rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per trial and epoch; a re-reported epoch (a trial resumed from an older checkpoint) keeps its latest."""
    df = pd.DataFrame(list(rows))
    if df.empty:
        return pd.DataFrame(columns=["trial_id", "epoch"])
    df = df.drop_duplicates(["trial_id", "epoch"], keep="last").sort_values(["trial_id", "epoch"], kind="stable")
    return df.reset_index(drop=True)


def trials_table(trials: Iterable[Mapping[str, Any]], history: pd.DataFrame, *, metric: str, mode: str,
                 max_epochs: int) -> pd.DataFrame:
    """One row per trial: id, status, config, epochs run, best and last of every metric, the epoch of the best.

    `trials` are mappings with trial_id, trial_index (the order the searcher made them in), tune_status
    (PENDING/RUNNING/TERMINATED/ERROR), config, wall_time_s and optionally best_checkpoint; `history` is
    history_table's output.
    """
    trials = list(trials)
    metric_cols = [c for c in history.columns if c not in ("trial_id", "epoch", "trial_status")
                   and pd.api.types.is_numeric_dtype(history[c])]
    lower_is_better = [c for c in metric_cols if c.endswith("loss") or c == "epoch_time_s"]
    higher_is_better = [c for c in metric_cols if c not in lower_is_better]
    by_trial = history.groupby("trial_id", sort=False)
    summary = pd.concat([
        by_trial["epoch"].max().rename("epochs"),
        by_trial[lower_is_better].min().add_prefix("best_"),
        by_trial[higher_is_better].max().add_prefix("best_"),
        history.drop_duplicates("trial_id", keep="last").set_index("trial_id")[metric_cols].add_prefix("last_"),
    ], axis=1) if len(history) else pd.DataFrame()
    if len(history) and metric in history.columns:
        scored = history.dropna(subset=[metric])
        peak = scored.groupby("trial_id")[metric].idxmax() if mode == "max" else \
            scored.groupby("trial_id")[metric].idxmin()
        best_epoch = scored.loc[peak.to_numpy()].set_index("trial_id")["epoch"].astype(int)
    else:
        best_epoch = pd.Series(dtype="int64")
    non_finite = set(history.loc[history["trial_status"] == NON_FINITE, "trial_id"]) \
        if "trial_status" in history.columns else set()
    input_error = set(history.loc[history["trial_status"] == ERROR, "trial_id"]) \
        if "trial_status" in history.columns else set()
    # the one-line reason a trial ended early (an input error, a non-finite loss)
    messages = history.dropna(subset=["message"]).groupby("trial_id")["message"].last() \
        if "message" in history.columns else pd.Series(dtype=object)

    rows = []
    for t in trials:
        trial_id = t["trial_id"]
        s = summary.loc[trial_id] if trial_id in summary.index else pd.Series(dtype=float)
        epochs = int(s.get("epochs", 0))
        row: dict[str, Any] = {
            "trial_id": trial_id,
            "trial_index": t.get("trial_index"),  # the searcher's order (Tune's ids are random, not counters)
            "status": ERROR if trial_id in input_error else
                      trial_status(t["tune_status"], epochs, max_epochs, trial_id in non_finite),
            "epochs": epochs,
            **{f"config.{k}": v for k, v in sorted((t.get("config") or {}).items())},
            "best_epoch": int(best_epoch[trial_id]) if trial_id in best_epoch.index else None,
        }
        for c in metric_cols:
            if pd.notna(s.get(f"best_{c}", math.nan)):
                row[f"best_{c}"] = float(s[f"best_{c}"])
                row[f"last_{c}"] = float(s[f"last_{c}"])
        row["message"] = messages.get(trial_id)
        row["wall_time_s"] = t.get("wall_time_s")
        row["best_checkpoint"] = t.get("best_checkpoint")
        rows.append(row)
    return pd.DataFrame(rows)


def trial_status(tune_status: str, epochs: int, max_epochs: int, non_finite: bool) -> str:
    """Tune's status in words a user cares about: completed, stopped early by ASHA, non_finite, error, interrupted."""
    if non_finite:
        return NON_FINITE
    if tune_status == "TERMINATED":
        return COMPLETED if epochs >= max_epochs else STOPPED
    return {"ERROR": ERROR, "RUNNING": RUNNING, "PENDING": PENDING, "PAUSED": PAUSED,
            "INTERRUPTED": INTERRUPTED}.get(tune_status, tune_status.lower())


# ---------------------------------------------------------------------------------------------------------------
# Reading experiments back


def experiment_dir(name: str | None, results_dir: Path = RESULTS_DIR) -> Path:
    """The folder of a named experiment, or of the most recent one when no name is given."""
    if name:
        path = results_dir / name
        if not (path / EXPERIMENT_FILE).is_file():
            known = ", ".join(e["name"] for e in list_experiments(results_dir)) or "none"
            raise HamtuneError(f"{path}: no experiment named '{name}' (experiments under {results_dir}/: {known})")
        return path
    experiments = list_experiments(results_dir)
    if not experiments:
        raise HamtuneError(f"{results_dir}/: no experiments yet (run `hamtune search --space search_spaces/default.yaml`)")
    return results_dir / experiments[-1]["name"]


def unused_name(name: str, results_dir: Path = RESULTS_DIR) -> str:
    """`name`, or `name-2`, `name-3`... so that a new search never writes into an existing experiment."""
    candidate, n = name, 1
    while (results_dir / candidate / EXPERIMENT_FILE).exists():
        n += 1
        candidate = f"{name}-{n}"
    return candidate


def read_experiment(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / EXPERIMENT_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise HamtuneError(f"{path / EXPERIMENT_FILE}: unreadable experiment record ({exc})") from None


def list_experiments(results_dir: Path = RESULTS_DIR) -> list[dict[str, Any]]:
    """Experiments under results_dir, oldest first, with their state and trial counts."""
    out = []
    if not results_dir.is_dir():
        return out
    for d in results_dir.iterdir():
        if not (d / EXPERIMENT_FILE).is_file():
            continue
        try:
            rec = json.loads((d / EXPERIMENT_FILE).read_text())
        except (OSError, json.JSONDecodeError):
            continue
        trials = d / "trials.parquet"
        n = len(pd.read_parquet(trials, columns=["trial_id"])) if trials.is_file() else 0
        out.append({"name": d.name, "state": rec.get("state", "?"), "trials": n, "created": rec.get("created", ""),
                    "metric": rec.get("metric", "")})
    return sorted(out, key=lambda e: (e["created"], e["name"]))


def load_tables(path: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    trials, history = path / "trials.parquet", path / "history.parquet"
    if not trials.is_file():
        raise HamtuneError(f"{trials}: no results table yet (the search has not finished a trial)")
    return pd.read_parquet(trials), (pd.read_parquet(history) if history.is_file() else pd.DataFrame())


def leaderboard(trials: pd.DataFrame, *, metric: str, mode: str, sort: str | None = None, top: int | None = None) -> pd.DataFrame:
    """Trials ranked by their best value of `sort` (default: the experiment's metric), compact columns first."""
    key = sort or metric
    col = key if key in trials.columns else f"best_{key}"
    if col not in trials.columns:
        choices = sorted(c for c in trials.columns if c.startswith("best_") or c.startswith("config."))
        raise HamtuneError(f"--sort {key!r}: no such column (expected a metric such as {metric} or one of: {', '.join(choices)})")
    ascending = (mode == "min") if key == metric else key.endswith("loss") or key.startswith("config.") or key in ("wall_time_s",)
    board = trials.sort_values(col, ascending=ascending, na_position="last", kind="stable")
    config_cols = [c for c in board.columns if c.startswith("config.")]
    front = ["trial_id", "status", "epochs", f"best_{metric}", "best_epoch"]
    extra = [c for c in (col, "best_val_loss", "wall_time_s") if c in board.columns and c not in front]
    cols = [c for c in front if c in board.columns] + extra + config_cols
    board = board[cols].rename(columns=lambda c: c.removeprefix("config."))
    return board.head(top) if top else board


MEMORY_KILL = "running low on memory"  # what Ray says when its memory monitor kills a worker


def crash_reason(trial_dir: str | None) -> str | None:
    """The cause line of Tune's error.txt for a crashed trial (local folders only), or None."""
    error_file = Path(trial_dir) / "error.txt" if trial_dir else None
    if error_file is None or not error_file.is_file():
        return None
    text = error_file.read_text(errors="replace")
    if MEMORY_KILL in text:
        return f"its worker was killed by Ray's memory monitor (the node was {MEMORY_KILL})"
    return cause_line(text)


def cause_line(text: str) -> str | None:
    """What a traceback says happened: its last "SomeError: ..." line (else its last line), cut to 300 characters;
    None for an empty text. Tune wraps a trial's or its own failure in such a text."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    cause = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Exit|Interrupt)\b", line)]
    return ((cause or lines or [""])[-1])[:300] or None

MEMORY_ADVICE = (" Ray's memory monitor killed trial workers (the machine ran out of memory): lower "
                 "search.max_concurrent (--max-concurrent), data.image_size or train.batch_size.")


def no_result_error(trials: pd.DataFrame, metric: str) -> HamtuneError:
    """Why there is nothing to rank: the trials' end states and the first error message a trial left."""
    counts = ", ".join(f"{n} {s}" for s, n in trials["status"].value_counts().items()) if "status" in trials else ""
    messages = trials.loc[trials["status"] == ERROR, "message"].dropna() if "message" in trials else pd.Series()
    first = f"; first error: {messages.iloc[0]}" if len(messages) else ""
    advice = MEMORY_ADVICE if messages.astype(str).str.contains(MEMORY_KILL).any() else ""
    return HamtuneError(f"no completed or stopped trial reported '{metric}' (trials: {counts or 'none'}){first}."
                        f"{advice}")


def best_trial(trials: pd.DataFrame, *, metric: str, mode: str) -> pd.Series:
    col = f"best_{metric}"
    ok = trials[trials["status"].isin(RAN_TO_END) & trials.get(col, pd.Series(dtype=float)).notna()] \
        if col in trials.columns else trials.iloc[0:0]
    if ok.empty:
        raise no_result_error(trials, metric)
    idx = ok[col].idxmax() if mode == "max" else ok[col].idxmin()
    return ok.loc[idx]


def format_table(df: pd.DataFrame, fmt: str = "table") -> str:
    """Render for a terminal (aligned, rounded), or as CSV / Markdown for pasting elsewhere."""
    if fmt == "csv":
        return df.to_csv(index=False)
    shown = df.copy()
    for c in shown.columns:
        if pd.api.types.is_float_dtype(shown[c]):
            shown[c] = shown[c].map(lambda v: "" if pd.isna(v) else (f"{v:.4g}" if abs(v) < 1e-3 or abs(v) >= 1e4 else f"{v:.4f}"))
    if fmt == "markdown":
        header = "| " + " | ".join(map(str, shown.columns)) + " |"
        sep = "|" + "|".join("---" for _ in shown.columns) + "|"
        body = ["| " + " | ".join("" if pd.isna(v) else str(v) for v in row) + " |" for row in shown.itertuples(index=False)]
        return "\n".join([header, sep, *body])
    if fmt != "table":
        raise HamtuneError(f"--format {fmt!r}: expected table, csv or markdown")
    return shown.to_string(index=False)


def ended_for_good(trials: pd.DataFrame) -> pd.Series:
    """Which trials will never run again: completed, stopped, non-finite, or ended by an input error (an "error"
    with a one-line message; a crash without one may still be retried by Tune)."""
    ended = trials["status"].isin([COMPLETED, STOPPED, NON_FINITE])
    if "message" in trials.columns:
        ended |= (trials["status"] == ERROR) & trials["message"].notna()
    return ended
