"""Conformance suite for `open_channel`: it must behave like `anyio.create_memory_object_stream`.

In the style of trio's `check_one_way_stream`: every behaviour both implementations must share
runs against both factories (ids `ours` and `anyio`), so a test passing for `anyio` shows that
the test itself encodes anyio's semantics, and passing for `ours` shows we match them. The few
tests that run against `ours` alone say why in a comment: they pin an intended difference (no
loop trip when nothing has to wait), or a guarantee anyio does not give (an item handed to a
receiver that is natively cancelled before it resumes goes back to the channel).

Tests never hang: each runs under `anyio.fail_after`, and `_until` polls a condition one loop
iteration at a time, so a wrong expectation fails with a timeout instead of blocking.
"""

from __future__ import annotations

import asyncio
import gc
import random
import warnings
from collections import Counter
from collections.abc import Callable
from typing import Any

import anyio
import pytest
from anyio import BrokenResourceError, ClosedResourceError, EndOfStream, WouldBlock
from anyio.lowlevel import checkpoint

from streamfeedback._channels import open_channel

Factory = Callable[[int], tuple[Any, Any]]

TIMEOUT = 5


@pytest.fixture(
    params=[
        pytest.param(open_channel, id="ours"),
        pytest.param(anyio.create_memory_object_stream, id="anyio"),
    ]
)
def open_(request: pytest.FixtureRequest) -> Factory:
    return request.param  # type: ignore[no-any-return]


async def _until(condition: Callable[[], bool]) -> None:
    """Let the loop run, one iteration at a time, until `condition` holds."""
    while not condition():
        await checkpoint()


async def _spin(iterations: int = 10) -> None:
    """Give every ready task several chances to run (to show that something did *not* happen)."""
    for _ in range(iterations):
        await checkpoint()


def _stats(end: Any) -> dict[str, float]:
    s = end.statistics()
    return {
        "current_buffer_used": s.current_buffer_used,
        "max_buffer_size": s.max_buffer_size,
        "open_send_streams": s.open_send_streams,
        "open_receive_streams": s.open_receive_streams,
        "tasks_waiting_send": s.tasks_waiting_send,
        "tasks_waiting_receive": s.tasks_waiting_receive,
    }


def _drain(rx: Any) -> list[Any]:
    """Everything receivable right now, without waiting (stops at WouldBlock or EndOfStream)."""
    items = []
    while True:
        try:
            items.append(rx.receive_nowait())
        except (WouldBlock, EndOfStream):
            return items


def _waiting_receive(rx: Any, n: int) -> Callable[[], bool]:
    return lambda: rx.statistics().tasks_waiting_receive == n


def _waiting_send(tx: Any, n: int) -> Callable[[], bool]:
    return lambda: tx.statistics().tasks_waiting_send == n


# --- construction -------------------------------------------------------------------------


def test_negative_buffer_size_is_rejected(open_: Factory) -> None:
    with pytest.raises(ValueError):
        open_(-1)


async def test_context_managers_close_both_ends(open_: Factory) -> None:
    tx, rx = open_(1)
    with tx, rx:
        assert _stats(tx)["open_send_streams"] == 1
    assert _stats(tx)["open_send_streams"] == 0
    assert _stats(tx)["open_receive_streams"] == 0
    with pytest.raises(ClosedResourceError):
        tx.send_nowait(1)

    tx, rx = open_(1)
    async with tx, rx:
        pass
    with pytest.raises(ClosedResourceError):
        rx.receive_nowait()
    assert _stats(rx)["open_send_streams"] == _stats(rx)["open_receive_streams"] == 0


def test_an_end_collected_unclosed_warns(open_: Factory) -> None:
    tx, rx = open_(1)
    rx.close()
    with pytest.warns(ResourceWarning, match=r"Unclosed <\w+ at "):
        del tx
        gc.collect()
    tx, rx = open_(1)
    tx.close()
    with pytest.warns(ResourceWarning, match=r"Unclosed <\w+ at "):
        del rx
        gc.collect()


def test_ends_collected_closed_or_cloned_and_closed_do_not_warn(open_: Factory) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        tx, rx = open_(1)
        clone = tx.clone()
        with tx, rx, clone:
            pass
        del tx, rx, clone
        gc.collect()
    assert [str(w.message) for w in caught] == []


# --- buffering, order, back-pressure ------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 4])
async def test_send_nowait_fills_the_buffer_then_would_block(open_: Factory, size: int) -> None:
    tx, rx = open_(size)
    with tx, rx:
        for i in range(size):
            tx.send_nowait(i)
        assert _stats(tx)["current_buffer_used"] == size
        with pytest.raises(WouldBlock):
            tx.send_nowait("one too many")
        assert _stats(tx)["current_buffer_used"] == size
        assert [rx.receive_nowait() for _ in range(size)] == list(range(size))
        with pytest.raises(WouldBlock):
            rx.receive_nowait()


