"""Per-trial overhead: what a search spends around its trials, with Ray Tune's actor reuse on and off.

Many very short trials (one epoch on a couple of hundred tiny images) make the fixed cost per trial visible: starting
or resetting a Ray actor, fetching the dataset from the object store, building the model, the per-epoch checkpoint
and report, the searcher and the results tables. Trials run one at a time (max_concurrent 1), so
wall time - sum of the trials' own time = the overhead, exactly.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

HEADING = "## Per-trial overhead"


def make_spec(args, name: str):
    from hamtune.search.spec import spec_from_dict

    return spec_from_dict({
        "experiment": name,
        "data": {"source": "synthetic", "synthetic_size": args.synthetic_size, "image_size": args.image_size,
                 "cache_dir": str(common.out_dir("cache"))},
        "model": {"name": "resnet10t", "head_hidden": 32, "head_dropout": 0.1},
        "train": {"epochs": 1, "batch_size": 32, "warmup_epochs": 0},
        "search": {"num_samples": args.trials, "max_concurrent": 1, "searcher": "optuna", "scheduler": "asha",
                   "grace_period": 1, "max_failures": 0, "seed": 0},
        "resources": {"cpu": 1},
        "space": {"lr": {"loguniform": [1e-3, 1e-2]}, "augment_strength": {"uniform": [0, 1]}},
    }, source="bench_overhead")


def one_search(args, reuse: bool, scratch: Path, tag: str) -> dict:
    import json

    from hamtune.search import tables as res
    from hamtune.search.driver import run_search

    spec = make_spec(args, f"overhead-{tag}")
    started = time.monotonic()
    outcome = run_search(spec, results_dir=scratch, verbose=0, reuse_actors=reuse)
    call_s = time.monotonic() - started
    trials, history = res.load_tables(outcome.exp_dir)
    # Tune's own per-trial clock: time_total_s covers the whole trainable call up to its last report
    tune_total = 0.0
    for path in (outcome.exp_dir / "tune").glob("*/result.json"):
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        tune_total += float(lines[-1]["time_total_s"]) if lines else 0.0
    return {
        "reuse": reuse, "trials": len(trials), "statuses": sorted(set(trials["status"])),
        "fit_wall_s": outcome.wall_time_s, "call_s": call_s,
        "epoch_s": float(history["epoch_time_s"].sum()),  # fit(): train + evaluate, as measured inside the trial
        "tune_s": tune_total,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--synthetic-size", type=int, default=200)
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1, help="searches per setting, alternating on/off")
    parser.add_argument("--dry-run", action="store_true", help="print the section instead of writing BENCHMARKS.md")
    args = parser.parse_args()
    load_at_start = common.load_average()

    from hamtune.data import prepare
    from hamtune.search.driver import init_ray

    data = prepare("synthetic", args.image_size, cache_dir=common.out_dir("cache"), synthetic_size=args.synthetic_size,
                   progress=False)
    train_images = data.split_sizes()["train"]["images"]
    scratch = common.scratch_dir("overhead")
    init_ray(None, num_cpus=os.cpu_count())
    # Warm-up: the first search in a Ray session also pays for starting Ray's worker pool and importing torch there.
    warm = argparse.Namespace(**{**vars(args), "trials": 2})
    one_search(warm, True, scratch, "warmup")

    runs = []
    for i in range(args.repeats):
        for reuse in (True, False) if i % 2 == 0 else (False, True):
            r = one_search(args, reuse, scratch, f"{'reuse' if reuse else 'fresh'}-{i}")
            runs.append(r)
            print(r, flush=True)
            if r["statuses"] != ["completed"]:
                raise SystemExit(f"overhead search ended with trial statuses {r['statuses']}")

    rows, per_trial = [], {}
    for reuse in (True, False):
        rs = [r for r in runs if r["reuse"] == reuse]
        med = {k: statistics.median(r[k] for r in rs) for k in ("fit_wall_s", "call_s", "epoch_s", "tune_s")}
        n = args.trials
        over_epoch = (med["fit_wall_s"] - med["epoch_s"]) / n
        over_tune = (med["fit_wall_s"] - med["tune_s"]) / n
        per_trial[reuse] = over_epoch
        rows.append([
            "on" if reuse else "off", common.fmt(med["call_s"], 1), common.fmt(med["fit_wall_s"], 1),
            common.fmt(med["tune_s"], 1), common.fmt(med["epoch_s"], 1), f"**{over_epoch:.2f}**",
            f"{over_tune:.2f}", f"{med['epoch_s'] / med['fit_wall_s']:.0%}",
        ])
    body = [
        common.run_header(load_at_start),
        f"Setup: {args.trials} trials x 1 epoch on the synthetic set of {args.synthetic_size} images "
        f"({train_images} in train) at {args.image_size} px, resnet10t (head 32), batch 32, Optuna + ASHA, 1 CPU per "
        f"trial, **max_concurrent 1** (trials one after another, so wall - trial time = overhead exactly). One Ray "
        f"session for all searches, warmed up by a 2-trial search first; {args.repeats} search(es) per setting, "
        f"alternating when more than one, medians shown.\n",
        "Columns: *run_search* = the whole call (prepare from the cache, Tuner, tables, plots); *Tuner.fit* = the "
        "search itself; *trainable time* = sum over trials of Tune's time_total_s (the trainable's call: data "
        "fetch, model build, training, evaluation, checkpoints, reports); *train + eval* = sum of the history's "
        "epoch_time_s (fit's own epoch: training + evaluation). Overhead per trial = (Tuner.fit - that sum) / "
        "trials.\n",
        common.md_table(["reuse_actors", "run_search (s)", "Tuner.fit (s)", "trainable time (s)", "train + eval (s)",
                         "overhead per trial vs train + eval (s)", "overhead per trial vs trainable time (s)",
                         "share of wall spent training"], rows),
        f"Actor reuse saves {per_trial[False] - per_trial[True]:.2f} s per trial here "
        f"({per_trial[True]:.2f} s with reuse vs {per_trial[False]:.2f} s without). The rest of the overhead is "
        "Tune's own loop per trial (searcher suggestion, scheduling, the checkpoint written and registered every "
        "epoch, our results callback) and the trainable's set-up (fetching train/val from the object store, "
        "building the model). With real trials of minutes per epoch it is negligible; it matters only for trials "
        "this short.\n",
    ]
    text = "\n".join(body)
    common.publish(HEADING, text, dry_run=args.dry_run)
    common.prune_checkpoints(scratch)


if __name__ == "__main__":
    main()
