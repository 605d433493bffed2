"""`tuneforge launch`: write the SkyPilot task (or sbatch script) for a config, show plan's estimate,
and start it when the tool is installed (else print the command that would)."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

from tuneforge.config import config_to_dict, load_config
from tuneforge.errors import TuneforgeError
from tuneforge.launch.remote import remote_config
from tuneforge.launch.sky import sky_task, task_yaml
from tuneforge.launch.slurm import sbatch_script
from tuneforge.launch.target import Target, choose_target


@dataclass
class Launch:
    target: Target
    files: list[Path]  # what was written: the task (or script) first
    command: list[str]  # what starts it
    started: bool = False


def _name(config: Path) -> str:
    """A cluster/job name SkyPilot and Slurm accept: lower case, digits and dashes."""
    return "tuneforge-" + (re.sub(r"[^a-z0-9-]+", "-", config.stem.lower()).strip("-") or "run")


def launch(config: str | Path, on: str, gpu: str | None = None, spot: bool = False, nodes: int = 1,
           out: str | Path | None = None, bucket: str | None = None, partition: str | None = None,
           prices: str | None = None, overrides: list[str] | None = None, start: bool = True) -> Launch:
    config = Path(config).resolve()
    cfg = load_config(config, overrides)
    target = choose_target(cfg, gpu, nodes, prices)
    name = _name(config)
    if on == "slurm":
        path = Path(out) if out else config.with_name(f"{config.stem}.sbatch")
        if overrides:  # the job must train what was checked here: the overridden config beside the script
            config = path.with_name(f"{path.stem}.config.yaml")
            config.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        path.write_text(sbatch_script(name, config, Path(cfg.output_dir), target, partition))
        command, files = ["sbatch", str(path)], [path]
    elif on == "sky":
        path = Path(out) if out else config.with_name(f"{config.stem}.sky.yaml")
        remote = remote_config(cfg, Path(cfg.output_dir).name)
        remote_file = path.with_name(f"{path.stem}.config.yaml")
        remote_file.write_text(yaml.safe_dump(remote.config, sort_keys=False))
        task = sky_task(name, remote, remote_file.resolve(), target, spot, bucket or f"{name}-outputs")
        path.write_text(f"# {target.describe()}\n" + task_yaml(task))
        # spot: a managed job, which SkyPilot restarts on another machine when the first is taken back
        command = ["sky", "jobs", "launch", "-n", name, str(path)] if spot else ["sky", "launch", "-c", name, str(path)]
        files = [path, remote_file]
    else:
        raise TuneforgeError(f"--on {on}: expected sky or slurm")
    result = Launch(target, files, command)
    if start and shutil.which(command[0]):
        code = subprocess.run(command).returncode
        if code:
            raise TuneforgeError(f"`{' '.join(command)}` failed (exit status {code}); its message is above. "
                                 f"The files are written: fix the cause and run that command again")
        result.started = True
    return result
