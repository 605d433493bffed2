"""The sweep file: a base config, the keys to vary and how, the metric to rank by, and the budget.

Validated like a run's config (unknown keys refused, with the key named); every trial's config is
also validated before the first trial starts, so a bad value fails in seconds, not after hours.
"""

from __future__ import annotations

import copy
import difflib
import itertools
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tuneforge.config import Config, set_dotted, config_from_dict, read_yaml
from tuneforge.errors import ConfigError

Scalar = Union[bool, int, float, str, None]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ObjectiveSpec(_Strict):
    metric: str = Field("val_loss", description="a number the run writes: eval_after (val_loss, exact_match, ...) "
                                                "or final_metrics; val_* metrics are also seen at each eval_every "
                                                "step, which is what pruning reads")
    mode: Literal["min", "max"] = Field("min", description="min for losses, max for accuracies")


class RangeSpec(_Strict):
    """A range to search (random, tpe): {low, high, log, type, step}."""

    low: float
    high: float
    log: bool = Field(False, description="sample the logarithm uniformly (learning rates, LoRA ranks)")
    type: Literal["float", "int"] = "float"
    step: float | None = Field(None, gt=0, description="only multiples of this above low (not with log)")

    @model_validator(mode="after")
    def _ordered(self) -> "RangeSpec":
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("log: true needs low > 0")
        if self.log and self.step is not None:
            raise ValueError("step and log: true cannot be combined")
        if self.type == "int" and not (float(self.low).is_integer() and float(self.high).is_integer()):
            raise ValueError("type: int needs whole-number low and high")
        return self


class PruneSpec(_Strict):
    kind: Literal["median", "none"] = Field(
        "median", description="median: stop a trial whose intermediate metric is worse than the median of earlier "
                              "trials at the same step (Optuna's MedianPruner); none: every trial runs to its end")
    startup_trials: int = Field(2, ge=0, description="trials that always run to the end, to give the median")
    warmup_steps: int = Field(0, ge=0, description="steps of each trial before it can be pruned")


class BudgetSpec(_Strict):
    minutes: float | None = Field(None, gt=0, description="no new trial starts after this much wall time "
                                                          "(summed over every invocation of the sweep)")
    cost: float | None = Field(None, gt=0, description="no new trial starts once plan's estimated cost of the trials "
                                                       "run, plus one more, would pass this (currency of the price table)")
    gpu: str | None = Field(None, description="the price-table row the cost is estimated on (any part of its name); "
                                              "default: plan's cheapest GPU that fits")
    prices: str | None = Field(None, description="a YAML of hourly prices laid over the shipped table (as plan --prices)")


class SweepSpec(_Strict):
    base: str = Field(description="the tuneforge config every trial starts from (relative to the sweep file)")
    output_dir: str = Field(description="trials go in <output_dir>/trial-NNN; the study, table, plot and best.yaml "
                                        "beside them (relative to the sweep file)")
    objective: ObjectiveSpec = ObjectiveSpec()
    search: Literal["grid", "random", "tpe"] = Field("tpe", description="grid: every combination of the lists; "
                                                     "random or tpe (Optuna's TPESampler): `trials` draws")
    trials: int | None = Field(None, ge=1, description="how many trials random and tpe run (grid: at most this many)")
    set: dict[str, Any] = Field(default_factory=dict, description="dotted config keys set the same in every trial "
                                                                  "(e.g. max_steps, eval_every for a shorter search)")
    parameters: dict[str, Union[list[Scalar], RangeSpec]] = Field(
        min_length=1, description="dotted config keys (learning_rate, lora.r, lora.alpha, ...): a list of values, "
                                  "or a range {low, high, log, type}")
    seed: int = Field(0, ge=0, description="the sampler's seed: the same file draws the same trials")
    prune: PruneSpec = PruneSpec()
    budget: BudgetSpec = BudgetSpec()
    top: int = Field(3, ge=2, description="how many of the best trials `runs compare` shows")

    @field_validator("parameters", mode="before")
    @classmethod
    def _one_message_per_parameter(cls, value: Any) -> Any:
        """A list of scalar values or a range, with one plain message per parameter (not one per union member)."""
        if not isinstance(value, dict):
            return value
        out = {}
        for key, space in value.items():
            if isinstance(space, dict):
                try:
                    out[key] = RangeSpec.model_validate(space)
                except ValidationError as err:
                    problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'range'}: "
                                         f"{e['msg'].removeprefix('Value error, ')}" for e in err.errors())
                    raise ValueError(f"{key}: {problems}") from None
            elif isinstance(space, list) and all(v is None or isinstance(v, (bool, int, float, str)) for v in space):
                out[key] = space
            else:
                raise ValueError(f"{key}: give a list of values (numbers, strings, true/false) or a range "
                                 f"{{low, high, log, type}}, not {space!r}")
        return out

    @model_validator(mode="after")
    def _fits_search(self) -> "SweepSpec":
        for key, values in self.parameters.items():
            if isinstance(values, list) and not values:
                raise ValueError(f"parameters.{key}: give at least one value")
            if isinstance(values, list) and len(set(map(repr, values))) != len(values):
                raise ValueError(f"parameters.{key}: a value is listed twice")
        ranges = [k for k, v in self.parameters.items() if isinstance(v, RangeSpec)]
        if self.search == "grid" and ranges:
            raise ValueError(f"search: grid needs a list of values for every parameter; {', '.join(ranges)} "
                             "is a range (list its values, or use search: random or tpe)")
        if self.search != "grid" and self.trials is None:
            raise ValueError(f"search: {self.search} needs trials: N (how many to draw)")
        return self

    def grid(self) -> list[dict[str, Scalar]]:
        """Every combination of the listed values (grid search), in the order the lists give them."""
        keys = list(self.parameters)
        lists = [v if isinstance(v, list) else [] for v in self.parameters.values()]
        return [dict(zip(keys, combo)) for combo in itertools.product(*lists)]


