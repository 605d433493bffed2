"""An OpenAI fine-tuning job request -> a tuneforge config, and a job row -> OpenAI's job object.

What OpenAI's fields become (each hyperparameter "auto" or a number):
  model                      base_model (a built-in name or a local model folder)
  training_file              datasets: [{path: <home>/files/<id>}] (format detected: messages or preference)
  validation_file            validation: {path: ...}, with a val_loss at each checkpoint
  seed                       seed
  method.type                supervised -> method: sft, dpo -> method: dpo (the deprecated top-level
                             `hyperparameters` is read as method supervised's)
  n_epochs                   epochs (auto: 3)
  batch_size                 micro_batch_size, grad_accum 1 (auto: 4)
  learning_rate_multiplier   learning_rate = multiplier x 2e-4 (supervised) or 2e-5 (dpo) (auto: 1)
  beta                       dpo.beta (auto: 0.1)
The extension field `tuneforge` (send it with the OpenAI client's `extra_body`) holds any other config keys,
nested or dotted ({"lora": {"r": 8}} or {"lora.r": 8}, "max_steps": 20, "save_every": 5), laid over the above;
it may choose another method (orpo, simpo, kto: trained on the file as that method's row reads it) or task
(classification, embedding). The keys the studio owns (paths, the base model, remote code, trackers, stages,
grpo, which runs user code) are refused.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from tuneforge.config import config_from_dict, looks_like_path
from tuneforge.errors import ConfigError
from tuneforge.serve.protocol import ApiError

METHODS = {"supervised": "sft", "dpo": "dpo"}
HYPERPARAMETERS = {"supervised": ("n_epochs", "batch_size", "learning_rate_multiplier"),
                   "dpo": ("n_epochs", "batch_size", "learning_rate_multiplier", "beta")}
AUTO = {"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 1.0, "beta": 0.1}
BASE_LR = {"supervised": 2e-4, "dpo": 2e-5}
# Keys the extension may not set: the studio chooses them, or they would run code or send data elsewhere.
OWNED = ("base_model", "datasets", "validation", "output_dir", "trust_remote_code", "track", "stages", "grpo")
CHOSEN = {"method": ("sft", "dpo", "orpo", "simpo", "kto"), "task": ("causal_lm", "classification", "embedding")}
DEFAULTS = {"adapter": "lora", "save_every": 10, "keep_last": 2, "evaluation": {"before_after": False},
            "max_seq_len": 1024}
SUFFIX = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def _bad(param: str, message: str, code: str | None = None) -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param, code=code)


def _hyperparameters(body: dict) -> tuple[str, dict]:
    """(method type, its hyperparameters as given) from `method`, or the deprecated top-level `hyperparameters`."""
    method = body.get("method")
    if method is None:
        kind, given, where = "supervised", body.get("hyperparameters") or {}, "hyperparameters"
    else:
        if not isinstance(method, dict) or method.get("type") not in METHODS:
            raise _bad("method", f"must be {{\"type\": \"supervised\" | \"dpo\", ...}}, got {method!r}")
        kind = method["type"]
        section = method.get(kind) or {}
        if not isinstance(section, dict):
            raise _bad(f"method.{kind}", "must be an object holding `hyperparameters`")
        given, where = section.get("hyperparameters") or {}, f"method.{kind}.hyperparameters"
        if body.get("hyperparameters"):
            raise _bad("hyperparameters", "give hyperparameters inside `method` or at the top level (deprecated), "
                       "not both")
    if not isinstance(given, dict):
        raise _bad(where, f"must be an object, got {type(given).__name__}")
    out = {}
    for key, value in given.items():
        if key not in HYPERPARAMETERS[kind]:
            raise _bad(f"{where}.{key}", f"is not a hyperparameter of {kind}; use {', '.join(HYPERPARAMETERS[kind])}")
        if value == "auto" or value is None:
            continue
        whole = key in ("n_epochs", "batch_size")
        if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)) or value <= 0:
            raise _bad(f"{where}.{key}", f'must be "auto" or a positive {"integer" if whole else "number"}, '
                       f"got {value!r}")
        out[key] = value
    return kind, out


def _outside(value: Any) -> str | None:
    """A string in a setting that names a file, a folder, a URL or a `module:function` (code to import), if any:
    a request reaches the machine only through uploaded files and the studio's own model names."""
    if isinstance(value, str):
        return value if looks_like_path(value) or ":" in value or value.endswith(".py") else None
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return next((hit for hit in map(_outside, items) if hit is not None), None)


