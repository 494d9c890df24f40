"""The spool: a durable log of generations between the generators and the judge.

Every generation is appended to an NDJSON file the moment it arrives, whether or not the
prompt's other responses are in yet; the judge reads the log through a cursor that joins a
prompt's responses and hands it on once the last one is read: from memory while the judge
keeps up, from the file when it falls behind. So generation runs at engine speed whatever the
judge does, memory stays bounded (a small cache, the prompts in flight and one read chunk),
and a kill loses at most the requests in flight: a rerun rates what the spool holds and asks
only for the responses it lacks.

The run that writes a spool holds an exclusive lock on it for its whole life (`_files.hold`),
and `rate` holds a shared one, so a torn last line is cut only when no one can be writing it.

Schema (one JSON object per line; fields with default values are omitted). A line is about
one prompt, `id`; a prompt's first line names it and the models it was routed to, and every
line may carry generations, each with its slot (its model's place in `models`). A prompt is
complete, and goes to the judge, once it has a generation for every slot:

    v2: {"v": 2, "id": str, "instruction": str?, "line": int?, "index": int?, "models": [str]?,
         "generations": [{"slot": int, "model": str, "text": str, "completion_tokens": int,
                          "prompt_tokens": int, "finish_reason": str?, "latency_s": float,
                          "principle": str?, "replaced": str?, "replaced_because": str?}]}

    v1 (no "v", still read): a whole prompt per line, with every generation; a generation's
    slot is its position and `models` are the generations' own models.

Readers ignore fields they do not know, so a later version may add some and still be read
here; a line that does not decode is skipped with a warning, never a reason to stop.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import BinaryIO

import anyio
import anyio.to_thread
import msgspec

from .._channels import Receiver, Sender
from .._exceptions import SinkError
from .._files import append_whole, read_lines
from .._idset import IdSet
from .._records import Generation, Joined, Prompt, Response

__all__ = [
    "VERSION",
    "Resumed",
    "Spool",
    "SpoolEntry",
    "SpoolGeneration",
    "SpoolScan",
    "read_spool",
    "scan_spool",
]

log = logging.getLogger("streamfeedback.spool")

VERSION = 2

Resumed = Mapping[str, tuple[tuple[str, ...], frozenset[int]]]
"""Prompts an earlier run spooled in part: id -> (routed models, slots already spooled)."""

_RESPONSE_FIELDS = Response.__struct_fields__


class SpoolGeneration(Response, frozen=True, kw_only=True, omit_defaults=True):
    """One generation in the spool: a `Response` and its slot (v1: absent, the position)."""

    slot: int | None = None


class SpoolEntry(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One line of the spool (see the module docstring)."""

    v: int = 1
    id: str
    instruction: str | None = None
    line: int | None = None
    index: int = 0
    models: list[str] | None = None
    generations: list[SpoolGeneration] = []

    @classmethod
    def of(cls, gen: Generation, *, first: bool) -> SpoolEntry:
        """The line for one generation; the `first` of its prompt also names the prompt."""
        spooled = SpoolGeneration(slot=gen.slot, **{f: getattr(gen, f) for f in _RESPONSE_FIELDS})
        if not first:
            return cls(v=VERSION, id=gen.prompt.id, generations=[spooled])
        p = gen.prompt
        return cls(
            v=VERSION,
            id=p.id,
            instruction=p.instruction,
            line=p.line,
            index=p.index,
            models=list(gen.models),
            generations=[spooled],
        )

    @classmethod
    def from_joined(cls, joined: Joined) -> SpoolEntry:
        """A whole prompt in one line."""
        first = cls.of(joined.generations[0], first=True)
        rest = [cls.of(g, first=False).generations[0] for g in joined.generations[1:]]
        return msgspec.structs.replace(first, generations=[*first.generations, *rest])

    @property
    def prompt(self) -> Prompt | None:
        """The prompt this line names, if it is the prompt's first line."""
        if self.instruction is None:
            return None
        return Prompt(id=self.id, instruction=self.instruction, line=self.line, index=self.index)

    @property
    def routed(self) -> tuple[str, ...]:
        """The prompt's routed models (v1: its generations' own)."""
        if self.models is not None:
            return tuple(self.models)
        return tuple(g.model for g in self.generations)

    def slots(self) -> Iterator[tuple[int, SpoolGeneration]]:
        for i, g in enumerate(self.generations):
            yield (i if g.slot is None else g.slot), g

    def to_joined(self) -> Joined:
        """A whole prompt's line (v1, or `from_joined`) as the judge takes it."""
        prompt = self.prompt
        assert prompt is not None, "not a prompt's first line"
        models = self.routed
        return Joined(
            prompt=prompt,
            generations=[_generation(prompt, models, slot, g) for slot, g in self.slots()],
        )


def _generation(
    prompt: Prompt, models: tuple[str, ...], slot: int, g: SpoolGeneration
) -> Generation:
    return Generation(
        prompt=prompt, models=models, slot=slot, **{f: getattr(g, f) for f in _RESPONSE_FIELDS}
    )


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(SpoolEntry)


class _ScanGeneration(msgspec.Struct):
    model: str
    slot: int | None = None


