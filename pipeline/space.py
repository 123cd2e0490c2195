"""Search spaces: which trial-config fields vary and how, read from `search_spaces/*.yaml`.

A space is a fixed part (`trial:`, any subset of a trial config) plus dimensions (`search:`,
dotted trial-config keys mapped to distributions) and an optional parameter budget. It is
sampled define-by-run (`suggest`), so the choices that depend on the backbone and on
earlier choices are resolved per trial and no invalid configuration reaches a worker:

- `adapter.factor` keeps only the factors that divide every target layer of the backbone;
- `adapter.rank` keeps only ranks below `d/f` for the factor this trial drew (its Optuna
  parameter is named per factor, `adapter.rank|factor=8`, since Optuna's categorical
  distributions must not change between trials);
- a configuration outside the budget is refused from the closed-form count, before training.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

import karst
from karst.model import common_factors
from pipeline.backbones import create_model_skeleton
from pipeline.config import (
    ConfigError,
    TrialConfig,
    apply_value,
    read_yaml_mapping,
    validate_trial_config,
)

FACTOR, RANK = "adapter.factor", "adapter.rank"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CategoricalDim(_Section):
    type: Literal["categorical"]
    choices: list[Any] = Field(min_length=1)


class RangeDim(_Section):
    """`int` or `float` between `low` and `high` inclusive, optionally on a log scale."""

    type: Literal["int", "float"]
    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _range(self) -> RangeDim:
        if self.low > self.high:
            raise ValueError(f"empty range: low={self.low} > high={self.high}; swap them")
        if self.log and self.low <= 0:
            raise ValueError(f"log=true needs low > 0, got low={self.low}")
        if self.type == "int" and not (self.low.is_integer() and self.high.is_integer()):
            raise ValueError(f"type int needs whole low and high, got {self.low}, {self.high}")
        return self

    def values(self) -> list[int]:
        """Every value of an int range (for counting); float ranges are continuous."""
        return list(range(int(self.low), int(self.high) + 1))


Dimension = Annotated[CategoricalDim | RangeDim, Field(discriminator="type")]


class Budget(_Section):
    min_params: int | None = Field(None, ge=0)
    max_params: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _order(self) -> Budget:
        if None not in (self.min_params, self.max_params) and self.min_params > self.max_params:
            raise ValueError(f"min_params={self.min_params} > max_params={self.max_params}")
        return self

    def admits(self, params: int) -> bool:
        return ((self.min_params is None or params >= self.min_params)
                and (self.max_params is None or params <= self.max_params))


class EarlyStopping(_Section):
    """The `early_stopping:` section of a search space."""

    mode: Literal["pareto", "asha", "none"] = "pareto"
    grace_epochs: int = Field(1, ge=1)
    reduction_factor: int = Field(3, ge=2)
    epsilon: float = Field(0.0, ge=0.0, le=1.0)

    def rungs(self, epochs: int) -> list[int]:
        """Epochs where trials are compared: grace, grace·η, ... below the full budget."""
        rungs, rung = [], self.grace_epochs
        while rung < epochs:
            rungs.append(rung)
            rung *= self.reduction_factor
        return rungs


class Resources(_Section):
    """What one trial asks of a node; fractional GPUs pack several trials on one GPU."""

    cpu: float = Field(1.0, ge=0)
    gpu: float = Field(0.0, ge=0)


class SearchSpace(_Section):
    """A `search_spaces/*.yaml` file; every key is checked, unknown ones are errors."""

    trial: dict[str, Any] = Field(default_factory=dict)
    search: dict[str, Dimension] = Field(default_factory=dict)
    budget: Budget = Budget()
    resources: Resources = Resources()
    max_concurrent: int = Field(2, ge=1)
    early_stopping: EarlyStopping = EarlyStopping()


class OutOfBudget(ValueError):
    """A sampled configuration whose adapter count is outside the space's budget."""


