"""The plain-PyTorch training loop: fit(), train_one_epoch() and evaluate(), in the style of torchvision's
references/classification.

Deliberately free of Ray: the search calls fit() with an on_epoch callback that reports metrics and saves
checkpoints, and the same fit() runs standalone for the final retrain and in tests. A per-iteration warm-up + cosine
schedule, AMP, channels_last, parameter groups from timm's optimizer factory. Batches come from a
BatchSource (hamtune.training.batches), predictions from hamtune.training.predict, checkpoint state from
hamtune.training.state; every random generator is seeded and in the checkpoint, so a resumed run continues exactly.
channels_last and (opt-in) bf16 autocast apply on the CPU too: which pays is a per-model matter (BENCHMARKS.md).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hamtune.data.arrays import SplitArrays
from hamtune.errors import HamtuneError
from hamtune.training import state as run_state
from hamtune.training.augment import BatchAugment
from hamtune.training.batches import BatchSource, steps_per_epoch
from hamtune.training.config import TrainConfig
from hamtune.training.device import amp_dtype_for, autocast, resolve_device
from hamtune.training.imbalance import epoch_indices, make_criterion
from hamtune.training.metrics import classification_metrics
from hamtune.training.model import build_model
from hamtune.training.predict import logits
from hamtune.vocab import CLASSES, NUM_CLASSES


@dataclass
class FitResult:
    """How a run ended; epochs_run counts completed epochs (those in history, including ones before a resume)."""

    status: str  # "completed" | "non_finite"
    epochs_run: int
    history: list[dict] = field(default_factory=list)
    model: nn.Module | None = None
    message: str = ""


def build_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """timm's optimizer factory: no weight decay on biases and norm parameters (1-d tensors), as in timm and
    torchvision's references; SGD is Nesterov whenever it has momentum. With backbone_lr_scale < 1 the backbone's
    parameter groups learn at that fraction of the head's rate (discriminative fine-tuning)."""
    from timm.optim import create_optimizer_v2, param_groups_weight_decay

    params = model
    if config.backbone_lr_scale != 1.0 and hasattr(model, "backbone"):
        rest = nn.ModuleList([m for name, m in model.named_children() if name != "backbone"])
        params = [{**group, "lr": config.lr * scale}
                  for part, scale in ((model.backbone, config.backbone_lr_scale), (rest, 1.0))
                  for group in param_groups_weight_decay(part, config.weight_decay)]
    if config.optimizer == "adamw":
        return create_optimizer_v2(params, "adamw", lr=config.lr, weight_decay=config.weight_decay)
    kind = "nesterov" if config.momentum > 0 else "momentum"  # "momentum" with momentum 0 is plain SGD
    return create_optimizer_v2(params, kind, lr=config.lr, weight_decay=config.weight_decay, momentum=config.momentum)


