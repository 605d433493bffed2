"""`tuneforge sweep`: run a sweep file's trials (one after another, or one per GPU), then rank them.

Trials are ordinary runs under <output_dir>/trial-NNN, trained in this process; a trial that fails
is recorded with its error and the sweep goes on. Several GPUs: this process keeps the lock and the
study, and starts one worker process per GPU (CUDA_VISIBLE_DEVICES), each taking the next trial
from the shared study until the budget is spent.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import optuna
import torch
from optuna.trial import TrialState

from tuneforge.config import Config
from tuneforge.errors import ConfigError, TuneforgeError
from tuneforge.plan.report import plan_config
from tuneforge.sweep.results import SweepResult, summarize
from tuneforge.sweep.spec import BudgetSpec, SweepSpec, check_trials, load_sweep, trial_config
from tuneforge.sweep.study import (ERROR, RUN_DIR, counted, open_study, remaining, requeue_interrupted, suggest,
                                   sweep_lock)
from tuneforge.sweep.trial import run_trial

PLANNED_COST = "planned_cost"


def planned_cost(cfg: Config, budget: BudgetSpec) -> float:
    """plan's estimated cost of one trial: on budget.gpu's row, or on the cheapest GPU that fits."""
    report = plan_config(cfg, [budget.gpu] if budget.gpu else None, budget.prices)
    row = report.recommendation if budget.gpu is None else next((r for r in report.rows if not r.device.is_cpu), None)
    if row is None or row.cost is None:
        raise ConfigError(f"budget.cost: plan has no priced GPU {budget.gpu or 'that fits'} for this config; set "
                          "budget.gpu to a priced row of `tuneforge plan`, or budget.prices to a price file")
    return row.cost


def _spent(trials) -> tuple[float, float]:
    """(seconds, planned cost) used by the trials so far, over every invocation of the sweep."""
    done = counted(trials)
    seconds = sum(t.duration.total_seconds() for t in done if t.duration is not None)
    return seconds, sum(t.user_attrs.get(PLANNED_COST, 0.0) for t in done)


def _budget_left(spec: SweepSpec, study: optuna.Study) -> str | None:
    """Why no further trial may start, or None while the budget allows one."""
    trials = study.get_trials(deepcopy=False)
    running = sum(t.state == TrialState.RUNNING for t in trials)
    if remaining(spec, trials) <= running:
        return "every trial has run (or is running)"
    seconds, cost = _spent(trials)
    if spec.budget.minutes is not None and seconds >= 60 * spec.budget.minutes:
        return f"budget.minutes ({spec.budget.minutes:g}) is spent ({seconds / 60:.1f} min of trials)"
    if spec.budget.cost is not None:
        last = max((t.user_attrs.get(PLANNED_COST, 0.0) for t in trials), default=0.0)
        if cost + last > spec.budget.cost:
            return f"budget.cost ({spec.budget.cost:g}) would be passed by one more trial ({cost:.2f} planned so far)"
    return None


def _shown(params: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def _objective(spec: SweepSpec, base_raw: dict, base_dir: Path,
               say: Callable[[str], None]) -> Callable[[optuna.Trial], float]:
    def objective(trial: optuna.Trial) -> float:
        values = suggest(trial, spec)
        run_dir = Path(trial.user_attrs.get(RUN_DIR) or Path(spec.output_dir) / f"trial-{trial.number:03d}")
        trial.set_user_attr(RUN_DIR, str(run_dir))
        if "CUDA_VISIBLE_DEVICES" in os.environ:  # which GPU a --gpus worker trained it on
            trial.set_user_attr("gpu", os.environ["CUDA_VISIBLE_DEVICES"])
        say(f"trial {trial.number} ({_shown(values)}): training in {run_dir}")
        try:
            cfg = trial_config(spec, base_raw, base_dir, values, run_dir, f"{spec.base} (trial {trial.number})")
            if spec.budget.cost is not None:
                trial.set_user_attr(PLANNED_COST, planned_cost(cfg, spec.budget))
            return run_trial(cfg, trial, spec.objective.metric)
        except optuna.TrialPruned:
            raise
        except Exception as err:  # recorded, and the sweep goes on (optimize's catch)
            trial.set_user_attr(ERROR, f"{type(err).__name__}: {err}"[:2000])
            raise
        finally:
            if torch.cuda.is_available():  # the next trial's model needs the memory this one's held
                gc.collect()
                torch.cuda.empty_cache()
    return objective


def _announce(say: Callable[[str], None], spec: SweepSpec) -> Callable:
    def callback(study: optuna.Study, t: optuna.trial.FrozenTrial) -> None:
        if t.state == TrialState.COMPLETE:
            what = f"{spec.objective.metric} {t.value:.4f}"
        elif t.state == TrialState.PRUNED:
            what = f"pruned at step {t.last_step}"
        else:
            what = f"failed: {t.user_attrs.get(ERROR, 'interrupted')}".splitlines()[0]
        say(f"trial {t.number} ({_shown(t.params)}): {what}")
        why = _budget_left(spec, study)
        if why:
            say(f"No further trial: {why}.")
            study.stop()
    return callback


def optimize(spec: SweepSpec, base_raw: dict, base_dir: Path, study: optuna.Study,
             say: Callable[[str], None]) -> None:
    """Take trials from the study until the grid, `trials` or the budget is used up."""
    why = _budget_left(spec, study)
    if why:
        say(f"No trial to run: {why}.")
        return
    study.optimize(_objective(spec, base_raw, base_dir, say), callbacks=[_announce(say, spec)], catch=(Exception,))


def _workers(sweep_file: Path, gpus: list[str]) -> int:
    """One worker process per GPU, each seeing only its own; the exit status of the first to fail."""
    procs = [subprocess.Popen([sys.executable, "-m", "tuneforge", "sweep", str(sweep_file), f"--worker={i + 1}"],
                              env={**os.environ, "CUDA_VISIBLE_DEVICES": gpu}) for i, gpu in enumerate(gpus)]
    codes = [p.wait() for p in procs]
    return next((c for c in codes if c), 0)


def run_sweep(sweep_file: str | Path, say: Callable[[str], None] = print, gpus: list[str] | None = None,
              worker: int | None = None) -> SweepResult | None:
    """Run (or continue) a sweep and write its results; worker N (started by --gpus) only runs trials."""
    sweep_file = Path(sweep_file)
    spec, base_raw, base_dir = load_sweep(sweep_file)
    if worker is not None:
        optimize(spec, base_raw, base_dir, open_study(spec, str(sweep_file), worker), say)
        return None
    check_trials(spec, base_raw, base_dir, str(sweep_file))
    started = time.perf_counter()
    with sweep_lock(spec):
        study = open_study(spec, str(sweep_file))
        for number in requeue_interrupted(spec):
            say(f"trial {number} was interrupted by a killed sweep: queued again, continuing in its own folder")
        if gpus and len(gpus) > 1:
            code = _workers(sweep_file, gpus)
            if code:
                raise TuneforgeError(f"sweep: a worker process exited with status {code}; its error is shown above. "
                                     "Run the same command again to continue the sweep")
        else:
            optimize(spec, base_raw, base_dir, study, say)
    return summarize(spec, study, base_raw, base_dir, time.perf_counter() - started)
