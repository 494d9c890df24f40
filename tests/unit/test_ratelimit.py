"""RateLimiter: decisions on a fake clock (no sleeping), plus a few short real-time checks."""

from __future__ import annotations

import random
from collections.abc import Iterable

import anyio
import pytest

from streamfeedback._ratelimit import RateLimiter, RateLimiterStatistics


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _limiter(clock: FakeClock, *, max_concurrency: int = 10_000, **kw: float) -> RateLimiter:
    return RateLimiter(max_concurrency=max_concurrency, clock=clock, **kw)


def _run(
    limiter: RateLimiter, clock: FakeClock, demand: Iterable[tuple[float, int]]
) -> list[tuple[float, int]]:
    """Start every (arrival, tokens) request as soon as the limiter lets it, in order.

    Returns (start time, tokens) per request. Leases are released at once: only the window
    and the pacer are under test here.
    """
    starts: list[tuple[float, int]] = []
    for arrival, tokens in demand:
        clock.now = max(clock.now, arrival)
        while (delay := limiter._delay_needed(clock.now, tokens)) > 0:
            clock.advance(delay)
        with limiter.acquire_nowait(tokens):
            starts.append((clock.now, tokens))
    return starts


def _max_in_window(starts: list[tuple[float, int]], window: float) -> tuple[int, int]:
    """The most requests and tokens that started within any half-open window."""
    most_requests = most_tokens = 0
    j = 0
    tokens = 0
    for i, (t, n) in enumerate(starts):
        tokens += n
        while starts[j][0] <= t - window:
            tokens -= starts[j][1]
            j += 1
        most_requests = max(most_requests, i - j + 1)
        most_tokens = max(most_tokens, tokens)
    return most_requests, most_tokens


def test_window_holds_under_bursty_demand() -> None:
    clock = FakeClock()
    limiter = _limiter(clock, requests_per_minute=500, tokens_per_minute=100_000)
    rng = random.Random(7)
    demand: list[tuple[float, int]] = []
    t = clock.now
    for _ in range(40):  # bursts of up to 200 requests at once, then quiet spells
        t += rng.expovariate(1 / 20)
        demand += [(t, rng.randint(50, 800)) for _ in range(rng.randint(1, 200))]
    starts = _run(limiter, clock, demand)
    assert len(starts) == len(demand)
    most_requests, most_tokens = _max_in_window(starts, 60.0)
    assert most_requests <= 500
    assert most_tokens <= 100_000


def test_saturated_demand_reaches_the_limit_but_never_passes_it() -> None:
    clock = FakeClock()
    limiter = _limiter(clock, requests_per_minute=300)
    starts = _run(limiter, clock, [(clock.now, 10)] * 3000)
    assert _max_in_window(starts, 60.0)[0] <= 300
    minutes = (starts[-1][0] - starts[0][0]) / 60
    assert len(starts) / minutes >= 0.9 * 300


def test_token_limit_is_reached_but_never_passed() -> None:
    clock = FakeClock()
    limiter = _limiter(clock, tokens_per_minute=60_000)
    rng = random.Random(3)
    starts = _run(limiter, clock, [(clock.now, rng.randint(100, 3000)) for _ in range(3000)])
    assert _max_in_window(starts, 60.0)[1] <= 60_000
    minutes = (starts[-1][0] - starts[0][0]) / 60
    assert sum(n for _, n in starts) / minutes >= 0.9 * 60_000


def test_pacer_spreads_the_budget_over_the_window() -> None:
    clock = FakeClock()
    limiter = _limiter(clock, requests_per_minute=600)  # 10/s, paced at 9.5/s
    starts = [t for t, _ in _run(limiter, clock, [(clock.now, 1)] * 100)]
    first_second = sum(1 for t in starts if t < starts[0] + 1.0)
    assert first_second <= 1 + 600 / 60 * 0.05 / 2 * 60 + 10, "no minute's budget at t=0"
    assert first_second <= 30
    gaps = [b - a for a, b in zip(starts[20:], starts[21:], strict=False)]
    assert min(gaps) == pytest.approx(max(gaps)) == pytest.approx(60 / (600 * 0.95))


def test_settle_corrects_the_window_to_the_real_amount() -> None:
    clock = FakeClock()
    limiter = _limiter(clock, tokens_per_minute=10_000, window=60.0)
    lease = limiter.acquire_nowait(9_000)
    assert limiter.statistics().window_tokens == 9_000
    assert limiter._delay_needed(clock.now, 5_000) >= 50  # would wait for the window to pass
    lease.settle(1_000)
    assert lease.tokens == 1_000
    stats = limiter.statistics()
    assert (stats.window_tokens, stats.tokens) == (1_000, 1_000)
    clock.advance(30)  # the pacer refilled the refund; the window has room now
    assert limiter._delay_needed(clock.now, 5_000) == 0
    lease.release()


def test_settle_upwards_charges_the_window() -> None:
    clock = FakeClock()
    limiter = _limiter(clock, tokens_per_minute=10_000)
    with limiter.acquire_nowait(100) as lease:
        lease.settle(9_950)
    assert limiter.statistics().window_tokens == 9_950
    assert limiter._delay_needed(clock.now, 100) > 0
    clock.advance(60)
    assert limiter.statistics().window_tokens == 0