def build_scheduler(
    optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to the base lr, then cosine decay to 0 at the last step; stepped every iteration."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def backward_and_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                      scaler: torch.amp.GradScaler | None = None) -> None:
    """One optimiser step from a loss: through the GradScaler when fp16 AMP needs one, plainly otherwise."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()


def train_one_epoch(model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, batches: BatchSource, device: torch.device,
                    epoch: int, *, scaler: torch.amp.GradScaler | None = None, amp_dtype: torch.dtype | None = None,
                    progress: bool = False) -> dict:
    """Train over one epoch's batches; returns loss, images, throughput time and the last lr.

    Stops at the first non-finite loss BEFORE its backward pass, so no update ever comes from a NaN/inf loss; the
    result then has "non_finite_step" (1-based) set.
    """
    model.train()
    loss_sum, seen = 0.0, 0
    lr = optimizer.param_groups[0]["lr"]
    start = time.perf_counter()
    with batches:
        steps = batches
        if progress:
            from tqdm.auto import tqdm

            steps = tqdm(batches, total=len(batches), desc=f"epoch {epoch}", leave=False)
        for step, batch in enumerate(steps):
            with autocast(device, amp_dtype):
                output = model(batch.x, batch.meta)
                loss = criterion(output, batch.target)

            loss_value = loss.item()
            if not math.isfinite(loss_value):
                return {"loss": float("nan"), "images": seen, "time_s": time.perf_counter() - start, "lr": lr,
                        "non_finite_step": step + 1}

            lr = optimizer.param_groups[0]["lr"]
            backward_and_step(loss, optimizer, scaler)
            scheduler.step()

            loss_sum += loss_value * batch.size
            seen += batch.size
            if progress:
                steps.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {"loss": loss_sum / max(seen, 1), "images": seen, "time_s": time.perf_counter() - start, "lr": lr}


def evaluate(model: nn.Module, data: SplitArrays, *, batch_size: int = 256, device: str | torch.device = "cpu",
             criterion: nn.Module | None = None) -> dict:
    """Loss and classification metrics on a split.

    The default loss is plain cross-entropy (no weights, no smoothing), so val_loss is comparable across trials
    that train with different imbalance strategies; pass `criterion` to evaluate the training loss instead.
    """
    import copy

    device = torch.device(device)
    out = logits(model, data.images, data.meta, batch_size=batch_size, device=device)
    labels = torch.as_tensor(np.array(data.labels, dtype=np.int64))  # a copy: object-store arrays are read-only
    with torch.no_grad():
        if len(labels) == 0:
            loss = float("nan")
        elif criterion is None:
            loss = F.cross_entropy(out, labels).item()
        else:
            loss = copy.deepcopy(criterion).to("cpu")(out, labels).item()
    probs = torch.softmax(out, dim=1).double().numpy()
    return {"loss": loss, **classification_metrics(data.labels, probs)}


def val_metrics(model: nn.Module, val: SplitArrays, *, batch_size: int, device: torch.device) -> dict:
    """The val_* metrics a trial reports after each epoch."""
    scores = evaluate(model, val, batch_size=max(batch_size, 256), device=device)
    metrics = {"val_loss": scores["loss"], "val_accuracy": scores["accuracy"],
               "val_balanced_accuracy": scores["balanced_accuracy"], "val_macro_f1": scores["macro_f1"],
               "val_macro_auc": scores["macro_auc"]}
    metrics.update({f"val_recall_{name}": scores[f"recall_{name}"] for name in CLASSES})
    return metrics


def fit(
    config: TrainConfig,
    train: SplitArrays,
    val: SplitArrays | None,
    *,
    on_epoch: Callable[[dict, Callable[[], dict]], None] | None = None,
    state: dict | None = None,
    progress: bool = False,
    weights: dict[str, torch.Tensor] | None = None,
) -> FitResult:
    """Train `config.epochs` epochs on `train`, evaluating on `val` after each; resume from `state` if given.

    on_epoch(metrics, checkpoint) runs after every epoch; checkpoint() returns the full state for save_state, and
    fit(config, ..., state=that) continues exactly as if the run had never stopped. weights: the pretrained
    backbone's state dict, already read (a search ships it); without it `config.pretrained` is read here.
    """
    threads_before = torch.get_num_threads()
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    try:
        return _fit(config, train, val, on_epoch=on_epoch, state=state, progress=progress, weights=weights)
    finally:
        torch.set_num_threads(threads_before)  # the thread count is process-wide; do not leak it to the caller


def _fit(config: TrainConfig, train: SplitArrays, val: SplitArrays | None, *,
         on_epoch: Callable[[dict, Callable[[], dict]], None] | None, state: dict | None, progress: bool,
         weights: dict[str, torch.Tensor] | None) -> FitResult:
    device = resolve_device(config.device)
    if len(train) < 2:
        raise HamtuneError(f"training split has {len(train)} image(s); need at least 2")

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest kernels once
    torch.manual_seed(config.seed)  # model init; resume overwrites it with the saved global RNG state
    # On resume the weights come from the state: do not read (or require) the pretrained weights again.
    model = (build_model(config.replace(pretrained=False)) if state is not None
             else build_model(config, weights)).to(device)
    channels_last = config.channels_last and device.type in ("cpu", "cuda")
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(config, model)
    num_steps = steps_per_epoch(len(train), config.batch_size)
    scheduler = build_scheduler(
        optimizer, warmup_steps=round(config.warmup_epochs * num_steps), total_steps=config.epochs * num_steps
    )
    amp_dtype = amp_dtype_for(device, config.amp, config.cpu_amp)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    criterion = make_criterion(config.imbalance, train.labels, NUM_CLASSES, focal_gamma=config.focal_gamma,
                               label_smoothing=config.label_smoothing).to(device)
    augment = BatchAugment(config.augment_strength)
    parts = run_state.RunParts(model, optimizer, scheduler, scaler, np.random.default_rng(config.seed),
                               torch.Generator().manual_seed(config.seed + 1), device)
    start_epoch, history = run_state.restore(parts, state, config) if state is not None else (0, [])
    train_model = torch.compile(model) if config.compile else model

    for epoch in range(start_epoch + 1, config.epochs + 1):
        epoch_start = time.perf_counter()
        batches = BatchSource(train, epoch_indices(config.imbalance, train.labels, parts.batch_rng),
                              batch_size=config.batch_size, device=device, augment=augment,
                              generator=parts.augment_generator, channels_last=channels_last,
                              use_meta=config.use_meta)
        stats = train_one_epoch(train_model, criterion, optimizer, scheduler, batches, device, epoch,
                                scaler=scaler, amp_dtype=amp_dtype, progress=progress)
        if "non_finite_step" in stats:
            message = f"non-finite training loss at epoch {epoch}, step {stats['non_finite_step']}"
            return FitResult("non_finite", len(history), history, model, message)

        metrics = {
            "epoch": float(epoch),
            "train_loss": stats["loss"],
            "train_images_per_s": stats["images"] / stats["time_s"] if stats["time_s"] > 0 else float("nan"),
            "lr": float(stats["lr"]),
        }
        if val is not None:
            # evaluate through the uncompiled module: eval-mode graphs would otherwise trigger recompiles
            metrics.update(val_metrics(model, val, batch_size=config.batch_size, device=device))
        metrics["epoch_time_s"] = time.perf_counter() - epoch_start
        history.append(metrics)
        if on_epoch is not None:
            on_epoch(dict(metrics), lambda: run_state.capture(parts, epoch=epoch, config=config, history=history))
    return FitResult("completed", len(history), history, model)
