"""Rating through OpenAI's Batch API (`[rater] mode = "batch"`): half the price, for runs
that can wait.

Joined prompts are written, one request per aspect, into a batch file of at most
`batch_max_requests` requests and `batch_max_bytes` bytes; a prompt's requests stay in one
file. A file is submitted when the next prompt would not fit, when the input ends, or when the
input has been idle for `batch_poll_interval` seconds (so a slow generator still gets its
records before the source ends). At most `MAX_PENDING` batch chains are in flight; when all are,
the open file keeps growing up to its limits and then back-pressures the generators.

Each submitted batch is polled every `batch_poll_interval` seconds. When it ends, its output
and error files are read by `custom_id` (`<prompt id>|<aspect>|<attempt>`), answers are parsed
exactly as the live judge parses them, and each prompt becomes a `Record`, a `Failure`, or a
re-ask: texts still unreadable, and requests that failed for a passing reason (5xx, 429, an
expired batch), go into a follow-up batch of the same chain until `max_attempts`.

Resuming: the state file (JSON, replaced atomically) lists the submitted batches that are not
yet emitted; each names a sidecar NDJSON file in `<state>.d/`, written before upload, holding
the joined prompts (and what earlier attempts read), so a later run assembles records without
generating again. A run first resumes every batch in the state file, drops prompts those
batches cover when they arrive again from the input, skips prompts in `done` (already in the
output), and removes a batch from the state only after its records are emitted.

    {"version": 1, "base_url": "https://api.openai.com/v1",
     "batches": [{"id": "batch_abc", "sidecar": "3f2a9c0d1e4b.joined.ndjson",
                  "input_file_id": "file-xyz", "prompts": 7, "requests": 7, "attempt": 1,
                  "submitted_at": 1718000000.0, "token": "9c1d07e2a4b35f68"}]}

A batch is recorded before it is created: once its file is uploaded, its entry is saved with
an empty `id` and a fresh `token`, and the id is filled in when the create call answers. A
run that finds an entry without an id (the last one died in between) looks for the batch on
the server by the token in its metadata and resumes it; if there is none, it creates it from
the uploaded file, or, if that file is gone, writes it again from the sidecar. So a crash
while submitting neither orphans a paid batch nor submits the same prompts twice, and the
pipeline need not generate again any prompt a state file covers (`pending_ids`).

One window is left: a batch leaves the state once its records are handed on, so a kill
before the sink has written them (at most a channel's and a write batch's worth) loses
nothing, as those prompts are not in the output, but has them rated again on the rerun.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Container
from pathlib import Path
from typing import IO, Any, Literal, TypeVar, cast

import anyio
import anyio.to_thread
import msgspec
import openai
from anyio.abc import TaskGroup
from openai.types import Batch

from .._channels import Receiver, Sender
from .._config import api_key_env
from .._exceptions import JudgeUnavailable
from .._idset import IdSet
from .._judge.judge import Judge, complete, custom_id, merge_blocks
from .._judge.parser import BlockRating
from .._records import Failure, Joined, Record
from ..engines._openai import chat_body

__all__ = ["MAX_PENDING", "pending_ids", "run"]

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

log = logging.getLogger("streamfeedback.batch")

MAX_PENDING = 4
_ENDPOINT: Literal["/v1/chat/completions"] = "/v1/chat/completions"
_DEFAULT_BASE_URL = "https://api.openai.com/v1"
_TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
_MAX_POLL_ERRORS = 20
_DETAIL_CHARS = 300
_READ_CHUNK = 1000
_RERUN = " (submitted batches are kept in the state file: rerun to resume them)"
_SIDECAR = ".joined.ndjson"
_REQUESTS = ".requests.jsonl"
_FIND_SLACK_S = 600.0  # how far before its entry a batch may look created (clock skew)

T = TypeVar("T")


class _Entry(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One prompt of one batch, as its sidecar keeps it: enough to assemble its record."""

    joined: Joined
    attempt: int
    asked: list[str]
    blocks: dict[str, list[BlockRating | None]] = {}
    attempts: dict[str, int] = {}


