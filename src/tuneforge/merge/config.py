"""The merge YAML (mergekit-like): schema, per-method rules and path resolution.

Everything a merge could trip over in the file itself (unknown keys, densities out of range,
a missing base_model, a parameter the method ignores) is reported here, with the key, before
any weights are read.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tuneforge.config import read_yaml
from tuneforge.errors import ConfigError

Method = Literal["linear", "slerp", "task_arithmetic", "ties", "dare_linear", "dare_ties", "model_stock"]

# Methods that work on task vectors (model - base_model) and so need base_model.
NEEDS_BASE = {"task_arithmetic", "ties", "dare_linear", "dare_ties", "model_stock"}

# The parameters each method reads; any other one set in the file is an error, not ignored.
USES = {
    "linear": {"weight", "normalize"},
    "slerp": {"t"},
    "task_arithmetic": {"weight", "lambda"},
    "ties": {"weight", "density", "lambda"},
    "dare_linear": {"weight", "density", "lambda"},
    "dare_ties": {"weight", "density", "lambda"},
    "model_stock": set(),
}

# mergekit keys that users copy over, and what to do instead.
FOREIGN = {
    "slices": "tuneforge merges whole models; layer slices are not supported (list models instead)",
    "tokenizer": "use tokenizer_source: base | first",
    "out_dtype": "use dtype",
    "chat_template": "the chat template comes with tokenizer_source",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _density(value: float | None) -> float | None:
    if value is not None and not 0 < value <= 1:
        raise ValueError("must be in (0, 1]: the share of task-vector entries kept")
    return value


class ModelParameters(_Strict):
    weight: float | None = Field(None, description="This model's weight; default parameters.weight, else 1.")
    density: float | None = Field(None, description="ties/dare: share of task-vector entries kept, in (0, 1].")

    @field_validator("density")
    @classmethod
    def _density_range(cls, v: float | None) -> float | None:
        return _density(v)


class MergeParameters(_Strict):
    weight: float | None = Field(None, description="Default weight of every model (1 if unset).")
    density: float | None = Field(None, description="Default density of every model (ties/dare).")
    t: float | None = Field(None, description="slerp: 0 gives models[0], 1 gives models[1].")
    lambda_: float | None = Field(None, alias="lambda", description="Scale of the merged task vector (default 1).")
    normalize: bool | None = Field(None, description="linear: divide by the sum of weights (default true).")

    @field_validator("density")
    @classmethod
    def _density_range(cls, v: float | None) -> float | None:
        return _density(v)

    @field_validator("t")
    @classmethod
    def _t_range(cls, v: float | None) -> float | None:
        if v is not None and not 0 <= v <= 1:
            raise ValueError("must be in [0, 1]")
        return v


class ModelSpec(_Strict):
    model: str = Field(
        description="A local Hugging Face folder, a PEFT adapter folder (merged into its base first) "
        "or BASE+ADAPTER; relative to the YAML file."
    )
    parameters: ModelParameters = Field(default_factory=ModelParameters)


class MergeConfig(_Strict):
    merge_method: Method
    base_model: str | None = Field(None, description="Local folder; task vectors are taken against it.")
    models: list[ModelSpec] = Field(min_length=1, description="The models to merge, in order.")
    parameters: MergeParameters = Field(default_factory=MergeParameters, description="Method-wide defaults.")
    dtype: Literal["float32", "float16", "bfloat16"] | None = Field(
        None, description="Output dtype; default each tensor keeps the reference model's dtype."
    )
    seed: int = Field(0, description="Seeds DARE's random drop (per tensor, derived from this).")
    tokenizer_source: Literal["base", "first"] = Field(
        "base", description="Whose tokenizer, chat template and generation_config the output carries: "
        "base_model (models[0] for linear/slerp without one) or models[0]."
    )
    output_dir: str | None = Field(None, description="Default output folder; else <yaml stem>-merged beside the YAML.")

    def weights(self) -> list[float]:
        default = 1.0 if self.parameters.weight is None else self.parameters.weight
        return [default if m.parameters.weight is None else m.parameters.weight for m in self.models]

    def densities(self) -> list[float]:
        default = 1.0 if self.parameters.density is None else self.parameters.density
        return [default if m.parameters.density is None else m.parameters.density for m in self.models]

    def slerp_ends(self) -> tuple[int, int]:
        """Indices of the t=0 and t=1 models: base_model when it is one of the two (mergekit's convention), else models[0]."""
        if self.base_model and self.base_model == self.models[1].model:
            return 1, 0
        return 0, 1

    @property
    def lambda_(self) -> float:
        return 1.0 if self.parameters.lambda_ is None else self.parameters.lambda_

    @property
    def t(self) -> float:
        return 0.5 if self.parameters.t is None else self.parameters.t

    @property
    def normalize(self) -> bool:
        return True if self.parameters.normalize is None else self.parameters.normalize


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _hint(bad: str) -> str:
    if bad in FOREIGN:
        return FOREIGN[bad]
    known = [f.alias or name for m in (MergeConfig, ModelSpec, MergeParameters) for name, f in m.model_fields.items()]
    close = difflib.get_close_matches(bad, known, n=1)
    return f"did you mean {close[0]}?" if close else f"the keys are {', '.join(sorted(set(known)))}"


def _format_errors(err: ValidationError) -> list[str]:
    lines = []
    for e in err.errors():
        key = _loc(e["loc"])
        last = str(e["loc"][-1]) if e["loc"] else ""
        if e["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key; {_hint(last)}")
        elif e["type"] == "missing":
            lines.append(f"{key}: required key is missing")
        else:
            lines.append(f"{key}: {e['msg'].removeprefix('Value error, ')} (got {e.get('input')!r})")
    return lines


def method_problems(cfg: MergeConfig) -> list[str]:
    """Rules that span keys: base_model, model count, parameters the method does not read."""
    method, problems = cfg.merge_method, []
    if method in NEEDS_BASE and not cfg.base_model:
        problems.append(f"base_model: {method} merges task vectors (model - base), so it needs base_model: a local folder")
    if method == "slerp" and len(cfg.models) != 2:
        problems.append(f"models: slerp interpolates exactly two models, got {len(cfg.models)}; use linear for more")
    if method == "model_stock" and len(cfg.models) < 2:
        problems.append("models: model_stock needs at least two fine-tuned models (the angle between them sets the ratio)")
    uses = USES[method]
    p = cfg.parameters
    global_set = {"weight": p.weight, "density": p.density, "t": p.t, "lambda": p.lambda_, "normalize": p.normalize}
    for name, value in global_set.items():
        if value is not None and name not in uses:
            problems.append(f"parameters.{name}: {method} does not use {name}; remove it")
    for i, m in enumerate(cfg.models):
        for name in ("weight", "density"):
            if getattr(m.parameters, name) is not None and name not in uses:
                problems.append(f"models[{i}].parameters.{name}: {method} does not use {name}; remove it")
        if "density" in uses and m.parameters.density is None and p.density is None:
            problems.append(
                f"models[{i}].parameters.density: {method} needs a density (share of task-vector entries kept, "
                "e.g. 0.5); set it here or once in parameters.density"
            )
    if method == "linear" and cfg.normalize and sum(cfg.weights()) == 0:
        problems.append("parameters.normalize: the weights sum to 0, so they cannot be normalised; set normalize: false")
    return problems


def _resolve(value: str, base: Path) -> str:
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (base / path).resolve())


