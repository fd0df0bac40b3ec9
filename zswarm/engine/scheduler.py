"""The engine's request queue: accepted requests (:class:`Job`), waiting for a slot or running.

Owns :class:`Scheduler` (bounded waiting queue, duplicate ids, cancel, close) and the per-request
stop flag with its :class:`Interrupted` exception. The IO thread offers and cancels, slot threads
take and finish; everything here is thread-safe. It must never touch the socket or a model (no
zmq, no llama_cpp): replies are the caller's business.
"""

from __future__ import annotations

import collections
import threading
import time

from .. import wire


class Interrupted(Exception):
    """A running request must end now; ``code`` is its wire Fail code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


_STOP_MESSAGES = {"cancelled": "cancelled by the client", "engine_down": "the engine is stopping"}


class Job:
    """One accepted GenRequest and the flag that interrupts it."""

    def __init__(self, route: list[bytes], req: wire.GenRequest):
        self.route = route
        self.req = req
        self._stop = threading.Event()
        self.stop_code = ""
        # Filled by the slot's Llama while it runs (see _Model); read by the same slot thread.
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cached_tokens = 0  # of prompt_tokens, those the slot's cache held already
        self.started = False  # has a Chunk been sent?

    def interrupt(self, code: str) -> None:
        """Any thread: ask the slot to stop at the next token (first reason wins)."""
        if not self._stop.is_set():
            self.stop_code = code
            self._stop.set()

    def check(self) -> None:
        """Slot thread, between tokens: raise :class:`Interrupted` if the request must end."""
        if self._stop.is_set():
            raise Interrupted(self.stop_code, _STOP_MESSAGES.get(self.stop_code, self.stop_code))
        if self.req.deadline and time.time() >= self.req.deadline:
            raise Interrupted("timeout", "the request's deadline passed")


class Scheduler:
    """Requests waiting for a slot (at most ``max_waiting``) and requests running on one."""

    def __init__(self, max_waiting: int):
        self._max_waiting = max_waiting
        self._cond = threading.Condition()
        self._waiting: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self._running: dict[str, Job] = {}
        self.closed = False

    def offer(self, job: Job) -> tuple[str, str] | None:
        """IO thread: queue ``job``, or say why not as (fail code, message)."""
        with self._cond:
            rid = job.req.id
            if self.closed:
                return "engine_down", _STOP_MESSAGES["engine_down"]
            if rid in self._waiting or rid in self._running:
                return "bad_request", f"request id {rid!r} is already in progress"
            if len(self._waiting) >= self._max_waiting:
                return "overloaded", (f"all {len(self._running)} slots are busy and "
                                      f"{len(self._waiting)} requests are waiting")
            self._waiting[rid] = job
            self._cond.notify()
            return None

    def take(self, timeout_s: float) -> Job | None:
        """Slot thread: the oldest waiting job, or None after ``timeout_s`` or once closed."""
        with self._cond:
            if not self._waiting and not self.closed:
                self._cond.wait(timeout_s)
            if self.closed or not self._waiting:
                return None
            rid, job = self._waiting.popitem(last=False)
            self._running[rid] = job
            return job

    def in_flight(self) -> int:
        """Any thread: requests accepted and not finished (waiting or running)."""
        with self._cond:
            return len(self._waiting) + len(self._running)

    def finish(self, job: Job) -> None:
        with self._cond:
            self._running.pop(job.req.id, None)

    def cancel(self, rid: str) -> Job | None:
        """IO thread: a waiting job is removed and returned (the caller answers it); a running
        one is interrupted and answers itself."""
        with self._cond:
            job = self._waiting.pop(rid, None)
            if job is not None:
                return job
            running = self._running.get(rid)
        if running is not None:
            running.interrupt("cancelled")
        return None

    def close(self) -> list[Job]:
        """Refuse new work, interrupt running jobs, and return the waiting ones (to be answered)."""
        with self._cond:
            self.closed = True
            waiting = list(self._waiting.values())
            self._waiting.clear()
            running = list(self._running.values())
            self._cond.notify_all()
        for job in running:
            job.interrupt("engine_down")
        return waiting
