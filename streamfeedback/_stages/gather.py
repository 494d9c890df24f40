"""Gather: join the `n` responses of each prompt by prompt id, in routing order.

Its dict of partial joins is the only state in the pipeline that grows, and it holds only
prompts in flight. A prompt with a failed generation becomes a `Failure` once all its
responses are in, so a late answer never resurrects a prompt already reported.
"""

from __future__ import annotations

from collections.abc import Callable

from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .._channels import iterate, send
from .._records import Failure, Generation, GenerationFailure, Joined

__all__ = ["run"]

_Slot = Generation | GenerationFailure | None


async def run(
    results: MemoryObjectReceiveStream[Generation | GenerationFailure],
    joined: MemoryObjectSendStream[Joined],
    failures: MemoryObjectSendStream[Failure],
    *,
    on_complete: Callable[[str], None] | None = None,
) -> None:
    """Emit a `Joined` per complete prompt; closes both outputs at the end of `results`.

    `on_complete(prompt_id)` is told when a prompt has all its answers (or failures).
    """
    pending: dict[str, list[_Slot]] = {}
    async with results, joined, failures:
        async for item in iterate(results):
            key = item.prompt.id
            slots = pending.get(key)
            if slots is None:
                slots = pending[key] = [None] * len(item.models)
            slots[item.slot] = item
            if any(s is None for s in slots):
                continue
            del pending[key]
            if on_complete is not None:
                on_complete(key)
            done = [s for s in slots if isinstance(s, Generation)]
            if len(done) == len(slots):
                await send(joined, Joined(prompt=item.prompt, generations=done))
            else:
                await send(failures, _failure(slots))
        for slots in pending.values():
            await failures.send(_failure(slots, incomplete=True))


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