class _ScanEntry(msgspec.Struct):
    """A spool line without its texts: what a resume needs to know."""

    id: str
    v: int = 1
    models: list[str] | None = None
    generations: list[_ScanGeneration] = []


_scan_decoder = msgspec.json.Decoder(_ScanEntry)


class SpoolScan(msgspec.Struct, frozen=True, kw_only=True):
    """What a spool file holds: complete prompts, prompts spooled in part, a torn tail cut,
    and its number of lines (whole or not)."""

    complete: IdSet
    partial: dict[str, tuple[tuple[str, ...], frozenset[int]]]
    torn: int
    lines: int = 0


def scan_spool(path: str, *, repair: bool = True) -> SpoolScan:
    """Read a spool's ids and slots (not its texts); cut a torn last line when `repair`.

    Only the holder of the spool's exclusive lock may repair: another writer's line in
    progress looks torn too.
    """
    complete = IdSet()
    partial: dict[str, tuple[tuple[str, ...], set[int]]] = {}
    torn = lines = 0
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        return SpoolScan(complete=complete, partial={}, torn=0)
    with fh:
        size = os.fstat(fh.fileno()).st_size
        for raw in fh:
            if not raw.endswith(b"\n"):
                torn = len(raw)
                break
            lines += 1
            try:
                entry = _scan_decoder.decode(raw)
            except msgspec.DecodeError:
                continue
            if entry.v == 1:
                complete.add(entry.id)
                partial.pop(entry.id, None)
                continue
            if entry.id in complete:
                continue
            known = partial.get(entry.id)
            if entry.models is not None and (known is None or known[0] != tuple(entry.models)):
                known = partial[entry.id] = (tuple(entry.models), set())
            if known is None:
                continue
            models, slots = known
            slots.update(i if g.slot is None else g.slot for i, g in enumerate(entry.generations))
            if len(slots) >= len(models):
                complete.add(entry.id)
                del partial[entry.id]
    if torn and repair:
        os.truncate(path, size - torn)
    return SpoolScan(
        complete=complete,
        partial={k: (models, frozenset(slots)) for k, (models, slots) in partial.items()},
        torn=torn,
        lines=lines,
    )


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


_Pending = tuple[Prompt, tuple[str, ...], list[Generation | None], list[int]]
"""A prompt being joined: the prompt, its routed models, a slot per model, how many missing."""


class _Joiner:
    """Joins the spool's generations by prompt, in file order; skips `done` and `dropped`
    prompts. `fresh_from` is where this run's lines begin: only prompts completed before it
    (by earlier runs) can complete twice, so only their ids are remembered."""

    def __init__(
        self,
        done: IdSet,
        dropped: IdSet,
        fresh_from: int,
        keep: Callable[[int], bool] | None = None,
    ) -> None:
        self.done = done
        self.dropped = dropped
        self.fresh_from = fresh_from
        self.keep = keep
        self.pending: dict[str, _Pending] = {}
        self._seen = IdSet()

    def entry(self, entry: SpoolEntry, offset: int) -> Iterator[Joined]:
        prompt = entry.prompt
        if prompt is not None:
            self._open(prompt, entry.routed)
        known = self.pending.get(entry.id)
        if known is None:
            return
        prompt, models = known[0], known[1]
        for slot, g in entry.slots():
            joined = self._fill(entry.id, slot, _generation(prompt, models, slot, g), offset)
            if joined is not None:
                yield joined

    def generation(self, gen: Generation, offset: int) -> Joined | None:
        self._open(gen.prompt, gen.models)
        return self._fill(gen.prompt.id, gen.slot, gen, offset)

    def _open(self, prompt: Prompt, models: tuple[str, ...]) -> None:
        key = prompt.id
        known = self.pending.get(key)
        if known is not None and known[1] == models:
            return
        if key in self.done or key in self.dropped:
            return
        # new, or routed anew by a run that could not use the old routing: start over
        self.pending[key] = (prompt, models, [None] * len(models), [len(models)])

    def _fill(self, key: str, slot: int, gen: Generation, offset: int) -> Joined | None:
        known = self.pending.get(key)
        if known is not None and key in self.dropped:  # given up by this run meanwhile
            del self.pending[key]
            return None
        if known is None or not 0 <= slot < len(known[2]) or known[2][slot] is not None:
            return None
        prompt, _, slots, missing = known
        slots[slot] = gen
        missing[0] -= 1
        if missing[0]:
            return None
        del self.pending[key]
        if offset < self.fresh_from and (
            (self.keep is not None and not self.keep(prompt.index)) or not self._seen.add(key)
        ):
            return None
        return Joined(prompt=prompt, generations=[g for g in slots if g is not None])


