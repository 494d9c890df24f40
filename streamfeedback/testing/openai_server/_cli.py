"""The command line: `python -m streamfeedback.testing.openai_server --port 0 --judge`."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence

import anyio

from ._handlers import delayed, echo_handler, judge_handler, rate_limited
from ._http import Handler
from ._server import OpenAIServer

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m streamfeedback.testing.openai_server",
        description="An OpenAI-compatible test server; prints its base URL on the first line.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument(
        "--judge", action="store_true", help="rate <text k> prompts (others are echoed)"
    )
    parser.add_argument("--untidy", type=float, default=0.4)
    parser.add_argument("--broken", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--words", type=int, default=24, help="echo answer length in words")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before each answer")
    parser.add_argument("--rpm", type=float, default=None, help="answer 429 beyond this rate")
    parser.add_argument("--window", type=float, default=60.0, help="sliding window for --rpm")
    return parser


async def _serve(args: argparse.Namespace) -> None:
    handler: Handler = echo_handler(words=args.words)
    if args.judge:
        handler = judge_handler(
            untidy=args.untidy, broken=args.broken, seed=args.seed, fallback=handler
        )
    if args.delay > 0:
        handler = delayed(handler, args.delay)
    if args.rpm is not None:
        handler = rate_limited(handler, args.rpm, window=args.window)
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with OpenAIServer(handler, host=args.host, port=args.port) as server:
            sys.stdout.write(server.base_url + "\n")
            sys.stdout.flush()
            async for _ in signals:
                break


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    anyio.run(_serve, args)
    return 0
