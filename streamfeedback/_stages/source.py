"""The source stage: prompts from a file, stdin, a `datasets` dataset or the caller's code, as an
async iterator.

`open_source` is a coroutine: it does every check that can be made before the first row
(the file exists, the format is known, the column is there, the top of the file decodes) and
raises `SourceError` then, so a bad input stops the run before any engine starts. What it
returns, a `PromptSource`, yields `Prompt`s and, for rows that cannot become one, a
`SourceProblem`: bad rows are reported, never dropped, and never stop the rest.

Memory stays bounded however long the source: rows are read and decoded in a worker thread
about 1 MiB or a few thousand rows per hop, so the event loop never blocks on a read. The one
exception is a `.json` file holding a JSON array, which is loaded whole.

Prompts passed in code (`from_code`) pass the same row checks as rows from a file.
"""

from __future__ import annotations

import csv
import io
import sys
import threading
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
)
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Protocol, TypeVar

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread
import msgspec

from .._config import SourceConfig
from .._exceptions import SourceError
from .._records import Prompt, stable_id

__all__ = [
    "PromptInput",
    "PromptSource",
    "SourceItem",
    "SourceProblem",
    "from_code",
    "open_source",
]

_T = TypeVar("_T")

_CHUNK_BYTES = 1 << 20
"""Bytes read per hop from a text source: large enough to amortize the thread hop."""
_CHUNK_ROWS = 2048
"""Rows per hop from CSV, Parquet and `datasets`."""
_SNIFF_BYTES = 8192
"""How much of the top of a text file is checked for NUL bytes (a binary file)."""
_BOM = b"\xef\xbb\xbf"
_MISSING: Any = msgspec.UNSET
_JSON = msgspec.json.Decoder()
_TEXT_FORMATS = {".jsonl": "lines", ".ndjson": "lines", ".json": "json", ".csv": "csv"}
_FORMATS = ", ".join([*_TEXT_FORMATS, ".parquet"])


class SourceProblem(msgspec.Struct, frozen=True, kw_only=True):
    """A row that could not become a prompt: reported and written to the failures file, never
    silently dropped."""

    path: str
    line: int | None
    error: str
    id: str | None = None


SourceItem = Prompt | SourceProblem
PromptInput = Prompt | SourceProblem | str | Mapping[str, Any]
"""A prompt passed in code: a `Prompt`, a `SourceProblem`, the text, or a row (a mapping)."""


class _Reader(Protocol):
    """A blocking reader, driven from a worker thread one chunk at a time."""

    def read(self) -> list[SourceItem]:
        """The next chunk: never empty until the end of the source, then empty."""
        ...

    def close(self) -> None: ...


_Hop = Callable[[Callable[[], _T]], Awaitable[_T]]


class PromptSource:
    """The prompts of one source, as an async iterator; close it with `aclose()` or
    `async with`, also when stopping early, to release the file at once.

    One consumer at a time. After an error or a cancellation the source is closed and ends:
    the chunk being read is lost, so going on would skip rows without a word.
    """

    def __init__(self, reader: _Reader, *, name: str, hop: _Hop[list[SourceItem]]) -> None:
        self.name = name
        self._reader: _Reader | None = reader
        self._hop = hop
        self._items: list[SourceItem] = []
        self._pos = 0

    def __aiter__(self) -> PromptSource:
        return self

    async def __anext__(self) -> SourceItem:
        if self._pos < len(self._items):
            item = self._items[self._pos]
            self._pos += 1
            return item
        return await self._refill()

    async def _refill(self) -> SourceItem:
        reader = self._reader
        if reader is None:
            raise StopAsyncIteration
        self._items, self._pos = [], 0
        try:
            items = await self._hop(reader.read)
        except SourceError:
            self.close()
            raise
        except Exception as exc:
            self.close()
            raise SourceError(self.name, None, f"cannot read: {exc}") from exc
        except BaseException:
            self.close()
            raise
        if not items:
            self.close()
            raise StopAsyncIteration
        self._items, self._pos = items, 1
        return items[0]

    def close(self) -> None:
        """Release the file (never stdin, which is not ours); idempotent."""
        reader, self._reader = self._reader, None
        self._items, self._pos = [], 0
        if reader is not None:
            reader.close()

    async def aclose(self) -> None:
        """`close()`, under the name `contextlib.aclosing` and async iterators use."""
        self.close()

    async def __aenter__(self) -> PromptSource:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


