"""Gather: join the `n` responses of each prompt by prompt id, in routing order.

A join table, not a task: generation workers hand it their results directly, and the worker
that brings a prompt's last response sends the `Joined` on. That saves a channel hop and a
task wake per response, which is most of the pipeline's own cost on fast engines.

Its dict of partial joins is the only state in the pipeline that grows, and it holds only
prompts in flight. A prompt with a failed generation becomes a `Failure` once all its
responses are in, so a late answer never resurrects a prompt already reported.

With a spool, each generation goes to the spool the moment it arrives (the spool joins them
for the judge, and a kill loses no finished response); the table then only tracks which
prompts are complete or failed. A prompt an earlier run spooled in part waits only for the
responses it lacks.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from types import TracebackType

from .._channels import Sender
from .._records import Failure, Generation, GenerationFailure, Joined, Prompt

__all__ = ["Gather"]


class _Spooled:
    """A slot an earlier run's generation fills (it is in the spool, not here)."""


_SPOOLED = _Spooled()

_Slot = Generation | GenerationFailure | _Spooled | None


class Gather:
    """Emits a `Joined` per complete prompt to `joined`, a `Failure` per failed one.

    With `spool` instead of `joined`, every generation goes there as it arrives, and
    `on_failed(prompt_id)` is told when a prompt is given up. `resumed` maps prompts an
    earlier run spooled in part to (models, slots done); an entry is taken when the prompt's
    first response arrives. `on_complete(prompt_id)` is told when a prompt has all its
    answers (or failures). Leaving `async with` normally reports the prompts still
    incomplete as failures; leaving it in any way closes every output.
    """

    def __init__(
        self,
        joined: Sender[Joined] | None,
        failures: Sender[Failure],
        *,
        spool: Sender[Generation] | None = None,
        resumed: MutableMapping[str, tuple[tuple[str, ...], frozenset[int]]] | None = None,
        on_complete: Callable[[str], None] | None = None,
        on_failed: Callable[[str], None] | None = None,
    ) -> None:
        self._joined = joined
        self._failures = failures
        self._spool = spool
        self._resumed = resumed if resumed is not None else {}
        self._on_complete = on_complete
        self._on_failed = on_failed
        self._pending: dict[str, tuple[Prompt, list[_Slot], list[int]]] = {}

    @property
    def pending(self) -> int:
        """Prompts with some but not all of their responses in."""
        return len(self._pending)

    async def send(self, item: Generation | GenerationFailure) -> None:
        """Add one response; sends the prompt on if it was the last one missing."""
        if self._spool is not None and isinstance(item, Generation):
            await self._spool.send(item)
        key = item.prompt.id
        entry = self._pending.get(key)
        if entry is None:
            entry = self._pending[key] = self._open(item)
        prompt, slots, missing = entry
        if slots[item.slot] is None:
            missing[0] -= 1
        slots[item.slot] = item
        if missing[0]:
            return
        del self._pending[key]
        if self._on_complete is not None:
            self._on_complete(key)
        if all(isinstance(s, (Generation, _Spooled)) for s in slots):
            if self._joined is not None:
                done = [s for s in slots if isinstance(s, Generation)]
                await self._joined.send(Joined(prompt=prompt, generations=done))
            return
        if self._on_failed is not None:
            self._on_failed(key)
        await self._failures.send(_failure(prompt, slots))

    def _open(self, item: Generation | GenerationFailure) -> tuple[Prompt, list[_Slot], list[int]]:
        slots: list[_Slot] = [None] * len(item.models)
        resumed = self._resumed.pop(item.prompt.id, None)
        if resumed is not None:
            for slot in resumed[1]:
                slots[slot] = _SPOOLED
        return item.prompt, slots, [slots.count(None)]

    async def aclose(self) -> None:
        """Report every incomplete prompt as a failure, then close both outputs."""
        try:
            pending, self._pending = self._pending, {}
            for prompt, slots, _ in pending.values():
                await self._failures.send(_failure(prompt, slots, incomplete=True))
        finally:
            self._close()

    def _close(self) -> None:
        for out in (self._joined, self._spool):
            if out is not None:
                out.close()
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


def _failure(prompt: Prompt, slots: list[_Slot], *, incomplete: bool = False) -> Failure:
    failed = [s for s in slots if isinstance(s, GenerationFailure)]
    if failed:
        error = "; ".join(f.error for f in failed)
        model = ",".join(f.model for f in failed)
    else:
        error, model = "the run ended before every response arrived", None
    if incomplete and failed:
        error += "; the run ended before every response arrived"
    return Failure(
        id=prompt.id,
        stage="generation",
        error=error,
        instruction=prompt.instruction,
        line=prompt.line,
        model=model,
    )
