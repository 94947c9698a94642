"""How close does hamtune's training loop get to the bare model step?

(a) the limit: forward + backward + optimizer step on a float batch already in memory, nothing else;
(b) hamtune.train.train_one_epoch over read-only uint8 arrays: fancy-index gather, uint8 -> float, BatchAugment,
    loss check, LR schedule, i.e. everything a real epoch does;
(b0) the same with augmentation off, to show what the augmentation itself costs.
All use the same HamtuneNet, optimizer and AMP/channels_last settings as fit() would on that device, run
interleaved (a, b, b0, a, b, b0, ...) so load changes on a shared machine hit all alike, and report median images/s
and the ratio b/a (goal >= 0.90). Writes the "Training loop vs the limit" section of BENCHMARKS.md (--dry-run prints).

    .venv/bin/python bench/bench_loop.py                      # CPU defaults: resnet10t, 32 px, batch 64, 2 threads
    .venv/bin/python bench/bench_loop.py --device cuda --model resnext101_32x8d --image-size 224 --batch-size 64
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import torch

import common
from hamtune.augment import BatchAugment
from hamtune.train import TrainConfig, build_scheduler, resolve_device, train_one_epoch

HEADING = "## Training loop vs the limit"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet10t")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--steps", type=int, default=15, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved (a, b) pairs")
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

    def bare_block() -> float:
        return rig.bare_images_per_s(steps)

    # (b) a read-only uint8 data set, gathered per batch like the real loop
    rng = np.random.default_rng(0)
    n = steps * bs
    data = common.readonly_dataset(n, size, rng)
    scheduler = build_scheduler(optimizer, warmup_steps=steps, total_steps=10**9)
    aug_gen = torch.Generator().manual_seed(1)

    def loop_block(strength: float) -> float:
        stats = train_one_epoch(model, criterion, optimizer, scheduler, data, rng.permutation(n), batch_size=bs,
                                device=device, augment=BatchAugment(strength), generator=aug_gen, scaler=scaler,
                                amp_dtype=amp_dtype, channels_last=channels_last)
        return stats["images"] / stats["time_s"]

    bare_block(), loop_block(args.strength), loop_block(0.0)  # warm-up: allocator, oneDNN/cuDNN kernel choice
    bare, loop, plain = [], [], []
    for _ in range(args.repeats):
        bare.append(bare_block())
        loop.append(loop_block(args.strength))
        plain.append(loop_block(0.0))
    a, b, b0 = statistics.median(bare), statistics.median(loop), statistics.median(plain)
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
    result = {
        "model": args.model, "image_size": size, "batch_size": bs, "device": str(device), "threads": args.threads,
        "augment_strength": args.strength, "steps_per_block": steps, "repeats": args.repeats,
        "bare_images_per_s": round(a, 1), "loop_images_per_s": round(b, 1),
        "loop_no_augment_images_per_s": round(b0, 1),
        "ratio": round(b / a, 3), "paired_ratio": round(paired, 3), "augment_ms_per_batch": round(augment_s * 1e3, 2),
        "bare_all": [round(v, 1) for v in bare], "loop_all": [round(v, 1) for v in loop],
        "loop_no_augment_all": [round(v, 1) for v in plain],
    }
    print(f"(a)  bare model step          : {a:9.1f} images/s  (median of {args.repeats})")
    print(f"(b)  hamtune loop, augment {args.strength:<4}: {b:9.1f} images/s")
    print(f"(b0) hamtune loop, no augment : {b0:9.1f} images/s")
    print(f"ratio b/a                     : {b / a:9.3f}  (goal >= 0.90; median of paired ratios {paired:.3f})")
    print(json.dumps(result))

    met = b / a >= 0.90
    table = common.md_table(
        ["variant", "median images/s", "vs (a)", f"all {args.repeats} repeats"],
        [
            ["(a) bare forward+backward+step, float batch in memory", common.fmt(a, 1), "1.000",
             ", ".join(common.fmt(v, 0) for v in bare)],
            [f"(b) hamtune train_one_epoch, uint8 arrays, augment {args.strength}", common.fmt(b, 1),
             f"{b / a:.3f}", ", ".join(common.fmt(v, 0) for v in loop)],
            ["(b0) the same, augment 0", common.fmt(b0, 1), f"{b0 / a:.3f}",
             ", ".join(common.fmt(v, 0) for v in plain)],
        ],
    )
    where = f"GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else f"CPU, {args.threads} threads"
    body = "\n".join([
        common.run_header(load_at_start),
        f"Setup: `{args.model}` with hamtune's head (hidden {config.head_hidden}), {size} px, batch {bs}, {where}, "
        f"AdamW, AMP {amp_dtype if amp_dtype is not None else 'off'}, channels_last {channels_last}; {steps} steps per "
        f"timed block, {args.repeats} blocks per variant interleaved after one warm-up block each; median images/s.\n",
        table,
        f"Result: (b)/(a) = **{b / a:.3f}** — goal >= 0.90 {'met' if met else 'MISSED'} (median of the "
        f"back-to-back pair ratios: {paired:.3f}). Augmentation costs "
        f"{1 - b / b0:.1%} of the loop's throughput (b vs b0); batching from uint8 arrays, uint8 -> float, the "
        f"per-step loss check and the lr schedule cost {1 - b0 / a:.1%} (b0 vs a). Differences smaller than the "
        f"spread of the repeats (last column) are noise. Timed alone, BatchAugment({args.strength}) takes "
        f"{augment_s * 1e3:.2f} ms per batch of {bs}, {augment_share:.1%} of a bare step.\n",
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
