"""Prepare throughput: images/s of a cold-cache `prepare` (scan, validate, decode, resize, write cache, split).

Measures, in one run and each in a fresh temporary cache:
  * the real 140-image sample (70 at 600x450, 70 at 200x150) at 224 px and at 64 px;
  * generating N synthetic images (default 10,000) and preparing them at 64 px with 1 worker and with all CPUs,
    so the parallel speed-up is a ratio measured side by side;
  * a warm second prepare (cache reused: scan + fingerprint + memory-map only).
Wall time and CPU time (this process plus its worker processes) are both reported: on a shared machine the CPU
time per image is the steadier number.
Prints a table and appends it, with the command, machine, date and versions, to the "## Prepare throughput"
section of BENCHMARKS.md (unless --no-record).

    .venv/bin/python bench/bench_prepare.py [--synthetic-size 10000] [--no-record]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import PIL

from hamtune.data import prepare
from hamtune.data.synthetic import cpu_count, generate_synthetic

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO.parent / "shared/data/ham10000-sample"
SECTION = "## Prepare throughput"


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished worker processes."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(function, *args, **kwargs):
    """(result, wall seconds, CPU seconds). CPU time stays meaningful when other jobs share the cores."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - wall, cpu_seconds() - cpu


def run(synthetic_size: int) -> list[dict]:
    rows = []
    workers = cpu_count()
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        tmp = Path(tmp)
        if SAMPLE.is_dir():
            for size in (224, 64):
                data, seconds, cpu = timed(prepare, SAMPLE, size, cache_dir=tmp / f"real-{size}", progress=False)
                rows.append({"what": "prepare real sample (cold)", "images": data.decoded, "px": size,
                             "workers": workers, "seconds": seconds, "cpu_s": cpu})
            data, seconds, cpu = timed(prepare, SAMPLE, 64, cache_dir=tmp / "real-64", progress=False)
            rows.append({"what": "prepare real sample (warm)", "images": len(data.table), "px": 64,
                         "workers": workers, "seconds": seconds, "cpu_s": cpu})

        source, seconds, cpu = timed(generate_synthetic, tmp / "synthetic", n_images=synthetic_size, seed=0,
                                     workers=workers)
        rows.append({"what": "generate synthetic (112x84 JPEG)", "images": synthetic_size, "px": None,
                     "workers": workers, "seconds": seconds, "cpu_s": cpu})
        for n_workers in sorted({1, workers}):
            data, seconds, cpu = timed(prepare, source, 64, cache_dir=tmp / f"synthetic-{n_workers}",
                                       workers=n_workers, progress=False)
            rows.append({"what": "prepare synthetic (cold)", "images": data.decoded, "px": 64,
                         "workers": n_workers, "seconds": seconds, "cpu_s": cpu})
        data, seconds, cpu = timed(prepare, source, 64, cache_dir=tmp / f"synthetic-{workers}", progress=False)
        rows.append({"what": "prepare synthetic (warm)", "images": len(data.table), "px": 64, "workers": workers,
                     "seconds": seconds, "cpu_s": cpu})
    for row in rows:
        row["images/s"] = row["images"] / row["seconds"]
        row["images per CPU-s"] = row["images"] / max(row["cpu_s"], 1e-9)
    return rows


def machine() -> str:
    memory_kib = next((int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                       if line.startswith("MemTotal")), 0) if Path("/proc/meminfo").exists() else 0
    gpu = "no GPU"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    load = " ".join(f"{v:.1f}" for v in os.getloadavg())
    return (f"{cpu_count()} CPU cores, {memory_kib / 2**20:.0f} GiB RAM, {gpu}; load average at start {load} "
            "(shared machine: other jobs were running)")


def markdown(rows: list[dict], command: str, load_note: str) -> str:
    frame = pd.DataFrame(rows)
    frame["px"] = frame["px"].map(lambda v: "-" if v is None or pd.isna(v) else str(int(v)))
    frame["seconds"] = frame["seconds"].map(lambda v: f"{v:.2f}")
    frame["cpu_s"] = frame["cpu_s"].map(lambda v: f"{v:.2f}")
    frame = frame.rename(columns={"seconds": "wall s", "cpu_s": "CPU s"})
    for column in ("images/s", "images per CPU-s"):
        frame[column] = frame[column].map(lambda v: f"{v:,.0f}")
    serial = [r for r in rows if r["what"] == "prepare synthetic (cold)" and r["workers"] == 1]
    parallel = [r for r in rows if r["what"] == "prepare synthetic (cold)" and r["workers"] > 1]
    lines = [
        f"### {subprocess.run(['date'], capture_output=True, text=True).stdout.strip()}",
        "",
        f"Command: `{command}`  ",
        f"Machine: {load_note}  ",
        f"Versions: Python {platform.python_version()}, numpy {np.__version__}, Pillow {PIL.__version__}, "
        f"pandas {pd.__version__}",
        "",
        frame.to_markdown(index=False) if _has_tabulate() else _plain_table(frame),
    ]
    if serial and parallel:
        lines += ["", f"Parallel decode speed-up ({parallel[0]['workers']} workers vs 1): "
                      f"{serial[0]['seconds'] / parallel[0]['seconds']:.2f}x"]
    return "\n".join(lines) + "\n"


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


def _plain_table(frame: pd.DataFrame) -> str:
    header = "| " + " | ".join(frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def record(text: str, path: Path) -> None:
    """Append `text` at the end of the Prepare throughput section (created if absent); other sections untouched."""
    content = path.read_text() if path.exists() else "# Benchmarks\n"
    if SECTION not in content:
        content = content.rstrip("\n") + f"\n\n{SECTION}\n\nProduced by `bench/bench_prepare.py`; newest run last.\n"
    start = content.index(SECTION)
    following = content.find("\n## ", start + len(SECTION))
    end = len(content) if following < 0 else following + 1
    section = content[start:end].rstrip("\n") + "\n\n" + text
    content = content[:start] + section + ("\n" + content[end:] if end < len(content) else "")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(content)
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--synthetic-size", type=int, default=10_000)
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to BENCHMARKS.md")
    args = parser.parse_args()
    command = " ".join([".venv/bin/python", "bench/bench_prepare.py", *map(shlex.quote, sys.argv[1:])])
    load_note = machine()
    rows = run(args.synthetic_size)
    text = markdown(rows, command, load_note)
    print(text)
    if not args.no_record:
        record(text, REPO / "BENCHMARKS.md")
        print(f"appended to {REPO / 'BENCHMARKS.md'}")


if __name__ == "__main__":
    main()
