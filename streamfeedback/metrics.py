"""Prometheus metrics of a run: a collector over `Pipeline.statistics()`, and a `/metrics` server.

    streamfeedback run CONFIG.toml --metrics-port 9400     # or [pipeline] metrics_port = 9400
    curl http://127.0.0.1:9400/metrics

The collector reads the pipeline's own counters when it is scraped, so the hot path pays
nothing for it. Apps that embed a `Pipeline` register `PipelineCollector(pipeline)` on their
own registry (or read `pipeline.statistics()`, which holds the same figures). The server runs
on the caller's event loop (aiohttp), bound to 127.0.0.1 only. Needs `prometheus_client`:
`pip install 'streamfeedback[metrics]'`.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import TracebackType
from typing import TYPE_CHECKING

import anyio
from aiohttp import web

try:
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )
    from prometheus_client.process_collector import ProcessCollector
    from prometheus_client.registry import Collector
except ImportError as exc:
    raise ImportError(
        "streamfeedback.metrics needs prometheus_client: pip install 'streamfeedback[metrics]'"
    ) from exc

if TYPE_CHECKING:
    from ._pipeline import Pipeline

__all__ = ["MetricsServer", "PipelineCollector"]


class PipelineCollector(Collector):
    """The series of one run, read from `pipeline.statistics()` at each scrape.

    Before `watch` is given a pipeline (while engines start), it yields nothing.
    """

    def __init__(self, pipeline: Pipeline | None = None) -> None:
        self.pipeline = pipeline

    def watch(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline

    def collect(self) -> Iterator[Metric]:
        pipeline = self.pipeline
        if pipeline is None:
            return
        s = pipeline.statistics()
        yield CounterMetricFamily(
            "streamfeedback_prompts_read", "Prompts taken from the source.", value=s.read
        )
        yield CounterMetricFamily(
            "streamfeedback_records", "Records out (rated prompts).", value=s.records
        )
        yield CounterMetricFamily(
            "streamfeedback_failures",
            "Prompts failed for good (the failures file).",
            value=s.failures,
        )
        yield GaugeMetricFamily(
            "streamfeedback_prompts_in_flight", "Prompts read and not yet out.", value=s.in_flight
        )
        yield GaugeMetricFamily(
            "streamfeedback_spool_backlog",
            "Spool lines (a response each) the judge's reader has not taken yet.",
            value=s.spool_backlog,
        )
        in_flight = GaugeMetricFamily(
            "streamfeedback_generation_requests_in_flight",
            "Generation requests in flight.",
            labels=["model"],
        )
        requests = CounterMetricFamily(
            "streamfeedback_generation_requests",
            "Generation requests finished (failed ones included).",
            labels=["model"],
        )
        failures = CounterMetricFamily(
            "streamfeedback_generation_failures",
            "Generation requests failed for good (after the engine's retries).",
            labels=["model"],
        )
        tokens = CounterMetricFamily(
            "streamfeedback_generated_tokens", "Tokens generated.", labels=["model"]
        )
        seconds = HistogramMetricFamily(
            "streamfeedback_generation_seconds",
            "Seconds per answered generation request, retries included.",
            labels=["model"],
        )
        for model, m in s.models.items():
            in_flight.add_metric([model], m.in_flight)
            requests.add_metric([model], m.requests)
            failures.add_metric([model], m.failures)
            tokens.add_metric([model], m.tokens)
            cumulative = 0
            buckets: list[tuple[str, float]] = []
            for bound, count in zip(
                (*(str(b) for b in m.seconds_bounds), "+Inf"), m.seconds_buckets, strict=False
            ):
                cumulative += count
                buckets.append((bound, cumulative))
            seconds.add_metric([model], buckets, sum_value=m.seconds_sum)
        yield from (in_flight, requests, failures, tokens, seconds)
        yield CounterMetricFamily(
            "streamfeedback_judge_requests",
            "Judge requests made (re-asks included; counted when handed to the judge's "
            "engine, so those waiting on its rate limit count, and HTTP retries do not).",
            value=s.judge_requests,
        )
        yield CounterMetricFamily(
            "streamfeedback_judge_reasks",
            "Judge requests that re-asked for unreadable blocks.",
            value=s.judge_reasks,
        )
        yield CounterMetricFamily(
            "streamfeedback_judge_rate_limited",
            "Judge answers that were 429 (rate limited).",
            value=s.judge_rate_limited,
        )
        judge_tokens = CounterMetricFamily(
            "streamfeedback_judge_tokens", "Judge tokens, by kind.", labels=["kind"]
        )
        judge_tokens.add_metric(["prompt"], s.judge_prompt_tokens)
        judge_tokens.add_metric(["completion"], s.judge_completion_tokens)
        yield judge_tokens
        if s.judge_cost_dollars is not None:
            yield CounterMetricFamily(
                "streamfeedback_judge_cost_dollars",
                "Estimated judge cost in USD (the configured or known price per token).",
                value=s.judge_cost_dollars,
            )
        yield CounterMetricFamily(
            "streamfeedback_null_ratings",
            "Ratings the judge did not give readably.",
            value=s.null_ratings,
        )


class MetricsServer:
    """Serves `/metrics` on 127.0.0.1:`port` from the running event loop.

    `start` binds the port (so a port in use fails before any work); `watch` names the
    pipeline once it exists. An async context manager: leaving it stops the server.
    """

    def __init__(self, port: int, *, host: str = "127.0.0.1") -> None:
        self.port = port
        self.host = host
        self.collector = PipelineCollector()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)
        ProcessCollector(registry=self.registry)
        self._runner: web.AppRunner | None = None

    def watch(self, pipeline: Pipeline) -> None:
        self.collector.watch(pipeline)

    async def start(self) -> None:
        """Bind and serve. Idempotent.

        :raises OSError: the port cannot be bound (in use, not allowed).
        """
        if self._runner is not None:
            return
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.port).start()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await runner.cleanup()
            raise
        self._runner = runner

    async def aclose(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            with anyio.move_on_after(5, shield=True):
                await runner.cleanup()

    async def __aenter__(self) -> MetricsServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )
