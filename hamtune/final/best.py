"""`hamtune best`: the best trial (or the top K) of an experiment, described, and on request retrained into the final
model (hamtune.final.retrain)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from hamtune.errors import HamtuneError
from hamtune.search import tables as res
from hamtune.search.choose import choose_top, describe_best

Echo = Callable[[str], None]


def best(name: str | None, *, results_dir: Path = res.RESULTS_DIR, top: int = 1, metric: str | None = None,
         mode: str | None = None, retrain: bool = False, epochs: int | None = None,
         seeds: Sequence[int] | None = None, tta: bool = False, calibration: float | None = None,
         echo: Echo = print) -> None:
    """Describe the `top` best trials of experiment `name` (default: the latest); with retrain, retrain them."""
    if not retrain and (epochs is not None or seeds or tta or calibration is not None):
        raise HamtuneError("--epochs, --seeds, --tta and --calibration apply to the retrain: add --retrain")
    exp_dir = res.experiment_dir(name, results_dir)
    choices = choose_top(exp_dir, top, metric=metric, mode=mode)
    if len(choices) < top:
        raise HamtuneError(f"--top {top}: experiment {exp_dir.name} has only {len(choices)} completed or "
                           "stopped trial(s) with that metric")
    for i, choice in enumerate(choices):
        text = describe_best(choice)
        if len(choices) > 1:  # one header for the experiment, then each trial as "#rank trial ..."
            header, _, rest = text.partition("\n")
            text = (f"{header.replace('best of', f'top {len(choices)} of')}\n" if i == 0 else "\n") + f"#{i + 1} {rest}"
        echo(text)
    if retrain:
        from hamtune.final.retrain import retrain as retrain_choices

        echo("")
        outcome = retrain_choices(choices, epochs=epochs, seeds=seeds, tta=tta, calibration=calibration, echo=echo)
        uri = choices[0].record.get("mlflow")
        if uri:  # the search logged its trials to MLflow: the final model joins them there
            from hamtune.final.tracking import log_final_model

            run_id = log_final_model(uri, exp_dir.name, outcome.metrics, outcome.files)
            echo(f"logged the final model to MLflow ({uri}, experiment {exp_dir.name}, run {run_id})")