@pytest.mark.parametrize("size", [0, 4])
async def test_items_arrive_in_the_order_sent(open_: Factory, size: int) -> None:
    tx, rx = open_(size)
    received: list[int] = []

    async def produce() -> None:
        async with tx:
            for i in range(200):
                await tx.send(i)
                if i % 7 == 0:
                    await checkpoint()

    async def consume() -> None:
        async with rx:
            async for item in rx:
                received.append(item)
                if item % 5 == 0:
                    await checkpoint()

    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            tg.start_soon(produce)
    assert received == list(range(200))


@pytest.mark.parametrize("size", [0, 2])
async def test_send_waits_until_a_receiver_makes_room(open_: Factory, size: int) -> None:
    tx, rx = open_(size)
    sent = anyio.Event()

    async def send_last() -> None:
        await tx.send("last")
        sent.set()

    with anyio.fail_after(TIMEOUT), tx, rx:
        for i in range(size):
            tx.send_nowait(i)
        async with anyio.create_task_group() as tg:
            tg.start_soon(send_last)
            await _until(_waiting_send(tx, 1))
            await _spin()
            assert not sent.is_set()  # back-pressure: full buffer (or no receiver) holds it
            assert _stats(tx)["current_buffer_used"] == size

            first = await rx.receive()
            await sent.wait()
        assert first == (0 if size else "last")
        assert _drain(rx) == ([*range(1, size), "last"] if size else [])
        assert _stats(tx)["tasks_waiting_send"] == 0


async def test_waiting_senders_are_admitted_in_arrival_order(open_: Factory) -> None:
    tx, rx = open_(1)
    with anyio.fail_after(TIMEOUT), tx, rx:
        tx.send_nowait(0)
        async with anyio.create_task_group() as tg:
            for i in range(1, 4):
                tg.start_soon(tx.send, i)
                await _until(_waiting_send(tx, i))
            received = [await rx.receive() for _ in range(4)]
        assert received == [0, 1, 2, 3]


async def test_unbuffered_send_nowait_hands_straight_to_a_waiting_receiver(open_: Factory) -> None:
    tx, rx = open_(0)
    got: list[str] = []

    async def receive() -> None:
        got.append(await rx.receive())

    with anyio.fail_after(TIMEOUT), tx, rx:
        with pytest.raises(WouldBlock):
            tx.send_nowait("nobody there")
        async with anyio.create_task_group() as tg:
            tg.start_soon(receive)
            await _until(_waiting_receive(rx, 1))
            tx.send_nowait("x")  # a rendezvous with the waiting receiver: no WouldBlock
            assert _stats(tx)["current_buffer_used"] == 0
        assert got == ["x"]


async def test_receive_nowait_on_an_empty_channel_would_block(open_: Factory) -> None:
    tx, rx = open_(3)
    with tx, rx:
        with pytest.raises(WouldBlock):
            rx.receive_nowait()
        tx.send_nowait(1)
        assert rx.receive_nowait() == 1
        with pytest.raises(WouldBlock):
            rx.receive_nowait()


@pytest.mark.parametrize("size", [0, 2])
async def test_receive_waits_for_an_item(open_: Factory, size: int) -> None:
    tx, rx = open_(size)
    got: list[str] = []

    async def receive() -> None:
        got.append(await rx.receive())

    with anyio.fail_after(TIMEOUT), tx, rx:
        async with anyio.create_task_group() as tg:
            tg.start_soon(receive)
            await _until(_waiting_receive(rx, 1))
            await _spin()
            assert got == []
            await tx.send("x")
        assert got == ["x"]


async def test_waiting_receivers_are_served_in_arrival_order(open_: Factory) -> None:
    tx, rx = open_(0)
    got: dict[int, str] = {}

    async def receive(n: int) -> None:
        got[n] = await rx.receive()

    with anyio.fail_after(TIMEOUT), tx, rx:
        async with anyio.create_task_group() as tg:
            for n in range(3):
                tg.start_soon(receive, n)
                await _until(_waiting_receive(rx, n + 1))
            for item in "abc":
                await tx.send(item)
        assert got == {0: "a", 1: "b", 2: "c"}


# --- end of stream --------------------------------------------------------------------------


async def test_closing_the_last_sender_ends_the_stream_for_waiting_receivers(
    open_: Factory,
) -> None:
    tx, rx = open_(0)
    tx2 = tx.clone()
    rx2 = rx.clone()
    ended: list[str] = []

    async def receive(name: str, end: Any) -> None:
        with pytest.raises(EndOfStream):
            await end.receive()
        ended.append(name)

    with anyio.fail_after(TIMEOUT), tx, tx2, rx, rx2:
        async with anyio.create_task_group() as tg:
            tg.start_soon(receive, "a", rx)
            tg.start_soon(receive, "b", rx2)
            await _until(_waiting_receive(rx, 2))
            tx.close()  # a clone is still open: not the end
            await _spin()
            assert ended == []
            assert _stats(rx)["tasks_waiting_receive"] == 2
            tx2.close()
        assert sorted(ended) == ["a", "b"]
        with pytest.raises(EndOfStream):
            rx.receive_nowait()
        with pytest.raises(EndOfStream):
            await rx2.receive()  # and it stays ended


