"""An OpenAI-compatible HTTP/1.1 server on 127.0.0.1, for tests and benchmarks.

The real `openai` SDK talks to it over real sockets (keep-alive, many connections), so tests
exercise the same code path as production, minus the network. A `handler` decides every answer:
a completion, an error status with headers, a delay, or a malformed body. Handler builders cover
the common cases: `echo_handler` (generators), `judge_handler` (an UltraFeedback judge with
untidy and broken answers), `rate_limited` (a strict server-side sliding window that answers
429, to prove the client never trips it) and `delayed`.

    async with OpenAIServer(judge_handler()) as server:
        ...  # point an engine at server.base_url; inspect server.requests afterwards

It also serves OpenAI's Files and Batches endpoints, in memory: an uploaded batch file is run
line by line through the same `handler` once `batch_delay` has passed, and its output and error
files come back in OpenAI's batch output format; `expire_after` lets tests expire batches part
way through. `api_key` makes every route answer 401 to any other bearer token (quoting the
token it got, as careless servers do, so tests prove the client never repeats it).

Also runnable: `python -m streamfeedback.testing.openai_server --port 0 --judge` prints its
base URL as the first line of stdout and serves until SIGINT/SIGTERM.

Pure anyio, no dependency beyond the package's own: HTTP/1.1 with Content-Length bodies only.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import http
import inspect
import logging
import math
import random
import re
import signal
import sys
import time
import urllib.parse
import zlib
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Any

import anyio
import anyio.abc
import msgspec
from anyio.streams.buffered import BufferedByteStream

__all__ = [
    "EchoHandler",
    "Handler",
    "JudgeAnswer",
    "JudgeHandler",
    "OpenAIServer",
    "RateLimitedHandler",
    "Reply",
    "Request",
    "StoredBatch",
    "StoredFile",
    "delayed",
    "echo_handler",
    "judge_handler",
    "main",
    "rate_limited",
    "rating_for",
]

logger = logging.getLogger("streamfeedback.testing")

_MAX_HEAD = 64 * 1024
_FILE_PURPOSES = frozenset({"assistants", "batch", "fine-tune", "vision", "user_data", "evals"})
_FILE_ROUTE = re.compile(r"(?:/v1)?/files(?:/(?P<id>[^/]+)(?P<content>/content)?)?")
_BATCH_ROUTE = re.compile(r"(?:/v1)?/batches(?:/(?P<id>[^/]+)(?P<cancel>/cancel)?)?")
_BOUNDARY = re.compile(r'boundary="?(?P<b>[^";]+)"?', re.IGNORECASE)
_DISPOSITION_PARAM = re.compile(r'(?P<key>name|filename)="(?P<value>[^"]*)"', re.IGNORECASE)
_MAX_BODY = 64 * 1024 * 1024
_ERROR_TYPES = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "permission_denied"),
    404: ("invalid_request_error", "model_not_found"),
    408: ("timeout", None),
    409: ("conflict", None),
    422: ("invalid_request_error", None),
    429: ("requests", "rate_limit_exceeded"),
    500: ("server_error", None),
    502: ("server_error", None),
    503: ("server_error", "overloaded"),
}


class Request(msgspec.Struct, frozen=True, kw_only=True):
    """One request as the server saw it. `time` is `time.monotonic()` when its body arrived."""

    time: float
    method: str
    path: str
    headers: dict[str, str]
    body: Any = None
    model: str | None = None
    query: dict[str, str] = {}

    @property
    def messages(self) -> list[dict[str, Any]]:
        messages = self.body.get("messages") if isinstance(self.body, dict) else None
        return [m for m in messages if isinstance(m, dict)] if isinstance(messages, list) else []

    @property
    def prompt(self) -> str:
        """The text of the last user message (or of the last message, if none is a user's)."""
        messages = self.messages
        users = [m for m in messages if m.get("role") == "user"] or messages
        return _content_text(users[-1].get("content")) if users else ""

    @property
    def max_tokens(self) -> int | None:
        if not isinstance(self.body, dict):
            return None
        for key in ("max_completion_tokens", "max_tokens"):
            value = self.body.get(key)
            if isinstance(value, int) and value > 0:
                return value
        return None


class Reply(msgspec.Struct, frozen=True, kw_only=True):
    """What to answer. Exactly one of: `text` (a completion), `status` >= 400 (an error with a
    JSON body, `error` overriding the default one), or `raw` (these bytes, as they are).
    `delay` waits before answering; token counts default to chars/4 and words."""

    text: str | None = None
    status: int = 200
    headers: dict[str, str] = {}
    error: Any = None
    raw: bytes | None = None
    delay: float = 0.0
    finish_reason: str = "stop"
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    content_type: str = "application/json"

    def __post_init__(self) -> None:
        if self.raw is None and self.text is None and self.status < 400:
            raise ValueError("a Reply needs `text`, `raw`, or an error `status`")

    @classmethod
    def failure(
        cls,
        status: int,
        message: str | None = None,
        *,
        retry_after: float | None = None,
        headers: dict[str, str] | None = None,
        delay: float = 0.0,
    ) -> Reply:
        """An error answer in OpenAI's shape, with `retry-after` and `retry-after-ms` if given."""
        extra = dict(headers or {})
        if retry_after is not None:
            extra.setdefault("retry-after", f"{max(0.0, retry_after):.3f}")
            extra.setdefault("retry-after-ms", str(max(0, math.ceil(retry_after * 1000))))
        kind, code = _ERROR_TYPES.get(status, ("error", None))
        text = message or _reason(status)
        error = {"error": {"message": text, "type": kind, "param": None, "code": code}}
        return cls(status=status, headers=extra, error=error, delay=delay)


Handler = Callable[[Request], "Reply | Awaitable[Reply]"]


async def _call(handler: Handler, request: Request) -> Reply:
    result = handler(request)
    if inspect.isawaitable(result):
        result = await result
    if not isinstance(result, Reply):
        raise TypeError(f"handler returned {type(result).__name__}, not Reply")
    return result


class _BadRequest(Exception):
    pass


@dataclasses.dataclass
class StoredFile:
    """An uploaded or generated file, held in memory."""

    id: str
    filename: str
    purpose: str
    data: bytes
    created_at: int

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.data),
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "expires_at": None,
            "status_details": None,
        }


