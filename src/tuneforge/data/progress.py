"""Progress of long data work (tokenizing a corpus into shards, preparing or checking record files): a live
bar of bytes on a terminal, and a line every tenth of the way in a log, so an hour of work never looks like
a hang. Small inputs, which take seconds, show nothing. Written to stderr: stdout stays clean for `--json`
output."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

SHOWN_FROM = 64 << 20  # bytes: below this the work takes seconds on 2 cores (about 4 MB/s)
STEP = 1 << 20  # bytes a reader moves on before it tells: a call per line would cost more than the line


def _size(n: float) -> str:
    return f"{n / 2**30:.2f} GB" if n >= 2**30 else f"{n / 2**20:.0f} MB"


@contextmanager
def byte_progress(label: str, total: int, console: Console | None = None) -> Iterator[Callable[[int], None]]:
    """Yields `advance(n_bytes)`; shows `label` with the share of `total` bytes done."""
    console = console or Console(file=sys.stderr)
    if total < SHOWN_FROM:
        yield lambda n: None
        return
    if console.is_terminal:
        with Progress(TextColumn(label), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
                      console=console, transient=True) as bar:
            task = bar.add_task(label, total=total)
            yield lambda n: bar.advance(task, n)
        return
    done, tenth = 0, 0

    def advance(n: int) -> None:
        nonlocal done, tenth
        done += n
        while done * 10 >= (tenth + 1) * total and tenth < 10:
            tenth += 1
            console.print(f"{label}: {10 * tenth}% ({_size(min(done, total))} of {_size(total)})",
                          markup=False, highlight=False)

    yield advance


def size_of(path: str | Path) -> int:
    """Bytes of a data file, or of every file in a folder (a saved `datasets` folder); 0 when it is missing
    (reading it then says so, naming it)."""
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size if path.is_file() else 0


@contextmanager
def files_progress(verb: str, paths: list[str | Path]) -> Iterator[Callable[[int], None]]:
    """`byte_progress` over every file of a run: "Preparing 2 file(s)" and their bytes together."""
    with byte_progress(f"{verb} {len(paths)} file(s)", sum(size_of(p) for p in paths)) as advance:
        yield advance


def by_position(advance: Callable[[int], None], total: int) -> Callable[[int | None], None]:
    """`at(position)` for a reader that knows how far into its `total` bytes it is: `advance` hears the bytes
    moved on (never a step back, never past `total`), STEP at least at a time; `at(None)` at the end moves
    to `total`, so a run's progress ends at exactly its files' size whatever each reader could tell."""
    told = 0

    def at(position: int | None) -> None:
        nonlocal told
        position = total if position is None else min(position, total)
        if position - told >= STEP or (position == total and position > told):
            advance(position - told)
            told = position

    return at
