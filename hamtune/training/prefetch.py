"""One step of look-ahead for a training loop: the next batch is prepared in a background thread while the current
one computes.

Generic on purpose (hamtune.training.batches says what a batch is): produce(step) runs for step 0, 1, ... in order in ONE
worker thread, so anything it draws from a generator is drawn in exactly the order an in-line loop would draw it.
The context manager always joins the thread, also when the loop stops early or raises; the batch that was prepared
but never handed out is kept in `unused`, so the caller can undo what preparing it did (rewind a generator).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

T = TypeVar("T")


class Prefetcher(Generic[T]):
    """Iterate to get produce(0), ..., produce(num_steps - 1); with enabled=False each is produced in line."""

    def __init__(self, produce: Callable[[int], T], num_steps: int, *, enabled: bool = True) -> None:
        self.produce = produce
        self.num_steps = num_steps
        self.enabled = enabled
        self.unused: T | None = None  # produced ahead but never handed out (set on exit)
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future | None = None

    def __enter__(self) -> Prefetcher[T]:
        if self.enabled and self.num_steps > 0:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hamtune-prefetch")
        return self

    def __iter__(self) -> Iterator[T]:
        if self._pool is None:
            for step in range(self.num_steps):
                yield self.produce(step)
            return
        self._pending = self._pool.submit(self.produce, 0)
        for step in range(self.num_steps):
            item = self._pending.result()  # re-raises the worker's exception here, in the loop's thread
            self._pending = self._pool.submit(self.produce, step + 1) if step + 1 < self.num_steps else None
            yield item

    def __exit__(self, *exc_info: object) -> None:
        if self._pool is None:
            return
        pending, self._pending = self._pending, None
        if pending is not None and not pending.cancel():
            # Already running: let it finish (at most one batch), so nothing outlives the loop; its result (or
            # error: that batch was never needed) is only kept for the caller to undo.
            if pending.exception() is None:
                self.unused = pending.result()
        self._pool.shutdown(wait=True)
        self._pool = None