def _lay_over(raw: dict, extension: dict) -> dict:
    """The extension's keys (nested or dotted) laid over the derived config, refusing the owned ones and any
    value that names a file, a URL or code."""
    for dotted, value in extension.items():
        if not isinstance(dotted, str) or dotted.split(".")[0] in OWNED:
            raise _bad(f"tuneforge.{dotted}", f"is set by the studio (one of {', '.join(OWNED)}); use the job's own "
                       "fields (model, training_file, validation_file, method) instead")
        if (hit := _outside(value)) is not None:
            raise _bad(f"tuneforge.{dotted}", f"{hit!r} names a file, a URL or code; a studio job reads only uploaded "
                       "files and runs no code of a request's naming (train such a config with `tuneforge train`)")
        if dotted in CHOSEN and value not in CHOSEN[dotted]:
            raise _bad(f"tuneforge.{dotted}", f"the studio trains {dotted} {' | '.join(CHOSEN[dotted])}, "
                       f"got {value!r}")
        *parents, leaf = dotted.split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise _bad(f"tuneforge.{dotted}", f"{part} is not a section of the config")
        if isinstance(value, dict) and isinstance(node.get(leaf), dict):
            node[leaf] = _lay_over(dict(node[leaf]), value)
        else:
            node[leaf] = value
    return raw


def job_config(body: dict, training_path: str, validation_path: str | None, home: Path,
               keys_required: bool) -> tuple[dict, dict]:
    """(the run's config as a dict, the hyperparameters as OpenAI reports them); 400 for anything wrong.

    The config is validated here, so a bad key is refused at once; output_dir is filled in by the worker.
    """
    raw, method = job_raw_config(body, training_path, validation_path, home, keys_required)
    try:
        config_from_dict(raw, "the job's settings")
    except ConfigError as err:
        raise ApiError(400, str(err), param="tuneforge", code="invalid_hyperparameters") from None
    return raw, method


