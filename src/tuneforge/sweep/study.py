"""The Optuna study behind a sweep: samplers, pruner, the SQLite file, and what a killed sweep left.

The study lives in <output_dir>/study.db, so running the same sweep file again continues it. A lock
file held for the whole sweep (released by the OS even on kill -9) tells a live sweep from a dead one:
once the lock is ours, any trial still marked RUNNING belonged to a sweep that was killed. Such a trial
is marked FAIL (it never finished) and queued again with the same values and the same run folder, so
it continues from its newest checkpoint: no trial is run twice, none is lost.
"""

from __future__ import annotations

import fcntl
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import optuna
from optuna.trial import FrozenTrial, TrialState

from tuneforge.errors import ConfigError, TuneforgeError
from tuneforge.sweep.spec import RangeSpec, SweepSpec

STUDY_NAME = "sweep"
CONTINUES = "continues_trial"  # user attribute of a trial queued to finish an interrupted one
ERROR = "error"  # user attribute of a trial that failed: the error's text
RUN_DIR = "run_dir"


def sampler_for(spec: SweepSpec, offset: int = 0) -> optuna.samplers.BaseSampler:
    """The search's sampler, its seed moved on by `offset`: a continued sweep, or a second worker, would
    otherwise draw the very points the first invocation drew."""
    seed = spec.seed + offset
    if spec.search == "grid":
        return optuna.samplers.GridSampler({k: v for k, v in spec.parameters.items()}, seed=seed)
    if spec.search == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def pruner_for(spec: SweepSpec) -> optuna.pruners.BasePruner:
    if spec.prune.kind == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=spec.prune.startup_trials,
                                       n_warmup_steps=spec.prune.warmup_steps)


def suggest(trial: optuna.Trial, spec: SweepSpec) -> dict:
    """This trial's value of every parameter (Optuna's sampler chooses; grid points are lists' values)."""
    values = {}
    for key, space in spec.parameters.items():
        if isinstance(space, list):
            values[key] = trial.suggest_categorical(key, space)
        elif space.type == "int":
            values[key] = trial.suggest_int(key, int(space.low), int(space.high), log=space.log,
                                            step=int(space.step or 1))
        else:
            values[key] = trial.suggest_float(key, space.low, space.high, log=space.log, step=space.step)
    return values


def study_path(spec: SweepSpec) -> Path:
    return Path(spec.output_dir) / "study.db"


def storage_url(spec: SweepSpec) -> str:
    return f"sqlite:///{study_path(spec)}"


def open_study(spec: SweepSpec, sweep_file: str, worker: int = 0) -> optuna.Study:
    """The sweep's study, created or continued; a study made from a different search is refused.
    The sampler's seed is the file's, moved on by the trials already run and by the worker's index."""
    Path(spec.output_dir).mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # the sweep prints its own line per trial
    study = optuna.create_study(storage=storage_url(spec), study_name=STUDY_NAME,
                                sampler=sampler_for(spec), pruner=pruner_for(spec),
                                direction="minimize" if spec.objective.mode == "min" else "maximize",
                                load_if_exists=True)
    search = json.loads(json.dumps({"search": spec.search, "objective": spec.objective.model_dump(), "set": spec.set,
                                    "parameters": {k: v.model_dump() if isinstance(v, RangeSpec) else v
                                                   for k, v in spec.parameters.items()}}))
    earlier = study.user_attrs.get("search")
    if earlier is None:
        study.set_user_attr("search", search)
    elif earlier != search:
        raise ConfigError(f"{sweep_file}: search, objective, set or parameters changed since {study_path(spec)} was "
                          f"started ({earlier} then); set a new output_dir, or put the file back as it was")
    study.sampler = sampler_for(spec, len(study.get_trials(deepcopy=False)) + 100_003 * worker)
    return study


@contextmanager
def sweep_lock(spec: SweepSpec) -> Iterator[None]:
    """One sweep at a time per output_dir; the OS drops the lock when its process dies."""
    path = Path(spec.output_dir) / "sweep.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise TuneforgeError(f"output_dir: another `tuneforge sweep` (pid {f.read().strip() or '?'}) is running "
                                 f"on {spec.output_dir}; wait for it, or stop it and run this again to continue") from None
        f.truncate(0)
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def interrupted(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """Trials that never finished (killed while RUNNING, or interrupted by Ctrl-C: FAIL with no error
    recorded) and that no later trial continues yet."""
    continued = {t.user_attrs.get(CONTINUES) for t in trials}
    return [t for t in trials if t.number not in continued and (
        t.state == TrialState.RUNNING or (t.state == TrialState.FAIL and ERROR not in t.user_attrs))]


def requeue_interrupted(spec: SweepSpec) -> list[int]:
    """Mark what a killed sweep left RUNNING as FAIL and queue each again, same values, same folder.

    Call with the lock held. The state is set through a study with a plain sampler, since the grid
    sampler would otherwise count the grid as done and ask the (not running) optimisation to stop.
    """
    plain = optuna.load_study(study_name=STUDY_NAME, storage=storage_url(spec), sampler=optuna.samplers.RandomSampler())
    queued = []
    for t in interrupted(plain.get_trials(deepcopy=False)):
        if t.state == TrialState.RUNNING:
            plain.tell(t.number, state=TrialState.FAIL)
        plain.enqueue_trial(t.params, user_attrs={CONTINUES: t.number, RUN_DIR: t.user_attrs.get(RUN_DIR)})
        queued.append(t.number)
    return queued


def counted(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The trials that used up the budget: finished, pruned or failed with an error (an interrupted
    trial is counted once, as the trial that continues it)."""
    return [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
            or (t.state == TrialState.FAIL and ERROR in t.user_attrs)]


def remaining(spec: SweepSpec, trials: list[FrozenTrial]) -> int:
    """Trials still to run: the grid points not yet done, or `trials` less those counted."""
    done = counted(trials)
    if spec.search == "grid":
        seen = {json.dumps(t.params, sort_keys=True) for t in done}
        left = sum(json.dumps(p, sort_keys=True) not in seen for p in spec.grid())
        return min(left, spec.trials - len(done)) if spec.trials else left
    return max(0, spec.trials - len(done))
