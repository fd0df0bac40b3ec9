"""Upward events between actors: fire-and-forget ``tell()``, never ``ask()``.

An actor that wants to hear about another's changes registers its ref; the source calls
:func:`notify`. There is no return channel, so a listener's failure is caught and logged in the
listener and never reaches the source (blocking there would deadlock two actors waiting on each
other).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import pykka

log = logging.getLogger(__name__)


@dataclass
class Event:
    name: str
    data: dict = field(default_factory=dict)


def notify(listeners: list[Any], name: str, **data: Any) -> None:
    for ref in listeners:
        try:
            ref.tell(Event(name, data))
        except pykka.ActorDeadError:
            pass


class ListenerMixin:
    """Dispatches an :class:`Event` to ``on_<name>(**data)`` when the actor defines it."""

    def on_event(self, event: Event) -> None:
        handler = getattr(self, "on_" + event.name, None)
        if handler is None:
            return
        try:
            handler(**event.data)
        except Exception:
            log.exception("%s failed to handle event %r", type(self).__name__, event.name)
