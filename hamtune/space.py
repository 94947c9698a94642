"""Search spec: a YAML file -> validated settings + a Ray Tune search space.

Everything a user can get wrong is checked here, before Ray starts, and reported as one HamtuneError line that
names the file, the key and what was expected.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from hamtune.errors import HamtuneError

DISTRIBUTIONS = ("uniform", "loguniform", "quniform", "qloguniform", "randint", "choice")
METRICS_MAX = ("val_balanced_accuracy", "val_accuracy", "val_macro_f1", "val_macro_auc")
METRICS_MIN = ("val_loss",)


@dataclass
class DataSettings:
    source: str = "synthetic"  # "synthetic", "isic2018" (the downloaded training set) or a HAM10000 folder
    image_size: int = 32
    val: float = 0.15
    test: float = 0.15
    split_seed: int = 0
    synthetic_size: int = 3000
    synthetic_seed: int = 0
    cache_dir: str | None = None
    strict: bool = False
    split_by: str = "lesion"  # "image": only for an ISIC 2018 folder without lesion ids, asked for by name


@dataclass
class SearchSettings:
    num_samples: int = 8
    metric: str = "val_balanced_accuracy"
    mode: str = "max"
    max_concurrent: int = 2
    searcher: str = "optuna"  # optuna | random
    sampler: str = "tpe"  # tpe | random (the Optuna sampler)
    startup_trials: int = 5  # TPE samples at random until this many trials have finished (capped at num_samples)
    multivariate: bool = True  # TPE models the hyperparameters jointly (Optuna 5's default)
    constant_liar: bool = True  # TPE treats running trials as bad so concurrent suggestions differ (Optuna 5's default)
    seed: int = 0
    scheduler: str = "asha"  # asha | fifo
    grace_period: int = 1
    reduction_factor: int = 2
    max_failures: int = 1
    keep_best_checkpoints: int = 3  # trials whose best weights survive the search (the rest keep only tables)


@dataclass
class Resources:
    cpu: float = 1.0
    gpu: float = 0.0


@dataclass
class SearchSpec:
    """A whole experiment: what data, which fixed training settings, what to search and how."""

    experiment: str = "default"
    data: DataSettings = field(default_factory=DataSettings)
    train: dict[str, Any] = field(default_factory=dict)  # fixed TrainConfig values (model section folded in)
    search: SearchSettings = field(default_factory=SearchSettings)
    resources: Resources = field(default_factory=Resources)
    space: dict[str, Any] = field(default_factory=dict)  # key -> {dist: args} or a fixed value
    source_file: str = "<spec>"

    def to_dict(self) -> dict[str, Any]:
        return {
            "experiment": self.experiment,
            "data": dataclasses.asdict(self.data),
            "train": dict(self.train),
            "search": dataclasses.asdict(self.search),
            "resources": dataclasses.asdict(self.resources),
            "space": dict(self.space),
        }

    @property
    def max_epochs(self) -> int:
        from hamtune.config import TrainConfig

        return int(self.train.get("epochs", TrainConfig().epochs))

    def tune_space(self) -> dict[str, Any]:
        """The Ray Tune param_space: one tune domain per searched key, plain values for fixed ones."""
        return {key: _to_tune_domain(value) for key, value in self.space.items()}

    def searched_keys(self) -> list[str]:
        return [k for k, v in self.space.items() if isinstance(v, Mapping)]


# Model keys in the YAML are TrainConfig fields under friendlier names.
MODEL_KEYS = {"name": "model", "pretrained": "pretrained", "head_hidden": "head_hidden",
              "head_dropout": "head_dropout", "use_meta": "use_meta"}


def load_spec(path: str | Path, overrides: Mapping[str, Any] | None = None) -> SearchSpec:
    """Read and validate a search spec; `overrides` maps dotted keys (e.g. "search.num_samples") to values."""
    path = Path(path)
    if not path.is_file():
        raise HamtuneError(f"{path}: search spec not found (expected a YAML file such as search_spaces/default.yaml)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise HamtuneError(f"{path}:{where} is not valid YAML ({getattr(exc, 'problem', exc)})") from None
    return spec_from_dict(raw, source=str(path), overrides=overrides)


def spec_from_dict(raw: Any, *, source: str = "<spec>", overrides: Mapping[str, Any] | None = None) -> SearchSpec:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise HamtuneError(f"{source}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    raw = copy.deepcopy(dict(raw))  # overrides must not change the caller's mapping
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        node = raw
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value

    known = {"experiment", "data", "model", "train", "search", "resources", "space"}
    _reject_unknown(raw, known, source, "")
    spec = SearchSpec(source_file=source)
    spec.experiment = _experiment_name(raw.get("experiment", "default"), source)
    spec.data = _dataclass_from(DataSettings, raw.get("data"), source, "data")
    spec.search = _dataclass_from(SearchSettings, raw.get("search"), source, "search")
    spec.resources = _dataclass_from(Resources, raw.get("resources"), source, "resources")

    train: dict[str, Any] = {}
    model = raw.get("model") or {}
    _require_mapping(model, source, "model")
    _reject_unknown(model, set(MODEL_KEYS), source, "model.")
    for key, value in model.items():
        train[MODEL_KEYS[key]] = value
    fixed = raw.get("train") or {}
    _require_mapping(fixed, source, "train")
    train.update(fixed)
    spec.train = train

    space = raw.get("space") or {}
    _require_mapping(space, source, "space")
    spec.space = dict(space)
    _validate(spec, source)
    return spec


def _validate(spec: SearchSpec, source: str) -> None:
    from hamtune.config import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for key in spec.train:
        if key not in fields:
            raise HamtuneError(f"{source}: unknown training setting 'train.{key}' (expected one of: {', '.join(sorted(fields))})")
    for key, value in spec.space.items():
        if key not in fields:
            raise HamtuneError(f"{source}: unknown hyperparameter 'space.{key}' (expected a training setting: {', '.join(sorted(fields))})")
        if key == "epochs":
            raise HamtuneError(f"{source}: 'space.epochs' cannot be searched: ASHA decides how long trials run; set train.epochs")
        if isinstance(value, Mapping):
            _validate_distribution(key, value, source)
    # Every corner of the space must make a valid TrainConfig: check the bounds and every choice.
    for key, value in spec.space.items():
        for candidate in _corners(value):
            try:
                TrainConfig.from_dict({**spec.train, key: candidate})
            except HamtuneError as exc:
                raise HamtuneError(f"{source}: space.{key} allows {candidate!r}, which is invalid: {exc}") from None
    try:
        TrainConfig.from_dict(spec.train)
    except HamtuneError as exc:
        raise HamtuneError(f"{source}: {exc}") from None

    d, s, r = spec.data, spec.search, spec.resources
    _check(isinstance(d.image_size, int) and 8 <= d.image_size <= 1024, source, "data.image_size", d.image_size, "an integer in [8, 1024]")
    _check(0 < d.val < 1 and 0 < d.test < 1 and d.val + d.test < 1, source, "data.val/data.test", (d.val, d.test), "fractions in (0, 1) with val + test < 1")
    _check(isinstance(d.synthetic_size, int) and d.synthetic_size >= 100, source, "data.synthetic_size", d.synthetic_size, "an integer >= 100")
    _check(d.split_by in ("lesion", "image"), source, "data.split_by", d.split_by, "'lesion' or 'image'")
    if d.source not in ("synthetic", "isic2018"):
        d.source = str(Path(d.source).expanduser().resolve())  # relative paths are relative to where hamtune runs
    _check(isinstance(s.num_samples, int) and s.num_samples >= 1, source, "search.num_samples", s.num_samples, "an integer >= 1")
    _check(isinstance(s.max_concurrent, int) and s.max_concurrent >= 1, source, "search.max_concurrent", s.max_concurrent, "an integer >= 1")
    _check(s.mode in ("max", "min"), source, "search.mode", s.mode, "'max' or 'min'")
    metrics = METRICS_MAX + METRICS_MIN + tuple(f"val_recall_{c}" for c in ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"))
    _check(s.metric in metrics, source, "search.metric", s.metric, f"one of {', '.join(metrics)}")
    _check(s.searcher in ("optuna", "random"), source, "search.searcher", s.searcher, "'optuna' or 'random'")
    _check(s.sampler in ("tpe", "random"), source, "search.sampler", s.sampler, "'tpe' or 'random'")
    _check(isinstance(s.startup_trials, int) and s.startup_trials >= 0, source, "search.startup_trials",
           s.startup_trials, "an integer >= 0")
    _check(s.scheduler in ("asha", "fifo"), source, "search.scheduler", s.scheduler, "'asha' or 'fifo'")
    _check(isinstance(s.grace_period, int) and 1 <= s.grace_period <= spec.max_epochs, source, "search.grace_period", s.grace_period, f"an integer in [1, train.epochs={spec.max_epochs}]")
    _check(isinstance(s.reduction_factor, int) and s.reduction_factor >= 2, source, "search.reduction_factor", s.reduction_factor, "an integer >= 2")
    _check(isinstance(s.max_failures, int) and s.max_failures >= 0, source, "search.max_failures", s.max_failures, "an integer >= 0")
    _check(isinstance(s.keep_best_checkpoints, int) and not isinstance(s.keep_best_checkpoints, bool)
           and s.keep_best_checkpoints >= 1, source, "search.keep_best_checkpoints", s.keep_best_checkpoints,
           "an integer >= 1 (the best trial's weights are always kept)")
    _check(_is_number(r.cpu) and r.cpu > 0, source, "resources.cpu", r.cpu, "a number > 0")
    _check(_is_number(r.gpu) and r.gpu >= 0 and (r.gpu <= 1 or float(r.gpu).is_integer()), source, "resources.gpu", r.gpu, "0, a fraction in (0, 1], or a whole number")


def _validate_distribution(key: str, value: Mapping, source: str) -> None:
    where = f"space.{key}"
    if len(value) != 1:
        raise HamtuneError(f"{source}: {where} must name exactly one distribution ({', '.join(DISTRIBUTIONS)}), got {dict(value)}")
    (dist, args), = value.items()
    if dist not in DISTRIBUTIONS:
        raise HamtuneError(f"{source}: {where} uses unknown distribution '{dist}' (expected one of: {', '.join(DISTRIBUTIONS)})")
    if dist == "choice":
        if not isinstance(args, list) or not args:
            raise HamtuneError(f"{source}: {where}.choice must be a non-empty list of values, got {args!r}")
        return
    need = 3 if dist in ("quniform", "qloguniform") else 2
    if not isinstance(args, list) or len(args) != need or not all(_is_number(a) for a in args):
        form = "[low, high, q]" if need == 3 else "[low, high]"
        raise HamtuneError(f"{source}: {where}.{dist} must be a list of numbers {form}, got {args!r}")
    low, high = args[0], args[1]
    if not low < high:
        raise HamtuneError(f"{source}: {where}.{dist} has low {low} >= high {high} (expected low < high)")
    if dist in ("loguniform", "qloguniform") and low <= 0:
        raise HamtuneError(f"{source}: {where}.{dist} needs positive bounds on a log scale, got low {low}")
    if dist == "randint" and not (isinstance(low, int) and isinstance(high, int)):
        raise HamtuneError(f"{source}: {where}.randint needs integer bounds, got {args!r}")
    if need == 3 and not args[2] > 0:
        raise HamtuneError(f"{source}: {where}.{dist} needs a positive step q, got {args[2]}")


def _corners(value: Any) -> list[Any]:
    if not isinstance(value, Mapping):
        return [value]
    (dist, args), = value.items()
    if dist == "choice":
        return list(args)
    if dist == "randint":
        return [args[0], args[1] - 1]
    return [args[0], args[1]]


def _to_tune_domain(value: Any) -> Any:
    from ray import tune

    if not isinstance(value, Mapping):
        return value
    (dist, args), = value.items()
    return {
        "uniform": lambda: tune.uniform(*args),
        "loguniform": lambda: tune.loguniform(*args),
        "quniform": lambda: tune.quniform(*args),
        "qloguniform": lambda: tune.qloguniform(*args),
        "randint": lambda: tune.randint(*args),
        "choice": lambda: tune.choice(list(args)),
    }[dist]()


def _experiment_name(name: Any, source: str) -> str:
    import re

    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", name):
        raise HamtuneError(f"{source}: experiment name {name!r} must be letters, digits, '_', '-' or '.' (it names a folder under results/)")
    return name


def _dataclass_from(cls, raw: Any, source: str, section: str):
    raw = raw or {}
    _require_mapping(raw, source, section)
    names = {f.name: f for f in dataclasses.fields(cls)}
    _reject_unknown(raw, set(names), source, f"{section}.")
    obj = cls()
    for key, value in raw.items():
        default = getattr(obj, key)
        expected = type(default) if default is not None else str
        if default is None and value is None:  # optional settings (cache_dir) may stay unset
            continue
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, expected) or (expected is not bool and isinstance(value, bool)):
            raise HamtuneError(f"{source}: {section}.{key} = {value!r} has the wrong type (expected {expected.__name__})")
        setattr(obj, key, value)
    return obj


def _require_mapping(value: Any, source: str, section: str) -> None:
    if not isinstance(value, Mapping):
        raise HamtuneError(f"{source}: section '{section}' must be a mapping of keys to values, got {type(value).__name__}")


def _reject_unknown(raw: Mapping, known: set[str], source: str, prefix: str) -> None:
    for key in raw:
        if key not in known:
            raise HamtuneError(f"{source}: unknown key '{prefix}{key}' (expected one of: {', '.join(sorted(known))})")


def _check(ok: bool, source: str, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise HamtuneError(f"{source}: {key} = {value!r} is invalid (expected {expected})")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
