"""Routing: each batch of `batch_size` prompts goes to the same `n` models of the pool.

The draw for a batch depends only on the seed and the batch's position in the source, so
the same seed gives the same routing, also when a resumed run skips prompts already done.
Each (prompt, model) pair is sent to that model's queue the moment the prompt arrives:
nothing waits for a batch to fill. A prompt an earlier run spooled in part keeps its models
and goes only to those whose responses are missing.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence

from .._channels import Receiver, Sender
from .._records import GenerationJob, Prompt

__all__ = ["models_for_batch", "run"]


def models_for_batch(pool: Sequence[str], *, n: int, seed: int, batch: int) -> tuple[str, ...]:
    """The `n` distinct models that batch number `batch` goes to, in their record order."""
    return tuple(random.Random(f"{seed}:{batch}").sample(list(pool), n))


async def run(
    prompts: Receiver[Prompt],
    queues: Mapping[str, Sender[GenerationJob]],
    *,
    n: int,
    batch_size: int,
    seed: int,
    available: Callable[[int], list[str]] | None = None,
    resumed: Mapping[str, tuple[tuple[str, ...], frozenset[int]]] | None = None,
) -> None:
    """Fan each prompt out to the queues of its batch's models; closes every queue at the end.

    `prompts` must carry their source ordinal in `Prompt.index` (1-based). `available(n)`
    narrows the draw to healthy models; with every model healthy the routing is the seed's.
    `resumed` maps prompts spooled in part to (their models, the slots already done).
    """
    everyone = list(queues)
    current_batch = -1
    models: tuple[str, ...] = ()
    try:
        async with prompts:
            async for prompt in prompts:
                earlier = resumed.get(prompt.id) if resumed else None
                if earlier is not None:
                    routed, done = earlier
                    for slot, model in enumerate(routed):
                        if slot not in done:
                            job = GenerationJob(prompt=prompt, models=routed, slot=slot)
                            await queues[model].send(job)
                    continue
                batch = (prompt.index - 1) // batch_size
                if batch != current_batch:
                    current_batch = batch
                    pool = everyone if available is None else available(n)
                    models = models_for_batch(pool, n=n, seed=seed, batch=batch)
                for slot, model in enumerate(models):
                    job = GenerationJob(prompt=prompt, models=models, slot=slot)
                    await queues[model].send(job)
    finally:
        for queue in queues.values():
            await queue.aclose()
