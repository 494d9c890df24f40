"""Sink: NDJSON lines to stdout or a file, whole lines only, flushed as records are ready.

Records waiting in the channel are written together (one encode into a reused buffer, one
write, one flush), so a fast pipeline is not bound by a syscall per record, and a slow one
still sees every record on disk as soon as it exists. Writes run in a worker thread and are
not abandoned on cancel, so a Ctrl-C never leaves half a line; a write that fails (a full
disk) is rolled back to the last whole line.

`write_failures` is the run's failures sink: every `Failure` the stages report, to the
failures file.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import AsyncIterator, Callable
from types import TracebackType
from typing import Any, Protocol

import anyio
import anyio.to_thread
import msgspec

from .._channels import Receiver
from .._exceptions import SinkError
from .._files import append_whole, cut_torn_tail, is_regular
from .._idset import IdSet
from .._records import Failure

__all__ = ["Batchable", "NdjsonWriter", "drain", "read_done_ids", "scan_ids", "write_failures"]

log = logging.getLogger("streamfeedback.sink")

_encoder = msgspec.json.Encoder()


class _IdOnly(msgspec.Struct):
    id: str


_id_decoder = msgspec.json.Decoder(_IdOnly)


class NdjsonWriter:
    """Appends msgspec Structs as NDJSON lines to `path` ("-" is stdout).

    A file's torn last line (a kill mid-write) is cut on opening, and a write that fails half
    way is rolled back, so every line of the file is whole. Whoever opens a shared file holds
    its lock (`_files.hold`) first: the cut must not meet another writer's line in progress.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None
        self._end: int | None = None
        self._buffer = bytearray()
        self.lines = 0

    async def __aenter__(self) -> NdjsonWriter:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def open(self) -> None:
        if self._fd is not None:
            return
        if self.path == "-":
            self._fd = sys.stdout.fileno()
            return
        self._fd, self._end = await anyio.to_thread.run_sync(self._open_file)

    def _open_file(self) -> tuple[int, int | None]:
        try:
            parent = os.path.dirname(self.path)
            if parent:
                os.makedirs(parent, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            raise SinkError(f"{self.path}: cannot open for writing: {exc.strerror}") from exc
        try:
            if not is_regular(fd):
                return fd, None
            torn = cut_torn_tail(fd)
            if torn:
                log.warning(
                    "%s: cut a torn last line (%d bytes) left by an interrupted run",
                    self.path,
                    torn,
                )
            return fd, os.fstat(fd).st_size
        except OSError as exc:
            os.close(fd)
            raise SinkError(f"{self.path}: cannot open for writing: {exc.strerror}") from exc

    async def write_many(self, items: list[Any]) -> None:
        """Write every item as one line; all of them or, on error, none.

        :raises SinkError: the output is gone (closed pipe, full disk).
        """
        if self._fd is None:
            await self.open()
        assert self._fd is not None
        buf = self._buffer
        buf.clear()
        for item in items:
            start = len(buf)
            _encoder.encode_into(item, buf, start)
            buf.extend(b"\n")
        data = bytes(buf)
        try:
            await anyio.to_thread.run_sync(append_whole, self._fd, data, self._end)
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise SinkError(f"{self._name}: the reader went away", reader_gone=True) from exc
        except OSError as exc:
            raise SinkError(f"{self._name}: cannot write: {exc.strerror}") from exc
        if self._end is not None:
            self._end += len(data)
        self.lines += len(items)

    @property
    def _name(self) -> str:
        return "stdout" if self.path == "-" else self.path

    async def aclose(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None and self.path != "-":
            os.close(fd)


class Batchable(Protocol):
    """A receive stream that can also hand over what is already waiting."""

    def __aiter__(self) -> AsyncIterator[Any]: ...

    def receive_nowait(self) -> Any: ...


async def drain(
    stream: Batchable,
    writer: NdjsonWriter,
    *,
    batch: int = 1024,
    on_write: Callable[[int], None] | None = None,
) -> int:
    """Write everything `stream` yields, batching what is already waiting. Returns lines written.

    A batch taken off the stream is written whole even under cancellation (shielded), so
    nothing received is dropped; `on_write(n)` is told after each batch.
    """
    written = 0
    async for first in stream:
        items = [first]
        while len(items) < batch:
            try:
                items.append(stream.receive_nowait())
            except (anyio.WouldBlock, anyio.EndOfStream):
                break
        with anyio.CancelScope(shield=True):
            await writer.write_many(items)
        written += len(items)
        if on_write is not None:
            on_write(len(items))
    return written


async def write_failures(
    failures: Receiver[Failure], path: str, *, on_write: Callable[[int], None]
) -> None:
    """The failures sink: drain `failures` to the NDJSON file `path`; `on_write(n)` counts."""
    writer = NdjsonWriter(path)
    try:
        async with failures:
            try:
                await drain(failures, writer, on_write=on_write)
            finally:
                # A run cut short (a dead judge, the drain timeout) still records every
                # failure already reported, so the summary and the file agree.
                left = _waiting(failures)
                if left:
                    with anyio.CancelScope(shield=True):
                        await writer.write_many(left)
                    on_write(len(left))
    finally:
        with anyio.CancelScope(shield=True):
            await writer.aclose()


def _waiting(stream: Receiver[Failure]) -> list[Failure]:
    """What a channel holds now, without waiting."""
    items: list[Failure] = []
    while True:
        try:
            items.append(stream.receive_nowait())
        except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
            return items


def scan_ids(path: str, *, repair: bool = True) -> tuple[IdSet, int, int]:
    """Ids in an append-only NDJSON file (output or spool), how many lines held one, and how
    many bytes of a torn last line were cut.

    A crash mid-write can leave a last line without its newline; that line is not a record,
    so it is cut off (when `repair`) and its prompt will be redone. Lines that do not decode
    are left in place and not counted.
    """
    ids = IdSet()
    lines = torn = 0
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        return ids, 0, 0
    with open(path, "rb") as fh:
        for line in fh:
            if not line.endswith(b"\n"):
                torn = len(line)
                break
            try:
                ids.add(_id_decoder.decode(line).id)
            except msgspec.DecodeError:
                continue
            lines += 1
    if torn and repair:
        with open(path, "r+b") as fh:
            fh.truncate(size - torn)
    return ids, lines, torn


def read_done_ids(path: str, *, repair: bool = True) -> tuple[IdSet, int]:
    """Ids already in an output file, and the bytes of a torn last line cut off."""
    ids, _, torn = scan_ids(path, repair=repair)
    return ids, torn
