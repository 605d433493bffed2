"""The completion marker of a checkpoint is its manifest: every file's size and CRC-32, written last.

A checkpoint is trusted only when every listed file is there with that size and checksum and parses
(safetensors header, JSON): a marked but damaged checkpoint (a bad disk, a copy cut short, a hand
edit) is found before it is loaded, not by a traceback halfway through. CRC-32 runs at some GB/s,
cheap beside the write itself.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

from safetensors import safe_open

COMPLETE = "COMPLETE"
_LEGACY = "ok"  # the marker of checkpoints written before manifests: their files are only parsed


def crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def write_manifest(folder: Path) -> None:
    """The completion marker: written after every other file of the checkpoint."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != COMPLETE)
    listed = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "crc32": crc32(p)} for p in files}
    (folder / COMPLETE).write_text(json.dumps({"files": listed}, indent=1) + "\n")


def _parses(path: Path) -> str | None:
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), "pt") as f:
                f.keys()
        elif path.suffix == ".json":
            json.loads(path.read_text())
    except Exception as err:  # safetensors raises its own error type for a bad header
        return f"{path.name} does not parse ({type(err).__name__}: {str(err)[:80]})"
    return None


def damage(folder: Path) -> str | None:
    """Why this checkpoint cannot be trusted, in a few words; None when every file is as written."""
    marker = (folder / COMPLETE).read_text()
    if marker.strip() == _LEGACY:
        listed = {str(p.relative_to(folder)): None for p in sorted(folder.rglob("*")) if p.is_file() and p.name != COMPLETE}
    else:
        try:
            listed = json.loads(marker)["files"]
        except (ValueError, KeyError, TypeError):
            return f"its {COMPLETE} marker is not a manifest"
    for name, want in listed.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if want is not None:
            size = path.stat().st_size
            if size != want["bytes"]:
                return f"{name} has {size} bytes, {want['bytes']} were written"
            if crc32(path) != want["crc32"]:
                return f"{name} differs from what was written (CRC-32)"
        if problem := _parses(path):
            return problem
    return None