async def test_buffered_items_are_delivered_before_end_of_stream(open_: Factory) -> None:
    tx, rx = open_(3)
    with anyio.fail_after(TIMEOUT), rx:
        with tx:
            for i in range(3):
                tx.send_nowait(i)
        assert rx.receive_nowait() == 0
        assert await rx.receive() == 1
        assert [item async for item in rx] == [2]
        with pytest.raises(EndOfStream):
            rx.receive_nowait()
        with pytest.raises(EndOfStream):
            await rx.receive()
        assert [item async for item in rx] == []


async def test_async_for_ends_when_every_sender_clone_is_closed(open_: Factory) -> None:
    tx, rx = open_(0)
    received: list[int] = []

    async def produce(sender: Any, start: int) -> None:
        async with sender:
            for i in range(start, start + 10):
                await sender.send(i)

    async def consume() -> None:
        async for item in rx:
            received.append(item)

    with anyio.fail_after(TIMEOUT), rx:
        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            with tx:
                tg.start_soon(produce, tx.clone(), 0)
                tg.start_soon(produce, tx.clone(), 100)
        assert sorted(received) == [*range(10), *range(100, 110)]


# --- broken: the receiving side is gone -----------------------------------------------------


@pytest.mark.parametrize("size", [0, 1])
async def test_closing_the_last_receiver_breaks_senders(open_: Factory, size: int) -> None:
    tx, rx = open_(size)
    rx2 = rx.clone()
    outcome: list[type[BaseException]] = []

    async def send() -> None:
        try:
            await tx.send("waiting")
        except BrokenResourceError:
            outcome.append(BrokenResourceError)

    with anyio.fail_after(TIMEOUT), tx, rx, rx2:
        for i in range(size):
            tx.send_nowait(i)
        async with anyio.create_task_group() as tg:
            tg.start_soon(send)
            await _until(_waiting_send(tx, 1))
            rx.close()  # a receiver clone is still open: senders are not broken yet
            await _spin()
            assert outcome == []
            with pytest.raises(WouldBlock):
                tx.send_nowait("still full")
            rx2.close()
        assert outcome == [BrokenResourceError]  # the already waiting send
        with pytest.raises(BrokenResourceError):
            tx.send_nowait("x")
        with pytest.raises(BrokenResourceError):
            await tx.send("x")


# --- closed ends and clones ----------------------------------------------------------------


async def test_a_closed_sender_raises_closed_resource_error(open_: Factory) -> None:
    tx, rx = open_(1)
    with rx, tx.clone() as tx2:
        tx.close()
        tx.close()  # idempotent: counted once
        await tx.aclose()
        assert _stats(rx)["open_send_streams"] == 1
        with pytest.raises(WouldBlock):  # tx2 still keeps the stream open
            rx.receive_nowait()
        tx2.close()
        with pytest.raises(ClosedResourceError):
            tx.send_nowait(1)
        with pytest.raises(ClosedResourceError):
            await tx.send(1)
        with pytest.raises(ClosedResourceError):
            tx.clone()
        rx.close()
        with pytest.raises(ClosedResourceError):  # closed wins over broken
            tx.send_nowait(1)


async def test_a_closed_receiver_raises_closed_resource_error(open_: Factory) -> None:
    tx, rx = open_(1)
    with tx, rx.clone() as rx2:
        tx.send_nowait("buffered")
        rx.close()
        rx.close()  # idempotent: counted once
        await rx.aclose()
        assert _stats(tx)["open_receive_streams"] == 1
        with pytest.raises(WouldBlock):  # rx2 still keeps the senders unbroken
            tx.send_nowait("full")
        rx2.close()
        with pytest.raises(ClosedResourceError):
            rx.receive_nowait()
        with pytest.raises(ClosedResourceError):
            await rx.receive()
        with pytest.raises(ClosedResourceError):
            rx.clone()
        with pytest.raises(ClosedResourceError):
            async for _ in rx:
                pass
        tx.close()
        with pytest.raises(ClosedResourceError):  # closed wins over end of stream
            await rx.receive()


