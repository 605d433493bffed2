"""The web UI's New run page: the config schema for its form, the shipped presets, a config checked and turned
into the jobs-API request that runs it, and `tuneforge plan` for it.

A config from the page (YAML text or a mapping) is read as the studio reads a job: the studio's defaults under
it, the chosen training file as its data. So the config, YAML and plan shown are those of the job that Start
creates, and any error names the config key to change.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import yaml
from pydantic import ValidationError

from tuneforge.config import Config, parse_yaml, validation_errors
from tuneforge.errors import ModelError, TuneforgeError
from tuneforge.models.resolve import locate_base_model
from tuneforge.plan import plan_config
from tuneforge.plan.assumed import DataSize, assumed_data
from tuneforge.plan.hardware import GIB
from tuneforge.serve.protocol import ApiError
from tuneforge.studio import jobs as j
from tuneforge.studio.context import Studio
from tuneforge.studio.data_api import DEFAULT_MODEL, file_row

PRESETS = Path(__file__).parent / "presets"
DATA_KEYS = ("datasets", "validation", "output_dir")  # the studio fills them in from the chosen files
NO_FILE = "(no training file chosen yet)"
ASSUMED = DataSize(seq_len=512, examples=1000)  # planned when no training file is chosen (the body may say)


@functools.lru_cache(maxsize=1)
def _schema() -> dict:
    return Config.model_json_schema()


def schema(studio: Studio, owner: str, body=None, query=None) -> dict:
    """GET /v1/tuneforge/schema: every config key with its description, default, type and range; the keys the
    studio sets itself, and the methods and tasks a studio job may train."""
    return {**_schema(), "x-studio": {"owned": list(j.OWNED), "method_types": list(j.CHOSEN["method"]),
                                      "tasks": list(j.CHOSEN["task"]), "defaults": j.DEFAULTS}}


def read_preset(path: Path) -> dict:
    spec = yaml.safe_load(path.read_text())
    return {"name": path.stem, "title": spec["title"], "description": spec["description"],
            "startable": "studio" not in spec, "note": spec.get("studio"), "config": spec["config"],
            "yaml": yaml.safe_dump(spec["config"], sort_keys=False)}


def presets(studio: Studio, owner: str, body=None, query=None) -> dict:
    """GET /v1/tuneforge/presets: the shipped starting points (no data paths: the page picks an uploaded file);
    one that a studio job cannot run yet says so in `startable` and `note`."""
    order = ["chat-sft", "dpo", "classification", "embedding"]
    paths = sorted(PRESETS.glob("*.yaml"), key=lambda p: (order.index(p.stem) if p.stem in order else 99, p.stem))
    return {"data": [read_preset(p) for p in paths]}


def _given(body: dict) -> dict:
    """The page's config: `yaml` text or a `config` mapping."""
    if isinstance(body.get("yaml"), str):
        try:
            raw = parse_yaml(body["yaml"], "yaml")
        except TuneforgeError as err:
            raise ApiError(400, str(err), param="yaml", code="invalid_yaml") from None
    else:
        raw = body.get("config")
    if not isinstance(raw, dict):
        raise ApiError(400, "send {\"yaml\": TEXT} or {\"config\": {...}}: a mapping of config keys", param="config")
    return raw


def job_request(raw: dict, training_file: str | None, body: dict) -> dict:
    """The POST /v1/fine_tuning/jobs body that runs this config: OpenAI's fields where they exist (so the job
    reports them), every other key in the `tuneforge` extension."""
    kind = "dpo" if raw.get("method") == "dpo" and raw.get("task", "causal_lm") == "causal_lm" else "supervised"
    hyper = {}
    for key, name in (("epochs", "n_epochs"), ("micro_batch_size", "batch_size")):
        if type(raw.get(key)) is int and raw[key] > 0:
            hyper[name] = raw[key]
    if type(raw.get("learning_rate")) in (int, float) and raw["learning_rate"] > 0:
        hyper["learning_rate_multiplier"] = raw["learning_rate"] / j.BASE_LR[kind]
    dpo = raw.get("dpo")
    beta = dpo.get("beta") if isinstance(dpo, dict) else None
    if kind == "dpo" and type(beta) in (int, float) and beta > 0:
        hyper["beta"] = beta
    extension = {k: v for k, v in raw.items() if k not in ("base_model", "seed", *DATA_KEYS)}
    request = {"model": raw.get("base_model", DEFAULT_MODEL), "training_file": training_file,
               "method": {"type": kind, kind: {"hyperparameters": hyper}}, "suffix": body.get("suffix"),
               "seed": raw.get("seed"), "tuneforge": extension}
    if body.get("validation_file"):
        request["validation_file"] = body["validation_file"]
    return request


