"""Turn-taking between requests: the engine runs one decoding step at a time, handed out in arrival order."""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from collections.abc import Iterator


class Turns:
    """A lock granted first come, first served. A request that takes one turn per token goes to the back of
    the line after each, so requests interleave token by token and a short one never waits for a long one to
    end (a plain threading.Lock often goes straight back to the thread that just released it)."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._line: deque[object] = deque()

    @contextlib.contextmanager
    def turn(self) -> Iterator[None]:
        me = object()
        with self._changed:
            self._line.append(me)
            try:
                self._changed.wait_for(lambda: self._line[0] is me)
            except BaseException:
                self._line.remove(me)
                self._changed.notify_all()
                raise
        try:
            yield
        finally:
            with self._changed:
                self._line.popleft()
                self._changed.notify_all()