async def test_closing_one_sender_clone_keeps_the_stream_open(open_: Factory) -> None:
    tx, rx = open_(1)
    tx2 = tx.clone()
    tx3 = tx2.clone()  # a clone of a clone counts too
    with rx:
        assert _stats(rx)["open_send_streams"] == 3
        tx.close()
        tx2.close()
        assert _stats(rx)["open_send_streams"] == 1
        with pytest.raises(WouldBlock):  # not EndOfStream
            rx.receive_nowait()
        tx3.send_nowait("from the clone")
        assert rx.receive_nowait() == "from the clone"
        tx3.close()
        with pytest.raises(EndOfStream):
            rx.receive_nowait()


async def test_closing_one_receiver_clone_keeps_the_stream_open(open_: Factory) -> None:
    tx, rx = open_(1)
    rx2 = rx.clone()
    with tx, rx2:
        assert _stats(tx)["open_receive_streams"] == 2
        rx.close()
        assert _stats(tx)["open_receive_streams"] == 1
        tx.send_nowait("x")  # not broken
        assert rx2.receive_nowait() == "x"
        with pytest.raises(ClosedResourceError):
            rx.receive_nowait()


async def test_a_receiver_closed_while_its_receive_waits_gets_closed_resource_error(
    open_: Factory,
) -> None:
    tx, rx = open_(0)
    rx2 = rx.clone()
    got: list[str] = []
    closed: list[bool] = []

    async def receive_closed() -> None:
        with pytest.raises(ClosedResourceError):
            await rx.receive()
        closed.append(True)

    async def receive_other() -> None:
        got.append(await rx2.receive())

    with anyio.fail_after(TIMEOUT), tx, rx, rx2:
        async with anyio.create_task_group() as tg:
            tg.start_soon(receive_closed)
            await _until(_waiting_receive(rx, 1))
            tg.start_soon(receive_other)
            await _until(_waiting_receive(rx, 2))
            rx.close()
            await _until(lambda: closed == [True])
            assert _stats(tx)["open_receive_streams"] == 1
            assert _stats(tx)["tasks_waiting_receive"] == 1
            tx.send_nowait("x")  # goes to the clone still open, not to the closed one
        assert got == ["x"]


async def test_a_sender_closed_while_its_send_waits_withdraws_the_item(open_: Factory) -> None:
    tx, rx = open_(0)
    tx2 = tx.clone()
    closed: list[bool] = []

    async def send() -> None:
        with pytest.raises(ClosedResourceError):
            await tx.send("withdrawn")
        closed.append(True)

    with anyio.fail_after(TIMEOUT), tx, tx2, rx:
        async with anyio.create_task_group() as tg:
            tg.start_soon(send)
            await _until(_waiting_send(tx, 1))
            tx.close()
        assert closed == [True]
        with pytest.raises(WouldBlock):  # never delivered; tx2 keeps the stream open
            rx.receive_nowait()
        assert _stats(rx)["tasks_waiting_send"] == 0


# --- cancellation never loses or duplicates an item ----------------------------------------


async def test_a_cancelled_receive_leaves_the_next_item_to_another_receiver(
    open_: Factory,
) -> None:
    tx, rx = open_(0)
    scope = anyio.CancelScope()
    got: list[str] = []

    async def cancelled_receive() -> None:
        with scope:
            got.append(await rx.receive())

    with anyio.fail_after(TIMEOUT), tx, rx:
        async with anyio.create_task_group() as tg:
            tg.start_soon(cancelled_receive)
            await _until(_waiting_receive(rx, 1))
            scope.cancel()
        assert scope.cancelled_caught
        assert got == []
        assert _stats(rx)["tasks_waiting_receive"] == 0
        with pytest.raises(WouldBlock):  # the cancelled receiver left nothing behind
            tx.send_nowait("x")
        async with anyio.create_task_group() as tg:
            tg.start_soon(_append_received, rx, got)
            await _until(_waiting_receive(rx, 1))
            tx.send_nowait("x")
        assert got == ["x"]


async def _append_received(rx: Any, into: list[Any]) -> None:
    into.append(await rx.receive())


async def _append_received_unless_ended(rx: Any, into: list[Any]) -> None:
    try:
        into.append(await rx.receive())
    except EndOfStream:
        pass


async def test_a_receiver_cancelled_just_before_an_item_arrives_does_not_take_it(
    open_: Factory,
) -> None:
    """Cancel, then send, in one loop iteration: the item skips the cancelled receiver."""
    tx, rx = open_(0)
    scope = anyio.CancelScope()
    cancelled_got: list[str] = []
    other_got: list[str] = []

    async def cancelled_receive() -> None:
        with scope:
            cancelled_got.append(await rx.receive())

    with anyio.fail_after(TIMEOUT), tx, rx:
        async with anyio.create_task_group() as tg:
            tg.start_soon(cancelled_receive)
            await _until(_waiting_receive(rx, 1))
            tg.start_soon(_append_received, rx, other_got)
            await _until(_waiting_receive(rx, 2))
            scope.cancel()
            tx.send_nowait("x")  # no await in between: the cancelled task has not resumed
        assert scope.cancelled_caught
        assert cancelled_got == []
        assert other_got == ["x"]


