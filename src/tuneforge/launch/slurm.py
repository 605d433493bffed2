"""An sbatch script for one tuneforge run on a Slurm cluster (a shared file system: the config's own
paths are used as they are). One torchrun per node under srun; --requeue, and --resume whenever
output_dir already holds a checkpoint, so a preempted or timed-out job continues where it stopped."""

from __future__ import annotations

import math
import shlex
from pathlib import Path

from tuneforge.launch.target import Target


def time_limit(hours: float | None) -> str:
    """plan's estimate with a margin (x1.5 + 30 min), as Slurm's HH:MM:SS; 24 h when plan has none."""
    minutes = 24 * 60 if hours is None else math.ceil(hours * 90 + 30)
    return f"{minutes // 60:02d}:{minutes % 60:02d}:00"


def sbatch_script(name: str, config: Path, run_dir: Path, target: Target, partition: str | None = None) -> str:
    p = target.planned
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={name}",
        f"#SBATCH --nodes={target.nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={target.per_node}",
        f"#SBATCH --cpus-per-task={8 * target.per_node}",
        f"#SBATCH --time={time_limit(p.run_hours / target.processes if p else None)}",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        f"#SBATCH --output={config.parent / (name + '-%j.out')}",
        *([f"#SBATCH --partition={partition}"] if partition else []),
        f"# {target.describe()}",
        "set -euo pipefail",
        f"config={shlex.quote(str(config))}",
        'resume=""',
        f'if compgen -G {shlex.quote(str(run_dir))}"/checkpoints/step-*" > /dev/null; then resume=--resume; fi',
        'head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f'srun torchrun --nnodes "$SLURM_NNODES" --nproc-per-node {target.per_node} '
        '--rdzv-backend c10d --rdzv-endpoint "$head:29500" --rdzv-id "$SLURM_JOB_ID" '
        '-m tuneforge train "$config" $resume',
    ]
    return "\n".join(lines) + "\n"
