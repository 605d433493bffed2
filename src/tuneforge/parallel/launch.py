"""`tuneforge train CONFIG --nproc N`: start torchrun on this machine with N copies of the same command.

torchrun gives each process RANK, WORLD_SIZE, LOCAL_RANK and a rendezvous; `--standalone` picks a free
port on this machine, so two runs never collide. When any process fails torchrun stops the others and
exits non-zero, which this returns. Several machines: run torchrun (or srun) yourself, see docs/distributed.md.
"""

from __future__ import annotations

import os
import subprocess
import sys


def torchrun_command(nproc: int, tuneforge_args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "tuneforge", *tuneforge_args]


def launch_local(nproc: int, tuneforge_args: list[str]) -> int:
    """Run `tuneforge ARGS` in `nproc` processes under torchrun; returns its exit status.

    Each process gets an equal share of the CPU threads unless OMP_NUM_THREADS is set: N processes each
    using every core would slow all of them down.
    """
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return subprocess.run(torchrun_command(nproc, tuneforge_args), env=env).returncode
