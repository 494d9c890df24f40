"""Fast paths for anyio memory streams: no trip through the event loop when none is needed.

anyio's `send` and `receive` always yield to the loop first (a checkpoint), even when an item
is waiting or there is room in the buffer. On a hot path that is one loop iteration per hop,
which dominates a pipeline of cheap stages. These helpers try the `_nowait` form first and
fall back to the awaiting form, which also delivers cancellation, only when they must wait.
"""

from __future__ import annotations

from typing import Generic, TypeVar

from anyio import EndOfStream, WouldBlock
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

__all__ = ["iterate", "send"]

T = TypeVar("T")


async def send(stream: MemoryObjectSendStream[T], item: T) -> None:
    """Send `item`, waiting only when the buffer is full and nobody is receiving."""
    try:
        stream.send_nowait(item)
    except WouldBlock:
        await stream.send(item)


class iterate(Generic[T]):  # used like a function: `async for x in iterate(rx)`
    """Like `async for item in stream`, without a loop trip per item already waiting.

    Each consumer awaits something per item (an engine, a send), so a busy stream cannot
    starve the loop.
    """

    __slots__ = ("_stream",)

    def __init__(self, stream: MemoryObjectReceiveStream[T]) -> None:
        self._stream = stream

    def __aiter__(self) -> iterate[T]:
        return self

    async def __anext__(self) -> T:
        try:
            return self._stream.receive_nowait()
        except WouldBlock:
            try:
                return await self._stream.receive()
            except EndOfStream:
                raise StopAsyncIteration from None
        except EndOfStream:
            raise StopAsyncIteration from None
