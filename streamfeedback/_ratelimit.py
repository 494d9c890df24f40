"""Client-side rate limiting for remote engines: concurrency cap, sliding-window log, pacer.

Providers refuse requests beyond `requests_per_minute` and `tokens_per_minute`, and every 429
costs a round trip plus a pause, so the judge should never trip them. Three mechanisms work
together, and only the first two are needed for the guarantee:

- a concurrency cap (`max_concurrency` requests in flight);
- a sliding-window log of request starts (time, tokens): a request starts only if, counting it,
  no half-open window of `window` seconds holds more than the per-window budget
  (`requests_per_minute * window / 60`, and likewise for tokens). This is the hard guarantee,
  counted with estimates at send time and corrected by `Lease.settle` once `usage` is known;
- a pacer (two token buckets, one for requests and one for tokens) that spreads the budget over
  the window at `1 - headroom` of the limit with a small burst, because providers also enforce
  sub-minute buckets, and because a burst at t=0 would come back as a burst exactly one window
  later, where any network jitter would push the provider's own window over the limit.

Decisions read the injected `clock`; waiting goes through anyio. `_delay_needed(now, tokens)` is
the whole decision, pure in `now`, so tests drive it with a fake clock and never sleep.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from types import TracebackType

import anyio
import msgspec

__all__ = ["Lease", "RateLimiter", "RateLimiterStatistics"]

_MIN_SLEEP = 0.001
# waits overshoot by this much, so that after waiting exactly the delay the float arithmetic
# of "has the entry left the window?" cannot come out an ulp short
_EPSILON = 1e-6


class RateLimiterStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot for progress views: what runs, what waits, and what the window holds."""

    in_flight: int
    waiting: int
    requests: int
    tokens: int
    window_requests: int
    window_tokens: int
    paused_s: float
    pauses: int
    max_concurrency: int
    concurrency: int
    requests_per_minute: float | None
    tokens_per_minute: float | None
    window: float


class _Entry:
    """One request start in the window log; `tokens` changes when the lease settles."""

    __slots__ = ("live", "time", "tokens")

    def __init__(self, at: float, tokens: int) -> None:
        self.time = at
        self.tokens = tokens
        self.live = True


