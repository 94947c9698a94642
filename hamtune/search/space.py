"""A search space's `{distribution: args}` form, parsed and checked in this one place.

A spec's `space` maps training settings to either a fixed value or one distribution, e.g. `lr: {loguniform: [1e-4,
1e-2]}`. Everything that reads that form goes through Dist: the spec's checks (every corner of the space must make a
valid config), Ray Tune's param_space, Optuna's distributions (importance, warm start, start-up coverage), and the
values a trial may get (which weights files a search needs, whether any trial uses metadata).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from hamtune.errors import HamtuneError
from hamtune.io import plain

DISTRIBUTIONS = ("uniform", "loguniform", "quniform", "qloguniform", "randint", "choice")


@dataclass(frozen=True)
class Dist:
    """One searched setting's distribution."""

    kind: str  # one of DISTRIBUTIONS
    args: tuple

    @property
    def is_choice(self) -> bool:
        return self.kind == "choice"

    def corners(self) -> list[Any]:
        """The extreme values a trial can get: every choice, or both bounds (randint's high is exclusive)."""
        if self.is_choice:
            return list(self.args)
        if self.kind == "randint":
            return [self.args[0], self.args[1] - 1]
        return [self.args[0], self.args[1]]

    def to_tune(self):
        from ray import tune

        make = {"uniform": tune.uniform, "loguniform": tune.loguniform, "quniform": tune.quniform,
                "qloguniform": tune.qloguniform, "randint": tune.randint}
        return tune.choice(list(self.args)) if self.is_choice else make[self.kind](*self.args)

    def to_optuna(self):
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.is_choice:
            return CategoricalDistribution(list(self.args))
        if self.kind == "randint":
            return IntDistribution(int(self.args[0]), int(self.args[1]) - 1)
        return FloatDistribution(float(self.args[0]), float(self.args[1]),
                                 log=self.kind in ("loguniform", "qloguniform"))

    def contains(self, key: str, value: Any, where: str) -> Any:
        """The value as this distribution holds it, or one HamtuneError line naming the key."""
        v = plain(value)
        if self.is_choice:
            if v not in list(self.args):
                raise HamtuneError(f"{where}: {key}={v!r} is outside the new space (expected one of {list(self.args)})")
            return v
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        low, high = self.args[0], self.args[1]
        if self.kind == "randint":
            ok = ok and float(v).is_integer() and low <= v < high
            expected = f"an integer in [{low}, {high})"
        else:
            ok = ok and low <= v <= high
            expected = f"a number in [{low}, {high}]"
        if not ok:
            raise HamtuneError(f"{where}: {key}={v!r} is outside the new space (expected {expected})")
        return int(v) if self.kind == "randint" else float(v)


def parse(key: str, value: Any, source: str) -> Dist | None:
    """The Dist of a space entry (checked: one line naming `space.key` when malformed), None for a fixed value."""
    if not isinstance(value, Mapping):
        return None
    where = f"space.{key}"
    if len(value) != 1:
        raise HamtuneError(f"{source}: {where} must name exactly one distribution ({', '.join(DISTRIBUTIONS)}), "
                           f"got {dict(value)}")
    (kind, args), = value.items()
    if kind not in DISTRIBUTIONS:
        raise HamtuneError(f"{source}: {where} uses unknown distribution '{kind}' (expected one of: "
                           f"{', '.join(DISTRIBUTIONS)})")
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise HamtuneError(f"{source}: {where}.choice must be a non-empty list of values, got {args!r}")
        return Dist(kind, tuple(args))
    need = 3 if kind in ("quniform", "qloguniform") else 2
    if not isinstance(args, list) or len(args) != need or not all(_is_number(a) for a in args):
        form = "[low, high, q]" if need == 3 else "[low, high]"
        raise HamtuneError(f"{source}: {where}.{kind} must be a list of numbers {form}, got {args!r}")
    low, high = args[0], args[1]
    if not low < high:
        raise HamtuneError(f"{source}: {where}.{kind} has low {low} >= high {high} (expected low < high)")
    if kind in ("loguniform", "qloguniform") and low <= 0:
        raise HamtuneError(f"{source}: {where}.{kind} needs positive bounds on a log scale, got low {low}")
    if kind == "randint" and not (isinstance(low, int) and isinstance(high, int)):
        raise HamtuneError(f"{source}: {where}.randint needs integer bounds, got {args!r}")
    if need == 3 and not args[2] > 0:
        raise HamtuneError(f"{source}: {where}.{kind} needs a positive step q, got {args[2]}")
    return Dist(kind, tuple(args))


def searched(space: Mapping[str, Any], source: str = "<spec>") -> dict[str, Dist]:
    """The searched keys of a space and their distributions, in the space's order (fixed values left out)."""
    return {key: dist for key, value in space.items() if (dist := parse(key, value, source)) is not None}


def possible_values(key: str, space: Mapping[str, Any], fixed: Mapping[str, Any], default: Any) -> list[Any] | None:
    """Every value `key` can take in a trial: the space's choices or fixed value, else the fixed train setting, else
    `default`; None when a continuous distribution searches it."""
    if key in space:
        dist = parse(key, space[key], "<spec>")
        if dist is None:
            return [space[key]]
        return list(dist.args) if dist.is_choice else None
    return [fixed.get(key, default)]


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
