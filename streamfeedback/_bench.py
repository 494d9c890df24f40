"""`streamfeedback bench`: the real pipeline on simulated engines, figures on stdout.

It measures the pipeline, not a model: the engines answer per the sim latency model, and the
workload (routing, output lengths) is fixed by the config and the prompt ids, so the ideal
makespan of that exact workload is computed here and the pipeline's own overhead shows as
efficiency = ideal / actual.

The ideal (`ideal_makespan`) is what a zero-overhead client achieves against the same engines:

- each generator starts its jobs in arrival (source) order, each on the slot that frees first
  (list scheduling; a job holds a slot for `ttft + tokens * tpot`);
- a prompt is ready for the judge when the last of its `n` generations ends;
- the judge starts ready prompts in order of readiness on `judge_slots` slots, each holding a
  slot for `judge_latency`, and with a limit of `rpm` the k-th request (0-based) starts no
  earlier than `k * 60 / rpm` (the limit taken as a steady rate);
- the ideal is when the last judge request ends (the last generation, without a judge).

It is never below the lower bound max(per engine: max(work / slots, longest job); the judge's
own bound: max(requests * latency / slots, requests * 60 / rpm); the critical path: the
longest generation of a prompt plus the judge latency), which is reported beside it.
"""

from __future__ import annotations

import argparse
import heapq
import os
import resource
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import anyio
import msgspec

from ._config import Config, GeneratorConfig, load_config
from ._pipeline import Pipeline
from ._ratelimit import RateLimiter
from ._records import ChatRequest, Completion
from ._stages.routing import models_for_batch
from .engines import Engine, SimEngine
from .engines._sim import SimLLMEngine, SimSamplingParams

__all__ = [
    "BenchResult",
    "EngineIdeal",
    "Ideal",
    "JudgeModel",
    "Workload",
    "bench_config",
    "configure_parser",
    "ideal_makespan",
    "list_schedule",
    "main",
    "plan_workload",
    "prompt_ids",
    "run_bench",
]


class JudgeModel(msgspec.Struct, frozen=True, kw_only=True):
    """The judge's latency model: a fixed latency per request on `slots` slots, and a limit."""

    latency: float = 0.0
    slots: int = 64
    rpm: float | None = None


class Workload(msgspec.Struct, frozen=True, kw_only=True):
    """A run's jobs: per engine, job durations in arrival order; per prompt, its jobs."""

    slots: dict[str, int]
    durations: dict[str, list[float]]
    tokens: dict[str, list[int]]
    prompts: list[list[tuple[str, int]]]
    judge: JudgeModel


class EngineIdeal(msgspec.Struct, frozen=True, kw_only=True):
    jobs: int
    tokens: int
    work_s: float
    makespan_s: float
    lower_bound_s: float


class Ideal(msgspec.Struct, frozen=True, kw_only=True):
    """The ideal makespan of a workload and the bounds it is made of (see the module doc)."""

    makespan_s: float
    lower_bound_s: float
    generation_s: float
    judge_bound_s: float
    critical_path_s: float
    engines: dict[str, EngineIdeal]


def list_schedule(
    durations: Sequence[float],
    slots: int,
    *,
    ready: Sequence[float] | None = None,
    spacing: float = 0.0,
) -> list[float]:
    """End times when jobs start in the given order, each on the slot that frees first.

    Job k also waits for `ready[k]` and for `k * spacing` (a steady request rate).
    """
    free = [0.0] * min(slots, max(1, len(durations)))
    ends: list[float] = []
    for k, duration in enumerate(durations):
        start = max(free[0], k * spacing, ready[k] if ready is not None else 0.0)
        end = start + duration
        heapq.heapreplace(free, end)
        ends.append(end)
    return ends


