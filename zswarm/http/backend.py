"""What the HTTP app needs from the node, as a Protocol, so the app owns no socket itself."""

from __future__ import annotations

from typing import Iterator, Protocol, Union

from .. import wire

Reply = Union[wire.Chunk, wire.Done, wire.Fail]


class BackendUnavailable(RuntimeError):
    """The node could not be asked at all (down, restarting, or not answering in time)."""


class Backend(Protocol):
    """The node as seen from one HTTP worker; every method may be called from any worker thread."""

    def models(self) -> list[str]:
        """Names of the models servable through this node; raises :class:`BackendUnavailable`."""
        ...

    def problem(self) -> str:
        """Why this node serves nothing although it should (with the remedy), as of the last
        :meth:`models`; "" when there is nothing wrong. Never raises."""
        ...

    def recent(self) -> list[str]:
        """Models served lately that no node serves right now, as of the last :meth:`models`
        (a restart, a brief partition): worth a retry, unlike a model never heard of. Never raises."""
        ...

    def generate(self, req: wire.GenRequest) -> Iterator[Reply]:
        """Blocking iterator over the answer to ``req``.

        Yields Chunks, then exactly one terminal Done or Fail (the very first item may be that
        Fail). Never raises for a failure of the node or the engine: that is a Fail.
        """
        ...

    def cancel(self, request_id: str) -> None:
        """Tell the node nobody waits for ``request_id`` any more; never blocks, never raises."""
        ...
