"""What `hamtune search` prints at its end and `hamtune results` prints: the state, what early stopping saved, the
leaderboard, and on request the hyperparameters' importance; all read from the experiment's own files."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from hamtune.errors import HamtuneError
from hamtune.search import tables as res
from hamtune.search.savings import compute_payoff, describe_payoff

IMPORTANCE_FILE = "importance.png"


def search_summary(outcome) -> list[str]:
    """The lines after a search (a hamtune.search.driver.SearchOutcome); refuses a search no trial of which
    reported the metric, saying why."""
    spec, trials = outcome.spec, outcome.trials
    if f"best_{spec.search.metric}" not in trials.columns:  # every trial failed before its first report
        raise res.no_result_error(trials, spec.search.metric)
    record = res.read_experiment(outcome.exp_dir)
    _, history = res.load_tables(outcome.exp_dir)
    board = res.leaderboard(trials, metric=spec.search.metric, mode=spec.search.mode, top=10)
    lines = ["", f"experiment {spec.experiment}: {outcome.state} in {outcome.wall_time_s:.0f} s"
             + (f", warm-started from {outcome.warm_start.name}" if outcome.warm_start else "")]
    lines += describe_payoff(compute_payoff(trials, history, record))
    lines += coverage_lines(trials, record)
    lines += [res.format_table(board), "", f"tables and plots: {outcome.exp_dir}/  (hamtune results "
              f"{spec.experiment}; hamtune best {spec.experiment} --retrain)"]
    if outcome.state != "finished":
        lines.append(f"resume with: hamtune search --resume {spec.experiment}")
    return lines


def coverage_lines(trials: pd.DataFrame, record: dict) -> list[str]:
    """For every searched `choice`: how many trials each value got and how far they went, so a value the search
    never tried (or only ever cut early) is said, not hidden."""
    from hamtune.search.space import searched
    from hamtune.vocab import COMPLETED

    metric, mode = record["metric"], record.get("mode", "max")
    max_epochs = int(record.get("max_epochs") or 0)
    lines = []
    for key, dist in searched(record.get("spec", {}).get("space", {})).items():
        column = f"config.{key}"
        if not dist.is_choice or column not in trials.columns:
            continue
        parts = []
        for value in dist.args:
            got = trials[trials[column].map(lambda v, value=value: v == value)]
            if got.empty:
                parts.append(f"{value}: 0 trials")
                continue
            full = int((got["status"] == COMPLETED).sum())
            scores = got.get(f"best_{metric}", pd.Series(dtype=float))
            best = scores.max() if mode == "max" else scores.min()
            reached = int(got["epochs"].max())
            parts.append(f"{value}: {len(got)} trial{'s' if len(got) != 1 else ''} ({full} ran all {max_epochs} "
                         f"epochs, furthest epoch {reached}" + (f", best {best:.3f}" if pd.notna(best) else "") + ")")
        lines.append(f"{key}: " + "; ".join(parts))
    return lines


def experiments_listing(results_dir: Path, fmt: str = "table") -> str:
    """Every experiment under results_dir, oldest first, or how to start one."""
    experiments = res.list_experiments(results_dir)
    if not experiments:
        return f"no experiments under {results_dir}/ yet (run `hamtune search --space search_spaces/default.yaml`)"
    return res.format_table(pd.DataFrame(experiments), fmt)


def experiment_summary(name: str | None, results_dir: Path, *, top: int | None = None, sort: str | None = None,
                       fmt: str = "table", importance: bool = False) -> list[str]:
    """One experiment: its state and savings (table format only), its leaderboard, and optionally the importance of
    each searched hyperparameter (printed, and plotted to importance.png)."""
    if importance and not name:
        raise HamtuneError("--importance needs an experiment: hamtune results NAME --importance")
    exp_dir = res.experiment_dir(name, results_dir)
    record = res.read_experiment(exp_dir)
    trials, history = res.load_tables(exp_dir)
    board = res.leaderboard(trials, metric=record["metric"], mode=record["mode"], sort=sort, top=top)
    lines = []
    if fmt == "table":
        lines.append(f"{record['name']}: {record.get('state')}, {len(trials)} trials, metric {record['metric']} "
                     f"({record['mode']})" + (f", warm-started from {record['warm_start']['experiment']}"
                                              if record.get("warm_start") else ""))
        lines += describe_payoff(compute_payoff(trials, history, record))
        lines += coverage_lines(trials, record)
    lines.append(res.format_table(board, fmt))
    if importance:
        from hamtune.reports.search_plots import plot_importance
        from hamtune.search.importance import describe_importance, param_importance

        scores, what = param_importance(trials, record)
        lines += ["", what]
        if scores is not None:
            lines += describe_importance(scores)
            path = plot_importance(scores, exp_dir / IMPORTANCE_FILE, f"{record['name']}: {what.split(' (')[0]}")
            lines.append(f"wrote {path}")
    return lines

