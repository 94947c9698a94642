"""Shared helpers for the bench/ scripts: where things go, what machine ran them, timing, and BENCHMARKS.md sections.

Every script measures its variants side by side in one process run and writes ONE section of BENCHMARKS.md, which it
replaces on a rerun (text between its "## " heading and the next "## " heading), so numbers never pile up and the
sections written by other scripts are left alone. Scratch data (caches, Ray results) goes to bench/out/, which git
ignores, never to results/.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "BENCHMARKS.md"
OUT = ROOT / "bench" / "out"  # git-ignored scratch space

HEADER = """# Benchmarks

How to run: `make bench`. It runs `bash bench/run_all`, which runs the CPU benchmarks bench_prepare, bench_loop,
bench_pipeline, bench_search, bench_overhead and bench_memory (`bench/*.py`) one after another with `.venv/bin/python`:
about 17 minutes on a quiet 2-core machine (26 in the recorded run, which other jobs shared). Each script can also be
run alone (`--help`). Each one measures its variants side by side in one run on one machine and writes its own section
below, headed with the exact command, the machine, the date, the library versions and the load average at the start
and end. Compare numbers only within a section: the ratios are the result, absolute rates depend on the machine and on
what else was running. Scratch data (caches, Ray results) goes to `bench/out/` (git-ignored), never to `results/`.
`bench/gpu_check.py` is run by hand on a GPU machine; the studies on real data (`make bench-payoff`) and the
same-seed check (`make bench-determinism`) run on their own.
"""


def out_dir(*parts: str) -> Path:
    """A folder under bench/out/ (created)."""
    path = OUT.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def scratch_dir(prefix: str) -> Path:
    """A fresh temporary folder under bench/out/ for one run's Ray results (removed by the caller if it likes)."""
    return Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir=out_dir()))


