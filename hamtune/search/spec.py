"""Search spec: a YAML file -> validated settings + a Ray Tune search space.

Everything a user can get wrong is checked here, before Ray starts, and reported as one HamtuneError line that
names the file, the key and what was expected. The sections are pydantic models (types, unknown keys, ranges);
the space's `{distribution: args}` form is hamtune.search.space's.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hamtune.errors import HamtuneError
from hamtune.search import space as space_form
from hamtune.training.config import Bool, Float, Int, Str, TrainConfig, expect
from hamtune.vocab import CLASSES

METRICS_MAX = ("val_balanced_accuracy", "val_accuracy", "val_macro_f1", "val_macro_auc",
               *(f"val_recall_{c}" for c in CLASSES))
METRICS_MIN = ("val_loss",)
METRICS = METRICS_MAX + METRICS_MIN


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataSettings(_Section):
    source: Str = "synthetic"  # "synthetic", "isic2018" (the downloaded training set) or a HAM10000 folder
    image_size: Int = expect("an integer in [8, 1024]", default=32, ge=8, le=1024)
    val: Float = 0.15
    test: Float = 0.15
    split_seed: Int = expect("an integer >= 0", default=0, ge=0)
    synthetic_size: Int = expect("an integer >= 100", default=3000, ge=100)
    synthetic_seed: Int = expect("an integer >= 0", default=0, ge=0)
    cache_dir: Str | None = None
    strict: Bool = False
    split_by: Str = expect("'lesion' or 'image'", default="lesion", pattern="^(lesion|image)$")


class SearchSettings(_Section):
    num_samples: Int = expect("an integer >= 1", default=8, ge=1)
    metric: Str = expect(f"one of {', '.join(METRICS)}", default="val_balanced_accuracy",
                         pattern=f"^({'|'.join(METRICS)})$")
    mode: Str = expect("'max' or 'min'", default="max", pattern="^(max|min)$")
    max_concurrent: Int = expect("an integer >= 1", default=2, ge=1)
    searcher: Str = expect("'optuna' or 'random'", default="optuna", pattern="^(optuna|random)$")
    sampler: Str = expect("'tpe' or 'random'", default="tpe", pattern="^(tpe|random)$")  # the Optuna sampler
    # TPE samples at random until this many trials have finished (capped at num_samples)
    startup_trials: Int = expect("an integer >= 0", default=5, ge=0)
    # the first trials cover every value of every `choice` (stratified) and spread the continuous keys (Sobol)
    cover_choices: Bool = True
    multivariate: Bool = True  # TPE models the hyperparameters jointly (Optuna 5's default)
    constant_liar: Bool = True  # TPE treats running trials as bad so concurrent suggestions differ (Optuna 5's default)
    seed: Int = 0
    scheduler: Str = expect("'asha' or 'fifo'", default="asha", pattern="^(asha|fifo)$")
    grace_period: Int = 1
    reduction_factor: Int = expect("an integer >= 2", default=2, ge=2)
    max_failures: Int = expect("an integer >= 0", default=1, ge=0)
    # suggestions in waves and ASHA decisions in trial order: the same spec and seed give the same search
    deterministic: Bool = True
    mlflow: Str | None = None  # an MLflow tracking URI (file:/path or http://server): one MLflow run per trial
    # trials whose best weights survive the search (the rest keep only tables)
    keep_best_checkpoints: Int = expect("an integer >= 1 (the best trial's weights are always kept)", default=3, ge=1)


class Resources(_Section):
    cpu: Float = expect("a number > 0", default=1.0, gt=0)
    gpu: Float = expect("0, a fraction in (0, 1], or a whole number", default=0.0, ge=0)


# Model keys in the YAML are TrainConfig fields under friendlier names.
MODEL_KEYS = {"name": "model", "pretrained": "pretrained", "head_hidden": "head_hidden",
              "head_dropout": "head_dropout", "use_meta": "use_meta"}
SECTIONS = {"data": DataSettings, "search": SearchSettings, "resources": Resources}


class SearchSpec(BaseModel):
    """A whole experiment: what data, which fixed training settings, what to search and how."""

    model_config = ConfigDict(validate_assignment=False)

    experiment: str = "default"
    data: DataSettings = Field(default_factory=DataSettings)
    train: dict[str, Any] = Field(default_factory=dict)  # fixed TrainConfig values (model section folded in)
    search: SearchSettings = Field(default_factory=SearchSettings)
    resources: Resources = Field(default_factory=Resources)
    space: dict[str, Any] = Field(default_factory=dict)  # key -> {dist: args} or a fixed value
    source_file: str = "<spec>"

    def to_dict(self) -> dict[str, Any]:
        return {"experiment": self.experiment, "data": self.data.model_dump(), "train": dict(self.train),
                "search": self.search.model_dump(), "resources": self.resources.model_dump(),
                "space": dict(self.space)}

    @property
    def max_epochs(self) -> int:
        return int(self.train.get("epochs", TrainConfig.default("epochs")))

    def distributions(self) -> dict[str, space_form.Dist]:
        return space_form.searched(self.space, self.source_file)

    def tune_space(self) -> dict[str, Any]:
        """The Ray Tune param_space: one tune domain per searched key, plain values for fixed ones, in key-name
        order: the samplers draw in this order, and the same space written in another order is the same search."""
        dists = self.distributions()
        return {key: dists[key].to_tune() if key in dists else value for key, value in sorted(self.space.items())}

    def searched_keys(self) -> list[str]:
        return list(self.distributions())

    def possible_values(self, key: str) -> list[Any] | None:
        """Every value `key` can take in a trial (None: a continuous distribution searches it)."""
        return space_form.possible_values(key, self.space, self.train, TrainConfig.default(key))


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

    _reject_unknown(raw, {"experiment", "data", "model", "train", "search", "resources", "space"}, source, "")
    sections = {name: _section(cls, raw.get(name), source, name) for name, cls in SECTIONS.items()}

    train: dict[str, Any] = {}
    written_as: dict[str, str] = {}  # training setting -> the key the user wrote it under, for messages
    model = raw.get("model") or {}
    _require_mapping(model, source, "model")
    _reject_unknown(model, set(MODEL_KEYS), source, "model.")
    for key, value in model.items():
        train[MODEL_KEYS[key]] = value
        written_as[MODEL_KEYS[key]] = f"model.{key}"
    fixed = raw.get("train") or {}
    _require_mapping(fixed, source, "train")
    train.update(fixed)
    written_as.update({key: f"train.{key}" for key in fixed})

    space = raw.get("space") or {}
    _require_mapping(space, source, "space")
    spec = SearchSpec(experiment=_experiment_name(raw.get("experiment", "default"), source), train=train,
                      space=dict(space), source_file=source, **sections)
    _validate(spec, source, written_as)
    return spec


def _validate(spec: SearchSpec, source: str, written_as: Mapping[str, str]) -> None:
    fields = sorted(TrainConfig.model_fields)
    for key in spec.train:
        if key not in TrainConfig.model_fields:
            raise HamtuneError(f"{source}: unknown training setting 'train.{key}' (expected one of: {', '.join(fields)})")
    for key in spec.space:
        if key not in TrainConfig.model_fields:
            raise HamtuneError(f"{source}: unknown hyperparameter 'space.{key}' (expected a training setting: "
                               f"{', '.join(fields)})")
        if key == "epochs":
            raise HamtuneError(f"{source}: 'space.epochs' cannot be searched: ASHA decides how long trials run; "
                               "set train.epochs")
    dists = spec.distributions()
    # The fixed settings first, so that a wrong one is blamed on its own key and not on a corner of the space.
    fixed = {**spec.train, **{k: v for k, v in spec.space.items() if k not in dists}}
    try:
        TrainConfig.from_dict(fixed)
    except HamtuneError as exc:
        match = re.match(r"train config: (\w+)=", str(exc))
        key = match.group(1) if match else ""
        where = f"space.{key}" if key in spec.space else written_as.get(key, f"train.{key}")
        raise HamtuneError(f"{source}: {where}: {exc}") from None
    # Every corner of the space must make a valid TrainConfig: check the bounds and every choice.
    for key, dist in dists.items():
        for candidate in dist.corners():
            try:
                TrainConfig.from_dict({**fixed, key: candidate})
            except HamtuneError as exc:
                raise HamtuneError(f"{source}: space.{key} allows {candidate!r}, which is invalid: {exc}") from None

    d, s, r = spec.data, spec.search, spec.resources
    _check(0 < d.val < 1 and 0 < d.test < 1 and d.val + d.test < 1, source, "data.val/data.test", (d.val, d.test),
           "fractions in (0, 1) with val + test < 1")
    if d.source not in ("synthetic", "isic2018"):
        d.source = str(Path(d.source).expanduser().resolve())  # relative paths are relative to where hamtune runs
    _check(1 <= s.grace_period <= spec.max_epochs, source, "search.grace_period", s.grace_period,
           f"an integer in [1, train.epochs={spec.max_epochs}]")
    _check(r.gpu <= 1 or float(r.gpu).is_integer(), source, "resources.gpu", r.gpu,
           "0, a fraction in (0, 1], or a whole number")


def _experiment_name(name: Any, source: str) -> str:
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", name):
        raise HamtuneError(f"{source}: experiment name {name!r} must be letters, digits, '_', '-' or '.' (it names a "
                           "folder under results/)")
    return name


def _section(cls: type[_Section], raw: Any, source: str, section: str) -> _Section:
    raw = raw or {}
    _require_mapping(raw, source, section)
    _reject_unknown(raw, set(cls.model_fields), source, f"{section}.")
    try:
        return cls(**{k: v for k, v in raw.items() if not (v is None and cls.model_fields[k].default is None)})
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        key = str(error["loc"][0])
        value = raw.get(key)
        field = cls.model_fields[key]
        if error["type"].endswith("_type") or error["type"] in ("int_from_float", "finite_number"):
            annotation = field.annotation
            expected = getattr(annotation, "__name__", str(annotation).replace("typing.", ""))
            raise HamtuneError(f"{source}: {section}.{key} = {value!r} has the wrong type (expected {expected})") from None
        expected = (field.json_schema_extra or {}).get("expected", error["msg"])
        raise HamtuneError(f"{source}: {section}.{key} = {value!r} is invalid (expected {expected})") from None


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
