"""What the live OpenAI engine and the Batch API client agree on: where the key comes from,
how an HTTP status reads, and that no text from the server carries the key.

One mapping of statuses, so a 429 or a 404 means the same thing to a live request, a Files
or Batches call and a line of a batch's output:

    401, 403           "auth"         wrong key: stop, and drop the server's text
    404                "not_found"    wrong URL or model: stop
    429                "rate_limited" passing: wait and ask again
    408                "timeout"      passing
    409, 5xx           "busy"         passing
    other 4xx          "refused"      this request is bad: asking again will not help
"""

from __future__ import annotations

from typing import Any, Literal

import openai

from .._config import EngineConfig, api_key, api_key_env, header_safe

__all__ = [
    "DEFAULT_BASE_URL",
    "DETAIL_CHARS",
    "MissingKey",
    "StatusKind",
    "cause",
    "error_detail",
    "passing",
    "read_key",
    "scrub",
    "status_kind",
    "unreachable_reason",
]

DEFAULT_BASE_URL = "https://api.openai.com/v1"
DETAIL_CHARS = 300

StatusKind = Literal["auth", "not_found", "rate_limited", "timeout", "busy", "refused"]


class MissingKey(Exception):
    """The variable that should hold the API key is not set; the message names it."""


def read_key(config: EngineConfig, base_url: str) -> str:
    """The API key for `config` ("EMPTY" for a local server that needs none).

    :raises MissingKey: the key's variable is not set, or holds what no header can carry.
    """
    var = api_key_env(config)
    key = api_key(config)
    if not key:
        raise MissingKey(
            f"environment variable {var} is not set (it should hold the API key for {base_url})"
        )
    if not header_safe(key):
        raise MissingKey(
            f"the API key in {var or 'OPENAI_API_KEY'} has a character an HTTP header cannot "
            "carry (not ASCII, a space or a control character): check the variable"
        )
    return key


def scrub(text: str, key: str) -> str:
    """`text` with the API key replaced, for anything that came from the server."""
    if len(key) >= 6 and key != "EMPTY":
        text = text.replace(key, "[api key]")
    return text


def status_kind(status: int) -> StatusKind:
    if status in (401, 403):
        return "auth"
    if status == 404:
        return "not_found"
    if status == 429:
        return "rate_limited"
    if status == 408:
        return "timeout"
    if status >= 500 or status == 409:
        return "busy"
    return "refused"


def passing(status: int) -> bool:
    """A status that may pass if asked again later (408, 409, 429, 5xx)."""
    return status_kind(status) in ("rate_limited", "timeout", "busy")


def error_detail(body: Any, key: str) -> str:
    """The server's explanation in an error body as ": <text>", scrubbed and shortened, or "".

    Reads `{"error": {"message": ...}}`, `{"message": ...}` (the SDK's `exc.body`) or a string.
    """
    if isinstance(body, dict):
        inner = body.get("error", body)
        text = inner.get("message") if isinstance(inner, dict) else inner
    else:
        text = body
    if not isinstance(text, str) or not text.strip():
        return ""
    return ": " + scrub(text.strip(), key)[:DETAIL_CHARS]


def cause(exc: openai.APIStatusError) -> BaseException | None:
    """Auth failures drop the SDK error from the chain: servers often quote the key there."""
    return None if status_kind(exc.status_code) == "auth" else exc


def unreachable_reason(exc: openai.APIConnectionError) -> str:
    """Why a connection failed, in a word (the underlying error's class)."""
    return type(exc.__cause__).__name__ if exc.__cause__ else "connection error"
