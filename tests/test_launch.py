"""`tuneforge launch`: the SkyPilot task SkyPilot itself reads back, and an sbatch script bash accepts."""

from __future__ import annotations

import subprocess

import pytest
import yaml
from conftest import memorise_records, write_jsonl

from tuneforge.config import load_config
from tuneforge.errors import ConfigError
from tuneforge.launch.run import launch
from tuneforge.plan.report import plan_config


@pytest.fixture
def config(tmp_path, tiny_models):
    write_jsonl(tmp_path / "data" / "train.jsonl", memorise_records(16))
    write_jsonl(tmp_path / "data" / "val.jsonl", memorise_records(4))
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({
        "base_model": str(tiny_models["llama"]), "datasets": [{"path": "data/train.jsonl"}],
        "validation": {"path": "data/val.jsonl"}, "max_seq_len": 64, "micro_batch_size": 4, "epochs": 1,
        "output_dir": "runs/tiny", "lora": {"r": 4, "alpha": 8}}))
    return path


def test_sky_task_loads_in_skypilot_with_resources_mounts_and_resume(config, tiny_models):
    import sky  # make setup installs it (see the Makefile)
    result = launch(config, "sky", gpu="H100:1", spot=True, start=False)
    task = sky.Task.from_yaml(str(result.files[0]))
    [resources] = list(task.resources)
    assert resources.accelerators == {"H100": 1} and resources.use_spot
    assert task.num_nodes == 1
    assert "/tuneforge/outputs" in task.storage_mounts  # output_dir on the bucket: checkpoints outlive the machine
    remote = load_config(result.files[1])
    assert remote.output_dir == "/tuneforge/outputs/tiny"
    uploads = {remote.datasets[0].path: config.parent / "data" / "train.jsonl",
               remote.validation.path: config.parent / "data" / "val.jsonl", remote.base_model: tiny_models["llama"]}
    for remote_path, local in uploads.items():  # every local file the run reads is uploaded
        assert task.file_mounts[remote_path] == str(local)
    assert "tuneforge train /tuneforge/config.yaml $resume" in task.run and "resume=--resume" in task.run
    assert "/tuneforge/outputs/tiny/checkpoints/step-" in task.run
    assert result.command[:3] == ["sky", "jobs", "launch"]  # spot: a managed job, restarted when preempted


def test_sky_task_without_gpu_takes_plans_cheapest_and_its_cost(config):
    import sky
    result = launch(config, "sky", nodes=2, start=False)
    expected = plan_config(load_config(config)).recommendation
    assert result.target.planned.device.name == expected.device.name
    assert f"{expected.cost:.3g}" in result.files[0].read_text().splitlines()[0]  # the one price table's cost
    task = sky.Task.from_yaml(str(result.files[0]))
    assert task.num_nodes == 2
    assert "torchrun" in task.run and "$SKYPILOT_NODE_RANK" in task.run and "$SKYPILOT_NODE_IPS" in task.run


def test_sbatch_script_passes_bash_n_and_runs_srun(config, tmp_path):
    result = launch(config, "slurm", gpu="A100-80GB:4", nodes=2, out=tmp_path / "job.sbatch", start=False)
    script = result.files[0].read_text()
    subprocess.run(["bash", "-n", str(result.files[0])], check=True)
    assert "#SBATCH --nodes=2" in script and "#SBATCH --gpus-per-node=4" in script
    assert "srun torchrun" in script and "--nproc-per-node 4" in script
    assert f'{tmp_path / "runs" / "tiny"}"/checkpoints/step-*"' in script and "resume=--resume" in script
    assert result.command == ["sbatch", str(tmp_path / "job.sbatch")]


def test_missing_data_file_is_named_before_anything_is_written(config, tmp_path):
    (tmp_path / "data" / "val.jsonl").unlink()
    with pytest.raises(ConfigError, match="val.jsonl: not found"):
        launch(config, "sky", gpu="T4", start=False)
    assert not (tmp_path / "run.sky.yaml").exists()
