"""Bounded channels between stages: anyio's memory-stream semantics at a fraction of the cost.

Same contract as `anyio.create_memory_object_stream` (clones, closing the last sender is
end-of-stream, closing the last receiver breaks the senders, a bounded buffer back-pressures),
with two differences that matter on a hot path:

- `send` and `receive` only yield to the loop when they must wait. anyio's always pass a
  checkpoint first, which costs a loop trip per hop in a chain of cheap stages. So they are
  cancellation points only when they wait: after a cancel, a stage that awaits nothing else
  (routing, say) may still move up to a buffer's worth of items before it blocks and sees it.
  The bounded buffers are also what keeps such a stage from starving the loop; the others
  await an engine, the judge or the consumer per item.
- A waiter parks on a bare asyncio future instead of an anyio `Event` plus bookkeeping. anyio
  cancel scopes still reach it (they cancel the task, which cancels the future it awaits).

An item handed to a receiver that is cancelled before it resumes goes back to the channel,
to the next waiter or the front of the buffer, so cancellation never drops an item; while
such a hand-over is unsettled, end-of-stream waits for it. (anyio drops that item.)
Like anyio's, an end collected without being closed warns `ResourceWarning`: a stage that
forgot `async with` would otherwise leave its neighbours waiting for an end that never comes.
Asyncio only: the library runs in its caller's asyncio loop, the CLI on uvloop.
"""

from __future__ import annotations

import asyncio
import warnings
from collections import deque
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

from anyio import BrokenResourceError, ClosedResourceError, EndOfStream, WouldBlock
from anyio.abc import ObjectReceiveStream, ObjectSendStream

__all__ = ["ChannelStatistics", "Outbox", "Receiver", "Sender", "open_channel"]

T = TypeVar("T")
T_contra = TypeVar("T_contra", contravariant=True)


class Outbox(Protocol[T_contra]):
    """Where a stage puts its output: a `Sender`, or a consumer called in place (gather)."""

    async def send(self, item: T_contra, /) -> None: ...


class ChannelStatistics(NamedTuple):
    current_buffer_used: int
    max_buffer_size: int
    open_send_streams: int
    open_receive_streams: int
    tasks_waiting_send: int
    tasks_waiting_receive: int


class _State(Generic[T]):
    __slots__ = (
        "buffer",
        "handing",
        "max_size",
        "receivers",
        "senders",
        "waiting_get",
        "waiting_put",
    )

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self.buffer: deque[T] = deque()
        self.senders = 0
        self.receivers = 0
        self.handing = 0  # items given to a waiting receiver that has not resumed yet
        self.waiting_get: deque[asyncio.Future[T]] = deque()
        self.waiting_put: deque[tuple[asyncio.Future[None], T]] = deque()

    def hand_back(self, item: T) -> None:
        """An item a cancelled receiver was given: to the next waiter, else the buffer front."""
        while self.waiting_get:
            waiter = self.waiting_get.popleft()
            if not waiter.done():
                waiter.set_result(item)
                self.handing += 1
                return
        self.buffer.appendleft(item)

    def settled(self) -> None:
        """A hand-over is settled; if it was the last thing in flight, the stream may end."""
        self.handing -= 1
        if not self.handing and not self.senders and not self.buffer:
            self.end()

    def end(self) -> None:
        """Tell every waiting receiver the stream has ended."""
        while self.waiting_get:
            waiter = self.waiting_get.popleft()
            if not waiter.done():
                waiter.set_exception(EndOfStream())

    def admit_waiting_sender(self) -> None:
        while self.waiting_put and len(self.buffer) < self.max_size:
            waiter, item = self.waiting_put.popleft()
            if not waiter.done():
                self.buffer.append(item)
                waiter.set_result(None)

    def statistics(self) -> ChannelStatistics:
        return ChannelStatistics(
            len(self.buffer),
            self.max_size,
            self.senders,
            self.receivers,
            sum(not w.done() for w, _ in self.waiting_put),
            sum(not w.done() for w in self.waiting_get),
        )


def _fail_closed(waiters: set[asyncio.Future[T]]) -> None:
    """The waiting calls of an end being closed end with ClosedResourceError."""
    for waiter in waiters:
        if not waiter.done():
            waiter.set_exception(ClosedResourceError())
    waiters.clear()


_E = TypeVar("_E", bound="_End[Any]")


class _End(Generic[T]):
    """What both ends share: cloning, the closing forms, statistics, and the warning when an
    end is collected unclosed."""

    __slots__ = ("_closed", "_state")

    def __init__(self, state: _State[T]) -> None:
        self._state = state
        self._closed = False

    def clone(self: _E) -> _E:
        """Another end of the same kind on the same channel, closed on its own."""
        if self._closed:
            raise ClosedResourceError
        return type(self)(self._state)

    def close(self) -> None:
        raise NotImplementedError

    async def aclose(self) -> None:
        self.close()

    def statistics(self) -> ChannelStatistics:
        return self._state.statistics()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            warnings.warn(
                f"Unclosed <{type(self).__name__} at {id(self):x}>",
                ResourceWarning,
                stacklevel=1,
                source=self,
            )


