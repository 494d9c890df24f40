"""The OpenAI-compatible HTTP engine: the real `openai` SDK behind our rate limiter.

The SDK's own retries are off (`max_retries=0`): every attempt, retries included, must pass
through the limiter, or a wave of retries would burst past the provider's limits. So this module
owns the retry loop, and maps each SDK error onto our tree:

    429                            -> retried after `retry-after` (all pause), then EngineBusy
    5xx, 409, connection errors    -> retried with backoff, then EngineBusy (the server is
                                      overloaded or unreachable for now; the run goes on)
    408, timeouts                  -> retried with backoff, then EngineTimeout
    malformed body (no choices...) -> retried with backoff, then EngineError
    401, 403, 404                  -> EngineUnavailable at once (wrong key, URL or model)
    other 4xx (400: too long)      -> EngineRequestError at once

No `openai.*` error leaves `generate`, and no message or log line carries the API key: texts
that come from the server are scrubbed of it, and auth failures drop the server's text.
"""

from __future__ import annotations

import email.utils
import importlib
import logging
import math
import random
import re
import time
from collections.abc import Mapping
from typing import Any

import anyio
import msgspec
import openai

from .._config import EngineConfig
from .._exceptions import (
    EngineBusy,
    EngineError,
    EngineRequestError,
    EngineTimeout,
    EngineUnavailable,
)
from .._ratelimit import RateLimiter
from .._records import ChatRequest, Completion
from ._openai_errors import (
    DEFAULT_BASE_URL,
    DETAIL_CHARS,
    MissingKey,
    cause,
    error_detail,
    read_key,
    scrub,
    status_kind,
    unreachable_reason,
)

__all__ = ["OpenAIEngine", "OpenAIEngineStatistics", "chat_body"]

logger = logging.getLogger("streamfeedback.openai")

_MAX_RETRY_AFTER = 120.0
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?)(ms|h|m|s)")


class _Message(msgspec.Struct):
    content: Any = None
    refusal: Any = None


class _Choice(msgspec.Struct):
    message: _Message | None = None
    finish_reason: Any = None


class _ChatCompletion(msgspec.Struct):
    """The part of a chat completion we read; other fields are ignored. Only the text must
    be right: odd usage or finish fields (some compatible servers send floats, strings or
    objects) count as missing rather than throwing a good answer away."""

    choices: list[_Choice] | None = None
    usage: Any = None


_chat_decoder = msgspec.json.Decoder(_ChatCompletion)


def chat_body(model: str, request: ChatRequest) -> dict[str, Any]:
    """The JSON body of a chat completion request: what the live backend posts and what a
    Batch API line carries."""
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": m.role, "content": m.content} for m in request.messages],
        "max_tokens": request.max_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
    }
    if request.seed is not None:
        body["seed"] = request.seed
    if request.guide is not None:  # vLLM's structured outputs (a guided judge)
        body["structured_outputs"] = {"regex": request.guide}
    return body


def _count(value: object) -> int:
    """A token count as the server gave it, or 0 when it gave none that reads as one."""
    return value if type(value) is int and value >= 0 else 0


def _http_library() -> Any:
    """The HTTP library the installed SDK is built on (httpx2 now, httpx before): the module
    of its default client's base class, so a second library installed beside it is no trap."""
    for base in openai.DefaultAsyncHttpxClient.__mro__[1:]:
        if base.__name__ == "AsyncClient":
            return importlib.import_module(base.__module__.partition(".")[0])
    raise ImportError("cannot tell which HTTP library the openai SDK uses")


_http = _http_library()
_HttpResponse = _http.Response
"""As `cast_to`, it makes `client.post` return the raw response (the SDK's documented way)."""


class OpenAIEngineStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """Counters for progress views. `requests` counts HTTP attempts, retries included."""

    requests: int
    completions: int
    retries: int
    rate_limited: int
    failures: int
    in_flight: int
    prompt_tokens: int
    completion_tokens: int


