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
- :func:`start_beat`: a ``BEAT`` line every ``ZSWARM_CHILD_BEAT_S`` seconds from a thread of its
  own, for as long as the process runs, so the node can tell a stopped or frozen child from a
  busy one (the supervisor kills a child whose beats stop). Only when the node asked for it.
- :data:`EX_CONFIG`: the exit status of a start-up mistake that no restart can fix (a model
  file that is not one, an address that cannot be bound); the node gives up on a child that
  exits with it before it was ever ready, and exits itself with the child's last line.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import IO, Callable

POLL_S = 0.05
EX_CONFIG = 78  # sysexits.h: "something was found in an unconfigured or misconfigured state"
BEAT_ENV = "ZSWARM_CHILD_BEAT_S"  # set by the node's supervisor: seconds between beats


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


def start_beat(handshake: IO[str], progress: Callable[[], str] | None = None) -> bool:
    """Write ``BEAT`` (``BEAT <progress()>`` with a progress function) to the handshake every
    ``$ZSWARM_CHILD_BEAT_S`` seconds, from a daemon thread. Returns False when not asked to.

    The line goes out in one ``os.write`` of a few bytes (atomic on a pipe, below PIPE_BUF), so it
    never splits another thread's handshake line, which also goes out whole at its flush. The
    thread only needs the GIL for microseconds, and model code releases it (ctypes), so a child
    busy loading or computing still beats; one that is stopped or stuck with the GIL held does not.
    """
    try:
        interval_s = float(os.environ.get(BEAT_ENV, ""))
    except ValueError:
        return False
    if not interval_s > 0:
        return False
    fd = handshake.fileno()

    def beat() -> None:
        while True:
            try:
                extra = progress() if progress is not None else ""
            except Exception:  # a beat without figures beats a child killed for a bug in them
                extra = ""
            try:
                os.write(fd, f"BEAT {extra}".rstrip().encode() + b"\n")
            except OSError:  # the node closed the pipe: it is gone, and the child follows it
                return
            time.sleep(interval_s)

    threading.Thread(target=beat, name="beat", daemon=True).start()
    return True


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

    def is_set(self) -> bool:
        return bool(self._signals)

    def wait(self, timeout_s: float) -> bool:
        """Sleep up to ``timeout_s``, waking early when set; returns whether it is set."""
        deadline = time.monotonic() + timeout_s
        while not self._signals and (left := deadline - time.monotonic()) > 0:
            time.sleep(min(POLL_S, left))
        return bool(self._signals)
