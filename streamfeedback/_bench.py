"""`streamfeedback bench`: the real pipeline on simulated engines, figures on stdout.

It measures the pipeline, not a model: engines answer per the sim latency model, so the
ideal makespan of the workload is known and the pipeline's own overhead shows as the gap.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import anyio
import msgspec

from ._config import Config, load_config
from ._pipeline import Pipeline

__all__ = ["bench_config", "main"]


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
            {"name": g.label, "model": g.model, "max_tokens": g.max_tokens, **sim}
            for g in base.generators
        ]
        n = base.routing.n
    else:
        generators = [
            {"name": f"sim-{i}", "model": f"sim-{i}", "max_tokens": 512, **sim}
            for i in range(args.models)
        ]
        n = min(3, args.models)
    raw = {
        "source": {"path": "-"},
        "routing": {"n": n, "batch_size": args.batch_size, "seed": 0},
        "generators": generators,
        "rater": {"backend": "sim", "model": "sim-judge", "max_concurrency": 64},
        "output": {"path": "-", "failures": "/dev/null"},
    }
    return msgspec.convert(raw, Config)


async def _bench(config: Config, prompts: int) -> tuple[int, float]:
    items = ({"instruction": f"Benchmark prompt number {i}."} for i in range(prompts))
    records = 0
    started = time.perf_counter()
    async with Pipeline(config, failures_path="/dev/null") as pipeline:
        async for _ in pipeline.run(items):
            records += 1
    return records, time.perf_counter() - started


def main(args: argparse.Namespace) -> int:
    config = bench_config(args)
    records, wall = anyio.run(
        _bench, config, args.prompts, backend="asyncio", backend_options={"use_uvloop": True}
    )
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    sys.stdout.write(
        f"records: {records}\nwall_s: {wall:.3f}\nrecords_per_s: {records / wall:.1f}\n"
        f"generations_per_s: {records * config.routing.n / wall:.1f}\n"
        f"peak_rss_mib: {rss_mib:.1f}\n"
    )
    return 0 if records == args.prompts else 1
