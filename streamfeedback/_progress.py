"""The progress view on stderr: a live line on a terminal, periodic log lines otherwise.

It only reads the pipeline's counters, so it costs nothing on the hot path and can never
write to stdout, which belongs to the records.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

import anyio

from ._pipeline import Pipeline

__all__ = ["render", "show_progress"]

log = logging.getLogger("streamfeedback")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class _Rate:
    """Records/s and judge requests/min over a sliding stretch of recent samples."""

    def __init__(self, span: float = 30.0) -> None:
        self.span = span
        self.samples: list[tuple[float, int, int]] = []

    def update(self, now: float, records: int, judge: int) -> tuple[float, float]:
        self.samples.append((now, records, judge))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.span:
            self.samples.pop(0)
        t0, r0, j0 = self.samples[0]
        elapsed = now - t0
        if elapsed <= 0:
            return 0.0, 0.0
        return (records - r0) / elapsed, (judge - j0) * 60 / elapsed


def render(
    pipeline: Pipeline, rate: float, judge_rpm: float, *, total: int | None, elapsed: float
) -> str:
    """One status line: done, rate, ETA, in flight per engine, judge rate vs limit, failures."""
    s = pipeline.statistics()
    parts = [f"{s.records} records", f"{rate:.1f}/s", f"{_duration(elapsed)} elapsed"]
    if total is not None and rate > 0:
        left = max(0, total - s.records - s.failures)
        parts.append(f"ETA {_duration(left / rate)}")
    flights = " ".join(
        f"{g.name[:14]}:{g.in_flight}{'(cooling)' if pipeline.pool.cooling(g.name) else ''}"
        for g in pipeline.gauges.values()
    )
    parts.append(f"in flight {flights}")
    limit = pipeline.config.rater.requests_per_minute
    judge = f"judge {judge_rpm:.0f}/min"
    if limit:
        judge += f" of {limit:g}"
    parts.append(judge)
    if s.failures:
        parts.append(f"{s.failures} failed")
    if pipeline.generation_done:
        parts.append("generation done, engines stopped")
    return " | ".join(parts)


async def show_progress(
    pipeline: Pipeline,
    *,
    total: int | None = None,
    stream: TextIO | None = None,
    interval: float | None = None,
) -> None:
    """Draw progress until cancelled: every 0.5 s in place on a tty, every 30 s as a log line."""
    out = stream or sys.stderr
    tty = out.isatty()
    every = interval or (0.5 if tty else 30.0)
    started = time.monotonic()
    rates = _Rate()
    try:
        while True:
            await anyio.sleep(every)
            now = time.monotonic()
            s = pipeline.statistics()
            rate, judge_rpm = rates.update(now, s.records, s.judge_requests)
            line = render(pipeline, rate, judge_rpm, total=total, elapsed=now - started)
            if tty:
                out.write(f"\r\x1b[K{line}")
                out.flush()
            else:
                log.info("progress: %s", line)
    finally:
        if tty:
            out.write("\r\x1b[K")
            out.flush()
