"""Preflight: are the pretrained weights a search asks for there, where its trials will run?

Checked before any trial starts: on the driver for a local run (before Ray starts), on every live node that can
hold a trial for a cluster run (a zero-CPU Ray task pinned to each node), so a missing file is one line and exit 2
instead of every trial failing and being retried with Ray's tracebacks. A node that joins the cluster later is
checked by the trial itself before its first epoch, with the same one line.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hamtune.errors import HamtuneError
from hamtune.search.space import possible_values
from hamtune.training.config import TrainConfig
from hamtune.training.weights import find_cached_weights

log = logging.getLogger("hamtune")
# A node that has not answered by then is left to its trials' own check. A node's first task starts a Python
# worker that imports torch and timm: 15 s was too short on a loaded 2-core machine.
CLUSTER_TIMEOUT_S = 60.0


def weight_requests(train: Mapping[str, Any], space: Mapping[str, Any]) -> list[tuple[str, bool | str]]:
    """Every (model, pretrained) pair a trial may get whose pretrained is not false: fixed or `choice` values."""
    def values(key: str) -> list[Any]:
        return possible_values(key, space, train, TrainConfig.default(key)) or []

    pairs = []
    for model in values("model"):
        for pretrained in values("pretrained"):
            if pretrained is not False and (model, pretrained) not in pairs:
                pairs.append((model, pretrained))
    return pairs


def check_weights(model: str, pretrained: bool | str) -> None:
    """What building the model would need, without building it: timm's file in the local cache, or the file."""
    if pretrained is True:
        find_cached_weights(model)
    elif isinstance(pretrained, str):
        path = Path(pretrained).expanduser()
        if not path.is_absolute():
            # Tune runs each trial in its own folder, so a relative path would find the file here and not there
            raise HamtuneError(f"pretrained: weights file {pretrained!r} is a relative path; trials run in other "
                               f"folders, so give an absolute path (such as {str(path.absolute())!r})")
        if not path.is_file():
            raise HamtuneError(f"pretrained: weights file {str(path)!r} does not exist")


def missing_here(requests: list[tuple[str, bool | str]]) -> str | None:
    """The one-line reason the first request fails on this machine, or None when all are there."""
    for model, pretrained in requests:
        try:
            check_weights(model, pretrained)
        except HamtuneError as exc:
            return str(exc)
    return None


def on_this_node(message: str) -> str:
    """The message, saying which Ray node it is about (inside a Ray worker)."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    return f"on node {ray.util.get_node_ip_address()} (node id {node_id[:12]}): {message}"


def check_on_driver(train: Mapping[str, Any], space: Mapping[str, Any]) -> None:
    message = missing_here(weight_requests(train, space))
    if message:
        raise HamtuneError(message)


def check_on_nodes(train: Mapping[str, Any], space: Mapping[str, Any], nodes: list[dict],
                   timeout_s: float = CLUSTER_TIMEOUT_S) -> None:
    """Run the check on each of `nodes` (ray.nodes() entries) at once; the first failure is the error."""
    requests = weight_requests(train, space)
    if not requests or not nodes:
        return
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0, max_retries=0)
    def check(requests: list) -> str | None:
        message = missing_here(requests)
        return on_this_node(message) if message else None

    refs = {check.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
                          ).remote(requests): node for node in nodes}
    done, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    for ref in done:
        message = ray.get(ref)
        if message:
            for other in pending:
                ray.cancel(other, force=True)
            raise HamtuneError(message)
    for ref in pending:
        node = refs[ref]
        log.warning("node %s (node id %s) did not answer the pretrained-weights check within %.0f s; its trials "
                    "check the weights themselves", node.get("NodeManagerAddress"), node["NodeID"][:12], timeout_s)
        ray.cancel(ref, force=True)
