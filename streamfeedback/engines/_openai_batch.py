"""OpenAI's Files and Batches API, as the batch rating stage needs it: upload a request file,
create a batch, poll it, find one by the token in its metadata, read its output.

The `openai` SDK does the HTTP (and retries what may pass); this module maps its errors onto
ours with the statuses the live engine uses (`_openai_errors`), and keeps every `openai.*`
type inside: the stage sees `BatchStatus` and plain answer texts. No message carries the key.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

import anyio
import msgspec
import openai
from openai.types import Batch

from .._config import RaterConfig, sdk_env
from .._exceptions import JudgeUnavailable
from ._openai_errors import (
    DEFAULT_BASE_URL,
    DETAIL_CHARS,
    MissingKey,
    error_detail,
    passing,
    read_key,
    scrub,
    status_kind,
    unreachable_reason,
)

__all__ = [
    "ENDPOINT",
    "BatchApiError",
    "BatchClient",
    "BatchError",
    "BatchStatus",
    "LineError",
    "refused_with",
]

log = logging.getLogger("streamfeedback.batch")

ENDPOINT: Literal["/v1/chat/completions"] = "/v1/chat/completions"
_TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
_RERUN = " (submitted batches are kept in the state file: rerun to resume them)"

T = TypeVar("T")


class BatchApiError(Exception):
    """A Files/Batches call failed for a reason that may pass (5xx, 429, network)."""


class LineError(msgspec.Struct, frozen=True):
    """A request of a batch that got no answer text; `retryable` if asking again may help."""

    retryable: bool
    message: str


class BatchError(msgspec.Struct, frozen=True):
    """Why the API refused a batch as a whole (a line of its input, or the token limit)."""

    code: str | None
    line: int | None
    message: str | None


class BatchStatus(msgspec.Struct, frozen=True, kw_only=True):
    """Where a batch stands: the fields of OpenAI's Batch object the stage reads."""

    id: str
    status: str
    completed: int | None = None
    failed: int | None = None
    total: int | None = None
    errors: list[BatchError] = []
    output_file_id: str | None = None
    error_file_id: str | None = None

    @property
    def ended(self) -> bool:
        return self.status in _TERMINAL


class _OutputResponse(msgspec.Struct):
    status_code: int
    body: Any = None


class _OutputError(msgspec.Struct):
    code: str | None = None
    message: str | None = None


class _OutputLine(msgspec.Struct):
    custom_id: str
    response: _OutputResponse | None = None
    error: _OutputError | None = None


