"""OrderedASHA's rebuild after a resume, on the tables a killed driver leaves: the decisions of a resumed search are
those of an uninterrupted one fed the same results, even with rows of a trial Tune never snapshotted.

The end-to-end kill -9 test (test_determinism.py) meets the ghost trial only when the kill lands between a table
write and Tune's next snapshot; this test builds that state on purpose so the case is always exercised. The
scheduler is real; Tune's controller is reduced to the two calls the scheduler makes of it."""

from __future__ import annotations

import pandas as pd
from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler

from hamtune.search.scheduler import OrderedASHA

METRIC = "val_balanced_accuracy"


class Controller:
    """What OrderedASHA asks of Tune's TuneController: its trials, and to stop one."""

    def __init__(self):
        self.trials: list[Trial] = []
        self.stopped: list[str] = []

    def get_trials(self):
        return self.trials

    def stop_trial(self, trial):
        self.stopped.append(trial.trial_id)


def make_trial(trial_id: str, index: int) -> Trial:
    return Trial("replay", config={}, trial_id=trial_id, experiment_tag=f"{index + 1}_x", stub=True)


def scheduler(history=None) -> OrderedASHA:
    return OrderedASHA(metric=METRIC, mode="max", max_t=3, grace_period=1, reduction_factor=2, history=history)


def report(sched, controller, trial, epoch, value) -> str:
    return sched.on_trial_result(controller, trial, {"training_iteration": epoch, METRIC: value})


def test_a_resumed_scheduler_ignores_rows_of_trials_tune_never_restored(tmp_path):
    a, b, c, d = (make_trial(f"t{i}", i) for i in range(4))
    # The uninterrupted run: a and b report epoch 1, then c (cut: below the median of a, b), then d.
    fresh, fresh_ctl = scheduler(), Controller()
    for t in (a, b, c, d):
        fresh_ctl.trials.append(t)
        fresh.on_trial_add(fresh_ctl, t)
    expected = [report(fresh, fresh_ctl, t, 1, v) for t, v in ((a, 0.5), (b, 0.6), (c, 0.4))]
    fresh.on_trial_complete(fresh_ctl, c, {"training_iteration": 1, METRIC: 0.4})  # Tune does so after a STOP
    expected.append(report(fresh, fresh_ctl, d, 1, 0.52))
    assert expected[2] == TrialScheduler.STOP and expected[3] == TrialScheduler.CONTINUE

    # The killed run's tables: a and b at epoch 1, and a ghost in c's place (created and reported after Tune's
    # last snapshot, so Tune restores a and b only; the searcher proposes c again under a new id).
    pd.DataFrame({"trial_id": ["t0", "t1", "ghost"], "trial_index": [0, 1, 2],
                  "status": ["running", "running", "running"]}).to_parquet(tmp_path / "trials.parquet")
    pd.DataFrame({"trial_id": ["t0", "t1", "ghost"], "epoch": [1, 1, 1],
                  METRIC: [0.5, 0.6, 0.9]}).to_parquet(tmp_path / "history.parquet")
    resumed, ctl = scheduler(tmp_path / "history.parquet"), Controller()
    for t in (a, b):  # Tune's resume adds its restored trials before the first step
        ctl.trials.append(t)
        resumed.on_trial_add(ctl, t)
    for t in (c, d):  # then the searcher's
        ctl.trials.append(t)
        resumed.on_trial_add(ctl, t)
    got = [report(resumed, ctl, c, 1, 0.4)]
    resumed.on_trial_complete(ctl, c, {"training_iteration": 1, METRIC: 0.4})
    got.append(report(resumed, ctl, d, 1, 0.52))
    assert got == expected[2:]  # with the ghost's 0.9 counted, d would be cut too

    # and the ghost, never ended, holds no one at the next rung
    assert report(resumed, ctl, d, 2, 0.55) == TrialScheduler.PAUSE  # a and b are still short of epoch 2
    d.set_status(Trial.PAUSED)
    for t, v in ((a, 0.5), (b, 0.6)):
        t.set_status(Trial.RUNNING)
        assert report(resumed, ctl, t, 2, v) == TrialScheduler.CONTINUE
    c.set_status(Trial.TERMINATED)
    assert resumed.choose_trial_to_run(ctl) is d and ctl.stopped == []  # d's 0.55 is not below a's and b's median


def test_a_resumed_scheduler_replays_the_decisions_the_tables_record(tmp_path):
    """A trial cut at a rung before the kill is stopped again, not run, when Tune restores it as pending."""
    a, b, c = (make_trial(f"t{i}", i) for i in range(3))
    pd.DataFrame({"trial_id": ["t0", "t1", "t2"], "trial_index": [0, 1, 2],
                  "status": ["running", "running", "running"]}).to_parquet(tmp_path / "trials.parquet")
    pd.DataFrame({"trial_id": ["t0", "t1", "t2"], "epoch": [1, 1, 1],
                  METRIC: [0.5, 0.6, 0.4]}).to_parquet(tmp_path / "history.parquet")
    resumed, ctl = scheduler(tmp_path / "history.parquet"), Controller()
    for t in (a, b, c):
        ctl.trials.append(t)
        resumed.on_trial_add(ctl, t)
    chosen = resumed.choose_trial_to_run(ctl)
    assert chosen is a and ctl.stopped == []
    a.set_status(Trial.RUNNING)
    b.set_status(Trial.RUNNING)
    assert resumed.choose_trial_to_run(ctl) is None and ctl.stopped == ["t2"]