class _Pending(msgspec.Struct, kw_only=True):
    """A submitted batch whose records are not emitted yet; `id` is "" until its create call
    has answered. The sidecar name identifies the entry; `token`, fresh for each create call
    and sent in the batch's metadata, identifies the batch that call made."""

    id: str
    sidecar: str
    input_file_id: str
    prompts: int
    requests: int
    attempt: int
    submitted_at: float
    token: str = ""


class _State(msgspec.Struct, kw_only=True):
    version: int = 1
    base_url: str = ""
    batches: list[_Pending] = []


class _PromptId(msgspec.Struct):
    id: str


class _JoinedId(msgspec.Struct):
    prompt: _PromptId


class _EntryId(msgspec.Struct):
    joined: _JoinedId


class _LineError(msgspec.Struct, frozen=True):
    retryable: bool
    message: str


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


class _ApiError(Exception):
    """A Files/Batches call failed for a reason that may pass (5xx, 429, network)."""


def pending_ids(state_path: str) -> IdSet:
    """The prompt ids the batches in a state file cover: a resuming run need not generate them."""
    ids = IdSet()
    path = Path(state_path)
    if not path.exists():
        return ids
    state = _read_state(path)
    decoder = msgspec.json.Decoder(_EntryId)
    for pending in state.batches:
        sidecar = _folder(state_path) / pending.sidecar
        if sidecar.exists():
            with sidecar.open("rb") as fh:
                for line in fh:
                    if line.strip():
                        ids.add(decoder.decode(line).joined.prompt.id)
    return ids


def _read_state(path: Path) -> _State:
    """:raises JudgeUnavailable: the file is not a state file (the message says what to do)."""
    try:
        return msgspec.json.decode(path.read_bytes(), type=_State)
    except msgspec.DecodeError as exc:
        raise JudgeUnavailable(
            f"batch state file {path} is unreadable ({exc}); move it away "
            "to start over (its batches would then be paid for again)"
        ) from exc


def _token() -> str:
    return uuid.uuid4().hex[:16]


async def run(
    judge: Judge,
    joined: Receiver[Joined],
    records: Sender[Record],
    failures: Sender[Failure],
    *,
    state_path: str,
    done: Container[str] = (),
    max_pending: int = MAX_PENDING,
) -> None:
    """Rate everything from `joined` through batches; closes `records` and `failures` at the end.

    `done` holds prompts already in the output: a resumed batch emits nothing for them.

    :raises JudgeUnavailable: no key, a wrong key or URL (401/403/404), a batch that failed
        validation, or the API unreachable for too long.
    """
    async with joined, records, failures:
        rater = _BatchRater(judge, records, failures, state_path, done, max_pending)
        try:
            await rater.start()
            async with anyio.create_task_group() as tg:
                for pending in rater.state.batches:
                    rater.slots.force()
                    tg.start_soon(rater.chain, pending, None, name=f"batch-{pending.id}")
                await rater.collect(joined, tg)
        except BaseExceptionGroup as group:
            fatal = _judge_unavailable(group)
            if fatal is None:
                raise
            raise fatal from None
        finally:
            await rater.close()


def _judge_unavailable(group: BaseExceptionGroup[BaseException]) -> JudgeUnavailable | None:
    """The first JudgeUnavailable in a task-group failure: callers catch it plainly."""
    for exc in group.exceptions:
        if isinstance(exc, JudgeUnavailable):
            return exc
        if isinstance(exc, BaseExceptionGroup):
            found = _judge_unavailable(exc)
            if found is not None:
                return found
    return None


class _Slots:
    """Batch chains in flight, at most `limit` (resumed ones may go over)."""

    def __init__(self, limit: int) -> None:
        self.limit = max(1, limit)
        self.used = 0
        self._changed = anyio.Event()

    def try_take(self) -> bool:
        if self.used >= self.limit:
            return False
        self.used += 1
        return True

    def force(self) -> None:
        self.used += 1

    async def take(self) -> None:
        while not self.try_take():
            await self._changed.wait()

    async def changed(self) -> None:
        """Until a slot is given back."""
        await self._changed.wait()

    def give(self) -> None:
        self.used -= 1
        self._changed.set()
        self._changed = anyio.Event()


