"""How close does hamtune's training loop get to the bare model step?

(a) the limit: forward + backward + optimizer step on a float batch already in memory, nothing else;
(b) hamtune.training.loop.train_one_epoch over read-only uint8 arrays: fancy-index gather, uint8 -> float, BatchAugment,
    loss check, LR schedule, i.e. everything a real epoch does, with the next batch prepared in a background thread
    (the default, as fit() runs it);
(c) the same loop in line (prefetch=False): every batch gathered and augmented between two steps;
(b0) (b) with augmentation off, to show what the augmentation itself costs.
All use the same HamtuneNet, optimizer and AMP/channels_last settings as fit() would on that device, run
interleaved (a, b, c, b0, a, b, c, b0, ...) so load changes on a shared machine hit all alike, and report median
images/s and the ratios b/a and c/a (goal for b/a >= 0.95 on CPU at 64 px with one thread, the setting of a CPU trial
on the real-data proxy). Writes the "Training loop vs the limit" section of BENCHMARKS.md (--dry-run prints).

    .venv/bin/python bench/bench_loop.py                      # CPU defaults: resnet10t, 64 px, batch 64, 1 thread
    .venv/bin/python bench/bench_loop.py --device cuda --model resnext101_32x8d --image-size 224 --batch-size 64
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import torch

import common
from hamtune.training.augment import BatchAugment
from hamtune.training.batches import BatchSource
from hamtune.training.config import TrainConfig
from hamtune.training.device import resolve_device
from hamtune.training.loop import build_scheduler, train_one_epoch

HEADING = "## Training loop vs the limit"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet10t")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (one per trial)")
    parser.add_argument("--steps", type=int, default=10, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=9, help="interleaved (a, b, c, b0) rounds")
    parser.add_argument("--strength", type=float, default=0.5, help="augment_strength for (b)")
    parser.add_argument("--dry-run", action="store_true", help="print the section instead of writing BENCHMARKS.md")
    args = parser.parse_args()
    load_at_start = common.load_average()

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    config = TrainConfig.from_dict(dict(model=args.model, batch_size=args.batch_size, augment_strength=args.strength,
                                        device=args.device, num_threads=args.threads))
    torch.manual_seed(0)
    bs, size, steps = args.batch_size, args.image_size, args.steps
    # (a) inputs prepared once, on the device, in the model's memory format
    rig = common.StepRig(config, device, size, bs)
    model, optimizer, scaler = rig.model, rig.optimizer, rig.scaler
    amp_dtype, channels_last = rig.amp_dtype, rig.channels_last
    criterion = torch.nn.CrossEntropyLoss()

    # CPU seconds of this (the training) thread per block: with one torch thread the step runs here, so on a machine
    # that other jobs share it says what the loop costs the training thread, which wall time cannot say.
    main_cpu: dict[str, list[float]] = {"a": [], "b": [], "c": []}

    def on_main_thread(key: str, fn):
        start = time.thread_time()
        value = fn()
        main_cpu[key].append(time.thread_time() - start)
        return value

    def bare_block() -> float:
        return on_main_thread("a", lambda: rig.bare_images_per_s(steps))

    # (b) a read-only uint8 data set, gathered per batch like the real loop
    rng = np.random.default_rng(0)
    n = steps * bs
    data = common.readonly_dataset(n, size, rng)
    scheduler = build_scheduler(optimizer, warmup_steps=steps, total_steps=10**9)
    aug_gen = torch.Generator().manual_seed(1)

    def loop_block(strength: float, prefetch: bool = True) -> float:
        batches = BatchSource(data, rng.permutation(n), batch_size=bs, device=device, augment=BatchAugment(strength),
                              generator=aug_gen, channels_last=channels_last, prefetch=prefetch)
        stats = train_one_epoch(model, criterion, optimizer, scheduler, batches, device, 1, scaler=scaler,
                                amp_dtype=amp_dtype)
        return stats["images"] / stats["time_s"]

    # warm-up: allocator, oneDNN/cuDNN kernel choice
    bare_block(), loop_block(args.strength), loop_block(args.strength, prefetch=False), loop_block(0.0)
    bare, loop, in_line, plain = [], [], [], []
    main_cpu["a"].clear()
    for _ in range(args.repeats):
        bare.append(bare_block())
        loop.append(on_main_thread("b", lambda: loop_block(args.strength)))
        in_line.append(on_main_thread("c", lambda: loop_block(args.strength, prefetch=False)))
        plain.append(loop_block(0.0))
    a, b, c, b0 = (statistics.median(v) for v in (bare, loop, in_line, plain))
    # bare-step CPU time / loop CPU time of the training thread (medians; 1.0 = the loop adds nothing to that thread)
    cpu_ratio = {k: statistics.median(main_cpu["a"]) / statistics.median(main_cpu[k]) for k in ("b", "c")}
    # the augmentation alone on one batch, timed in isolation: steadier than the b vs b0 difference
    batch_u8 = torch.from_numpy(data.images[:bs]).to(device).permute(0, 3, 1, 2)
    augment = BatchAugment(args.strength)

    def augment_once() -> None:
        augment(batch_u8, aug_gen)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    augment_s = common.median_time(augment_once, repeats=30, warmup=3)
    augment_share = augment_s / (bs / a)
    # each (a, b) pair ran back to back, so its ratio is less exposed to load drift than the ratio of medians
    paired = statistics.median(y / x for x, y in zip(bare, loop))
    paired_in_line = statistics.median(y / x for x, y in zip(bare, in_line))
    result = {
        "model": args.model, "image_size": size, "batch_size": bs, "device": str(device), "threads": args.threads,
        "augment_strength": args.strength, "steps_per_block": steps, "repeats": args.repeats,
        "bare_images_per_s": round(a, 1), "loop_images_per_s": round(b, 1), "in_line_images_per_s": round(c, 1),
        "loop_no_augment_images_per_s": round(b0, 1),
        "ratio": round(b / a, 3), "paired_ratio": round(paired, 3),
        "in_line_ratio": round(c / a, 3), "in_line_paired_ratio": round(paired_in_line, 3),
        "augment_ms_per_batch": round(augment_s * 1e3, 2),
        "training_thread_cpu_ratio": {k: round(v, 3) for k, v in cpu_ratio.items()},
        "training_thread_cpu_s": {k: [round(x, 3) for x in v] for k, v in main_cpu.items()},
        "bare_all": [round(v, 1) for v in bare], "loop_all": [round(v, 1) for v in loop],
        "in_line_all": [round(v, 1) for v in in_line], "loop_no_augment_all": [round(v, 1) for v in plain],
    }
    print(f"(a)  bare model step          : {a:9.1f} images/s  (median of {args.repeats})")
    print(f"(b)  hamtune loop, augment {args.strength:<4}: {b:9.1f} images/s  (next batch prefetched)")
    print(f"(c)  the same loop in line    : {c:9.1f} images/s")
    print(f"(b0) hamtune loop, no augment : {b0:9.1f} images/s")
    print(f"ratio b/a                     : {b / a:9.3f}  (goal >= 0.95; median of paired ratios {paired:.3f})")
    print(f"ratio c/a                     : {c / a:9.3f}  (median of paired ratios {paired_in_line:.3f})")
    print(f"training thread CPU a/b, a/c  : {cpu_ratio['b']:9.3f}, {cpu_ratio['c']:.3f}")
    print(json.dumps(result))

    met = min(b / a, paired) >= 0.95
    table = common.md_table(
        ["variant", "median images/s", "vs (a)", f"all {args.repeats} repeats"],
        [
            ["(a) bare forward+backward+step, float batch in memory", common.fmt(a, 1), "1.000",
             ", ".join(common.fmt(v, 0) for v in bare)],
            [f"(b) hamtune train_one_epoch, uint8 arrays, augment {args.strength}, next batch prefetched",
             common.fmt(b, 1), f"{b / a:.3f}", ", ".join(common.fmt(v, 0) for v in loop)],
            ["(c) the same in line (prefetch=False)", common.fmt(c, 1), f"{c / a:.3f}",
             ", ".join(common.fmt(v, 0) for v in in_line)],
            ["(b0) (b) with augment 0", common.fmt(b0, 1), f"{b0 / a:.3f}",
             ", ".join(common.fmt(v, 0) for v in plain)],
        ],
    )
    where = f"GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else f"CPU, {args.threads} threads"
    body = "\n".join([
        common.run_header(load_at_start),
        f"Setup: `{args.model}` with hamtune's head (hidden {config.head_hidden}), {size} px, batch {bs}, {where}, "
        f"AdamW, AMP {amp_dtype if amp_dtype is not None else 'off'}, channels_last {channels_last}; {steps} steps per "
        f"timed block, {args.repeats} blocks per variant interleaved after one warm-up block each; median images/s. "
        f"(b) prepares the next batch in one background thread while the current one computes (on CPU: gather and "
        f"augment; on CUDA: gather into pinned memory and copy on a side stream), so it uses that thread besides "
        f"the {args.threads} compute thread(s).\n",
        table,
        f"Result: (b)/(a) = **{b / a:.3f}** with prefetch — goal >= 0.95 {'met' if met else 'MISSED'} (median of "
        f"the back-to-back pair ratios: {paired:.3f}); in line (c)/(a) = {c / a:.3f} (pairs: {paired_in_line:.3f}). "
        f"Augmentation costs {1 - b / b0:.1%} of the prefetched loop's throughput (b vs b0); batching from uint8 "
        f"arrays, uint8 -> float, the per-step loss check and the lr schedule cost {1 - b0 / a:.1%} (b0 vs a). "
        f"Differences smaller than the spread of the repeats (last column) are noise. Timed alone, "
        f"BatchAugment({args.strength}) takes {augment_s * 1e3:.2f} ms per batch of {bs}, {augment_share:.1%} of a "
        f"bare step.\n",
        (f"CPU time of the training thread (the one torch thread; steadier than wall time when other jobs share the "
         f"cores): bare step / loop = **{cpu_ratio['b']:.3f}** with prefetch, {cpu_ratio['c']:.3f} in line. With "
         f"prefetch the training thread runs the model step and its bookkeeping; the batch is prepared on another "
         f"core.\n"
         if args.threads == 1 and device.type == "cpu" else ""),
    ])
    # On a shared machine the result is only worth keeping if nothing else ran: say so when the run was disturbed.
    load_at_end = common.load_average()
    spread = (max(bare) - min(bare)) / a
    busy = float(load_at_end.split(" / ")[0]) > 0.5 * (os.cpu_count() or 1) + args.threads or spread > 0.25
    if busy:
        body += (f"\n**Disturbed run**: load average {load_at_end} at the end, (a) varied by {spread:.0%} between "
                 f"repeats; other jobs competed for the cores, so these numbers say little. Rerun on a quiet "
                 f"machine.\n")
    common.publish(HEADING, body, dry_run=args.dry_run)


if __name__ == "__main__":
    main()
