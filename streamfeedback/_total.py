"""How many prompts a run will take, for the progress view's total, percentage and ETA.

Counted beside the run, never before it: lines of a text file are counted in a worker thread
(about a second per GiB), a Parquet file or a dataset says its row count; a source whose size
cannot be known cheaply (stdin, a JSON array, a Hub dataset offline) leaves the total unknown.
"""

from __future__ import annotations

import csv
import logging
import math
import threading
from functools import partial
from pathlib import Path

import anyio
import anyio.to_thread

from ._config import SourceConfig

__all__ = ["Total", "expected_prompts"]

log = logging.getLogger("streamfeedback")

_CHUNK = 1 << 20
_HUB_PATIENCE = 15.0
"""Seconds to wait for a Hub dataset's metadata before the total stays unknown."""


class Total:
    """The expected number of prompts, once known (None until then, or for good)."""

    def __init__(self, value: int | None = None) -> None:
        self.value = value

    async def count(
        self,
        source: SourceConfig,
        *,
        limit: int | None = None,
        shard: tuple[int, int] | None = None,
    ) -> None:
        """Count the source's rows and set `value`; a failure leaves it unknown."""
        rows: int | None = None
        stop = threading.Event()
        try:
            with anyio.move_on_after(_HUB_PATIENCE):
                rows = await anyio.to_thread.run_sync(
                    partial(_source_rows, source, _Budget(stop, limit)), abandon_on_cancel=True
                )
        except Exception as exc:  # _Stopped too; a total is a nicety: never stop a run for it
            log.debug("cannot count the source's rows: %s", exc)
        finally:
            stop.set()  # a count still reading when the run ends (or gives up) stops too
        self.value = expected_prompts(rows, limit=limit, shard=shard)


class _Budget:
    """When a count may stop: the run has ended, or `--limit` rows are already there."""

    def __init__(self, stop: threading.Event, limit: int | None) -> None:
        self.stop = stop
        self.limit = limit

    def enough(self, count: int) -> bool:
        if self.stop.is_set():
            raise _Stopped
        return self.limit is not None and count >= self.limit


class _Stopped(Exception):
    """The run no longer needs the count."""


def expected_prompts(
    rows: int | None, *, limit: int | None = None, shard: tuple[int, int] | None = None
) -> int | None:
    """Prompts a run takes from `rows` rows, under `--limit` and `--shard I/N`."""
    if rows is None:
        rows = limit
    elif limit is not None:
        rows = min(rows, limit)
    if rows is None:
        return None
    if shard is not None:
        index, count = shard
        rows = max(0, math.ceil((rows - index) / count))
    return rows


def _source_rows(source: SourceConfig, budget: _Budget) -> int | None:
    if source.dataset is not None:
        return _dataset_rows(source)
    if source.path is None or source.path == "-":
        return None
    path = Path(source.path)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return int(pq.ParquetFile(path).metadata.num_rows)
    if suffix == ".csv":
        count = -1  # the header
        with path.open(newline="", encoding="utf-8", errors="replace") as fh:
            for count, _ in enumerate(csv.reader(fh)):
                if not count % 4096 and budget.enough(count):
                    break
        return max(0, count)
    if suffix in (".jsonl", ".ndjson"):
        return _lines(path, budget)
    return None


def _lines(path: Path, budget: _Budget) -> int:
    """Lines, read a chunk at a time (a last line without its newline counts too)."""
    count = 0
    last = b"\n"
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            count += chunk.count(b"\n")
            last = chunk[-1:]
            if budget.enough(count):
                return count
    return count + (last != b"\n")


def _dataset_rows(source: SourceConfig) -> int | None:
    import datasets

    assert source.dataset is not None
    folder = Path(source.dataset)
    if folder.is_dir() and (folder / "dataset_dict.json").is_file():
        return len(datasets.load_from_disk(str(folder))[source.split])
    if folder.is_dir() and (folder / "state.json").is_file():
        return len(datasets.load_from_disk(str(folder)))
    builder = datasets.load_dataset_builder(source.dataset, source.subset)
    splits = builder.info.splits
    if splits is None or source.split not in splits:
        return None
    return int(splits[source.split].num_examples) or None