def resolve_paths(cfg: MergeConfig, base: Path) -> MergeConfig:
    """Relative paths (also both halves of BASE+ADAPTER) become absolute against the YAML's folder."""
    def model_path(value: str) -> str:
        if "+" in value and not (base / value).exists() and not Path(value).exists():
            left, right = value.split("+", 1)
            return f"{_resolve(left, base)}+{_resolve(right, base)}"
        return _resolve(value, base)

    models = [m.model_copy(update={"model": model_path(m.model)}) for m in cfg.models]
    update = {"models": models}
    if cfg.base_model:
        update["base_model"] = _resolve(cfg.base_model, base)
    if cfg.output_dir:
        update["output_dir"] = _resolve(cfg.output_dir, base)
    return cfg.model_copy(update=update)


def path_problems(cfg: MergeConfig) -> list[str]:
    """Rules on resolved paths: where base_model may or must not appear among the models."""
    paths = [m.model for m in cfg.models]
    if cfg.merge_method == "slerp" and cfg.base_model and cfg.base_model not in paths:
        return ["base_model: for slerp it names which of the two models is t=0, so it must be one of them; "
                "or leave it out and models[0] is t=0"]
    if cfg.merge_method in NEEDS_BASE and cfg.base_model in paths:
        i = paths.index(cfg.base_model)
        return [f"models[{i}].model: this is the base_model; list only the fine-tuned models "
                "(the base is the reference the task vectors are taken from)"]
    return []


def merge_config_from_dict(raw: object, source: str = "<merge config>", base: Path | None = None) -> MergeConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys, got {type(raw).__name__}")
    try:
        cfg = MergeConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError("\n  ".join([f"{source}: invalid merge config"] + _format_errors(err))) from None
    problems = method_problems(cfg)
    if problems:
        raise ConfigError("\n  ".join([f"{source}: invalid merge config"] + problems))
    cfg = resolve_paths(cfg, base or Path.cwd())
    problems = path_problems(cfg)
    if problems:
        raise ConfigError("\n  ".join([f"{source}: invalid merge config"] + problems))
    return cfg


def load_merge_config(path: str | Path) -> MergeConfig:
    """Read, validate and resolve a merge YAML; every problem is a ConfigError naming the key."""
    path = Path(path)
    raw = read_yaml(path, "merge config file")
    return merge_config_from_dict(raw, str(path), path.parent.resolve())


def config_to_dict(cfg: MergeConfig) -> dict:
    """The config as YAML would spell it (lambda, not lambda_), unset keys left out."""
    return cfg.model_dump(mode="json", by_alias=True, exclude_none=True)