class Sender(_End[T], ObjectSendStream[T]):
    """The sending end. Clone it per producer; the last one closed ends the stream."""

    __slots__ = ("_waiters",)

    def __init__(self, state: _State[T]) -> None:
        super().__init__(state)
        self._waiters: set[asyncio.Future[None]] = set()
        state.senders += 1

    def send_nowait(self, item: T) -> None:
        """Send without waiting. :raises WouldBlock: the buffer is full and nobody waits."""
        if self._closed:
            raise ClosedResourceError
        state = self._state
        if not state.receivers:
            raise BrokenResourceError
        waiting = state.waiting_get
        while waiting:
            waiter = waiting.popleft()
            if not waiter.done():
                waiter.set_result(item)
                state.handing += 1
                return
        if len(state.buffer) < state.max_size:
            state.buffer.append(item)
            return
        raise WouldBlock

    async def send(self, item: T) -> None:
        """Send, waiting only while the buffer is full and nobody is receiving."""
        try:
            self.send_nowait(item)
            return
        except WouldBlock:
            pass
        state = self._state
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (waiter, item)
        state.waiting_put.append(entry)
        self._waiters.add(waiter)
        try:
            await waiter
        except BaseException:
            if not waiter.done() or waiter.cancelled():
                try:
                    state.waiting_put.remove(entry)
                except ValueError:
                    pass
            raise
        finally:
            self._waiters.discard(waiter)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        state = self._state
        _fail_closed(self._waiters)
        state.senders -= 1
        if state.senders == 0 and not state.handing:
            state.end()

    def __enter__(self) -> Sender[T]:
        return self


class Receiver(_End[T], ObjectReceiveStream[T]):
    """The receiving end. Clone it per consumer; `async for` ends at end-of-stream."""

    __slots__ = ("_waiters",)

    def __init__(self, state: _State[T]) -> None:
        super().__init__(state)
        self._waiters: set[asyncio.Future[T]] = set()
        state.receivers += 1

    def receive_nowait(self) -> T:
        """An item already there. :raises WouldBlock: none is; EndOfStream: none ever will be."""
        if self._closed:
            raise ClosedResourceError
        state = self._state
        if state.buffer:
            item = state.buffer.popleft()
            if state.waiting_put:
                state.admit_waiting_sender()
            return item
        while state.waiting_put:  # an unbuffered channel: take straight from a sender
            waiter, item = state.waiting_put.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return item
        if not state.senders and not state.handing:
            raise EndOfStream
        raise WouldBlock

    async def receive(self) -> T:
        """The next item, waiting for one if none is there. :raises EndOfStream: at the end."""
        try:
            return self.receive_nowait()
        except WouldBlock:
            pass
        state = self._state
        waiter: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        state.waiting_get.append(waiter)
        self._waiters.add(waiter)
        try:
            item = await waiter
        except BaseException:  # cancelled (or the coroutine closed) while waiting
            if not waiter.done() or waiter.cancelled():
                try:
                    state.waiting_get.remove(waiter)
                except ValueError:
                    pass
            elif waiter.exception() is None:  # given an item, then cancelled: keep the item
                state.hand_back(waiter.result())
                state.settled()
            raise
        finally:
            self._waiters.discard(waiter)
        state.settled()
        return item

    def __aiter__(self) -> Receiver[T]:
        return self

    async def __anext__(self) -> T:
        try:
            return self.receive_nowait()
        except WouldBlock:
            try:
                return await self.receive()
            except EndOfStream:
                raise StopAsyncIteration from None
        except EndOfStream:
            raise StopAsyncIteration from None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        state = self._state
        _fail_closed(self._waiters)
        state.receivers -= 1
        if state.receivers == 0:
            while state.waiting_put:
                waiter_put, _ = state.waiting_put.popleft()
                if not waiter_put.done():
                    waiter_put.set_exception(BrokenResourceError())
            state.buffer.clear()

    def __enter__(self) -> Receiver[T]:
        return self


class open_channel(tuple[Sender[T], Receiver[T]]):  # used like a function
    """`tx, rx = open_channel[Item](max_buffer_size)`: a bounded channel's two ends."""

    def __new__(cls, max_buffer_size: int) -> tuple[Sender[T], Receiver[T]]:  # type: ignore[misc]
        if max_buffer_size < 0:
            raise ValueError("max_buffer_size must be >= 0")
        state: _State[T] = _State(max_buffer_size)
        return Sender(state), Receiver(state)
