"""Input pipeline: the bare model step (the limit) vs hamtune's loop over cached uint8 arrays vs the seed's JPEG loader.

All three train the same default model (resnet10t with default.yaml's head) at the same image size and batch size on
the same images, interleaved round by round so a load spike hits every variant alike:

  (a) limit     forward + backward + optimizer step on float batches already in memory: what the loop can reach
  (b) hamtune   train_one_epoch over the decoded uint8 arrays, batched on-device augmentation at strength 0.5
  (b0)          the same with augmentation off, to show what the augmentation itself costs
  (c) seed way  a torch DataLoader over the JPEG files, PIL decode + torchvision transforms per image every epoch,
                num_workers=2 (how the project this one replaces fed its model)
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

import numpy as np
import torch
from PIL import Image

import common
from hamtune.training.augment import BatchAugment
from hamtune.training.batches import BatchSource
from hamtune.data import SplitArrays, prepare
from hamtune.vocab import NUM_CLASSES
from hamtune.training.imbalance import make_criterion
from hamtune.search.spec import load_spec
from hamtune.training.batches import steps_per_epoch
from hamtune.training.config import TrainConfig
from hamtune.training.loop import build_optimizer, build_scheduler, train_one_epoch
from hamtune.training.model import build_model

HEADING = "## Input pipeline: limit vs hamtune vs the seed's way"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class JpegDataset(torch.utils.data.Dataset):
    """The seed project's dataset: open, decode and transform one JPEG per item, every epoch."""

    def __init__(self, paths: list[Path], labels: np.ndarray, transform):
        self.paths, self.labels, self.transform = paths, labels, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        with Image.open(self.paths[i]) as image:
            return self.transform(image.convert("RGB")), int(self.labels[i])


