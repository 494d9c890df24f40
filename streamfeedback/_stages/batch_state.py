"""The batch rating stage's crash-safe memory: a state file of submitted batches and, per
batch, a sidecar of the joined prompts it covers.

The state file (JSON, replaced atomically) lists the submitted batches that are not yet
emitted; each names a sidecar NDJSON file in `<state>.d/`, written and flushed to disk before
upload, holding the joined prompts (and what earlier attempts read), so a later run assembles
records without generating again:

    {"version": 1, "base_url": "https://api.openai.com/v1",
     "batches": [{"id": "batch_abc", "sidecar": "3f2a9c0d1e4b.joined.ndjson",
                  "input_file_id": "file-xyz", "prompts": 7, "requests": 7, "attempt": 1,
                  "submitted_at": 1718000000.0, "token": "9c1d07e2a4b35f68"}]}

An entry with an empty `id` is a batch whose file is uploaded but whose create call has not
answered yet; its `token` is sent in the batch's metadata, so a later run can find it.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import IO

import anyio
import anyio.to_thread
import msgspec

from .._exceptions import JudgeUnavailable
from .._idset import IdSet
from .._judge.parser import BlockRating
from .._records import Joined

__all__ = ["Builder", "Entry", "Pending", "StateStore", "new_token", "pending_ids"]

log = logging.getLogger("streamfeedback.batch")

_SIDECAR = ".joined.ndjson"
_REQUESTS = ".requests.jsonl"
_READ_CHUNK = 1000


class Entry(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One prompt of one batch, as its sidecar keeps it: enough to assemble its record."""

    joined: Joined
    attempt: int
    asked: list[str]
    blocks: dict[str, list[BlockRating | None]] = {}
    attempts: dict[str, int] = {}


class Pending(msgspec.Struct, kw_only=True):
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
    batches: list[Pending] = []


class _PromptId(msgspec.Struct):
    id: str


class _JoinedId(msgspec.Struct):
    prompt: _PromptId


class _EntryId(msgspec.Struct):
    joined: _JoinedId


def new_token() -> str:
    return uuid.uuid4().hex[:16]


def pending_ids(state_path: str) -> IdSet:
    """The prompt ids the batches in a state file cover: a resuming run need not generate them."""
    ids = IdSet()
    path = Path(state_path)
    if not path.exists():
        return ids
    state = _read_state(path)
    folder = _folder(state_path)
    for pending in state.batches:
        sidecar = folder / pending.sidecar
        if sidecar.exists():
            _add_ids(sidecar, ids)
    return ids


def _add_ids(sidecar: Path, ids: IdSet) -> None:
    decoder = msgspec.json.Decoder(_EntryId)
    with sidecar.open("rb") as fh:
        for line in fh:
            if line.strip():
                ids.add(decoder.decode(line).joined.prompt.id)


def _read_state(path: Path) -> _State:
    """:raises JudgeUnavailable: the file is not a state file (the message says what to do)."""
    try:
        return msgspec.json.decode(path.read_bytes(), type=_State)
    except msgspec.DecodeError as exc:
        raise JudgeUnavailable(
            f"batch state file {path} is unreadable ({exc}); move it away "
            "to start over (its batches would then be paid for again)"
        ) from exc


def _folder(state_path: str) -> Path:
    return Path(f"{state_path}.d")


class Builder:
    """An open batch: its request file and its sidecar, written as prompts arrive."""

    def __init__(self, folder: Path) -> None:
        token = new_token()
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


class StateStore:
    """The state file and its sidecar folder for one run; `batches` is what it lists now."""

    def __init__(self, state_path: str, base_url: str) -> None:
        self.path = Path(state_path)
        self.folder = _folder(state_path)
        self.base_url = base_url
        self._state = _State(base_url=base_url)
        self._lock = anyio.Lock()
        self._encoder = msgspec.json.Encoder()

    @property
    def batches(self) -> list[Pending]:
        return self._state.batches

    def builder(self) -> Builder:
        return Builder(self.folder)

    def load(self) -> None:
        """Read the state file, dropping batches whose sidecar is gone.

        :raises JudgeUnavailable: the state file is unreadable.
        """
        if self.path.exists():
            self._state = _read_state(self.path)
            if self._state.base_url and self._state.base_url != self.base_url:
                log.warning(
                    "batch state %s was written for %s, not %s; its batches may not be found",
                    self.path,
                    self._state.base_url,
                    self.base_url,
                )
        missing = [p for p in self.batches if not (self.folder / p.sidecar).exists()]
        for pending in missing:
            log.warning(
                "%s: its prompts file %s is gone; its %d prompts will be rated again",
                f"batch {pending.id}" if pending.id else "an unsubmitted batch",
                self.folder / pending.sidecar,
                pending.prompts,
            )
        if missing:
            gone = {p.sidecar for p in missing}
            self._state = msgspec.structs.replace(
                self._state, batches=[p for p in self.batches if p.sidecar not in gone]
            )

    def cover(self) -> IdSet:
        """The prompt ids the batches cover; drops stray files of batches never recorded."""
        covered = IdSet()
        for pending in self.batches:
            _add_ids(self.folder / pending.sidecar, covered)
        if self.batches:
            log.info(
                "resuming %d batches (%d prompts) from %s",
                len(self.batches),
                sum(p.prompts for p in self.batches),
                self.path,
            )
        if self.folder.is_dir():
            keep = {p.sidecar for p in self.batches}
            for path in self.folder.iterdir():
                if path.name.endswith((_SIDECAR, _REQUESTS)) and path.name not in keep:
                    path.unlink(missing_ok=True)
        return covered

    async def save(
        self, *, add: Pending | None, remove: Pending | None, keep_sidecar: bool = False
    ) -> None:
        """Change the batch list and write it atomically; drop a removed batch's sidecar."""
        async with self._lock:
            batches = [b for b in self.batches if remove is None or b.sidecar != remove.sidecar]
            if add is not None:
                batches.append(add)
            self._state = _State(base_url=self.base_url, batches=batches)
            data = msgspec.json.format(self._encoder.encode(self._state), indent=1)
            await anyio.to_thread.run_sync(_write_atomically, self.path, data)
            if remove is not None and not keep_sidecar:
                (self.folder / remove.sidecar).unlink(missing_ok=True)

    async def entries(self, pending: Pending) -> AsyncGenerator[tuple[Entry, bytes], None]:
        """A batch's sidecar, entry by entry (with its line), read in chunks off the loop."""
        decoder = msgspec.json.Decoder(Entry)
        with (self.folder / pending.sidecar).open("rb") as fh:
            while chunk := await anyio.to_thread.run_sync(_read_lines, fh):
                for raw in chunk:
                    if raw.strip():
                        yield decoder.decode(raw), raw.rstrip(b"\n") + b"\n"

    def tidy(self) -> None:
        """Remove the sidecar folder once no batch is pending (only when it is empty)."""
        if not self.batches:
            try:
                self.folder.rmdir()
            except OSError:
                pass


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
