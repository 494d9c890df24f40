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

Resuming: a run first resumes every batch its state file (`batch_state`) lists, drops
prompts those batches cover when they arrive again from the input, skips prompts in `done`
(already in the output), and removes a batch from the state only after its records are
emitted.

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

This module is the stage: the Files/Batches calls are `engines/_openai_batch.py`'s, the state
file and the sidecars `batch_state.py`'s.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable, Container

import anyio
import anyio.to_thread
import msgspec
from anyio.abc import TaskGroup

from .._channels import Receiver, Sender
from .._exceptions import JudgeUnavailable
from .._groups import unwrap_group
from .._idset import IdSet
from .._judge.judge import Judge, complete, custom_id, merge_blocks
from .._records import Failure, Joined, Record
from ..engines._openai import chat_body
from ..engines._openai_batch import (
    ENDPOINT,
    BatchApiError,
    BatchClient,
    BatchStatus,
    LineError,
    refused_with,
)
from .batch_state import Builder, Entry, Pending, StateStore, new_token, pending_ids

__all__ = ["MAX_PENDING", "pending_ids", "run"]

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

log = logging.getLogger("streamfeedback.batch")

MAX_PENDING = 4
_MAX_POLL_ERRORS = 20
_FIND_SLACK_S = 600.0  # how far before its entry a batch may look created (clock skew)


async def run(
    judge: Judge,
    joined: Receiver[Joined],
    records: Sender[Record],
    failures: Sender[Failure],
    *,
    state_path: str,
    done: Container[str] = (),
    max_pending: int = MAX_PENDING,
    stopping: Callable[[], bool] = lambda: False,
    pass_over: bool = False,
) -> None:
    """Rate everything from `joined` through batches; closes `records` and `failures` at the end.

    `done` holds prompts already in the output: a resumed batch emits nothing for them.
    Once `stopping()`, no batch is submitted and none is waited for: batches still running
    stay in the state file, and the next run collects them. With `pass_over` (a spool keeps
    them for a rerun), prompts that arrive after the stop are passed over; without, they are
    submitted, as their responses exist nowhere else.

    :raises JudgeUnavailable: no key, a wrong key or URL (401/403/404), a batch that failed
        validation, or the API unreachable for too long.
    """
    async with joined, records, failures:
        rater = _BatchRater(
            judge, records, failures, state_path, done, max_pending, stopping, pass_over
        )
        try:
            await rater.start()
            async with anyio.create_task_group() as tg:
                for pending in rater.store.batches:
                    rater.slots.force()
                    tg.start_soon(rater.chain, pending, None, name=f"batch-{pending.id}")
                await rater.collect(joined, tg)
        except BaseExceptionGroup as group:
            raise unwrap_group(group) from None
        finally:
            await rater.close()


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


