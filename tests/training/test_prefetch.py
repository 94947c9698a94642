"""Prefetching the next batch in a thread changes nothing but speed: same batches, same draws, same weights."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from hamtune.training.augment import BatchAugment
from hamtune.data.arrays import SplitArrays
from hamtune.training.imbalance import epoch_indices, make_criterion
from hamtune.training.prefetch import Prefetcher
from hamtune.training.batches import BatchSource, steps_per_epoch
from hamtune.training.loop import build_optimizer, build_scheduler, train_one_epoch
from hamtune.training.model import build_model
from test_train import TRAIN, tiny_config


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("hamtune-prefetch")]


def train_epochs(prefetch: bool, data: SplitArrays = TRAIN, epochs: int = 2, **overrides) -> dict:
    """fit()'s training part built from the same pieces, on the CPU; returns weights, per-epoch stats, RNG states."""
    config = tiny_config(use_meta=True, augment_strength=0.7, imbalance="oversample", **overrides)
    torch.manual_seed(config.seed)
    model = build_model(config)
    optimizer = build_optimizer(config, model)
    steps = steps_per_epoch(len(data), config.batch_size)
    scheduler = build_scheduler(optimizer, warmup_steps=steps, total_steps=epochs * steps)
    criterion = make_criterion(config.imbalance, data.labels, 7)
    batch_rng = np.random.default_rng(config.seed)
    generator = torch.Generator().manual_seed(config.seed + 1)
    stats = []
    for epoch in range(epochs):
        indices = epoch_indices(config.imbalance, data.labels, batch_rng)
        batches = BatchSource(data, indices, batch_size=config.batch_size, device=torch.device("cpu"),
                              augment=BatchAugment(config.augment_strength), generator=generator, use_meta=True,
                              prefetch=prefetch)
        stats.append(train_one_epoch(model, criterion, optimizer, scheduler, batches, torch.device("cpu"), epoch + 1))
        if "non_finite_step" in stats[-1]:
            break
    return {"weights": model.state_dict(), "stats": stats, "augment_rng": generator.get_state(),
            "torch_rng": torch.get_rng_state()}


def assert_identical(a: dict, b: dict) -> None:
    assert a["weights"].keys() == b["weights"].keys()
    for key in a["weights"]:
        assert torch.equal(a["weights"][key], b["weights"][key]), key
    def outcome(stats: dict) -> tuple:
        return repr(stats["loss"]), stats["images"], stats.get("non_finite_step")  # repr: nan == nan

    assert [outcome(s) for s in a["stats"]] == [outcome(s) for s in b["stats"]]
    assert torch.equal(a["augment_rng"], b["augment_rng"])
    assert torch.equal(a["torch_rng"], b["torch_rng"])  # dropout's draws, made on the main thread


def test_prefetching_trains_bit_identically_to_the_in_line_loop():
    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        in_line = train_epochs(prefetch=False)
        prefetched = train_epochs(prefetch=True)
    finally:
        torch.set_num_threads(threads_before)
    assert_identical(in_line, prefetched)
    assert all(s["images"] == len(TRAIN) for s in prefetched["stats"])
    assert not prefetch_threads()


def test_a_non_finite_stop_mid_epoch_matches_and_leaves_no_thread():
    first_epoch = epoch_indices("oversample", TRAIN.labels, np.random.default_rng(tiny_config().seed))
    meta = np.array(TRAIN.meta)
    meta[first_epoch[3 * 32 : 4 * 32], 0] = np.inf  # the samples of epoch 1's step 4 (and none of steps 1-3)
    meta[first_epoch[:3 * 32], 0] = TRAIN.meta[first_epoch[:3 * 32], 0]
    poisoned = SplitArrays(TRAIN.images, TRAIN.labels, meta, TRAIN.index)
    in_line = train_epochs(prefetch=False, data=poisoned)
    prefetched = train_epochs(prefetch=True, data=poisoned)
    assert [s.get("non_finite_step") for s in in_line["stats"]] == [4]  # steps 5 on had been prepared ahead
    # the generator is rewound past the batch drawn ahead: its state is the in-line loop's
    assert_identical(in_line, prefetched)
    assert not prefetch_threads()


def test_an_error_in_the_loop_or_in_the_worker_reaches_the_caller_and_joins_the_thread():
    config = tiny_config()
    model = build_model(config)
    optimizer = build_optimizer(config, model)
    scheduler = build_scheduler(optimizer, warmup_steps=1, total_steps=10)
    calls = []

    def failing_criterion(output, target):
        calls.append(threading.current_thread().name)
        if len(calls) == 3:
            raise RuntimeError("boom in step 3")
        return torch.nn.functional.cross_entropy(output, target)

    with pytest.raises(RuntimeError, match="boom in step 3"):
        batches = BatchSource(TRAIN, np.arange(len(TRAIN)), batch_size=32, device=torch.device("cpu"),
                              augment=BatchAugment(0.5), generator=torch.Generator().manual_seed(0))
        train_one_epoch(model, failing_criterion, optimizer, scheduler, batches, torch.device("cpu"), 1)
    assert calls == [threading.main_thread().name] * 3
    assert not prefetch_threads()

    bad_indices = np.arange(len(TRAIN)) + 100  # runs past the end from step 5 on: an IndexError in the worker
    with pytest.raises(IndexError):
        batches = BatchSource(TRAIN, bad_indices, batch_size=32, device=torch.device("cpu"))
        train_one_epoch(model, torch.nn.functional.cross_entropy, optimizer, scheduler, batches, torch.device("cpu"), 1)
    assert not prefetch_threads()


def test_the_prefetcher_produces_in_order_one_step_ahead_in_one_worker_thread():
    produced: list[tuple[int, str]] = []
    made = threading.Condition()

    def produce(step: int) -> int:
        with made:
            produced.append((step, threading.current_thread().name))
            made.notify_all()
        return step * 10

    with Prefetcher(produce, 5) as batches:
        for step, item in enumerate(batches):
            assert item == step * 10
            ahead = min(step + 2, 5)  # the one handed out and the next, no further
            with made:
                assert made.wait_for(lambda: len(produced) >= ahead, timeout=60), "the next step was not prepared"
                assert len(produced) == ahead
    assert [s for s, _ in produced] == list(range(5))
    assert {name for _, name in produced} == {produced[0][1]} and produced[0][1].startswith("hamtune-prefetch")
    assert batches.unused is None and not prefetch_threads()

    produced.clear()
    with Prefetcher(produce, 5) as batches:
        for step, _ in enumerate(batches):
            if step == 1:
                with made:
                    assert made.wait_for(lambda: len(produced) == 3, timeout=60)
                break
    assert batches.unused == 20 and not prefetch_threads()  # step 2 was made ahead, never handed out

    produced.clear()
    with Prefetcher(produce, 3, enabled=False) as batches:
        assert list(batches) == [0, 10, 20]
    assert [name for _, name in produced] == [threading.current_thread().name] * 3
