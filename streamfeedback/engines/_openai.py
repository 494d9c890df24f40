"""The OpenAI-compatible HTTP engine: chats posted with aiohttp, answers read by msgspec.

The hot path is a bare `aiohttp` POST, not the `openai` SDK: on the same server the SDK cost
about 1.9 ms of client CPU per chat on its default httpx stack and 1.0 ms on its aiohttp
transport, against 0.2 ms here (benchmarks/http_client.py), and at fast decoding the client sets
the pace. The SDK stays where it earns its place (the Batch API and files, `batch_rating`).

Every attempt, retries included, passes through the limiter, or a wave of retries would burst
past the provider's limits. So this module owns the retry loop, and maps each failure onto our
tree:

    429                            -> retried after `retry-after` (all pause), then EngineBusy
    5xx, 409, a dropped connection -> retried with backoff, then EngineBusy (the server is
                                      overloaded for now; the run goes on)
    refused, DNS, connect timeout  -> EngineUnavailable at once while the endpoint has never
                                      answered (nothing listens there: no use asking six times
                                      per prompt); retried like a 5xx once it has answered (a
                                      restart), then EngineBusy
    TLS certificate or handshake   -> EngineUnavailable at once
    408, no answer within timeout  -> retried with backoff, then EngineTimeout
    malformed body (no choices...) -> retried with backoff, then EngineError
    401, 403, 404                  -> EngineUnavailable at once (wrong key, URL or model)
    other 4xx (400: too long)      -> EngineRequestError at once

No `aiohttp` error leaves `generate`, and no message or log line carries the API key: texts
that come from the server are scrubbed of it, and auth failures drop the server's text.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import math
import random
import re
import time
import urllib.request
from collections.abc import Mapping
from typing import Any

import aiohttp
import anyio
import msgspec
import yarl

from .._config import OPENAI_HEADER_VARS, EngineConfig, base_url, sdk_env
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
    error_detail,
    read_key,
    scrub,
    status_kind,
)

__all__ = ["OpenAIEngine", "OpenAIEngineStatistics", "chat_body"]

logger = logging.getLogger("streamfeedback.openai")
connections_logger = logging.getLogger("streamfeedback.connections")
"""Connections opened and reused (`-vv`): traced only when this logger is on at start."""

_CONNECT_TIMEOUT = 10.0
"""Seconds to open a connection: a host that takes longer is not serving us."""
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
_encoder = msgspec.json.Encoder()


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
        base = base_url(config) or DEFAULT_BASE_URL
        self.base_url = _shown(base.rstrip("/"))
        """The endpoint as messages and logs name it: a password in the URL is masked."""
        self.limiter = limiter or RateLimiter(
            max_concurrency=config.concurrency,
            requests_per_minute=config.requests_per_minute,
            tokens_per_minute=config.tokens_per_minute,
        )
        self._backoff = backoff
        self._max_backoff = max_backoff
        self._patience = config.rate_limit_patience
        self._session: aiohttp.ClientSession | None = None
        try:
            # The key goes in the Authorization header, which HTTP clients will not combine
            # with credentials in the URL: those are dropped (and masked in messages).
            self._url = yarl.URL(base.rstrip("/") + "/chat/completions").with_user(None)
        except ValueError:
            self._url = yarl.URL()  # `start` refuses it, naming base_url
        self._api_key = ""
        self._closed = False
        self._answered = False
        self._proxy: yarl.URL | None = None
        self._proxy_auth: aiohttp.BasicAuth | None = None
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
        if self._session is not None:
            return
        if self._url.scheme not in ("http", "https") or not self._url.host:
            raise EngineUnavailable(
                self.name, f"base_url {self.base_url!r} is not an http(s) URL with a host"
            )
        try:
            key = read_key(self.config, self.base_url)
        except MissingKey as exc:
            raise EngineUnavailable(self.name, str(exc)) from None
        self._api_key = key
        headers = {
            "Authorization": f"Bearer {key}",
            "Content-Type": "application/json",
            "User-Agent": "streamfeedback",
        }
        for env, header in OPENAI_HEADER_VARS:  # the SDK's own variables, sent as the SDK does
            if value := sdk_env(env):
                headers[header] = value
        # A connection kept per request in flight, so a busy engine never reopens them; the
        # limiter, not the pool, bounds what is in flight.
        connections = max(1, self.config.concurrency)
        self._proxy, self._proxy_auth = _env_proxy(self._url)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=connections, limit_per_host=0),
            headers=headers,
            timeout=aiohttp.ClientTimeout(
                total=self.config.timeout,
                sock_connect=min(_CONNECT_TIMEOUT, self.config.timeout),
            ),
            raise_for_status=False,
            trace_configs=_connection_trace(self.name),
        )

    async def aclose(self) -> None:
        """Close the HTTP connections; later `generate` calls raise EngineUnavailable."""
        self._closed = True
        session, self._session = self._session, None
        if session is not None:
            with anyio.move_on_after(5, shield=True):
                await session.close()

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
                    # Callers report an unusable engine once (a generator leaves routing, the
                    # judge stops the run), so one line per request would only repeat it.
                    quiet = isinstance(err, (EngineRequestError, EngineUnavailable))
                    level = logging.DEBUG if quiet else logging.WARNING
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
        if self._session is None:
            raise EngineUnavailable(self.name, "engine is closed")
        session = self._session
        data = _encoder.encode(chat_body(self.config.model, request))
        async with self.limiter.acquire(estimate) as lease:
            self._requests += 1
            self._in_flight += 1
            try:
                sent = time.monotonic()
                async with session.post(
                    self._url, data=data, proxy=self._proxy, proxy_auth=self._proxy_auth
                ) as response:
                    status = response.status
                    headers = response.headers
                    content = await response.read()
                if logger.isEnabledFor(logging.DEBUG):  # -v: one line per request
                    logger.debug(
                        "%s: POST %s -> %d in %.0f ms",
                        self.name,
                        self.base_url + "/chat/completions",
                        status,
                        (time.monotonic() - sent) * 1000,
                    )
            except aiohttp.ClientSSLError as exc:
                raise EngineUnavailable(
                    self.name, f"TLS with {self.base_url} failed: {self._scrub(str(exc))}"
                ) from exc
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
                raise self._unreachable(exc) from exc
            except (TimeoutError, asyncio.TimeoutError) as exc:
                raise EngineTimeout(
                    self.name, f"no answer from {self.base_url} within {self.config.timeout:g}s"
                ) from exc
            except aiohttp.ClientError as exc:
                raise EngineBusy(
                    self.name, f"connection to {self.base_url} lost ({type(exc).__name__})"
                ) from exc
            finally:
                self._in_flight -= 1
            self._answered = True
            self._observe_headers(headers)
            if status >= 300:
                raise self._status_error(status, headers, content, attempt)
            completion = self._completion(content)
            lease.settle(completion.prompt_tokens + completion.completion_tokens)
        self._prompt_tokens += completion.prompt_tokens
        self._completion_tokens += completion.completion_tokens
        return completion

    def _unreachable(self, exc: aiohttp.ClientError) -> EngineError:
        """Nothing answers at the endpoint: unavailable if it never has, busy if it has (it
        may be restarting, and the retries give it time)."""
        if isinstance(exc, aiohttp.ClientConnectorDNSError):
            reason = f"cannot resolve host {self._url.host!r}"
        elif isinstance(exc, aiohttp.ConnectionTimeoutError):
            reason = f"no connection within {min(_CONNECT_TIMEOUT, self.config.timeout):g}s"
        elif isinstance(exc, aiohttp.ClientConnectorError) and isinstance(
            exc.os_error, ConnectionRefusedError
        ):
            reason = "connection refused"
        elif isinstance(exc, aiohttp.ClientConnectorError) and exc.os_error.strerror:
            reason = exc.os_error.strerror.lower()  # "network is unreachable", ...
        else:
            reason = type(exc).__name__
        if self._answered:
            return EngineBusy(self.name, f"cannot reach {self.base_url} ({reason})")
        return EngineUnavailable(
            self.name, f"cannot reach {self.base_url} ({reason}); is the server up at that address?"
        )

    def _completion(self, content: bytes) -> Completion:
        """Read the body; anything short of a choice with text content is malformed."""
        try:
            parsed = _chat_decoder.decode(content)
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

    def _status_error(
        self, status: int, headers: Mapping[str, str], content: bytes, attempt: int
    ) -> EngineError:
        kind = status_kind(status)
        where = f"{self.base_url} answered {status} for model {self.config.model!r}"
        if kind == "auth":
            return EngineUnavailable(self.name, f"{where}: check the API key", status=status)
        detail = error_detail(_error_body(content), self._api_key)
        if kind == "not_found":
            return EngineUnavailable(
                self.name, f"{where}: check base_url and model{detail}", status=status
            )
        retry_after = _retry_after(headers)
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


def _shown(url: str) -> str:
    """`url` with any password in it masked, for messages and logs."""
    try:
        parsed = yarl.URL(url)
    except ValueError:
        return url
    return str(parsed.with_password("***")) if parsed.password else url


def _connection_trace(name: str) -> list[aiohttp.TraceConfig] | None:
    """Hooks that log each connection opened or reused, where `-vv` asked for them; none
    otherwise, so the hot path pays nothing."""
    if not connections_logger.isEnabledFor(logging.DEBUG):
        return None

    async def created(_: object, __: object, ___: object) -> None:
        connections_logger.debug("%s: opened a connection", name)

    async def reused(_: object, __: object, ___: object) -> None:
        connections_logger.debug("%s: reused a connection", name)

    trace = aiohttp.TraceConfig()
    trace.on_connection_create_end.append(created)
    trace.on_connection_reuseconn.append(reused)
    return [trace]


def _retryable(err: EngineError) -> bool:
    return not isinstance(err, (EngineRequestError, EngineUnavailable))


def _env_proxy(url: yarl.URL) -> tuple[yarl.URL | None, aiohttp.BasicAuth | None]:
    """The proxy the environment names for `url` (`HTTPS_PROXY`, `NO_PROXY`...), as the SDK's
    httpx client honoured it: looked up once, where aiohttp's `trust_env` would look it up
    (and `.netrc`) in a worker thread for every request."""
    if url.host is None or urllib.request.proxy_bypass(url.host):
        return None, None
    proxy = urllib.request.getproxies().get(url.scheme)
    if not proxy:
        return None, None
    proxy_url = yarl.URL(proxy)
    auth = aiohttp.BasicAuth.from_url(proxy_url)
    return proxy_url.with_user(None), auth


def _error_body(content: bytes) -> object:
    """An error answer as the SDK reads it: the JSON's `error` object, the JSON, or the text."""
    try:
        body = msgspec.json.decode(content)
    except msgspec.DecodeError:
        return content.decode("utf-8", "replace")
    return body.get("error", body) if isinstance(body, dict) else body


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