def prune_checkpoints(folder: Path) -> None:
    """Delete the Tune checkpoints under a bench run's folder (about 60 MB per trial for resnet10t), keeping the
    small tables and result.json logs a reader may want; the numbers are already in BENCHMARKS.md."""
    import shutil

    for checkpoint in sorted(Path(folder).glob("**/checkpoint_*")):
        if checkpoint.is_dir():
            shutil.rmtree(checkpoint, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------
# What ran where


def memory_total_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def gpu_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    except Exception:
        pass
    return "none"


def machine() -> str:
    cores = os.cpu_count()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = cores
    cores_text = f"{cores} cores" + (f" ({usable} usable)" if usable != cores else "")
    system = f"{platform.system()} {platform.machine()}"
    return f"{cores_text}, {memory_total_gib():.0f} GiB RAM, GPU: {gpu_name()}, {system}"


def load_average() -> str:
    try:
        return " / ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def versions() -> str:
    import importlib.metadata as md

    names = ("torch", "torchvision", "ray", "optuna", "timm", "numpy")
    found = []
    for name in names:
        try:
            found.append(f"{name} {md.version(name)}")
        except md.PackageNotFoundError:
            found.append(f"{name} (not installed)")
    return f"python {platform.python_version()}, " + ", ".join(found)


def command_line() -> str:
    """How this script was started, as a command to paste from the repository root."""
    script = Path(sys.argv[0]).resolve()
    with contextlib.suppress(ValueError):
        script = script.relative_to(ROOT)
    return "RAY_USAGE_STATS_ENABLED=0 .venv/bin/python " + shlex.join([str(script), *sys.argv[1:]])


def run_header(started_load: str | None = None) -> str:
    """The lines every section starts with: command, machine, date, versions, load average at the start."""
    now = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    return "\n".join([
        f"- Command: `{command_line()}` (part of `make bench`)",
        f"- Machine: {machine()}",
        f"- Date: {now}",
        f"- Versions: {versions()}",
        f"- Load average (1/5/15 min) at the start: {started_load or load_average()}; at the end: {load_average()} "
        "(2 cores: above ~2 means other work shared the machine)",
    ]) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# Timing


def median_time(fn: Callable[[], object], *, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of fn() in seconds, after `warmup` untimed calls; the median shrugs off one-off stalls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------------------------
# Markdown


def md_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    def cell(value: object) -> str:
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def fmt(value: float, digits: int = 2) -> str:
    if value is None or value != value:  # None or NaN
        return "n/a"
    return f"{value:,.{digits}f}"


def replace_section(text: str, heading: str, body: str) -> str:
    """`text` with the section `heading` (a "## ..." line) replaced by heading + body, or appended if absent."""
    heading = heading.rstrip()
    block = heading + "\n\n" + body.strip("\n") + "\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == heading), None)
    if start is None:
        return text.rstrip("\n") + "\n\n" + block if text.strip() else block
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    tail = "".join(lines[end:])
    return "".join(lines[:start]) + block + ("\n" + tail if tail else "")


def with_header(text: str) -> str:
    """`text` with everything before its first "## " section replaced by HEADER (the how-to-run preamble)."""
    lines = text.splitlines(keepends=True)
    first = next((i for i, line in enumerate(lines) if line.startswith("## ")), len(lines))
    sections = "".join(lines[first:])
    return HEADER + ("\n" + sections if sections.strip() else "")


def write_section(heading: str, body: str, path: Path = BENCHMARKS) -> None:
    """Replace (or add) one "## " section of BENCHMARKS.md atomically, keeping every other section as it is.

    A lock file serialises concurrent writers (several bench scripts may finish together); the new text goes to a
    temp file in the same folder and replaces the old one with os.replace, so a reader never sees half a file.
    """
    if not heading.startswith("## "):
        raise ValueError(f"section heading must start with '## ', got {heading!r}")
    lock_path = out_dir() / ".benchmarks.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        text = with_header(path.read_text() if path.is_file() else "")
        new = replace_section(text, heading, body)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(new)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def publish(heading: str, body: str, *, dry_run: bool) -> None:
    """A script's result: its BENCHMARKS.md section, or with --dry-run printed only (the file stays as it is)."""
    if dry_run:
        print(heading + "\n\n" + body)
    else:
        write_section(heading, body)
        print(f"wrote '{heading}' to {BENCHMARKS}")


class StepRig:
    """The limit the step benchmarks compare against: hamtune's model and optimiser set up as fit() sets them up
    (channels_last on CPU and CUDA, AMP on CUDA, bf16 autocast on CPU with cpu_amp), trained on one fixed batch
    already on the device."""

    def __init__(self, config, device, image_size: int, batch_size: int):
        import torch

        from hamtune.vocab import NUM_CLASSES
        from hamtune.training.device import amp_dtype_for
        from hamtune.training.loop import build_optimizer
        from hamtune.training.model import build_model

        self.device, self.batch_size = device, batch_size
        self.model = build_model(config).to(device)
        self.channels_last = config.channels_last and device.type in ("cpu", "cuda")  # as fit() decides
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(config, self.model)
        self.amp_dtype = amp_dtype_for(device, config.amp, config.cpu_amp)
        self.scaler = torch.amp.GradScaler(device.type) if self.amp_dtype == torch.float16 else None
        gen = torch.Generator().manual_seed(0)
        x = torch.rand(batch_size, 3, image_size, image_size, generator=gen).to(device)
        self.x = x.contiguous(memory_format=torch.channels_last) if self.channels_last else x
        self.y = torch.randint(0, NUM_CLASSES, (batch_size,), generator=gen).to(device)

    def bare_images_per_s(self, steps: int) -> float:
        """Forward + backward + step on the fixed batch, `steps` times."""
        import torch
        import torch.nn.functional as F

        from hamtune.training.loop import backward_and_step

        self.model.train()
        self._sync()
        start = time.perf_counter()
        for _ in range(steps):
            with torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else contextlib.nullcontext():
                loss = F.cross_entropy(self.model(self.x), self.y)
            backward_and_step(loss, self.optimizer, self.scaler)
        self._sync()
        return steps * self.batch_size / (time.perf_counter() - start)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)


def readonly_dataset(n: int, image_size: int, rng):
    """Random uint8 images as SplitArrays, read-only like the object-store arrays a trial gets."""
    import numpy as np

    from hamtune.data.arrays import SplitArrays
    from hamtune.vocab import META_DIM, NUM_CLASSES

    data = SplitArrays(images=rng.integers(0, 256, (n, image_size, image_size, 3), dtype=np.uint8),
                       labels=rng.integers(0, NUM_CLASSES, n).astype(np.int64),
                       meta=np.zeros((n, META_DIM), np.float32), index=np.arange(n, dtype=np.int64))
    for array in (data.images, data.labels, data.meta):
        array.flags.writeable = False
    return data
