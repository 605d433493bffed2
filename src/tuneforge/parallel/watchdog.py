"""A hang watchdog: no progress for T seconds -> every thread's Python stack is printed and the process exits.

A process stuck in a collective (a peer died, ranks took different paths) would otherwise wait for the
collective timeout, 30 minutes by default, saying nothing (R-DIST-4). The stacks show where each rank
waits; the non-zero exit makes torchrun end the other ranks and report the failure.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time

EXIT_CODE = 3
# faulthandler's own timer fires this much later, in case the Python thread below never gets to run
# (a C call holding the interpreter lock); it dumps the stacks and exits without the rank header.
BACKSTOP_S = 60


class Watchdog:
    """Started once; `pet()` after each step, evaluation or checkpoint; `stop()` at the end."""

    def __init__(self, seconds: float | None, rank: int):
        self.seconds, self.rank = seconds, rank
        self.last = time.monotonic()
        self.what = "start"
        self.done = threading.Event()
        if seconds is not None:
            threading.Thread(target=self._watch, name="tuneforge-watchdog", daemon=True).start()
            faulthandler.dump_traceback_later(seconds + BACKSTOP_S, exit=True)

    def pet(self, what: str = "step") -> None:
        self.last, self.what = time.monotonic(), what
        if self.seconds is not None:
            faulthandler.dump_traceback_later(self.seconds + BACKSTOP_S, exit=True)

    def stop(self) -> None:
        self.done.set()
        if self.seconds is not None:
            faulthandler.cancel_dump_traceback_later()

    def _watch(self) -> None:
        while not self.done.wait(min(5.0, self.seconds / 4)):
            idle = time.monotonic() - self.last
            if idle > self.seconds:
                print(f"\nerror: rank {self.rank}: nothing finished for {idle:.0f} s since the last {self.what} "
                      f"(distributed.watchdog_seconds: {self.seconds:g}); a process is probably stuck in a "
                      "collective. Python stacks of this rank:", file=sys.stderr, flush=True)
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                sys.stderr.flush()
                os._exit(EXIT_CODE)
