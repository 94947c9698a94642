"""The plain-PyTorch training loop: one trial's training, evaluation, prediction and checkpoint state.

Deliberately free of Ray: the search calls fit() with an on_epoch callback that reports metrics and saves
checkpoints, and the same fit() runs standalone for the final retrain and in tests. The loop follows torchvision's
references/classification: readable functions, a per-iteration warm-up + cosine schedule, AMP and channels_last on
CUDA. Batches are gathered by fancy-indexing the (possibly read-only, memory-mapped) uint8 arrays, so the dataset is
never copied whole, and are turned into floats and augmented on the device.

Everything random has its own seeded generator (batch order: numpy; augmentation: torch CPU generator) or is the
torch global RNG (init, dropout), and all of them are in the checkpoint, so a resumed run continues exactly.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import math
import os
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hamtune.augment import BatchAugment, to_device
from hamtune.config import TrainConfig
from hamtune.data.arrays import SplitArrays
from hamtune.data.ham10000 import CLASSES, NUM_CLASSES
from hamtune.errors import HamtuneError
from hamtune.imbalance import epoch_indices, make_criterion
from hamtune.io import atomic_write_bytes
from hamtune.metrics import classification_metrics
from hamtune.model import build_model
from hamtune.prefetch import Prefetcher

__all__ = ["FitResult", "TrainConfig", "build_model", "evaluate", "fit", "load_state", "predict_proba", "save_state",
           "train_one_epoch"]

STATE_FORMAT = 1


@dataclass
class FitResult:
    """How a run ended; epochs_run counts completed epochs (those in history, including ones before a resume)."""

    status: str  # "completed" | "non_finite"
    epochs_run: int
    history: list[dict] = field(default_factory=list)
    model: nn.Module | None = None
    message: str = ""


# --------------------------------------------------------------------------------------------------------------------
# building blocks


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise HamtuneError(f"train config: device={name!r} but CUDA is not available on this machine")
    return device


def build_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """No weight decay on biases and norm parameters (1-d tensors), as in timm and torchvision's references."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr)
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.momentum > 0)


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


def steps_per_epoch(num_samples: int, batch_size: int) -> int:
    """Full batches plus a last partial one, unless that would hold a single sample (BatchNorm cannot train on it)."""
    full, rest = divmod(num_samples, batch_size)
    return full + (1 if rest > 1 else 0)


def amp_dtype_for(device: torch.device, enabled: bool) -> torch.dtype | None:
    """bf16 where supported (no loss scaling needed), else fp16; AMP only on CUDA (CPU autocast is slower here)."""
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _from_numpy(array: np.ndarray) -> torch.Tensor:
    """Wrap a numpy batch without copying. A slice of a read-only array (memory map, Ray object store) is fine:
    the tensor is only read (converted to float on the device), so torch's non-writable warning does not apply."""
    if array.flags.writeable:
        return torch.from_numpy(array)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
        return torch.from_numpy(array)


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    return to_device(_from_numpy(array), device)


def _images_to_input(images_u8: torch.Tensor, augment: BatchAugment | None, generator: torch.Generator | None,
                     channels_last: bool) -> torch.Tensor:
    """uint8 NHWC on the device -> augmented float NCHW in [0, 1] in the memory format the model wants."""
    x = images_u8.permute(0, 3, 1, 2)
    x = augment(x, generator) if augment is not None else x.float().div_(255.0)
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@dataclass
class _Batch:
    """One training batch on the device: uint8 images still to augment, or `x` already augmented (CPU prefetch)."""

    size: int
    images: torch.Tensor | None
    target: torch.Tensor
    meta: torch.Tensor | None
    x: torch.Tensor | None = None
    ready: torch.cuda.Event | None = None  # the copy stream's event after this batch's host-to-device copies
    augment_state: torch.Tensor | None = None  # the augmentation generator's state before this batch's draws

    def use_on_current_stream(self, device: torch.device) -> None:
        """Wait for the side-stream copies, and tell the caching allocator the compute stream uses these tensors."""
        if self.ready is None:
            return
        stream = torch.cuda.current_stream(device)
        stream.wait_event(self.ready)
        for tensor in (self.images, self.target, self.meta):
            if tensor is not None:
                tensor.record_stream(stream)


# --------------------------------------------------------------------------------------------------------------------
# one epoch, evaluation, prediction


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


