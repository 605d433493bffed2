"""`tuneforge sweep` on tiny random models: ranking, best.yaml, pruning, and a killed sweep continued."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import memorise_records, write_jsonl
from optuna.trial import TrialState

from tuneforge.config import load_config
from tuneforge.errors import ConfigError
from tuneforge.sweep.run import run_sweep
from tuneforge.sweep.spec import load_sweep
from tuneforge.sweep.study import open_study
from tuneforge.track.trackers import Trackers

pytestmark = pytest.mark.usefixtures("one_thread")
SRC = Path(__file__).resolve().parent.parent / "src"


def write_sweep(tmp_path: Path, model_dir: Path, sweep: dict, steps: int = 2, **base) -> Path:
    """A base config (tiny model, `steps` steps, validation every step) and a sweep file over it."""
    data = write_jsonl(tmp_path / "train.jsonl", memorise_records(24))
    write_jsonl(tmp_path / "val.jsonl", memorise_records(4))
    raw = {"base_model": str(model_dir), "datasets": [{"path": data.name}], "validation": {"path": "val.jsonl"},
           "max_seq_len": 64, "micro_batch_size": 4, "max_steps": steps, "eval_every": 1, "learning_rate": 1e-2,
           "warmup_steps": 0, "device": "cpu", "precision": "fp32", "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
           "evaluation": {"before_after": False}, "output_dir": "unused", **base}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(raw))
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"base": "base.yaml", "output_dir": "sweep", **sweep}))
    return path


def test_grid_sweep_ranks_trials_and_writes_the_best_config(tmp_path, tiny_models):
    path = write_sweep(tmp_path, tiny_models["llama"], {
        "search": "grid", "objective": {"metric": "val_loss", "mode": "min"}, "prune": {"kind": "none"},
        "set": {"lora.alpha": 16}, "parameters": {"learning_rate": [1e-7, 3e-2], "lora.r": [2, 4]}})
    result = run_sweep(path, say=lambda _: None)
    rows = result.rows
    assert [r["state"] for r in rows] == ["finished"] * 4
    assert sorted((r["params"]["learning_rate"], r["params"]["lora.r"]) for r in rows) == [(1e-7, 2), (1e-7, 4), (3e-2, 2), (3e-2, 4)]
    values = [r["value"] for r in rows]
    assert values == sorted(values)
    # each value is the run's own: read back from its run.json
    for r in rows:
        assert json.loads((Path(r["run_dir"]) / "run.json").read_text())["final_metrics"]["val_loss"] == r["value"]
    assert rows[0]["params"]["learning_rate"] == 3e-2  # training beats no training
    best = load_config(tmp_path / "sweep" / "best.yaml")
    assert (best.learning_rate, best.lora.r) == (rows[0]["params"]["learning_rate"], rows[0]["params"]["lora.r"])
    assert best.lora.alpha == 16  # the sweep's `set` keys hold in every trial
    assert best.output_dir == str(tmp_path / "sweep" / "best")
    saved = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert saved["best"]["trial"] == rows[0]["trial"]
    assert (tmp_path / "sweep" / "sweep.csv").read_text().count("\n") == 5
    assert (tmp_path / "sweep" / "objective.png").stat().st_size > 0
    assert result.comparison is not None and len(result.comparison.runs) == 3


def test_tpe_sweep_prunes_a_trial_from_its_intermediate_metric(tmp_path, tiny_models, monkeypatch):
    # learning_rate 1e-7 barely moves val_loss, 5e-2 lowers it at every step: after the first finished trial,
    # any such trial is worse than the median at step 1 and is stopped there.
    path = write_sweep(tmp_path, tiny_models["llama"], {
        "search": "tpe", "trials": 6, "seed": 1, "prune": {"kind": "median", "startup_trials": 1},
        "parameters": {"learning_rate": [1e-7, 5e-2]}})
    statuses = []
    finish = Trackers.finish
    monkeypatch.setattr(Trackers, "finish", lambda self, facts, status: (statuses.append(status),
                                                                         finish(self, facts, status)))
    rows = run_sweep(path, say=lambda _: None).rows
    assert len(rows) == 6
    pruned = [r for r in rows if r["state"] == "pruned"]
    assert pruned, rows
    assert all(r["params"]["learning_rate"] == 1e-7 and r["steps_reported"] < 2 for r in pruned)
    # a pruned trial is an ordinary, unfinished run folder: no run.json, its steps in metrics.jsonl
    assert not (Path(pruned[0]["run_dir"]) / "run.json").exists()
    assert (Path(pruned[0]["run_dir"]) / "metrics.jsonl").is_file()
    # trackers hear that a pruned trial was stopped on purpose, not that it failed
    assert sorted(statuses) == sorted(["FINISHED"] * (6 - len(pruned)) + ["KILLED"] * len(pruned))


def test_killed_sweep_continues_without_running_a_trial_twice(tmp_path, tiny_models):
    path = write_sweep(tmp_path, tiny_models["llama"], {
        "search": "grid", "prune": {"kind": "none"}, "parameters": {"learning_rate": [1e-3, 1e-2, 3e-2]}},
        steps=3, save_every=1)
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    log = tmp_path / "sweep.log"
    with open(log, "w") as sink:  # a file, not a pipe: a full pipe would stall the sweep
        proc = subprocess.Popen([sys.executable, "-m", "tuneforge", "sweep", str(path)], env=env,
                                stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    out = tmp_path / "sweep"
    deadline = time.monotonic() + 300
    try:
        # kill -9 once the first trial has finished and the second has saved a checkpoint
        while not (list(out.glob("trial-000/run.json")) and list(out.glob("trial-001/checkpoints/step-*"))):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the sweep did not reach its second trial"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finished_before = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("trial-*/run.json")}
    spec, _, _ = load_sweep(path)
    states = [t.state for t in open_study(spec, str(path)).get_trials()]
    assert TrialState.RUNNING in states  # the kill left one trial half-done

    said: list[str] = []
    rows = run_sweep(path, say=said.append).rows
    assert any("interrupted" in line for line in said)
    assert [r["state"] for r in rows] == ["finished"] * 3
    assert sorted(r["params"]["learning_rate"] for r in rows) == [1e-3, 1e-2, 3e-2]  # each grid point once
    assert len({r["run_dir"] for r in rows}) == 3
    for name, mtime in finished_before.items():  # trials done before the kill were not run again
        assert (out / name / "run.json").stat().st_mtime_ns == mtime
    continued = next(r for r in rows if r["continues_trial"] is not None)
    assert Path(continued["run_dir"]).name == f"trial-{continued['continues_trial']:03d}"
    steps = [json.loads(line)["step"] for line in (Path(continued["run_dir"]) / "metrics.jsonl").read_text().splitlines()
             if '"step"' in line]
    assert set(steps) == {1, 2, 3}  # continued from its checkpoint (a fresh start would refuse the folder)


def test_a_grid_point_that_makes_an_invalid_config_fails_before_training(tmp_path, tiny_models):
    path = write_sweep(tmp_path, tiny_models["llama"], {"search": "grid", "parameters": {"lora.r": [4, -1]}})
    with pytest.raises(ConfigError, match=r"lora.r=-1"):
        run_sweep(path, say=lambda _: None)
    assert not (tmp_path / "sweep" / "study.db").exists()


def test_sweep_file_errors_name_the_key(tmp_path, tiny_models):
    path = write_sweep(tmp_path, tiny_models["llama"], {"search": "grid", "parameters": {
        "learning_rate": {"low": 1e-4, "high": 1e-2, "log": True}}})
    with pytest.raises(ConfigError, match=r"search: grid needs a list of values for every parameter; learning_rate"):
        load_sweep(path)
    path.write_text(yaml.safe_dump({"base": "base.yaml", "output_dir": "s", "search": "tpe",
                                    "parameters": {"learning_rate": [1e-3]}}))
    with pytest.raises(ConfigError, match="needs trials"):
        load_sweep(path)
    path.write_text(yaml.safe_dump({"base": "base.yaml", "output_dir": "s", "parameter": {"lora.r": [4]}}))
    with pytest.raises(ConfigError, match="parameter: unknown key; did you mean parameters"):
        load_sweep(path)


def test_cost_budget_from_plan_stops_the_sweep_before_a_trial_would_pass_it(tmp_path, tiny_models):
    from tuneforge.plan.report import plan_config
    from tuneforge.sweep.spec import trial_config

    sweep = {"search": "random", "trials": 4, "prune": {"kind": "none"}, "parameters": {"lora.r": [2, 4]},
             "budget": {"cost": 1.0, "gpu": "T4"}}
    path = write_sweep(tmp_path, tiny_models["llama"], sweep)
    spec, base_raw, base_dir = load_sweep(path)
    cfg = trial_config(spec, base_raw, base_dir, {"lora.r": 2}, tmp_path / "x", "test")
    one = next(r for r in plan_config(cfg, ["T4"]).rows if r.device.name == "T4").cost
    path.write_text(yaml.safe_dump({"base": "base.yaml", "output_dir": "sweep", **sweep,
                                    "budget": {"cost": 1.5 * one, "gpu": "T4"}}))  # room for one trial, not two
    said: list[str] = []
    rows = run_sweep(path, say=said.append).rows
    assert len(rows) == 1 and rows[0]["state"] == "finished"
    assert any("budget.cost" in line for line in said)
