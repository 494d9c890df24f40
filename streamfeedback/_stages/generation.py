"""Generation: a pool of request workers per engine, so each engine always has work queued.

Every job becomes its own `engine.generate` call as soon as a worker is free; up to
`concurrency` calls are in flight per engine (continuous dispatch, never "send a batch,
wait for the slowest"). A failed call is re-routed to a substitute model, or becomes a
`GenerationFailure` for gather when no model is left. A job queued for a model that has
since cooled down goes straight to a substitute instead of to a server known to be failing,
and a model that left the run for good (`Pool.failed`) is never asked again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import anyio

from .._channels import Outbox, Receiver
from .._config import GeneratorConfig, PrinciplesConfig
from .._exceptions import EngineError, EngineRequestError, EngineUnavailable
from .._pool import Pool
from .._principles import pick_principle
from .._records import (
    ChatRequest,
    Completion,
    Generation,
    GenerationFailure,
    GenerationJob,
    Message,
)

__all__ = ["build_request", "run"]

log = logging.getLogger("streamfeedback.generation")


def build_request(
    job: GenerationJob,
    config: GeneratorConfig,
    principle: str | None = None,
    *,
    model: str | None = None,
) -> ChatRequest:
    """The chat a generator is asked for one prompt: system prompt(s), then the user turn."""
    messages = [Message("user", job.prompt.instruction)]
    system = "\n\n".join(p for p in (config.system_prompt, principle) if p)
    if system:
        messages.insert(0, Message("system", system))
    return ChatRequest(
        id=f"{job.prompt.id}:{model or job.models[job.slot]}",
        messages=messages,
        max_tokens=config.max_tokens,
        temperature=config.temperature,
        top_p=config.top_p,
        seed=config.seed,
    )


async def run(
    name: str,
    pool: Pool,
    jobs: Receiver[GenerationJob],
    results: Outbox[Generation | GenerationFailure],
    *,
    concurrency: int,
    principles: PrinciplesConfig | None = None,
    reroute: bool = True,
    stopping: Callable[[], bool] | None = None,
) -> None:
    """Serve `jobs` of model `name` with `concurrency` workers, each result to `results`.

    `results` is shared by every engine's pool (gather's join table), so its owner closes it
    once all pools are done; this closes only `jobs`.

    With `reroute`, a job the model fails for good goes to a substitute from `pool` that the
    prompt has not used yet, so the record still gets responses from distinct models.

    Once `stopping()`, no new request starts: queued jobs are passed over, and a failed
    one is not re-routed (a stopped run leaves them undone, for a rerun).

    :raises PoolUnavailable: too few models are left in the run for a record.
    """
    stopped = stopping or (lambda: False)
    unavailable_logged: set[str] = set()

    async def attempt(job: GenerationJob, model: str) -> tuple[Completion, str | None]:
        """One call of `model` for `job`; returns the completion and the principle used."""
        principle = wording = None
        if principles is not None and principles.sets:
            principle, wording = pick_principle(
                principles.sets, seed=principles.seed, prompt_id=job.prompt.id, model=model
            )
        request = build_request(job, pool.configs[model], wording, model=model)
        gauge = pool.gauges[model]
        gauge.started()
        try:
            completion = await pool.engines[model].generate(request)
        except EngineError as exc:
            gauge.finished(failed=True)
            if not isinstance(exc, EngineRequestError):
                pool.record(model, ok=False, error=f"{type(exc).__name__}: {exc}")
            if isinstance(exc, EngineUnavailable) and model not in unavailable_logged:
                unavailable_logged.add(model)
                log.error("%s is unavailable: %s", model, exc)
            raise
        except BaseException:
            gauge.finished(failed=True)
            raise
        gauge.finished(tokens=completion.completion_tokens, seconds=completion.latency_s)
        pool.record(model, ok=True)
        return completion, principle

    async def worker(inbox: Receiver[GenerationJob]) -> None:
        async with inbox:
            async for job in inbox:
                if stopped():
                    continue
                model = name
                errors: list[str] = []
                asked = 0
                while True:
                    pool.check()
                    gone = pool.gone(model) is not None
                    if gone or (reroute and pool.cooling(model)):
                        substitute = pool.substitute(job.prompt.id, job.models) if reroute else None
                        if substitute is not None or gone:
                            errors.append(f"{model}: {pool.cooling_reason(model)}")
                        if substitute is not None:
                            model = substitute
                            continue
                        if gone:  # never ask a model that left the run
                            await results.send(_failure(job, name, errors, asked))
                            break
                    asked += 1
                    try:
                        completion, principle = await attempt(job, model)
                    except EngineError as exc:
                        errors.append(f"{model}: {type(exc).__name__}: {exc}")
                        pool.failed(model, exc)
                        if stopped():
                            break
                        substitute = pool.substitute(job.prompt.id, job.models) if reroute else None
                        if substitute is not None:
                            log.info(
                                "prompt %s: %s failed, asking %s", job.prompt.id, model, substitute
                            )
                            model = substitute
                            continue
                        await results.send(_failure(job, name, errors, asked))
                        break
                    await results.send(
                        Generation(
                            prompt=job.prompt,
                            models=job.models,
                            slot=job.slot,
                            model=model,
                            text=completion.text,
                            completion_tokens=completion.completion_tokens,
                            prompt_tokens=completion.prompt_tokens,
                            finish_reason=completion.finish_reason,
                            latency_s=completion.latency_s,
                            principle=principle,
                            replaced=name if model != name else None,
                            replaced_because=errors[0] if errors else None,
                        ),
                    )
                    break

    async with jobs, anyio.create_task_group() as tg:
        for i in range(concurrency):
            tg.start_soon(worker, jobs.clone(), name=f"gen-{name}-{i}")


def _failure(job: GenerationJob, name: str, errors: list[str], asked: int) -> GenerationFailure:
    """The job failed for good: every model asked, and why each one did not answer."""
    return GenerationFailure(
        prompt=job.prompt,
        models=job.models,
        slot=job.slot,
        model=name,
        error="; ".join(errors),
        attempts=asked,
    )
