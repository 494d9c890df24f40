from __future__ import annotations

from streamfeedback import ChatRequest
from streamfeedback.engines import FakeEngine

from .engine_contract import check_engine


def _answer(request: ChatRequest) -> str:
    return " ".join(["word"] * min(request.max_tokens, 5))


async def test_fake_engine_meets_the_contract() -> None:
    await check_engine(FakeEngine("fake", _answer))


async def test_fake_engine_with_async_handler_meets_the_contract() -> None:
    async def answer(request: ChatRequest) -> str:
        return _answer(request)

    await check_engine(FakeEngine("fake", answer))
