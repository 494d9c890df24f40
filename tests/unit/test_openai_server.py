"""The OpenAI-compatible test server: HTTP/1.1 with keep-alive, and its handler builders."""

from __future__ import annotations

import logging
import re
import signal
import sys
from typing import Any

import anyio
import msgspec
import pytest

from streamfeedback.testing import (
    OpenAIServer,
    Reply,
    Request,
    echo_handler,
    judge_handler,
    rate_limited,
    rating_for,
)


async def _exchange(
    stream: anyio.abc.ByteStream, method: str, path: str, body: Any = None
) -> tuple[int, dict[str, str], bytes]:
    """One request on an open connection; reads exactly one response (Content-Length)."""
    data = b"" if body is None else msgspec.json.encode(body)
    head = f"{method} {path} HTTP/1.1\r\nhost: x\r\ncontent-length: {len(data)}\r\n\r\n"
    await stream.send(head.encode() + data)
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        buffer += await stream.receive()
    raw_head, _, rest = buffer.partition(b"\r\n\r\n")
    lines = raw_head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(rest) < int(headers["content-length"]):
        rest += await stream.receive()
    return int(lines[0].split()[1]), headers, rest


def _chat(text: str, **kw: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": text}], **kw}


def _request(text: str, **kw: Any) -> Request:
    return Request(
        time=0.0,
        method="POST",
        path="/v1/chat/completions",
        headers={},
        body=_chat(text, **kw),
        model="m",
    )


async def test_keep_alive_many_requests_and_connections() -> None:
    async with OpenAIServer(echo_handler()) as server:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/v1", server.base_url)
        for _ in range(3):
            async with await anyio.connect_tcp("127.0.0.1", server.port) as stream:
                for i in range(4):
                    status, headers, body = await _exchange(
                        stream, "POST", "/v1/chat/completions", _chat(f"hi {i}", max_tokens=4)
                    )
                    assert status == 200 and headers["connection"] == "keep-alive"
                    answer = msgspec.json.decode(body)
                    assert answer["object"] == "chat.completion"
                    assert answer["choices"][0]["finish_reason"] == "length"
                    assert answer["usage"]["completion_tokens"] == 4
        assert server.connections == 3 and len(server.requests) == 12
        assert server.requests[0].model == "m" and server.requests[0].path == "/v1/chat/completions"
        assert server.requests[0].body["messages"][0]["content"] == "hi 0"
        assert server.status_counts[200] == 12


async def test_models_and_unknown_routes() -> None:
    async with OpenAIServer(echo_handler(), models=["judge-1"]) as server:
        async with await anyio.connect_tcp("127.0.0.1", server.port) as stream:
            status, _, body = await _exchange(stream, "GET", "/v1/models")
            assert status == 200
            assert [m["id"] for m in msgspec.json.decode(body)["data"]] == ["judge-1"]
            status, _, body = await _exchange(stream, "GET", "/v1/nothing")
            assert status == 404 and "error" in msgspec.json.decode(body)
            status, _, _ = await _exchange(stream, "POST", "/v1/chat/completions", {"x": 1})
            assert status == 400


async def test_errors_headers_delay_and_raw_bodies() -> None:
    replies = iter(
        [
            Reply.failure(429, retry_after=1.5),
            Reply(raw=b"{oops", status=200),
            Reply(text="slow", delay=0.05),
        ]
    )

    async def handler(request: Request) -> Reply:
        return next(replies)

    async with OpenAIServer(handler) as server:
        async with await anyio.connect_tcp("127.0.0.1", server.port) as stream:
            status, headers, body = await _exchange(
                stream, "POST", "/v1/chat/completions", _chat("a")
            )
            assert status == 429
            assert (headers["retry-after"], headers["retry-after-ms"]) == ("1.500", "1500")
            assert msgspec.json.decode(body)["error"]["code"] == "rate_limit_exceeded"
            status, _, body = await _exchange(stream, "POST", "/v1/chat/completions", _chat("b"))
            assert (status, body) == (200, b"{oops")
            start = anyio.current_time()
            status, _, _ = await _exchange(stream, "POST", "/v1/chat/completions", _chat("c"))
            assert status == 200 and anyio.current_time() - start >= 0.04


async def test_client_leaving_mid_delay_is_harmless(caplog: pytest.LogCaptureFixture) -> None:
    """A client that hangs up before its delayed answer neither stops the server nor logs."""
    caplog.set_level(logging.WARNING)
    async with OpenAIServer(lambda _: Reply(text="late", delay=0.1)) as server:
        async with await anyio.connect_tcp("127.0.0.1", server.port) as stream:
            await stream.send(b"POST /v1/chat/completions HTTP/1.1\r\ncontent-length: 2\r\n\r\n{}")
        await anyio.sleep(0.15)  # the first answer is due and written to nobody
        async with await anyio.connect_tcp("127.0.0.1", server.port) as stream:
            status, _, body = await _exchange(stream, "POST", "/v1/chat/completions", _chat("b"))
        assert status == 200
        assert msgspec.json.decode(body)["choices"][0]["message"]["content"] == "late"
        assert len(server.requests) == 2 and server.connections == 2
    assert [r.getMessage() for r in caplog.records] == []


def test_echo_handler_caps_words_at_max_tokens() -> None:
    handler = echo_handler(words=10)
    full = handler(_request("tell me"))
    capped = handler(_request("tell me", max_tokens=3))
    assert full.text is not None and len(full.text.split()) == 10 and full.finish_reason == "stop"
    assert capped.text is not None and len(capped.text.split()) == 3
    assert capped.finish_reason == "length"
    assert handler(_request("tell me")) == full, "same model and prompt, same answer"


JUDGE_PROMPT = (
    "Evaluate the texts.\n\nTexts:\n<text 1> quality=4 fine answer\n"
    "<text 2> quality=1 wrong\n<text 3> no marker here\n"
)


async def test_judge_rates_by_content_in_the_ultrafeedback_layout() -> None:
    handler = judge_handler(untidy=0.0, broken=0.0)
    reply = await handler(_request(JUDGE_PROMPT))
    assert reply.text is not None
    blocks = reply.text.split("\n\n")
    assert [b.splitlines()[0] for b in blocks] == [f"#### Output for Text {k}" for k in (1, 2, 3)]
    ratings = [int(re.search(r"Rating: (\d)", b).group(1)) for b in blocks]  # type: ignore[union-attr]
    assert ratings == [4, 1, rating_for("no marker here")]
    assert handler.answers[0].ratings == {1: 4, 2: 1, 3: rating_for("no marker here")}


async def test_judge_typed_layout() -> None:
    handler = judge_handler(untidy=0.0, broken=0.0)
    reply = await handler(_request("Rules.\nType: 1 or 2\n" + JUDGE_PROMPT))
    assert reply.text is not None
    first = reply.text.split("\n\n")[0].splitlines()
    assert first[1].startswith("Type: ") and first[2].startswith("Rationale: ")
    assert first[3] == "Rating: 4" and first[4].startswith("Rationale: ")


async def test_judge_untidy_and_broken_answers_vary_but_stay_keyed_to_content() -> None:
    handler = judge_handler(untidy=1.0, broken=0.5, seed=1)
    texts = set()
    for _ in range(40):
        reply = await handler(_request(JUDGE_PROMPT))
        assert reply.text is not None
        texts.add(reply.text)
    assert len(texts) > 20, "retries of one prompt get different answers"
    answers = handler.answers
    assert all(a.untidy for a in answers)
    assert 5 < sum(a.broken is not None for a in answers) < 35
    joined = "\n".join(texts)
    for marker in ("**Rating:**", "/5", "(Good)", "\r\n", "Here is my assessment", "Overall,"):
        assert marker in joined
    assert re.search(r"^#{3} Output", joined, re.M) and re.search(r"^#{5} Output", joined, re.M)
    for answer in answers:
        if answer.broken is None:
            clean = answer.text.replace("\r\n", "\n").replace("**", "")
            for k, rating in answer.ratings.items():
                block = clean.split(f"Output for Text {k}")[1]
                assert re.search(rf"Rating:\s*{rating}\b", block)


async def test_judge_sends_other_prompts_to_the_fallback() -> None:
    handler = judge_handler()
    reply = await handler(_request("Write a poem.", max_tokens=5))
    assert reply.text is not None and reply.text.startswith("echo m")


async def test_rate_limited_answers_429_beyond_the_window() -> None:
    guard = rate_limited(echo_handler(), rpm=120, window=1.0)  # 2 per second
    base = Request(time=0.0, method="POST", path="/", headers={}, body=_chat("x"), model="m")
    replies = [await guard(msgspec.structs.replace(base, time=t)) for t in (0.0, 0.1, 0.2, 1.05)]
    assert [r.status for r in replies] == [200, 200, 429, 200]
    assert float(replies[2].headers["retry-after"]) == pytest.approx(0.8)
    assert replies[1].headers["x-ratelimit-remaining-requests"] == "0"
    assert (guard.accepted, guard.rejected) == (3, 1)


async def test_server_runs_as_a_module_and_prints_its_url() -> None:
    command = [
        sys.executable,
        "-m",
        "streamfeedback.testing.openai_server",
        "--port",
        "0",
        "--judge",
    ]
    async with await anyio.open_process(command) as process:
        assert process.stdout is not None
        with anyio.fail_after(20):
            line = b""
            while not line.endswith(b"\n"):
                line += await process.stdout.receive(1)
        url = line.decode().strip()
        match = re.fullmatch(r"http://127\.0\.0\.1:(\d+)/v1", url)
        assert match, url
        async with await anyio.connect_tcp("127.0.0.1", int(match.group(1))) as stream:
            status, _, body = await _exchange(
                stream, "POST", "/v1/chat/completions", _chat(JUDGE_PROMPT)
            )
        assert status == 200
        assert "Output for Text 2" in msgspec.json.decode(body)["choices"][0]["message"]["content"]
        process.send_signal(signal.SIGINT)
        with anyio.fail_after(10):
            assert await process.wait() == 0


# -- files and batches -------------------------------------------------------------------


def _batch_file(*lines: dict[str, Any]) -> bytes:
    return b"".join(msgspec.json.encode(line) + b"\n" for line in lines)


def _line(custom_id: str, text: str, model: str = "m") -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": text}]}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


async def _until(batch: Any, client: Any, *statuses: str) -> Any:
    with anyio.fail_after(10):
        while batch.status not in statuses:
            await anyio.sleep(0.01)
            batch = await client.batches.retrieve(batch.id)
    return batch


async def test_files_and_batches_through_the_sdk(tmp_path: Any) -> None:
    import openai

    def handler(request: Request) -> Reply:
        if "fail" in request.prompt:
            return Reply.failure(400, "no good")
        return Reply(text=f"re: {request.prompt}")

    async with OpenAIServer(handler, batch_delay=0.05) as server:
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key="k", max_retries=0)
        async with client:
            path = tmp_path / "in.jsonl"
            path.write_bytes(_batch_file(_line("a", "hello"), _line("b", "fail me")))
            upload = await client.files.create(file=path, purpose="batch")
            assert (upload.filename, upload.purpose, upload.bytes) == (
                "in.jsonl",
                "batch",
                path.stat().st_size,
            )
            assert (await client.files.content(upload.id)).content == path.read_bytes()
            assert (await client.files.retrieve(upload.id)).id == upload.id
            batch = await client.batches.create(
                input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
            assert batch.status == "validating"
            batch = await _until(batch, client, "in_progress")
            batch = await _until(batch, client, "completed")
            assert batch.request_counts is not None
            assert (batch.request_counts.total, batch.request_counts.completed) == (2, 1)
            assert batch.request_counts.failed == 1
            assert batch.output_file_id and batch.error_file_id
            out = (await client.files.content(batch.output_file_id)).content.splitlines()
            errors = (await client.files.content(batch.error_file_id)).content.splitlines()
    (ok,) = [msgspec.json.decode(line) for line in out]
    (bad,) = [msgspec.json.decode(line) for line in errors]
    assert ok["custom_id"] == "a" and ok["error"] is None
    assert ok["response"]["status_code"] == 200
    assert ok["response"]["body"]["choices"][0]["message"]["content"] == "re: hello"
    assert bad["custom_id"] == "b" and bad["response"]["status_code"] == 400
    assert bad["response"]["body"]["error"]["message"] == "no good"
    assert [r.prompt for r in server.batch_requests] == ["hello", "fail me"]


async def test_batches_fail_validation_expire_and_cancel(tmp_path: Any) -> None:
    import openai

    async with OpenAIServer(echo_handler(), batch_delay=0.02) as server:
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key="k", max_retries=0)
        async with client:

            async def submit(data: bytes) -> Any:
                path = tmp_path / "f.jsonl"
                path.write_bytes(data)
                upload = await client.files.create(file=path, purpose="batch")
                return await client.batches.create(
                    input_file_id=upload.id,
                    endpoint="/v1/chat/completions",
                    completion_window="24h",
                )

            bad = await submit(_batch_file(_line("a", "x"), _line("a", "y"), _line("c", "z", "n")))
            bad = await _until(bad, client, "failed")
            assert bad.errors is not None and bad.errors.data is not None
            assert [(e.code, e.line) for e in bad.errors.data] == [
                ("duplicate_custom_id", 2),
                ("mismatched_model", 3),
            ]

            server.expire_after = 1
            expired = await submit(_batch_file(_line("a", "x"), _line("b", "y")))
            expired = await _until(expired, client, "expired")
            assert expired.output_file_id and expired.error_file_id
            error = (await client.files.content(expired.error_file_id)).content
            assert msgspec.json.decode(error)["error"]["code"] == "batch_expired"

            server.expire_after = None
            server.batch_delay = 60
            held = await submit(_batch_file(_line("a", "x")))
            cancelled = await client.batches.cancel(held.id)
            assert cancelled.status == "cancelling"
            cancelled = await _until(cancelled, client, "cancelled")
            assert cancelled.request_counts is not None
            assert cancelled.request_counts.failed == 1

            with pytest.raises(openai.NotFoundError):
                await client.batches.retrieve("batch_nope")
            with pytest.raises(openai.BadRequestError):
                await client.batches.create(
                    input_file_id="file-nope",
                    endpoint="/v1/chat/completions",
                    completion_window="24h",
                )


