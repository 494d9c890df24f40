"""The spool: a durable log of generated prompts between gather and rating.

Every joined prompt (its responses, models and per-generation metadata) is appended to an
NDJSON file before the judge sees it. The judge reads the log through a cursor: from memory
while it keeps up, from the file when it falls behind. So generation runs at engine speed
whatever the judge does, memory stays bounded (a small cache plus one read chunk), and a
crash after generation loses nothing: a rerun rates what the spool holds instead of
generating it again.

Schema (one JSON object per line, `v` = 1; fields with default values are omitted):
    {"v": 1, "id": str, "instruction": str, "line": int?, "index": int,
     "generations": [{"model": str, "text": str, "completion_tokens": int,
                      "prompt_tokens": int, "finish_reason": str?, "latency_s": float,
                      "principle": str?, "replaced": str?, "replaced_because": str?}, ...]}
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator
from typing import BinaryIO

import anyio
import anyio.to_thread
import msgspec

from .._channels import Receiver, Sender
from .._exceptions import SinkError, SourceError
from .._idset import IdSet
from .._records import Generation, Joined, Prompt
from .sink import scan_ids

__all__ = ["Spool", "SpoolEntry", "SpoolGeneration", "read_spool", "scan_spool"]

log = logging.getLogger("streamfeedback.spool")

_CHUNK = 1 << 20


class SpoolGeneration(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    model: str
    text: str
    completion_tokens: int = 0
    prompt_tokens: int = 0
    finish_reason: str | None = None
    latency_s: float = 0.0
    principle: str | None = None
    replaced: str | None = None
    replaced_because: str | None = None


class SpoolEntry(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    v: int = 1
    id: str
    instruction: str
    line: int | None = None
    index: int = 0
    generations: list[SpoolGeneration]

    @classmethod
    def from_joined(cls, joined: Joined) -> SpoolEntry:
        p = joined.prompt
        return cls(
            id=p.id,
            instruction=p.instruction,
            line=p.line,
            index=p.index,
            generations=[
                SpoolGeneration(
                    model=g.model,
                    text=g.text,
                    completion_tokens=g.completion_tokens,
                    prompt_tokens=g.prompt_tokens,
                    finish_reason=g.finish_reason,
                    latency_s=g.latency_s,
                    principle=g.principle,
                    replaced=g.replaced,
                    replaced_because=g.replaced_because,
                )
                for g in joined.generations
            ],
        )

    def to_joined(self) -> Joined:
        prompt = Prompt(id=self.id, instruction=self.instruction, line=self.line, index=self.index)
        models = tuple(g.model for g in self.generations)
        return Joined(
            prompt=prompt,
            generations=[
                Generation(
                    prompt=prompt,
                    models=models,
                    slot=i,
                    model=g.model,
                    text=g.text,
                    completion_tokens=g.completion_tokens,
                    prompt_tokens=g.prompt_tokens,
                    finish_reason=g.finish_reason,
                    latency_s=g.latency_s,
                    principle=g.principle,
                    replaced=g.replaced,
                    replaced_because=g.replaced_because,
                )
                for i, g in enumerate(self.generations)
            ],
        )


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(SpoolEntry)


def scan_spool(path: str, *, repair: bool = True) -> tuple[IdSet, int, int]:
    """Ids already spooled, the number of entries, and the bytes of a torn last line cut off."""
    return scan_ids(path, repair=repair)


def _read_chunk(fh: BinaryIO, offset: int) -> bytes:
    fh.seek(offset)
    return fh.read(_CHUNK)


def _entries(path: str, chunk: bytes, offset: int) -> Iterator[tuple[int, SpoolEntry | None]]:
    """(size, entry) for each whole line of `chunk`; None for a line that does not decode."""
    start = 0
    while True:
        end = chunk.find(b"\n", start)
        if end < 0:
            return
        line = chunk[start : end + 1]
        try:
            entry: SpoolEntry | None = _decoder.decode(line)
        except msgspec.DecodeError as exc:
            where = offset + start
            log.warning("%s: byte %d: unreadable spool line skipped (%s)", path, where, exc)
            entry = None
        yield len(line), entry
        start = end + 1


class Spool:
    """An append-only spool file with a cursor for the judge.

    `write` (the writer task) appends and `read` (the reader task) follows; both belong to
    the pipeline's task group. `done` ids (already in the output) are skipped when read, and
    so are entries of earlier runs whose source ordinal `keep(index)` refuses (a rerun with a
    smaller `--limit`, another shard).
    """

    def __init__(
        self,
        path: str,
        *,
        cache: int = 1024,
        done: IdSet | None = None,
        keep: Callable[[int], bool] | None = None,
    ) -> None:
        self.path = path
        self.cache_limit = cache
        self.done = done or IdSet()
        self.keep = keep
        self._cache: OrderedDict[int, tuple[int, Joined]] = OrderedDict()
        self._end = 0
        self._initial_end = 0
        self._writer_done = False
        self._grew = anyio.Event()
        self.appended = 0
        self.read_from_file = 0
        self.read_from_memory = 0

    async def write(self, joined: Receiver[Joined], *, batch: int = 256) -> None:
        """Append everything from `joined`; batches what is already waiting into one write."""
        parent = os.path.dirname(self.path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        try:
            fh = await anyio.to_thread.run_sync(open, self.path, "ab")
        except OSError as exc:
            raise SinkError(f"{self.path}: cannot open the spool: {exc.strerror}") from exc
        self._end = self._initial_end = await anyio.to_thread.run_sync(os.path.getsize, self.path)
        self._notify()
        buf = bytearray()
        try:
            async with joined:
                async for first in joined:
                    items = [first]
                    while len(items) < batch:
                        try:
                            items.append(joined.receive_nowait())
                        except (anyio.WouldBlock, anyio.EndOfStream):
                            break
                    buf.clear()
                    sizes = []
                    for item in items:
                        start = len(buf)
                        _encoder.encode_into(SpoolEntry.from_joined(item), buf, start)
                        buf.extend(b"\n")
                        sizes.append(len(buf) - start)
                    data = bytes(buf)
                    with anyio.CancelScope(shield=True):
                        try:
                            await anyio.to_thread.run_sync(_write_flush, fh, data)
                        except OSError as exc:
                            raise SinkError(
                                f"{self.path}: cannot write the spool: {exc.strerror}"
                            ) from exc
                    offset = self._end
                    for item, size in zip(items, sizes, strict=True):
                        self._cache[offset] = (size, item)
                        offset += size
                    self._end = offset
                    self.appended += len(items)
                    while len(self._cache) > self.cache_limit:
                        self._cache.popitem(last=False)
                    self._notify()
        finally:
            self._writer_done = True
            self._notify()
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(fh.close)

    def finish(self) -> None:
        """No writer for this run: read what the file holds, then end."""
        self._writer_done = True
        self._end = os.path.getsize(self.path) if os.path.exists(self.path) else 0
        self._initial_end = self._end
        self._notify()

    def _notify(self) -> None:
        self._grew.set()
        self._grew = anyio.Event()

    async def read(self, out: Sender[Joined]) -> None:
        """Feed the judge from the start of the file, following the writer; closes `out`."""
        seen = IdSet()
        cursor = 0
        fh: BinaryIO | None = None
        try:
            async with out:
                while True:
                    if cursor >= self._end:
                        if self._writer_done and cursor >= self._end:
                            return
                        await self._grew.wait()
                        continue
                    cached = self._cache.pop(cursor, None)
                    if cached is not None:
                        size, joined = cached
                        cursor += size
                        self.read_from_memory += 1
                        if self._fresh(joined.prompt.id, seen, cursor - size, joined.prompt.index):
                            await out.send(joined)
                        continue
                    if fh is None:
                        fh = await anyio.to_thread.run_sync(open, self.path, "rb")
                    chunk = await anyio.to_thread.run_sync(_read_chunk, fh, cursor)
                    chunk = chunk[: max(0, self._end - cursor)]
                    if b"\n" not in chunk:
                        raise SourceError(self.path, None, f"unterminated spool line at {cursor}")
                    for size, entry in _entries(self.path, chunk, cursor):
                        self._cache.pop(cursor, None)
                        cursor += size
                        if entry is None:
                            continue
                        self.read_from_file += 1
                        if self._fresh(entry.id, seen, cursor - size, entry.index):
                            await out.send(entry.to_joined())
                    for stale in [k for k in self._cache if k < cursor]:
                        del self._cache[stale]
        finally:
            if fh is not None:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(fh.close)

    def _fresh(self, prompt_id: str, seen: IdSet, offset: int, index: int) -> bool:
        """Not rated yet. Only entries from earlier runs can repeat an id (this run's intake
        never spools a prompt twice), so only those are remembered: memory stays flat."""
        if prompt_id in self.done:
            return False
        if offset >= self._initial_end:
            return True
        return (self.keep is None or self.keep(index)) and seen.add(prompt_id)


def _write_flush(fh: BinaryIO, data: bytes) -> None:
    fh.write(data)
    fh.flush()


async def read_spool(path: str) -> AsyncIterator[Joined]:
    """Every entry of a finished spool file, in order (for tests and tools)."""
    with open(path, "rb") as fh:  # noqa: ASYNC230 - small reads, tests and tools only
        offset = 0
        while chunk := fh.read(_CHUNK):
            cut = chunk.rfind(b"\n") + 1
            for size, entry in _entries(path, chunk[:cut], offset):
                offset += size
                if entry is not None:
                    yield entry.to_joined()
            fh.seek(offset)
            if cut == 0:
                break