def _errors(err: ValidationError, source: str) -> str:
    """Each problem on a line, named by its key; a misspelt key with the closest sweep key."""
    lines = [f"{source}: invalid sweep file"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"] if not str(p).startswith(("list[", "RangeSpec", "function-")))
        if e["type"] == "extra_forbidden":
            known = list(SweepSpec.model_fields) if len(e["loc"]) == 1 else []
            close = difflib.get_close_matches(str(e["loc"][-1]), known, n=1)
            lines.append(f"  {key}: unknown key" + (f"; did you mean {close[0]}?" if close else ""))
        elif e["type"] == "missing":
            lines.append(f"  {key}: required key is missing")
        else:
            got = "" if isinstance(e.get("input"), dict) else f" (got {e.get('input')!r})"
            lines.append(f"  {key}: {e['msg'].removeprefix('Value error, ')}{got}")
    return "\n".join(lines)


def load_sweep(path: str | Path) -> tuple[SweepSpec, dict, Path]:
    """(the sweep, its base config as raw YAML, the base's folder), every path resolved beside the sweep file."""
    path = Path(path)
    raw = read_yaml(path, "sweep file")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys (base, output_dir, parameters, ...)")
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_errors(err, str(path))) from None
    here = path.resolve().parent
    spec.base = str((here / spec.base).resolve())
    spec.output_dir = str((here / spec.output_dir).resolve())
    base_raw = read_yaml(spec.base, "base config")
    if not isinstance(base_raw, dict):
        raise ConfigError(f"{spec.base}: the top level must be a mapping of keys")
    return spec, base_raw, Path(spec.base).parent


def trial_config(spec: SweepSpec, base_raw: dict, base_dir: Path, values: dict[str, Scalar], run_dir: Path,
                 source: str) -> Config:
    """The base config with the sweep's `set` keys, then this trial's values, laid over it, and its own output_dir."""
    raw = copy.deepcopy(base_raw)
    for key, value in {**spec.set, **values}.items():
        set_dotted(raw, key, value)
    raw["output_dir"] = str(run_dir)
    return config_from_dict(raw, source, base_dir)


def check_trials(spec: SweepSpec, base_raw: dict, base_dir: Path, sweep_file: str) -> None:
    """Every grid point, or both ends of every range, must make a valid config: fail before any training."""
    if spec.search == "grid":
        points = spec.grid()
    else:
        middle = {k: v[0] if isinstance(v, list) else (int(v.low) if v.type == "int" else v.low)
                  for k, v in spec.parameters.items()}
        points = [{**middle, k: end} for k, v in spec.parameters.items() if isinstance(v, RangeSpec)
                  for end in ((int(v.low), int(v.high)) if v.type == "int" else (v.low, v.high))]
        points += [{**middle, k: value} for k, v in spec.parameters.items() if isinstance(v, list) for value in v]
    for values in points:
        shown = ", ".join(f"{k}={v!r}" for k, v in values.items())
        try:
            trial_config(spec, base_raw, base_dir, values, Path(spec.output_dir) / "check", f"{spec.base} with {shown}")
        except ConfigError as err:
            raise ConfigError(f"{sweep_file}: parameters give an invalid config:\n{err}") from None
