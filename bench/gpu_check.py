"""GPU check for the cluster's real job: is a GPU worker fast enough, and do two ResNeXt-101 trials share one GPU?

One prepared run, on one machine with a CUDA GPU (a g5.2xlarge worker of cluster.yaml, or any other card):

  1. step rate of the model at the spec's size, random-init weights, synthetic data in memory, side by side:
       (a) bare step     forward + backward + AdamW step on a float batch already on the GPU (the limit)
       (b) hamtune loop  train_one_epoch over read-only uint8 NHWC arrays in host memory: gather, copy to the GPU,
                         BatchAugment on the GPU, loss check, LR schedule (what a trial does every step), with the
                         next batch gathered into pinned memory and copied on a side stream by a background thread
       (c) in line       the same loop with prefetch=False: gather and copy between two steps
     each in fp32 (PyTorch defaults: cuDNN may use TF32) and with AMP (bf16 where supported, else fp16 + scaler),
     blocks interleaved (a, b, c, a, b, c, ...) so clock or load changes hit all; median images/s, ratio b/a, and the
     peak GPU memory of one trial's training step (what `resources.gpu: 0.5` must leave room for twice);
  2. a two-trial `hamtune search` at gpu: 0.5 (search_spaces/resnext101.yaml with synthetic data, 2 epochs): both
     trials on the one GPU at the same time through Ray, with the device memory they used together.

    .venv/bin/python bench/gpu_check.py                  # on a GPU machine; replaces "## GPU" in BENCHMARKS.md
    .venv/bin/python bench/gpu_check.py --device cpu --model resnet10t --image-size 32   # dry run without a GPU

Without a CUDA device and without --device cpu it stops at once with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent))

ROOT = Path(__file__).resolve().parents[1]
HEADING = "## GPU"
GIB = 2**30


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu for a dry run")
    parser.add_argument("--model", default="resnext101_32x8d")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32, help="per trial (resnext101.yaml uses 32)")
    parser.add_argument("--steps", type=int, default=8, help="training steps per timed block")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved (bare, loop) block pairs per precision")
    parser.add_argument("--search-image-size", type=int, help="image size of the 2-trial search (default --image-size)")
    parser.add_argument("--skip-search", action="store_true", help="only the step benchmark")
    parser.add_argument("--no-write", action="store_true", help="print only; do not touch BENCHMARKS.md")
    return parser.parse_args(argv)


def check_device(name: str):
    """The device to use, or exit 2 at once with what is missing (before Ray or a model is ever started)."""
    import torch

    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        built = torch.version.cuda or "no CUDA (CPU-only build)"
        print(f"gpu_check: no CUDA device available (torch {torch.__version__}, built for CUDA {built}; "
              f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}). Run it on a GPU machine, "
              f"or use --device cpu --model resnet10t --image-size 32 for a dry run.", file=sys.stderr)
        raise SystemExit(2)
    return torch.device(name)


# ---------------------------------------------------------------------------------------------------------------
# 1. step rate and memory


def step_benchmark(args: argparse.Namespace, device, precision: str) -> dict:
    """Bare step vs hamtune's loop for one precision, interleaved; images/s medians and the peak memory."""
    import numpy as np
    import torch
    import common
    from hamtune.training.augment import BatchAugment
    from hamtune.training.batches import BatchSource
    from hamtune.training.config import TrainConfig
    from hamtune.training.loop import build_scheduler, train_one_epoch

    cuda = device.type == "cuda"
    config = TrainConfig.from_dict(dict(model=args.model, pretrained=False, batch_size=args.batch_size,
                                        amp=precision == "amp", channels_last=True, device=str(device)))
    torch.manual_seed(0)
    if cuda:
        torch.backends.cudnn.benchmark = True  # as fit() does on CUDA
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    bs, size, steps = args.batch_size, args.image_size, args.steps
    rig = common.StepRig(config, device, size, bs)
    model, optimizer, scaler = rig.model, rig.optimizer, rig.scaler
    amp_dtype, channels_last = rig.amp_dtype, rig.channels_last
    criterion = torch.nn.CrossEntropyLoss()

    def bare_block() -> float:
        return rig.bare_images_per_s(steps)

    rng = np.random.default_rng(0)
    n = steps * bs
    data = common.readonly_dataset(n, size, rng)
    scheduler = build_scheduler(optimizer, warmup_steps=steps, total_steps=10**9)
    augment = BatchAugment(0.5)
    aug_gen = torch.Generator().manual_seed(1)

    def loop_block(prefetch: bool = True) -> float:
        batches = BatchSource(data, rng.permutation(n), batch_size=bs, device=device, augment=augment,
                              generator=aug_gen, channels_last=channels_last, prefetch=prefetch)
        stats = train_one_epoch(model, criterion, optimizer, scheduler, batches, device, 1, scaler=scaler,
                                amp_dtype=amp_dtype)
        return stats["images"] / stats["time_s"]

    bare_block(), loop_block(), loop_block(False)  # warm-up: cuDNN algorithm search, allocator, lazy CUDA modules
    bare, loop, in_line = [], [], []
    for _ in range(args.repeats):
        bare.append(bare_block())
        loop.append(loop_block())
        in_line.append(loop_block(prefetch=False))
    result = {"precision": precision, "amp_dtype": str(amp_dtype).removeprefix("torch.") if amp_dtype else "none",
              "bare": statistics.median(bare), "loop": statistics.median(loop), "in_line": statistics.median(in_line),
              "bare_all": [round(v, 1) for v in bare], "loop_all": [round(v, 1) for v in loop],
              "in_line_all": [round(v, 1) for v in in_line]}
    if cuda:
        result["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / GIB
        result["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / GIB
    del model, optimizer, rig  # the rig holds the device batch
    if cuda:
        torch.cuda.empty_cache()
    return result


# ---------------------------------------------------------------------------------------------------------------
# 2. two trials at gpu: 0.5 through Ray


def search_spec(args: argparse.Namespace, cuda: bool, cache_dir: Path) -> dict:
    """search_spaces/resnext101.yaml made runnable anywhere: synthetic data, random init, 2 trials x 2 epochs."""
    import yaml

    spec = yaml.safe_load((ROOT / "search_spaces" / "resnext101.yaml").read_text())
    cpus = max(1, min(4, (os.cpu_count() or 2) // 2))
    spec["experiment"] = "gpu-check"
    spec["data"] = {"source": "synthetic", "synthetic_size": 300, "image_size": args.search_image_size or args.image_size,
                    "cache_dir": str(cache_dir)}
    spec["model"].update(name=args.model, pretrained=False)
    spec["train"].update(epochs=2, batch_size=args.batch_size)
    spec["search"].update(num_samples=2, max_concurrent=2, grace_period=1)
    spec["resources"] = {"cpu": cpus, "gpu": 0.5 if cuda else 0}
    return spec


def watch_device_memory(stop: threading.Event, peak: dict) -> None:
    """Poll the GPU's used memory (all processes) while the search runs: the two trials' footprint together."""
    import torch

    while not stop.wait(0.25):
        free, total = torch.cuda.mem_get_info()
        peak["used_gib"] = max(peak.get("used_gib", 0.0), (total - free) / GIB)
        peak["total_gib"] = total / GIB


def two_trial_search(args: argparse.Namespace, device) -> dict:
    import pandas as pd
    import torch
    import yaml

    import common

    cuda = device.type == "cuda"
    scratch = common.scratch_dir("gpu-check")
    spec_path = scratch / "gpu-check.yaml"
    spec_path.write_text(yaml.safe_dump(search_spec(args, cuda, scratch / "cache")))
    peak: dict = {}
    stop = threading.Event()
    if cuda:
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info()
        peak["before_gib"] = (total - free) / GIB  # this process's own CUDA context and cache
        watcher = threading.Thread(target=watch_device_memory, args=(stop, peak), daemon=True)
        watcher.start()
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "hamtune.cli", "search", "--space", str(spec_path), "--results-dir",
                           str(scratch / "results")], cwd=scratch, capture_output=True, text=True)
    wall = time.perf_counter() - start
    stop.set()
    out = {"returncode": done.returncode, "wall_s": wall, "spec": str(spec_path), **peak}
    trials_file = scratch / "results" / "gpu-check" / "trials.parquet"
    if trials_file.is_file():
        trials = pd.read_parquet(trials_file)
        out["statuses"] = trials["status"].value_counts().to_dict()
        out["trial_wall_s"] = [round(float(v), 1) for v in trials["wall_time_s"]]
    if done.returncode != 0:
        out["stderr_tail"] = done.stderr[-2000:]
    return out


# ---------------------------------------------------------------------------------------------------------------


def report(args: argparse.Namespace, device, steps: list[dict], search: dict | None, started_load: str) -> str:
    import common

    rows = []
    for r in steps:
        rows.append([r["precision"] + (f" ({r['amp_dtype']})" if r["amp_dtype"] != "none" else ""),
                     common.fmt(r["bare"], 1), common.fmt(r["loop"], 1), common.fmt(r["loop"] / r["bare"], 3),
                     common.fmt(r["in_line"], 1), common.fmt(r["in_line"] / r["bare"], 3),
                     common.fmt(r.get("peak_allocated_gib"), 2), common.fmt(r.get("peak_reserved_gib"), 2)])
    # not part of `make bench`: it needs a GPU, so it runs on its own
    body = common.run_header(started_load).replace(" (part of `make bench`)", "") + "\n"
    body += (f"Model {args.model}, random init, {args.image_size} px, batch {args.batch_size} (one trial), "
             f"{args.steps} steps per block, median of {args.repeats} interleaved blocks, device {device}.\n\n")
    body += common.md_table(["precision", "(a) bare step img/s", "(b) hamtune loop img/s", "b/a",
                             "(c) loop in line img/s", "c/a", "peak allocated GiB", "peak reserved GiB"], rows)
    if len(steps) == 2:
        body += f"\nAMP / fp32, hamtune loop: {steps[1]['loop'] / steps[0]['loop']:.2f}x\n"
    if search is not None:
        body += (f"\nTwo-trial search at gpu: {0.5 if device.type == 'cuda' else 0} (resnext101.yaml on synthetic "
                 f"data, 2 epochs): exit code {search['returncode']}, trials {search.get('statuses')}, "
                 f"{search['wall_s']:.0f} s")
        if "used_gib" in search:
            body += (f"; device memory in use at the peak {search['used_gib']:.1f} of {search['total_gib']:.0f} GiB "
                     f"(this script's own share before the search: {search['before_gib']:.1f} GiB)")
        body += ".\n"
    return body


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = check_device(args.device)
    import torch

    import common

    started_load = common.load_average()
    print(f"gpu_check: {common.machine()}; device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""), flush=True)
    precisions = ["fp32", "amp"] if device.type == "cuda" else ["fp32"]  # AMP is CUDA-only in hamtune
    steps = []
    for precision in precisions:
        r = step_benchmark(args, device, precision)
        steps.append(r)
        print(f"{precision:5s} bare {r['bare']:8.1f} img/s  loop {r['loop']:8.1f} img/s"
              f"  b/a {r['loop'] / r['bare']:.3f}"
              f"  in line {r['in_line']:8.1f} img/s  c/a {r['in_line'] / r['bare']:.3f}"
              + (f"  peak {r['peak_allocated_gib']:.2f} GiB allocated, {r['peak_reserved_gib']:.2f} reserved"
                 if "peak_allocated_gib" in r else ""), flush=True)
    search = None
    if not args.skip_search:
        print("two-trial search ...", flush=True)
        search = two_trial_search(args, device)
        print(json.dumps({k: v for k, v in search.items() if k != "stderr_tail"}))
        if "stderr_tail" in search:
            print(search["stderr_tail"], file=sys.stderr)
    body = report(args, device, steps, search, started_load)
    print(body)
    if device.type == "cuda" and not args.no_write:
        common.write_section(HEADING, body)
        print(f"wrote {HEADING!r} in {common.BENCHMARKS}")
    return 0 if search is None or search["returncode"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
