"""Which CPU settings pay, per model: fp32 or bf16 autocast (train.cpu_amp), NCHW or channels_last.

hamtune's real training loop (hamtune.training.loop.train_one_epoch over read-only uint8 arrays, augmentation on, one
torch thread as a CPU trial runs) for each model and image size, under the four settings, interleaved round by round
(fp32, fp32+cl, bf16, bf16+cl, fp32, ...) so load drift on a shared machine hits all alike; images/s are medians and
the speed-ups are medians of ratios within a round. Then the accuracy check: the same short fine-tune (same seed,
same data) in fp32 and in bf16 for the models where bf16 wins, so a recipe that turns it on is known to lose nothing.
Writes the "CPU precision per model" section of BENCHMARKS.md (--dry-run prints).

    .venv/bin/python bench/bench_cpu_precision.py                    # resnet10t@64, Lite0@112, Lite2@112
    .venv/bin/python bench/bench_cpu_precision.py --models resnet10t:64 --repeats 3 --dry-run
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
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

SETTINGS = {"fp32": (False, False), "fp32 + channels_last": (False, True), "bf16": (True, False),
            "bf16 + channels_last": (True, True)}
DEFAULT_MODELS = "resnet10t:64,tf_efficientnet_lite0:112,tf_efficientnet_lite2:112"


def loop_images_per_s(model_name: str, size: int, *, cpu_amp: bool, channels_last: bool, batch_size: int,
                      steps: int) -> callable:
    """A closure timing one epoch of `steps` batches of the real loop under one setting (its own model + optimiser)."""
    config = TrainConfig.from_dict(dict(model=model_name, pretrained=False, batch_size=batch_size, device="cpu",
                                        num_threads=1, cpu_amp=cpu_amp, channels_last=channels_last,
                                        augment_strength=0.5))
    device = resolve_device("cpu")
    torch.manual_seed(0)
    rig = common.StepRig(config, device, size, batch_size)
    rng = np.random.default_rng(0)
    n = steps * batch_size
    data = common.readonly_dataset(n, size, rng)
    scheduler = build_scheduler(rig.optimizer, warmup_steps=steps, total_steps=10**9)
    generator = torch.Generator().manual_seed(1)
    criterion = torch.nn.CrossEntropyLoss()

    def one_block() -> float:
        batches = BatchSource(data, rng.permutation(n), batch_size=batch_size, device=device,
                              augment=BatchAugment(0.5), generator=generator, channels_last=rig.channels_last)
        stats = train_one_epoch(rig.model, criterion, rig.optimizer, scheduler, batches, device, 1,
                                scaler=rig.scaler, amp_dtype=rig.amp_dtype)
        return stats["images"] / stats["time_s"]

    return one_block


SYNTHETIC_IMAGES = 2000


def paired_fine_tune(model_name: str, size: int, *, cpu_amp: bool, epochs: int) -> tuple[float, float]:
    """One fit() on the synthetic set (decoded once into the cache); (last val balanced accuracy, seconds)."""
    import time

    from hamtune.data.cache import prepare_spec_data
    from hamtune.search.spec import spec_from_dict
    from hamtune.training.loop import fit

    spec = spec_from_dict({"data": {"source": "synthetic", "synthetic_size": SYNTHETIC_IMAGES, "image_size": size},
                           "model": {"name": model_name}, "train": {"epochs": epochs}})
    data = prepare_spec_data(spec.data, progress=False)
    config = TrainConfig.from_dict({**dict(spec.train), "model": model_name, "pretrained": False, "epochs": epochs,
                                    "num_threads": 1, "cpu_amp": cpu_amp, "channels_last": True, "device": "cpu",
                                    "seed": 0})
    start = time.perf_counter()
    result = fit(config, data.arrays("train"), data.arrays("val"))
    return float(result.history[-1]["val_balanced_accuracy"]), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated MODEL:IMAGE_SIZE")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6, help="batches per timed block")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--accuracy-model", default="resnet10t:64",
                        help="MODEL:IMAGE_SIZE for the paired fp32/bf16 fine-tune ('' skips it)")
    parser.add_argument("--accuracy-epochs", type=int, default=4)
    parser.add_argument("--dry-run", action="store_true", help="print the section instead of writing BENCHMARKS.md")
    args = parser.parse_args()
    load_at_start = common.load_average()
    torch.set_num_threads(1)

    rows = []
    for item in args.models.split(","):
        name, size = item.split(":")
        size = int(size)
        blocks = {label: loop_images_per_s(name, size, cpu_amp=amp, channels_last=cl, batch_size=args.batch_size,
                                           steps=args.steps) for label, (amp, cl) in SETTINGS.items()}
        for block in blocks.values():  # warm-up: oneDNN kernel choice, the allocator
            block()
        speeds: dict[str, list[float]] = {label: [] for label in SETTINGS}
        for _ in range(args.repeats):
            for label, block in blocks.items():
                speeds[label].append(block())
        base = speeds["fp32"]
        for label, values in speeds.items():
            ratio = statistics.median(v / b for v, b in zip(values, base))
            rows.append((name, size, label, common.fmt(statistics.median(values), 1), common.fmt(ratio, 2)))
            print(f"{name:24s} {size:4d} px  {label:22s} {statistics.median(values):7.1f} images/s  x{ratio:.2f}",
                  flush=True)
        del blocks

    accuracy_rows = []
    if args.accuracy_model:
        name, size = args.accuracy_model.split(":")
        for label, amp in (("fp32", False), ("bf16", True)):
            ba, seconds = paired_fine_tune(name, int(size), cpu_amp=amp, epochs=args.accuracy_epochs)
            accuracy_rows.append((name, size, label, f"{ba:.3f}", f"{seconds:.0f}"))
            print(f"paired run {name} {size} px {label}: val balanced accuracy {ba:.3f} in {seconds:.0f} s", flush=True)

    body = (f"{common.run_header(load_at_start)}\n\n"
            "hamtune's training loop (augmentation on, read-only uint8 arrays, one torch thread as one CPU trial runs, "
            f"batch {args.batch_size}), {args.repeats} interleaved rounds of {args.steps} batches per setting; "
            "speed-up = median over rounds of the setting's images/s over fp32's in the same round.\n\n"
            + common.md_table(["model", "image size", "setting", "images/s", "vs fp32"], rows))
    if accuracy_rows:
        body += ("\n\nAccuracy, paired: the same fine-tune (synthetic HAM10000-shaped set of "
                 f"{SYNTHETIC_IMAGES} images, the same seed, split and config, {args.accuracy_epochs} epochs, channels_last) "
                 "in fp32 and with bf16 autocast; val balanced accuracy after the last epoch.\n\n"
                 + common.md_table(["model", "image size", "precision", "val balanced accuracy", "seconds"],
                                   accuracy_rows))
    common.publish("## CPU precision per model", body, dry_run=args.dry_run)


if __name__ == "__main__":
    main()