@pytest.mark.parametrize("other_receiver", [False, True])
async def test_an_item_handed_over_as_the_receiver_is_cancelled_is_received_exactly_once(
    open_: Factory, other_receiver: bool
) -> None:
    """The hard case through an anyio cancel scope: send, then cancel, in one iteration.

    The sender's `send_nowait` completes the waiting receiver's wait, and the receiver's scope
    is cancelled before that task resumes. anyio's scopes do not cancel a task whose awaited
    future is already done (it will resume anyway), so in both implementations the receiver
    gets the item. What the suite requires is the invariant: the item is received exactly once,
    by the cancelled receiver, by another one, or still receivable afterwards.
    """
    tx, rx = open_(0)
    scope = anyio.CancelScope()
    cancelled_got: list[str] = []
    other_got: list[str] = []

    async def cancelled_receive() -> None:
        with scope:
            cancelled_got.append(await rx.receive())

    with anyio.fail_after(TIMEOUT), tx, rx:
        async with anyio.create_task_group() as tg:
            tg.start_soon(cancelled_receive)
            await _until(_waiting_receive(rx, 1))
            if other_receiver:
                tg.start_soon(_append_received_unless_ended, rx, other_got)
                await _until(_waiting_receive(rx, 2))
            tx.send_nowait("x")
            scope.cancel()  # same iteration: the receiving task has not resumed yet
            await _until(lambda: bool(cancelled_got) or scope.cancelled_caught)
            if other_receiver and not other_got:
                tx.close()  # let the other receiver finish if the item went elsewhere
                await _until(lambda: _stats(rx)["tasks_waiting_receive"] == 0)
        leftover = _drain(rx)
        assert sorted(cancelled_got + other_got + leftover) == ["x"]


@pytest.mark.parametrize("other_receiver", [False, True])
async def test_ours_an_item_handed_to_a_natively_cancelled_receiver_goes_back(
    other_receiver: bool,
) -> None:
    """The hard case through asyncio's own cancellation (Task.cancel, asyncio.timeout, ...).

    `send_nowait` completes the receiver's future, then the receiving task is cancelled before
    it resumes: asyncio throws CancelledError into it although its future holds the item. Ours
    hands the item back to the next waiting receiver, else to the front of the buffer.

    Ours only: anyio has stored the item on its receiver record and the CancelledError
    discards it, so with anyio the item is lost (anyio only guards the case where the
    cancellation is already pending when `send_nowait` runs).
    """
    tx, rx = open_channel[str](0)
    with anyio.fail_after(TIMEOUT), tx, rx:
        first = asyncio.ensure_future(rx.receive())
        await _until(_waiting_receive(rx, 1))
        second = None
        if other_receiver:
            second = asyncio.ensure_future(rx.receive())
            await _until(_waiting_receive(rx, 2))
        tx.send_nowait("x")
        first.cancel()  # same iteration: `first` has its item but has not resumed
        await asyncio.wait([first])
        assert first.cancelled()
        if second is not None:
            await asyncio.wait([second])
            assert second.result() == "x"
            with pytest.raises(WouldBlock):
                rx.receive_nowait()
        else:
            assert _stats(rx)["current_buffer_used"] == 1
            assert rx.receive_nowait() == "x"


async def test_ours_a_handed_back_item_keeps_its_place_in_line() -> None:
    """Ours only (see above): the handed-back item goes to the buffer's front, ahead of an item
    sent after it, even if that overfills the buffer for a moment."""
    tx, rx = open_channel[str](1)
    with anyio.fail_after(TIMEOUT), tx, rx:
        first = asyncio.ensure_future(rx.receive())
        await _until(_waiting_receive(rx, 1))
        tx.send_nowait("x")  # to `first`
        tx.send_nowait("y")  # to the buffer
        first.cancel()
        await asyncio.wait([first])
        assert first.cancelled()
        assert _drain(rx) == ["x", "y"]


@pytest.mark.parametrize("other_receiver", [False, True])
async def test_ours_a_handed_back_item_is_not_stranded_behind_end_of_stream(
    other_receiver: bool,
) -> None:
    """A natively cancelled receiver hands its item back after the last sender closed.

    Ours only (anyio drops the item, see above). `first` is given "x" and is cancelled before it
    resumes, then the last sender closes. End of stream must wait for that hand-over: "x" goes
    to `second` if it waits, else stays receivable, and only then does the stream end. (An
    earlier version told `second` EndOfStream at once and left "x" in the buffer behind it,
    where a consumer iterating `async for` had already stopped.)
    """
    tx, rx = open_channel[str](0)
    rx2 = rx.clone()
    with anyio.fail_after(TIMEOUT), rx, rx2:
        first = asyncio.ensure_future(rx.receive())
        await _until(_waiting_receive(rx, 1))
        second = None
        if other_receiver:
            second = asyncio.ensure_future(rx2.receive())
            await _until(_waiting_receive(rx, 2))
        tx.send_nowait("x")
        first.cancel()
        tx.close()
        await asyncio.wait([first])
        assert first.cancelled()
        if second is not None:
            await asyncio.wait([second])
            assert second.exception() is None, "second saw EndOfStream while 'x' was in flight"
            assert second.result() == "x"
            with pytest.raises(EndOfStream):
                await rx2.receive()
        else:
            assert [item async for item in rx2] == ["x"]


