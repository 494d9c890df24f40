"""Live counters the stages bump and the progress view reads: cheap, mutable, no locks.

One event loop owns them all, so plain integer updates are safe; a stage gets the gauge of
the engine it drives and knows nothing else about who reads it.
"""

from __future__ import annotations

__all__ = ["EngineGauge"]


class EngineGauge:
    """Requests of one engine: in flight now, done, failed, tokens out."""

    __slots__ = ("done", "failed", "in_flight", "name", "peak_in_flight", "tokens")

    def __init__(self, name: str) -> None:
        self.name = name
        self.in_flight = 0
        self.peak_in_flight = 0
        self.done = 0
        self.failed = 0
        self.tokens = 0

    def started(self) -> None:
        self.in_flight += 1
        if self.in_flight > self.peak_in_flight:
            self.peak_in_flight = self.in_flight

    def finished(self, *, tokens: int = 0, failed: bool = False) -> None:
        self.in_flight -= 1
        if failed:
            self.failed += 1
        else:
            self.done += 1
            self.tokens += tokens