class BatchClient:
    """One judge's Files/Batches client; `label` names the judge in every error."""

    def __init__(self, config: RaterConfig, label: str) -> None:
        self.config = config
        self.label = label
        self.base_url = (config.base_url or DEFAULT_BASE_URL).rstrip("/")
        self._client: openai.AsyncOpenAI | None = None
        self._key = ""

    async def start(self) -> None:
        """Build the SDK client; no request is sent.

        :raises JudgeUnavailable: the key's variable is not set.
        """
        try:
            self._key = read_key(self.config, self.base_url)
        except MissingKey as exc:
            raise JudgeUnavailable(f"judge {self.label}: {exc}") from None
        # The SDK would read OPENAI_ORG_ID / OPENAI_PROJECT_ID raw: strip them as the live
        # engine does (a stray newline would fail every call).
        self._client = openai.AsyncOpenAI(
            base_url=self.base_url,
            api_key=self._key,
            organization=sdk_env("OPENAI_ORG_ID"),
            project=sdk_env("OPENAI_PROJECT_ID"),
            max_retries=self.config.max_retries,
            timeout=self.config.timeout,
        )

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with anyio.move_on_after(5, shield=True):
                await client.close()

    def scrub(self, text: str) -> str:
        return scrub(text, self._key)

    # -- calls ---------------------------------------------------------------------------

    async def upload(self, path: Path) -> str:
        """Upload a batch input file; returns its file id."""
        client = self._require()
        upload = await self._api("POST /files", client.files.create(file=path, purpose="batch"))
        return upload.id

    async def create(self, input_file_id: str, metadata: dict[str, str]) -> str:
        """Create a batch of an uploaded file; returns its id."""
        client = self._require()
        batch = await self._api(
            "POST /batches",
            client.batches.create(
                input_file_id=input_file_id,
                endpoint=ENDPOINT,
                completion_window=cast("Literal['24h']", self.config.batch_completion_window),
                metadata=metadata,
            ),
        )
        return batch.id

    async def poll(self, batch_id: str) -> BatchStatus:
        """One look at a batch.

        :raises BatchApiError: a failure that may pass (poll again later).
        """
        client = self._require()
        batch = await self._api(
            f"GET /batches/{batch_id}", client.batches.retrieve(batch_id), passing=True
        )
        return _status(batch)

    async def find(self, token: str, since: float) -> str | None:
        """The id of the batch whose metadata holds `token`, looking back (the list is newest
        first) only to batches created at `since` or later."""
        client = self._require()
        after: str | None = None
        while True:
            page = await self._api(
                "GET /batches",
                client.batches.list(limit=100, after=after)
                if after
                else client.batches.list(limit=100),
            )
            for batch in page.data:
                if token and (batch.metadata or {}).get("token") == token:
                    return batch.id
                if batch.created_at < since:
                    return None
            if not page.data or page.has_more is False or page.data[-1].id == after:
                return None
            after = page.data[-1].id

    async def file_exists(self, file_id: str) -> bool:
        client = self._require()
        try:
            await self._api(f"GET /files/{file_id}", client.files.retrieve(file_id))
        except JudgeUnavailable as exc:
            if refused_with(exc) == 404:
                return False
            raise
        return True

    async def results(self, batch: BatchStatus) -> dict[str, str | LineError]:
        """Answer text or error per custom_id, from the batch's output and error files."""
        client = self._require()
        results: dict[str, str | LineError] = {}
        for file_id in (batch.output_file_id, batch.error_file_id):
            if not file_id:
                continue
            content = await self._api(
                f"GET /files/{file_id}/content", client.files.content(file_id)
            )
            for raw in content.content.splitlines():
                if not raw.strip():
                    continue
                try:
                    line = msgspec.json.decode(raw, type=_OutputLine)
                except msgspec.DecodeError:
                    log.warning("batch %s: skipped an unreadable output line", batch.id)
                    continue
                results[line.custom_id] = self._result(line)
        return results

    # -- mapping -------------------------------------------------------------------------

    def _result(self, line: _OutputLine) -> str | LineError:
        response = line.response
        if response is None:
            error = line.error or _OutputError()
            retryable = error.code in ("batch_expired", None)
            message = error.message or error.code or "no response"
            return LineError(retryable, self.scrub(message)[:DETAIL_CHARS])
        status = response.status_code
        body = response.body
        if status >= 400:
            explained = error_detail(body, self._key) if status_kind(status) != "auth" else ""
            return LineError(passing(status), f"{self.base_url} answered {status}{explained}")
        reply = _message(body)
        content = reply.get("content")
        if isinstance(content, str):
            return content
        refusal = reply.get("refusal")
        if isinstance(refusal, str) and refusal:
            return LineError(False, f"the model refused: {self.scrub(refusal)[:DETAIL_CHARS]}")
        return LineError(True, f"malformed response from {self.base_url}: no message content")

    def _require(self) -> openai.AsyncOpenAI:
        if self._client is None:
            raise JudgeUnavailable(f"judge {self.label}: the batch client is closed")
        return self._client

    async def _api(self, what: str, call: Awaitable[T], *, passing: bool = False) -> T:
        """One Files/Batches call (the SDK retries what may pass), mapped onto our errors.

        :raises JudgeUnavailable: 401/403/404 and other refusals (never with the key); with
            `passing=False` also what the SDK's retries did not get through. `refused_with`
            tells its status.
        :raises BatchApiError: with `passing=True`, 5xx, 408, 409, 429 or the network.
        """
        try:
            return await call
        except openai.APIStatusError as exc:
            status = exc.status_code
            kind = status_kind(status)
            where = f"judge {self.label}: {self.base_url} answered {status} to {what}"
            if kind == "auth":
                raise JudgeUnavailable(f"{where}: check the API key") from None
            explained = error_detail(exc.body, self._key)
            if kind == "not_found":
                raise JudgeUnavailable(
                    f"{where}: check base_url (it must serve the Files and Batches API){explained}"
                ) from exc
            if passing and kind != "refused":
                raise BatchApiError(
                    f"{self.base_url} answered {status} to {what}{explained}"
                ) from exc
            raise JudgeUnavailable(f"{where}{explained}{_RERUN}") from exc
        except openai.APIConnectionError as exc:
            message = f"cannot reach {self.base_url} for {what} ({unreachable_reason(exc)})"
            if passing:
                raise BatchApiError(message) from exc
            raise JudgeUnavailable(f"judge {self.label}: {message}{_RERUN}") from exc
        except openai.OpenAIError as exc:
            raise JudgeUnavailable(
                f"judge {self.label}: {what}: {self.scrub(str(exc))[:DETAIL_CHARS]}"
            ) from exc


def refused_with(exc: JudgeUnavailable) -> int | None:
    """The HTTP status behind a `BatchClient` error (None for auth, network or other)."""
    cause = exc.__cause__
    return cause.status_code if isinstance(cause, openai.APIStatusError) else None


def _status(batch: Batch) -> BatchStatus:
    counts = batch.request_counts
    errors = batch.errors.data if batch.errors and batch.errors.data else []
    return BatchStatus(
        id=batch.id,
        status=batch.status,
        completed=counts.completed if counts else None,
        failed=counts.failed if counts else None,
        total=counts.total if counts else None,
        errors=[BatchError(code=e.code, line=e.line, message=e.message) for e in errors],
        output_file_id=batch.output_file_id,
        error_file_id=batch.error_file_id,
    )


def _message(body: Any) -> dict[str, Any]:
    """`choices[0].message` of a chat completion body, or {}."""
    choices = body.get("choices") if isinstance(body, dict) else None
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        message = choices[0].get("message")
        if isinstance(message, dict):
            return message
    return {}
