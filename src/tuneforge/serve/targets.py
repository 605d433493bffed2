"""What `tuneforge serve TARGET` names: a run folder, or a model folder (exported, merged or downloaded)."""

from __future__ import annotations

from pathlib import Path


def is_run_folder(target: Path) -> bool:
    """run.json beside final/; a merged export also carries its run's run.json (R-MRG-2), but beside its own
    config.json, and is served as the model folder it is."""
    return (target / "run.json").is_file() and not (target / "config.json").is_file()