async def open_source(config: SourceConfig, *, stdin: BinaryIO | None = None) -> PromptSource:
    """Open the source `config` names and check it before the first row is asked for.

    A coroutine rather than a plain async generator so that the checks run on `await`, before
    the caller starts any engine: a generator body would only run at the first `__anext__`.
    `path = "-"` reads NDJSON from `stdin` (default: the process's stdin, read unbuffered), which
    is never closed; its reads run in daemon threads, so a stdin that never ends blocks neither
    a cancellation nor the interpreter's exit.

    :raises SourceError: the file is missing or unreadable, its format is unknown, it is not
        text, the column (or `id_column`) is missing from the first row or the schema (the
        message lists the columns there are), the top of a JSON file does not decode, or the
        dataset cannot be loaded or has no such split.
    """
    rows = _Rows(config)
    if config.dataset is not None:
        return await _open(lambda: _open_dataset(config, rows), rows.name, _hop_abandoning)
    if config.path == "-":
        stream = stdin if stdin is not None else _default_stdin(rows)
        return await _open(
            lambda: _LinesReader.open(stream, rows, own=False), rows.name, _hop_daemon
        )
    return await _open(lambda: _open_file(rows), rows.name, anyio.to_thread.run_sync)


async def from_code(
    prompts: Iterable[PromptInput] | AsyncIterable[PromptInput], config: SourceConfig
) -> AsyncIterator[SourceItem]:
    """The caller's prompts as source items. A row (a mapping) passes the same checks as a row
    from a file (`_Rows.item`: the column, the id column, empty text, valid UTF-8); a text is
    checked as a row of that text alone, its id derived from it; a `Prompt` as a row of its
    `instruction` and `id` (and passes as it is). `SourceProblem`s pass as they are. Lines
    count from 1, in the order given (a `Prompt` that has its own `line` keeps it)."""
    rows = _Rows(config, name="<prompts>")
    texts = _Rows(msgspec.structs.replace(config, id_column=None), name="<prompts>")
    structs = _Rows(
        msgspec.structs.replace(config, column="instruction", id_column="id"), name="<prompts>"
    )
    column, id_column = rows.column, rows.id_column
    line = 0

    async def items() -> AsyncIterator[PromptInput]:
        if isinstance(prompts, AsyncIterable):
            async for item in prompts:
                yield item
        else:
            for item in prompts:
                yield item

    async for item in items():
        line += 1
        if isinstance(item, Prompt):
            checked = structs.item(item.instruction, item.id, item.line or line)
            yield item if isinstance(checked, Prompt) else checked
        elif isinstance(item, SourceProblem):
            yield item
        elif isinstance(item, str):
            yield texts.item(item, None, line)
        elif isinstance(item, Mapping):
            raw_id = _MISSING if id_column is None else item.get(id_column, _MISSING)
            yield rows.item(item.get(column, _MISSING), raw_id, line)
        else:
            yield rows.problem(line, f"{_kind(item)}, not a text or a row")


def _default_stdin(rows: _Rows) -> BinaryIO:
    """The process's stdin, unbuffered: a daemon thread blocked in a buffered read holds the
    buffer's lock, and the interpreter then aborts at exit when it flushes stdin."""
    if sys.stdin is None:
        raise SourceError(rows.name, None, "this process has no stdin")
    buffer = sys.stdin.buffer
    raw: BinaryIO = getattr(buffer, "raw", buffer)
    return raw