def _path(studio: Studio, owner: str, body: dict, param: str) -> str | None:
    file_id = body.get(param)
    if file_id is None:
        return None
    if not isinstance(file_id, str):
        raise ApiError(400, f"{param}: a studio file id, got {file_id!r}", param=param)
    file_row(studio, owner, file_id)
    return str(studio.store.file_path(file_id))


def checked(studio: Studio, owner: str, body: dict) -> tuple[dict, dict, Config | None, list[dict], list[str]]:
    """(the job request, the job's config as a dict, the validated Config or None, errors by key, warnings)."""
    raw = _given(body)
    request = job_request(raw, body.get("training_file"), body)
    # A pasted example's data paths are not used: the studio trains on the chosen files.
    warnings = [f"{key}: not used; the studio trains on the training file chosen on this page" for key in DATA_KEYS
                if key in raw]
    training, validation = _path(studio, owner, body, "training_file"), _path(studio, owner, body, "validation_file")
    try:
        config, _ = j.job_raw_config(request, training or NO_FILE, validation)
    except ApiError as err:
        key = (err.param or "").removeprefix("tuneforge.")
        return request, raw, None, [{"key": key, "message": err.message.removeprefix(f"{err.param}: ")}], warnings
    try:
        cfg = Config.model_validate(config)
    except ValidationError as err:
        return request, config, None, [{"key": k, "message": m} for k, m in validation_errors(err)], warnings
    try:
        locate_base_model(cfg.base_model)
    except ModelError as err:
        return request, config, None, [{"key": "base_model", "message": str(err)}], warnings
    return request, config, cfg, [], warnings


def shown(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in DATA_KEYS}


def check_config(studio: Studio, owner: str, body: dict, query=None) -> dict:
    """POST /v1/tuneforge/config: the config normalised with every default, its YAML, errors by key, and the
    job request that Start sends to POST /v1/fine_tuning/jobs."""
    request, config, cfg, errors, warnings = checked(studio, owner, body)
    return {"ok": not errors, "config": shown(cfg.model_dump(mode="json")) if cfg else shown(config),
            "yaml": yaml.safe_dump(shown(config), sort_keys=False), "errors": errors, "warnings": warnings,
            "job_request": request}


def _local_row(rows: list):
    """The plan's row for the device this studio trains on: its GPU where the table knows it, else the CPU."""
    cpu = next(r for r in rows if r.device.is_cpu)
    if not torch.cuda.is_available():
        return cpu
    name = torch.cuda.get_device_name(0).lower()
    return next((r for r in rows if not r.device.is_cpu and r.device.name.split("-")[0].lower() in name), cpu)


def plan(studio: Studio, owner: str, body: dict, query=None) -> dict:
    """POST /v1/tuneforge/plan: `tuneforge plan` for the config (no weights loaded): fit, peak memory by part on
    this machine, and time and cost on each GPU of the table. Without a training file the data is assumed:
    `examples` of `seq_len` tokens (1000 of 512 unless the body says)."""
    _, _, cfg, errors, _ = checked(studio, owner, body)
    if cfg is None:
        first = errors[0]
        raise ApiError(400, f"{first['key']}: {first['message']}", param=first["key"], code="invalid_config")
    given = {key: body.get(key, getattr(ASSUMED, key)) for key in ("seq_len", "examples")}
    for key, value in given.items():
        if type(value) is not int or value < 1:
            raise ApiError(400, f"{key}: a positive whole number, got {value!r}", param=key)
    size = DataSize(**given)
    try:
        data = None if body.get("training_file") else assumed_data(size, cfg.max_seq_len)
        report = plan_config(cfg, data=data)
    except TuneforgeError as err:
        raise ApiError(400, str(err), code="invalid_config") from None
    local = _local_row(report.rows)
    parts = local.memory.as_dict()
    return {"fits": local.fits, "device": local.device.name, "peak_memory_gb": parts.pop("peak") / GIB,
            "memory_by_part": {k: v / GIB for k, v in parts.items()},
            "rows": [{"gpu": r.device.name, "fits": r.fits, "peak_memory_gb": r.memory.peak / GIB,
                      "hours": r.run_hours, "cost_usd": r.cost} for r in report.rows],
            "recommendation": report.recommendation.device.name if report.recommendation else None,
            "data": report.as_json()["data"], "warnings": report.warnings, "notes": report.notes}