def ideal_makespan(workload: Workload) -> Ideal:
    """The makespan of a zero-overhead client on this workload, with its lower bound."""
    engines: dict[str, EngineIdeal] = {}
    ends: dict[str, list[float]] = {}
    for name, durations in workload.durations.items():
        slots = workload.slots[name]
        ends[name] = list_schedule(durations, slots)
        work = sum(durations)
        engines[name] = EngineIdeal(
            jobs=len(durations),
            tokens=sum(workload.tokens[name]),
            work_s=work,
            makespan_s=max(ends[name], default=0.0),
            lower_bound_s=max(work / slots, max(durations, default=0.0)),
        )
    ready = sorted(max((ends[e][j] for e, j in jobs), default=0.0) for jobs in workload.prompts)
    judge = workload.judge
    spacing = 60.0 / judge.rpm if judge.rpm else 0.0
    judged = list_schedule([judge.latency] * len(ready), judge.slots, ready=ready, spacing=spacing)
    requests = len(workload.prompts)
    judge_bound = max(requests * judge.latency / judge.slots, requests * spacing)
    critical = max(
        (
            max((workload.durations[e][j] for e, j in jobs), default=0.0) + judge.latency
            for jobs in workload.prompts
        ),
        default=0.0,
    )
    generation = max((e.makespan_s for e in engines.values()), default=0.0)
    lower = max([judge_bound, critical, *(e.lower_bound_s for e in engines.values())])
    return Ideal(
        makespan_s=max(judged, default=generation),
        lower_bound_s=lower,
        generation_s=generation,
        judge_bound_s=judge_bound,
        critical_path_s=critical,
        engines=engines,
    )


LengthRule = Callable[[str, GeneratorConfig], int]


def sim_length(generator: GeneratorConfig) -> Callable[[str], int]:
    """The output length the sim engine gives a request id (its own rule, not a copy)."""
    core = SimLLMEngine(generator.model, output_tokens=generator.sim_output_tokens)
    params = SimSamplingParams(max_tokens=generator.max_tokens, seed=generator.seed)
    return lambda request_id: core._length(request_id, params)[0]


def _bind(length: LengthRule, generator: GeneratorConfig) -> Callable[[str], int]:
    return lambda key: length(key, generator)


def plan_workload(
    config: Config,
    prompts: Sequence[str],
    judge: JudgeModel,
    *,
    length: LengthRule | None = None,
) -> Workload:
    """The jobs the pipeline will send for `prompts` (ids in source order), per engine.

    `length(key, generator)` gives a job's output tokens; by default the sim's rule on the
    request id the pipeline uses (`"{prompt id}:{generator name}"`).
    """
    generators = {g.label: g for g in config.generators}
    rules: dict[str, Callable[[str], int]] = {
        name: _bind(length, g) if length else sim_length(g) for name, g in generators.items()
    }
    pool = list(generators)
    routing = config.routing
    durations: dict[str, list[float]] = {name: [] for name in pool}
    tokens: dict[str, list[int]] = {name: [] for name in pool}
    per_prompt: list[list[tuple[str, int]]] = []
    models: tuple[str, ...] = ()
    current = -1
    for index, pid in enumerate(prompts):
        batch = index // routing.batch_size
        if batch != current:
            current = batch
            models = models_for_batch(pool, n=routing.n, seed=routing.seed, batch=batch)
        jobs = []
        for model in models:
            g = generators[model]
            n_tokens = rules[model](f"{pid}:{model}")
            jobs.append((model, len(durations[model])))
            durations[model].append(g.sim_ttft + n_tokens * g.sim_tpot)
            tokens[model].append(n_tokens)
        per_prompt.append(jobs)
    slots = {name: g.sim_slots for name, g in generators.items()}
    return Workload(
        slots=slots, durations=durations, tokens=tokens, prompts=per_prompt, judge=judge
    )


def prompt_ids(count: int) -> list[str]:
    """The ids of the bench's prompts, in source order."""
    return [f"p{i:07d}" for i in range(count)]


def bench_config(args: argparse.Namespace) -> Config:
    """A sim config: the pool of `--config` (backends replaced by sim) or `--models` sim models."""
    sim = {
        "backend": "sim",
        "sim_ttft": args.sim_ttft,
        "sim_tpot": args.sim_tpot,
        "sim_slots": args.sim_slots,
        "sim_output_tokens": args.sim_output_tokens,
    }
    if args.config:
        base = load_config(args.config)
        generators = [
            {"name": g.label, "model": g.model, "max_tokens": g.max_tokens, "seed": g.seed, **sim}
            for g in base.generators
        ]
        n = base.routing.n
    else:
        generators = [
            {"name": f"sim-{i}", "model": f"sim-{i}", "max_tokens": 512, **sim}
            for i in range(args.models)
        ]
        n = min(3, args.models)
    judge = _judge_model(args)
    rater: dict[str, Any] = {
        "backend": "sim",
        "model": "sim-judge",
        "max_concurrency": judge.slots,
        "sim_ttft": judge.latency,
        "sim_slots": judge.slots,
    }
    if judge.rpm is not None:
        rater["requests_per_minute"] = judge.rpm
    raw = {
        "source": {"path": "-", "id_column": "id"},
        "routing": {"n": n, "batch_size": args.batch_size, "seed": 0},
        "generators": generators,
        "rater": rater,
        "output": {"path": "-", "failures": os.devnull},
    }
    return msgspec.convert(raw, Config)


