"""The config as the rented machine sees it: every local file it names is copied up (a SkyPilot file
mount), and output_dir lies on a mounted bucket, so a preempted spot machine's checkpoints survive it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tuneforge.config import Config, config_to_dict
from tuneforge.errors import ConfigError
from tuneforge.models.resolve import BUILTINS

REMOTE = "/tuneforge"  # everything the run reads or writes on the remote machine lies under here
OUTPUTS = f"{REMOTE}/outputs"  # the mounted bucket


@dataclass
class RemoteConfig:
    config: dict  # the config with remote paths
    uploads: dict[str, str] = field(default_factory=dict)  # remote path -> local path
    run_dir: str = ""  # output_dir on the bucket


def remote_config(cfg: Config, name: str) -> RemoteConfig:
    """`cfg` with its data, model and template files moved under /tuneforge/inputs and its output_dir
    on the bucket, and the uploads that put them there."""
    raw = config_to_dict(cfg)
    uploads: dict[str, str] = {}

    def upload(local: str, kind: str) -> str:
        if not Path(local).exists():
            raise ConfigError(f"{local}: not found; launch copies the {kind} files the config names to the "
                              "machine, so they must exist here first")
        target = f"{REMOTE}/inputs/{kind}/{len(uploads)}-{Path(local).name}"
        uploads[target] = local
        return target

    for ds in raw["datasets"]:
        ds["path"] = upload(ds["path"], "data")
    if raw.get("validation") and raw["validation"].get("path"):
        raw["validation"]["path"] = upload(raw["validation"]["path"], "data")
    if cfg.base_model.lower() not in BUILTINS and Path(cfg.base_model).exists():
        raw["base_model"] = upload(cfg.base_model, "model")
    if cfg.chat_template.endswith(".jinja"):
        raw["chat_template"] = upload(cfg.chat_template, "template")
    grpo = raw.get("grpo") or {}
    for holder, key in [*((r, "function") for r in grpo.get("rewards", [])), *([(grpo, "environment")] if grpo else [])]:
        path, sep, attr = (holder.get(key) or "").rpartition(":")
        if sep and path.endswith(".py"):
            holder[key] = f"{upload(path, 'code')}:{attr}"
    run_dir = f"{OUTPUTS}/{name}"
    raw["output_dir"] = run_dir
    return RemoteConfig(raw, uploads, run_dir)
