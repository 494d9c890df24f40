"""An OpenAI-compatible HTTP/1.1 server on 127.0.0.1, for tests and benchmarks.

The real `openai` SDK talks to it over real sockets (keep-alive, many connections), so tests
exercise the same code path as production, minus the network. A `handler` decides every answer:
a completion, an error status with headers, a delay, or a malformed body. Handler builders cover
the common cases: `echo_handler` (generators), `judge_handler` (an UltraFeedback judge with
untidy and broken answers), `rate_limited` (a strict server-side sliding window that answers
429, to prove the client never trips it) and `delayed`.

    async with OpenAIServer(judge_handler()) as server:
        ...  # point an engine at server.base_url; inspect server.requests afterwards

It also serves OpenAI's Files and Batches endpoints, in memory: an uploaded batch file is run
line by line through the same `handler` once `batch_delay` has passed, and its output and error
files come back in OpenAI's batch output format; `expire_after` lets tests expire batches part
way through. `api_key` makes every route answer 401 to any other bearer token (quoting the
token it got, as careless servers do, so tests prove the client never repeats it).

Also runnable: `python -m streamfeedback.testing.openai_server --port 0 --judge` prints its
base URL as the first line of stdout and serves until SIGINT/SIGTERM.

Pure anyio, no dependency beyond the package's own: HTTP/1.1 with Content-Length bodies only.

One job per module: `_http` (Request, Reply, the HTTP/1.1 core), `_batches` (Files and
Batches), `_server` (`OpenAIServer`, the routes), `_handlers` (answer handlers), `_cli` and
`__main__` (the command line).
"""

from __future__ import annotations

from ._batches import StoredBatch, StoredFile
from ._cli import main
from ._handlers import (
    EchoHandler,
    JudgeAnswer,
    JudgeHandler,
    RateLimitedHandler,
    delayed,
    echo_handler,
    judge_handler,
    rate_limited,
    rating_for,
)
from ._http import Handler, Reply, Request
from ._server import OpenAIServer

__all__ = [
    "EchoHandler",
    "Handler",
    "JudgeAnswer",
    "JudgeHandler",
    "OpenAIServer",
    "RateLimitedHandler",
    "Reply",
    "Request",
    "StoredBatch",
    "StoredFile",
    "delayed",
    "echo_handler",
    "judge_handler",
    "main",
    "rate_limited",
    "rating_for",
]
