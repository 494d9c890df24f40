"""Append-only NDJSON files (the output, the failures file, the spool): one run per file,
whole lines or nothing, lines of any length.

A run holds a lock on each file it appends to for its whole life, so a second run on the same
file stops at once, naming the first one's pid, instead of writing every record twice. A torn
tail is cut only by the lock's holder, never while another process may be writing it. A write
that fails half way (a full disk) is rolled back to the last whole line, so the file never
ends in a torn record that a later append would glue a new one onto.
"""

from __future__ import annotations

import os
import stat
import sys
from typing import BinaryIO

from ._exceptions import FileBusy, SinkError

__all__ = ["append_whole", "cut_torn_tail", "hold", "is_regular", "names", "read_lines"]

_CHUNK = 1 << 20


def hold(path: str, *, shared: bool = False) -> int:
    """Open `path` (created if missing, unless `shared`) and lock it until the fd is closed.

    `shared` is for readers (rating a spool): any number of them, but no writer meanwhile.

    :raises FileBusy: another process holds the file.
    :raises SinkError: the file cannot be opened.
    """
    parent = os.path.dirname(path)
    while True:
        try:
            if not shared and parent:
                os.makedirs(parent, exist_ok=True)
            fd = os.open(path, os.O_RDONLY if shared else os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise SinkError(f"{path}: cannot open: {exc.strerror}") from exc
        if sys.platform == "win32" or not is_regular(fd):
            return fd  # /dev/null, a pipe: nothing to guard
        import fcntl

        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _holder(fd)
            os.close(fd)
            raise FileBusy(path, pid) from None
        except OSError:
            return fd  # a filesystem without locks: run unguarded rather than not at all
        if names(fd, path):
            return fd
        os.close(fd)  # its last holder removed it meanwhile: the lock guards nothing


def names(fd: int, path: str, *, follow: bool = True) -> bool:
    """Whether `path` is still the name of the file open as `fd` (a regular file; with
    `follow=False`, not through a symlink)."""
    try:
        st = os.stat(path) if follow else os.lstat(path)
    except OSError:
        return False
    own = os.fstat(fd)
    return stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _holder(fd: int) -> int | None:
    """The pid holding a lock on `fd`'s file, from /proc/locks (Linux); None where unknown."""
    st = os.fstat(fd)
    want = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    try:
        with open("/proc/locks") as fh:
            table = fh.read().splitlines()
    except OSError:
        return None
    for row in table:
        parts = row.split()
        if len(parts) > 1 and parts[1] == "->":
            continue  # a process waiting for the lock, not holding it
        if len(parts) < 6 or parts[1] != "FLOCK":
            continue
        dev, _, ino = parts[5].rpartition(":")
        major, _, minor = dev.partition(":")
        try:
            if (int(major, 16), int(minor, 16), int(ino)) == want:
                return int(parts[4])
        except ValueError:
            continue
    return None


def is_regular(fd: int) -> bool:
    """A plain file (not a pipe, a terminal or /dev/null): it can be cut and locked."""
    return stat.S_ISREG(os.fstat(fd).st_mode)


def append_whole(fd: int, data: bytes, end: int | None) -> None:
    """Write all of `data`; if that fails, cut the file back to `end` (its size before), so
    no partial line stays behind. `end` is None for what cannot be cut (a pipe).

    :raises OSError: the write failed (after the roll-back).
    """
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view) :]
    except OSError:
        if end is not None:
            try:
                os.ftruncate(fd, end)
            except OSError:
                pass  # the next run's resume cuts a torn tail all the same
        raise


def cut_torn_tail(fd: int) -> int:
    """Cut a last line without its newline (a kill mid-write); returns the bytes cut.

    Only the lock's holder may call this: another writer's line in progress looks torn too.
    """
    size = os.fstat(fd).st_size
    end = size
    while end > 0:
        start = max(0, end - 65536)
        os.lseek(fd, start, os.SEEK_SET)
        block = os.read(fd, end - start)
        newline = block.rfind(b"\n")
        if newline >= 0:
            end = start + newline + 1
            break
        end = start
    if end < size:
        os.ftruncate(fd, end)
    return size - end


def read_lines(fh: BinaryIO, offset: int, end: int) -> bytes:
    """The whole lines of `fh` from `offset`, up to 1 MiB of them but at least one however
    long, never past `end`. Empty when no newline comes before `end` (a torn last line)."""
    fh.seek(offset)
    parts = [fh.read(min(_CHUNK, end - offset))]
    got = len(parts[0])
    while b"\n" not in parts[-1] and offset + got < end and parts[-1]:
        parts.append(fh.read(min(max(_CHUNK, got), end - offset - got)))
        got += len(parts[-1])
    data = b"".join(parts)
    return data[: data.rfind(b"\n") + 1]

