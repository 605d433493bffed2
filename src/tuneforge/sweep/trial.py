"""One trial: an ordinary run in its own folder, trained in this process, its intermediate metric
handed to Optuna at every evaluation so that a bad trial can be pruned.

The hook is the loop's reporter, which already receives every step's record (validation metrics
included): the loop itself knows nothing of sweeps.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import optuna

from tuneforge.config import Config
from tuneforge.errors import RunStopped, TuneforgeError
from tuneforge.track.console import Reporter
from tuneforge.train.checkpoints import list_checkpoints
from tuneforge.train.loop import train


class Pruned(optuna.TrialPruned, RunStopped):
    """Optuna's pruning signal, which the run's trackers also read as a stop on purpose."""


class TrialReporter(Reporter):
    """A quiet reporter that reports `metric` to the trial at each evaluation and stops the run
    (optuna.TrialPruned) when the pruner says it is worse than the earlier trials were at that step."""

    def __init__(self, trial: optuna.Trial, metric: str):
        super().__init__(quiet=True)
        self.trial, self.metric = trial, metric

    def step(self, m: dict) -> None:
        value = m.get(self.metric)
        if isinstance(value, (int, float)) and math.isfinite(value):
            self.trial.report(float(value), m["step"])
            if self.trial.should_prune():
                raise Pruned(f"{self.metric} {value:.4g} at step {m['step']} is worse than the "
                                         "median of earlier trials there")


def result_value(manifest: dict, metric: str) -> float:
    """The objective from a finished run's run.json: its after-training evaluation, else its last
    logged value (final_metrics)."""
    for section in ("eval_after", "final_metrics"):
        value = (manifest.get(section) or {}).get(metric)
        if isinstance(value, (int, float)) and math.isfinite(value):
            return float(value)
    known = sorted({k for s in ("eval_after", "final_metrics") for k, v in (manifest.get(s) or {}).items()
                    if isinstance(v, (int, float))})
    raise TuneforgeError(f"objective.metric: the run wrote no number called {metric!r}; it has "
                         f"{', '.join(known) or 'none'} (a val_* metric needs validation: in the base config)")


def run_trial(cfg: Config, trial: optuna.Trial, metric: str) -> float:
    """Train the trial's run and return its objective. A trial that an earlier, killed sweep left
    half-done continues from its newest checkpoint instead of starting over."""
    run_dir = Path(cfg.output_dir)
    finished = run_dir / "run.json"
    if finished.is_file():  # killed after the run finished but before Optuna heard of it
        return result_value(json.loads(finished.read_text()), metric)
    manifest = train(cfg, resume=bool(list_checkpoints(run_dir)), reporter=TrialReporter(trial, metric))
    return result_value(manifest, metric)
