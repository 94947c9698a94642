"""A run's checkpoint state: everything fit() needs to continue a run exactly as if it had never stopped.

Weights, optimiser, LR schedule, loss scaler and every random generator (batch order: numpy; augmentation: a torch
CPU generator; init and dropout: torch's global RNG, and CUDA's), plus the config and the history so far. A state is
written atomically and read back with weights_only loading (tensors and plain data only).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hamtune.errors import HamtuneError
from hamtune.io import atomic_write_bytes
from hamtune.training.config import TrainConfig

STATE_FORMAT = 1
# Keys that may differ between the run that saved a state and the one resuming it (where/how fast it runs).
RESUME_FREE_KEYS = frozenset({"device", "num_threads", "compile", "amp", "cpu_amp", "channels_last"})


@dataclass
class RunParts:
    """The objects of one run whose state a checkpoint holds."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    batch_rng: np.random.Generator
    augment_generator: torch.Generator
    device: torch.device


def capture(parts: RunParts, *, epoch: int, config: TrainConfig, history: list[dict]) -> dict:
    """The full state after `epoch` completed epochs, every tensor cloned to the CPU (later training cannot change
    it)."""
    cuda = parts.device.type == "cuda"
    return cpu_clone({
        "format": STATE_FORMAT,
        "epoch": epoch,
        "config": config.to_dict(),
        "model": parts.model.state_dict(),
        "optimizer": parts.optimizer.state_dict(),
        "scheduler": parts.scheduler.state_dict(),
        "scaler": parts.scaler.state_dict() if parts.scaler is not None else None,
        "rng": {
            "batch": parts.batch_rng.bit_generator.state,
            "augment": parts.augment_generator.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(parts.device) if cuda else None,
        },
        "history": history,
    })


def restore(parts: RunParts, state: dict, config: TrainConfig) -> tuple[int, list[dict]]:
    """Put a captured state back into `parts`; returns (completed epochs, history). Refuses a state from another
    config or that does not fit, in one line."""
    check_resume_config(state, config)
    try:
        parts.model.load_state_dict(state["model"])
        parts.optimizer.load_state_dict(state["optimizer"])
        parts.scheduler.load_state_dict(state["scheduler"])
        if parts.scaler is not None and state.get("scaler"):
            parts.scaler.load_state_dict(state["scaler"])
        parts.batch_rng.bit_generator.state = state["rng"]["batch"]
        parts.augment_generator.set_state(state["rng"]["augment"])
        torch.set_rng_state(state["rng"]["torch"])
        if parts.device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], parts.device)
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        raise HamtuneError(f"resume state: does not fit this run: {type(exc).__name__}: {exc}") from exc
    return int(state["epoch"]), [dict(h) for h in state.get("history", [])]


def check_resume_config(state: dict, config: TrainConfig) -> None:
    saved = state.get("config")
    if state.get("format") != STATE_FORMAT or not isinstance(saved, dict) or "model" not in state:
        raise HamtuneError("resume state: not a hamtune training state (missing format/config/model)")
    current = config.to_dict()
    differing = sorted(k for k in current if k not in RESUME_FREE_KEYS and saved.get(k) != current[k])
    if differing:
        details = ", ".join(f"{k}: saved {saved.get(k)!r} vs {current[k]!r}" for k in differing)
        raise HamtuneError(f"resume state: config differs from the run that saved it ({details})")


def cpu_clone(value: Any) -> Any:
    """Deep copy with every tensor cloned to the CPU, so a checkpoint taken now is not changed by later training."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: cpu_clone(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(cpu_clone(v) for v in value)
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
