"""`tuneforge eval RUN [--suite FILE]`: the suite on base and tuned, the judge on their answers, and every result
written where train writes it (eval_before.json, eval_after.json, run.json, report.html)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

from pydantic import ValidationError

from tuneforge.config import Config, EvaluationSpec, read_yaml, resolve_evaluation_paths
from tuneforge.errors import ConfigError, TuneforgeError
from tuneforge.eval.compare import compare, headline, same_records, side_by_side
from tuneforge.eval.harness import check_task_data
from tuneforge.eval.judge import JUDGES
from tuneforge.eval.run_eval import check_other, evaluate_other, evaluate_run, open_target
from tuneforge.models.resolve import resolve_base_model
from tuneforge.models.run import Run, base_folder
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
    """{before, after, comparison, judge, others, side_by_side, judge_with, run_dir}; a finished run's folder gets
    the files and report rewritten. `benchmark(spec, run, base_folder, device)` runs the lm_eval entry
    (serve/harness.py: it needs the server, which evaluation does not import). `others`: more runs or model
    folders, evaluated the same way and set beside base and tuned (with a judge, the tuned model's answers are
    judged against theirs too)."""
    others = others or []
    cfg, run = open_target(target, overrides, trust_remote_code)
    if suite_file is not None:
        cfg.evaluation = load_suite(suite_file)
    if cfg.evaluation.lm_eval is not None and benchmark is None:
        raise ConfigError("evaluation.lm_eval: runs under `tuneforge eval`, which serves the models for lm-eval")
    if cfg.evaluation.lm_eval is not None:
        check_task_data(cfg.evaluation.lm_eval.include_path, cfg.evaluation.lm_eval.tasks)  # before any model loads
    for other in others:
        check_other(other, cfg.trust_remote_code)
    before, after = evaluate_run(cfg, run)
    extra = {name: evaluate_other(cfg, other) for name, other in zip(other_names(others), others)}
    out = {"before": before, "after": after, "comparison": compare(before, after, cfg.evaluation), "judge": None,
           "others": extra, "side_by_side": side_by_side({"base": before, "tuned": after, **extra}) if extra else None,
           "run_dir": run.dir if run else None}
    base = base_folder(run) if run else resolve_base_model(cfg.base_model)[0]
    out["judge"], harness = judge_and_benchmark(cfg.evaluation, run, base, before, after, benchmark, cfg.device)
    if harness is not None:
        out["comparison"]["lm_eval"] = harness
    out["judge_with"] = judge_others(cfg.evaluation, after, extra)
    if run is not None:
        record(run.dir, out)
    return out


def suite_costs(spec: EvaluationSpec, held_out: int, benchmark: bool = True) -> list[str]:
    """What the judge and lm-eval will cost, said before training starts (requests to a judge may be billed);
    lm-eval's task files are checked here, so that a missing one fails before any model loads."""
    notes: list[str] = []
    if not spec.before_after:
        return notes
    if spec.lm_eval is not None and not benchmark:
        notes.append("evaluation.lm_eval: not run here (it needs `tuneforge train`, which serves the models); "
                     "run `tuneforge eval RUN` after training")
    elif spec.lm_eval is not None:
        check_task_data(spec.lm_eval.include_path, spec.lm_eval.tasks)
        limit = f"at most {spec.lm_eval.limit} documents each" if spec.lm_eval.limit else "every document"
        notes.append(f"After training, lm-eval runs {', '.join(spec.lm_eval.tasks)} ({limit}) on the base and the "
                     "tuned model through tuneforge serve")
    if spec.judge is not None and held_out:
        n = min(held_out, spec.max_examples, spec.judge.max_examples)
        why = "both orders" if spec.judge.mode == "pairwise" else "base and tuned"
        notes.append(f"After training, the judge {spec.judge.model} at {spec.judge.base_url} is asked {2 * n} times "
                     f"({n} held-out prompts x 2, {why}), {spec.judge.concurrency} at a time, each reply up to "
                     f"{spec.judge.max_tokens} tokens (at most {2 * n * spec.judge.max_tokens} generated tokens)")
    return notes


def judge_and_benchmark(spec: EvaluationSpec, run: Run | None, base: Path, before: dict | None, after: dict | None,
                        benchmark: Callable | None, device: str) -> tuple[dict | None, dict | None]:
    """(judge, lm_eval): the suite entries that need both models' answers (the judge) or a server (lm-eval,
    through `benchmark`); None for an entry the suite does not have or cannot run."""
    harness = benchmark(spec.lm_eval, run, base, device) if spec.lm_eval is not None and benchmark else None
    judge = None
    if spec.judge is not None and after is not None and (before or {}).get("samples"):
        judge = JUDGES[spec.judge.mode](spec.judge, before["samples"], after["samples"])
    return judge, harness


def judge_others(spec: EvaluationSpec, after: dict | None, others: dict[str, dict]) -> dict[str, dict]:
    """{name: judge result}: the tuned model's answers judged against each `--with` model's as against the base's
    (a win is the tuned model's), where both answered the same held-out records."""
    if spec.judge is None or after is None or not after.get("samples"):
        return {}
    return {name: {**JUDGES[spec.judge.mode](spec.judge, other["samples"], after["samples"]), "against": name}
            for name, other in others.items() if other.get("samples") and same_records(other, after)}


def after_training(run_dir: Path, cfg: Config, manifest: dict, base: Path, before: dict | None, after: dict | None,
                   benchmark: Callable | None, warn: Callable[[str], None]) -> dict:
    """`tuneforge train`'s judge and lm-eval, once final/ and run.json are written (lm-eval serves the run from
    its folder); their results go into run.json, final/run.json and the card. A judge or lm-eval that fails is
    a warning, since the run itself is done and saved, and never a score. Returns the manifest."""
    if not cfg.evaluation.before_after:
        return manifest
    try:
        judge, harness = judge_and_benchmark(cfg.evaluation, Run(run_dir, cfg, manifest), base, before, after,
                                             benchmark, cfg.device)
    except TuneforgeError as err:
        warn(f"{err}; the run is saved: score it again with `tuneforge eval {run_dir}`")
        return manifest
    if judge is None and harness is None:
        return manifest
    if harness is not None:
        manifest["evaluation"] = {**(manifest.get("evaluation") or {}), "lm_eval": harness}
    if judge is not None:
        manifest["judge"] = write_judge(run_dir, judge)
        if judge.get("error"):
            warn(f"judge: {judge['error']}")
    write_json(run_dir / "run.json", manifest)
    write_json(run_dir / "final" / "run.json", manifest)
    write_final_card(run_dir, manifest)
    return manifest


def write_judge(run_dir: Path, judge: dict) -> dict:
    """judge_replies.jsonl (judge_replies_<name>.jsonl against a `--with` model): every raw reply; returns the
    judge's result without them, for run.json."""
    name = f"judge_replies_{judge['against']}.jsonl" if "against" in judge else "judge_replies.jsonl"
    with open(run_dir / name, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in judge["replies"])
    return {k: v for k, v in judge.items() if k != "replies"}


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
    judge = write_judge(run_dir, out["judge"]) if out["judge"] is not None else None
    judge_with = {name: write_judge(run_dir, j) for name, j in (out.get("judge_with") or {}).items()}
    manifest = json.loads((run_dir / "run.json").read_text())
    manifest.update(eval_before=headline(out["before"]), eval_after=headline(out["after"]),
                    evaluation=out["comparison"], side_by_side=out.get("side_by_side"), judge=judge,
                    judge_with=judge_with or None)
    write_json(run_dir / "run.json", manifest)
    write_final_card(run_dir, manifest)
    write_report(run_dir)
