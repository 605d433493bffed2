"""User-facing errors: each says where (file, line or key), what was wrong and what to do."""

from __future__ import annotations

from pathlib import Path


class TuneforgeError(Exception):
    """An error meant for the user; the CLI prints it without a traceback."""


class ConfigError(TuneforgeError):
    pass


class DataError(TuneforgeError):
    pass


class ModelError(TuneforgeError):
    pass


class TrainingError(TuneforgeError):
    pass


class RunStopped(Exception):
    """Raised to end a run on purpose before its last step (a pruned sweep trial): trackers record the run
    as KILLED, as after Ctrl-C, not FAILED."""


def read_utf8(path: Path, error: type[TuneforgeError], advice: str) -> str:
    """A text file's contents (a leading BOM dropped); bytes that are not UTF-8 are `error`, naming
    the file, the line and the byte, then `advice`."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise error(f"{path}:{line}: not valid UTF-8 (byte {err.start + 1} of the file); {advice}") from None