class _Bucket:
    """A token bucket that may go into debt, so an oversized request can still pass alone."""

    __slots__ = ("capacity", "level", "rate", "updated")

    def __init__(self, rate: float, capacity: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self.level = capacity
        self.updated: float | None = None

    def level_at(self, now: float) -> float:
        if self.updated is None:
            return self.level
        return min(self.capacity, self.level + max(0.0, now - self.updated) * self.rate)

    def delay(self, now: float, cost: float) -> float:
        """Seconds until `cost` may be taken; costs above capacity need a full bucket."""
        need = min(cost, self.capacity)
        level = self.level_at(now)
        return 0.0 if level >= need else (need - level) / self.rate

    def take(self, now: float, cost: float) -> None:
        self.level = self.level_at(now) - cost
        self.updated = now

    def give_back(self, now: float, amount: float) -> None:
        """Refund (or, when negative, charge) the difference between estimate and actual."""
        self.level = min(self.capacity, self.level_at(now) + amount)
        self.updated = now


class Lease:
    """One started request. `settle` replaces the token estimate with what `usage` reported."""

    __slots__ = ("_entry", "_limiter", "_released", "estimated_tokens", "started_at")

    def __init__(self, limiter: RateLimiter, entry: _Entry) -> None:
        self._limiter = limiter
        self._entry = entry
        self._released = False
        self.estimated_tokens = entry.tokens
        self.started_at = entry.time

    @property
    def tokens(self) -> int:
        """What the window counts for this request now: the estimate, or the settled amount."""
        return self._entry.tokens

    def settle(self, actual_tokens: int) -> None:
        """Correct the window and the pacer to the real token count of this request."""
        self._limiter._settle(self._entry, max(0, int(actual_tokens)))

    def release(self) -> None:
        """Free the concurrency slot. Idempotent; `acquire` calls it for you."""
        if not self._released:
            self._released = True
            self._limiter._release()

    def __enter__(self) -> Lease:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


class RateLimiter:
    """Lets requests start no faster than the provider allows, and keeps them coming up to it.

    Limits are rates per minute whatever `window` is: the log enforces a budget of
    `limit * window / 60` per `window` seconds (at least one request), so a shorter window is a
    stricter check of the same rate (tests and benchmarks use a few seconds).
    """

    def __init__(
        self,
        *,
        max_concurrency: int,
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
        window: float = 60.0,
        headroom: float = 0.05,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        if window <= 0:
            raise ValueError("window must be positive")
        if not 0.0 <= headroom < 1.0:
            raise ValueError("headroom must be in [0, 1)")
        for label, value in (("requests", requests_per_minute), ("tokens", tokens_per_minute)):
            if value is not None and value <= 0:
                raise ValueError(f"{label}_per_minute must be positive")
        self.max_concurrency = max_concurrency
        self.concurrency = max_concurrency
        self._successes = 0
        self._last_cut = -math.inf
        self.window = window
        self.headroom = headroom
        self._clock = clock
        self._rpm: float | None = None
        self._tpm: float | None = None
        self._request_budget = math.inf
        self._token_budget = math.inf
        self._request_bucket: _Bucket | None = None
        self._token_bucket: _Bucket | None = None
        self._set_limits(requests_per_minute, tokens_per_minute)
        self._log: deque[_Entry] = deque()
        self._window_tokens = 0
        self._in_flight = 0
        self._waiting = 0
        self._requests = 0
        self._tokens = 0
        self._paused_until = -math.inf
        self._pauses = 0
        self._turn: anyio.Lock | None = None
        self._changed: anyio.Event | None = None

    @property
    def requests_per_minute(self) -> float | None:
        return self._rpm

    @property
    def tokens_per_minute(self) -> float | None:
        return self._tpm

    def _set_limits(self, rpm: float | None, tpm: float | None) -> None:
        scale = self.window / 60.0
        self._rpm, self._tpm = rpm, tpm
        self._request_budget = math.inf if rpm is None else max(1.0, math.floor(rpm * scale))
        self._token_budget = math.inf if tpm is None else max(1.0, tpm * scale)
        self._request_bucket = self._pacer(self._request_bucket, rpm, whole=True)
        self._token_bucket = self._pacer(self._token_bucket, tpm, whole=False)

    def _pacer(
        self, old: _Bucket | None, per_minute: float | None, *, whole: bool
    ) -> _Bucket | None:
        """Pace at `1 - headroom` of the rate, bursting at most half the headroom of a window:
        then the pacer alone stays under the window budget, with margin for jitter."""
        if per_minute is None:
            return None
        rate = per_minute * (1.0 - self.headroom) / 60.0
        burst = per_minute * self.window / 60.0 * self.headroom / 2.0
        capacity = max(1.0, math.floor(burst) if whole else burst)
        if old is None:
            return _Bucket(rate, capacity)
        old.rate, old.capacity = rate, capacity
        old.level = min(old.level, capacity)
        return old

    # -- decisions (synchronous, clock-driven) -------------------------------------------

    def _prune(self, now: float) -> None:
        horizon = now - self.window
        log = self._log
        while log and log[0].time <= horizon:
            entry = log.popleft()
            entry.live = False
            self._window_tokens -= entry.tokens

    def _delay_needed(self, now: float, tokens: int) -> float:
        """Seconds from `now` until a request estimated at `tokens` may start (0 = now).

        Concurrency is not part of it: that is a wait for a release, not for time.
        """
        self._prune(now)
        delay = max(0.0, self._paused_until - now)
        log = self._log
        if self._request_budget < math.inf and len(log) + 1 > self._request_budget:
            # the oldest entries must leave until, with this one, the count fits the budget
            blocker = log[len(log) - int(self._request_budget)]
            delay = max(delay, blocker.time + self.window - now)
        if self._token_budget < math.inf and self._window_tokens + tokens > self._token_budget:
            # an oversized request (estimate above a whole window's budget) goes alone:
            # it waits until the window is empty rather than forever
            allowed = max(0.0, self._token_budget - tokens)
            remaining = self._window_tokens
            for entry in log:
                if remaining <= allowed:
                    break
                remaining -= entry.tokens
                delay = max(delay, entry.time + self.window - now)
        if self._request_bucket is not None:
            delay = max(delay, self._request_bucket.delay(now, 1.0))
        if self._token_bucket is not None:
            delay = max(delay, self._token_bucket.delay(now, float(tokens)))
        return delay + _EPSILON if delay > 0 else 0.0

    def _start(self, now: float, tokens: int) -> Lease:
        entry = _Entry(now, tokens)
        self._log.append(entry)
        self._window_tokens += tokens
        if self._request_bucket is not None:
            self._request_bucket.take(now, 1.0)
        if self._token_bucket is not None:
            self._token_bucket.take(now, float(tokens))
        self._in_flight += 1
        self._requests += 1
        self._tokens += tokens
        return Lease(self, entry)

    def _settle(self, entry: _Entry, actual: int) -> None:
        diff = actual - entry.tokens
        if diff == 0:
            return
        if entry.live:
            self._window_tokens += diff
        entry.tokens = actual
        self._tokens += diff
        if self._token_bucket is not None:
            self._token_bucket.give_back(self._clock(), float(-diff))
        self._notify()

    def _release(self) -> None:
        self._in_flight -= 1
        self._notify()

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    # -- public API ----------------------------------------------------------------------

    def acquire_nowait(self, estimated_tokens: int) -> Lease:
        """Start a request now if nothing is queued and the limits allow it.

        :raises anyio.WouldBlock: when it would have to wait.
        """
        tokens = max(0, int(estimated_tokens))
        if self._waiting or self._in_flight >= self.concurrency:
            raise anyio.WouldBlock
        now = self._clock()
        if self._delay_needed(now, tokens) > 0:
            raise anyio.WouldBlock
        return self._start(now, tokens)

    @asynccontextmanager
    async def acquire(self, estimated_tokens: int) -> AsyncIterator[Lease]:
        """Wait (first come, first served) for a concurrency slot and room in the window.

        The lease is counted as started when this enters, and its slot is freed when it exits.
        """
        lease = await self._wait_and_start(max(0, int(estimated_tokens)))
        try:
            yield lease
        finally:
            lease.release()

    async def _wait_and_start(self, tokens: int) -> Lease:
        if self._turn is None:
            self._turn = anyio.Lock()
        self._waiting += 1
        try:
            async with self._turn:
                while True:
                    if self._in_flight < self.concurrency:
                        now = self._clock()
                        delay = self._delay_needed(now, tokens)
                        if delay <= 0:
                            return self._start(now, tokens)
                    else:
                        delay = math.inf
                    if self._changed is None:
                        self._changed = anyio.Event()
                    changed = self._changed
                    with anyio.move_on_after(max(delay, _MIN_SLEEP)):
                        await changed.wait()
        finally:
            self._waiting -= 1

    def on_rate_limited(self) -> None:
        """A 429: halve the requests allowed in flight (at most once per second, so one
        burst of 429s counts once). Additive increase in `on_success` wins it back."""
        now = self._clock()
        if now - self._last_cut < 1.0:
            return
        self._last_cut = now
        self._successes = 0
        self.concurrency = max(1, self.concurrency // 2)

    def on_success(self) -> None:
        """One more request went through: after `concurrency` of them, allow one more."""
        if self.concurrency >= self.max_concurrency:
            return
        self._successes += 1
        if self._successes >= self.concurrency:
            self._successes = 0
            self.concurrency += 1
            self._notify()

    def pause_until(self, deadline: float) -> None:
        """Start nothing before `deadline` (on this limiter's clock): a 429's `retry-after`."""
        if deadline > self._paused_until:
            self._paused_until = deadline
            self._pauses += 1
            self._notify()

    def pause(self, seconds: float) -> None:
        """Start nothing for `seconds` from now."""
        self.pause_until(self._clock() + max(0.0, seconds))

    def update_limits(
        self,
        *,
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
    ) -> bool:
        """Adopt the provider's limits (`x-ratelimit-limit-*`) where they are stricter than ours.

        Returns whether anything changed. Limits only ever go down: a header cannot raise what
        the config set.
        """
        rpm, tpm = self._rpm, self._tpm
        if requests_per_minute is not None and requests_per_minute > 0:
            if rpm is None or requests_per_minute < rpm:
                rpm = requests_per_minute
        if tokens_per_minute is not None and tokens_per_minute > 0:
            if tpm is None or tokens_per_minute < tpm:
                tpm = tokens_per_minute
        if (rpm, tpm) == (self._rpm, self._tpm):
            return False
        self._set_limits(rpm, tpm)
        self._notify()
        return True

    def statistics(self) -> RateLimiterStatistics:
        now = self._clock()
        self._prune(now)
        return RateLimiterStatistics(
            in_flight=self._in_flight,
            waiting=self._waiting,
            requests=self._requests,
            tokens=self._tokens,
            window_requests=len(self._log),
            window_tokens=self._window_tokens,
            paused_s=max(0.0, self._paused_until - now),
            pauses=self._pauses,
            max_concurrency=self.max_concurrency,
            concurrency=self.concurrency,
            requests_per_minute=self._rpm,
            tokens_per_minute=self._tpm,
            window=self.window,
        )
