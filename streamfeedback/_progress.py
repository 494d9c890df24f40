"""The progress view on stderr: a live line on a terminal, periodic log lines otherwise.

It only reads the pipeline's counters, so it costs nothing on the hot path and can never
write to stdout, which belongs to the records.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import time
from typing import TextIO

import anyio

from ._pipeline import Pipeline
from ._pricing import judge_cost
from ._total import Total

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
    pipeline: Pipeline,
    rate: float,
    judge_rpm: float,
    *,
    total: int | None,
    elapsed: float,
    width: int | None = None,
) -> str:
    """One status line: done/total and %, rate, ETA, the judge's cost (so far and projected),
    failures, the judge's rate and what each engine has in flight.

    With `width`, the parts that matter least are left off until the line fits (a terminal
    line that wraps cannot be redrawn in place); without, every part is there (a log line).
    """
    s = pipeline.statistics()
    generating = pipeline.mode == "generate"
    done = (s.spooled if generating else s.records) + s.failures
    unit = "spooled" if generating else "records"
    expected = None if total is None else max(0, total - s.skipped)
    if expected:
        progress = f"{done}/{expected} {unit} ({min(100.0, 100 * done / expected):.0f}%)"
    else:
        progress = f"{done} {unit}"
    parts: list[tuple[int, str]] = [(0, progress), (1, f"{rate:.1f}/s")]
    if expected is not None and rate > 0:
        parts.append((2, f"ETA {_duration(max(0, expected - done) / rate)}"))
    parts.append((5, f"{_duration(elapsed)} elapsed"))
    cost = _judge_cost(pipeline)
    if cost is not None:
        rated = s.records + s.failures
        text = f"judge ${cost:.2f}"
        if expected and rated:
            text += f" of ~${cost * expected / rated:.2f}"
        parts.append((3, text))
    if s.failures:
        parts.append((1, f"{s.failures} failed"))
    if pipeline.generation_done:
        parts.append((4, "generation done, engines stopped"))
    else:
        flights = " ".join(
            f"{g.name}:{g.in_flight}{'(cooling)' if pipeline.pool.cooling(g.name) else ''}"
            for g in pipeline.gauges.values()
        )
        parts.append((7, f"in flight {flights}"))
        in_flight = sum(g.in_flight for g in pipeline.gauges.values())
        parts.append((6, f"{in_flight} in flight"))
    limit = pipeline.config.rater.requests_per_minute
    judge = f"judge {judge_rpm:.0f}/min"
    if limit:
        judge += f" of {limit:g}"
    parts.append((4, judge))
    return _fit(parts, width)


def _fit(parts: list[tuple[int, str]], width: int | None) -> str:
    """Join the parts in order. Rank 7 (in flight per engine) and 6 (in flight in all) are
    alternatives: the detail where it fits; then parts go, least useful first (elapsed time,
    in flight, the judge's rate, cost, ETA), until the line fits; what still does not is cut."""

    def join(chosen: list[tuple[int, str]]) -> str:
        return " | ".join(text for _, text in chosen)

    chosen = [p for p in parts if p[0] != 6]
    if width is None or len(join(chosen)) <= width:
        return join(chosen)
    chosen = [p for p in parts if p[0] != 7]
    for rank in (5, 6, 4, 3, 2, 1):
        if len(join(chosen)) <= width:
            break
        chosen = [p for p in chosen if p[0] != rank]
    line = join(chosen)
    return line if len(line) <= width else line[: max(0, width - 1)] + "~"


def _judge_cost(pipeline: Pipeline) -> float | None:
    """The judge's cost so far in USD, where a price is known."""
    stats = getattr(pipeline.judge_engine, "statistics", None)
    if stats is None:
        return None
    usage = stats()
    return judge_cost(
        pipeline.config.rater,
        getattr(usage, "prompt_tokens", 0),
        getattr(usage, "completion_tokens", 0),
    )


async def show_progress(
    pipeline: Pipeline,
    *,
    total: int | Total | None = None,
    stream: TextIO | None = None,
    interval: float | None = None,
) -> None:
    """Draw progress until cancelled: every 0.5 s in place on a tty (fitted to its width),
    every 30 s as a log line. `total` may be a `Total` still being counted."""
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
            done = s.spooled if pipeline.mode == "generate" else s.records
            rate, judge_rpm = rates.update(now, done + s.failures, s.judge_requests)
            expected = total.value if isinstance(total, Total) else total
            width = _width(out) - 1 if tty else None
            line = render(
                pipeline, rate, judge_rpm, total=expected, elapsed=now - started, width=width
            )
            if tty:
                out.write(f"\r\x1b[K{line}")
                out.flush()
            else:
                log.info("progress: %s", line)
    finally:
        if tty:
            out.write("\r\x1b[K")
            out.flush()


def _width(out: TextIO) -> int:
    """The terminal's columns (COLUMNS wins, as in `shutil`), 80 when it cannot be told."""
    try:
        columns = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        columns = 0
    if columns > 0:
        return columns
    try:
        return os.get_terminal_size(out.fileno()).columns or 80
    except (OSError, ValueError, io.UnsupportedOperation):
        return 80
