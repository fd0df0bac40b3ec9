"""What every child process of a node does first (the engine, the RPC server).

- :func:`take_stdout`: the READY handshake gets a private copy of stdout and fd 1 then points at
  stderr, so nothing llama.cpp or ggml print can ever be mistaken for it.
- :class:`StopFlag`: SIGTERM/SIGINT set it. The handler only appends to a list: a handler that
  took a lock (``Event.set``) would deadlock if a second signal arrived inside the first.
"""

from __future__ import annotations

import os
import signal
import time
from typing import IO

POLL_S = 0.05


PARENT_ENV = "ZSWARM_PARENT_PID"  # set by the node's supervisor for each child


def parent_pid() -> int:
    """The node that started us. From the environment when the supervisor set it: reading
    getppid() at start-up would record 1 if the node had already died, and never notice."""
    try:
        return int(os.environ[PARENT_ENV])
    except (KeyError, ValueError):
        return os.getppid()


def take_stdout() -> IO[str]:
    handshake = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    os.environ.setdefault("GGML_NO_BACKTRACE", "1")  # an abort must not attach gdb to print a backtrace
    return handshake


class StopFlag:
    def __init__(self) -> None:
        self._signals: list[int] = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, _frame: self._signals.append(signum))

    def set(self) -> None:
        self._signals.append(0)

    def is_set(self) -> bool:
        return bool(self._signals)

    def wait(self, timeout_s: float) -> bool:
        """Sleep up to ``timeout_s``, waking early when set; returns whether it is set."""
        deadline = time.monotonic() + timeout_s
        while not self._signals and (left := deadline - time.monotonic()) > 0:
            time.sleep(min(POLL_S, left))
        return bool(self._signals)