def _judge_model(args: argparse.Namespace) -> JudgeModel:
    return JudgeModel(
        latency=getattr(args, "judge_latency", 0.0),
        slots=getattr(args, "judge_slots", 64),
        rpm=getattr(args, "judge_rpm", None),
    )


class _LimitedEngine:
    """The sim judge behind the client's own rate limiter, as a rate-limited API is used."""

    def __init__(self, inner: Engine, limiter: RateLimiter) -> None:
        self.name = inner.name
        self.inner = inner
        self.limiter = limiter

    async def start(self) -> None:
        await self.inner.start()

    async def generate(self, request: ChatRequest) -> Completion:
        async with self.limiter.acquire(0):
            return await self.inner.generate(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


class EngineFigures(msgspec.Struct, frozen=True, kw_only=True):
    requests: int
    tokens: int
    busy_s: float
    utilization: float
    peak_in_flight: int
    ideal_makespan_s: float
    lower_bound_s: float


class JudgeFigures(msgspec.Struct, frozen=True, kw_only=True):
    requests: int
    requests_per_min: float
    rpm_limit: float | None
    latency_s: float
    slots: int
    utilization: float
    bound_s: float


class BenchResult(msgspec.Struct, frozen=True, kw_only=True):
    """What one bench run measured, beside the ideal of its workload."""

    prompts: int
    records: int
    wall_s: float
    cpu_s: float
    records_per_s: float
    generations_per_s: float
    generated_tokens: int
    tokens_per_s: float
    ideal_s: float
    lower_bound_s: float
    efficiency: float | None
    engines: dict[str, EngineFigures]
    judge: JudgeFigures
    peak_rss_mib: float
    loop: str


async def run_bench(
    config: Config, prompts: int, judge: JudgeModel, *, loop: str = "asyncio"
) -> BenchResult:
    """Stream `prompts` bench prompts through a `Pipeline` on `config`; measure against ideal.

    `loop` only labels the result: the caller picked the event loop.
    """
    ids = prompt_ids(prompts)
    ideal = ideal_makespan(plan_workload(config, ids, judge))
    judge_engine: Engine = SimEngine(config.rater.model, config.rater, role="judge")
    if judge.rpm is not None:
        limiter = RateLimiter(max_concurrency=judge.slots, requests_per_minute=judge.rpm)
        judge_engine = _LimitedEngine(judge_engine, limiter)
    items = ({"id": pid, "instruction": f"Benchmark prompt {pid}."} for pid in ids)
    records = 0
    cpu = time.process_time()
    started = time.perf_counter()
    async with Pipeline(config, failures_path=os.devnull, judge_engine=judge_engine) as pipeline:
        async for _ in pipeline.run(items):
            records += 1
        wall = time.perf_counter() - started
        cpu = time.process_time() - cpu
        stats = pipeline.statistics()
        gauges = pipeline.gauges
    wall = max(wall, 1e-9)
    generators = {g.label: g for g in config.generators}
    engines: dict[str, EngineFigures] = {}
    for name, gauge in gauges.items():
        g = generators[name]
        busy = gauge.done * g.sim_ttft + gauge.tokens * g.sim_tpot
        engines[name] = EngineFigures(
            requests=gauge.done,
            tokens=gauge.tokens,
            busy_s=busy,
            utilization=busy / (g.sim_slots * wall),
            peak_in_flight=gauge.peak_in_flight,
            ideal_makespan_s=ideal.engines[name].makespan_s,
            lower_bound_s=ideal.engines[name].lower_bound_s,
        )
    tokens = sum(e.tokens for e in engines.values())
    return BenchResult(
        prompts=prompts,
        records=records,
        wall_s=wall,
        cpu_s=cpu,
        records_per_s=records / wall,
        generations_per_s=sum(e.requests for e in engines.values()) / wall,
        generated_tokens=tokens,
        tokens_per_s=tokens / wall,
        ideal_s=ideal.makespan_s,
        lower_bound_s=ideal.lower_bound_s,
        efficiency=ideal.makespan_s / wall if ideal.makespan_s > 0 else None,
        engines=engines,
        judge=JudgeFigures(
            requests=stats.judge_requests,
            requests_per_min=stats.judge_requests * 60.0 / wall,
            rpm_limit=judge.rpm,
            latency_s=judge.latency,
            slots=judge.slots,
            utilization=stats.judge_requests * judge.latency / (judge.slots * wall),
            bound_s=ideal.judge_bound_s,
        ),
        peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        loop=loop,
    )


def format_result(result: BenchResult) -> str:
    """The figures as `key: value` lines, then one line per engine and one for the judge."""
    eff = "n/a (instant engines)" if result.efficiency is None else f"{result.efficiency:.3f}"
    lines = [
        f"records: {result.records}",
        f"wall_s: {result.wall_s:.3f}",
        f"ideal_s: {result.ideal_s:.3f}",
        f"lower_bound_s: {result.lower_bound_s:.3f}",
        f"efficiency: {eff}",
        f"records_per_s: {result.records_per_s:.1f}",
        f"generations_per_s: {result.generations_per_s:.1f}",
        f"tokens_per_s: {result.tokens_per_s:.1f}",
        f"judge_requests_per_min: {result.judge.requests_per_min:.1f}"
        + (f" (limit {result.judge.rpm_limit:g})" if result.judge.rpm_limit else ""),
        f"peak_rss_mib: {result.peak_rss_mib:.1f}",
        f"loop: {result.loop}",
    ]
    for name, e in result.engines.items():
        lines.append(
            f"engine {name}: requests={e.requests} tokens={e.tokens} "
            f"utilization={e.utilization:.3f} peak_in_flight={e.peak_in_flight} "
            f"ideal_s={e.ideal_makespan_s:.3f}"
        )
    j = result.judge
    lines.append(
        f"judge: requests={j.requests} utilization={j.utilization:.3f} bound_s={j.bound_s:.3f}"
    )
    return "\n".join(lines) + "\n"


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the bench flags: defined here once, for `streamfeedback bench` and the scripts."""
    flags: list[tuple[str, dict[str, Any]]] = [
        ("--config", {"help": "a config to take the pool from (its engines become sim)"}),
        ("--prompts", {"type": int, "default": 2000, "help": "prompts to stream"}),
        ("--models", {"type": int, "default": 6, "help": "pool size without --config"}),
        ("--sim-ttft", {"type": float, "default": 0.0, "help": "generator seconds to first token"}),
        ("--sim-tpot", {"type": float, "default": 0.0, "help": "generator seconds per token"}),
        ("--sim-slots", {"type": int, "default": 256, "help": "sequences per generator at once"}),
        ("--sim-output-tokens", {"type": int, "default": 64, "help": "mean output length"}),
        ("--batch-size", {"type": int, "default": 2, "help": "routing batch size"}),
        ("--judge-latency", {"type": float, "default": 0.0, "help": "seconds per judge request"}),
        ("--judge-slots", {"type": int, "default": 64, "help": "judge requests at once"}),
        ("--judge-rpm", {"type": float, "default": None, "help": "judge requests per minute"}),
        ("--loop", {"choices": ("uvloop", "asyncio"), "default": "uvloop", "help": "event loop"}),
        ("--json", {"action": "store_true", "help": "print one JSON object instead"}),
    ]
    for flag, options in flags:
        parser.add_argument(flag, **options)


def main(args: argparse.Namespace) -> int:
    config = bench_config(args)
    judge = _judge_model(args)
    loop = getattr(args, "loop", "uvloop")
    if loop == "uvloop":
        try:
            import uvloop  # noqa: F401
        except ImportError:
            loop = "asyncio"
    result = anyio.run(
        partial(run_bench, config, args.prompts, judge, loop=loop),
        backend="asyncio",
        backend_options={"use_uvloop": loop == "uvloop"},
    )
    if getattr(args, "json", False):
        sys.stdout.write(msgspec.json.encode(result).decode() + "\n")
    else:
        sys.stdout.write(format_result(result))
    return 0 if result.records == args.prompts else 1
