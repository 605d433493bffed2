"""Chains of methods in one config (e.g. sft then dpo): each stage starts from the previous result.

A stage is the top-level config with the stage's keys laid over it. Its run is an ordinary run
folder (`<output_dir>/<n>-<method>/`), so every stage keeps its checkpoints, final/, evaluations
and run.json; the chain's own run.json lists them. A LoRA stage's adapter is merged into its
base (`merged/`) so the next stage trains, and compares against, the previous stage's model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tuneforge.config import Config, config_from_dict, config_to_dict
from tuneforge.errors import ConfigError
from tuneforge.train.checkpoints import list_checkpoints
from tuneforge.train.outputs import now, run_manifest, write_json


def _overlay(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _overlay(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def stage_configs(cfg: Config, base: Path) -> list[Config]:
    """Every stage's full config, validated before anything runs; relative paths resolve against `base`."""
    top = {k: v for k, v in config_to_dict(cfg).items() if k != "stages"}
    out = []
    for i, stage in enumerate(cfg.stages, 1):
        if not isinstance(stage, dict) or "method" not in stage:
            raise ConfigError(f"stages[{i - 1}]: each stage is a mapping with at least `method:`")
        if "stages" in stage:
            raise ConfigError(f"stages[{i - 1}]: a stage cannot hold stages of its own")
        raw = _overlay(top, stage)
        raw["output_dir"] = str(Path(cfg.output_dir) / f"{i}-{stage['method']}")
        if i > 1 and ("base_model" in stage or stage.get("init") == "random"):
            key = "base_model" if "base_model" in stage else "init"
            raise ConfigError(f"stages[{i - 1}].{key}: a later stage starts from the previous stage's result")
        if i > 1:  # the first stage's init: random (its architecture, its tokenizer) built the model it trained
            raw.update(init="pretrained", architecture=None, tokenizer=None)
        out.append(config_from_dict(raw, f"stages[{i - 1}]", base))
    return out


def stage_result(run_dir: Path, cfg: Config) -> Path:
    """The model folder the next stage starts from: the full weights, or the adapter merged into its base."""
    if cfg.adapter == "full":
        return run_dir / "final"
    merged = run_dir / "merged"
    if not (merged / "config.json").is_file():
        from tuneforge.export.merge import merge_run
        from tuneforge.models.run import open_run

        merge_run(open_run(run_dir, cfg.trust_remote_code), merged, torch.float32)  # the user's own config
    return merged


def train_chain(cfg: Config, base: Path, resume: bool = False, reporter=None) -> dict:
    """Run the stages in order; a finished stage (final/ and run.json present) is not run again."""
    from tuneforge.train.loop import train

    configs = stage_configs(cfg, base)
    started, done = now(), []
    previous: Path | None = None
    for i, stage in enumerate(configs, 1):
        if previous is not None:
            stage.base_model = str(previous)
        run_dir = Path(stage.output_dir)
        finished = (run_dir / "run.json").is_file() and (run_dir / "final").is_dir()
        if reporter is not None:
            reporter.note(f"Stage {i}/{len(configs)}: {stage.method} -> {run_dir}" + (" (done already)" if finished else ""))
        if finished:
            manifest = json.loads((run_dir / "run.json").read_text())
        else:
            manifest = train(stage, resume=resume and bool(list_checkpoints(run_dir)), reporter=reporter)
            if "stopped_at" in manifest:
                return manifest
        done.append({"stage": i, "method": stage.method, "output_dir": str(run_dir), "base_model": stage.base_model,
                     "final": manifest.get("final"), "eval_before": manifest.get("eval_before"),
                     "eval_after": manifest.get("eval_after")})
        previous = stage_result(run_dir, stage) if i < len(configs) else None
    chain = run_manifest(config_to_dict(cfg), stages=done, final=done[-1]["final"], started=started, finished=now())
    write_json(Path(cfg.output_dir) / "run.json", chain)
    return chain
