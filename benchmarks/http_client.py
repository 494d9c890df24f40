"""Client CPU per request over HTTP: the OpenAI backend against the SDK's typed `create`.

    python benchmarks/http_client.py                     # 3000 requests, 64 in flight
    python benchmarks/http_client.py --requests 10000 --concurrency 128

A test server (`python -m streamfeedback.testing.openai_server`, echo answers, no latency)
runs in its own process; the client runs here. With `taskset`, the server is pinned to one
core and the client to another, so the client's CPU time is its own. Both paths send the same
chats in the same run, alternating rounds: `OpenAIEngine.generate` (the raw `client.post`,
answers decoded by msgspec) and `AsyncOpenAI.chat.completions.create` (parameters validated
and transformed, the answer built as a pydantic model). Prints CPU milliseconds per request
for each and their ratio.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time

import anyio
import msgspec
import openai

from streamfeedback import ChatRequest, Message
from streamfeedback._config import GeneratorConfig
from streamfeedback.engines._openai import OpenAIEngine


def _chat(i: int) -> ChatRequest:
    return ChatRequest(
        id=f"r{i}", messages=[Message("user", f"prompt number {i} " * 20)], max_tokens=64
    )


async def _round(send: object, start: int, n: int, concurrency: int) -> float:
    """CPU seconds to send `n` chats, `concurrency` at a time."""
    limit = anyio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with limit:
            await send(_chat(i))  # type: ignore[operator]

    cpu = time.process_time()
    async with anyio.create_task_group() as tg:
        for i in range(start, start + n):
            tg.start_soon(one, i)
    return time.process_time() - cpu


async def measure(url: str, requests: int, concurrency: int, rounds: int) -> tuple[float, float]:
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
    client = openai.AsyncOpenAI(base_url=url, api_key="EMPTY", max_retries=0)

    async def typed(request: ChatRequest) -> None:
        await client.chat.completions.create(
            model="test-model",
            messages=[{"role": m.role, "content": m.content} for m in request.messages],  # type: ignore[misc]
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
        )

    per_round = requests // rounds
    ours = sdk = 0.0
    await _round(engine.generate, 0, concurrency * 2, concurrency)  # warm both pools
    await _round(typed, 0, concurrency * 2, concurrency)
    for r in range(rounds):
        ours += await _round(engine.generate, r * per_round, per_round, concurrency)
        sdk += await _round(typed, r * per_round, per_round, concurrency)
    await engine.aclose()
    await client.close()
    return ours / (per_round * rounds), sdk / (per_round * rounds)


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
        ours, sdk = anyio.run(
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
    print(f"OpenAIEngine.generate (raw post, msgspec):   {ours * 1e3:6.2f} ms CPU per request")
    print(f"SDK chat.completions.create (typed):         {sdk * 1e3:6.2f} ms CPU per request")
    print(f"ratio typed / ours: {sdk / ours:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
