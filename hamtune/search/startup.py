"""The search's first trials, chosen to cover the space before TPE starts modelling it.

With a handful of random start-up trials a categorical choice is easily missed: 5 random draws from 4 imbalance
strategies leave one out about one time in four ((3/4)^5), and TPE then rarely proposes a value it has never seen
scored. So the start-up is a design, not a draw: every value of every `choice` appears (stratified: as evenly as
the number of start-up trials allows, in a seeded order), and the continuous keys are spread by a scrambled Halton
sequence (quasi-random: no two points crowd together the way random draws do). The points reach the searcher as
Tune's points_to_evaluate, so they are part of its saved state and of a resume.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from hamtune.search.space import Dist


def start_up_size(spec) -> int:
    """How many start-up trials: search.startup_trials, raised to the largest choice so every value fits, never
    more than the search has trials."""
    choices = [len(d.args) for d in spec.distributions().values() if d.is_choice]
    return min(spec.search.num_samples, max([spec.search.startup_trials, *choices]))


def start_up_points(spec) -> list[dict[str, Any]]:
    """The start-up trials' searched values, one dict per trial (a function of the spec and search.seed)."""
    dists = spec.distributions()
    n = start_up_size(spec)
    if not dists or n == 0:
        return []
    rng = np.random.default_rng([spec.search.seed, 21])
    points: list[dict[str, Any]] = [{} for _ in range(n)]
    # keys in name order: the Halton dimensions and the draws follow it, and the same space written in another key
    # order (YAML tools sort keys, people do not) is the same search
    dists = dict(sorted(dists.items()))
    continuous = [key for key, d in dists.items() if not d.is_choice]
    if continuous:
        from scipy.stats import qmc

        cube = qmc.Halton(d=len(continuous), scramble=True, seed=rng).random(n)
        for j, key in enumerate(continuous):
            for i in range(n):
                points[i][key] = _place(dists[key], float(cube[i, j]))
    for key, dist in dists.items():
        if dist.is_choice:
            values = list(dist.args)
            order = rng.permutation(len(values))
            column = [values[order[i % len(values)]] for i in range(n)]
            for i, k in enumerate(rng.permutation(n)):
                points[i][key] = column[k]
    return points


def coverage_note(spec) -> str | None:
    """One line when the search has fewer trials than some choice has values (so some value is never tried)."""
    short = [(key, len(d.args)) for key, d in spec.distributions().items()
             if d.is_choice and len(d.args) > spec.search.num_samples]
    if not short:
        return None
    key, k = max(short, key=lambda item: item[1])
    return (f"search.num_samples {spec.search.num_samples} is fewer than the {k} values of space.{key}: "
            f"{k - spec.search.num_samples} of them will never be tried")


def _place(dist: Dist, u: float) -> float | int:
    """A point u in [0, 1) of the unit interval, placed on a continuous distribution as Tune's sampler would."""
    low, high = float(dist.args[0]), float(dist.args[1])
    if dist.kind == "randint":
        return int(min(int(low) + math.floor(u * (high - low)), int(high) - 1))
    if dist.kind in ("loguniform", "qloguniform"):
        value = math.exp(math.log(low) + u * (math.log(high) - math.log(low)))
    else:
        value = low + u * (high - low)
    if dist.kind in ("quniform", "qloguniform"):
        q = float(dist.args[2])
        value = min(max(round(value / q) * q, low), high)
    return float(value)
