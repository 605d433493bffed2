"""Progress of long data work (tokenizing a corpus into shards): a live bar of bytes on a terminal, and a
line every tenth of the way in a log, so an hour of tokenizing never looks like a hang. Small inputs,
which take seconds, show nothing. Written to stderr: stdout stays clean for `--json` output."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

SHOWN_FROM = 64 << 20  # bytes: below this the work takes seconds on 2 cores (about 4 MB/s)


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
