"""`FakeEngine(handler)`: an engine whose answers come from a function, like httpx's MockTransport.

For tests and for embedding: the handler gets each `ChatRequest` and returns the text (or a
full `Completion`), sync or async; raising an `EngineError` from it fails that request.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable

import anyio

from .._exceptions import EngineUnavailable
from .._records import ChatRequest, Completion

__all__ = ["FakeEngine", "Handler"]

Handler = Callable[[ChatRequest], "str | Completion | Awaitable[str | Completion]"]


class FakeEngine:
    """Answers with `handler(request)`; records every request it saw in `requests`."""

    def __init__(self, name: str, handler: Handler) -> None:
        self.name = name
        self.handler = handler
        self.requests: list[ChatRequest] = []
        self.in_flight = 0
        self.peak_in_flight = 0
        self.started = False
        self.closed = False

    async def start(self) -> None:
        self.started = True

    async def generate(self, request: ChatRequest) -> Completion:
        if self.closed:
            raise EngineUnavailable(self.name, "engine was closed")
        self.requests.append(request)
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            answer = self.handler(request)
            if inspect.isawaitable(answer):
                answer = await answer
            else:
                await anyio.lowlevel.checkpoint()
        finally:
            self.in_flight -= 1
        if isinstance(answer, Completion):
            return answer
        tokens = min(len(answer.split()), request.max_tokens)
        return Completion(text=answer, completion_tokens=max(1, tokens), finish_reason="stop")

    async def aclose(self) -> None:
        self.closed = True
