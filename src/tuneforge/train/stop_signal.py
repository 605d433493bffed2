"""SIGUSR1 asks a training run to finish the step it is in, save a checkpoint and stop, so that `--resume`
continues with no step lost (the studio's pause sends it). Ctrl-C still stops at once, keeping only the
checkpoints already written.

Only a single-process run listens: each process of a distributed run would see the signal at another
step, so there the signal keeps its default action (the process ends at once; `--resume` continues from the
newest checkpoint written before).
"""

from __future__ import annotations

import signal
import threading

SAVE_AND_STOP = getattr(signal, "SIGUSR1", None)  # None on Windows: nothing listens


class StopRequest:
    """`asked` turns true when the signal arrives; the loop reads it at each step boundary."""

    def __init__(self, listen: bool = True):
        self.asked = False
        self._previous = None
        self._listening = (listen and SAVE_AND_STOP is not None
                           and threading.current_thread() is threading.main_thread())  # Python's rule for handlers
        if self._listening:
            self._previous = signal.signal(SAVE_AND_STOP, self._ask)

    def _ask(self, signum, frame) -> None:
        self.asked = True  # only a flag: the handler runs between two bytecodes of the step in progress

    def close(self) -> None:
        """Give the signal back its earlier handler (the run is over)."""
        if self._listening:
            signal.signal(SAVE_AND_STOP, self._previous)
            self._listening = False
