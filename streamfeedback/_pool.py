"""The generator pool: its engines, their configs and gauges, and who is healthy.

Routing asks it which models may take new prompts; a generation worker whose model failed a
prompt for good asks it for a substitute the prompt has not used yet. A model that fails most
of its recent requests (its server is gone, say) cools down: routing leaves it out for
`cooldown` seconds, then tries it again.

A model that has never answered and whose first requests all failed the same way (nothing
listens at its address, every request gets the same 4xx or 5xx, or a wrong key, URL or model)
is a dead end, not a bad patch: it leaves the run for good. Once fewer than `need` models are
left, no record can get its responses, and the generation workers stop the run. An engine
that says it is `gone` (a vLLM worker past its restarts) leaves the run the same way; one that
answered before and then fails, or that restarts its own worker (vLLM, until `gone`), only
cools down.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections import deque
from collections.abc import Callable

from ._config import GeneratorConfig
from ._exceptions import EngineError, EngineUnavailable, PoolUnavailable
from ._gauges import EngineGauge
from .engines import Engine

__all__ = ["Pool"]

log = logging.getLogger("streamfeedback.pool")

_WINDOW = 20
_MIN_SAMPLES = 8
_FAILURE_SHARE = 0.75
_DEAD_END = 8
"""Failures in a row, all alike and before any answer, that make a model leave the run."""


class _Health:
    __slots__ = (
        "answered",
        "cooldowns",
        "gone",
        "last_error",
        "recent",
        "same",
        "signature",
        "until",
    )

    def __init__(self) -> None:
        self.recent: deque[bool] = deque(maxlen=_WINDOW)
        self.until = 0.0
        self.cooldowns = 0
        self.last_error = ""
        self.answered = False
        self.signature: str | None = None
        self.same = 0
        self.gone: str | None = None


class Pool:
    """Engines by name (in config order), with health and per-prompt substitution claims."""

    def __init__(
        self,
        engines: dict[str, Engine],
        configs: dict[str, GeneratorConfig],
        *,
        cooldown: float = 30.0,
        need: int = 1,
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
        self.need = need
        self.exhausted: PoolUnavailable | None = None

    def record(self, name: str, ok: bool, error: str = "") -> None:
        """One request of `name` ended; a model failing most of its recent ones cools down."""
        health = self._health[name]
        health.recent.append(ok)
        if ok:
            health.answered = True
            health.same = 0
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

    def failed(self, name: str, exc: EngineError) -> None:
        """One request of `name` failed with `exc`: a dead end makes the model leave the run.

        :raises PoolUnavailable: too few models are left for a record.
        """
        health = self._health[name]
        if health.gone is not None:
            self.check()
            return
        if exc.status == 429:
            return  # busy, not dead: rate limits slow the run down instead
        signature = exc.kind
        gone = getattr(self.engines[name], "gone", None)  # None: not a restartable engine
        if gone:
            self._retire(name, f"its engine is gone for good (last: {exc})")
        elif gone is not None:
            pass  # it restarts its worker itself: out of routing while cooling, until `gone`
        elif isinstance(exc, EngineUnavailable) and (
            not health.answered or exc.status in (401, 403, 404)
        ):
            # refused its key, URL or model, or unreachable from the start: a dead end; one
            # that answered and then went away cools down instead
            self._retire(name, f"{exc}")
        elif not health.answered:
            health.same = health.same + 1 if signature == health.signature else 1
            health.signature = signature
            if health.same >= _DEAD_END:
                self._retire(name, f"its first {health.same} requests all failed (last: {exc})")
        self.check()

    def _retire(self, name: str, reason: str) -> None:
        self._health[name].gone = reason
        log.error("%s leaves the run: %s", name, reason)
        live = self.live()
        if len(live) < self.need and self.exhausted is None:
            gone = "; ".join(f"{n}: {h.gone}" for n, h in self._health.items() if h.gone)
            self.exhausted = PoolUnavailable(
                f"{len(live)} of {len(self.names)} generators left and each record needs "
                f"{self.need}: stopping. {gone}"
            )

    def check(self) -> None:
        """:raises PoolUnavailable: too few models are left for a record."""
        if self.exhausted is not None:
            raise self.exhausted

    def gone(self, name: str) -> str | None:
        """Why `name` left the run for good, or None while it is in."""
        return self._health[name].gone

    def live(self) -> list[str]:
        """The models still in the run (cooling ones included)."""
        return [name for name in self.names if self._health[name].gone is None]

    def cooling(self, name: str) -> bool:
        """Out of routing for now: cooling down, or gone for good (left the run, or an engine
        that says it is gone: a vLLM worker past its restarts)."""
        health = self._health[name]
        if health.gone is not None or getattr(self.engines[name], "gone", False):
            return True
        return self._clock() < health.until

    def cooling_reason(self, name: str) -> str:
        """Why `name` is out of routing, for the record of a prompt sent elsewhere instead."""
        health = self._health[name]
        if health.gone is not None:
            return f"left the run ({health.gone})"
        last = health.last_error
        if getattr(self.engines[name], "gone", False):
            return f"out of routing for good: its engine is gone (last: {last})"
        return f"cooling down after failing most recent requests (last: {last})"

    def cooldowns(self) -> dict[str, int]:
        """How often each model was taken out of routing (models never taken out omitted)."""
        return {n: h.cooldowns for n, h in self._health.items() if h.cooldowns}

    def available(self, n: int) -> list[str]:
        """Models routing may draw `n` from: the healthy ones, or all if fewer than `n` are."""
        healthy = [name for name in self.names if not self.cooling(name)]
        if len(healthy) >= n:
            return healthy
        live = self.live()
        return live if len(live) >= n else self.names

    def substitute(self, prompt_id: str, models: tuple[str, ...]) -> str | None:
        """A model this prompt has not used or claimed yet, healthy ones first; claims it."""
        used = self._claims.setdefault(prompt_id, set(models))
        left = [name for name in self.live() if name not in used]
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
