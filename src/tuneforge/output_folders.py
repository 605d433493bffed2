"""Output folders: tuneforge writes only into folders it creates, and replaces only what it wrote.

Every output folder carries a small marker file naming the kind of output it is. An existing non-empty
folder is refused; `--overwrite` replaces it only when its marker says it is an earlier output of the
same kind. Outputs are written into a temporary sibling and renamed into place, so a failure never
leaves a half-written folder and never touches the one that was there.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tuneforge.errors import TuneforgeError

MARKER = ".tuneforge-output"


def mark(folder: Path, kind: str) -> None:
    """Say that tuneforge wrote `folder` as an output of this kind (what `--overwrite` checks)."""
    (folder / MARKER).write_text(f"{kind}\nWritten by tuneforge; `--overwrite` may replace this folder.\n")


def marked_kind(folder: Path) -> str | None:
    """The kind of output tuneforge wrote into `folder`, or None when it did not write it."""
    marker = folder / MARKER
    if not marker.is_file():
        return None
    lines = marker.read_text(errors="replace").splitlines()
    return lines[0].strip() if lines else None


def is_empty(folder: Path) -> bool:
    """Absent, or a folder with nothing in it."""
    return not folder.is_dir() or not any(folder.iterdir())


def check_out(out: Path, kind: str, overwrite: bool = False) -> None:
    """Refuse, before any work, an output folder this command may not write: a file, a non-empty folder
    (unless `overwrite` and it is an earlier tuneforge output of this kind)."""
    if out.exists() and not out.is_dir():
        raise TuneforgeError(f"--out {out}: a file is there, not a folder; choose a folder")
    if is_empty(out):
        return
    if not overwrite:
        raise TuneforgeError(f"--out {out}: the folder is not empty; choose a new one, or pass --overwrite "
                             f"to replace an earlier tuneforge {kind} output there")
    if marked_kind(out) != kind:
        raise TuneforgeError(f"--out {out}: the folder is not empty and is not a tuneforge {kind} output (it has no "
                             f"{MARKER} saying so); --overwrite replaces only those: choose another folder")


def check_apart(out: Path, source: Path) -> None:
    """Refuse an output folder that is the folder being read, holds it or lies inside it."""
    o, s = out.resolve(), source.resolve()
    if o == s or s in o.parents or o in s.parents:
        raise TuneforgeError(f"--out {out}: overlaps {source}, which this command reads (it is that folder, holds it "
                             "or lies inside it); choose a folder outside it")


@contextmanager
def output_folder(out: Path, kind: str, overwrite: bool = False) -> Iterator[Path]:
    """Yield a new temporary folder beside `out`; when the block succeeds it is marked and renamed to `out`.

    A failure removes only the temporary folder. `out` is checked before the work and again before the rename.
    """
    check_out(out, kind, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        mark(tmp, kind)
        _replace(tmp, out, kind, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _replace(tmp: Path, out: Path, kind: str, overwrite: bool) -> None:
    """Rename tmp to out; an earlier output of this kind there is moved aside first, then deleted."""
    check_out(out, kind, overwrite)
    if is_empty(out):
        os.replace(tmp, out)  # an empty folder is replaced by the rename itself
        return
    old = out.parent / f".old-{out.name}-{uuid.uuid4().hex[:8]}"
    os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
