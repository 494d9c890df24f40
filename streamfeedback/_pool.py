"""The generator pool: its engines, their configs and gauges, and who is healthy.

Routing asks it which models may take new prompts; a generation worker whose model failed a
prompt for good asks it for a substitute the prompt has not used yet. A model that fails most
of its recent requests (its server is gone, say) cools down: routing leaves it out for
`cooldown` seconds, then tries it again.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections import deque
from collections.abc import Callable

from ._config import GeneratorConfig
from ._gauges import EngineGauge
from .engines import Engine

__all__ = ["Pool"]

log = logging.getLogger("streamfeedback.pool")

_WINDOW = 20
_MIN_SAMPLES = 8
_FAILURE_SHARE = 0.75


class _Health:
    __slots__ = ("cooldowns", "last_error", "recent", "until")

    def __init__(self) -> None:
        self.recent: deque[bool] = deque(maxlen=_WINDOW)
        self.until = 0.0
        self.cooldowns = 0
        self.last_error = ""


class Pool:
    """Engines by name (in config order), with health and per-prompt substitution claims."""

    def __init__(
        self,
        engines: dict[str, Engine],
        configs: dict[str, GeneratorConfig],
        *,
        cooldown: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engines = engines
        self.configs = configs
        self.names = list(engines)
        self.gauges = {name: EngineGauge(name) for name in engines}
        self.cooldown = cooldown
        self._clock = clock
        self._health = {name: _Health() for name in engines}
        self._claims: dict[str, set[str]] = {}

    def record(self, name: str, ok: bool, error: str = "") -> None:
        """One request of `name` ended; a model failing most of its recent ones cools down."""
        health = self._health[name]
        health.recent.append(ok)
        if ok:
            return
        health.last_error = error
        if len(health.recent) < _MIN_SAMPLES:
            return
        failures = health.recent.count(False)
        if failures / len(health.recent) >= _FAILURE_SHARE and not self.cooling(name):
            health.until = self._clock() + self.cooldown
            health.cooldowns += 1
            health.recent.clear()
            log.warning(
                "%s failed %d of its last requests: out of routing for %gs",
                name,
                failures,
                self.cooldown,
            )

    def cooling(self, name: str) -> bool:
        """Out of routing: cooling down, or an engine that says it is gone for good."""
        if getattr(self.engines[name], "gone", False):
            return True
        return self._clock() < self._health[name].until

    def cooling_reason(self, name: str) -> str:
        """Why `name` is out of routing, for the record of a prompt sent elsewhere instead."""
        last = self._health[name].last_error
        if getattr(self.engines[name], "gone", False):
            return f"out of routing for good: its engine is gone (last: {last})"
        return f"cooling down after failing most recent requests (last: {last})"

    def cooldowns(self) -> dict[str, int]:
        """How often each model was taken out of routing (models never taken out omitted)."""
        return {n: h.cooldowns for n, h in self._health.items() if h.cooldowns}

    def available(self, n: int) -> list[str]:
        """Models routing may draw `n` from: the healthy ones, or all if fewer than `n` are."""
        healthy = [name for name in self.names if not self.cooling(name)]
        return healthy if len(healthy) >= n else self.names

    def substitute(self, prompt_id: str, models: tuple[str, ...]) -> str | None:
        """A model this prompt has not used or claimed yet, healthy ones first; claims it."""
        used = self._claims.setdefault(prompt_id, set(models))
        left = [name for name in self.names if name not in used]
        if not left:
            return None
        start = zlib.crc32(prompt_id.encode()) % len(left)
        ordered = left[start:] + left[:start]
        ordered.sort(key=self.cooling)
        choice = ordered[0]
        used.add(choice)
        return choice

    def forget(self, prompt_id: str) -> None:
        """The prompt is complete: its claims are no longer needed."""
        self._claims.pop(prompt_id, None)
