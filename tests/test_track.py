"""Trackers: every back-end read back with its own client; a failing back-end never ends the run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_train import QUIET, make_cfg

from tuneforge.track.metrics import read_metrics
from tuneforge.track.trackers import JsonlTracker, TensorBoardTracker, Trackers, build_trackers, flatten
from tuneforge.train.loop import train

SRC = Path(__file__).resolve().parents[1] / "src"


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, tiny_models):
    """One short run logged to every back-end (W&B offline), shared by the tests that read them back."""
    tmp = tmp_path_factory.mktemp("tracked")
    cfg = make_cfg(tmp, tiny_models["llama"], max_steps=4, eval_every=2,
                   track={"to": ["tensorboard", "mlflow", "wandb"], "wandb_mode": "offline", "project": "tf-test"},
                   **{"evaluation.before_after": False})
    manifest = train(cfg, reporter=QUIET)
    return tmp / "run", manifest, cfg


def test_tensorboard_event_reader_reads_the_scalars_back(tracked_run):
    run_dir, _, _ = tracked_run
    logged = read_metrics(run_dir / "metrics.jsonl")
    tb = tensorboard_scalars(run_dir / "tensorboard")
    assert [s for s, _ in tb["loss"]] == [m["step"] for m in logged] == [1, 2, 3, 4]
    assert [v for _, v in tb["loss"]] == pytest.approx([m["loss"] for m in logged], rel=1e-6)
    assert [s for s, _ in tb["val_loss"]] == [2, 4]
    assert {"lr", "grad_norm", "tokens_per_s"} <= set(tb)


def test_tensorboard_holds_the_config_as_hyper_parameters_and_the_final_facts(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, manifest, _ = tracked_run
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    assert "_hparams_/session_start_info" in acc.PluginTagToContent("hparams")
    facts = [e for e in acc.Tensors("facts/text_summary")]
    assert [e.step for e in facts] == [0, 4]  # at the start, and the final facts once finished
    final = facts[-1].tensor_proto.string_val[0].decode()
    assert '"status": "FINISHED"' in final and manifest["versions"]["torch"] in final


def test_mlflow_client_finds_run_params_metrics_and_facts(tracked_run):
    from mlflow.tracking import MlflowClient

    run_dir, manifest, _ = tracked_run
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir.parent / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("tf-test").experiment_id])
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    assert run.data.params["lora.r"] == "8" and float(run.data.params["learning_rate"]) == 5e-3
    history = client.get_metric_history(run.info.run_id, "loss")
    logged = read_metrics(run_dir / "metrics.jsonl")
    history = sorted((m.step, m.value) for m in history)
    assert [s for s, _ in history] == [m["step"] for m in logged]
    assert [v for _, v in history] == pytest.approx([m["loss"] for m in logged])
    tags = run.data.tags
    assert tags["facts.seed"] == "42"
    assert tags["facts.versions.torch"] == manifest["versions"]["torch"]
    [(path, sha)] = manifest["data_sha256"].items()
    assert tags[f"facts.data_sha256.{path}"] == sha
    assert tags["facts.artefacts.final"] == str(run_dir / "final")


def test_wandb_offline_writes_a_run_folder(tracked_run):
    run_dir, _, _ = tracked_run
    [folder] = list((run_dir / "wandb").glob("offline-run-*"))
    assert list(folder.glob("*.wandb")), "the offline run's history file is missing"
    ids = json.loads((run_dir / "trackers.json").read_text())
    assert folder.name.endswith(ids["wandb"])


class Broken:
    """A back-end whose server is gone: every call raises."""

    name = "broken"

    def __init__(self):
        self.calls = 0

    def _fail(self, *args):
        self.calls += 1
        raise ConnectionError("server gone")

    start = log = finding = rewind = finish = _fail


def test_a_failing_backend_is_reported_once_and_the_others_go_on(tmp_path):
    warnings: list[str] = []
    broken = Broken()
    tb = TensorBoardTracker(tmp_path)
    trackers = Trackers([broken, JsonlTracker(tmp_path, None), tb], warnings.append)
    trackers.start({"lr": 1}, {})
    for step in (1, 2, 3):
        trackers.log({"step": step, "loss": 1.0 / step, "trained_tokens": 5})
    trackers.finish({}, "FINISHED")
    assert len(warnings) == 1 and "broken" in warnings[0] and "server gone" in warnings[0]
    assert broken.calls == 1
    assert [m["step"] for m in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    assert [s for s, _ in tensorboard_scalars(tmp_path / "tensorboard")["loss"]] == [1, 2, 3]


def test_a_backend_that_cannot_start_does_not_stop_training(tmp_path, tiny_models):
    """A tracking URI MLflow refuses: one warning, and the run finishes with its metrics.jsonl."""
    from tuneforge.track.console import Reporter
    from rich.console import Console

    console = Console(record=True, width=200)
    cfg = make_cfg(tmp_path, tiny_models["llama"], max_steps=2, track={"to": ["mlflow"], "mlflow_uri": "nosuch://x"},
                   **{"evaluation.before_after": False})
    manifest = train(cfg, reporter=Reporter(console))
    assert manifest["steps"] == 2
    assert console.export_text().count("tracker mlflow could not start") == 1
    assert len(read_metrics(tmp_path / "run" / "metrics.jsonl")) == 2


def test_a_step_with_no_trained_token_is_never_logged_as_loss_zero(tmp_path):
    """R-DATA-3: its loss is absent (null in metrics.jsonl, no point in TensorBoard), not 0.0."""
    trackers = Trackers([JsonlTracker(tmp_path, None), TensorBoardTracker(tmp_path)], print)
    trackers.log({"step": 1, "loss": 2.5, "trained_tokens": 7})
    trackers.log({"step": 2, "loss": 0.0, "trained_tokens": 0})
    trackers.log({"step": 3, "loss": float("nan"), "trained_tokens": 3})
    trackers.finish({}, "FINISHED")
    logged = read_metrics(tmp_path / "metrics.jsonl")
    assert [m["loss"] for m in logged] == [2.5, None, None]
    assert tensorboard_scalars(tmp_path / "tensorboard")["loss"] == [(1, 2.5)]


def test_missing_tracker_package_is_a_config_error_naming_the_extra():
    """Run without site-packages, where wandb is really absent."""
    code = ("import sys; sys.path.insert(0, %r)\n"
            "from tuneforge.track.trackers import require_packages\n"
            "require_packages(['jsonl', 'wandb'])") % str(SRC)
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True)
    assert out.returncode != 0
    assert "ConfigError" in out.stderr and "tuneforge[wandb]" in out.stderr and "track.to" in out.stderr


def test_jsonl_is_on_even_when_not_listed(tmp_path, tiny_models):
    cfg = make_cfg(tmp_path, tiny_models["llama"], track=["tensorboard"])
    trackers = build_trackers(cfg, tmp_path / "r", None, print)
    assert [b.name for b in trackers.backends] == ["jsonl", "tensorboard"]
    trackers.finish({}, "KILLED")


def test_config_is_logged_as_flat_hyper_parameters():
    flat = flatten({"lora": {"r": 8, "target_modules": ["q", "v"]}, "lr": 1e-3, "grpo": None})
    assert flat == {"lora.r": 8, "lora.target_modules": '["q", "v"]', "lr": 1e-3, "grpo": None}


def test_wandb_mode_is_offline_without_a_key(tmp_path, monkeypatch):
    from tuneforge.track.trackers import wandb_mode

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    assert wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode("auto") == "online"
    assert wandb_mode("offline") == "offline"