async def test_closing_the_last_sender_during_a_hand_over_still_delivers_the_item(
    open_: Factory,
) -> None:
    """Send to a waiting receiver and close the last sender in one iteration: the receiver gets
    the item, another waiting receiver gets EndOfStream, and the stream stays ended."""
    tx, rx = open_(0)
    rx2 = rx.clone()
    got: list[str] = []
    ended: list[bool] = []

    async def receive_until_end() -> None:
        with pytest.raises(EndOfStream):
            await rx2.receive()
        ended.append(True)

    with anyio.fail_after(TIMEOUT), rx, rx2:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_append_received, rx, got)
            await _until(_waiting_receive(rx, 1))
            tg.start_soon(receive_until_end)
            await _until(_waiting_receive(rx, 2))
            tx.send_nowait("x")
            tx.close()
        assert got == ["x"]
        assert ended == [True]
        with pytest.raises(EndOfStream):
            await rx.receive()


@pytest.mark.parametrize("size", [0, 1])
async def test_a_cancelled_waiting_send_does_not_deliver_its_item(
    open_: Factory, size: int
) -> None:
    tx, rx = open_(size)
    scope = anyio.CancelScope()
    returned: list[bool] = []

    async def cancelled_send() -> None:
        with scope:
            await tx.send("cancelled")
            returned.append(True)

    with anyio.fail_after(TIMEOUT), tx, rx:
        for i in range(size):
            tx.send_nowait(i)
        async with anyio.create_task_group() as tg:
            tg.start_soon(cancelled_send)
            await _until(_waiting_send(tx, 1))
            scope.cancel()
        assert scope.cancelled_caught
        assert returned == []
        assert _stats(tx)["tasks_waiting_send"] == 0
        assert _drain(rx) == list(range(size))  # the cancelled item is not among them
        with pytest.raises(WouldBlock):
            rx.receive_nowait()
        if size:
            tx.send_nowait("next")  # the cancelled send left no stale entry taking room
            assert _drain(rx) == ["next"]


async def test_a_cancelled_unbuffered_send_leaves_nothing_for_a_later_receiver(
    open_: Factory,
) -> None:
    tx, rx = open_(0)
    scope = anyio.CancelScope()
    got: list[str] = []

    async def cancelled_send() -> None:
        with scope:
            await tx.send("cancelled")

    with anyio.fail_after(TIMEOUT), tx, rx:
        async with anyio.create_task_group() as tg:
            tg.start_soon(cancelled_send)
            await _until(_waiting_send(tx, 1))
            scope.cancel()
        assert scope.cancelled_caught
        async with anyio.create_task_group() as tg:
            tg.start_soon(_append_received, rx, got)
            await _until(_waiting_receive(rx, 1))
            await _spin()
            assert got == []  # the receiver waits: the cancelled item is gone
            await tx.send("next")
        assert got == ["next"]


async def test_a_send_cancelled_after_its_item_was_taken_is_delivered_exactly_once(
    open_: Factory,
) -> None:
    """Receive from a waiting sender, then cancel that sender's scope, in one iteration."""
    tx, rx = open_(0)
    scope = anyio.CancelScope()
    returned: list[bool] = []

    async def send() -> None:
        with scope:
            await tx.send("x")
            returned.append(True)

    with anyio.fail_after(TIMEOUT), tx, rx:
        async with anyio.create_task_group() as tg:
            tg.start_soon(send)
            await _until(_waiting_send(tx, 1))
            assert rx.receive_nowait() == "x"
            scope.cancel()
        # The item was delivered, so the send must report success, or a caller that retries
        # cancelled sends would deliver it twice.
        assert returned == [True]
        assert not scope.cancelled_caught
        with pytest.raises(WouldBlock):
            rx.receive_nowait()


# --- many producers, many consumers --------------------------------------------------------


