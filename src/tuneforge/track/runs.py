"""Runs on disk: read one (finished or not), list many, compare a few.

A run folder holds metrics.jsonl and diagnosis.jsonl from the first step, run_started.json (config
and facts) from the start, and run.json once it has finished. Everything here reads those files
only: no model is loaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from tuneforge.errors import TuneforgeError
from tuneforge.track.metrics import read_jsonl
from tuneforge.track.trackers import flatten

# Evaluation numbers shown side by side, in this order, where a run has them.
EVAL_KEYS = ("val_loss", "perplexity", "exact_match", "stopped", "preference_accuracy", "accuracy", "macro_f1",
             "weighted_f1")
# Config keys that differ between any two runs and say nothing about them.
NOISE_KEYS = ("output_dir",)


@dataclass
class RunFiles:
    """What one run folder holds; a missing file is an empty value."""

    dir: Path
    manifest: dict = field(default_factory=dict)  # run.json, or run_started.json while unfinished
    finished: bool = False
    metrics: list[dict] = field(default_factory=list)
    findings: list[dict] = field(default_factory=list)
    before: dict | None = None
    after: dict | None = None

    @property
    def name(self) -> str:
        return self.dir.name

    @property
    def config(self) -> dict:
        return self.manifest.get("config", {})

    @property
    def steps(self) -> list[dict]:
        """Training-step records (one per optimizer step, the newest value of a repeated step)."""
        by_step = {m["step"]: m for m in self.metrics if "step" in m}
        return [by_step[s] for s in sorted(by_step)]

    @property
    def status(self) -> str:
        if self.finished:
            return "finished"
        last = self.steps[-1]["step"] if self.steps else 0
        stopped = [f for f in self.findings if f.get("action") in ("stop", "early_stop")]
        return f"{stopped[-1]['action'].replace('_', ' ')} at step {last}" if stopped else f"stopped at step {last}"

    def last(self, key: str):
        """The newest logged value of a metric, or None."""
        for m in reversed(self.steps):
            if m.get(key) is not None:
                return m[key]
        return None


def _json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def _jsonl(path: Path) -> list[dict]:
    return read_jsonl(path) if path.is_file() else []


def is_run(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("run.json", "run_started.json", "metrics.jsonl"))


def read_run(path: str | Path) -> RunFiles:
    folder = Path(path)
    if not folder.is_dir() or not is_run(folder):
        raise TuneforgeError(f"{folder}: not a run folder (no run.json or metrics.jsonl); give a training "
                             "run's output_dir")
    manifest = _json(folder / "run.json")
    finished = manifest is not None
    return RunFiles(
        dir=folder, manifest=manifest or _json(folder / "run_started.json") or {}, finished=finished,
        metrics=_jsonl(folder / "metrics.jsonl"), findings=_jsonl(folder / "diagnosis.jsonl"),
        before=_json(folder / "eval_before.json"), after=_json(folder / "eval_after.json"),
    )


def find_runs(root: str | Path) -> list[RunFiles]:
    """Every run folder at or below `root` (not inside another run), sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise TuneforgeError(f"{root}: no such folder; give the folder your runs' output_dir values are in")
    found = [root] if is_run(root) else []
    if not found:
        for path in sorted(root.rglob("*")):
            if path.is_dir() and is_run(path) and not any(p in found for p in path.parents):
                found.append(path)
    return [read_run(p) for p in found]


def data_hash(run: RunFiles) -> str:
    """One short fingerprint of all the run's data files."""
    import hashlib

    hashes = run.manifest.get("data_sha256") or {}
    if not hashes:
        return "-"
    return hashlib.sha256("".join(hashes[k] for k in sorted(hashes)).encode()).hexdigest()[:8]


def summary_row(run: RunFiles) -> dict[str, object]:
    """The columns of `tuneforge runs`."""
    c = run.config
    lora = c.get("lora") or {}
    after = run.after or {}
    return {
        "run": run.name, "status": run.status, "method": c.get("method", "sft"), "model": Path(str(c.get("base_model", "-"))).name,
        "adapter": c.get("adapter", "-") + (f" r{lora.get('r')}" if c.get("adapter") != "full" and lora else ""),
        "data": data_hash(run), "lr": c.get("learning_rate"), "batch": _batch(c),
        "steps": run.steps[-1]["step"] if run.steps else 0, "train_loss": run.last("loss"), "val_loss": run.last("val_loss"),
        "after": _headline(after), "diagnoses": len(run.findings),
    }


