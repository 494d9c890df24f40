"""Rating: a pool of judge workers; each joined prompt becomes a `Record` or a `Failure`.

The pool size caps prompts under judgement; the judge engine's own limiter keeps requests
within the API's limits, so workers simply wait their turn there.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import anyio

from .._channels import Receiver, Sender
from .._exceptions import JudgeError, JudgeUnavailable
from .._judge.judge import Judge
from .._records import Failure, Joined, Record

__all__ = ["run"]

log = logging.getLogger("streamfeedback.rating")


async def run(
    judge: Judge,
    joined: Receiver[Joined],
    records: Sender[Record],
    failures: Sender[Failure],
    *,
    concurrency: int,
    stopping: Callable[[], bool] | None = None,
) -> None:
    """Rate everything from `joined`; closes `records` and `failures` at the end.

    Once `stopping()`, prompts not yet under judgement are passed over (a stopped run leaves
    them in the spool, for a rerun) and only the requests in flight finish."""

    async def worker(
        inbox: Receiver[Joined],
        outbox: Sender[Record],
        failed: Sender[Failure],
    ) -> None:
        async with inbox, outbox, failed:
            async for item in inbox:
                if stopping is not None and stopping():
                    continue
                try:
                    record = await judge.rate(item)
                except JudgeUnavailable as exc:
                    if exc.prompt_error is not None:
                        await failed.send(_failure(item, exc.prompt_error))
                    raise
                except JudgeError as exc:
                    log.warning("rating failed for %s: %s", item.prompt.id, exc)
                    await failed.send(_failure(item, str(exc)))
                    continue
                await outbox.send(record)

    async with joined, records, failures, anyio.create_task_group() as tg:
        for i in range(concurrency):
            tg.start_soon(
                worker, joined.clone(), records.clone(), failures.clone(), name=f"judge-{i}"
            )


def _failure(item: Joined, error: str) -> Failure:
    return Failure(
        id=item.prompt.id,
        stage="rating",
        error=error,
        instruction=item.prompt.instruction,
        line=item.prompt.line,
    )