@pytest.mark.parametrize("size", [0, 3])
async def test_many_producers_and_consumers_get_every_item_exactly_once(
    open_: Factory, size: int
) -> None:
    producers, consumers, per_producer = 5, 4, 100
    rng = random.Random(size)
    tx, rx = open_(size)
    received: dict[int, list[tuple[int, int]]] = {c: [] for c in range(consumers)}
    finished: list[int] = []

    async def produce(sender: Any, p: int) -> None:
        async with sender:
            for i in range(per_producer):
                await sender.send((p, i))
                if rng.random() < 0.3:
                    await checkpoint()

    async def consume(receiver: Any, c: int) -> None:
        async with receiver:
            async for item in receiver:
                received[c].append(item)
                if rng.random() < 0.3:
                    await checkpoint()
        finished.append(c)

    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            with rx:
                for c in range(consumers):
                    tg.start_soon(consume, rx.clone(), c)
            with tx:
                for p in range(producers):
                    tg.start_soon(produce, tx.clone(), p)

    everything = Counter(item for items in received.values() for item in items)
    assert everything == Counter((p, i) for p in range(producers) for i in range(per_producer))
    assert sorted(finished) == list(range(consumers))  # the stream ended for every consumer
    assert sum(1 for items in received.values() if items) > 1  # the work was actually shared
    for items in received.values():  # each consumer sees each producer's items in order
        for p in range(producers):
            mine = [i for q, i in items if q == p]
            assert mine == sorted(mine)


async def test_randomly_cancelled_receivers_never_lose_or_duplicate_items(
    open_: Factory,
) -> None:
    """Consumers whose receives are cancelled through anyio scopes at random moments."""
    rng = random.Random(7)
    total, consumers = 300, 4
    tx, rx = open_(0)
    received: list[int] = []
    scopes: list[anyio.CancelScope] = []
    consumers_done = anyio.Event()
    cancels = 0

    async def produce() -> None:
        async with tx:
            for i in range(total):
                await tx.send(i)
                if rng.random() < 0.5:
                    await checkpoint()

    async def consume(receiver: Any) -> None:
        async with receiver:
            while True:
                with anyio.CancelScope() as scope:
                    scopes.append(scope)
                    try:
                        received.append(await receiver.receive())
                    except EndOfStream:
                        return
                    finally:
                        scopes.remove(scope)

    async def cancel_at_random() -> None:
        nonlocal cancels
        while not consumers_done.is_set():
            if scopes and rng.random() < 0.5:
                rng.choice(scopes).cancel()
                cancels += 1
            await checkpoint()

    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(cancel_at_random)
            async with anyio.create_task_group() as workers:
                with rx:
                    for _ in range(consumers):
                        workers.start_soon(consume, rx.clone())
                workers.start_soon(produce)
            consumers_done.set()

    assert cancels > 10
    assert sorted(received) == list(range(total))


async def test_ours_randomly_natively_cancelled_receives_never_lose_or_duplicate_items() -> None:
    """As above, but receives are asyncio tasks cancelled with Task.cancel().

    Ours only: that exercises the hand-back of an item given to a receiver that is cancelled
    before it resumes, which anyio does not do (with anyio such items are lost). Items a
    receiver did not get stay in the channel, so whatever is left is drained at the end.
    """
    rng = random.Random(11)
    total = 300
    tx, rx = open_channel[int](0)
    received: list[int] = []
    native_cancels = 0

    async def produce() -> None:
        async with tx:
            for i in range(total):
                await tx.send(i)
                if rng.random() < 0.5:
                    await checkpoint()

    with anyio.fail_after(TIMEOUT), rx:
        async with anyio.create_task_group() as tg:
            tg.start_soon(produce)
            pending: list[asyncio.Future[int]] = []
            ended = False
            while not ended:
                while len(pending) < 4:
                    pending.append(asyncio.ensure_future(rx.receive()))
                await checkpoint()
                if rng.random() < 0.6 and rng.choice(pending).cancel():
                    native_cancels += 1
                done = [f for f in pending if f.done()]
                pending = [f for f in pending if not f.done()]
                for f in done:
                    if f.cancelled():
                        continue
                    if isinstance(f.exception(), EndOfStream):
                        ended = True
                    else:
                        received.append(f.result())
            for f in pending:
                f.cancel()
            if pending:
                await asyncio.wait(pending)
            for f in pending:
                if not f.cancelled() and f.exception() is None:
                    received.append(f.result())
        received.extend(_drain(rx))

    assert native_cancels > 10
    assert sorted(received) == list(range(total))


# --- statistics -----------------------------------------------------------------------------


