"""What a sweep leaves: the trials ranked (sweep.json, sweep.csv), the objective against each
parameter (objective.png), the best trial's whole config (best.yaml), and its top runs compared."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState
from rich.table import Table

from tuneforge.config import config_to_dict
from tuneforge.sweep.spec import SweepSpec, trial_config
from tuneforge.sweep.study import CONTINUES, ERROR, RUN_DIR, interrupted
from tuneforge.track.runs import Comparison, compare_runs

STATES = {TrialState.COMPLETE: "finished", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed",
          TrialState.RUNNING: "running", TrialState.WAITING: "queued"}


@dataclass
class SweepResult:
    spec: SweepSpec
    rows: list[dict]  # ranked: finished by the objective, then pruned, then failed
    seconds: float
    files: dict[str, Path] = field(default_factory=dict)
    comparison: Comparison | None = None  # `runs compare` over the top finished trials

    @property
    def best(self) -> dict | None:
        return self.rows[0] if self.rows and self.rows[0]["state"] == "finished" else None

    def top_runs(self) -> list[Path]:
        """The run folders of the best finished trials, best first (what `runs compare` shows)."""
        return [Path(r["run_dir"]) for r in self.rows if r["state"] == "finished"][: self.spec.top]


def trial_row(t: FrozenTrial) -> dict:
    """One trial as the table, the JSON and the CSV show it."""
    last = t.intermediate_values.get(t.last_step) if t.last_step is not None else None
    return {"trial": t.number, "state": STATES.get(t.state, t.state.name.lower()), "value": t.value,
            "last_intermediate": last, "steps_reported": t.last_step, "params": t.params,
            "seconds": round(t.duration.total_seconds(), 2) if t.duration else None,
            "run_dir": t.user_attrs.get(RUN_DIR), "gpu": t.user_attrs.get("gpu"), "continues_trial": t.user_attrs.get(CONTINUES),
            "error": t.user_attrs.get(ERROR)}


def ranked(trials: list[FrozenTrial], mode: str) -> list[dict]:
    """Finished trials best first, then pruned ones (by their last reported value), then failed ones.
    A trial that a killed sweep interrupted is shown once, as the trial that continued it."""
    superseded = {t.user_attrs.get(CONTINUES) for t in trials}
    gone = {t.number for t in interrupted(trials)}
    rows = [trial_row(t) for t in trials if t.number not in superseded]
    for r in rows:
        if r["trial"] in gone:
            r["state"] = "interrupted"
    sign = 1 if mode == "min" else -1
    order = {"finished": 0, "pruned": 1, "failed": 2}

    def key(r: dict):
        v = r["value"] if r["state"] == "finished" else r["last_intermediate"]
        return order.get(r["state"], 3), sign * v if isinstance(v, (int, float)) and math.isfinite(v) else math.inf
    return sorted(rows, key=key)


def write_table(rows: list[dict], params: list[str], json_path: Path, csv_path: Path, header: dict) -> None:
    json_path.write_text(json.dumps({**header, "trials": rows}, indent=1))
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["rank", "trial", "state", "value", *params, "seconds", "run_dir", "error"])
        for rank, r in enumerate(rows, 1):
            w.writerow([rank, r["trial"], r["state"], r["value"], *(r["params"].get(p) for p in params), r["seconds"],
                        r["run_dir"], r["error"] or ""])


def plot_objective(rows: list[dict], params: list[str], metric: str, path: Path) -> Path | None:
    """One panel per parameter: finished trials' objective, pruned trials' last reported value (x)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    fig = Figure(figsize=(3.4 * len(params), 3.2), dpi=100)
    axes = fig.subplots(1, len(params), squeeze=False)[0]
    for ax, p in zip(axes, params):
        for state, key, style in (("finished", "value", dict(marker="o", color="tab:blue", label="finished")),
                                  ("pruned", "last_intermediate", dict(marker="x", color="tab:gray", label="pruned"))):
            pts = [(r["params"][p], r[key]) for r in rows
                   if r["state"] == state and p in r["params"] and isinstance(r[key], (int, float))]
            if pts and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x, _ in pts):
                ax.scatter([x for x, _ in pts], [y for _, y in pts], **style)
                if all(x > 0 for x, _ in pts) and max(x for x, _ in pts) / min(x for x, _ in pts) >= 20:
                    ax.set_xscale("log")
            elif pts:
                ax.scatter([str(x) for x, _ in pts], [y for _, y in pts], **style)
        ax.set_xlabel(p)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    return path


def write_best(spec: SweepSpec, base_raw: dict, base_dir: Path, best: dict, path: Path) -> Path:
    """The best trial's whole config, every default spelled out, training into <output_dir>/best."""
    cfg = trial_config(spec, base_raw, base_dir, best["params"], Path(spec.output_dir) / "best", str(path))
    note = (f"# The best trial ({best['trial']}) of {spec.base}'s sweep, {spec.objective.metric} {best['value']:.6g}.\n"
            f"# `tuneforge train {path}` trains it again into {Path(spec.output_dir) / 'best'}.\n")
    path.write_text(note + yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return path


def summarize(spec: SweepSpec, study: optuna.Study, base_raw: dict, base_dir: Path, seconds: float) -> SweepResult:
    out = Path(spec.output_dir)
    rows = ranked(study.get_trials(), spec.objective.mode)
    params = list(spec.parameters)
    result = SweepResult(spec, rows, seconds)
    header = {"base": spec.base, "objective": spec.objective.model_dump(), "search": spec.search,
              "seconds_this_invocation": round(seconds, 1), "best": result.best}
    write_table(rows, params, out / "sweep.json", out / "sweep.csv", header)
    result.files = {"json": out / "sweep.json", "csv": out / "sweep.csv"}
    png = plot_objective(rows, params, spec.objective.metric, out / "objective.png")
    if png:
        result.files["plot"] = png
    if result.best:
        result.files["best"] = write_best(spec, base_raw, base_dir, result.best, out / "best.yaml")
    if len(result.top_runs()) >= 2:
        result.comparison = compare_runs(result.top_runs(), out / "compare.png")
    return result


def _num(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else ("-" if v is None else str(v))


def sweep_table(result: SweepResult) -> Table:
    """The ranked trials as the console shows them."""
    metric = result.spec.objective.metric
    table = Table(title=f"Sweep: {metric} ({result.spec.objective.mode}), best first", title_justify="left")
    params = list(result.spec.parameters)
    for col in ("rank", "trial", *params, metric, "state", "seconds", "run"):
        table.add_column(col, justify="left" if col in ("state", "run") else "right", overflow="fold")
    for rank, r in enumerate(result.rows, 1):
        state = r["state"] + (f" at step {r['steps_reported']}" if r["state"] == "pruned" else "")
        if r["error"]:
            state += ": " + r["error"].splitlines()[0][:80]
        table.add_row(str(rank), str(r["trial"]), *(_num(r["params"].get(p)) for p in params), _num(r["value"]),
                      state, _num(r["seconds"]), Path(r["run_dir"] or "-").name)
    return table