def seed_transform(size: int):
    from torchvision import transforms as T

    return T.Compose([
        T.Resize((size, size)),
        T.RandomHorizontalFlip(),
        T.RandomRotation(20),
        T.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.05),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def jpeg_paths(root: Path, image_ids) -> list[Path]:
    found = {p.stem: p for p in root.glob("HAM10000_images_part_*/*.jpg")}
    return [found[i] for i in image_ids]


def make_training(config: TrainConfig, labels: np.ndarray, num_steps: int):
    torch.manual_seed(config.seed)
    model = build_model(config)
    optimizer = build_optimizer(config, model)
    scheduler = build_scheduler(optimizer, warmup_steps=num_steps, total_steps=100 * num_steps)
    criterion = make_criterion("none", labels, NUM_CLASSES)
    return model, optimizer, scheduler, criterion


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--synthetic-size", type=int, default=3000)
    parser.add_argument("--image-size", type=int, default=None, help="default: search_spaces/default.yaml's")
    parser.add_argument("--batch-size", type=int, default=None, help="default: search_spaces/default.yaml's")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the seed's way")
    parser.add_argument("--rounds", type=int, default=4, help="timed epochs per variant (after one warm-up round)")
    parser.add_argument("--limit-images", type=int, default=None, help="use only the first N training images")
    parser.add_argument("--dry-run", action="store_true", help="print the section instead of writing BENCHMARKS.md")
    args = parser.parse_args()
    load_at_start = common.load_average()

    spec = load_spec(common.ROOT / "search_spaces" / "default.yaml")
    image_size = args.image_size or spec.data.image_size
    batch_size = args.batch_size or int(spec.train.get("batch_size", 64))
    config = TrainConfig.from_dict({**spec.train, "batch_size": batch_size, "augment_strength": 0.5})
    torch.set_num_threads(args.threads)

    cache = common.out_dir("cache")
    data = prepare("synthetic", image_size, cache_dir=cache, synthetic_size=args.synthetic_size, progress=False)
    train = data.arrays("train")
    n = min(len(train), args.limit_images or len(train))
    rows = data.table.iloc[train.index[:n]]
    root = cache / "synthetic" / f"n{args.synthetic_size}-seed0"
    paths = jpeg_paths(root, rows["image_id"])
    labels = np.array(train.labels[:n])  # writable: torch.from_numpy warns about read-only arrays
    num_steps = steps_per_epoch(n, batch_size)
    images_per_epoch = sum(len(range(s * batch_size, min(n, (s + 1) * batch_size))) for s in range(num_steps))
    device = torch.device("cpu")

    # (a) the limit: the same number of steps on float batches that are already normalised and in memory
    m_a, opt_a, sch_a, crit_a = make_training(config, labels, num_steps)
    x_all = torch.from_numpy(np.ascontiguousarray(train.images[:n])).permute(0, 3, 1, 2).float().div_(255.0)
    y_all = torch.from_numpy(labels)
    batches = [(x_all[i:i + batch_size].contiguous(), y_all[i:i + batch_size]) for i in range(0, n, batch_size)]
    batches = batches[:num_steps]

    def epoch_limit() -> int:
        m_a.train()
        seen = 0
        for x, y in batches:
            loss = crit_a(m_a(x, None), y)
            opt_a.zero_grad(set_to_none=True)
            loss.backward()
            opt_a.step()
            sch_a.step()
            seen += len(y)
        return seen

    # (b) hamtune's loop, (b0) the same without augmentation
    rng = np.random.default_rng(0)
    hamtune_runs = {}
    for name, strength in (("b", 0.5), ("b0", 0.0)):
        model, opt, sch, crit = make_training(config, labels, num_steps)
        hamtune_runs[name] = (model, opt, sch, crit, BatchAugment(strength), torch.Generator().manual_seed(1))
    subset = train if n == len(train) else SplitArrays(train.images[:n], train.labels[:n], train.meta[:n],
                                                       train.index[:n])

    def epoch_hamtune(name: str) -> int:
        model, opt, sch, crit, augment, generator = hamtune_runs[name]
        batches = BatchSource(subset, rng.permutation(n), batch_size=batch_size, device=device, augment=augment,
                              generator=generator)
        stats = train_one_epoch(model, crit, opt, sch, batches, device, 1)
        return stats["images"]

    # (c) the seed's way
    m_c, opt_c, sch_c, crit_c = make_training(config, labels, num_steps)
    loader = torch.utils.data.DataLoader(JpegDataset(paths, labels, seed_transform(image_size)), batch_size=batch_size,
                                         shuffle=True, num_workers=args.workers, drop_last=False)

    def epoch_seed() -> int:
        m_c.train()
        seen = 0
        for x, y in loader:
            if len(y) < 2:
                continue  # BatchNorm cannot train on one sample; hamtune's loop skips it too
            loss = crit_c(m_c(x, None), y)
            opt_c.zero_grad(set_to_none=True)
            loss.backward()
            opt_c.step()
            sch_c.step()
            seen += len(y)
        return seen

    variants = {"a": epoch_limit, "b": lambda: epoch_hamtune("b"), "b0": lambda: epoch_hamtune("b0"), "c": epoch_seed}
    rates: dict[str, list[float]] = {k: [] for k in variants}
    for round_ in range(args.rounds + 1):
        for key, run in variants.items():
            start = time.perf_counter()
            seen = run()
            seconds = time.perf_counter() - start
            if round_ > 0:  # round 0 warms up allocators, thread pools and the page cache
                rates[key].append(seen / seconds)
            print(f"round {round_} {key}: {seen} images in {seconds:.2f} s = {seen / seconds:.0f} img/s", flush=True)

    rate = {k: statistics.median(v) for k, v in rates.items()}
    spread = {k: (min(v), max(v)) for k, v in rates.items()}

    def paired(x: str, y: str) -> float:
        """Median over rounds of x/y measured in the same round: a load spike in one round cannot tip it."""
        return statistics.median(p / q for p, q in zip(rates[x], rates[y]))

    ratio_ba, ratio_b0a, ratio_ca, ratio_bc = paired("b", "a"), paired("b0", "a"), paired("c", "a"), paired("b", "c")
    table = common.md_table(
        ["variant", "what runs each epoch", "images/s (median)", "min..max", "vs limit"],
        [
            ["(a) limit", "forward + backward + AdamW step on float batches already in memory",
             common.fmt(rate["a"], 0), f"{spread['a'][0]:.0f}..{spread['a'][1]:.0f}", "1.00"],
            ["(b) hamtune", "train_one_epoch over cached uint8 arrays, on-device augmentation (strength 0.5)",
             common.fmt(rate["b"], 0), f"{spread['b'][0]:.0f}..{spread['b'][1]:.0f}", f"**{ratio_ba:.2f}**"],
            ["(b0) hamtune, augment off", "the same with augment_strength 0",
             common.fmt(rate["b0"], 0), f"{spread['b0'][0]:.0f}..{spread['b0'][1]:.0f}", f"{ratio_b0a:.2f}"],
            ["(c) seed's way",
             f"DataLoader over JPEGs, PIL decode + torchvision transforms, num_workers={args.workers}",
             common.fmt(rate["c"], 0), f"{spread['c'][0]:.0f}..{spread['c'][1]:.0f}", f"{ratio_ca:.2f}"],
        ],
    )
    aug_cost = 1 - paired("b", "b0")
    loop_cost = 1 - ratio_b0a
    met = ratio_ba >= 0.90
    verdict = (f"**Goal b/a >= 0.90: {'met' if met else 'MISSED'}** (b/a = {ratio_ba:.2f}; b/c = {ratio_bc:.2f}: "
               f"hamtune's loop trains {ratio_bc:.1f}x as many images per second as the seed's JPEG pipeline).")
    body = [
        common.run_header(load_at_start),
        f"Setup: `{config.model}` (head {config.head_hidden}, dropout {config.head_dropout}) from "
        f"search_spaces/default.yaml, {image_size} px, batch {batch_size}, {args.threads} torch threads, CPU, "
        f"{n} training images of the synthetic set ({args.synthetic_size} images, seed 0; the same images for every "
        f"variant: (a), (b) read the decoded cache, (c) the JPEGs it was decoded from). {args.rounds} timed epochs per "
        f"variant after one warm-up round, variants interleaved round by round (a, b, b0, c, a, b, ...). images/s: "
        f"median over rounds; \"vs limit\" and the ratios below: median over rounds of the ratio within a round, so a "
        f"load spike in one round does not decide them.\n",
        table,
        verdict + "\n",
        f"Where the time goes: augmentation costs {aug_cost:+.0%} of (b)'s throughput (b vs b0); gathering batches "
        f"by fancy indexing, uint8 -> float, the per-step `loss.item()` and the lr schedule cost {loop_cost:+.0%} "
        f"(b0 vs a; within a few percent is run-to-run noise). The seed's way pays for JPEG decoding, resizing and "
        f"per-image PIL transforms on every epoch in {args.workers} worker processes (restarted every epoch, as the "
        f"seed's loader did) that compete with the training threads for the same {os.cpu_count()} cores.\n",
    ]
    if not met:
        culprit = ("the batched augmentation (b vs b0)" if aug_cost > loop_cost else
                   "the loop around the model step (b0 vs a)")
        body.append(
            f"Why the goal is missed: most of the gap is {culprit}. At 32 px the model step is only a few ms per "
            "batch, so per-batch costs that do not shrink with the model (the affine `grid_sample` and colour matrix "
            "of the augmentation, the batch gather) are a visible fraction of it. What would fix it: run the "
            "augmentation for the next batch on a background thread while the current step runs (it needs no "
            "gradients), or draw the whole epoch's sampling grids in one call; at real image sizes (>= 128 px) the "
            "model step grows faster than these costs and the ratio approaches 1 by itself. If the load average "
            "above is well over 2, rerun on a quiet machine first: interference hits the variants unevenly.\n")
    text = "\n".join(body)
    common.publish(HEADING, text, dry_run=args.dry_run)


if __name__ == "__main__":
    main()
