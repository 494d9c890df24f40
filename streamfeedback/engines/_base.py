"""The one interface every model backend implements: sim, OpenAI-compatible HTTP, vLLM.

Generators and the judge both talk to an `Engine`: one chat in, one completion out. An engine
is started once (`start`, which may load weights or spawn a worker process) and closed once
(`aclose`); in between, many `generate` calls run concurrently, and the engine alone decides
how they share its hardware. Errors leave an engine only as `EngineError` subclasses.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from .._records import ChatRequest, Completion

__all__ = ["Engine", "EngineStatistics"]


class EngineStatistics(Protocol):
    in_flight: int
    requests: int
    failures: int
    prompt_tokens: int
    completion_tokens: int


@runtime_checkable
class Engine(Protocol):
    """A model that answers chats. `name` is how records and errors call it."""

    name: str

    async def start(self) -> None:
        """Get ready to serve (load, connect, spawn). Idempotent.

        :raises EngineUnavailable: when the engine cannot start; the message names the model.
        """

    async def generate(self, request: ChatRequest) -> Completion:
        """Answer one chat. Safe to call many times concurrently; cancel to abort.

        :raises EngineError: a subclass saying whether asking again may help.
        """

    async def aclose(self) -> None:
        """Stop serving and free what `start` took (processes, GPU memory, sockets)."""
