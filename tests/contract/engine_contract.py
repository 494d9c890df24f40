"""One conformance suite for every Engine: sim, OpenAI-compatible, vLLM (fake and real).

Each backend's test module builds a started-able engine and calls `check_engine(engine)`.
Plain async functions, like trio's check_one_way_stream, so one suite serves every backend.
"""

from __future__ import annotations

import anyio

from streamfeedback import ChatRequest, EngineError, Message
from streamfeedback.engines import Engine


def _request(i: int, *, max_tokens: int = 32) -> ChatRequest:
    return ChatRequest(
        id=f"contract-{i}",
        messages=[Message("user", f"Write one sentence about the number {i}.")],
        max_tokens=max_tokens,
        temperature=0.0,
        seed=i,
    )


async def check_engine(engine: Engine, *, concurrency: int = 16) -> None:
    """Start, serve, honour max_tokens, survive cancellation, run concurrently, close."""
    await engine.start()
    await engine.start()  # idempotent
    try:
        first = await engine.generate(_request(0))
        assert first.text, "an engine must answer with text"
        assert first.finish_reason in {"stop", "length"}, first.finish_reason
        assert 0 < first.completion_tokens <= 32

        short = await engine.generate(_request(1, max_tokens=3))
        assert 0 < short.completion_tokens <= 3, "max_tokens must reach the engine"

        with anyio.move_on_after(0.001):
            await engine.generate(_request(2, max_tokens=32))
        again = await engine.generate(_request(3))
        assert again.text, "an engine must keep serving after a cancelled request"

        results: dict[int, str] = {}

        async def one(i: int) -> None:
            completion = await engine.generate(_request(100 + i))
            results[i] = completion.text

        async with anyio.create_task_group() as tg:
            for i in range(concurrency):
                tg.start_soon(one, i)
        assert sorted(results) == list(range(concurrency))
    finally:
        await engine.aclose()

    try:
        await engine.generate(_request(4))
    except EngineError:
        pass
    else:
        raise AssertionError("generate after aclose must raise an EngineError")
