"""Memory: peak proportional memory (PSS) of the whole process tree with 1 vs 2 concurrent trials on a large dataset.

The claim under test: the driver puts train and val into Ray's object store once and every trial reads them
zero-copy, so a second concurrent trial costs its own Python/torch/model memory, not another copy of the dataset.

Method: each configuration runs in a fresh child process (its own Ray instance: driver, gcs_server, raylet with the
plasma object store, workers, all descendants of the child). A sampler thread in this process walks the child's
process tree every 0.2 s and sums /proc/<pid>/smaps_rollup over it. PSS (proportional set size) charges a page
shared by k processes 1/k to each, so the sum over the tree counts every object-store page once however many
workers map it, while plain RSS would count it once per mapping process. psutil is not installed here, so the
sampler reads /proc directly (Linux only).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

HEADING = "## Memory: dataset held once"
FIELDS = ("Rss", "Pss", "Pss_Anon", "Pss_File", "Pss_Shmem", "Private_Clean", "Private_Dirty", "Shared_Clean",
          "Shared_Dirty")
MIB = 2**20


# ---------------------------------------------------------------------------------------------------------------
# Sampling /proc


def process_tree(root: int) -> list[int]:
    """root and all its descendants, found from every process's parent id in /proc/<pid>/stat."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # field 4; the name in (...) may hold spaces
        children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def smaps_rollup(pid: int) -> dict[str, int] | None:
    """Memory counters of one process in bytes, or None if it is gone (or not readable)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            text = f.read()
    except OSError:
        return None
    values = {}
    for line in text.splitlines()[1:]:
        key, _, rest = line.partition(":")
        if key in FIELDS:
            values[key] = int(rest.split()[0]) * 1024
    return values


def role(pid: int, driver: int) -> str | None:
    """What a process of the tree is, from its command line; None if it is gone."""
    if pid == driver:
        return "driver"
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return None
    program = Path(cmd.split(" ")[0]).name
    if program == "raylet":
        return "raylet (with the object store)"
    if program == "gcs_server":
        return "gcs_server"
    if cmd.startswith("ray::IDLE"):
        return "idle Ray worker"
    if cmd.startswith(("ray::ImplicitFunc", "ray::train_trial")):
        return "trial worker"
    if cmd.startswith("ray::") and "Agent" in cmd:
        return "Ray agents (runtime env, dashboard)"
    if "default_worker.py" in cmd:
        return "idle Ray worker"
    if program.startswith("python"):
        return "Ray helpers (log monitor, monitor, dashboard)"
    return f"other ({program[:30] or cmd[:30]})"


class TreeSampler(threading.Thread):
    """Sums smaps_rollup over a process tree every `interval` s; keeps the sample with the largest total PSS."""

    def __init__(self, root: int, interval: float = 0.2):
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.stop_event = threading.Event()
        self.samples = 0
        self.peak_total = 0
        self.peak_breakdown: dict[str, dict[str, int]] = {}
        self.peak_workers: list[dict[str, int]] = []
        self.max_worker_private = 0
        self.worker_peaks: dict[int, int] = {}  # trial worker pid -> its largest private memory (USS) seen

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.sample()
            self.stop_event.wait(self.interval)

    def sample(self) -> None:
        breakdown: dict[str, dict[str, int]] = {}
        workers = []
        total = 0
        for pid in process_tree(self.root):
            name = role(pid, self.root)  # every time: a worker's title changes from IDLE to its task
            if name is None:
                continue
            counters = smaps_rollup(pid)
            if not counters:
                continue
            acc = breakdown.setdefault(name, {k: 0 for k in FIELDS} | {"processes": 0})
            for k in FIELDS:
                acc[k] += counters.get(k, 0)
            acc["processes"] += 1
            total += counters.get("Pss", 0)
            if name == "trial worker":
                workers.append(counters)
                private = counters.get("Private_Clean", 0) + counters.get("Private_Dirty", 0)
                self.max_worker_private = max(self.max_worker_private, private)
                self.worker_peaks[pid] = max(self.worker_peaks.get(pid, 0), private)
        self.samples += 1
        if total > self.peak_total:
            self.peak_total, self.peak_breakdown, self.peak_workers = total, breakdown, workers

    def stop(self) -> None:
        self.stop_event.set()
        self.join()


# ---------------------------------------------------------------------------------------------------------------
# The measured child: one search with `trials` concurrent trials of one epoch


def child(args) -> None:
    from hamtune.search.driver import init_ray, run_search
    from hamtune.search.spec import spec_from_dict

    spec = spec_from_dict({
        "experiment": f"memory-{args.trials}",
        "data": {"source": "synthetic", "synthetic_size": args.synthetic_size, "image_size": args.image_size,
                 "cache_dir": str(common.out_dir("cache"))},
        "model": {"name": args.model, "head_hidden": 0, "head_dropout": 0.0},
        "train": {"epochs": 1, "batch_size": args.batch_size, "warmup_epochs": 0},
        "search": {"num_samples": args.trials, "max_concurrent": args.trials, "searcher": "random",
                   "scheduler": "fifo", "max_failures": 0},
        "resources": {"cpu": 1},
        "space": {"lr": {"loguniform": [1e-3, 1e-2]}},
    }, source="bench_memory")
    init_ray(None, num_cpus=args.trials)
    outcome = run_search(spec, results_dir=Path(args.results_dir), verbose=0)
    statuses = outcome.trials["status"].tolist()
    (Path(args.results_dir) / "outcome.json").write_text(json.dumps({"wall_time_s": outcome.wall_time_s,
                                                                     "statuses": statuses}))


def measure(args, trials: int, results_dir: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", "--trials", str(trials), "--results-dir", str(results_dir),
           "--synthetic-size", str(args.synthetic_size), "--image-size", str(args.image_size),
           "--model", args.model, "--batch-size", str(args.batch_size)]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=common.ROOT)
    sampler = TreeSampler(proc.pid)
    sampler.start()
    proc.wait()
    sampler.stop()
    if proc.returncode != 0:
        raise SystemExit(f"memory child with {trials} trial(s) failed with exit code {proc.returncode}")
    result = json.loads((results_dir / "outcome.json").read_text())
    if set(result["statuses"]) != {"completed"}:
        raise SystemExit(f"memory child with {trials} trial(s): trials ended {result['statuses']}")
    return {"trials": trials, "wall_s": time.monotonic() - started, "samples": sampler.samples,
            "peak_pss": sampler.peak_total, "breakdown": sampler.peak_breakdown, "workers": sampler.peak_workers,
            "max_worker_private": sampler.max_worker_private, "worker_peaks": list(sampler.worker_peaks.values())}


def mib(b: float) -> str:
    return f"{b / MIB:,.0f}"


def in_ray_bytes(synthetic_size: int, image_size: int) -> tuple[int, int, dict]:
    """(bytes of the whole cached set, bytes of train + val images, split sizes); decodes the cache if needed."""
    from hamtune.data import prepare

    data = prepare("synthetic", image_size, cache_dir=common.out_dir("cache"), synthetic_size=synthetic_size,
                   progress=False)
    sizes = data.split_sizes()
    per_image = data.images[0].nbytes
    return data.images.nbytes, (sizes["train"]["images"] + sizes["val"]["images"]) * per_image, sizes


def role_rows(runs: dict) -> list[list[str]]:
    """Per process role at the peak: PSS (anonymous / file / shmem parts) and RSS, one column per run."""
    empty = {k: 0 for k in FIELDS} | {"processes": 0}
    names = sorted({name for run in runs.values() for name in run["breakdown"]})
    rows = []
    for name in [*names, "all"]:
        cells = [f"**{name}**" if name == "all" else name]
        for run in runs.values():
            if name == "all":
                b = {k: sum(v[k] for v in run["breakdown"].values()) for k in (*FIELDS, "processes")}
            else:
                b = run["breakdown"].get(name, empty)
            cells.append(f"{b['processes']}: {mib(b['Pss'])} ({mib(b['Pss_Anon'])} / {mib(b['Pss_File'])} / "
                         f"{mib(b['Pss_Shmem'])}); RSS {mib(b['Rss'])}")
        rows.append(cells)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--synthetic-sizes", type=int, nargs=2, default=[1800, 4000],
                        help="a small and a large data set (same image size): the increment must not grow with it")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--model", default="test_vit", help="a tiny timm model: the data is what is measured")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--dry-run", action="store_true", help="print the section instead of writing BENCHMARKS.md")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--synthetic-size", type=int, default=3000, help=argparse.SUPPRESS)
    parser.add_argument("--trials", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--results-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    load_at_start = common.load_average()

    small, large = sorted(args.synthetic_sizes)
    # Decode once up front, so no measured run includes building the cache.
    info = {n: in_ray_bytes(n, args.image_size) for n in (small, large)}
    scratch = common.scratch_dir("memory")
    runs = {}
    for n in (small, large):
        for trials in (1, 2):
            args.synthetic_size = n
            runs[(n, trials)] = measure(args, trials, scratch / f"n{n}-trials{trials}")
            r = runs[(n, trials)]
            print(f"{n} images, {trials} trial(s): peak PSS {mib(r['peak_pss'])} MiB in {r['wall_s']:.0f} s",
                  flush=True)

    def shmem(run: dict) -> int:
        return sum(v["Pss_Shmem"] for v in run["breakdown"].values())

    increment = {n: runs[(n, 2)]["peak_pss"] - runs[(n, 1)]["peak_pss"] for n in (small, large)}
    data_growth = info[large][1] - info[small][1]
    increment_growth = increment[large] - increment[small]
    main_rows = []
    for n in (small, large):
        whole, ray_bytes, sizes = info[n]
        one, two = runs[(n, 1)], runs[(n, 2)]
        main_rows.append([f"{n} images: {mib(whole)} MiB cached, {mib(ray_bytes)} MiB train + val in Ray",
                          mib(one["peak_pss"]), mib(two["peak_pss"]), f"**{mib(increment[n])}**",
                          f"{increment[n] / ray_bytes:.2f}x", f"{mib(shmem(one))} / {mib(shmem(two))}",
                          f"{one['wall_s']:.0f} / {two['wall_s']:.0f}"])
    worker_rows = []
    for (n, trials), run in runs.items():
        for i, w in enumerate(run["workers"]):
            worker_rows.append([f"{n} images, {trials} trial(s), worker {i + 1}", mib(w["Rss"]),
                                mib(w["Shared_Clean"] + w["Shared_Dirty"]),
                                mib(w["Private_Clean"] + w["Private_Dirty"]), mib(w["Pss"]), mib(w["Pss_Shmem"])])
    def worker_private(n: int) -> float:
        """Mean over the trial workers of both runs with n images of each worker's own peak private memory (USS).

        Each worker's own peak comes at the same point of its run (evaluation, 256 images at a time, the same for both
        data sets as long as val has >= 256 images), so it is steadier than the workers' share of the tree's peak."""
        values = [p for t in (1, 2) for p in runs[(n, t)]["worker_peaks"]]
        return sum(values) / len(values) if values else float("nan")

    # Held once: (1) the object-store pages are counted once, not once per trial: shmem PSS ~ train + val size in the
    # 2-trial run; (2) a trial worker's private memory does not grow with the data (a private copy would add it all).
    worker_growth = worker_private(large) - worker_private(small)
    shmem_two = shmem(runs[(large, 2)])
    held_once = worker_growth < 0.5 * data_growth and shmem_two < 1.5 * info[large][1]
    val_small, val_large = info[small][2]["val"]["images"], info[large][2]["val"]["images"]
    # The driver: does its private (anonymous) memory grow with the data, i.e. does it keep a copy of train/val?
    driver_anon = {n: runs[(n, 2)]["breakdown"].get("driver", {}).get("Pss_Anon", 0) for n in (small, large)}
    driver_file = {n: runs[(n, 2)]["breakdown"].get("driver", {}).get("Pss_File", 0) for n in (small, large)}
    driver_growth = driver_anon[large] - driver_anon[small]
    keeps_copy = driver_growth >= 0.5 * data_growth
    driver_text = (
        f"The driver (2-trial runs): its anonymous PSS goes from {mib(driver_anon[small])} to "
        f"{mib(driver_anon[large])} MiB ({driver_growth / MIB:+,.0f} MiB for {mib(data_growth)} MiB more data), so it "
        + ("**keeps its own copy** of train/val for the whole search besides the object store's (`arrays()` copies "
           "the rows out of the memory-mapped cache before `tune.with_parameters` puts them in the store); dropping "
           "it once the data is in the store would save the data's size once per search, not per trial."
           if keeps_copy else
           "does **not** keep a copy of train/val once they are in the object store.")
        + f" Its file-backed PSS ({mib(driver_file[small])} -> {mib(driver_file[large])} MiB) is mostly the pages of "
        "the memory-mapped cache file it read, which the kernel can drop at any time, plus shared libraries.\n")
    body = [
        common.run_header(load_at_start),
        f"Setup: two synthetic sets at {args.image_size} px, {small} and {large} images (the large one "
        f"{mib(info[large][0])} MiB uint8 cached; train + val, the part handed to Ray, {mib(info[large][1])} MiB; "
        f"test stays on disk). Each of the four configurations (small/large data x 1 trial / 2 concurrent trials) "
        f"runs one search in a fresh process with its own local Ray (num_cpus = trials, max_concurrent = trials, 1 CPU "
        f"per trial), 1 epoch, model `{args.model}` (tiny: the data is what is measured), batch {args.batch_size}. "
        f"The val splits have {val_small} and {val_large} images"
        + (", both >= 256, so evaluation's 256-image batches (the largest transient in a trial) are the same size "
           "with either set.\n" if min(val_small, val_large) >= 256 else
           "; evaluation batches of up to 256 images differ in size between the sets, which shows up as a "
           "difference in the workers' transient memory.\n"),
        "Method: a sampler thread walks the search process's tree (driver, gcs_server, raylet with the plasma object "
        "store, Ray agents and helpers, workers) every 0.2 s and sums `/proc/<pid>/smaps_rollup` (psutil is not "
        "installed, so it reads /proc directly). PSS charges a page shared by k processes 1/k to each, so the tree "
        "total counts each object-store page once however many workers map it (RSS would count it once per "
        "process). The peak is the sample with the largest total PSS. The second trial necessarily adds a Ray worker "
        "with its own torch runtime, model and activations, which here is bigger than the data itself, so the "
        "question is whether the extra trial's memory grows with the data: with a copy per trial it would grow by "
        "the data's size.\n",
        common.md_table(["data", "peak PSS, 1 trial (MiB)", "peak PSS, 2 trials (MiB)", "increment 1 -> 2 (MiB)",
                         "increment / train+val size", "object-store shmem PSS, 1 / 2 trials (MiB)",
                         "run time 1 / 2 trials (s)"], main_rows),
        f"**{'Held once' if held_once else 'NOT held once'}**. (1) The object-store pages (shared-memory PSS, summed "
        f"over the tree) come to {mib(shmem(runs[(large, 1)]))} MiB with one trial and {mib(shmem_two)} MiB with two, "
        f"against {mib(info[large][1])} MiB of train + val: counted once, not once per trial. (2) Going from {small} "
        f"to {large} images adds {mib(data_growth)} MiB of data, and a trial worker's peak private memory (USS; each "
        f"worker's own peak, mean over the workers of both runs) goes from {mib(worker_private(small))} to "
        f"{mib(worker_private(large))} MiB "
        f"(**{worker_growth / MIB:+,.0f} MiB**, {worker_growth / data_growth:+.2f}x the added data; a private copy "
        f"would be +1.00x). (3) The 1 -> 2 trial increment of the whole tree changes by {mib(increment_growth)} MiB "
        f"({increment_growth / data_growth:+.2f}x the added data); this total is noisier than (1) and (2) because the "
        "peak sample catches the workers' transient activation memory (evaluation runs 256 images at a time) at "
        "different moments.\n",
        f"Against the dataset size itself: with {large} images the 1 -> 2 increment is {mib(increment[large])} MiB, "
        f"{increment[large] / info[large][1]:.2f}x the train + val data, and it is the extra worker's own runtime "
        "(torch, timm, Ray, the model and its activations: its private memory in the worker table), which it "
        "needs with the small set as well.\n",
        "At the peak, by process role: `processes: PSS (anonymous / file-backed / shared-memory PSS); RSS`, MiB:\n",
        common.md_table(["role", *[f"{n} img, {t} trial{'s' if t > 1 else ''}" for n, t in runs]], role_rows(runs)),
        "Trial workers at the peak (MiB). RSS includes the object-store pages a worker maps and shared libraries; "
        "PSS charges it only its share of them; private (USS) is what the worker alone holds:\n",
        common.md_table(["worker", "RSS", "shared", "private (USS)", "PSS", "PSS shmem"], worker_rows),
        driver_text,
    ]
    text = "\n".join(body)
    common.publish(HEADING, text, dry_run=args.dry_run)
    common.prune_checkpoints(scratch)
    (scratch / "memory.json").write_text(json.dumps({f"{n}-{t}": v for (n, t), v in runs.items()}, indent=1,
                                                    default=str))


if __name__ == "__main__":
    main()
