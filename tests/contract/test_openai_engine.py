"""The OpenAI backend against an OpenAI-compatible server on 127.0.0.1 over real sockets: the
contract, the error mapping, the retries, and a limiter that never trips a strict server-side
limit."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc
import msgspec
import pytest

from streamfeedback import (
    ChatRequest,
    EngineBusy,
    EngineError,
    EngineRequestError,
    EngineTimeout,
    EngineUnavailable,
    Message,
)
from streamfeedback._config import GeneratorConfig, RaterConfig
from streamfeedback._ratelimit import RateLimiter
from streamfeedback.engines import make_engine
from streamfeedback.engines._openai import OpenAIEngine
from streamfeedback.testing import (
    Handler,
    OpenAIServer,
    Reply,
    Request,
    echo_handler,
    judge_handler,
    rate_limited,
    rating_for,
)

from .engine_contract import check_engine

SECRET = "sk-test-THIS-KEY-MUST-NEVER-LEAK-0123456789"


def _config(base_url: str, **kw: Any) -> GeneratorConfig:
    return msgspec.convert(
        {"backend": "openai", "model": "echo-7b", "base_url": base_url, **kw}, GeneratorConfig
    )


def _request(i: int = 0, *, max_tokens: int = 16, text: str = "Say something.") -> ChatRequest:
    return ChatRequest(id=f"r{i}", messages=[Message("user", text)], max_tokens=max_tokens)


@asynccontextmanager
async def _engine(
    handler: Handler, *, limiter: RateLimiter | None = None, **kw: Any
) -> AsyncIterator[tuple[OpenAIEngine, OpenAIServer]]:
    async with OpenAIServer(handler) as server:
        engine = OpenAIEngine(
            "echo-7b", _config(server.base_url, **kw), limiter=limiter, backoff=0.005
        )
        try:
            await engine.start()
            yield engine, server
        finally:
            await engine.aclose()


def _script(*replies: Reply, then: Handler | None = None) -> Callable[[Request], Reply]:
    """Answer with `replies` in order, then like `then` (an echo generator by default)."""
    queue = list(replies)
    rest = then if then is not None else echo_handler()

    def handler(request: Request) -> Reply:
        if queue:
            return queue.pop(0)
        result = rest(request)
        assert isinstance(result, Reply)
        return result

    return handler


async def test_openai_engine_meets_the_contract() -> None:
    async with OpenAIServer(echo_handler()) as server:
        await check_engine(OpenAIEngine("echo-7b", _config(server.base_url)))
        assert server.connections < len(server.requests), "connections must be kept alive"


async def test_make_engine_builds_the_openai_engine() -> None:
    async with OpenAIServer(echo_handler()) as server:
        engine = make_engine("echo-7b", _config(server.base_url, max_concurrency=3))
        assert isinstance(engine, OpenAIEngine)
        assert engine.limiter.max_concurrency == 3
        await check_engine(engine, concurrency=8)


async def test_request_reaches_the_server_as_sent() -> None:
    async with _engine(echo_handler()) as (engine, server):
        request = ChatRequest(
            id="r",
            messages=[Message("system", "Be brief."), Message("user", "Hello")],
            max_tokens=7,
            temperature=0.3,
            top_p=0.9,
            seed=42,
        )
        completion = await engine.generate(request)
        body = server.requests[-1].body
        assert server.requests[-1].path == "/v1/chat/completions"
        assert body["model"] == "echo-7b"
        assert body["messages"] == [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hello"},
        ]
        assert (body["max_tokens"], body["temperature"], body["top_p"], body["seed"]) == (
            7,
            0.3,
            0.9,
            42,
        )
        assert server.requests[-1].headers["authorization"] == "Bearer EMPTY"
        assert completion.completion_tokens == 7 and completion.finish_reason == "length"
        stats = engine.statistics()
        assert (stats.requests, stats.completions, stats.in_flight) == (1, 1, 0)
        assert stats.completion_tokens == 7 and stats.prompt_tokens > 0
        assert engine.limiter.statistics().tokens == completion.prompt_tokens + 7


async def test_429_with_retry_after_is_honoured_then_succeeds() -> None:
    handler = _script(Reply.failure(429, retry_after=0.05), Reply.failure(429, retry_after=0.05))
    async with _engine(handler, max_retries=3) as (engine, server):
        completion = await engine.generate(_request())
        assert completion.text
        times = [r.time for r in server.requests]
        assert len(times) == 3
        assert times[1] - times[0] >= 0.04 and times[2] - times[1] >= 0.04
        stats = engine.statistics()
        assert (stats.rate_limited, stats.retries, stats.failures) == (2, 2, 0)
        assert engine.limiter.statistics().pauses == 2


async def test_429_pauses_every_request_of_the_engine() -> None:
    handler = _script(Reply.failure(429, retry_after=0.1))
    async with _engine(handler, max_retries=2) as (engine, server):
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.generate, _request(0))
            await anyio.sleep(0.03)  # let the 429 arrive and pause the limiter
            tg.start_soon(engine.generate, _request(1))
        first = server.requests[0].time
        assert all(r.time - first >= 0.09 for r in server.requests[1:])


async def test_5xx_is_retried_then_succeeds() -> None:
    handler = _script(Reply.failure(500), Reply.failure(503, "overloaded"))
    async with _engine(handler, max_retries=2) as (engine, server):
        assert (await engine.generate(_request())).text
        assert [r.path for r in server.requests] == ["/v1/chat/completions"] * 3
        assert engine.statistics().retries == 2


async def test_persistent_500_fails_after_all_attempts() -> None:
    async with _engine(lambda _: Reply.failure(500), max_retries=2) as (engine, server):
        with pytest.raises(EngineError) as info:
            await engine.generate(_request())
        assert isinstance(info.value, EngineBusy) and info.value.status == 500
        assert len(server.requests) == 3
        assert engine.statistics().failures == 1


async def test_401_is_unavailable_and_never_shows_the_key(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("SF_TEST_KEY", SECRET)
    caplog.set_level(logging.DEBUG)

    def refuse(request: Request) -> Reply:
        # a careless server quoting the key back
        return Reply.failure(401, f"Incorrect API key provided: {request.headers['authorization']}")

    async with _engine(refuse, api_key_env="SF_TEST_KEY") as (engine, server):
        with pytest.raises(EngineUnavailable) as info:
            await engine.generate(_request())
        assert server.requests[0].headers["authorization"] == f"Bearer {SECRET}"
    message = str(info.value)
    assert "401" in message and server.base_url in message and "echo-7b" in message
    assert len(server.requests) == 1, "401 must not be retried"
    for text in (message, caplog.text, repr(info.value.__cause__)):
        assert SECRET not in text and SECRET[:12] not in text


@pytest.mark.parametrize("status", [403, 404])
async def test_403_and_404_are_unavailable_without_retry(status: int) -> None:
    async with _engine(lambda _: Reply.failure(status), max_retries=3) as (engine, server):
        with pytest.raises(EngineUnavailable, match=str(status)):
            await engine.generate(_request())
        assert len(server.requests) == 1


async def test_missing_key_variable_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SF_TEST_KEY", raising=False)
    engine = OpenAIEngine("x", _config("http://127.0.0.1:9/v1", api_key_env="SF_TEST_KEY"))
    with pytest.raises(EngineUnavailable, match="SF_TEST_KEY"):
        await engine.start()
    await engine.aclose()


@pytest.mark.parametrize("key", [SECRET + "\n", "\t" + SECRET + "  "])
async def test_whitespace_around_the_key_is_dropped(
    monkeypatch: pytest.MonkeyPatch, key: str
) -> None:
    monkeypatch.setenv("SF_TEST_KEY", key)
    async with _engine(echo_handler(), api_key_env="SF_TEST_KEY") as (engine, server):
        await engine.generate(_request())
        assert server.requests[-1].headers["authorization"] == f"Bearer {SECRET}"


@pytest.mark.parametrize("key", ["sk-caf\u00e9-0123456789", "sk-abc\n0123456789", "sk abc"])
async def test_a_key_a_header_cannot_carry_is_unavailable_and_never_shown(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, key: str
) -> None:
    monkeypatch.setenv("SF_TEST_KEY", key)
    async with OpenAIServer(echo_handler()) as server:
        engine = OpenAIEngine("x", _config(server.base_url, api_key_env="SF_TEST_KEY"))
        with caplog.at_level(logging.DEBUG), pytest.raises(EngineUnavailable) as info:
            await engine.generate(_request())
        await engine.aclose()
        assert not server.requests
    assert "SF_TEST_KEY has a character an HTTP header cannot carry" in str(info.value)
    assert key.strip() not in str(info.value) and key.strip() not in caplog.text


async def test_400_is_a_request_error_without_retry() -> None:
    reply = Reply.failure(400, "This model's maximum context length is 4096 tokens.")
    async with _engine(lambda _: reply, max_retries=3) as (engine, server):
        with pytest.raises(EngineRequestError, match="maximum context length") as info:
            await engine.generate(_request())
        assert info.value.status == 400
        assert len(server.requests) == 1


@pytest.mark.parametrize(
    "body",
    [
        b'{"id": "x", "object": "chat.completion", "created": 0, "model": "m", "choices": []}',
        b'{"id": "x", "object": "chat.completion", "created": 0, "model": "m", "choices": '
        b'[{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", '
        b'"content": null}}]}',
        b"this is not json",
    ],
)
async def test_malformed_body_is_retried_then_an_engine_error(body: bytes) -> None:
    async with _engine(_script(Reply(raw=body)), max_retries=1) as (engine, server):
        assert (await engine.generate(_request())).text
        assert len(server.requests) == 2
    async with _engine(lambda _: Reply(raw=body), max_retries=1) as (engine, server):
        with pytest.raises(EngineError, match="malformed") as info:
            await engine.generate(_request())
        assert type(info.value) is EngineError
        assert len(server.requests) == 2


async def test_slow_answer_times_out() -> None:
    slow = Reply(text="late", delay=2.0)
    async with _engine(lambda _: slow, timeout=0.05, max_retries=1) as (engine, server):
        with anyio.fail_after(5):
            with pytest.raises(EngineTimeout):
                await engine.generate(_request())
        assert len(server.requests) == 2
        assert engine.statistics().in_flight == 0


async def test_connection_refused_is_unavailable_at_once_naming_the_endpoint() -> None:
    async with OpenAIServer(echo_handler()) as server:
        url = server.base_url
    engine = OpenAIEngine("x", _config(url, max_retries=5), backoff=0.5)
    try:
        with anyio.fail_after(5), pytest.raises(EngineUnavailable) as info:
            await engine.generate(_request())
        assert f"cannot reach {url} (connection refused)" in str(info.value)
        stats = engine.statistics()
        assert (stats.requests, stats.retries, stats.failures) == (1, 0, 1)
    finally:
        await engine.aclose()


async def test_a_password_in_base_url_never_reaches_a_message(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with OpenAIServer(echo_handler()) as server:
        url = server.base_url.replace("http://", "http://user:s3cret-pw@")
    engine = OpenAIEngine("x", _config(url, max_retries=5), backoff=0.5)
    try:
        with caplog.at_level("DEBUG"), pytest.raises(EngineUnavailable) as info:
            await engine.generate(_request())
        assert "cannot reach http://user:***@" in str(info.value)
        assert "s3cret-pw" not in str(info.value) and "s3cret-pw" not in caplog.text
    finally:
        await engine.aclose()


async def test_an_unknown_host_is_unavailable_at_once() -> None:
    engine = OpenAIEngine("x", _config("http://no-such-host.invalid/v1", max_retries=5))
    try:
        with anyio.fail_after(10), pytest.raises(EngineUnavailable) as info:
            await engine.generate(_request())
        assert "cannot resolve host 'no-such-host.invalid'" in str(info.value)
        assert engine.statistics().requests == 1
    finally:
        await engine.aclose()


async def test_an_endpoint_that_answered_then_went_away_is_retried_then_busy() -> None:
    async with OpenAIServer(echo_handler()) as server:
        engine = OpenAIEngine("x", _config(server.base_url, max_retries=2), backoff=0.005)
        await engine.generate(_request())
    try:
        with anyio.fail_after(5), pytest.raises(EngineBusy, match="connection refused"):
            await engine.generate(_request(1))
        assert engine.statistics().requests == 4  # the answer, then 1 + 2 retries
    finally:
        await engine.aclose()


@pytest.mark.parametrize("url", ["localhost:8000/v1", "http://[::1/v1", "ftp://host/v1"])
async def test_a_base_url_that_is_no_http_url_is_unavailable_at_start(url: str) -> None:
    engine = OpenAIEngine("x", _config(url))
    with pytest.raises(EngineUnavailable, match="not an http"):
        await engine.start()
    await engine.aclose()


async def test_stricter_provider_limit_is_adopted() -> None:
    def answer(request: Request) -> Reply:
        return Reply(text="ok", headers={"x-ratelimit-limit-requests": "120"})

    async with _engine(answer, requests_per_minute=600) as (engine, _):
        await engine.generate(_request())
        assert engine.limiter.statistics().requests_per_minute == 120


async def test_judge_rates_by_content_through_the_engine() -> None:
    prompt = "Rate them.\n\nTexts:\n<text 1> quality=5 great\n<text 2> meh quality=2\n"
    config = msgspec.convert(
        {"backend": "openai", "model": "judge", "base_url": "http://127.0.0.1:9/v1"}, RaterConfig
    )
    async with OpenAIServer(judge_handler(untidy=0.0, broken=0.0)) as server:
        engine = OpenAIEngine("judge", msgspec.structs.replace(config, base_url=server.base_url))
        try:
            answer = await engine.generate(_request(text=prompt, max_tokens=256))
        finally:
            await engine.aclose()
    assert answer.text == (
        "#### Output for Text 1\nRating: 5\nRationale: text 1 has 15 characters.\n\n"
        "#### Output for Text 2\nRating: 2\nRationale: text 2 has 13 characters."
    )
    assert rating_for("meh quality=2") == 2


@pytest.mark.parametrize("anyio_backend", [("asyncio", {"use_uvloop": False})])
async def test_a_burst_never_trips_a_strict_server_limit() -> None:
    """26 requests at once against 1200/min enforced over 1 s windows (20 per window)."""
    rpm, window, n = 1200.0, 1.0, 26
    guard = rate_limited(echo_handler(), rpm, window=window)
    armed = False

    async def handler(request: Request) -> Reply:
        return await guard(request) if armed else Reply(text="warm")

    limiter = RateLimiter(max_concurrency=64, requests_per_minute=rpm, window=window)
    async with _engine(handler, limiter=limiter, max_retries=0) as (engine, server):
        await engine.generate(_request())  # warm: the first call opens the connection
        armed = True
        with anyio.fail_after(15):
            async with anyio.create_task_group() as tg:
                for i in range(n):
                    tg.start_soon(engine.generate, _request(i))
    assert guard.rejected == 0 and server.status_counts[429] == 0
    assert guard.accepted == n
    starts = guard.starts
    budget = int(rpm * window / 60)
    gaps = [b - a for a, b in zip(starts, starts[budget:], strict=False)]
    assert all(gap > window for gap in gaps)
    # paced at (1 - headroom) of the limit, give or take a loaded machine
    assert starts[-1] - starts[0] < 3 * n / (rpm / 60)


async def test_a_long_stretch_of_429s_slows_down_instead_of_failing() -> None:
    """More 429s than max_retries: the request waits them out within its patience."""
    handler = _script(*[Reply.failure(429, retry_after=0.01) for _ in range(12)])
    async with _engine(handler, max_retries=2) as (engine, _server):
        with anyio.fail_after(10):
            completion = await engine.generate(_request())
    assert completion.text
    assert engine.statistics().rate_limited == 12


async def test_429s_beyond_patience_fail_the_request_as_busy() -> None:
    handler = _script(*[Reply.failure(429, retry_after=0.05) for _ in range(50)])
    async with _engine(handler, max_retries=1, rate_limit_patience=0.2) as (engine, _server):
        with anyio.fail_after(10), pytest.raises(EngineBusy):
            await engine.generate(_request())


async def test_429s_cut_concurrency_and_successes_win_it_back() -> None:
    handler = _script(Reply.failure(429, retry_after=0.01))
    async with _engine(handler, max_concurrency=16) as (engine, _server):
        await engine.generate(_request())
        cut = engine.limiter.concurrency
        assert cut == 8
        for i in range(40):
            await engine.generate(_request(i))
        assert cut < engine.limiter.concurrency <= 16


async def test_a_refusal_is_a_request_error_and_missing_usage_counts_zero() -> None:
    refusal = (
        b'{"id": "x", "object": "chat.completion", "created": 0, "model": "m", "choices": '
        b'[{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", '
        b'"content": null, "refusal": "I cannot help with that."}}]}'
    )
    async with _engine(lambda _: Reply(raw=refusal), max_retries=2) as (engine, server):
        with pytest.raises(EngineRequestError, match="the model refused: I cannot help"):
            await engine.generate(_request())
        assert len(server.requests) == 1, "a refusal is not retried"
    bare = b'{"choices": [{"message": {"content": "fine"}, "finish_reason": "length"}]}'
    async with _engine(lambda _: Reply(raw=bare)) as (engine, _server):
        completion = await engine.generate(_request())
    assert (completion.text, completion.finish_reason) == ("fine", "length")
    assert (completion.prompt_tokens, completion.completion_tokens) == (0, 0)


async def test_the_request_body_is_what_the_chat_api_expects() -> None:
    async with _engine(echo_handler(), seed=7) as (engine, server):
        await engine.generate(
            ChatRequest(
                id="r",
                messages=[Message("system", "be brief"), Message("user", "hi")],
                max_tokens=33,
                temperature=0.5,
                top_p=0.9,
                seed=7,
            )
        )
    (sent,) = server.requests
    assert sent.path == "/v1/chat/completions" and sent.method == "POST"
    assert sent.body == {
        "model": "echo-7b",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi"},
        ],
        "max_tokens": 33,
        "temperature": 0.5,
        "top_p": 0.9,
        "seed": 7,
    }


@pytest.mark.parametrize(
    "extra",
    [
        b'"usage": {"prompt_tokens": 12.0, "completion_tokens": "7"}',
        b'"usage": "n/a"',
        b'"usage": {"prompt_tokens": -3, "completion_tokens": null}',
    ],
)
async def test_odd_usage_or_finish_fields_do_not_throw_a_good_answer_away(extra: bytes) -> None:
    body = (
        b'{"choices": [{"message": {"role": "assistant", "content": "kept"}, '
        b'"finish_reason": 1}], ' + extra + b"}"
    )
    async with _engine(lambda _: Reply(raw=body), max_retries=0) as (engine, server):
        completion = await engine.generate(_request())
        assert len(server.requests) == 1
    assert completion.text == "kept" and completion.finish_reason is None
    assert (completion.prompt_tokens, completion.completion_tokens) == (0, 0)


async def test_without_base_url_the_sdk_variables_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    async with OpenAIServer(echo_handler()) as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", SECRET)
        monkeypatch.setenv("OPENAI_ORG_ID", "org-test")
        config = msgspec.convert({"backend": "openai", "model": "echo-7b"}, GeneratorConfig)
        engine = OpenAIEngine("echo-7b", config)
        try:
            await engine.generate(_request())
        finally:
            await engine.aclose()
        headers = server.requests[-1].headers
        assert headers["authorization"] == f"Bearer {SECRET}"
        assert headers["openai-organization"] == "org-test"


async def test_a_connection_dropped_without_an_answer_is_retried_then_busy() -> None:
    dropped = 0

    async def drop(stream: anyio.abc.SocketStream) -> None:
        nonlocal dropped
        async with stream:
            await stream.receive()  # the request, then close without a word
            dropped += 1

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, drop)
        url = f"http://127.0.0.1:{port}/v1"
        engine = OpenAIEngine("x", _config(url, max_retries=2), backoff=0.005)
        try:
            with anyio.fail_after(5), pytest.raises(EngineBusy, match=f"connection to {url} lost"):
                await engine.generate(_request())
        finally:
            await engine.aclose()
            tg.cancel_scope.cancel()
    assert dropped == 3
    assert engine.statistics().in_flight == 0