def train_one_epoch(
    model: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    data: SplitArrays,
    indices: np.ndarray,
    *,
    batch_size: int,
    device: torch.device,
    augment: BatchAugment | None = None,
    generator: torch.Generator | None = None,
    scaler: torch.amp.GradScaler | None = None,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    use_meta: bool = False,
    epoch: int = 1,
    progress: bool = False,
    prefetch: bool = True,
) -> dict:
    """Train over `indices` (this epoch's sample order) in batches; returns loss, throughput and time.

    Stops at the first non-finite loss BEFORE its backward pass, so no update ever comes from a NaN/inf loss; the
    result then has "non_finite_step" (1-based) set.

    prefetch prepares batch k+1 in a background thread while batch k computes; the weights come out bit-identical
    to prefetch=False. On CUDA the thread gathers into pinned memory and copies on a side stream, and augmentation
    runs here on the GPU. On CPU the device is this thread's core, so the thread also augments: it is then the only
    user of `generator` and draws from it in step order, as the in-line loop does; an early stop rewinds the
    generator past the batch prepared ahead. Without a generator the draws would come from the global RNG, which
    dropout uses here, so augmentation then stays in this thread.
    """
    model.train()
    num_steps = steps_per_epoch(len(indices), batch_size)
    loss_sum = 0.0
    seen = 0
    lr = optimizer.param_groups[0]["lr"]
    steps = range(num_steps)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=f"epoch {epoch}", leave=False)
    cuda = device.type == "cuda"
    prefetch = prefetch and device.type in ("cpu", "cuda")  # other backends (mps): in line, as before
    augment_ahead = prefetch and not cuda and (augment is None or generator is not None)
    copy_stream = torch.cuda.Stream(device) if prefetch and cuda else None

    def load(step: int) -> _Batch:
        batch_index = indices[step * batch_size : (step + 1) * batch_size]
        with torch.cuda.stream(copy_stream) if copy_stream is not None else nullcontext():
            batch = _Batch(len(batch_index), _to_device(data.images[batch_index], device),
                           _to_device(data.labels[batch_index], device),
                           _to_device(data.meta[batch_index], device) if use_meta else None)
            if copy_stream is not None:
                batch.ready = torch.cuda.Event()
                batch.ready.record(copy_stream)
        if augment_ahead:
            batch.augment_state = generator.get_state() if generator is not None else None
            batch.x, batch.images = _images_to_input(batch.images, augment, generator, channels_last), None
        return batch

    non_finite_step = None
    start = time.perf_counter()
    with Prefetcher(load, num_steps, enabled=prefetch) as batches:
        for step, batch in zip(steps, batches):
            batch.use_on_current_stream(device)
            x = batch.x if batch.x is not None else _images_to_input(batch.images, augment, generator, channels_last)

            with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext():
                output = model(x, batch.meta)
                loss = criterion(output, batch.target)

            loss_value = loss.item()
            if not math.isfinite(loss_value):
                non_finite_step = step + 1
                break

            lr = optimizer.param_groups[0]["lr"]
            backward_and_step(loss, optimizer, scaler)
            scheduler.step()

            loss_sum += loss_value * batch.size
            seen += batch.size
            if progress:
                steps.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
    if batches.unused is not None and batches.unused.augment_state is not None:
        generator.set_state(batches.unused.augment_state)  # as if the batch prepared ahead had never been drawn
    if non_finite_step is not None:
        return {"loss": float("nan"), "images": seen, "time_s": time.perf_counter() - start, "lr": lr,
                "non_finite_step": non_finite_step}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    return {"loss": loss_sum / max(seen, 1), "images": seen, "time_s": elapsed, "lr": lr}


@torch.inference_mode()
def _logits(model: nn.Module, images: np.ndarray, meta: np.ndarray | None, *, batch_size: int,
            device: torch.device, tta: bool = False) -> torch.Tensor:
    """Float32 logits (or, with tta, mean probabilities' log) for all images, in order, on the CPU."""
    model.eval()
    channels_last = device.type == "cuda"
    amp_dtype = amp_dtype_for(device, True)
    uses_meta = getattr(model, "meta_dim", 0) > 0
    if uses_meta and meta is None:
        raise ValueError("this model uses metadata features; pass meta")
    outputs = []
    for start in range(0, len(images), batch_size):
        x = _images_to_input(_to_device(images[start : start + batch_size], device), None, None, channels_last)
        m = _to_device(meta[start : start + batch_size], device) if uses_meta else None
        views = _dihedral_views(x) if tta else [x]
        with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext():
            logits = [model(v, m).float() for v in views]
        if tta:
            # average probabilities over the views; return as log-probs so softmax recovers the mean
            out = torch.stack([F.softmax(z, dim=1) for z in logits]).mean(0).log()
        else:
            out = logits[0]
        outputs.append(out.cpu())
    if not outputs:
        return torch.zeros(0, getattr(model, "num_classes", NUM_CLASSES))
    return torch.cat(outputs)


