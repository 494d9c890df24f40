"""The judge client under more demand than its rate limit: busy up to the limit, never over it.

Drives `OpenAIEngine` (the real openai SDK) against the local `OpenAIServer`, whose judge sits
behind a strict server-side sliding window (`rate_limited`): any request beyond
`rpm * window / 60` in any `window` seconds gets a 429. The client's limiter is configured
with the same limit, and `--concurrency` workers keep asking for the whole run.

    python benchmarks/judge_ratelimit.py                          # 600/min, 10 s windows, 30 s
    python benchmarks/judge_ratelimit.py --rpm 3000 --seconds 60 --window 60

Prints the achieved rate against the limit (target: at least 90%), the most requests the
server saw in any sliding window (must not exceed the budget), and the 429s (target: 0).
Exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import time
from collections import deque

import anyio
import msgspec

from streamfeedback import ChatRequest, EngineError, Message
from streamfeedback._config import RaterConfig
from streamfeedback._ratelimit import RateLimiter
from streamfeedback.engines._openai import OpenAIEngine
from streamfeedback.testing import OpenAIServer, judge_handler, rate_limited


def _prompt(i: int) -> str:
    texts = "\n".join(f"<text {k}> answer {i}-{k} quality={1 + (i + k) % 5}" for k in (1, 2, 3))
    return f"Rate each text from 1 to 5.\n\nTexts:\n{texts}\n"


def _max_in_window(times: list[float], window: float) -> int:
    recent: deque[float] = deque()
    most = 0
    for t in sorted(times):
        recent.append(t)
        while recent[0] <= t - window:
            recent.popleft()
        most = max(most, len(recent))
    return most


async def run(args: argparse.Namespace) -> int:
    guard = rate_limited(judge_handler(), args.rpm, window=args.window)
    async with OpenAIServer(guard) as server:
        config = msgspec.convert(
            {
                "backend": "openai",
                "model": "judge",
                "base_url": server.base_url,
                "requests_per_minute": args.rpm,
                "tokens_per_minute": args.tpm,
                "max_concurrency": args.concurrency,
                "max_retries": 3,
                "max_tokens": 256,
            },
            RaterConfig,
        )
        limiter = RateLimiter(
            max_concurrency=args.concurrency,
            requests_per_minute=args.rpm,
            tokens_per_minute=args.tpm,
            window=args.window,
        )
        engine = OpenAIEngine("judge", config, limiter=limiter)
        await engine.start()
        done = failed = 0

        async def worker(first: int) -> None:
            nonlocal done, failed
            i = first
            while True:
                request = ChatRequest(
                    id=str(i), messages=[Message("user", _prompt(i))], max_tokens=256
                )
                try:
                    await engine.generate(request)
                    done += 1
                except EngineError:
                    failed += 1
                i += args.concurrency

        started = time.monotonic()
        try:
            with anyio.move_on_after(args.seconds):
                async with anyio.create_task_group() as tg:
                    for w in range(args.concurrency):
                        tg.start_soon(worker, w)
        finally:
            await engine.aclose()
        elapsed = time.monotonic() - started

    budget = max(1, int(args.rpm * args.window / 60))
    accepted = [t for t in guard.starts if t <= started + elapsed]
    achieved = len(accepted) / elapsed * 60
    most = _max_in_window(accepted, args.window)
    rejected = guard.rejected
    stats = engine.statistics()
    print(f"limit            {args.rpm:g} requests/min over {args.window:g} s sliding windows")
    print(f"                 (budget {budget} per window), {args.seconds:g} s run")
    print(f"demand           {args.concurrency} workers asking back to back")
    print(f"achieved         {achieved:.1f} requests/min ({achieved / args.rpm:.1%} of the limit)")
    print(f"answered         {done} ok, {failed} failed, {stats.retries} retries")
    print(f"max in a window  {most} (budget {budget})")
    print(f"429s             {rejected}")
    ok = rejected == 0 and most <= budget and achieved >= 0.9 * args.rpm
    print("result           " + ("PASS" if ok else "FAIL (targets: >= 90% of limit, 0 x 429)"))
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rpm", type=float, default=600.0, help="requests per minute")
    parser.add_argument("--tpm", type=float, default=None, help="tokens per minute (optional)")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of the run")
    parser.add_argument("--window", type=float, default=10.0, help="sliding window, seconds")
    parser.add_argument("--concurrency", type=int, default=64, help="workers asking at once")
    args = parser.parse_args()
    return anyio.run(run, args, backend_options={"use_uvloop": True})


if __name__ == "__main__":
    raise SystemExit(main())