async def _open(fn: Callable[[], _Reader], name: str, hop: _Hop[Any]) -> PromptSource:
    """Open in a thread; a reader opened by a thread whose caller was cancelled is closed."""
    opened: list[_Reader] = []
    try:
        await hop(lambda: opened.append(fn()))
    except BaseException:
        for reader in opened:
            reader.close()
        raise
    return PromptSource(opened[0], name=name, hop=hop)


async def _hop_abandoning(fn: Callable[[], _T]) -> _T:
    """For reads that may wait on the network (`datasets`): cancelling does not wait for them,
    and a late result is dropped (such readers hold nothing that needs closing)."""
    return await anyio.to_thread.run_sync(fn, abandon_on_cancel=True)


async def _hop_daemon(fn: Callable[[], _T]) -> _T:
    """Run `fn` in a fresh daemon thread: a read of stdin may block forever, and neither a
    cancellation nor the interpreter's exit should wait for it (anyio's workers are joined)."""
    token = anyio.lowlevel.current_token()
    done = anyio.Event()
    results: list[_T] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            results.append(fn())
        except BaseException as exc:
            errors.append(exc)
        try:
            anyio.from_thread.run_sync(done.set, token=token)
        except RuntimeError:
            pass  # the event loop is gone: nobody waits for this result any more

    threading.Thread(target=target, name="streamfeedback stdin", daemon=True).start()
    await done.wait()
    if errors:
        raise errors[0]
    return results[0]


class _Rows:
    """Maps one row's raw values to a `Prompt` or a `SourceProblem`, the same for every format."""

    def __init__(self, config: SourceConfig, *, name: str | None = None) -> None:
        if name is not None:
            self.name = name
        elif config.dataset is not None:
            self.name = config.dataset
        else:
            self.name = "<stdin>" if config.path == "-" else str(config.path)
        self.column = config.column
        self.id_column = config.id_column
        self.columns = [config.column]
        if config.id_column is not None:
            self.columns.append(config.id_column)

    def item(self, text: Any, raw_id: Any, line: int | None) -> SourceItem:
        row_id: str | None = None
        if self.id_column is not None:
            if isinstance(raw_id, str):
                row_id = raw_id
            elif isinstance(raw_id, int) and not isinstance(raw_id, bool):
                row_id = str(raw_id)
            elif raw_id is _MISSING or raw_id is None:
                return self.problem(line, f"no value in id column `{self.id_column}`")
            else:
                return self.problem(
                    line,
                    f"id column `{self.id_column}` holds {_kind(raw_id)}, "
                    "not a string or an integer",
                )
            if not row_id.isascii() and not _is_utf8(row_id):
                return self.problem(line, f"id column `{self.id_column}` is not valid UTF-8")
        if not isinstance(text, str):
            if text is _MISSING or text is None:
                return self.problem(line, f"no value in column `{self.column}`", row_id)
            return self.problem(
                line, f"column `{self.column}` holds {_kind(text)}, not a string", row_id
            )
        if not text or text.isspace():
            return self.problem(line, "empty prompt", row_id)
        if not text.isascii() and not _is_utf8(text):
            return self.problem(line, "not valid UTF-8", row_id)
        if row_id is None:
            row_id = stable_id(text)
        return Prompt(id=row_id, instruction=text, line=line)

    def problem(self, line: int | None, error: str, row_id: str | None = None) -> SourceProblem:
        return SourceProblem(path=self.name, line=line, error=error, id=row_id)

    def check_columns(self, present: Any, line: int | None, where: str) -> None:
        """:raises SourceError: a configured column is not among `present`."""
        for column in self.columns:
            if column not in present:
                listed = ", ".join(f"`{c}`" for c in present) or "none"
                raise SourceError(self.name, line, f"no column `{column}`; {where} has: {listed}")


def _is_utf8(text: str) -> bool:
    """False for text holding lone surrogates: bytes that were not UTF-8 (surrogateescape)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _kind(value: Any) -> str:
    """A JSON-ish name for a value's type, for messages."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return f"a {type(value).__name__}"


