"""`OpenAIServer`: the HTTP core, the chat and models routes, and the Files/Batches routes."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import anyio
import msgspec

from ._batches import _BATCH_ROUTE, _FILE_ROUTE, StoredBatch, StoredFile, _FilesAndBatches
from ._http import Handler, Reply, Request, _call, _content_text, _error, _HTTPServer, logger

__all__ = ["OpenAIServer"]


class OpenAIServer(_FilesAndBatches, _HTTPServer):
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
        super().__init__(host=host, port=port)
        self.models = list(models)
        self._ids = 0

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

    def _models_body(self, request: Request) -> bytes:
        seen = dict.fromkeys(self.models)
        seen.update(dict.fromkeys(r.model for r in self.requests if r.model))
        data = [
            {"id": m, "object": "model", "created": 0, "owned_by": "streamfeedback"} for m in seen
        ]
        return msgspec.json.encode({"object": "list", "data": data})