class _BatchRater:
    def __init__(
        self,
        judge: Judge,
        records: Sender[Record],
        failures: Sender[Failure],
        state_path: str,
        done: Container[str],
        max_pending: int,
        stopping: Callable[[], bool],
        pass_over: bool,
    ) -> None:
        self.judge = judge
        self.config = judge.config
        self.records = records
        self.failures = failures
        self.done = done
        self.slots = _Slots(max_pending)
        self.client = BatchClient(self.config, judge.label)
        self.base_url = self.client.base_url
        self.store = StateStore(state_path, self.base_url)
        self.covered = IdSet()
        self.builder: Builder | None = None
        self.last_input = time.monotonic()
        self._encoder = msgspec.json.Encoder()
        self.stopping = stopping
        self.pass_over = pass_over

    # -- setup ---------------------------------------------------------------------------

    async def start(self) -> None:
        await self.client.start()
        await anyio.to_thread.run_sync(self.store.load)
        await self._resolve()
        self.covered = await anyio.to_thread.run_sync(self.store.cover)

    async def close(self) -> None:
        if self.builder is not None:
            self.builder.discard()
            self.builder = None
        self.store.tidy()  # only when empty: sidecars of pending batches stay
        await self.client.aclose()

    # -- collecting ----------------------------------------------------------------------

    async def collect(self, joined: Receiver[Joined], tg: TaskGroup) -> None:
        """Fill batch files from the input; submit each as it fills, idles or ends."""
        cfg = self.config
        async with anyio.create_task_group() as timers:
            timers.start_soon(self._flush_when_idle, tg)
            async for item in joined:
                self.last_input = time.monotonic()
                pid = item.prompt.id
                if self._passing_over():
                    continue  # in the spool: a rerun submits it
                if pid in self.covered:
                    log.debug("%s is in a resumed batch; not submitted again", pid)
                    continue
                entry = Entry(joined=item, attempt=1, asked=list(self.judge.aspects))
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
                    self.builder = self.store.builder()
                self.builder.add(self._encoder.encode(entry) + b"\n", lines, requests, 1)
            timers.cancel_scope.cancel()
        if self.builder is not None and not self._passing_over():
            await self.slots.take()
            self._launch(tg)

    async def _flush_when_idle(self, tg: TaskGroup) -> None:
        idle = self.config.batch_poll_interval
        while True:
            await anyio.sleep(max(idle / 4, 0.01))
            if (
                self.builder is not None
                and not self._passing_over()
                and time.monotonic() - self.last_input >= idle
                and self.slots.try_take()
            ):
                self._launch(tg)

    def _passing_over(self) -> bool:
        """Stopped, with a spool that keeps what is not yet submitted for a rerun."""
        return self.pass_over and self.stopping()

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
            line = {"custom_id": cid, "method": "POST", "url": ENDPOINT, "body": body}
            out.append(self._encoder.encode(line) + b"\n")
        return b"".join(out)

    # -- one chain: a batch and its follow-ups -------------------------------------------

    async def chain(self, pending: Pending | None, builder: Builder | None) -> None:
        try:
            if builder is not None:
                pending = await self._submit(builder, replaces=None)
            while pending is not None:
                batch = await self._wait(pending)
                if batch is None:
                    log.info(
                        "batch %s is left running at %s: the same command collects it",
                        pending.id,
                        self.base_url,
                    )
                    return
                pending = await self._finish(pending, batch)
        finally:
            self.slots.give()

    async def _submit(self, builder: Builder, *, replaces: Pending | None) -> Pending:
        """Upload the file, record the batch-to-be (replacing `replaces`), then create it."""
        await anyio.to_thread.run_sync(builder.close)
        try:
            file_id = await self.client.upload(builder.requests_path)
        except BaseException:
            builder.discard()
            raise
        builder.requests_path.unlink(missing_ok=True)
        creating = Pending(
            id="",
            sidecar=builder.sidecar,
            input_file_id=file_id,
            prompts=builder.prompts,
            requests=builder.requests,
            attempt=builder.attempt,
            submitted_at=time.time(),
            token=new_token(),
        )
        await self.store.save(add=creating, remove=replaces)
        builder.recorded = True
        return await self._create(creating)

    async def _create(self, creating: Pending) -> Pending:
        """Create the batch of a recorded, uploaded file; record its id."""
        batch_id = await self.client.create(
            creating.input_file_id,
            {"source": "streamfeedback", "sidecar": creating.sidecar, "token": creating.token},
        )
        pending = msgspec.structs.replace(creating, id=batch_id)
        await self.store.save(add=pending, remove=creating, keep_sidecar=True)
        log.info(
            "batch %s submitted: %d requests for %d prompts%s",
            batch_id,
            pending.requests,
            pending.prompts,
            f" (re-asks, attempt {pending.attempt})" if pending.attempt > 1 else "",
        )
        return pending

    async def _resolve(self) -> None:
        """Entries the last run saved but never heard back about: adopt the batch the server
        made for them, else create it now; drop one only if its uploaded file is gone."""
        for creating in [p for p in self.store.batches if not p.id]:
            found = await self._find(creating)
            if found is not None:
                pending = msgspec.structs.replace(creating, id=found)
                await self.store.save(add=pending, remove=creating, keep_sidecar=True)
                log.warning(
                    "batch %s was created just before the last run stopped; resuming it", found
                )
                continue
            try:
                await self._create(creating)
            except JudgeUnavailable as exc:
                if refused_with(exc) not in (400, 404) or await self.client.file_exists(
                    creating.input_file_id
                ):
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

    async def _rebuild(self, creating: Pending) -> None:
        """Write and submit an unsubmitted batch again from its sidecar (no prompt is lost
        with its uploaded file: the sidecar holds every joined prompt)."""
        builder = self.store.builder()
        try:
            async with contextlib.aclosing(self.store.entries(creating)) as entries:
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
        await self.store.save(add=None, remove=creating)

    async def _find(self, creating: Pending) -> str | None:
        """The id of the batch the entry's create call made, if the server has one."""
        try:
            return await self.client.find(
                creating.token, since=creating.submitted_at - _FIND_SLACK_S
            )
        except JudgeUnavailable as exc:
            if refused_with(exc) != 404:
                raise
            log.warning(
                "%s does not list batches: cannot tell whether the last run created the "
                "batch of %s; creating it (it may be paid for twice)",
                self.base_url,
                creating.sidecar,
            )
            return None

    async def _wait(self, pending: Pending) -> BatchStatus | None:
        """Poll until the batch ends (None: the run stopped first); passing API errors are
        logged and polled through."""
        status = None
        errors = 0
        while True:
            try:
                batch = await self.client.poll(pending.id)
            except BatchApiError as exc:
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
                    log.info(
                        "batch %s: %s (%d of %d requests done, %d failed)",
                        pending.id,
                        status,
                        batch.completed or 0,
                        pending.requests if batch.total is None else batch.total,
                        batch.failed or 0,
                    )
                if batch.ended:
                    return batch
            if await self._stopped_within(self.config.batch_poll_interval):
                return None

    async def _stopped_within(self, seconds: float) -> bool:
        """Sleep `seconds`, cut short by a stop (a batch may take hours); whether it was."""
        until = time.monotonic() + seconds
        while not self.stopping():
            left = until - time.monotonic()
            if left <= 0:
                return False
            await anyio.sleep(min(left, 0.2))
        return True

    async def _finish(self, pending: Pending, batch: BatchStatus) -> Pending | None:
        """Emit what an ended batch settled; returns the follow-up batch of re-asks, if any."""
        if batch.status == "failed":
            return await self._failed(pending, batch)
        results = await self.client.results(batch)
        follow = self.store.builder()
        emitted = failed = skipped = 0
        try:
            async with contextlib.aclosing(self.store.entries(pending)) as entries:
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
        await self.store.save(add=None, remove=pending)
        return None

    def _settle(self, entry: Entry, results: dict[str, str | LineError]) -> Record | str | Entry:
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
                result = LineError(True, "the batch output has no line for this request")
            if not result.retryable or last:
                tries = f" after {entry.attempt} attempts" if entry.attempt > 1 else ""
                return f"judge {self.judge.label} ({aspect}){tries}: {result.message}"
            blocks[aspect] = earlier
            again.append(aspect)
        if again:
            return Entry(
                joined=joined,
                attempt=entry.attempt + 1,
                asked=again,
                blocks=blocks,
                attempts={a: k for a, k in attempts.items() if a not in again},
            )
        return self.judge.assemble(joined, blocks, attempts)

    async def _failed(self, pending: Pending, batch: BatchStatus) -> Pending | None:
        """A batch the API refused as a whole: over the enqueued-token limit (wait, submit
        the same file again), or invalid (every batch would be: stop)."""
        errors = batch.errors
        codes = {e.code for e in errors}
        if errors and codes <= {"token_limit_exceeded"}:
            log.warning(
                "batch %s: over the enqueued-token limit; submitting it again in %gs",
                pending.id,
                self.config.batch_poll_interval,
            )
            if await self._stopped_within(self.config.batch_poll_interval):
                log.info("batch %s: the same command submits it again", pending.id)
                return None
            creating = msgspec.structs.replace(
                pending, id="", submitted_at=time.time(), token=new_token()
            )
            await self.store.save(add=creating, remove=pending, keep_sidecar=True)
            return await self._create(creating)
        detail = "; ".join(
            f"line {e.line}: {e.message}" if e.line else str(e.message) for e in errors[:3]
        )
        await self.store.save(add=None, remove=pending)
        raise JudgeUnavailable(
            f"judge {self.judge.label}: batch {pending.id} failed at {self.base_url}: "
            f"{self.client.scrub(detail) or 'no reason given'}"
        )

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