def _row_decoder(rows: _Rows) -> msgspec.json.Decoder[Any]:
    """A decoder that builds only the two fields we need: much faster than a dict per row."""
    fields: list[tuple[str, Any, Any]] = [("text", Any, _MISSING)]
    rename = {"text": rows.column}
    if rows.id_column is not None:
        fields.append(("row_id", Any, _MISSING))
        rename["row_id"] = rows.id_column
    return msgspec.json.Decoder(msgspec.defstruct("Row", fields, rename=rename))


def _decode_row(
    rows: _Rows, decoder: msgspec.json.Decoder[Any], raw: bytes, line: int
) -> SourceItem:
    try:
        row = decoder.decode(raw)
    except msgspec.ValidationError as exc:
        return rows.problem(line, f"not a JSON object: {exc}")
    except msgspec.DecodeError as exc:
        return rows.problem(line, f"invalid JSON: {exc}")
    except UnicodeDecodeError as exc:
        return rows.problem(line, _utf8_error(exc))
    return rows.item(row.text, getattr(row, "row_id", None), line)


def _utf8_error(exc: UnicodeDecodeError) -> str:
    return f"not valid UTF-8 (byte {exc.object[exc.start]:#04x})"


def _open_file(rows: _Rows) -> _Reader:
    path = Path(rows.name)
    suffix = path.suffix.lower()
    if suffix not in _TEXT_FORMATS and suffix != ".parquet":
        raise SourceError(
            rows.name, None, f"unknown format {suffix or '(no extension)'!r}: use {_FORMATS}"
        )
    if suffix == ".parquet":
        return _ParquetReader.open(path, rows)
    try:
        stream = path.open("rb")
    except FileNotFoundError as exc:
        raise SourceError(rows.name, None, "no such file") from exc
    except IsADirectoryError as exc:
        raise SourceError(
            rows.name, None, "is a directory (for a dataset folder, set `dataset`)"
        ) from exc
    except OSError as exc:
        raise SourceError(rows.name, None, f"cannot open: {exc.strerror or exc}") from exc
    try:
        if _TEXT_FORMATS[suffix] == "csv":
            return _CsvReader.open(stream, rows)
        if _TEXT_FORMATS[suffix] == "json":
            return _open_json(stream, rows)
        return _LinesReader.open(stream, rows, own=True)
    except BaseException:
        stream.close()
        raise


def _check_text(rows: _Rows, head: bytes) -> None:
    """:raises SourceError: the top of the file holds NUL bytes, so it is not text at all."""
    cut = head.find(b"\0", 0, _SNIFF_BYTES)
    if cut >= 0:
        raise SourceError(
            rows.name, None, f"not a text file (NUL byte at offset {cut}); is it compressed?"
        )


def _read_some(read: Callable[[int], bytes | None], rows: _Rows) -> bytes:
    """Up to a chunk of bytes; b"" only at the end.

    :raises SourceError: the stream is non-blocking (an unbuffered read returned None), which
        would otherwise look like the end of the input.
    """
    data = read(_CHUNK_BYTES)
    if data is None:
        raise SourceError(rows.name, None, "the stream is non-blocking; cannot read it")
    return data


