"""Generation: a pool of request workers per engine, so each engine always has work queued.

Every job becomes its own `engine.generate` call as soon as a worker is free; up to
`concurrency` calls are in flight per engine (continuous dispatch, never "send a batch,
wait for the slowest"). A failed call becomes a `GenerationFailure` for gather to decide on.
"""

from __future__ import annotations

import logging

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .._channels import iterate, send
from .._config import GeneratorConfig, PrinciplesConfig
from .._exceptions import EngineError, EngineUnavailable
from .._gauges import EngineGauge
from .._principles import pick_principle
from .._records import ChatRequest, Generation, GenerationFailure, GenerationJob, Message
from ..engines import Engine

__all__ = ["build_request", "run"]

log = logging.getLogger("streamfeedback.generation")


def build_request(
    job: GenerationJob, config: GeneratorConfig, principle: str | None = None
) -> ChatRequest:
    """The chat a generator is asked for one prompt: system prompt(s), then the user turn."""
    messages = [Message("user", job.prompt.instruction)]
    system = "\n\n".join(p for p in (config.system_prompt, principle) if p)
    if system:
        messages.insert(0, Message("system", system))
    return ChatRequest(
        id=f"{job.prompt.id}:{job.models[job.slot]}",
        messages=messages,
        max_tokens=config.max_tokens,
        temperature=config.temperature,
        top_p=config.top_p,
        seed=config.seed,
    )


async def run(
    engine: Engine,
    jobs: MemoryObjectReceiveStream[GenerationJob],
    results: MemoryObjectSendStream[Generation | GenerationFailure],
    *,
    config: GeneratorConfig,
    concurrency: int,
    principles: PrinciplesConfig | None = None,
    gauge: EngineGauge | None = None,
) -> None:
    """Serve `jobs` with `concurrency` workers; closes `results` when every job is answered."""
    unavailable_logged = False
    gauge = gauge or EngineGauge(engine.name)

    async def worker(
        inbox: MemoryObjectReceiveStream[GenerationJob],
        outbox: MemoryObjectSendStream[Generation | GenerationFailure],
    ) -> None:
        nonlocal unavailable_logged
        async with inbox, outbox:
            async for job in iterate(inbox):
                principle = wording = None
                if principles is not None and principles.sets:
                    principle, wording = pick_principle(
                        principles.sets,
                        seed=principles.seed,
                        prompt_id=job.prompt.id,
                        model=engine.name,
                    )
                request = build_request(job, config, wording)
                gauge.started()
                try:
                    completion = await engine.generate(request)
                except EngineError as exc:
                    gauge.finished(failed=True)
                    if isinstance(exc, EngineUnavailable) and not unavailable_logged:
                        unavailable_logged = True
                        log.error("%s is unavailable; its prompts go to the failures file", exc)
                    await send(
                        outbox,
                        GenerationFailure(
                            prompt=job.prompt,
                            models=job.models,
                            slot=job.slot,
                            model=engine.name,
                            error=f"{type(exc).__name__}: {exc}",
                        ),
                    )
                    continue
                except BaseException:
                    gauge.finished(failed=True)
                    raise
                gauge.finished(tokens=completion.completion_tokens)
                await send(
                    outbox,
                    Generation(
                        prompt=job.prompt,
                        models=job.models,
                        slot=job.slot,
                        model=engine.name,
                        text=completion.text,
                        completion_tokens=completion.completion_tokens,
                        prompt_tokens=completion.prompt_tokens,
                        finish_reason=completion.finish_reason,
                        latency_s=completion.latency_s,
                        principle=principle,
                    ),
                )

    async with jobs, results, anyio.create_task_group() as tg:
        for i in range(concurrency):
            tg.start_soon(worker, jobs.clone(), results.clone(), name=f"gen-{engine.name}-{i}")