class _Builder:
    """An open batch: its request file and its sidecar, written as prompts arrive."""

    def __init__(self, folder: Path) -> None:
        token = uuid.uuid4().hex[:16]
        self.sidecar = f"{token}{_SIDECAR}"
        self.sidecar_path = folder / self.sidecar
        self.requests_path = folder / f"{token}{_REQUESTS}"
        self.prompts = self.requests = self.bytes = 0
        self.attempt = 1
        self.recorded = False  # a state entry names the sidecar: it must outlive us
        self._files: tuple[IO[bytes], IO[bytes]] | None = None

    def fits(self, requests: int, size: int, max_requests: int, max_bytes: int) -> bool:
        if not self.prompts:
            return True
        return self.requests + requests <= max_requests and self.bytes + size <= max_bytes

    def add(self, entry: bytes, lines: bytes, requests: int, attempt: int) -> None:
        if self._files is None:
            self.sidecar_path.parent.mkdir(parents=True, exist_ok=True)
            self._files = (self.sidecar_path.open("wb"), self.requests_path.open("wb"))
        self._files[0].write(entry)
        self._files[1].write(lines)
        self.prompts += 1
        self.requests += requests
        self.bytes += len(lines)
        self.attempt = max(self.attempt, attempt)

    def close(self) -> None:
        """Flush both files to disk: the sidecar must outlive a crash once the batch exists."""
        files, self._files = self._files, None
        if files is not None:
            for fh in files:
                fh.flush()
                os.fsync(fh.fileno())
                fh.close()

    def discard(self) -> None:
        """Drop the files, except a sidecar the state file already names."""
        self.close()
        self.requests_path.unlink(missing_ok=True)
        if not self.recorded:
            self.sidecar_path.unlink(missing_ok=True)


def _folder(state_path: str) -> Path:
    return Path(f"{state_path}.d")


