"""Test helpers: an OpenAI-compatible server and handler builders (see `openai_server`).

Loaded lazily, so importing `streamfeedback.testing` costs nothing until a helper is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .openai_server import (
        EchoHandler,
        Handler,
        JudgeAnswer,
        JudgeHandler,
        OpenAIServer,
        RateLimitedHandler,
        Reply,
        Request,
        delayed,
        echo_handler,
        judge_handler,
        rate_limited,
        rating_for,
    )

__all__ = [
    "EchoHandler",
    "Handler",
    "JudgeAnswer",
    "JudgeHandler",
    "OpenAIServer",
    "RateLimitedHandler",
    "Reply",
    "Request",
    "delayed",
    "echo_handler",
    "judge_handler",
    "rate_limited",
    "rating_for",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module(".openai_server", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