def _batch(c: dict) -> str:
    if "micro_batch_size" not in c:
        return "-"
    return f"{c['micro_batch_size']}x{c.get('grad_accum', 1)}"


def _headline(result: dict) -> str:
    """The after-training number a run is judged by: exact match (EM), preference accuracy, mean reward or loss."""
    for key, label, pct in (("exact_match", "EM", True), ("preference_accuracy", "acc", True),
                            ("mean_reward", "reward", False), ("val_loss", "loss", False)):
        if result.get(key) is not None:
            return f"{label} {100 * result[key]:.1f}%" if pct else f"{label} {result[key]:.4f}"
    return "-"


@dataclass
class Comparison:
    runs: list[RunFiles]
    config: list[tuple[str, list[str]]]  # keys whose values differ: (key, value per run)
    data: list[tuple[str, list[str]]]  # data files and counts that differ
    metrics: list[tuple[str, list[str]]]  # numbers side by side
    png: Path | None = None


def differing(values_per_run: list[dict], skip: tuple[str, ...] = ()) -> list[tuple[str, list[str]]]:
    """Keys whose values are not the same in every run, with each run's value ('-' when absent)."""
    keys = sorted({k for values in values_per_run for k in values} - set(skip))
    rows = []
    for key in keys:
        shown = [_show(values.get(key, "-")) for values in values_per_run]
        if len(set(shown)) > 1:
            rows.append((key, shown))
    return rows


def _show(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def data_facts(run: RunFiles) -> dict[str, object]:
    """The data a run trained on: each file's SHA-256 (short) and its record counts."""
    out: dict[str, object] = {f"sha256 {Path(p).name}": h[:12] for p, h in (run.manifest.get("data_sha256") or {}).items()}
    for src, counts in (run.manifest.get("data_summary") or {}).items():
        out[f"records {Path(src).name}"] = counts.get("records", "-")
        out[f"kept {Path(src).name}"] = counts.get("kept", "-")
    return out


def metric_facts(run: RunFiles) -> dict[str, object]:
    """Final numbers of a run: last losses, before/after evaluation, throughput, diagnoses."""
    out: dict[str, object] = {"steps": run.steps[-1]["step"] if run.steps else 0, "status": run.status,
                              "train_loss (last)": run.last("loss"), "val_loss (last)": run.last("val_loss")}
    for label, result in (("before", run.before), ("after", run.after)):
        for key in EVAL_KEYS:
            if result and result.get(key) is not None:
                out[f"{key} {label}"] = result[key]
    speeds = sorted(m["tokens_per_s"] for m in run.steps if m.get("tokens_per_s"))
    if speeds:
        out["tokens/s (median)"] = speeds[len(speeds) // 2]
    out["diagnoses"] = ", ".join(sorted({f["code"] for f in run.findings})) or "none"
    return {k: ("-" if v is None else v) for k, v in out.items()}


def compare_runs(paths: list[str | Path], png: Path | None) -> Comparison:
    """What differs between runs' configs and data, their metrics side by side, and (with `png`)
    their loss curves overlaid in one picture."""
    if len(paths) < 2:
        raise TuneforgeError("runs compare: give two or more run folders, e.g. tuneforge runs compare runs/a runs/b")
    runs = [read_run(p) for p in paths]
    config = differing([flatten(r.config) for r in runs], skip=NOISE_KEYS)
    data = differing([data_facts(r) for r in runs])
    facts = [metric_facts(r) for r in runs]
    metrics = [(key, [_show(f.get(key, "-")) for f in facts]) for key in dict.fromkeys(k for f in facts for k in f)]
    if png is not None:
        from tuneforge.track.plots import overlay_curves

        png = overlay_curves({r.name: r.steps for r in runs}, png)
    return Comparison(runs, config, data, metrics, png)