class _BatchRater:
    def __init__(
        self,
        judge: Judge,
        records: Sender[Record],
        failures: Sender[Failure],
        state_path: str,
        done: Container[str],
        max_pending: int,
    ) -> None:
        self.judge = judge
        self.config = judge.config
        self.records = records
        self.failures = failures
        self.state_path = Path(state_path)
        self.folder = _folder(state_path)
        self.done = done
        self.slots = _Slots(max_pending)
        self.base_url = (self.config.base_url or _DEFAULT_BASE_URL).rstrip("/")
        self.state = _State(base_url=self.base_url)
        self.covered = IdSet()
        self.builder: _Builder | None = None
        self.last_input = time.monotonic()
        self._client: openai.AsyncOpenAI | None = None
        self._key = ""
        self._state_lock = anyio.Lock()
        self._encoder = msgspec.json.Encoder()

    # -- setup ---------------------------------------------------------------------------

    async def start(self) -> None:
        var = api_key_env(self.config)
        key = os.environ.get(var, "").strip() if var else "EMPTY"
        if not key:
            raise JudgeUnavailable(
                f"judge {self.judge.label}: environment variable {var} is not set (it should "
                f"hold the API key for {self.base_url})"
            )
        self._key = key
        self._client = openai.AsyncOpenAI(
            base_url=self.base_url,
            api_key=key,
            max_retries=self.config.max_retries,
            timeout=self.config.timeout,
        )
        await anyio.to_thread.run_sync(self._load)
        await self._resolve()
        await anyio.to_thread.run_sync(self._cover)

    def _load(self) -> None:
        """Read the state file, dropping batches whose prompts file is gone."""
        if self.state_path.exists():
            self.state = _read_state(self.state_path)
            if self.state.base_url and self.state.base_url != self.base_url:
                log.warning(
                    "batch state %s was written for %s, not %s; its batches may not be found",
                    self.state_path,
                    self.state.base_url,
                    self.base_url,
                )
        missing = [p for p in self.state.batches if not (self.folder / p.sidecar).exists()]
        for pending in missing:
            log.warning(
                "%s: its prompts file %s is gone; its %d prompts will be rated again",
                f"batch {pending.id}" if pending.id else "an unsubmitted batch",
                self.folder / pending.sidecar,
                pending.prompts,
            )
        if missing:
            gone = {p.sidecar for p in missing}
            self.state = msgspec.structs.replace(
                self.state, batches=[p for p in self.state.batches if p.sidecar not in gone]
            )

    def _cover(self) -> None:
        """Note the prompts the batches cover, and drop stray files."""
        decoder = msgspec.json.Decoder(_EntryId)
        for pending in self.state.batches:
            with (self.folder / pending.sidecar).open("rb") as fh:
                for line in fh:
                    if line.strip():
                        self.covered.add(decoder.decode(line).joined.prompt.id)
        if self.state.batches:
            log.info(
                "resuming %d batches (%d prompts) from %s",
                len(self.state.batches),
                sum(p.prompts for p in self.state.batches),
                self.state_path,
            )
        if self.folder.is_dir():
            keep = {p.sidecar for p in self.state.batches}
            for path in self.folder.iterdir():
                if path.name.endswith((_SIDECAR, _REQUESTS)) and path.name not in keep:
                    path.unlink(missing_ok=True)

    async def close(self) -> None:
        if self.builder is not None:
            self.builder.discard()
            self.builder = None
        if not self.state.batches:
            with contextlib.suppress(OSError):
                self.folder.rmdir()  # only when empty: sidecars of pending batches stay
        client, self._client = self._client, None
        if client is not None:
            with anyio.move_on_after(5, shield=True):
                await client.close()

    # -- collecting ----------------------------------------------------------------------

    async def collect(self, joined: Receiver[Joined], tg: TaskGroup) -> None:
        """Fill batch files from the input; submit each as it fills, idles or ends."""
        cfg = self.config
        async with anyio.create_task_group() as timers:
            timers.start_soon(self._flush_when_idle, tg)
            async for item in joined:
                self.last_input = time.monotonic()
                pid = item.prompt.id
                if pid in self.covered:
                    log.debug("%s is in a resumed batch; not submitted again", pid)
                    continue
                entry = _Entry(joined=item, attempt=1, asked=list(self.judge.aspects))
                lines = self._lines(item, 1, entry.asked)
                if len(lines) > cfg.batch_max_bytes:
                    await self._fail(
                        item,
                        f"its judge requests take {len(lines)} bytes, more than "
                        f"batch_max_bytes = {cfg.batch_max_bytes}",
                    )
                    continue
                requests = len(entry.asked)
                full = self.builder
                if full is not None and not full.fits(
                    requests, len(lines), cfg.batch_max_requests, cfg.batch_max_bytes
                ):
                    # wait for a free slot, unless the idle timer submits this batch first
                    while self.builder is full:
                        if self.slots.try_take():
                            self._launch(tg)
                        else:
                            await self.slots.changed()
                if self.builder is None:
                    self.builder = _Builder(self.folder)
                self.builder.add(self._encoder.encode(entry) + b"\n", lines, requests, 1)
            timers.cancel_scope.cancel()
        if self.builder is not None:
            await self.slots.take()
            self._launch(tg)

    async def _flush_when_idle(self, tg: TaskGroup) -> None:
        idle = self.config.batch_poll_interval
        while True:
            await anyio.sleep(max(idle / 4, 0.01))
            if (
                self.builder is not None
                and time.monotonic() - self.last_input >= idle
                and self.slots.try_take()
            ):
                self._launch(tg)

    def _launch(self, tg: TaskGroup) -> None:
        """Hand the open batch to a new chain; the caller holds a slot for it."""
        builder, self.builder = self.builder, None
        if builder is None:
            self.slots.give()
            return
        tg.start_soon(self.chain, None, builder, name=f"batch-{builder.sidecar}")

    def _lines(self, joined: Joined, attempt: int, aspects: list[str]) -> bytes:
        """The batch-file lines of a prompt's requests for `aspects`."""
        out = []
        for cid, _, request in self.judge.requests(joined, attempt, aspects):
            body = chat_body(self.config.model, request)
            line = {"custom_id": cid, "method": "POST", "url": _ENDPOINT, "body": body}
            out.append(self._encoder.encode(line) + b"\n")
        return b"".join(out)

    # -- one chain: a batch and its follow-ups -------------------------------------------

    async def chain(self, pending: _Pending | None, builder: _Builder | None) -> None:
        try:
            if builder is not None:
                pending = await self._submit(builder, replaces=None)
            while pending is not None:
                batch = await self._wait(pending)
                pending = await self._finish(pending, batch)
        finally:
            self.slots.give()

    async def _submit(self, builder: _Builder, *, replaces: _Pending | None) -> _Pending:
        """Upload the file, record the batch-to-be (replacing `replaces`), then create it."""
        client = self._require_client()
        await anyio.to_thread.run_sync(builder.close)
        try:
            upload = await self._api(
                "POST /files", client.files.create(file=builder.requests_path, purpose="batch")
            )
        except BaseException:
            builder.discard()
            raise
        builder.requests_path.unlink(missing_ok=True)
        creating = _Pending(
            id="",
            sidecar=builder.sidecar,
            input_file_id=upload.id,
            prompts=builder.prompts,
            requests=builder.requests,
            attempt=builder.attempt,
            submitted_at=time.time(),
            token=_token(),
        )
        await self._save(add=creating, remove=replaces)
        builder.recorded = True
        return await self._create(creating)

    async def _create(self, creating: _Pending) -> _Pending:
        """Create the batch of a recorded, uploaded file; record its id."""
        client = self._require_client()
        batch = await self._api(
            "POST /batches",
            client.batches.create(
                input_file_id=creating.input_file_id,
                endpoint=_ENDPOINT,
                completion_window=cast("Literal['24h']", self.config.batch_completion_window),
                metadata={
                    "source": "streamfeedback",
                    "sidecar": creating.sidecar,
                    "token": creating.token,
                },
            ),
        )
        pending = msgspec.structs.replace(creating, id=batch.id)
        await self._save(add=pending, remove=creating, keep_sidecar=True)
        log.info(
            "batch %s submitted: %d requests for %d prompts%s",
            batch.id,
            pending.requests,
            pending.prompts,
            f" (re-asks, attempt {pending.attempt})" if pending.attempt > 1 else "",
        )
        return pending

    async def _resolve(self) -> None:
        """Entries the last run saved but never heard back about: adopt the batch the server
        made for them, else create it now; drop one only if its uploaded file is gone."""
        for creating in [p for p in self.state.batches if not p.id]:
            found = await self._find(creating)
            if found is not None:
                pending = msgspec.structs.replace(creating, id=found.id)
                await self._save(add=pending, remove=creating, keep_sidecar=True)
                log.warning(
                    "batch %s was created just before the last run stopped; resuming it",
                    found.id,
                )
                continue
            try:
                await self._create(creating)
            except JudgeUnavailable as exc:
                if not isinstance(
                    exc.__cause__, (openai.BadRequestError, openai.NotFoundError)
                ) or await self._file_exists(creating.input_file_id):
                    raise
                log.warning(
                    "the uploaded file %s of an unsubmitted batch cannot be used (%s); "
                    "submitting its %d prompts again from %s",
                    creating.input_file_id,
                    exc,
                    creating.prompts,
                    creating.sidecar,
                )
                await self._rebuild(creating)

    async def _rebuild(self, creating: _Pending) -> None:
        """Write and submit an unsubmitted batch again from its sidecar (no prompt is lost
        with its uploaded file: the sidecar holds every joined prompt)."""
        builder = _Builder(self.folder)
        try:
            async with contextlib.aclosing(self._entries(creating)) as entries:
                async for entry, raw in entries:
                    if entry.joined.prompt.id in self.done:
                        continue
                    lines = self._lines(entry.joined, entry.attempt, entry.asked)
                    builder.add(raw, lines, len(entry.asked), entry.attempt)
            if builder.prompts:
                await self._submit(builder, replaces=creating)
                return
        except BaseException:
            builder.discard()
            raise
        builder.discard()
        await self._save(add=None, remove=creating)

    async def _find(self, creating: _Pending) -> Batch | None:
        """The batch the entry's create call made, by the token in its metadata; pages back
        only to shortly before the entry was saved (the list is newest first)."""
        client = self._require_client()
        since = creating.submitted_at - _FIND_SLACK_S
        after: str | None = None
        while True:
            try:
                page = await self._api(
                    "GET /batches",
                    client.batches.list(limit=100, after=after)
                    if after
                    else client.batches.list(limit=100),
                )
            except JudgeUnavailable as exc:
                if not isinstance(exc.__cause__, openai.NotFoundError):
                    raise
                log.warning(
                    "%s does not list batches: cannot tell whether the last run created the "
                    "batch of %s; creating it (it may be paid for twice)",
                    self.base_url,
                    creating.sidecar,
                )
                return None
            for batch in page.data:
                if creating.token and (batch.metadata or {}).get("token") == creating.token:
                    return batch
                if batch.created_at < since:
                    return None
            if not page.data or page.has_more is False or page.data[-1].id == after:
                return None
            after = page.data[-1].id

    async def _file_exists(self, file_id: str) -> bool:
        client = self._require_client()
        try:
            await self._api(f"GET /files/{file_id}", client.files.retrieve(file_id))
        except JudgeUnavailable as exc:
            if isinstance(exc.__cause__, openai.NotFoundError):
                return False
            raise
        return True

    async def _wait(self, pending: _Pending) -> Batch:
        """Poll until the batch ends; passing API errors are logged and polled through."""
        client = self._require_client()
        status = None
        errors = 0
        while True:
            try:
                batch = await self._api(
                    f"GET /batches/{pending.id}",
                    client.batches.retrieve(pending.id),
                    passing=True,
                )
            except _ApiError as exc:
                errors += 1
                if errors >= _MAX_POLL_ERRORS:
                    raise JudgeUnavailable(
                        f"judge {self.judge.label}: {errors} polls of batch {pending.id} "
                        f"failed in a row (last: {exc}); rerun to resume it"
                    ) from exc
                log.warning("polling batch %s failed (%s); trying again", pending.id, exc)
            else:
                errors = 0
                if batch.status != status:
                    status = batch.status
                    counts = batch.request_counts
                    log.info(
                        "batch %s: %s (%d of %d requests done, %d failed)",
                        pending.id,
                        status,
                        counts.completed if counts else 0,
                        counts.total if counts else pending.requests,
                        counts.failed if counts else 0,
                    )
                if batch.status in _TERMINAL:
                    return batch
            await anyio.sleep(self.config.batch_poll_interval)

    async def _finish(self, pending: _Pending, batch: Batch) -> _Pending | None:
        """Emit what an ended batch settled; returns the follow-up batch of re-asks, if any."""
        if batch.status == "failed":
            return await self._failed(pending, batch)
        results = await self._results(batch)
        follow = _Builder(self.folder)
        emitted = failed = skipped = 0
        try:
            async with contextlib.aclosing(self._entries(pending)) as entries:
                async for entry, _ in entries:
                    if entry.joined.prompt.id in self.done:
                        skipped += 1
                        continue
                    outcome = self._settle(entry, results)
                    if isinstance(outcome, Record):
                        await self.records.send(outcome)
                        emitted += 1
                    elif isinstance(outcome, str):
                        await self._fail(entry.joined, outcome)
                        failed += 1
                    else:
                        lines = self._lines(entry.joined, outcome.attempt, outcome.asked)
                        entry_line = self._encoder.encode(outcome) + b"\n"
                        follow.add(entry_line, lines, len(outcome.asked), outcome.attempt)
            log.info(
                "batch %s %s: %d records, %d failures, %d prompts to ask again%s",
                pending.id,
                batch.status,
                emitted,
                failed,
                follow.prompts,
                f", {skipped} already in the output" if skipped else "",
            )
            if follow.prompts:
                return await self._submit(follow, replaces=pending)
        except BaseException:
            follow.discard()
            raise
        follow.discard()
        await self._save(add=None, remove=pending)
        return None

    async def _entries(self, pending: _Pending) -> AsyncGenerator[tuple[_Entry, bytes], None]:
        """A batch's sidecar, entry by entry (with its line), read in chunks off the loop."""
        decoder = msgspec.json.Decoder(_Entry)
        with (self.folder / pending.sidecar).open("rb") as fh:
            while chunk := await anyio.to_thread.run_sync(_read_lines, fh):
                for raw in chunk:
                    if raw.strip():
                        yield decoder.decode(raw), raw.rstrip(b"\n") + b"\n"

    def _settle(self, entry: _Entry, results: dict[str, str | _LineError]) -> Record | str | _Entry:
        """A prompt's record, its failure message, or the entry of its re-ask."""
        joined = entry.joined
        pid = joined.prompt.id
        n = len(joined.generations)
        blocks = dict(entry.blocks)
        attempts = dict(entry.attempts)
        again: list[str] = []
        last = entry.attempt >= self.config.max_attempts
        for aspect in entry.asked:
            attempts[aspect] = entry.attempt
            earlier = blocks.get(aspect) or [None] * n
            result = results.get(custom_id(pid, aspect, entry.attempt))
            if isinstance(result, str):
                blocks[aspect] = merge_blocks(earlier, self.judge.parse(joined, aspect, result))
                if not complete(blocks[aspect]) and not last:
                    again.append(aspect)
                continue
            if result is None:
                result = _LineError(True, "the batch output has no line for this request")
            if not result.retryable or last:
                tries = f" after {entry.attempt} attempts" if entry.attempt > 1 else ""
                return f"judge {self.judge.label} ({aspect}){tries}: {result.message}"
            blocks[aspect] = earlier
            again.append(aspect)
        if again:
            return _Entry(
                joined=joined,
                attempt=entry.attempt + 1,
                asked=again,
                blocks=blocks,
                attempts={a: k for a, k in attempts.items() if a not in again},
            )
        return self.judge.assemble(joined, blocks, attempts)

    async def _failed(self, pending: _Pending, batch: Batch) -> _Pending | None:
        """A batch the API refused as a whole: over the enqueued-token limit (wait, submit
        the same file again), or invalid (every batch would be: stop)."""
        errors = batch.errors.data if batch.errors and batch.errors.data else []
        codes = {e.code for e in errors}
        if errors and codes <= {"token_limit_exceeded"}:
            log.warning(
                "batch %s: over the enqueued-token limit; submitting it again in %gs",
                pending.id,
                self.config.batch_poll_interval,
            )
            await anyio.sleep(self.config.batch_poll_interval)
            creating = msgspec.structs.replace(
                pending, id="", submitted_at=time.time(), token=_token()
            )
            await self._save(add=creating, remove=pending, keep_sidecar=True)
            return await self._create(creating)
        detail = "; ".join(
            f"line {e.line}: {e.message}" if e.line else str(e.message) for e in errors[:3]
        )
        await self._save(add=None, remove=pending)
        raise JudgeUnavailable(
            f"judge {self.judge.label}: batch {pending.id} failed at {self.base_url}: "
            f"{self._scrub(detail) or 'no reason given'}"
        )

    async def _results(self, batch: Batch) -> dict[str, str | _LineError]:
        """Answer text or error per custom_id, from the output and error files."""
        client = self._require_client()
        results: dict[str, str | _LineError] = {}
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

    def _result(self, line: _OutputLine) -> str | _LineError:
        response = line.response
        if response is None:
            error = line.error or _OutputError()
            retryable = error.code in ("batch_expired", None)
            message = error.message or error.code or "no response"
            return _LineError(retryable, self._scrub(message)[:_DETAIL_CHARS])
        status = response.status_code
        body = response.body
        if status >= 400:
            retryable = status in (408, 409, 429) or status >= 500
            text = _error_message(body)
            detail = f": {self._scrub(text)[:_DETAIL_CHARS]}" if text and status != 401 else ""
            return _LineError(retryable, f"{self.base_url} answered {status}{detail}")
        reply = _message(body)
        content = reply.get("content")
        if isinstance(content, str):
            return content
        refusal = reply.get("refusal")
        if isinstance(refusal, str) and refusal:
            return _LineError(False, f"the model refused: {self._scrub(refusal)[:_DETAIL_CHARS]}")
        return _LineError(True, f"malformed response from {self.base_url}: no message content")

    async def _fail(self, joined: Joined, error: str) -> None:
        log.warning("rating failed for %s: %s", joined.prompt.id, error)
        await self.failures.send(
            Failure(
                id=joined.prompt.id,
                stage="rating",
                error=error,
                instruction=joined.prompt.instruction,
                line=joined.prompt.line,
            )
        )

    # -- the state file ------------------------------------------------------------------

    async def _save(
        self, *, add: _Pending | None, remove: _Pending | None, keep_sidecar: bool = False
    ) -> None:
        """Change the batch list and write it atomically; drop a removed batch's sidecar."""
        async with self._state_lock:
            batches = [
                b for b in self.state.batches if remove is None or b.sidecar != remove.sidecar
            ]
            if add is not None:
                batches.append(add)
            self.state = _State(base_url=self.base_url, batches=batches)
            data = msgspec.json.format(self._encoder.encode(self.state), indent=1)
            await anyio.to_thread.run_sync(_write_atomically, self.state_path, data)
            if remove is not None and not keep_sidecar:
                (self.folder / remove.sidecar).unlink(missing_ok=True)

    # -- the API -------------------------------------------------------------------------

    def _require_client(self) -> openai.AsyncOpenAI:
        if self._client is None:
            raise JudgeUnavailable(f"judge {self.judge.label}: the batch client is closed")
        return self._client

    async def _api(self, what: str, call: Awaitable[T], *, passing: bool = False) -> T:
        """One Files/Batches call (the SDK retries what may pass), mapped onto our errors.

        :raises JudgeUnavailable: 401/403/404 and other refusals (never with the key); with
            `passing=False` also what the SDK's retries did not get through.
        :raises _ApiError: with `passing=True`, 5xx, 408, 409, 429 or the network.
        """
        try:
            return await call
        except openai.APIStatusError as exc:
            status = exc.status_code
            where = f"judge {self.judge.label}: {self.base_url} answered {status} to {what}"
            if status in (401, 403):
                raise JudgeUnavailable(f"{where}: check the API key") from None
            detail = _error_message(exc.body)
            detail = f": {self._scrub(detail)[:_DETAIL_CHARS]}" if detail else ""
            if status == 404:
                raise JudgeUnavailable(
                    f"{where}: check base_url (it must serve the Files and Batches API){detail}"
                ) from exc
            if passing and (status in (408, 409, 429) or status >= 500):
                raise _ApiError(f"{self.base_url} answered {status} to {what}{detail}") from exc
            raise JudgeUnavailable(f"{where}{detail}{_RERUN}") from exc
        except openai.APIConnectionError as exc:
            reason = type(exc.__cause__).__name__ if exc.__cause__ else type(exc).__name__
            message = f"cannot reach {self.base_url} for {what} ({reason})"
            if passing:
                raise _ApiError(message) from exc
            raise JudgeUnavailable(f"judge {self.judge.label}: {message}{_RERUN}") from exc
        except openai.OpenAIError as exc:
            raise JudgeUnavailable(
                f"judge {self.judge.label}: {what}: {self._scrub(str(exc))[:_DETAIL_CHARS]}"
            ) from exc

    def _scrub(self, text: str) -> str:
        key = self._key
        if len(key) >= 6 and key != "EMPTY":
            text = text.replace(key, "[api key]")
        return text


def _message(body: Any) -> dict[str, Any]:
    """`choices[0].message` of a chat completion body, or {}."""
    choices = body.get("choices") if isinstance(body, dict) else None
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        message = choices[0].get("message")
        if isinstance(message, dict):
            return message
    return {}


def _error_message(body: Any) -> str:
    """The server's explanation in an error body (`{"error": {"message": ...}}` or similar)."""
    if isinstance(body, dict):
        inner = body.get("error", body)
        text = inner.get("message") if isinstance(inner, dict) else inner
        return text.strip() if isinstance(text, str) else ""
    return body.strip() if isinstance(body, str) else ""


def _read_lines(fh: IO[bytes]) -> list[bytes]:
    lines = []
    for line in fh:
        lines.append(line)
        if len(lines) >= _READ_CHUNK:
            break
    return lines


def _write_atomically(path: Path, data: bytes) -> None:
    """Write a temp file beside `path`, flush it to disk, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with temp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(temp, path)