class Spool:
    """An append-only spool file with a cursor for the judge.

    `write` (the writer task) appends and `read` (the reader task) follows; both belong to
    the pipeline's task group. `done` prompts (already in the output) are not read, and
    neither are prompts of earlier runs whose source ordinal `keep(index)` refuses (a rerun
    with a smaller `--limit`, another shard); `resumed` prompts have their first line in the
    file already.
    """

    def __init__(
        self,
        path: str,
        *,
        cache: int = 1024,
        done: IdSet | None = None,
        resumed: Resumed | None = None,
        keep: Callable[[int], bool] | None = None,
    ) -> None:
        self.path = path
        self.cache_limit = cache
        self.done = done or IdSet()
        self.keep = keep
        self._dropped = IdSet()
        self._cache: OrderedDict[int, tuple[int, Generation]] = OrderedDict()
        self._open: dict[str, int] = {
            key: len(models) - len(slots) for key, (models, slots) in (resumed or {}).items()
        }
        self._end = 0
        self._initial_end = 0
        self._writer_done = False
        self._grew = anyio.Event()
        self.appended = 0
        self.lines_written = 0
        self.read_from_file = 0
        self.read_from_memory = 0

    def drop(self, prompt_id: str) -> None:
        """This run gave the prompt up (a generation failed for good): stop waiting for it.
        Its spooled generations stay in the file, for a rerun."""
        self._dropped.add(prompt_id)
        self._open.pop(prompt_id, None)

    async def write(self, generations: Receiver[Generation], *, batch: int = 256) -> None:
        """Append every generation as it comes; batches what is already waiting into one
        write. A write that fails (a full disk) is rolled back to the last whole line.

        :raises SinkError: the spool cannot be written.
        """
        try:
            fd = await anyio.to_thread.run_sync(_open_append, self.path)
        except OSError as exc:
            raise SinkError(f"{self.path}: cannot open the spool: {exc.strerror}") from exc
        self._end = self._initial_end = os.fstat(fd).st_size
        self._notify()
        buf = bytearray()
        try:
            async with generations:
                async for first in generations:
                    items = [first]
                    while len(items) < batch:
                        try:
                            items.append(generations.receive_nowait())
                        except (anyio.WouldBlock, anyio.EndOfStream):
                            break
                    buf.clear()
                    sizes = []
                    for item in items:
                        start = len(buf)
                        _encoder.encode_into(self._line(item), buf, start)
                        buf.extend(b"\n")
                        sizes.append(len(buf) - start)
                    data = bytes(buf)
                    with anyio.CancelScope(shield=True):
                        try:
                            await anyio.to_thread.run_sync(append_whole, fd, data, self._end)
                        except OSError as exc:
                            raise SinkError(
                                f"{self.path}: cannot write the spool: {exc.strerror}"
                            ) from exc
                    offset = self._end
                    for item, size in zip(items, sizes, strict=True):
                        self._cache[offset] = (size, item)
                        offset += size
                    self._end = offset
                    self.lines_written += len(items)
                    while len(self._cache) > self.cache_limit:
                        self._cache.popitem(last=False)
                    self._notify()
        finally:
            self._writer_done = True
            self._notify()
            os.close(fd)

    def _line(self, gen: Generation) -> SpoolEntry:
        """The line for `gen`; counts the prompt as spooled when it is its last response."""
        key = gen.prompt.id
        known = self._open.pop(key, None)
        first = known is None
        missing = (len(gen.models) if known is None else known) - 1
        if missing > 0 and key not in self._dropped:
            self._open[key] = missing
        elif missing == 0:
            self.appended += 1
        return SpoolEntry.of(gen, first=first)

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
        joiner: _Joiner | None = None
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
                    if joiner is None:  # the writer has opened the file: its size is known
                        joiner = _Joiner(self.done, self._dropped, self._initial_end, self.keep)
                    cached = self._cache.pop(cursor, None)
                    if cached is not None:
                        size, gen = cached
                        self.read_from_memory += 1
                        joined = joiner.generation(gen, cursor)
                        cursor += size
                        if joined is not None:
                            await out.send(joined)
                        continue
                    if fh is None:
                        fh = await anyio.to_thread.run_sync(open, self.path, "rb")
                    chunk = await anyio.to_thread.run_sync(read_lines, fh, cursor, self._end)
                    if not chunk:
                        log.warning(
                            "%s: byte %d: a torn last line (%d bytes) left unread",
                            self.path,
                            cursor,
                            self._end - cursor,
                        )
                        return
                    for size, entry in _entries(self.path, chunk, cursor):
                        self._cache.pop(cursor, None)
                        self.read_from_file += 1  # a line that does not decode is read too
                        if entry is not None:
                            for joined in joiner.entry(entry, cursor):
                                await out.send(joined)
                        cursor += size
                    for stale in [k for k in self._cache if k < cursor]:
                        del self._cache[stale]
        finally:
            if fh is not None:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(fh.close)


def _open_append(path: str) -> int:
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


async def read_spool(path: str) -> AsyncIterator[Joined]:
    """Every complete prompt of a finished spool file, in order (for tests and tools)."""
    joiner = _Joiner(IdSet(), IdSet(), 0)
    with open(path, "rb") as fh:  # noqa: ASYNC230 - small reads, tests and tools only
        end = os.fstat(fh.fileno()).st_size
        offset = 0
        while chunk := read_lines(fh, offset, end):
            for size, entry in _entries(path, chunk, offset):
                if entry is not None:
                    for joined in joiner.entry(entry, offset):
                        yield joined
                offset += size