async def test_api_key_guards_every_route() -> None:
    import openai

    async with OpenAIServer(echo_handler(), api_key="sk-right") as server:
        wrong = openai.AsyncOpenAI(base_url=server.base_url, api_key="sk-wrong", max_retries=0)
        right = openai.AsyncOpenAI(base_url=server.base_url, api_key="sk-right", max_retries=0)
        async with wrong, right:
            with pytest.raises(openai.AuthenticationError):
                await wrong.batches.retrieve("batch_1")
            with pytest.raises(openai.AuthenticationError):
                await wrong.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": "hi"}]
                )
            reply = await right.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}]
            )
            assert reply.choices[0].message.content


async def test_batches_are_listed_newest_first_page_by_page(tmp_path: Any) -> None:
    import openai

    async with OpenAIServer(echo_handler(), batch_delay=60) as server:
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key="k", max_retries=0)
        async with client:
            path = tmp_path / "in.jsonl"
            path.write_bytes(_batch_file(_line("a", "hello")))
            upload = await client.files.create(file=path, purpose="batch")
            made = [
                (
                    await client.batches.create(
                        input_file_id=upload.id,
                        endpoint="/v1/chat/completions",
                        completion_window="24h",
                        metadata={"n": str(i)},
                    )
                ).id
                for i in range(5)
            ]
            first = await client.batches.list(limit=2)
            assert [b.id for b in first.data] == made[::-1][:2] and first.has_more
            rest = await client.batches.list(limit=10, after=first.data[-1].id)
            assert [b.id for b in rest.data] == made[::-1][2:] and not rest.has_more
            assert [b.metadata for b in rest.data] == [{"n": "2"}, {"n": "1"}, {"n": "0"}]
            everything = [b.id async for b in client.batches.list(limit=2)]
            assert everything == made[::-1]