class OpenAIEngine:
    """An `Engine` over any OpenAI-compatible chat endpoint (OpenAI, vllm serve, TGI, vendors).

    `limiter` lets callers share one limiter between engines that share one account, or shrink
    its window in tests; by default each engine gets its own from the config.
    """

    def __init__(
        self,
        name: str,
        config: EngineConfig,
        *,
        limiter: RateLimiter | None = None,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
    ) -> None:
        self.name = name
        self.config = config
        self.base_url = (config.base_url or DEFAULT_BASE_URL).rstrip("/")
        self.limiter = limiter or RateLimiter(
            max_concurrency=config.concurrency,
            requests_per_minute=config.requests_per_minute,
            tokens_per_minute=config.tokens_per_minute,
        )
        self._backoff = backoff
        self._max_backoff = max_backoff
        self._patience = config.rate_limit_patience
        self._client: openai.AsyncOpenAI | None = None
        self._api_key = ""
        self._closed = False
        self._requests = 0
        self._completions = 0
        self._retries = 0
        self._rate_limited = 0
        self._failures = 0
        self._in_flight = 0
        self._prompt_tokens = 0
        self._completion_tokens = 0

    async def start(self) -> None:
        """Build the client. Idempotent; no request is sent (a bad key shows on first use).

        :raises EngineUnavailable: when closed, or when the key's variable is not set.
        """
        if self._closed:
            raise EngineUnavailable(self.name, "engine is closed")
        if self._client is not None:
            return
        try:
            key = read_key(self.config, self.base_url)
        except MissingKey as exc:
            raise EngineUnavailable(self.name, str(exc)) from None
        self._api_key = key
        # Keep a connection per request in flight: with the SDK's default of 100 kept alive,
        # a busier engine closes and reopens connections all the time (measured: ~45% of
        # 2,400 requests at 256 in flight opened a new one).
        connections = max(1, self.config.concurrency)
        self._client = openai.AsyncOpenAI(
            base_url=self.base_url,
            api_key=key,
            max_retries=0,
            timeout=self.config.timeout,
            http_client=openai.DefaultAsyncHttpxClient(
                limits=_http.Limits(
                    max_connections=connections, max_keepalive_connections=connections
                )
            ),
        )

    async def aclose(self) -> None:
        """Close the HTTP connections; later `generate` calls raise EngineUnavailable."""
        self._closed = True
        client, self._client = self._client, None
        if client is not None:
            with anyio.move_on_after(5, shield=True):
                await client.close()

    def statistics(self) -> OpenAIEngineStatistics:
        return OpenAIEngineStatistics(
            requests=self._requests,
            completions=self._completions,
            retries=self._retries,
            rate_limited=self._rate_limited,
            failures=self._failures,
            in_flight=self._in_flight,
            prompt_tokens=self._prompt_tokens,
            completion_tokens=self._completion_tokens,
        )

    async def generate(self, request: ChatRequest) -> Completion:
        """Send one chat, retrying what may pass later, each attempt through the limiter.

        :raises EngineRequestError: the server refused this request (400: too long, invalid).
        :raises EngineUnavailable: wrong key, URL or model (401/403/404), or the engine is closed.
        :raises EngineBusy: still rate limited, overloaded or unreachable after the retries.
        :raises EngineTimeout: no answer within `timeout` after the retries.
        :raises EngineError: a malformed answer after the retries.
        """
        if self._closed:
            raise EngineUnavailable(self.name, "engine is closed")
        await self.start()
        started = time.perf_counter()
        estimate = sum(len(m.content) for m in request.messages) // 4 + request.max_tokens
        attempt = 0
        throttled = 0
        while True:
            try:
                completion = await self._attempt(request, estimate, attempt + throttled)
            except EngineError as err:
                # Sustained 429s slow the run down rather than fail prompts: they are retried
                # for as long as `rate_limit_patience` allows, apart from `max_retries`.
                if err.status == 429 and time.perf_counter() - started < self._patience:
                    throttled += 1
                    self._retries += 1
                    continue
                if not _retryable(err) or attempt >= self.config.max_retries:
                    self._failures += 1
                    level = (
                        logging.DEBUG if isinstance(err, EngineRequestError) else logging.WARNING
                    )
                    logger.log(
                        level,
                        "%s: request %s failed after %d attempt(s): %s",
                        self.name,
                        request.id,
                        attempt + 1,
                        err,
                    )
                    raise
                # a 429 already paused the limiter, and the next attempt waits for it there
                delay = 0.0 if err.status == 429 else self._backoff_delay(attempt, err)
                attempt += 1
                self._retries += 1
                logger.debug(
                    "%s: retry %d/%d of request %s in %.2fs: %s",
                    self.name,
                    attempt,
                    self.config.max_retries,
                    request.id,
                    delay,
                    err,
                )
                if delay > 0:
                    await anyio.sleep(delay)
                continue
            self._completions += 1
            self.limiter.on_success()
            return msgspec.structs.replace(completion, latency_s=time.perf_counter() - started)

    # -- one attempt ---------------------------------------------------------------------

    async def _attempt(self, request: ChatRequest, estimate: int, attempt: int) -> Completion:
        if self._client is None:
            raise EngineUnavailable(self.name, "engine is closed")
        client = self._client
        body = chat_body(self.config.model, request)
        async with self.limiter.acquire(estimate) as lease:
            self._requests += 1
            self._in_flight += 1
            try:
                # The SDK's documented raw request: its auth, timeouts and error mapping,
                # without re-validating our already-typed parameters and building a pydantic
                # model of the answer, which took over a quarter of the client's CPU per call.
                raw = await client.post("/chat/completions", cast_to=_HttpResponse, body=body)
            except openai.APIStatusError as exc:
                self._observe_headers(exc.response.headers)
                raise self._status_error(exc, attempt) from cause(exc)
            except openai.APITimeoutError as exc:
                raise EngineTimeout(
                    self.name, f"no answer from {self.base_url} within {self.config.timeout:g}s"
                ) from exc
            except openai.APIConnectionError as exc:
                reason = unreachable_reason(exc)
                raise EngineBusy(self.name, f"cannot reach {self.base_url} ({reason})") from exc
            except openai.OpenAIError as exc:
                raise EngineError(
                    self.name, f"unexpected client error: {self._scrub(str(exc))}"
                ) from exc
            finally:
                self._in_flight -= 1
            self._observe_headers(raw.headers)
            completion = self._completion(raw)
            lease.settle(completion.prompt_tokens + completion.completion_tokens)
        self._prompt_tokens += completion.prompt_tokens
        self._completion_tokens += completion.completion_tokens
        return completion

    def _completion(self, raw: Any) -> Completion:
        """Read the body; anything short of a choice with text content is malformed."""
        try:
            parsed = _chat_decoder.decode(raw.content)
        except msgspec.ValidationError as exc:
            raise EngineError(self.name, f"malformed response from {self.base_url}: {exc}") from exc
        except msgspec.DecodeError as exc:
            raise EngineError(
                self.name, f"malformed response from {self.base_url}: not JSON"
            ) from exc
        if not parsed.choices:
            raise EngineError(self.name, f"malformed response from {self.base_url}: no choices")
        choice = parsed.choices[0]
        message = choice.message
        if message is None or not isinstance(message.content, str):
            refusal = message.refusal if message is not None else None
            if isinstance(refusal, str) and refusal:
                raise EngineRequestError(
                    self.name, f"the model refused: {self._scrub(refusal)[:DETAIL_CHARS]}"
                )
            raise EngineError(
                self.name, f"malformed response from {self.base_url}: no message content"
            )
        usage = parsed.usage if isinstance(parsed.usage, dict) else {}
        finish = choice.finish_reason
        return Completion(
            text=message.content,
            prompt_tokens=_count(usage.get("prompt_tokens")),
            completion_tokens=_count(usage.get("completion_tokens")),
            finish_reason=finish if isinstance(finish, str) else None,
        )

    def _status_error(self, exc: openai.APIStatusError, attempt: int) -> EngineError:
        status = exc.status_code
        kind = status_kind(status)
        where = f"{self.base_url} answered {status} for model {self.config.model!r}"
        if kind == "auth":
            return EngineUnavailable(self.name, f"{where}: check the API key", status=status)
        detail = error_detail(exc.body, self._api_key)
        if kind == "not_found":
            return EngineUnavailable(
                self.name, f"{where}: check base_url and model{detail}", status=status
            )
        retry_after = _retry_after(exc.response.headers)
        if kind == "rate_limited":
            self._rate_limited += 1
            self.limiter.on_rate_limited()
            pause = retry_after if retry_after is not None else self._backoff_delay(attempt, None)
            self.limiter.pause(pause)
            logger.warning(
                "%s: rate limited by %s; nothing starts for %.2fs", self.name, self.base_url, pause
            )
            return EngineBusy(
                self.name, f"{where} (rate limited){detail}", status=status, retry_after=retry_after
            )
        if kind == "timeout":
            return EngineTimeout(self.name, f"{where}{detail}", status=status)
        if kind == "busy":
            return EngineBusy(self.name, f"{where}{detail}", status=status, retry_after=retry_after)
        return EngineRequestError(self.name, f"{where}{detail}", status=status)

    def _scrub(self, text: str) -> str:
        return scrub(text, self._api_key)

    def _backoff_delay(self, attempt: int, err: EngineError | None) -> float:
        """Exponential backoff with jitter, or the server's `retry-after` where it gave one."""
        if isinstance(err, EngineBusy) and err.retry_after is not None:
            return err.retry_after
        ceiling = min(self._max_backoff, self._backoff * 2.0**attempt)
        return ceiling * random.uniform(0.5, 1.0)

    def _observe_headers(self, headers: Mapping[str, str]) -> None:
        """Adopt stricter provider limits, and hold back when the provider's bucket is empty."""
        changed = self.limiter.update_limits(
            requests_per_minute=_number(headers.get("x-ratelimit-limit-requests")),
            tokens_per_minute=_number(headers.get("x-ratelimit-limit-tokens")),
        )
        if changed:
            stats = self.limiter.statistics()
            logger.info(
                "%s: %s reports stricter limits; now %s requests/min, %s tokens/min",
                self.name,
                self.base_url,
                stats.requests_per_minute,
                stats.tokens_per_minute,
            )
        for kind in ("requests", "tokens"):
            if _number(headers.get(f"x-ratelimit-remaining-{kind}")) == 0:
                reset = _duration(headers.get(f"x-ratelimit-reset-{kind}"))
                if reset:
                    self.limiter.pause(min(reset, _MAX_RETRY_AFTER))


def _retryable(err: EngineError) -> bool:
    return not isinstance(err, (EngineRequestError, EngineUnavailable))


def _number(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _duration(value: str | None) -> float | None:
    """OpenAI's reset format ("1s", "6m0s", "20ms") or plain seconds."""
    if value is None:
        return None
    plain = _number(value)
    if plain is not None:
        return max(0.0, plain)
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    parts = _DURATION_PART.findall(value)
    if not parts:
        return None
    return sum(float(amount) * scale[unit] for amount, unit in parts)


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait, from `retry-after-ms`, `retry-after` (seconds or an HTTP date)."""
    millis = _number(headers.get("retry-after-ms"))
    if millis is not None:
        return min(max(0.0, millis / 1000.0), _MAX_RETRY_AFTER)
    value = headers.get("retry-after")
    if value is None:
        return None
    seconds = _number(value)
    if seconds is None:
        parsed = email.utils.parsedate_tz(value)
        if parsed is None:
            return None
        seconds = email.utils.mktime_tz(parsed) - time.time()
    return min(max(0.0, seconds), _MAX_RETRY_AFTER)