def evaluate(model: nn.Module, data: SplitArrays, *, batch_size: int = 256, device: str | torch.device = "cpu",
             criterion: nn.Module | None = None) -> dict:
    """Loss and classification metrics on a split.

    The default loss is plain cross-entropy (no weights, no smoothing), so val_loss is comparable across trials
    that train with different imbalance strategies; pass `criterion` to evaluate the training loss instead.
    """
    device = torch.device(device)
    logits = _logits(model, data.images, data.meta, batch_size=batch_size, device=device)
    labels = torch.from_numpy(np.asarray(data.labels, dtype=np.int64))
    with torch.no_grad():
        if len(labels) == 0:
            loss = float("nan")
        elif criterion is None:
            loss = F.cross_entropy(logits, labels).item()
        else:
            loss = copy.deepcopy(criterion).to("cpu")(logits, labels).item()
    probs = torch.softmax(logits, dim=1).double().numpy()
    return {"loss": loss, **classification_metrics(data.labels, probs)}


def _dihedral_views(x: torch.Tensor) -> list[torch.Tensor]:
    """The 8 symmetries of a square NCHW batch: the 4 flips, and each of them transposed (the 90-degree turns)."""
    flips = [x, x.flip(3), x.flip(2), x.flip(2, 3)]
    return flips + [v.transpose(2, 3) for v in flips]


def predict_proba(model: nn.Module, images: np.ndarray, meta: np.ndarray | None = None, *, batch_size: int = 256,
                  device: str | torch.device = "cpu", tta: bool = False) -> np.ndarray:
    """Class probabilities (N, C) for uint8 NHWC images; rows sum to 1. Moves the model to `device`.

    tta averages the probabilities over the eight flips and 90-degree rotations (dermoscopy has no orientation).
    """
    device = torch.device(device)
    model.to(device)
    logits = _logits(model, images, meta, batch_size=batch_size, device=device, tta=tta)
    probs = torch.softmax(logits.double(), dim=1).numpy()
    return probs / probs.sum(axis=1, keepdims=True)


# --------------------------------------------------------------------------------------------------------------------
# checkpoint state


