"""One thread that runs the studio's slow requests (exports) after their HTTP request has answered, one at a
time, in the order they were asked for: a 50-second export never holds a request, and two never share the CPU.

What a task did is recorded by the task itself (in the store); a task still running when the studio stops is
abandoned with its thread (a daemon), and the next start finds its record unfinished.
"""

from __future__ import annotations

import queue
import sys
import threading
import traceback
from typing import Callable


class Background:
    """submit(fn) queues fn; stop() drops what has not started. Errors a task did not handle are printed."""

    def __init__(self, name: str = "tuneforge-background"):
        self.tasks: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.thread.start()

    def submit(self, task: Callable[[], None]) -> None:
        self.tasks.put(task)

    def stop(self) -> None:
        self.stopped.set()
        self.tasks.put(None)

    def _loop(self) -> None:
        while (task := self.tasks.get()) is not None and not self.stopped.is_set():
            try:
                task()
            except Exception:  # noqa: BLE001 - a task's own bug must not end the thread that runs the next one
                if not self.stopped.is_set():  # after stop(), a closed store is expected
                    traceback.print_exc(file=sys.stderr)
