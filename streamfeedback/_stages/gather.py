"""Gather: join the `n` responses of each prompt by prompt id, in routing order.

A join table, not a task: generation workers hand it their results directly, and the worker
that brings a prompt's last response sends the `Joined` on. That saves a channel hop and a
task wake per response, which is most of the pipeline's own cost on fast engines.

Its dict of partial joins is the only state in the pipeline that grows, and it holds only
prompts in flight. A prompt with a failed generation becomes a `Failure` once all its
responses are in, so a late answer never resurrects a prompt already reported.
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType

from .._channels import Sender
from .._records import Failure, Generation, GenerationFailure, Joined

__all__ = ["Gather"]

_Slot = Generation | GenerationFailure | None


class Gather:
    """Emits a `Joined` per complete prompt to `joined`, a `Failure` per failed one.

    `on_complete(prompt_id)` is told when a prompt has all its answers (or failures).
    Leaving `async with` normally reports the prompts still incomplete as failures (unless
    `stopping()`: the run was stopped, and they are unfinished, for a rerun); leaving it in any
    way closes both outputs.
    """

    def __init__(
        self,
        joined: Sender[Joined],
        failures: Sender[Failure],
        *,
        on_complete: Callable[[str], None] | None = None,
        stopping: Callable[[], bool] | None = None,
    ) -> None:
        self._joined = joined
        self._failures = failures
        self._on_complete = on_complete
        self._stopping = stopping
        self._pending: dict[str, tuple[list[_Slot], list[int]]] = {}

    @property
    def pending(self) -> int:
        """Prompts with some but not all of their responses in."""
        return len(self._pending)

    async def send(self, item: Generation | GenerationFailure) -> None:
        """Add one response; sends the prompt on if it was the last one missing."""
        key = item.prompt.id
        entry = self._pending.get(key)
        if entry is None:
            entry = self._pending[key] = ([None] * len(item.models), [len(item.models)])
        slots, missing = entry
        if slots[item.slot] is None:
            missing[0] -= 1
        slots[item.slot] = item
        if missing[0]:
            return
        del self._pending[key]
        if self._on_complete is not None:
            self._on_complete(key)
        done = [s for s in slots if isinstance(s, Generation)]
        if len(done) == len(slots):
            await self._joined.send(Joined(prompt=item.prompt, generations=done))
        else:
            await self._failures.send(_failure(slots))

    async def aclose(self) -> None:
        """Report every incomplete prompt as a failure, then close both outputs."""
        try:
            pending, self._pending = self._pending, {}
            if self._stopping is not None and self._stopping():
                return
            for slots, _ in pending.values():
                await self._failures.send(_failure(slots, incomplete=True))
        finally:
            self._close()

    def _close(self) -> None:
        self._joined.close()
        self._failures.close()

    async def __aenter__(self) -> Gather:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            await self.aclose()
        else:
            self._close()


def _failure(slots: list[_Slot], *, incomplete: bool = False) -> Failure:
    known = next(s for s in slots if s is not None)
    failed = [s for s in slots if isinstance(s, GenerationFailure)]
    if failed:
        error = "; ".join(f.error for f in failed)
        model = ",".join(f.model for f in failed)
    else:
        error, model = "the run ended before every response arrived", None
    if incomplete and failed:
        error += "; the run ended before every response arrived"
    return Failure(
        id=known.prompt.id,
        stage="generation",
        error=error,
        instruction=known.prompt.instruction,
        line=known.prompt.line,
        model=model,
    )