async def test_statistics_agree_with_anyio(open_: Factory) -> None:
    tx, rx = open_(2)
    got: list[str] = []

    def expect(**fields: float) -> None:
        base = {
            "current_buffer_used": 0,
            "max_buffer_size": 2,
            "open_send_streams": 2,
            "open_receive_streams": 3,
            "tasks_waiting_send": 0,
            "tasks_waiting_receive": 0,
        }
        assert _stats(tx) == _stats(rx) == {**base, **fields}

    with anyio.fail_after(TIMEOUT), tx, rx:
        assert _stats(tx) == {
            "current_buffer_used": 0,
            "max_buffer_size": 2,
            "open_send_streams": 1,
            "open_receive_streams": 1,
            "tasks_waiting_send": 0,
            "tasks_waiting_receive": 0,
        }
        with tx.clone() as tx2, rx.clone() as rx2, rx2.clone() as rx3:
            expect()
            tx.send_nowait(1)
            expect(current_buffer_used=1)
            tx2.send_nowait(2)
            expect(current_buffer_used=2)
            async with anyio.create_task_group() as tg:
                tg.start_soon(tx.send, 3)
                await _until(_waiting_send(tx, 1))
                expect(current_buffer_used=2, tasks_waiting_send=1)
                assert rx.receive_nowait() == 1  # admits the waiting send into the buffer
                expect(current_buffer_used=2)
            assert _drain(rx3) == [2, 3]
            expect()

            async with anyio.create_task_group() as tg:
                tg.start_soon(_append_received, rx, got)
                tg.start_soon(_append_received, rx2, got)
                await _until(_waiting_receive(rx, 2))
                expect(tasks_waiting_receive=2)
                tx.send_nowait("x")
                expect(tasks_waiting_receive=1)  # handed over, before that receiver resumes
                await _until(lambda: got == ["x"])
                expect(tasks_waiting_receive=1)
                tg.cancel_scope.cancel()
            expect()
        assert _stats(tx) == {
            "current_buffer_used": 0,
            "max_buffer_size": 2,
            "open_send_streams": 1,
            "open_receive_streams": 1,
            "tasks_waiting_send": 0,
            "tasks_waiting_receive": 0,
        }
        tx.close()
        assert _stats(rx)["open_send_streams"] == 0
        rx.close()
        assert _stats(tx)["open_receive_streams"] == 0


async def test_statistics_of_an_unbuffered_channel_agree_with_anyio(open_: Factory) -> None:
    tx, rx = open_(0)
    with anyio.fail_after(TIMEOUT), tx, rx:
        async with anyio.create_task_group() as tg:
            tg.start_soon(tx.send, "x")
            await _until(_waiting_send(tx, 1))
            assert _stats(rx) == {
                "current_buffer_used": 0,
                "max_buffer_size": 0,
                "open_send_streams": 1,
                "open_receive_streams": 1,
                "tasks_waiting_send": 1,
                "tasks_waiting_receive": 0,
            }
            assert rx.receive_nowait() == "x"
            assert _stats(rx)["tasks_waiting_send"] == 0
            assert _stats(rx)["current_buffer_used"] == 0


# --- the intended difference: no loop trip when nothing has to wait -------------------------


async def _other_task_ran_during_ready_calls(tx: Any, rx: Any) -> bool:
    """Whether a task scheduled with start_soon ran during 100 send/receive pairs that had room
    or an item at hand, plus an `async for` over a full buffer."""
    ran = anyio.Event()

    async def mark() -> None:
        ran.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(mark)
        for i in range(100):
            await tx.send(i)
            assert await rx.receive() == i
        for i in range(100):
            tx.send_nowait(i)
        tx.close()
        assert [item async for item in rx] == list(range(100))
        yielded = ran.is_set()
    assert ran.is_set()
    return yielded


async def test_ours_send_and_receive_do_not_yield_when_they_need_not_wait() -> None:
    """Ours only, on purpose: anyio's `send`/`receive` always pass a checkpoint first; ours
    skip that loop trip when the buffer has room or an item (see the `_channels` docstring)."""
    tx, rx = open_channel[int](100)
    with anyio.fail_after(TIMEOUT), tx, rx:
        assert not await _other_task_ran_during_ready_calls(tx, rx)


async def test_anyio_does_yield_where_ours_does_not() -> None:
    """The probe above can fail: anyio's streams, which always checkpoint, trip it."""
    tx, rx = anyio.create_memory_object_stream[int](100)
    with anyio.fail_after(TIMEOUT), tx, rx:
        assert await _other_task_ran_during_ready_calls(tx, rx)


async def test_ours_a_receive_whose_coroutine_is_closed_loses_and_strands_nothing() -> None:
    """A waiting `receive` coroutine closed outright (GeneratorExit, not a cancellation):
    while still waiting it leaves the queue; once handed an item it gives the item back, and
    end-of-stream still arrives (a lost hand-over would hold it back for good)."""
    tx, rx = open_channel[str](0)
    with rx:
        idle = rx.receive()
        idle.send(None)  # parked on its future
        assert rx.statistics().tasks_waiting_receive == 1
        idle.close()
        assert rx.statistics().tasks_waiting_receive == 0

        handed = rx.receive()
        handed.send(None)
        tx.send_nowait("x")  # given to `handed`, which never resumes
        handed.close()
        tx.close()
        assert rx.receive_nowait() == "x"
        with pytest.raises(anyio.EndOfStream):
            rx.receive_nowait()
