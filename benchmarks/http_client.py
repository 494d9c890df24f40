"""Client CPU per request over HTTP: the OpenAI backend against the SDK's transports.

    python benchmarks/http_client.py                     # 3000 requests per path, 64 in flight
    python benchmarks/http_client.py --requests 10000 --concurrency 128

A test server (`python -m streamfeedback.testing.openai_server`, echo answers, no latency)
runs in its own process; the client runs here. With `taskset`, the server is pinned to one
core and the client to another, so the client's CPU time is its own. Every path sends the same
chats in the same run, alternating rounds:

- `OpenAIEngine.generate`: the backend (aiohttp POST, msgspec body and answer, its limiter,
  retry loop, header reading and counters);
- SDK raw `client.post` on its default httpx2 stack (the backend's hot path before), and on
  its aiohttp transport (`openai[aiohttp]`, `DefaultAioHttpClient`), answers decoded by msgspec;
- SDK typed `chat.completions.create` (parameters validated, a pydantic model per answer).

Prints CPU milliseconds per request for each.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

import anyio
import httpx2
import msgspec
import openai

from streamfeedback import ChatRequest, Message
from streamfeedback._config import GeneratorConfig
from streamfeedback.engines._openai import OpenAIEngine, _chat_decoder, chat_body

Send = Callable[[ChatRequest], Awaitable[object]]


def _chat(i: int) -> ChatRequest:
    return ChatRequest(
        id=f"r{i}", messages=[Message("user", f"prompt number {i} " * 20)], max_tokens=64
    )


async def _round(send: Send, start: int, n: int, concurrency: int) -> float:
    """CPU seconds to send `n` chats, `concurrency` at a time."""
    limit = anyio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with limit:
            await send(_chat(i))

    cpu = time.process_time()
    async with anyio.create_task_group() as tg:
        for i in range(start, start + n):
            tg.start_soon(one, i)
    return time.process_time() - cpu


async def measure(url: str, requests: int, concurrency: int, rounds: int) -> dict[str, float]:
    config = msgspec.convert(
        {
            "backend": "openai",
            "model": "test-model",
            "base_url": url,
            "api_key_env": "",
            "max_concurrency": concurrency,
        },
        GeneratorConfig,
    )
    engine = OpenAIEngine("bench", config)
    await engine.start()
    limits = httpx2.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    clients = {
        "httpx2": openai.AsyncOpenAI(
            base_url=url,
            api_key="EMPTY",
            max_retries=0,
            http_client=openai.DefaultAsyncHttpxClient(limits=limits),
        ),
        "aiohttp": openai.AsyncOpenAI(
            base_url=url,
            api_key="EMPTY",
            max_retries=0,
            http_client=openai.DefaultAioHttpClient(limits=limits),
        ),
    }

    def raw(client: openai.AsyncOpenAI) -> Send:
        async def send(request: ChatRequest) -> None:
            body = chat_body("test-model", request)
            response = await client.post("/chat/completions", cast_to=httpx2.Response, body=body)
            _chat_decoder.decode(response.content)

        return send

    async def typed(request: ChatRequest) -> None:
        await clients["httpx2"].chat.completions.create(
            model="test-model",
            messages=[{"role": m.role, "content": m.content} for m in request.messages],  # type: ignore[misc]
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
        )

    paths: dict[str, Send] = {
        "OpenAIEngine.generate (aiohttp, msgspec)": engine.generate,
        "SDK client.post, httpx2 (the backend before)": raw(clients["httpx2"]),
        "SDK client.post, aiohttp transport": raw(clients["aiohttp"]),
        "SDK chat.completions.create (typed), httpx2": typed,
    }
    per_round = requests // rounds
    totals = dict.fromkeys(paths, 0.0)
    for send in paths.values():
        await _round(send, 0, concurrency * 2, concurrency)  # warm every pool
    for r in range(rounds):
        for name, send in paths.items():
            totals[name] += await _round(send, r * per_round, per_round, concurrency)
    await engine.aclose()
    for client in clients.values():
        await client.close()
    return {name: total / (per_round * rounds) for name, total in totals.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    pin = shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2
    server_cmd = [sys.executable, "-m", "streamfeedback.testing.openai_server"]
    server = subprocess.Popen(
        (["taskset", "-c", "1"] if pin else []) + server_cmd,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        url = server.stdout.readline().strip()
        if pin:
            os.sched_setaffinity(0, {0})
        results = anyio.run(
            measure,
            url,
            args.requests,
            args.concurrency,
            args.rounds,
            backend="asyncio",
            backend_options={"use_uvloop": True},
        )
    finally:
        server.terminate()
        server.wait()
    print(
        f"{args.requests} requests per path, {args.concurrency} in flight, "
        + ("client on core 0, server on core 1" if pin else "not pinned")
    )
    ours = results["OpenAIEngine.generate (aiohttp, msgspec)"]
    for name, cpu in results.items():
        print(f"{name:46s} {cpu * 1e3:6.2f} ms CPU per request  ({cpu / ours:.1f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
