"""The HTTP/1.1 side: what a request and an answer are, and a server core on anyio sockets.

`Request` is one request as the server saw it, `Reply` what a `Handler` answers. `_HTTPServer`
listens, reads requests (Content-Length bodies only, keep-alive), records them and writes the
answers; what each request gets is its subclass's `_dispatch`.
"""

from __future__ import annotations

import collections
import http
import inspect
import logging
import math
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Any, TypeVar

import anyio
import anyio.abc
import msgspec
from anyio.streams.buffered import BufferedByteStream

__all__ = ["Handler", "Reply", "Request"]

logger = logging.getLogger("streamfeedback.testing")

_MAX_HEAD = 64 * 1024
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


_Server = TypeVar("_Server", bound="_HTTPServer")


class _HTTPServer:
    """An HTTP/1.1 server on `host`:`port` (0 picks a free port) while the `async with` lasts.

    `requests` records every HTTP request in arrival order; `status_counts` counts the answers
    by status; `connections` counts accepted TCP connections (keep-alive shows as few).
    """

    def __init__(self, *, host: str, port: int) -> None:
        self._tg: anyio.abc.TaskGroup | None = None
        self.host = host
        self.port = port
        self.requests: list[Request] = []
        self.status_counts: collections.Counter[int] = collections.Counter()
        self.connections = 0
        self._stack: AsyncExitStack | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    async def __aenter__(self: _Server) -> _Server:
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
        """(status, body, headers) for one request."""
        raise NotImplementedError

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