def job_raw_config(body: dict, training_path: str, validation_path: str | None, home: Path,
                   keys_required: bool) -> tuple[dict, dict]:
    """job_config's two answers, the config not yet validated by the schema (the web UI lists each bad key)."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model", "is required: a built-in model name (e.g. smollm2-135m-instruct) or a local model folder")
    kind, hyper = _hyperparameters(body)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise _bad("seed", f"must be a non-negative integer, got {seed!r}")
    extension = body.get("tuneforge") or {}
    if not isinstance(extension, dict):
        raise _bad("tuneforge", f"must be an object of tuneforge config keys, got {type(extension).__name__}")
    filled = {**AUTO, **hyper}
    raw: dict[str, Any] = {
        **DEFAULTS, "evaluation": dict(DEFAULTS["evaluation"]),
        "base_model": base_model_for(model, home, keys_required), "method": METHODS[kind], "datasets": [{"path": training_path}],
        "epochs": filled["n_epochs"], "micro_batch_size": filled["batch_size"], "grad_accum": 1,
        "learning_rate": BASE_LR[kind] * filled["learning_rate_multiplier"], "output_dir": "run",
    }
    if kind == "dpo":
        raw["dpo"] = {"beta": filled["beta"]}
    if validation_path:
        raw["validation"] = {"path": validation_path}
    if seed is not None:
        raw["seed"] = seed
    raw = _lay_over(raw, extension)
    if validation_path and "eval_every" not in raw:
        raw["eval_every"] = raw["save_every"]  # each checkpoint reports a valid_loss, as OpenAI's do
    reported = {k: filled[k] for k in HYPERPARAMETERS[kind]}
    return raw, {"type": kind, kind: {"hyperparameters": reported}}


def base_model_for(model: str, home: Path, keys_required: bool) -> str:
    """A job's `model` as its config's base_model: a folder under <home>/models by its name, a built-in name,
    or (only on a studio without API keys, where the caller is this machine's user) a local folder."""
    named = home / "models" / model
    if "/" not in model and model not in (".", "..") and named.is_dir():
        return str(named)
    if keys_required and looks_like_path(model):
        raise _bad("model", f"{model!r}: a studio with API keys trains its built-in models and the folders under "
                   f"{home / 'models'}, named by folder name; a path from a request is not read", "model_not_found")
    return model


def parse_suffix(body: dict) -> str | None:
    suffix = body.get("suffix")
    if suffix is None or suffix == "":
        return None
    if not isinstance(suffix, str) or not SUFFIX.match(suffix):
        raise _bad("suffix", "must be 1 to 64 letters, digits, '-' or '_'")
    return suffix


def base_name(model: str) -> str:
    """The id a job's base model is served and named under: a built-in's name, a local folder's own name."""
    return Path(model).name if Path(model).is_dir() else model


def fine_tuned_name(base: str, suffix: str | None, job_id: str) -> str:
    """ft:<base>:<suffix>:<job>, as the model is then named in /v1/models and chat requests."""
    return f"ft:{base}:{suffix or ''}:{job_id}"


def job_object(row: dict) -> dict:
    """A job row in OpenAI's fine_tuning.job shape."""
    request, method = row["request"], row["request"]["method"]
    return {
        "object": "fine_tuning.job", "id": row["id"], "model": row["model"], "created_at": row["created_at"],
        "finished_at": row["finished_at"], "fine_tuned_model": row["fine_tuned_model"],
        "organization_id": row["owner"], "result_files": [], "status": row["status"],
        "validation_file": request.get("validation_file"), "training_file": request["training_file"],
        "hyperparameters": method[method["type"]]["hyperparameters"], "method": method,
        "trained_tokens": row["trained_tokens"], "error": row["error"], "seed": row["config"].get("seed", 42),
        "estimated_finish": row["estimated_finish"] if row["status"] == "running" else None, "integrations": [],
        "metadata": request.get("metadata"), "user_provided_suffix": request.get("suffix"),
        "tuneforge": {"progress": progress(row)},
    }


def progress(row: dict) -> dict | None:
    """{step, total_steps} of a running or paused job, for a progress bar; None before the first step and
    once the job has ended, so a finished job never shows one still going."""
    if row["status"] not in ("running", "paused") or not row["step"]:
        return None
    return {"step": row["step"], "total_steps": row["total_steps"]}


def event_object(row: dict) -> dict:
    return {"object": "fine_tuning.job.event", "id": row["id"], "created_at": row["created_at"], "level": row["level"],
            "message": row["message"], "type": row["type"], "data": row["data"]}


def checkpoint_object(row: dict, fine_tuned_model: str) -> dict:
    return {"object": "fine_tuning.job.checkpoint", "id": row["id"], "created_at": row["created_at"],
            "fine_tuning_job_id": row["job_id"], "step_number": row["step"], "metrics": row["metrics"],
            "fine_tuned_model_checkpoint": f"{fine_tuned_model}:ckpt-step-{row['step']}"}


def file_object(row: dict) -> dict:
    return {"object": "file", "id": row["id"], "bytes": row["bytes"], "created_at": row["created_at"],
            "filename": row["filename"], "purpose": row["purpose"], "status": "processed", "status_details": None}


def page(items: list[dict], limit: int) -> dict:
    """OpenAI's list shape; the store fetched limit + 1 rows to know whether more follow."""
    return {"object": "list", "data": items[:limit], "has_more": len(items) > limit}
