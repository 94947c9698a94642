"""What a trial imports: a fresh worker process's imports for one trial, this tree against an earlier commit, side by
side.

Every Ray worker that starts a trial (and every trial without actor reuse) pays this import once. Each round runs both
trees in fresh interpreters, alternating, under `python -X importtime`; the table gives medians of the total import
time, of matplotlib's share (the data package used to import the exploration plots) and the number of modules.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

HEADING = "## Trial import path"
ROOT = Path(__file__).resolve().parents[1]
# A Ray worker unpickles the trainable (importing its module) and runs it. Before issue 18 the trainable was
# hamtune.trainable (one flat package); now it is hamtune.search.trainable.
CODE_BEFORE = "import ray.tune, hamtune.trainable"
CODE_AFTER = "import ray.tune, hamtune.search.trainable"


def measure(tree: Path, code: str) -> dict:
    """One fresh interpreter importing the trial's modules from `tree`; microseconds from -X importtime."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", code], env=env, capture_output=True, text=True,
                         check=True, cwd=tempfile.gettempdir())
    rows = []
    for line in out.stderr.splitlines():
        parts = line.removeprefix("import time:").split("|")
        if not line.startswith("import time:") or len(parts) != 3 or not parts[0].strip().isdigit():
            continue
        rows.append((parts[2].strip(), int(parts[0]), int(parts[1])))
    matplotlib = sum(self_us for name, self_us, _ in rows if name == "matplotlib" or name.startswith("matplotlib."))
    return {"total_s": total_us(rows) / 1e6, "matplotlib_s": matplotlib / 1e6, "modules": len(rows),
            "has_matplotlib": any(name == "matplotlib" for name, _, _ in rows)}


def total_us(rows: list[tuple[str, int, int]]) -> int:
    """Sum of the self times of every module imported: the whole import's cost, whatever imported what."""
    return sum(self_us for _, self_us, _ in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="867f7d1", help="the commit to compare against (default: before issue 18)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dry-run", action="store_true", help="print the section instead of writing BENCHMARKS.md")
    args = parser.parse_args()
    load_start = common.load_average()
    with tempfile.TemporaryDirectory(prefix="hamtune-before-") as scratch:
        before = Path(scratch) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(before), args.before],
                       check=True)
        try:
            measure(ROOT, CODE_AFTER), measure(before, CODE_BEFORE)  # warm the page cache for both
            runs = {"before": [], "after": []}
            for _ in range(args.rounds):
                runs["before"].append(measure(before, CODE_BEFORE))
                runs["after"].append(measure(ROOT, CODE_AFTER))
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before)], check=False)
    rows = ["| tree | import time (s, median) | of which matplotlib (s) | modules imported | matplotlib loaded |",
            "|---|---|---|---|---|"]
    for tag, label in (("before", f"before (`{args.before}`)"), ("after", "after (this tree)")):
        r = runs[tag]
        rows.append(f"| {label} | {statistics.median(x['total_s'] for x in r):.2f} | "
                    f"{statistics.median(x['matplotlib_s'] for x in r):.2f} | "
                    f"{statistics.median(x['modules'] for x in r):.0f} | {'yes' if r[0]['has_matplotlib'] else 'no'} |")
    ratio = statistics.median(a["total_s"] / b["total_s"] for a, b in zip(runs["after"], runs["before"]))
    body = (common.run_header(load_start) + "\n" + f"What a fresh trial process imports (`python -X importtime -c ...`: before "
            f"`{CODE_BEFORE}`, after `{CODE_AFTER}`), {args.rounds} rounds, the two "
            "trees alternating (medians); import time is the sum of every imported module's own time. The tests "
            "assert that this path loads neither matplotlib nor Optuna (tests/test_layout.py).\n\n" + "\n".join(rows) + f"\n\nAfter / before, median of per-round ratios: "
            f"**{ratio:.2f}**.\n")
    common.publish(HEADING, body, dry_run=args.dry_run)


if __name__ == "__main__":
    main()
