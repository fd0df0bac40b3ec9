"""What every actor of a node shares: a guard around its messages, and a death the node hears of.

pykka stops an actor whose ``tell()`` handler raises, and nothing else notices. A
:class:`GuardedActor` works like this instead:

- **A failed message** (a tell whose handler raises, a ``.get()`` inside it that timed out) is
  logged once, with its traceback, and counted as ``actor_errors_<name>`` in the node's
  :class:`~zswarm.transport.Stats` (so in ``zswarm admin status`` and ``/metrics``). The actor
  goes on with its next message. Tells arrive in :meth:`~GuardedActor.handle`, and an
  :class:`~.listener.Event` arrives in ``on_<event name>(**data)``; ``on_receive`` is the guard
  and no subclass overrides it. A proxy call is an ask: its exception goes back to whoever
  asked (pykka logs the ones whose future nobody reads), and the actor goes on too. (Tell with a
  message, never with ``proxy.method.defer()``: pykka takes an exception there for a death.)
- **A death** is a bug. A ``BaseException`` in a tell handler, or a failure of the guard
  itself: the guard turns the first into :class:`ActorDied`, so pykka stops this actor alone
  and calls ``on_failure``, which runs :meth:`~GuardedActor.release` (the actor's threads,
  sockets and timers, as ``on_stop`` does) and tells the node's :class:`Watch` why. A
  ``BaseException`` in a proxy call: pykka's rule is to stop every actor (each ``on_stop``
  releases); the actor says why first. An exception in ``on_start`` or ``on_stop``: pykka logs
  it and stops the actor with no hook at all (so ``on_start`` starts its threads last). The node
  (``node.py``) looks at its actors every ``POLL_S``, so it notices every one of these, says so
  in its log and in ``zswarm admin status`` (``actors``, ``failed_actors``), and then restarts
  that actor or stops cleanly, exit status 1.

Each hook says which thread runs it: ``__init__`` runs in the thread that starts the actor;
``on_start``, ``handle``, ``on_stop``, ``on_failure`` and ``release`` in the actor's own thread.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, ClassVar

import pykka

from ..transport import Stats
from .listener import Event

log = logging.getLogger(__name__)

FAILED_KEPT = 20  # failed_actors in the status: the latest this many


class ActorDied(Exception):
    """A ``BaseException`` escaped a handler. Raised as an ordinary exception so that pykka stops
    only this actor and calls its ``on_failure``: the node decides what follows, not pykka's rule
    for a BaseException (stop every actor of the process, from this actor's thread)."""


class Watch:
    """How a node's actors tell it about trouble, and what ``zswarm admin status`` shows of it.

    Any thread may call it; nothing in it blocks. The node's main thread reads what died with
    :meth:`why` and records what it did about it with :meth:`failed`."""

    def __init__(self, stats: Stats | None = None):
        self.stats = stats if stats is not None else Stats()
        self._lock = threading.Lock()
        self._state: dict[str, str] = {}  # actor name -> "running" or "failed"
        self._why: dict[str, str] = {}  # actor urn -> why it died, from its on_failure
        self._failed: list[dict[str, Any]] = []

    def started(self, name: str) -> None:
        with self._lock:
            self._state[name] = "running"

    def handler_failed(self, name: str) -> None:
        self.stats.inc(f"actor_errors_{name}")

    def died(self, urn: str, name: str, why: str) -> None:
        """The actor's own thread, in ``on_failure``: it is stopping."""
        self.stats.inc(f"actor_failures_{name}")
        with self._lock:
            self._why[urn] = why
            self._state[name] = "failed"

    def why(self, urn: str) -> str | None:
        """Why the actor ``urn`` died, as it said in its ``on_failure`` (None: it said nothing)."""
        with self._lock:
            return self._why.pop(urn, None)

    def failed(self, name: str, why: str, action: str) -> None:
        """The node's main thread: actor ``name`` died for ``why``, and the node did ``action``."""
        with self._lock:
            self._state[name] = "failed"
            self._failed = [*self._failed, {"actor": name, "why": why, "at": round(time.time(), 3),
                                            "action": action}][-FAILED_KEPT:]

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {"actors": dict(self._state), "failed_actors": [dict(f) for f in self._failed]}


class GuardedActor(pykka.ThreadingActor):
    """A pykka actor whose failed messages are counted and survived, and whose death the node hears.

    A subclass sets :attr:`name`, handles tells in :meth:`handle` (or events in ``on_<event>``),
    and puts what must be let go when it ends (threads, sockets, timers) in :meth:`release`:
    that runs on a stop (``on_stop``) and on a death (``on_failure``) alike."""

    name: ClassVar[str] = "actor"  # in counters, log lines and the status: "ledger", "gateway"...

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "on_receive" in cls.__dict__:
            raise TypeError(f"{cls.__name__}: handle tells in handle(); on_receive is the guard")

    def __init__(self, watch: Watch | None = None):
        super().__init__()
        self._watch = watch if watch is not None else Watch()
        self._watch.started(self.name)

    # --- the actor thread ---
    def on_receive(self, message: Any) -> None:
        try:
            if isinstance(message, Event):
                handler = getattr(self, "on_" + message.name, None)
                if handler is not None:
                    handler(**message.data)
            else:
                self.handle(message)
        except Exception:
            self.failed(_describe(message))
        except BaseException as e:
            raise ActorDied(_why(e)) from e

    def _handle_receive(self, message: Any) -> Any:
        """pykka's one entry for every message. A BaseException that a proxy call raises makes
        pykka stop every actor of the process, and say so at debug level only: say why first."""
        try:
            return super()._handle_receive(message)
        except Exception:
            raise  # a tell's is ActorDied by now (on_receive); an ask's goes back to its caller
        except BaseException as e:
            log.error("%s: %s in a call; pykka stops every actor", self.name, _why(e), exc_info=True)
            self._watch.died(self.actor_urn, self.name, _why(e))
            raise

    def handle(self, message: Any) -> None:
        """A tell (any message that is not a proxy call or an Event)."""
        log.warning("%s: unexpected message %r", self.name, message)

    def failed(self, what: str) -> None:
        """Inside an ``except``: log the exception being handled, with its traceback, and count
        it. For a handler that recovers in its own way (tries again later) and says so."""
        log.exception("%s: %s failed; the actor goes on", self.name, what)
        self._watch.handler_failed(self.name)

    def release(self) -> None:
        """Let go of the actor's threads, sockets and timers (on a stop and on a death)."""

    def on_stop(self) -> None:
        self.release()

    def on_failure(self, exception_type: Any, exception_value: Any, traceback: Any) -> None:
        """pykka is stopping this actor after an exception it logged with its traceback."""
        try:
            self.release()
        except Exception:
            log.exception("%s: releasing its threads and sockets failed", self.name)
        finally:
            # ActorDied: what the guard said of the BaseException
            why = str(exception_value) if isinstance(exception_value, ActorDied) else _why(exception_value)
            self._watch.died(self.actor_urn, self.name, why)


def _why(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def _describe(message: Any) -> str:
    if isinstance(message, Event):
        return f"event {message.name!r}"
    return f"message {type(message).__name__}"
