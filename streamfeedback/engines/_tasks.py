"""A task group an engine owns for work that outlives a call (Ray's restart supervisor).

An engine is started by one task and closed by another (the pipeline starts engines in a
task group of their own, and closes them from `__aexit__`), and an anyio task group must be
left by the task that entered it. So the group lives in a host task of its own, opened by
`open` and closed by `aclose`. A crash in it is heard at once, not at `aclose`: it is logged
as it happens, `failure` holds it, and the engine raises it (as `EngineUnavailable`) from its
next call.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

import anyio
from anyio.abc import TaskGroup

from .._groups import unwrap_group

__all__ = ["TaskHost"]

log = logging.getLogger("streamfeedback.engines")


class TaskHost:
    """One task group in a host task of its own; `name` says whose in logs."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.failure: BaseException | None = None
        self._tg: TaskGroup | None = None
        self._task: asyncio.Task[None] | None = None

    async def open(self) -> None:
        """Start the host task and wait until its task group is open."""
        if self._task is not None:
            return
        loop = asyncio.get_running_loop()
        opened: asyncio.Future[TaskGroup] = loop.create_future()
        self._task = loop.create_task(self._host(opened), name=f"{self.name}-tasks")
        self._tg = await opened

    def start_soon(
        self, fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any, name: str
    ) -> None:
        """Run `fn(*args)` in the group. :raises RuntimeError: not open, or closed."""
        if self._tg is None:
            raise RuntimeError(f"{self.name}: the task group is not open")
        self._tg.start_soon(fn, *args, name=name)

    async def aclose(self) -> None:
        """Cancel what still runs and wait for it; safe to call twice or before `open`."""
        task, self._task, self._tg = self._task, None, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task})

    async def _host(self, opened: asyncio.Future[TaskGroup]) -> None:
        try:
            async with anyio.create_task_group() as tg:
                opened.set_result(tg)
                await anyio.sleep_forever()
        except Exception as exc:  # a crash of a task in the group
            self.failure = unwrap_group(exc)
            self._tg = None
            log.error("%s: a background task failed: %r", self.name, self.failure)
