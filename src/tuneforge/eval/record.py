"""`tuneforge eval RUN [--suite FILE]`: the suite on base and tuned, the judge on their answers, and every result
written where train writes it (eval_before.json, eval_after.json, run.json, report.html)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

from pydantic import ValidationError

from tuneforge.config import EvaluationSpec, read_yaml, resolve_evaluation_paths
from tuneforge.errors import ConfigError
from tuneforge.eval.compare import compare, headline, side_by_side
from tuneforge.eval.harness import check_task_data
from tuneforge.eval.judge import JUDGES
from tuneforge.eval.run_eval import evaluate_other, evaluate_run, open_target
from tuneforge.models.resolve import resolve_base_model
from tuneforge.models.run import base_folder
from tuneforge.track.card import write_final_card
from tuneforge.track.report import write_report
from tuneforge.train.outputs import write_json


def load_suite(path: str | Path) -> EvaluationSpec:
    """An `evaluation:` section from its own YAML file (a list is short for {suite: [...]}); paths relative to it."""
    path = Path(path)
    raw = read_yaml(path, "suite file")
    raw = {"suite": raw} if isinstance(raw, list) else raw.get("evaluation", raw) if isinstance(raw, dict) else raw
    try:
        spec = EvaluationSpec.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise ConfigError(f"{path}: {where}: {first['msg']}; the file holds an `evaluation:` section "
                          "(docs/evaluation.md)") from None
    return resolve_evaluation_paths(spec, path.resolve().parent)


def run_suite(target: str | Path, overrides: list[str] | None = None, trust_remote_code: bool = False,
              suite_file: str | Path | None = None, benchmark: Callable | None = None,
              others: list[str] | None = None) -> dict:
    """{before, after, comparison, judge, others, side_by_side, run_dir}; a finished run's folder gets the files
    and report rewritten. `benchmark(spec, run, base_folder, device)` runs the lm_eval entry (serve/harness.py: it
    needs the server, which evaluation does not import). `others`: more runs or model folders, evaluated the same
    way and set beside base and tuned."""
    cfg, run = open_target(target, overrides, trust_remote_code)
    if suite_file is not None:
        cfg.evaluation = load_suite(suite_file)
    harness = cfg.evaluation.lm_eval
    if harness is not None and benchmark is None:
        raise ConfigError("evaluation.lm_eval: runs under `tuneforge eval`, which serves the models for lm-eval")
    if harness is not None:
        check_task_data(harness.include_path, harness.tasks)  # before any model loads
    names = other_names(others or [])
    before, after = evaluate_run(cfg, run)
    extra = {name: evaluate_other(cfg, other) for name, other in zip(names, others or [])}
    out = {"before": before, "after": after, "comparison": compare(before, after, cfg.evaluation), "judge": None,
           "others": extra, "side_by_side": side_by_side({"base": before, "tuned": after, **extra}) if extra else None,
           "run_dir": run.dir if run else None}
    if harness is not None:
        base = base_folder(run) if run else resolve_base_model(cfg.base_model)[0]
        out["comparison"]["lm_eval"] = benchmark(harness, run, base, cfg.device)
    spec = cfg.evaluation.judge
    if spec is not None and after is not None and before.get("samples"):
        out["judge"] = JUDGES[spec.mode](spec, before["samples"], after["samples"])
    if run is not None:
        record(run.dir, out)
    return out


def other_names(others: list[str]) -> list[str]:
    """A short, unique, file-safe name for each other model (its folder's name): eval_<name>.json, a column."""
    names: list[str] = []
    for other in others:
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(str(other).rstrip("/")).name) or "model"
        name, i = stem, 2
        while name in (*names, "base", "tuned", "before", "after"):
            name, i = f"{stem}-{i}", i + 1
        names.append(name)
    return names


def record(run_dir: Path, out: dict) -> None:
    """Write the evaluations, the judge's raw replies, run.json's evaluation keys and the report page."""
    write_json(run_dir / "eval_before.json", out["before"])
    write_json(run_dir / "eval_after.json", out["after"])
    for name, result in (out.get("others") or {}).items():
        write_json(run_dir / f"eval_{name}.json", result)
    judge = out["judge"]
    if judge is not None:
        with open(run_dir / "judge_replies.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in judge["replies"])
    manifest = json.loads((run_dir / "run.json").read_text())
    manifest.update(eval_before=headline(out["before"]), eval_after=headline(out["after"]),
                    evaluation=out["comparison"], side_by_side=out.get("side_by_side"),
                    judge={k: v for k, v in judge.items() if k != "replies"} if judge else None)
    write_json(run_dir / "run.json", manifest)
    write_final_card(run_dir, manifest)
    write_report(run_dir)
