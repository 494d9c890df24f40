"""Live counters the stages bump and the progress view reads: cheap, mutable, no locks.

One event loop owns them all, so plain integer updates are safe; a stage gets the gauge of
the engine it drives and knows nothing else about who reads it.
"""

from __future__ import annotations

import bisect

__all__ = ["SECONDS_BUCKETS", "EngineGauge"]

SECONDS_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)
"""Upper bounds of the generation-time histogram (seconds), from an instant sim to a slow API."""


class EngineGauge:
    """Requests of one engine: in flight now, done, failed, tokens out, and how long the
    answers took (a histogram over `SECONDS_BUCKETS`, for Prometheus)."""

    __slots__ = (
        "done",
        "failed",
        "in_flight",
        "name",
        "peak_in_flight",
        "seconds_buckets",
        "seconds_sum",
        "tokens",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        self.in_flight = 0
        self.peak_in_flight = 0
        self.done = 0
        self.failed = 0
        self.tokens = 0
        self.seconds_sum = 0.0
        self.seconds_buckets = [0] * (len(SECONDS_BUCKETS) + 1)  # the last one: above them all

    def started(self) -> None:
        self.in_flight += 1
        if self.in_flight > self.peak_in_flight:
            self.peak_in_flight = self.in_flight

    def finished(self, *, tokens: int = 0, failed: bool = False, seconds: float = 0.0) -> None:
        self.in_flight -= 1
        if failed:
            self.failed += 1
        else:
            self.done += 1
            self.tokens += tokens
            self.seconds_sum += seconds
            self.seconds_buckets[bisect.bisect_left(SECONDS_BUCKETS, seconds)] += 1
