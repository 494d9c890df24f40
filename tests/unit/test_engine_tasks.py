"""TaskHost: the task group an engine owns for background work (Ray's restart supervisor)."""

from __future__ import annotations

import asyncio
import logging

import anyio
import pytest
from anyio.lowlevel import checkpoint

from streamfeedback.engines._tasks import TaskHost


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_a_crash_is_heard_at_once_and_cancels_the_rest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, "streamfeedback")
    host = TaskHost("demo")
    await host.open()
    sibling_cancelled = anyio.Event()

    async def long() -> None:
        try:
            await anyio.sleep_forever()
        finally:
            sibling_cancelled.set()

    async def boom() -> None:
        raise RuntimeError("a bug")

    try:
        host.start_soon(long, name="long")
        host.start_soon(boom, name="boom")
        with anyio.fail_after(5):
            await sibling_cancelled.wait()
            while host.failure is None:
                await checkpoint()
        assert isinstance(host.failure, RuntimeError), "the crash itself, not a group"
        assert "demo: a background task failed: RuntimeError('a bug')" in caplog.text
        with pytest.raises(RuntimeError, match="not open"):
            host.start_soon(long, name="late")
    finally:
        await host.aclose()


async def test_aclose_cancels_what_runs_and_leaves_no_task() -> None:
    host = TaskHost("quiet")
    await host.open()
    finished = anyio.Event()

    async def long() -> None:
        try:
            await anyio.sleep_forever()
        finally:
            finished.set()

    host.start_soon(long, name="long")
    await asyncio.sleep(0)
    with anyio.fail_after(5):
        await host.aclose()
    assert finished.is_set(), "aclose waited for the task to end"
    assert host.failure is None, "a cancel is not a crash"
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "quiet-tasks"]
    await host.aclose()  # twice is fine