class _LinesReader:
    """JSON lines (NDJSON): one object per line; blank lines skipped, bad lines reported."""

    def __init__(self, stream: BinaryIO, rows: _Rows, *, own: bool, head: bytes) -> None:
        self._stream = stream
        self._read = getattr(stream, "read1", stream.read)
        self._rows = rows
        self._own = own
        self._head = head
        self._parts: list[bytes] = []
        self._line = 0
        self._eof = False
        self._decoder = _row_decoder(rows)

    @classmethod
    def open(cls, stream: BinaryIO, rows: _Rows, *, own: bool, head: bytes = b"") -> _LinesReader:
        """Read up to the first non-blank line and check it: it must be a JSON object with
        the configured columns, or the file is likely not JSON lines at all.

        :raises SourceError: as described.
        """
        buf = bytearray(head)
        read = getattr(stream, "read1", stream.read)
        while b"\n" not in buf.lstrip():
            data = _read_some(read, rows)
            if not data:
                break
            buf += data
        data = bytes(buf)
        if data.startswith(_BOM):
            data = data[len(_BOM) :]
        _check_text(rows, data)
        line, start = 1, 0
        while start < len(data):
            end = data.find(b"\n", start)
            end = len(data) if end < 0 else end
            raw = data[start:end]
            if raw and not raw.isspace():
                _check_first_row(rows, raw, line, "not JSON lines")
                break
            line, start = line + 1, end + 1
        return cls(stream, rows, own=own, head=data)

    def _next_data(self) -> bytes:
        if self._head:
            data, self._head = self._head, b""
            return data
        return _read_some(self._read, self._rows)

    def read(self) -> list[SourceItem]:
        out: list[SourceItem] = []
        while not out and not self._eof:
            data = self._next_data()
            if not data:
                self._eof = True
                lines = [b"".join(self._parts)]
                self._parts = []
            else:
                cut = data.rfind(b"\n")
                if cut < 0:
                    self._parts.append(data)
                    continue
                self._parts.append(data[:cut])
                lines = b"".join(self._parts).split(b"\n")
                self._parts = [data[cut + 1 :]]
            rows, decoder, line = self._rows, self._decoder, self._line
            for raw in lines:
                line += 1
                if raw and not raw.isspace():
                    out.append(_decode_row(rows, decoder, raw, line))
            self._line = line
        return out

    def close(self) -> None:
        if self._own:
            self._stream.close()