def _cpu_clone(value: Any) -> Any:
    """Deep copy with every tensor cloned to the CPU, so a checkpoint taken now is not changed by later training."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _cpu_clone(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cpu_clone(v) for v in value)
    return value


def save_state(path: str | os.PathLike, state: dict) -> None:
    """torch.save, written atomically (hamtune.io): a crash never leaves a half-written checkpoint."""
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_state(path: str | os.PathLike) -> dict:
    """Load a state saved by save_state (tensors and plain data only: weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise HamtuneError(f"checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise HamtuneError(f"checkpoint {str(path)!r} is unreadable or corrupt: {type(exc).__name__}: {exc}") from exc
    if not isinstance(state, dict):
        raise HamtuneError(f"checkpoint {str(path)!r} does not hold a state dict")
    return state


# Keys that may differ between the run that saved a state and the one resuming it (where/how fast it runs).
_RESUME_FREE_KEYS = {"device", "num_threads", "compile", "amp", "channels_last"}


def _check_resume_config(state: dict, config: TrainConfig) -> None:
    saved = state.get("config")
    if state.get("format") != STATE_FORMAT or not isinstance(saved, dict) or "model" not in state:
        raise HamtuneError("resume state: not a hamtune training state (missing format/config/model)")
    current = config.to_dict()
    differing = sorted(k for k in current if k not in _RESUME_FREE_KEYS and saved.get(k) != current[k])
    if differing:
        details = ", ".join(f"{k}: saved {saved.get(k)!r} vs {current[k]!r}" for k in differing)
        raise HamtuneError(f"resume state: config differs from the run that saved it ({details})")


# --------------------------------------------------------------------------------------------------------------------
# the run


def fit(
    config: TrainConfig,
    train: SplitArrays,
    val: SplitArrays | None,
    *,
    on_epoch: Callable[[dict, Callable[[], dict]], None] | None = None,
    state: dict | None = None,
    progress: bool = False,
) -> FitResult:
    """Train `config.epochs` epochs on `train`, evaluating on `val` after each; resume from `state` if given.

    on_epoch(metrics, checkpoint) runs after every epoch; checkpoint() returns the full state for save_state, and
    fit(config, ..., state=that) continues exactly as if the run had never stopped.
    """
    threads_before = torch.get_num_threads()
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    try:
        return _fit(config, train, val, on_epoch=on_epoch, state=state, progress=progress)
    finally:
        torch.set_num_threads(threads_before)  # the thread count is process-wide; do not leak it to the caller


def _fit(config: TrainConfig, train: SplitArrays, val: SplitArrays | None, *,
         on_epoch: Callable[[dict, Callable[[], dict]], None] | None, state: dict | None, progress: bool) -> FitResult:
    device = resolve_device(config.device)
    if len(train) < 2:
        raise HamtuneError(f"training split has {len(train)} image(s); need at least 2")

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest kernels once
    torch.manual_seed(config.seed)  # model init; resume overwrites it with the saved global RNG state
    # On resume the weights come from the state: do not read (or require) the pretrained weights again.
    model = build_model(dataclasses.replace(config, pretrained=False) if state is not None else config).to(device)
    channels_last = config.channels_last and device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(config, model)
    num_steps = steps_per_epoch(len(train), config.batch_size)
    scheduler = build_scheduler(
        optimizer, warmup_steps=round(config.warmup_epochs * num_steps), total_steps=config.epochs * num_steps
    )
    amp_dtype = amp_dtype_for(device, config.amp)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    criterion = make_criterion(
        config.imbalance, train.labels, NUM_CLASSES, focal_gamma=config.focal_gamma,
        label_smoothing=config.label_smoothing,
    ).to(device)
    augment = BatchAugment(config.augment_strength)
    batch_rng = np.random.default_rng(config.seed)
    augment_generator = torch.Generator().manual_seed(config.seed + 1)
    history: list[dict] = []
    start_epoch = 0

    if state is not None:
        _check_resume_config(state, config)
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if scaler is not None and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            batch_rng.bit_generator.state = state["rng"]["batch"]
            augment_generator.set_state(state["rng"]["augment"])
            torch.set_rng_state(state["rng"]["torch"])
            if device.type == "cuda" and state["rng"].get("cuda") is not None:
                torch.cuda.set_rng_state(state["rng"]["cuda"], device)
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            raise HamtuneError(f"resume state: does not fit this run: {type(exc).__name__}: {exc}") from exc
        start_epoch = int(state["epoch"])
        history = [dict(h) for h in state.get("history", [])]

    train_model = torch.compile(model) if config.compile else model

    def checkpoint() -> dict:
        return _cpu_clone({
            "format": STATE_FORMAT,
            "epoch": epoch + 1,
            "config": config.to_dict(),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": {
                "batch": batch_rng.bit_generator.state,
                "augment": augment_generator.get_state(),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            },
            "history": history,
        })

    for epoch in range(start_epoch, config.epochs):
        epoch_start = time.perf_counter()
        indices = epoch_indices(config.imbalance, train.labels, batch_rng)
        stats = train_one_epoch(
            train_model, criterion, optimizer, scheduler, train, indices,
            batch_size=config.batch_size, device=device, augment=augment, generator=augment_generator,
            scaler=scaler, amp_dtype=amp_dtype, channels_last=channels_last, use_meta=config.use_meta,
            epoch=epoch + 1, progress=progress,
        )
        if "non_finite_step" in stats:
            message = f"non-finite training loss at epoch {epoch + 1}, step {stats['non_finite_step']}"
            return FitResult("non_finite", len(history), history, model, message)

        metrics = {
            "epoch": float(epoch + 1),
            "train_loss": stats["loss"],
            "train_images_per_s": stats["images"] / stats["time_s"] if stats["time_s"] > 0 else float("nan"),
            "lr": float(stats["lr"]),
        }
        if val is not None:
            # evaluate through the uncompiled module: eval-mode graphs would otherwise trigger recompiles
            scores = evaluate(model, val, batch_size=max(config.batch_size, 256), device=device)
            metrics.update({
                "val_loss": scores["loss"],
                "val_accuracy": scores["accuracy"],
                "val_balanced_accuracy": scores["balanced_accuracy"],
                "val_macro_f1": scores["macro_f1"],
                "val_macro_auc": scores["macro_auc"],
            })
            metrics.update({f"val_recall_{name}": scores[f"recall_{name}"] for name in CLASSES})
        metrics["epoch_time_s"] = time.perf_counter() - epoch_start
        history.append(metrics)
        if on_epoch is not None:
            on_epoch(dict(metrics), checkpoint)
    return FitResult("completed", len(history), history, model)
