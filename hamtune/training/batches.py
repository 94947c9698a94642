"""The batches of one epoch, ready for the model: gathered from read-only uint8 arrays, copied to the device,
augmented, in the model's memory format, with the next batch prepared while the current one computes.

Batches are gathered by fancy-indexing the (possibly read-only, memory-mapped or object-store) uint8 arrays, so the
dataset is never copied whole, and are turned into floats and augmented on the device. The loop only iterates:

    with BatchSource(train, indices, batch_size=64, device=device, augment=augment, generator=g) as batches:
        for batch in batches:
            loss = criterion(model(batch.x, batch.meta), batch.target)

Prefetching (hamtune.training.prefetch) prepares batch k+1 in a background thread while batch k computes; the
weights come out bit-identical to prefetch=False. On CUDA the thread gathers into pinned memory and copies on a side
stream, and augmentation runs on the GPU in the loop's thread. On CPU the device is this thread's core, so the thread
also augments: it is then the only user of `generator` and draws from it in step order, as the in-line loop does; an
early stop (leaving the `with` block) rewinds the generator past the batch prepared ahead. Without a generator the
draws would come from the global RNG, which dropout uses, so augmentation then stays in the loop's thread.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from hamtune.data.arrays import SplitArrays
from hamtune.training.augment import BatchAugment, to_device
from hamtune.training.prefetch import Prefetcher


@dataclass
class Batch:
    """One training batch on the device, ready for model(x, meta) and criterion(output, target)."""

    x: torch.Tensor  # float NCHW in [0, 1], augmented, in the model's memory format
    meta: torch.Tensor | None
    target: torch.Tensor
    size: int


def steps_per_epoch(num_samples: int, batch_size: int) -> int:
    """Full batches plus a last partial one, unless that would hold a single sample (BatchNorm cannot train on it)."""
    full, rest = divmod(num_samples, batch_size)
    return full + (1 if rest > 1 else 0)


def from_numpy(array: np.ndarray) -> torch.Tensor:
    """Wrap a numpy batch without copying. A slice of a read-only array (memory map, Ray object store) is fine:
    the tensor is only read (converted to float on the device), so torch's non-writable warning does not apply."""
    if array.flags.writeable:
        return torch.from_numpy(array)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
        return torch.from_numpy(array)


def array_to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    return to_device(from_numpy(array), device)


def images_to_input(images_u8: torch.Tensor, augment: BatchAugment | None, generator: torch.Generator | None,
                    channels_last: bool) -> torch.Tensor:
    """uint8 NHWC on the device -> augmented float NCHW in [0, 1] in the memory format the model wants."""
    x = images_u8.permute(0, 3, 1, 2)
    x = augment(x, generator) if augment is not None else x.float().div_(255.0)
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@dataclass
class _Prepared:
    """A batch as the prefetch thread leaves it: uint8 images still to augment, or `x` already augmented (CPU)."""

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


class BatchSource:
    """Iterate (inside `with`) to get the epoch's batches in `indices` order; see the module docstring."""

    def __init__(self, data: SplitArrays, indices: np.ndarray, *, batch_size: int, device: torch.device,
                 augment: BatchAugment | None = None, generator: torch.Generator | None = None,
                 channels_last: bool = False, use_meta: bool = False, prefetch: bool = True) -> None:
        self.data, self.indices, self.batch_size, self.device = data, indices, batch_size, device
        self.augment, self.generator, self.channels_last, self.use_meta = augment, generator, channels_last, use_meta
        cuda = device.type == "cuda"
        self.prefetch = prefetch and device.type in ("cpu", "cuda")  # other backends (mps): in line
        self._augment_ahead = self.prefetch and not cuda and (augment is None or generator is not None)
        self._copy_stream = torch.cuda.Stream(device) if self.prefetch and cuda else None
        self._prefetcher: Prefetcher[_Prepared] | None = None

    def __len__(self) -> int:
        return steps_per_epoch(len(self.indices), self.batch_size)

    def __enter__(self) -> BatchSource:
        self._prefetcher = Prefetcher(self._load, len(self), enabled=self.prefetch).__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        prefetcher, self._prefetcher = self._prefetcher, None
        prefetcher.__exit__(*exc_info)
        if prefetcher.unused is not None and prefetcher.unused.augment_state is not None:
            self.generator.set_state(prefetcher.unused.augment_state)  # as if the batch ahead had never been drawn

    def __iter__(self) -> Iterator[Batch]:
        if self._prefetcher is None:
            raise RuntimeError("iterate a BatchSource inside `with`")
        for prepared in self._prefetcher:
            prepared.use_on_current_stream(self.device)
            x = prepared.x if prepared.x is not None else images_to_input(
                prepared.images, self.augment, self.generator, self.channels_last)
            yield Batch(x=x, meta=prepared.meta, target=prepared.target, size=prepared.size)

    def _load(self, step: int) -> _Prepared:
        rows = self.indices[step * self.batch_size : (step + 1) * self.batch_size]
        with torch.cuda.stream(self._copy_stream) if self._copy_stream is not None else nullcontext():
            batch = _Prepared(len(rows), array_to_device(self.data.images[rows], self.device),
                              array_to_device(self.data.labels[rows], self.device),
                              array_to_device(self.data.meta[rows], self.device) if self.use_meta else None)
            if self._copy_stream is not None:
                batch.ready = torch.cuda.Event()
                batch.ready.record(self._copy_stream)
        if self._augment_ahead:
            batch.augment_state = self.generator.get_state() if self.generator is not None else None
            batch.x = images_to_input(batch.images, self.augment, self.generator, self.channels_last)
            batch.images = None
        return batch
