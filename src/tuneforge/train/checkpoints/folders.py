"""checkpoints/step-N folders: written aside, marked complete, renamed into place, listed, chosen.

A checkpoint is written into .tmp-step-N, fsynced, marked complete with its manifest, then renamed
into place, so a crash mid-save leaves the previous checkpoint as the newest complete one (R-RES-2).
A full disk removes the partial folder and says how much was needed; a damaged checkpoint is set
aside and the newest one that verifies is used instead.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
from pathlib import Path
from typing import Iterator

from tuneforge.errors import TuneforgeError
from tuneforge.train.checkpoints.manifest import COMPLETE, damage, write_manifest

_STEP_DIR = re.compile(r"^step-(\d+)$")
DAMAGED_PREFIX = "damaged-"
WRITTEN_LOG = "written.jsonl"  # checkpoints/written.jsonl: one line per checkpoint published, never pruned


class DiskFullError(TuneforgeError):
    pass


def _fsync_tree(folder: Path) -> None:
    """Files first, then their folders, deepest first (a sharded checkpoint has a dcp/ subfolder)."""
    for path in sorted(folder.rglob("*"), key=lambda p: (p.is_dir(), -len(p.parts))) + [folder]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def is_disk_full(err: BaseException) -> bool:
    """ENOSPC from Python, or from safetensors' Rust writer, which reports it only in its message."""
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, errno.EDQUOT)
    return "os error 28" in str(err) or "No space left on device" in str(err)


@contextlib.contextmanager
def disk_full_removes(tmp: Path, step: int, needed_bytes: int) -> Iterator[None]:
    """Around the writes of a checkpoint: on a full disk, remove the partial folder (the previous
    checkpoints stay as they are) and raise one line naming the folder and the bytes needed."""
    try:
        yield
    except Exception as err:
        if not is_disk_full(err):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(tmp.parent).free
        raise DiskFullError(
            f"{tmp.parent}: no space left to write checkpoint step-{step}: it needs about {needed_bytes:,} bytes "
            f"and {free:,} are free. The partial checkpoint was removed and the earlier ones are intact; free "
            "some space (or lower keep_last) and continue with --resume") from None


def step_folders(run_dir: Path, step: int) -> tuple[Path, Path]:
    """(temporary folder, final folder) of checkpoint step-N."""
    root = run_dir / "checkpoints"
    return root / f".tmp-step-{step}", root / f"step-{step}"


def start_folder(run_dir: Path, step: int) -> tuple[Path, Path]:
    """step_folders, the temporary one created empty."""
    tmp, final = step_folders(run_dir, step)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp, final


def read_state(ckpt: Path) -> dict:
    """The loop state saved with a checkpoint (step, data position, what the run was), without loading tensors."""
    return json.loads((ckpt / "state.json").read_text())


def publish(tmp: Path, final: Path, run_dir: Path, keep_last: int) -> None:
    """The end of every save: write the manifest, fsync, rename into place, note it in written.jsonl,
    prune to keep_last checkpoints."""
    write_manifest(tmp)
    _fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    with open(final.parent / WRITTEN_LOG, "a") as log:
        log.write(json.dumps({"step": int(final.name.removeprefix("step-"))}) + "\n")
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def written_steps(run_dir: Path) -> list[int]:
    """Every checkpoint step this run has published, in order, including those keep_last pruned since:
    a reader that lists the folders instead can miss one pruned between two of its looks."""
    try:
        lines = (run_dir / "checkpoints" / WRITTEN_LOG).read_text().splitlines()
    except FileNotFoundError:
        return []
    steps = []
    for line in lines:
        try:
            steps.append(int(json.loads(line)["step"]))
        except (ValueError, KeyError, TypeError):  # a line cut short by a crash mid-write
            continue
    return steps


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first; temporary or unmarked folders are never returned."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and (d / COMPLETE).is_file() and (d / "state.json").is_file():
            found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found)]


def newest_verified(run_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest complete checkpoint whose files are as written, and each newer one that is not,
    with what is wrong with it."""
    damaged = []
    for ckpt in reversed(list_checkpoints(run_dir)):
        why = damage(ckpt)
        if why is None:
            return ckpt, damaged
        damaged.append((ckpt, why))
    return None, damaged


def set_aside(ckpt: Path) -> Path:
    """Rename a damaged checkpoint out of the listing (kept for inspection), so that neither a resume
    nor pruning to keep_last counts it; a new save of its step writes a fresh folder."""
    aside = ckpt.with_name(DAMAGED_PREFIX + ckpt.name)
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(ckpt, aside)
    return aside
