"""Upward messages between actors: fire-and-forget ``tell()``, never ``ask()``.

An actor that wants to hear about another's changes registers its ref; the source calls
:func:`notify` with an :class:`Event`, which the listener's guard (:mod:`.base`) hands to its
``on_<name>`` method. There is no return channel, so a listener's failure is caught, logged and
counted in the listener and never reaches the source (blocking there would deadlock two actors
waiting on each other).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import pykka


@dataclass(frozen=True)
class Event:
    name: str
    data: dict = field(default_factory=dict)


def tell(ref: Any, message: Any) -> bool:
    """Tell ``ref`` (an ActorRef) ``message``; False if that actor has stopped (a stopping node's
    threads and timers run on for a moment, and then nobody is left to tell)."""
    try:
        ref.tell(message)
        return True
    except pykka.ActorDeadError:
        return False


def tell_later(ref: Any, message: Any, delay_s: float) -> threading.Timer:
    """Tell ``ref`` ``message`` after ``delay_s``: a daemon timer, which the actor cancels in
    its ``release``."""
    timer = threading.Timer(delay_s, tell, args=(ref, message))
    timer.daemon = True
    timer.start()
    return timer


def notify(listeners: list[Any], name: str, **data: Any) -> None:
    for ref in listeners:
        tell(ref, Event(name, data))
