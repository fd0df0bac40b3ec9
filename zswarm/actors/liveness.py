"""Heartbeats of the node's child processes: what a beat says, and when a child counts as hung.

Owns :class:`Pulse` (one child's beats as its watcher thread read them) and :func:`verdict` (the
judgement, a pure function of the pulse and the clock; the supervisor asks for it every second).
It must never signal or start a process; the supervisor does that.

A child that beats writes ``BEAT`` or ``BEAT <progress> <in flight>`` (engine/child.py):
progress is a count that moves while the child works (the engine: tokens evaluated), in flight
the requests it holds. A child is hung when it has not beaten for ``hang_s`` (stopped, frozen in
a system call, or stuck holding the GIL), or when, ready and holding requests, its count has not
moved for ``stuck_s`` (alive but stuck: llama.cpp waiting forever on a worker that stopped).
"""

from __future__ import annotations


FIRST_BEAT_S = 30.0  # a child's first beat follows its imports (llama_cpp: seconds on a busy machine)


class Pulse:
    """One child generation's beats. ``last`` is (time of the last beat or 0.0, time its count
    last moved or nothing was in flight, requests in flight, the count or None). Its watcher
    thread writes it and the supervisor reads it: one tuple, replaced whole, so a reader never
    sees half an update and nobody needs a lock."""

    def __init__(self, now: float):
        self.last: tuple[float, float, int, int | None] = (0.0, now, 0, None)

    def beat(self, text: str, now: float) -> None:
        """Watcher thread: a ``BEAT`` line arrived; ``text`` is what followed the word."""
        count, in_flight = None, 0
        parts = text.split()
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            count, in_flight = int(parts[0]), int(parts[1])
        _, moved_at, _, before = self.last
        if count != before or not in_flight:
            moved_at = now
        self.last = (now, moved_at, in_flight, count)


def verdict(pulse: Pulse, started_at: float, judge_from: float, now: float, hang_s: float,
            stuck_s: float, ready: bool) -> str:
    """Why a child counts as hung at ``now`` ("" if it does not). Nothing before ``judge_from``
    is held against it (the judge itself was not running then); 0 turns a bound off."""
    beat_at, moved_at, in_flight, _ = pulse.last
    if hang_s:
        since = max(beat_at or started_at, judge_from)
        if now - since > (hang_s if beat_at else max(hang_s, FIRST_BEAT_S)):
            if beat_at:
                return f"sent no heartbeat for {now - since:.0f} s"
            return f"sent no heartbeat in the {now - since:.0f} s since it started"
    if stuck_s and ready and in_flight:
        since = max(moved_at, judge_from)
        if now - since > stuck_s:
            return f"made no progress for {now - since:.0f} s with {in_flight} request(s) in flight"
    return ""