def test_pause_holds_everyone_until_the_deadline() -> None:
    clock = FakeClock()
    limiter = _limiter(clock, requests_per_minute=600)
    limiter.pause(5)
    assert limiter._delay_needed(clock.now, 1) == pytest.approx(5)
    assert limiter.statistics().paused_s == pytest.approx(5)
    with pytest.raises(anyio.WouldBlock):
        limiter.acquire_nowait(1)
    limiter.pause_until(clock.now + 1)  # a shorter pause does not shorten it
    assert limiter._delay_needed(clock.now, 1) == pytest.approx(5)
    clock.advance(5)
    assert limiter._delay_needed(clock.now, 1) == 0
    assert limiter.statistics().pauses == 1


def test_oversized_request_goes_alone_instead_of_deadlocking() -> None:
    clock = FakeClock()
    limiter = _limiter(clock, tokens_per_minute=1_000)
    with limiter.acquire_nowait(200):
        pass
    assert limiter._delay_needed(clock.now, 5_000) == pytest.approx(60)
    starts = _run(limiter, clock, [(clock.now, 5_000), (clock.now, 10)])
    (big_at, _), (small_at, _) = starts
    assert big_at >= 1060
    assert small_at >= big_at + 60, "nothing else starts in the oversized request's window"


def test_concurrency_cap_and_fifo_nowait() -> None:
    limiter = _limiter(FakeClock(), max_concurrency=2)
    first = limiter.acquire_nowait(1)
    second = limiter.acquire_nowait(1)
    with pytest.raises(anyio.WouldBlock):
        limiter.acquire_nowait(1)
    assert limiter.statistics().in_flight == 2
    first.release()
    first.release()  # idempotent
    third = limiter.acquire_nowait(1)
    second.release()
    third.release()
    assert limiter.statistics().in_flight == 0


def test_update_limits_only_lowers() -> None:
    clock = FakeClock()
    limiter = _limiter(clock, requests_per_minute=600)
    assert not limiter.update_limits(requests_per_minute=1_000)
    assert limiter.update_limits(requests_per_minute=60, tokens_per_minute=1_000)
    assert (limiter.requests_per_minute, limiter.tokens_per_minute) == (60, 1_000)
    starts = _run(limiter, clock, [(clock.now, 1)] * 200)
    assert _max_in_window(starts, 60.0)[0] <= 60


def test_short_window_scales_the_budget() -> None:
    clock = FakeClock()
    limiter = _limiter(clock, requests_per_minute=1_200, window=1.0)  # 20 per second
    starts = _run(limiter, clock, [(clock.now, 1)] * 200)
    assert _max_in_window(starts, 1.0)[0] <= 20
    assert _max_in_window(starts, 60.0)[0] <= 1_200


def test_statistics_is_a_frozen_snapshot() -> None:
    clock = FakeClock()
    limiter = _limiter(clock, requests_per_minute=60, tokens_per_minute=6_000)
    with limiter.acquire_nowait(42):
        stats = limiter.statistics()
    assert isinstance(stats, RateLimiterStatistics)
    assert (stats.in_flight, stats.requests, stats.tokens) == (1, 1, 42)
    assert (stats.window_requests, stats.window_tokens) == (1, 42)
    with pytest.raises(AttributeError):
        stats.in_flight = 3  # type: ignore[misc]


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        RateLimiter(max_concurrency=0)
    with pytest.raises(ValueError):
        RateLimiter(max_concurrency=1, requests_per_minute=0)
    with pytest.raises(ValueError):
        RateLimiter(max_concurrency=1, window=0)


# -- real time, short windows ------------------------------------------------------------


async def test_acquire_caps_concurrency() -> None:
    limiter = RateLimiter(max_concurrency=3)
    running = peak = 0

    async def job() -> None:
        nonlocal running, peak
        async with limiter.acquire(1):
            running += 1
            peak = max(peak, running)
            await anyio.sleep(0.01)
            running -= 1

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for _ in range(12):
                tg.start_soon(job)
    assert peak == 3
    stats = limiter.statistics()
    assert (stats.requests, stats.in_flight, stats.waiting) == (12, 0, 0)


async def test_acquire_waits_for_window_room() -> None:
    limiter = RateLimiter(max_concurrency=100, requests_per_minute=1200, window=0.25)  # 5 / 0.25 s
    starts: list[float] = []

    async def job() -> None:
        async with limiter.acquire(1):
            starts.append(anyio.current_time())

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for _ in range(8):
                tg.start_soon(job)
    assert len(starts) == 8
    assert all(b - a >= 0.25 - 0.01 for a, b in zip(starts, starts[5:], strict=False))


async def test_settle_wakes_a_waiter() -> None:
    limiter = RateLimiter(max_concurrency=10, tokens_per_minute=60_000, window=1.0)  # 1000/s
    async with limiter.acquire(1_000) as lease:
        pass
    start = anyio.current_time()
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:

            async def refund() -> None:
                await anyio.sleep(0.05)
                lease.settle(0)

            tg.start_soon(refund)
            async with limiter.acquire(500):  # waits on the window, until the refund
                waited = anyio.current_time() - start
    assert 0.03 <= waited < 0.6


async def test_pause_delays_waiters() -> None:
    limiter = RateLimiter(max_concurrency=10)
    limiter.pause(0.1)
    start = anyio.current_time()
    async with limiter.acquire(1):
        assert anyio.current_time() - start >= 0.09


async def test_cancelled_waiter_leaves_no_trace() -> None:
    limiter = RateLimiter(max_concurrency=1)
    async with limiter.acquire(1):
        with anyio.move_on_after(0.02):
            async with limiter.acquire(1):
                pytest.fail("the slot is taken")
    stats = limiter.statistics()
    assert (stats.in_flight, stats.waiting, stats.requests) == (0, 0, 1)
    async with limiter.acquire(1):
        pass