def load_space(path: str | Path) -> SearchSpace:
    """Read and validate a space file: the YAML, every dimension, and the fixed trial part."""
    data = read_yaml_mapping(path, "search space")
    try:
        space = SearchSpace.model_validate(data)
    except ValidationError as err:
        problems = "\n".join(f"  {'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                             for e in err.errors())
        raise ConfigError(f"{path} is not a valid search space:\n{problems}") from None
    _check_keys(space, str(path))
    return space


def _check_keys(space: SearchSpace, source: str) -> None:
    """Each dimension must name a trial-config field: try its first value on the fixed part."""
    validate_trial_config(space.trial, source=f"{source} (trial:)")
    for key, dim in space.search.items():
        try:
            data = compose(space.trial, {key: _first_value(dim)})
        except ConfigError as err:
            raise ConfigError(f"{source}: search.{key}: {err}") from None
        validate_trial_config(data, source=f"{source} (search.{key})")


def compose(trial: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A copy of the fixed `trial:` part with the dotted-key `values` set in it."""
    data = copy.deepcopy(trial)
    for key, value in values.items():
        apply_value(data, key, value)
    return data


def _first_value(dim: CategoricalDim | RangeDim) -> Any:
    if isinstance(dim, CategoricalDim):
        return dim.choices[0]
    return int(dim.low) if dim.type == "int" else dim.low


class SpaceSampler:
    """Turns Optuna trials into valid `TrialConfig`s for one space and its backbone."""

    def __init__(self, space: SearchSpace) -> None:
        self.space = space
        self.base = validate_trial_config(space.trial)
        self.skeleton = create_model_skeleton(self.base.backbone)
        self.factors = self._valid_factors()

    def _valid_factors(self) -> list[Any]:
        dim = self.space.search.get(FACTOR)
        if not isinstance(dim, CategoricalDim):
            return []
        valid = [f for f in dim.choices if self._fits(factor=_as_factor(f), rank=1)]
        if not valid:
            raise ConfigError(f"search.{FACTOR}: none of {dim.choices} divides every target "
                              f"layer of {self.base.backbone.name}; {self._factor_hint()}")
        return valid

    def _fits(self, **fields: Any) -> bool:
        adapter = self.base.adapter.to_dict()
        try:
            karst.param_count(self.skeleton, karst.config_from_dict({**adapter, **fields}))
        except (ValueError, TypeError):
            return False
        return True

    def _factor_hint(self) -> str:
        probe = karst.KarstConfig(factor=1, rank=1, targets=self.base.adapter.targets)
        outs, ins, common = common_factors(karst.find_targets(self.skeleton, probe))
        return (f"Factors valid for every target: f_out in {outs}, f_in in {ins}; "
                f"as one int: {common}.")

    def ranks_for(self, factor: Any, ranks: list[Any]) -> list[Any]:
        return [r for r in ranks if self._fits(factor=_as_factor(factor), rank=r)]

    def suggest(self, trial: Any) -> TrialConfig:
        """Define-by-run: sample every dimension, then build and budget-check the config."""
        values = {}
        for key in _ordered(self.space.search):
            values[key] = self._suggest_one(trial, key, values)
        config = self.build(values)
        params = self.params(config)
        trial.set_user_attr("params", params)
        if not self.space.budget.admits(params):
            raise OutOfBudget(f"{params:,} adapter params is outside the budget "
                              f"{self.space.budget.model_dump(exclude_none=True)}")
        return config

    def _suggest_one(self, trial: Any, key: str, values: dict[str, Any]) -> Any:
        dim = self.space.search[key]
        if isinstance(dim, RangeDim) and dim.type == "int":
            return trial.suggest_int(key, int(dim.low), int(dim.high), log=dim.log)
        if isinstance(dim, RangeDim):
            return trial.suggest_float(key, dim.low, dim.high, log=dim.log)
        choices, name = dim.choices, key
        if key == FACTOR:
            choices = self.factors
        elif key == RANK and FACTOR in values:
            factor = values[FACTOR]
            choices, name = self.ranks_for(factor, choices), f"{RANK}|factor={_label(factor)}"
        encoded = [_encode(c) for c in choices]
        return choices[encoded.index(trial.suggest_categorical(name, encoded))]

    def build(self, values: dict[str, Any]) -> TrialConfig:
        return validate_trial_config(compose(self.space.trial, values))

    def params(self, config: TrialConfig) -> int:
        return karst.param_count(self.skeleton, config.adapter)

    def count_or_none(self, values: dict[str, Any]) -> int | None:
        """The adapter count of the configuration `values` make; None when it is invalid."""
        try:
            return self.params(self.build(values))
        except (ValueError, TypeError):
            return None

    def sample(self, seed: int = 0, attempts: int = 200) -> TrialConfig:
        """One configuration drawn at random, for a look at what trials will run."""
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
        for _ in range(attempts):
            trial = study.ask()
            try:
                return self.suggest(trial)
            except OutOfBudget:
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        raise ConfigError(f"no configuration inside the budget in {attempts} random draws")


def _ordered(search: dict[str, Any]) -> list[str]:
    """Dimensions in file order, except that the factor comes before the rank it bounds."""
    keys = list(search)
    if FACTOR in keys and RANK in keys and keys.index(RANK) < keys.index(FACTOR):
        keys.remove(FACTOR)
        keys.insert(keys.index(RANK), FACTOR)
    return keys


def _as_factor(value: Any) -> int | tuple[int, int]:
    return tuple(value) if isinstance(value, list) else value


def _label(value: Any) -> str:
    return "x".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _encode(choice: Any) -> Any:
    """Optuna's categorical choices must be None, bool, int, float or str."""
    return json.dumps(choice) if isinstance(choice, (list, tuple, dict)) else choice


@dataclass(frozen=True)
class DryRun:
    """What `karst search SPACE --dry-run` prints."""

    valid: int  # discrete configurations that are valid and inside the budget
    combinations: int  # discrete combinations before any filtering
    continuous: list[str]  # dimensions with a continuous range (not counted)
    params_min: int
    params_max: int
    sample: TrialConfig


def dry_run(sampler: SpaceSampler, seed: int = 0) -> DryRun:
    """Enumerate the discrete part of the space; raise `ConfigError` when nothing is left."""
    search = sampler.space.search
    discrete = {k: d.choices if isinstance(d, CategoricalDim) else d.values()
                for k, d in search.items() if d.type != "float"}
    continuous = [k for k, d in search.items() if d.type == "float"]
    keys = list(discrete)
    counts, valid_any = [], 0
    for combo in itertools.product(*discrete.values()):
        params = sampler.count_or_none(dict(zip(keys, combo, strict=True)))
        if params is not None:
            valid_any += 1
            if sampler.space.budget.admits(params):
                counts.append(params)
    if not valid_any:
        raise ConfigError("the search space has no valid configuration: every combination "
                          "of its discrete dimensions is refused by the backbone's shapes")
    if not counts:
        raise ConfigError(f"no configuration meets the budget "
                          f"{sampler.space.budget.model_dump(exclude_none=True)}: "
                          f"{valid_any} valid ones, none inside it")
    total = math.prod(len(v) for v in discrete.values())
    return DryRun(len(counts), total, continuous, min(counts), max(counts),
                  sampler.sample(seed))
