"""OpenAI's Files and Batches endpoints, in memory.

`StoredFile` and `StoredBatch` are what the server holds; `_FilesAndBatches` answers the routes
and runs each batch line by line through the server's handler; `_multipart` and `_batch_lines`
read an upload and a batch input file.
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any

import anyio
import anyio.abc
import msgspec

from ._http import Handler, Reply, Request, _call, _error, logger

__all__ = ["StoredBatch", "StoredFile"]

_FILE_PURPOSES = frozenset({"assistants", "batch", "fine-tune", "vision", "user_data", "evals"})
_FILE_ROUTE = re.compile(r"(?:/v1)?/files(?:/(?P<id>[^/]+)(?P<content>/content)?)?")
_BATCH_ROUTE = re.compile(r"(?:/v1)?/batches(?:/(?P<id>[^/]+)(?P<cancel>/cancel)?)?")
_BOUNDARY = re.compile(r'boundary="?(?P<b>[^";]+)"?', re.IGNORECASE)
_DISPOSITION_PARAM = re.compile(r'(?P<key>name|filename)="(?P<value>[^"]*)"', re.IGNORECASE)


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


class _FilesAndBatches:
    """The Files and Batches routes of `OpenAIServer`, which sets these attributes."""

    handler: Handler
    batch_delay: float
    expire_after: int | None
    files: dict[str, StoredFile]
    batches: dict[str, StoredBatch]
    batch_requests: list[Request]
    _tg: anyio.abc.TaskGroup | None
    _ids: int

    def _completion(self, request: Request, reply: Reply) -> dict[str, Any]:
        """A chat completion object for `reply` (the server's own)."""
        raise NotImplementedError

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