def _check_first_row(rows: _Rows, raw: bytes, line: int | None, what: str) -> None:
    """:raises SourceError: `raw` is not a JSON object holding the configured columns."""
    try:
        first = _JSON.decode(raw)
    except msgspec.DecodeError as exc:
        raise SourceError(rows.name, line, f"{what}: invalid JSON: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise SourceError(rows.name, line, f"{what}: {_utf8_error(exc)}") from exc
    if not isinstance(first, dict):
        raise SourceError(rows.name, line, f"{what}: a row is {_kind(first)}, not an object")
    rows.check_columns(first, line, "the first row")


def _open_json(stream: BinaryIO, rows: _Rows) -> _Reader:
    """A `.json` file is a JSON array of objects if it starts with `[`, else JSON lines."""
    head = stream.read(_SNIFF_BYTES)
    start = head[len(_BOM) :] if head.startswith(_BOM) else head
    if not start.lstrip().startswith(b"["):
        return _LinesReader.open(stream, rows, own=True, head=head)
    _check_text(rows, start)
    data = start + stream.read()
    stream.close()
    try:
        elements = msgspec.json.decode(data, type=list[msgspec.Raw])
    except msgspec.ValidationError as exc:
        raise SourceError(rows.name, None, f"not a JSON array of objects: {exc}") from exc
    except msgspec.DecodeError as exc:
        raise SourceError(rows.name, None, f"invalid JSON: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise SourceError(rows.name, None, _utf8_error(exc)) from exc
    if elements:
        _check_first_row(rows, bytes(elements[0]), 1, "not a JSON array of objects")
    return _ArrayReader(elements, rows)


class _ArrayReader:
    """A JSON array, loaded whole; `line` is the element's 1-based position in the array."""

    def __init__(self, elements: list[msgspec.Raw], rows: _Rows) -> None:
        self._elements = elements
        self._rows = rows
        self._decoder = _row_decoder(rows)
        self._pos = 0

    def read(self) -> list[SourceItem]:
        start, end = self._pos, min(self._pos + _CHUNK_ROWS, len(self._elements))
        self._pos = end
        rows, decoder = self._rows, self._decoder
        return [_decode_row(rows, decoder, self._elements[i], i + 1) for i in range(start, end)]

    def close(self) -> None:
        self._elements = []


class _CsvReader:
    """CSV with a header row; `line` is the line where the row starts (the header is line 1),
    which is the row number unless a quoted field spans lines."""

    def __init__(
        self, text: io.TextIOWrapper, reader: Iterator[list[str]], rows: _Rows, header: list[str]
    ) -> None:
        self._text = text
        self._reader = reader
        self._rows = rows
        self._text_at = header.index(rows.column)
        self._id_at = header.index(rows.id_column) if rows.id_column is not None else None
        self._eof = False

    @classmethod
    def open(cls, stream: BinaryIO, rows: _Rows) -> _CsvReader:
        """:raises SourceError: the file is not text, or the header lacks a column."""
        if isinstance(stream, io.BufferedReader):
            _check_text(rows, stream.peek(_SNIFF_BYTES)[:_SNIFF_BYTES])
        # Undecodable bytes become lone surrogates, reported per row instead of failing a chunk.
        text = io.TextIOWrapper(stream, encoding="utf-8-sig", errors="surrogateescape", newline="")
        reader = csv.reader(text)
        try:
            try:
                header = next(reader, None)
            except csv.Error as exc:
                raise SourceError(rows.name, 1, f"bad CSV header: {exc}") from exc
            if header is None:
                header = list(rows.columns)  # an empty file: no rows, nothing to check
            rows.check_columns(header, 1, "the header")
        except BaseException:
            text.detach()  # the caller closes the binary stream
            raise
        return cls(text, reader, rows, header)

    def read(self) -> list[SourceItem]:
        out: list[SourceItem] = []
        reader, rows, text_at, id_at = self._reader, self._rows, self._text_at, self._id_at
        line_num = self._line_num
        while len(out) < _CHUNK_ROWS and not self._eof:
            start = line_num() + 1
            try:
                row = next(reader)
            except StopIteration:
                self._eof = True
                break
            except csv.Error as exc:
                out.append(rows.problem(start, f"bad CSV row: {exc}"))
                continue
            if not row:
                continue
            text = row[text_at] if text_at < len(row) else _MISSING
            raw_id = _MISSING
            if id_at is not None and id_at < len(row):
                raw_id = row[id_at]
            out.append(rows.item(text, raw_id, start))
        return out

    def _line_num(self) -> int:
        num: int = self._reader.line_num  # type: ignore[attr-defined]
        return num

    def close(self) -> None:
        self._text.close()


class _ParquetReader:
    """Parquet, read a batch of row groups' rows at a time, only the needed columns."""

    def __init__(self, file: Any, rows: _Rows) -> None:
        self._file = file
        self._rows = rows
        self._batches = file.iter_batches(batch_size=_CHUNK_ROWS, columns=rows.columns)
        self._line = 0

    @classmethod
    def open(cls, path: Path, rows: _Rows) -> _ParquetReader:
        """:raises SourceError: the file is missing or not Parquet, or lacks a text column."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not path.exists():
            raise SourceError(rows.name, None, "no such file")
        try:
            file = pq.ParquetFile(path)
        except (OSError, pa.ArrowException) as exc:
            raise SourceError(rows.name, None, f"not a Parquet file: {exc}") from exc
        try:
            schema = file.schema_arrow
            rows.check_columns(schema.names, None, "the schema")
            kind = schema.field(rows.column).type
            if pa.types.is_dictionary(kind):
                kind = kind.value_type
            if not _is_arrow_text(pa, kind):
                raise SourceError(
                    rows.name, None, f"column `{rows.column}` holds {kind}, not strings"
                )
            return cls(file, rows)
        except BaseException:
            file.close()
            raise

    def read(self) -> list[SourceItem]:
        batch = next(self._batches, None)
        while batch is not None and batch.num_rows == 0:
            batch = next(self._batches, None)
        if batch is None:
            return []
        texts = batch.column(0).to_pylist()
        ids = batch.column(1).to_pylist() if self._rows.id_column is not None else None
        first, self._line = self._line + 1, self._line + len(texts)
        item = self._rows.item
        if ids is None:
            return [item(text, None, first + i) for i, text in enumerate(texts)]
        return [item(text, ids[i], first + i) for i, text in enumerate(texts)]

    def close(self) -> None:
        self._batches = iter(())
        self._file.close()


def _is_arrow_text(pa: Any, kind: Any) -> bool:
    is_view = getattr(pa.types, "is_string_view", None)  # pyarrow >= 16
    return bool(
        pa.types.is_string(kind)
        or pa.types.is_large_string(kind)
        or (is_view is not None and is_view(kind))
    )


def _is_saved_dataset(folder: Path) -> bool:
    """A folder written by `save_to_disk` (a Dataset or a DatasetDict), not data files."""
    return (folder / "dataset_dict.json").is_file() or (
        (folder / "dataset_info.json").is_file() and (folder / "state.json").is_file()
    )


def _open_dataset(config: SourceConfig, rows: _Rows) -> _Reader:
    """:raises SourceError: the dataset cannot be loaded, lacks the split or the column."""
    import datasets

    name = rows.name
    folder = Path(name)
    try:
        if folder.is_dir() and _is_saved_dataset(folder):
            ds = datasets.load_from_disk(str(folder))
        else:
            ds = datasets.load_dataset(
                name, config.subset, split=config.split, streaming=config.streaming
            )
    except Exception as exc:  # datasets raises many types; all mean "cannot load it"
        raise SourceError(name, None, f"cannot load dataset: {exc}") from exc
    if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if config.split not in ds:
            splits = ", ".join(repr(s) for s in ds) or "none"
            raise SourceError(name, None, f"no split {config.split!r}; the splits are: {splits}")
        ds = ds[config.split]
    names = ds.column_names
    first: dict[str, list[Any]] | None = None
    if names is not None:
        rows.check_columns(names, None, "the dataset")
        features = ds.features
        if features is not None:
            feature = features[rows.column]
            if not (
                isinstance(feature, datasets.Value)
                and feature.dtype in ("string", "large_string", "string_view")
            ):
                raise SourceError(
                    name, None, f"column `{rows.column}` holds {feature}, not strings"
                )
        ds = ds.select_columns(rows.columns)
    batches = iter(ds.iter(batch_size=_CHUNK_ROWS))
    if names is None:
        first = next(batches, None)
        if first is not None:
            rows.check_columns(list(first), 1, "the first row")
    return _DatasetReader(batches, rows, first)


class _DatasetReader:
    """Batches of a `datasets` Dataset or IterableDataset; `line` is the row index + 1."""

    def __init__(
        self,
        batches: Iterator[dict[str, list[Any]]],
        rows: _Rows,
        first: dict[str, list[Any]] | None,
    ) -> None:
        self._batches = batches
        self._rows = rows
        self._first = first
        self._line = 0

    def read(self) -> list[SourceItem]:
        batch, self._first = self._first, None
        if batch is None:
            batch = next(self._batches, None)
        while batch is not None and not _batch_len(batch):
            batch = next(self._batches, None)
        if batch is None:
            return []
        rows, size = self._rows, _batch_len(batch)
        texts = batch.get(rows.column) or [_MISSING] * size
        ids = None
        if rows.id_column is not None:
            ids = batch.get(rows.id_column) or [_MISSING] * size
        first, self._line = self._line + 1, self._line + size
        if ids is None:
            return [rows.item(text, None, first + i) for i, text in enumerate(texts)]
        return [rows.item(text, ids[i], first + i) for i, text in enumerate(texts)]

    def close(self) -> None:
        self._batches = iter(())


def _batch_len(batch: dict[str, list[Any]]) -> int:
    return len(next(iter(batch.values()), []))