@dataclasses.dataclass
class StoredBatch:
    """A batch and where it stands; `to_json` is OpenAI's Batch object."""

    id: str
    input_file_id: str
    endpoint: str
    completion_window: str
    created_at: int
    metadata: dict[str, str] | None = None
    status: str = "validating"
    times: dict[str, int] = dataclasses.field(default_factory=dict)
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: list[dict[str, Any]] | None = None
    total: int = 0
    completed: int = 0
    failed: int = 0
    cancel_requested: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": self.status,
            "created_at": self.created_at,
            "expires_at": self.created_at + 24 * 3600,
            **{f"{name}_at": at for name, at in self.times.items()},
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "errors": None if self.errors is None else {"object": "list", "data": self.errors},
            "request_counts": {
                "total": self.total,
                "completed": self.completed,
                "failed": self.failed,
            },
            "metadata": self.metadata,
        }

    def move(self, status: str, stamp: str | None = None) -> None:
        self.status = status
        self.times[stamp or status] = int(time.time())


class OpenAIServer:
    """Serves `POST /v1/chat/completions` and `GET /v1/models` through `handler`, and the
    Files (`POST /v1/files`, `GET /v1/files/{id}[/content]`) and Batches (`POST /v1/batches`,
    `GET /v1/batches/{id}`, `POST /v1/batches/{id}/cancel`) endpoints.

    `requests` records every HTTP request in arrival order; `status_counts` counts the answers
    by status; `connections` counts accepted TCP connections (keep-alive shows as few);
    `files` and `batches` hold what was uploaded and created; `batch_requests` the batch lines
    the handler answered. A batch stays `validating` for `batch_delay` seconds (read while it
    waits, so a test may change it), is answered, stays `in_progress` as long again, then is
    `completed`. With `expire_after = k`, a batch answers k lines and then `expired`.
    `GET /v1/batches` lists batches newest first (`limit`, `after`). With `create_hold = s`,
    `POST /v1/batches` creates the batch, then waits `s` seconds before it answers: a client
    that dies meanwhile has a batch on the server it never heard of.
    """

    def __init__(
        self,
        handler: Handler,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        models: Sequence[str] = ("test-model",),
        api_key: str | None = None,
        batch_delay: float = 0.0,
        expire_after: int | None = None,
        create_hold: float = 0.0,
    ) -> None:
        self.handler = handler
        self.api_key = api_key
        self.batch_delay = batch_delay
        self.expire_after = expire_after
        self.create_hold = create_hold
        self.files: dict[str, StoredFile] = {}
        self.batches: dict[str, StoredBatch] = {}
        self.batch_requests: list[Request] = []
        self._tg: anyio.abc.TaskGroup | None = None
        self.host = host
        self.port = port
        self.models = list(models)
        self.requests: list[Request] = []
        self.status_counts: collections.Counter[int] = collections.Counter()
        self.connections = 0
        self._stack: AsyncExitStack | None = None
        self._ids = 0

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    async def __aenter__(self) -> OpenAIServer:
        async with AsyncExitStack() as stack:
            listener = await anyio.create_tcp_listener(local_host=self.host, local_port=self.port)
            stack.push_async_callback(listener.aclose)
            self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
            tg = await stack.enter_async_context(anyio.create_task_group())
            stack.callback(tg.cancel_scope.cancel)
            self._tg = tg
            tg.start_soon(listener.serve, self._connection)
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.__aexit__(exc_type, exc, tb)

    # -- HTTP/1.1 ------------------------------------------------------------------------

    async def _connection(self, stream: anyio.abc.SocketStream) -> None:
        self.connections += 1
        async with BufferedByteStream(stream) as conn:
            try:
                while await self._exchange(conn):
                    pass
            except (
                anyio.IncompleteRead,
                anyio.EndOfStream,
                anyio.BrokenResourceError,
                anyio.ClosedResourceError,
                ConnectionError,
            ):
                return
            except (_BadRequest, anyio.DelimiterNotFound) as exc:
                body = msgspec.json.encode(
                    {"error": {"message": f"bad request: {exc}", "type": "invalid_request_error"}}
                )
                await self._write(conn, 400, body, {}, keep_alive=False)

    async def _exchange(self, conn: BufferedByteStream) -> bool:
        """Serve one request; returns whether the connection stays open."""
        head = await conn.receive_until(b"\r\n\r\n", _MAX_HEAD)
        lines = head.decode("latin-1").split("\r\n")
        try:
            method, target, version = lines[0].split(" ", 2)
        except ValueError:
            raise _BadRequest(f"request line {lines[0]!r}") from None
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise _BadRequest(f"header line {line!r}")
            headers[name.strip().lower()] = value.strip()
        if "chunked" in headers.get("transfer-encoding", "").lower():
            raise _BadRequest("chunked request bodies are not supported")
        try:
            length = int(headers.get("content-length", "0"))
        except ValueError:
            raise _BadRequest("content-length is not a number") from None
        if not 0 <= length <= _MAX_BODY:
            raise _BadRequest("content-length out of range")
        raw_body = await conn.receive_exactly(length) if length else b""
        connection = headers.get("connection", "").lower()
        keep_alive = connection != "close" and (version == "HTTP/1.1" or connection == "keep-alive")
        path, _, query = target.partition("?")
        body: Any = None
        if raw_body:
            try:
                body = msgspec.json.decode(raw_body)
            except msgspec.DecodeError:
                body = None
        model = body.get("model") if isinstance(body, dict) else None
        request = Request(
            time=time.monotonic(),
            method=method.upper(),
            path=path,
            headers=headers,
            body=body,
            model=model if isinstance(model, str) else None,
            query=dict(urllib.parse.parse_qsl(query)),
        )
        self.requests.append(request)
        status, payload, extra = await self._dispatch(request, raw_body)
        self.status_counts[status] += 1
        await self._write(conn, status, payload, extra, keep_alive=keep_alive)
        return keep_alive

    async def _dispatch(
        self, request: Request, raw_body: bytes
    ) -> tuple[int, bytes, dict[str, str]]:
        path = request.path.rstrip("/")
        if self.api_key is not None:
            given = request.headers.get("authorization", "").removeprefix("Bearer ")
            if given != self.api_key:
                return _error(401, f"Incorrect API key provided: {given}.")
        files = _FILE_ROUTE.fullmatch(path)
        if files is not None:
            return self._files(request, raw_body, files.group("id"), bool(files.group("content")))
        batches = _BATCH_ROUTE.fullmatch(path)
        if batches is not None:
            answer = self._batches(request, batches.group("id"), bool(batches.group("cancel")))
            if self.create_hold > 0 and request.method == "POST" and batches.group("id") is None:
                await anyio.sleep(self.create_hold)
            return answer
        if path.endswith("/models"):
            if request.method != "GET":
                return _error(405, "use GET")
            return 200, self._models_body(request), {}
        if not path.endswith("/chat/completions"):
            return _error(404, f"no route for {request.path}")
        if request.method != "POST":
            return _error(405, "use POST")
        if not isinstance(request.body, dict) or not isinstance(request.body.get("messages"), list):
            return _error(400, "the body must be a JSON object with `messages`")
        try:
            reply = await _call(self.handler, request)
        except Exception as exc:
            logger.exception("handler failed on %s", request.path)
            return _error(500, f"handler failed: {type(exc).__name__}")
        if reply.delay > 0:
            await anyio.sleep(reply.delay)
        headers = {"content-type": reply.content_type, **reply.headers}
        if reply.raw is not None:
            return reply.status, reply.raw, headers
        if reply.status >= 400:
            error = reply.error if reply.error is not None else Reply.failure(reply.status).error
            return reply.status, msgspec.json.encode(error), headers
        return reply.status, self._completion_body(request, reply), headers

    def _completion_body(self, request: Request, reply: Reply) -> bytes:
        return msgspec.json.encode(self._completion(request, reply))

    def _completion(self, request: Request, reply: Reply) -> dict[str, Any]:
        self._ids += 1
        text = reply.text or ""
        prompt_chars = sum(len(_content_text(m.get("content"))) for m in request.messages)
        prompt_tokens = reply.prompt_tokens
        if prompt_tokens is None:
            prompt_tokens = max(1, prompt_chars // 4)
        completion_tokens = reply.completion_tokens
        if completion_tokens is None:
            completion_tokens = len(text.split())
        return {
            "id": f"chatcmpl-{self._ids}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request.model or "unknown",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": reply.finish_reason,
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    # -- files and batches ---------------------------------------------------------------

    def _next_id(self, prefix: str) -> str:
        self._ids += 1
        return f"{prefix}{self._ids}"

    def _store(self, filename: str, purpose: str, data: bytes) -> StoredFile:
        stored = StoredFile(
            id=self._next_id("file-"),
            filename=filename,
            purpose=purpose,
            data=data,
            created_at=int(time.time()),
        )
        self.files[stored.id] = stored
        return stored

    def _files(
        self, request: Request, raw_body: bytes, file_id: str | None, content: bool
    ) -> tuple[int, bytes, dict[str, str]]:
        if file_id is None:
            if request.method != "POST":
                return _error(405, "use POST to upload a file")
            try:
                fields = _multipart(request.headers.get("content-type", ""), raw_body)
            except ValueError as exc:
                return _error(400, f"bad multipart body: {exc}")
            purpose = fields.get("purpose")
            upload = fields.get("file")
            if purpose is None or purpose[1].decode() not in _FILE_PURPOSES:
                return _error(400, "`purpose` must be one of " + ", ".join(sorted(_FILE_PURPOSES)))
            if upload is None:
                return _error(400, "no `file` part in the upload")
            stored = self._store(upload[0] or "upload", purpose[1].decode(), upload[1])
            return 200, msgspec.json.encode(stored.to_json()), {}
        if request.method != "GET":
            return _error(405, "use GET")
        found = self.files.get(file_id)
        if found is None:
            return _error(404, f"No such File object: {file_id}")
        if content:
            return 200, found.data, {"content-type": "application/octet-stream"}
        return 200, msgspec.json.encode(found.to_json()), {}

    def _batches(
        self, request: Request, batch_id: str | None, cancel: bool
    ) -> tuple[int, bytes, dict[str, str]]:
        if batch_id is None:
            if request.method == "GET":
                return self._list_batches(request)
            if request.method != "POST":
                return _error(405, "use GET to list batches or POST to create one")
            return self._create_batch(request)
        batch = self.batches.get(batch_id)
        if batch is None:
            return _error(404, f"No batch found with id '{batch_id}'.")
        if cancel:
            if request.method != "POST":
                return _error(405, "use POST")
            if batch.status in ("validating", "in_progress", "finalizing"):
                batch.cancel_requested = True
                batch.move("cancelling")
        elif request.method != "GET":
            return _error(405, "use GET")
        return 200, msgspec.json.encode(batch.to_json()), {}

    def _list_batches(self, request: Request) -> tuple[int, bytes, dict[str, str]]:
        try:
            limit = max(1, min(100, int(request.query.get("limit", "20"))))
        except ValueError:
            return _error(400, "limit must be an integer")
        newest_first = list(self.batches.values())[::-1]  # kept in creation order
        after = request.query.get("after")
        if after is not None:
            ids = [b.id for b in newest_first]
            if after not in ids:
                return _error(400, f"No batch found with id '{after}'.")
            newest_first = newest_first[ids.index(after) + 1 :]
        page = newest_first[:limit]
        body = {
            "object": "list",
            "data": [b.to_json() for b in page],
            "first_id": page[0].id if page else None,
            "last_id": page[-1].id if page else None,
            "has_more": len(newest_first) > limit,
        }
        return 200, msgspec.json.encode(body), {}

    def _create_batch(self, request: Request) -> tuple[int, bytes, dict[str, str]]:
        body = request.body if isinstance(request.body, dict) else {}
        input_file_id = body.get("input_file_id")
        endpoint = body.get("endpoint")
        window = body.get("completion_window")
        if not isinstance(input_file_id, str) or input_file_id not in self.files:
            return _error(400, f"Invalid input_file_id: {input_file_id!r}")
        if endpoint != "/v1/chat/completions":
            return _error(400, f"Unsupported endpoint {endpoint!r}; use /v1/chat/completions")
        if window != "24h":
            return _error(400, f"Invalid completion_window {window!r}; use 24h")
        metadata = body.get("metadata")
        batch = StoredBatch(
            id=self._next_id("batch_"),
            input_file_id=input_file_id,
            endpoint=endpoint,
            completion_window=window,
            created_at=int(time.time()),
            metadata=metadata if isinstance(metadata, dict) else None,
        )
        self.batches[batch.id] = batch
        if self._tg is None:
            return _error(503, "the server is not running")
        self._tg.start_soon(self._run_batch, batch, request.headers, name=f"batch-{batch.id}")
        return 200, msgspec.json.encode(batch.to_json()), {}

    async def _hold(self, batch: StoredBatch) -> None:
        """Wait `batch_delay` (as it is now, checked often) unless the batch is cancelled."""
        start = time.monotonic()
        while True:
            left = self.batch_delay - (time.monotonic() - start)
            if batch.cancel_requested or left <= 0:
                return
            await anyio.sleep(min(0.01, left))

    async def _run_batch(self, batch: StoredBatch, headers: dict[str, str]) -> None:
        await self._hold(batch)
        lines, problems = _batch_lines(self.files[batch.input_file_id].data, batch.endpoint)
        if problems and not batch.cancel_requested:
            batch.errors = problems
            batch.move("failed")
            return
        batch.total = len(lines)
        if not batch.cancel_requested:
            batch.move("in_progress")
        output: list[bytes] = []
        errors: list[bytes] = []
        stop = self.expire_after
        for i, (custom_id, body) in enumerate(lines):
            if batch.cancel_requested or (stop is not None and i >= stop):
                code = "batch_cancelled" if batch.cancel_requested else "batch_expired"
                errors.append(self._batch_error_line(custom_id, code))
                batch.failed += 1
                continue
            status, answer = await self._batch_answer(body, headers)
            line = {
                "id": self._next_id("batch_req_"),
                "custom_id": custom_id,
                "response": {
                    "status_code": status,
                    "request_id": self._next_id("req_"),
                    "body": answer,
                },
                "error": None,
            }
            if status < 400:
                batch.completed += 1
                output.append(msgspec.json.encode(line))
            else:
                batch.failed += 1
                errors.append(msgspec.json.encode(line))
        if not batch.cancel_requested:
            await self._hold(batch)
        if output:
            batch.output_file_id = self._store(
                f"{batch.id}_output.jsonl", "batch_output", b"\n".join(output) + b"\n"
            ).id
        if errors:
            batch.error_file_id = self._store(
                f"{batch.id}_errors.jsonl", "batch_output", b"\n".join(errors) + b"\n"
            ).id
        if batch.cancel_requested:
            batch.move("cancelled")
        elif stop is not None and stop < len(lines):
            batch.move("expired")
        else:
            batch.move("finalizing")
            batch.move("completed")

    def _batch_error_line(self, custom_id: str, code: str) -> bytes:
        message = (
            "This request was cancelled with its batch."
            if code == "batch_cancelled"
            else "This request could not be executed before the completion window expired."
        )
        return msgspec.json.encode(
            {
                "id": self._next_id("batch_req_"),
                "custom_id": custom_id,
                "response": None,
                "error": {"code": code, "message": message},
            }
        )

    async def _batch_answer(self, body: dict[str, Any], headers: dict[str, str]) -> tuple[int, Any]:
        """One batch line through the handler, as if it came over HTTP (its delay skipped)."""
        model = body.get("model")
        request = Request(
            time=time.monotonic(),
            method="POST",
            path="/v1/chat/completions",
            headers=headers,
            body=body,
            model=model if isinstance(model, str) else None,
        )
        self.batch_requests.append(request)
        if not isinstance(body.get("messages"), list):
            return 400, Reply.failure(400, "the body must have `messages`").error
        try:
            reply = await _call(self.handler, request)
        except Exception as exc:
            logger.exception("handler failed on a batch line")
            return 500, Reply.failure(500, f"handler failed: {type(exc).__name__}").error
        if reply.raw is not None:
            try:
                return reply.status, msgspec.json.decode(reply.raw)
            except msgspec.DecodeError:
                return reply.status, reply.raw.decode("utf-8", "replace")
        if reply.status >= 400:
            error = reply.error if reply.error is not None else Reply.failure(reply.status).error
            return reply.status, error
        return reply.status, self._completion(request, reply)

    def _models_body(self, request: Request) -> bytes:
        seen = dict.fromkeys(self.models)
        seen.update(dict.fromkeys(r.model for r in self.requests if r.model))
        data = [
            {"id": m, "object": "model", "created": 0, "owned_by": "streamfeedback"} for m in seen
        ]
        return msgspec.json.encode({"object": "list", "data": data})

    async def _write(
        self,
        conn: BufferedByteStream,
        status: int,
        body: bytes,
        headers: dict[str, str],
        *,
        keep_alive: bool,
    ) -> None:
        fields = {"content-type": "application/json", **headers}
        fields["content-length"] = str(len(body))
        fields["connection"] = "keep-alive" if keep_alive else "close"
        head = f"HTTP/1.1 {status} {_reason(status)}\r\n" + "".join(
            f"{name}: {value}\r\n" for name, value in fields.items()
        )
        await conn.send(head.encode("latin-1") + b"\r\n" + body)


def _reason(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def _error(status: int, message: str) -> tuple[int, bytes, dict[str, str]]:
    reply = Reply.failure(status, message)
    return status, msgspec.json.encode(reply.error), {}


def _content_text(content: object) -> str:
    """Message content as text: a string, or the text parts of a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


def _multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """name -> (filename, bytes) of a multipart/form-data body, as httpx sends it.

    :raises ValueError: not multipart, or no boundary.
    """
    if not content_type.lower().startswith("multipart/form-data"):
        raise ValueError(f"content-type is {content_type or 'missing'}")
    match = _BOUNDARY.search(content_type)
    if match is None:
        raise ValueError("no boundary")
    delimiter = b"--" + match.group("b").encode("latin-1")
    fields: dict[str, tuple[str | None, bytes]] = {}
    for part in body.split(delimiter)[1:]:
        if part.startswith(b"--"):
            break
        head, sep, data = part.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        if not sep:
            raise ValueError("a part without headers")
        params: dict[str, str] = {}
        for line in head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-disposition":
                params = {
                    m.group("key").lower(): m.group("value")
                    for m in _DISPOSITION_PARAM.finditer(value)
                }
        if "name" in params:
            fields[params["name"]] = (params.get("filename"), data.removesuffix(b"\r\n"))
    return fields


def _batch_lines(
    data: bytes, endpoint: str
) -> tuple[list[tuple[str, dict[str, Any]]], list[dict[str, Any]]]:
    """(custom_id, body) per line of a batch input file, and what makes it invalid (OpenAI
    rejects a whole file for one bad line, a repeated custom_id or a second model)."""
    lines: list[tuple[str, dict[str, Any]]] = []
    problems: list[dict[str, Any]] = []
    seen: set[str] = set()
    models: set[str] = set()

    def problem(number: int, code: str, message: str) -> None:
        problems.append({"code": code, "line": number, "message": message, "param": None})

    for number, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            item = msgspec.json.decode(raw)
        except msgspec.DecodeError:
            problem(number, "invalid_json_line", "This line is not parseable as valid JSON.")
            continue
        if not isinstance(item, dict):
            problem(number, "invalid_request", "Each line must be a JSON object.")
            continue
        custom_id, body = item.get("custom_id"), item.get("body")
        if not isinstance(custom_id, str) or not custom_id:
            problem(number, "missing_required_parameter", "Missing `custom_id`.")
        elif custom_id in seen:
            problem(number, "duplicate_custom_id", f"The custom_id {custom_id!r} is repeated.")
        elif item.get("method") != "POST" or item.get("url") != endpoint:
            problem(number, "invalid_url", f"Each line must POST to {endpoint}.")
        elif not isinstance(body, dict):
            problem(number, "invalid_request", "Missing `body`.")
        else:
            seen.add(custom_id)
            model = body.get("model")
            models.add(model if isinstance(model, str) else "")
            if len(models) > 1:
                problem(number, "mismatched_model", "All requests must use the same model.")
                continue
            lines.append((custom_id, body))
    if not lines and not problems:
        problem(0, "empty_file", "The input file holds no requests.")
    return lines, problems


# -- handlers ------------------------------------------------------------------------------

_FILLER = (
    "a clear answer weighs the question against what is known and then states the result "
    "plainly with one example and a short summary for the reader"
).split()


class EchoHandler:
    """A generator: answers with words drawn from the model name and the prompt.

    `max_tokens` caps the answer in words (`finish_reason="length"` when it bites).
    """

    def __init__(self, *, words: int = 24) -> None:
        self.words = words
        self.calls = 0

    def __call__(self, request: Request) -> Reply:
        self.calls += 1
        model = request.model or "model"
        prompt_words = request.prompt.split()
        seed = zlib.crc32(f"{model}\0{request.prompt}".encode())
        words = ["echo", model, *prompt_words[:8]]
        i = 0
        while len(words) < self.words:
            words.append(_FILLER[(seed + 7 * i) % len(_FILLER)])
            i += 1
        cap = request.max_tokens
        if cap is not None and cap < len(words):
            return Reply(text=" ".join(words[:cap]), finish_reason="length")
        return Reply(text=" ".join(words), finish_reason="stop")


def echo_handler(*, words: int = 24) -> EchoHandler:
    """A generator handler; see `EchoHandler`."""
    return EchoHandler(words=words)


class RateLimitedHandler:
    """A strict sliding-window limit in front of `inner`: beyond `rpm * window / 60` requests
    (by arrival time) in any `window` seconds, answer 429 with `retry-after`.

    Successful answers carry `x-ratelimit-*` headers like OpenAI's. `rejected` counts the 429s.
    """

    def __init__(self, inner: Handler, rpm: float, *, window: float = 60.0) -> None:
        if rpm <= 0 or window <= 0:
            raise ValueError("rpm and window must be positive")
        self.inner = inner
        self.rpm = rpm
        self.window = window
        self.budget = max(1, math.floor(rpm * window / 60.0))
        self.accepted = 0
        self.rejected = 0
        self.starts: list[float] = []
        self._recent: collections.deque[float] = collections.deque()

    async def __call__(self, request: Request) -> Reply:
        now = request.time
        recent = self._recent
        while recent and recent[0] <= now - self.window:
            recent.popleft()
        if len(recent) >= self.budget:
            self.rejected += 1
            wait = recent[0] + self.window - now
            return Reply.failure(
                429,
                f"Rate limit reached: {self.budget} requests per {self.window:g}s",
                retry_after=wait,
                headers=self._headers(0, wait),
            )
        recent.append(now)
        self.accepted += 1
        self.starts.append(now)
        reply = await _call(self.inner, request)
        reset = recent[0] + self.window - now
        headers = {**self._headers(self.budget - len(recent), reset), **reply.headers}
        return msgspec.structs.replace(reply, headers=headers)

    def _headers(self, remaining: int, reset: float) -> dict[str, str]:
        return {
            "x-ratelimit-limit-requests": f"{self.rpm:g}",
            "x-ratelimit-remaining-requests": str(max(0, remaining)),
            "x-ratelimit-reset-requests": f"{max(0.0, reset):.3f}s",
        }


def rate_limited(inner: Handler, rpm: float, *, window: float = 60.0) -> RateLimitedHandler:
    """Put a strict server-side rate limit in front of `inner`; see `RateLimitedHandler`."""
    return RateLimitedHandler(inner, rpm, window=window)


def delayed(inner: Handler, seconds: float) -> Handler:
    """Answer like `inner`, `seconds` later (a slow server or a long generation)."""

    async def handler(request: Request) -> Reply:
        reply = await _call(inner, request)
        return msgspec.structs.replace(reply, delay=reply.delay + seconds)

    return handler


_TEXT_MARK = re.compile(r"^<text (\d+)>[ \t]?", re.M)
_QUALITY = re.compile(r"quality=(\d+)")
_LABELS = {1: "Poor", 2: "Fair", 3: "Average", 4: "Good", 5: "Excellent"}


def rating_for(text: str) -> int:
    """The rating `judge_handler` gives a response: `quality=K` inside it, else a stable hash."""
    match = _QUALITY.search(text)
    if match:
        return min(5, max(1, int(match.group(1))))
    return 1 + zlib.crc32(text.strip().encode()) % 5


class JudgeAnswer(msgspec.Struct, frozen=True, kw_only=True):
    """What the judge answered for one request: the expected ratings by text number, and
    which text (if any) it made unreadable or left out."""

    ratings: dict[int, int]
    untidy: bool
    broken: int | None
    text: str


class JudgeHandler:
    """An UltraFeedback judge that rates each `<text k>` by its content (`rating_for`).

    With probability `untidy` an answer is messy but readable (preamble, closing remark, bold,
    3-5 hashes, `4/5`, `4 (Good)`, CRLF, reordered blocks, blank lines after headers); with
    probability `broken` one block is missing or its rating unreadable. Prompts without
    `<text k>` markers after the last "\\nTexts:\\n" go to `fallback` (an echo generator), so
    one server can serve a whole pipeline. Answers are reproducible: the randomness is seeded by
    `seed`, the prompt and how often that prompt was seen.
    """

    def __init__(
        self,
        *,
        untidy: float = 0.4,
        broken: float = 0.05,
        seed: int = 0,
        fallback: Handler | None = None,
    ) -> None:
        self.untidy = untidy
        self.broken = broken
        self.seed = seed
        self.fallback = fallback if fallback is not None else EchoHandler()
        self.answers: list[JudgeAnswer] = []
        self._seen: collections.Counter[int] = collections.Counter()

    async def __call__(self, request: Request) -> Reply:
        prompt = request.prompt
        _, sep, inputs = prompt.rpartition("\nTexts:\n")
        marks = list(_TEXT_MARK.finditer(inputs)) if sep else []
        if not marks:
            return await _call(self.fallback, request)
        key = zlib.crc32(prompt.encode())
        self._seen[key] += 1
        rng = random.Random(f"{self.seed}\0{key}\0{self._seen[key]}")
        texts: list[tuple[int, str]] = []
        for i, mark in enumerate(marks):
            end = marks[i + 1].start() if i + 1 < len(marks) else len(inputs)
            texts.append((int(mark.group(1)), inputs[mark.end() : end].strip()))
        answer = self._answer(texts, typed="\nType:" in prompt, rng=rng)
        self.answers.append(answer)
        return Reply(text=answer.text)

    def _answer(
        self, texts: list[tuple[int, str]], *, typed: bool, rng: random.Random
    ) -> JudgeAnswer:
        untidy = rng.random() < self.untidy
        broken_id: int | None = None
        broken_mode = ""
        if texts and rng.random() < self.broken:
            broken_id = rng.choice(texts)[0]
            broken_mode = rng.choice(("missing", "unreadable"))
        style = {
            name: untidy and rng.random() < 0.5
            for name in (
                "preamble",
                "closing",
                "bold",
                "hashes",
                "slash",
                "label",
                "crlf",
                "reorder",
                "blank",
            )
        }
        if untidy and not any(style.values()):
            style[rng.choice(sorted(style))] = True
        ratings = {k: rating_for(text) for k, text in texts}
        blocks: list[str] = []
        for k, text in texts:
            if k == broken_id and broken_mode == "missing":
                continue
            hashes = "#" * (rng.randint(3, 5) if style["hashes"] else 4)
            label = "**Rating:**" if style["bold"] else "Rating:"
            rating = ratings[k]
            value = str(rating)
            if style["slash"] and rng.random() < 0.5:
                value = f"{rating}/5"
            elif style["label"]:
                value = f"{rating} ({_LABELS[rating]})"
            if k == broken_id:
                value = rng.choice(("N/A", "unclear", "see above"))
            lines = [f"{hashes} Output for Text {k}"]
            if style["blank"]:
                lines.append("")
            if typed:
                kinds = sorted({1 + zlib.crc32(text.encode()) % 3, 1 + len(text) % 3})
                lines += [
                    f"Type: {', '.join(map(str, kinds))}",
                    f"Rationale: text {k} shows types {', '.join(map(str, kinds))}.",
                ]
            lines += [f"{label} {value}", f"Rationale: text {k} has {len(text)} characters."]
            blocks.append("\n".join(lines))
        if style["reorder"]:
            rng.shuffle(blocks)
        body = "\n\n".join(blocks)
        if style["preamble"]:
            body = "Here is my assessment of each text.\n\n" + body
        if style["closing"]:
            body += "\n\nOverall, the texts differ mostly in accuracy and clarity."
        if style["crlf"]:
            body = body.replace("\n", "\r\n")
        return JudgeAnswer(ratings=ratings, untidy=untidy, broken=broken_id, text=body)


def judge_handler(
    *,
    untidy: float = 0.4,
    broken: float = 0.05,
    seed: int = 0,
    fallback: Handler | None = None,
) -> JudgeHandler:
    """A judge handler; see `JudgeHandler`."""
    return JudgeHandler(untidy=untidy, broken=broken, seed=seed, fallback=fallback)


# -- command line --------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m streamfeedback.testing.openai_server",
        description="An OpenAI-compatible test server; prints its base URL on the first line.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument(
        "--judge", action="store_true", help="rate <text k> prompts (others are echoed)"
    )
    parser.add_argument("--untidy", type=float, default=0.4)
    parser.add_argument("--broken", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--words", type=int, default=24, help="echo answer length in words")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before each answer")
    parser.add_argument("--rpm", type=float, default=None, help="answer 429 beyond this rate")
    parser.add_argument("--window", type=float, default=60.0, help="sliding window for --rpm")
    return parser


async def _serve(args: argparse.Namespace) -> None:
    handler: Handler = echo_handler(words=args.words)
    if args.judge:
        handler = judge_handler(
            untidy=args.untidy, broken=args.broken, seed=args.seed, fallback=handler
        )
    if args.delay > 0:
        handler = delayed(handler, args.delay)
    if args.rpm is not None:
        handler = rate_limited(handler, args.rpm, window=args.window)
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with OpenAIServer(handler, host=args.host, port=args.port) as server:
            sys.stdout.write(server.base_url + "\n")
            sys.stdout.flush()
            async for _ in signals:
                break


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    anyio.run(_serve, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
