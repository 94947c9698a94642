"""The same spec and seed give the same search: search_spaces/default.yaml run twice, once alone and once beside
another heavy job (a process that keeps one of the two cores busy throughout), and the two trials tables compared
in the searcher's order.

With search.deterministic (the default) the searcher proposes in waves and OrderedASHA decides in trial order, so
the trials, the epochs each ran and their metrics must agree; what may differ is only timing. The loaded run
also shows what the load costs in wall time.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

HEADING = "## Same seed, same search: default.yaml alone and beside a heavy job"
COMPARED = ["status", "epochs", "best_epoch", "config.lr", "config.weight_decay", "config.augment_strength",
            "config.imbalance", "best_val_balanced_accuracy", "best_val_loss", "last_val_loss"]


def run(spec_path: Path, name: str, results: Path, load: int) -> dict:
    from hamtune.search import tables as res

    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(load)]
    started = time.monotonic()
    try:
        done = subprocess.run([sys.executable, "-m", "hamtune.cli", "search", "--space", str(spec_path), "--name",
                               name, "--results-dir", str(results)], capture_output=True, text=True)
    finally:
        for b in burners:
            b.kill()
            b.wait()
    wall = time.monotonic() - started
    (results / f"{name}.out").write_text(done.stdout + "\n--- stderr ---\n" + done.stderr)  # for a look afterwards
    if done.returncode != 0:
        raise SystemExit(f"bench_determinism: the {name} search failed: {done.stderr.strip()[-800:]}")
    trials, _ = res.load_tables(results / name)
    return {"name": name, "load": load, "wall_s": wall, "load_at_end": common.load_average(),
            "trials": trials.sort_values("trial_index")[COMPARED].reset_index(drop=True)}


def main() -> None:
    import pandas as pd

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", type=Path, default=common.ROOT / "search_spaces" / "default.yaml")
    parser.add_argument("--dry-run", action="store_true", help="print the section instead of writing BENCHMARKS.md")
    args = parser.parse_args()
    load_at_start = common.load_average()
    results = common.scratch_dir("determinism")
    quiet = run(args.space, "quiet", results, load=0)
    loaded = run(args.space, "loaded", results, load=1)
    a, b = quiet["trials"], loaded["trials"]
    numeric = [c for c in COMPARED if pd.api.types.is_float_dtype(a[c])]
    exact = [c for c in COMPARED if c not in numeric]
    same_shape = a.shape == b.shape
    same_exact = same_shape and a[exact].equals(b[exact])
    max_diff = float((a[numeric] - b[numeric]).abs().max().max()) if same_shape else float("nan")
    identical = same_exact and max_diff <= 1e-4
    common.prune_checkpoints(results)
    rows = [[r["name"], "none" if r["load"] == 0 else "one core kept busy by another process",
             f"{r['wall_s']:.0f}", len(r["trials"]), int((r["trials"]["status"] == "stopped").sum()),
             int(r["trials"]["epochs"].sum())] for r in (quiet, loaded)]
    per_trial = [[i, *(a.loc[i, c] for c in ("config.imbalance", "status", "epochs")),
                  f"{a.loc[i, 'best_val_balanced_accuracy']:.4f}", f"{b.loc[i, 'best_val_balanced_accuracy']:.4f}"]
                 for i in range(len(a))] if same_shape else []
    body = "\n\n".join([
        common.run_header(load_at_start),
        f"`{args.space.relative_to(common.ROOT)}` (seed 0, 10 trials, TPE + ASHA, 2 at a time, "
        "search.deterministic on) run twice in a row; the second time another process keeps one core busy "
        "throughout, so the trials run at other speeds and finish in another order.",
        common.md_table(["run", "other load", "wall (s)", "trials", "stopped by ASHA", "trial-epochs"], rows),
        f"**Trials tables compared in the searcher's order** ({', '.join(COMPARED)}): "
        f"{'identical' if identical else 'DIFFERENT'}; configs, statuses and epochs "
        f"{'equal' if same_exact else 'differ'}, largest metric difference {max_diff:.2g} (float noise allowed: "
        "1e-4). The loaded run took "
        f"{loaded['wall_s'] / quiet['wall_s']:.2f}x the quiet run's wall time.",
        common.md_table(["trial", "imbalance", "status", "epochs", "best val BA (quiet)", "best val BA (loaded)"],
                        per_trial),
    ])
    common.publish(HEADING, body, dry_run=args.dry_run)


if __name__ == "__main__":
    main()
