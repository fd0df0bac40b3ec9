"""What every child process of a node does first (the engine, the RPC server).

- :func:`take_stdout`: the READY handshake gets a private copy of stdout and fd 1 then points at
  stderr, so nothing llama.cpp or ggml print can ever be mistaken for it.
- :class:`StopFlag`: SIGTERM/SIGINT set it. The handler only appends to a list: a handler that
  took a lock (``Event.set``) would deadlock if a second signal arrived inside the first.
- :func:`die_with_parent`: SIGTERM when the node dies, even by SIGKILL. Each child asks for it
  itself as it starts its main (after its imports; a parent that died meanwhile is caught by the
  check that follows): the node is threaded, and code run between fork and exec
  (``preexec_fn``) can deadlock the child there (Python's subprocess documentation).
- :func:`stage`: a ``STAGE`` handshake line, so the node can say what a child was doing when
  it died before READY.
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


def die_with_parent() -> None:
    """Get SIGTERM when the node that started us dies (Linux; elsewhere the children's parent
    polls cover it). If the node died before this ran, leave now."""
    if PARENT_ENV not in os.environ:
        return  # not started by a node (a test, a user): nobody to follow
    try:
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid():
        os.kill(os.getpid(), signal.SIGTERM)


def stage(handshake: IO[str], what: str) -> None:
    handshake.write(f"STAGE {what}\n")
    handshake.flush()


def take_stdout() -> IO[str]:
    die_with_parent()
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
