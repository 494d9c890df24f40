"""The source stage: every format yields the same prompts, bad rows are reported, bad input
fails before the first row, and early stops release the file."""

from __future__ import annotations

import csv
import io
import os
import sys
import threading
from pathlib import Path
from typing import Any

os.environ["HF_DATASETS_OFFLINE"] = "1"  # before `datasets` is imported: never reach the Hub
os.environ["HF_HUB_OFFLINE"] = "1"

import anyio
import msgspec
import pytest

from streamfeedback._config import SourceConfig
from streamfeedback._exceptions import SourceError
from streamfeedback._records import Prompt
from streamfeedback._stages.source import SourceItem, SourceProblem, open_source

ROWS: list[dict[str, Any]] = [
    {"id": 1, "instruction": "Write a haiku about rain.", "extra": "x"},
    {"id": 2, "instruction": 'Explain, in one line, what a "monad" is.', "extra": "y"},
    {
        "id": 3,
        "instruction": "Caf\u00e9 na\u00efve \u2014 translate to French.\nKeep it short.",
        "extra": "z",
    },
]
TEXTS = [row["instruction"] for row in ROWS]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_bytes(b"".join(msgspec.json.encode(row) + b"\n" for row in rows))
    return path


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=2)
    return path


async def collect(config: SourceConfig, **kwargs: Any) -> list[SourceItem]:
    async with await open_source(config, **kwargs) as source:
        return [item async for item in source]


def prompts(items: list[SourceItem]) -> list[Prompt]:
    assert all(isinstance(item, Prompt) for item in items), items
    return [item for item in items if isinstance(item, Prompt)]


def problems(items: list[SourceItem]) -> list[SourceProblem]:
    return [item for item in items if isinstance(item, SourceProblem)]


# -- every format, the same prompts ----------------------------------------------------------


def make_file(kind: str, tmp_path: Path) -> Path:
    if kind == "jsonl":
        return write_jsonl(tmp_path / "p.jsonl", ROWS)
    if kind == "ndjson":
        return write_jsonl(tmp_path / "p.ndjson", ROWS)
    if kind == "json-lines":
        return write_jsonl(tmp_path / "p.json", ROWS)
    if kind == "json-array":
        path = tmp_path / "p.json"
        path.write_bytes(b"\xef\xbb\xbf \n" + msgspec.json.format(msgspec.json.encode(ROWS)))
        return path
    if kind == "csv":
        return write_csv(tmp_path / "p.csv", ROWS)
    assert kind == "parquet"
    return write_parquet(tmp_path / "p.parquet", ROWS)


@pytest.mark.parametrize("kind", ["jsonl", "ndjson", "json-lines", "json-array", "csv", "parquet"])
async def test_each_file_format_yields_the_same_prompts(kind: str, tmp_path: Path) -> None:
    path = make_file(kind, tmp_path)
    got = prompts(await collect(SourceConfig(path=str(path))))
    assert [p.instruction for p in got] == TEXTS
    reference = prompts(await collect(SourceConfig(path=str(make_file("jsonl", tmp_path)))))
    assert [p.id for p in got] == [p.id for p in reference]
    first_line = 2 if kind == "csv" else 1  # the CSV header is line 1
    assert [p.line for p in got] == [first_line + i for i in range(len(ROWS))]


async def test_stdin_is_ndjson() -> None:
    data = b"".join(msgspec.json.encode(row) + b"\n" for row in ROWS)
    got = prompts(await collect(SourceConfig(path="-", id_column="id"), stdin=io.BytesIO(data)))
    assert [(p.id, p.instruction, p.line) for p in got] == [
        (str(row["id"]), row["instruction"], i + 1) for i, row in enumerate(ROWS)
    ]


async def test_default_stdin_is_the_process_stdin(monkeypatch: pytest.MonkeyPatch) -> None:
    data = b'{"instruction": "from stdin"}\n'
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BufferedReader(io.BytesIO(data))))
    got = prompts(await collect(SourceConfig(path="-")))
    assert [(p.instruction, p.line) for p in got] == [("from stdin", 1)]


async def test_stdin_is_not_closed() -> None:
    stdin = io.BytesIO(b'{"instruction": "hi"}\n')
    assert len(await collect(SourceConfig(path="-"), stdin=stdin)) == 1
    assert not stdin.closed


async def test_csv_line_numbers_follow_multiline_fields(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_text('instruction\n"two\nlines"\n\nlast\n', encoding="utf-8")
    got = prompts(await collect(SourceConfig(path=str(path))))
    assert [(p.instruction, p.line) for p in got] == [("two\nlines", 2), ("last", 5)]


# -- ids --------------------------------------------------------------------------------------


async def test_id_column_is_stringified(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "p.jsonl", [{"instruction": "a", "key": 7}, {"instruction": "b", "key": "x-1"}]
    )
    got = prompts(await collect(SourceConfig(path=str(path), id_column="key")))
    assert [p.id for p in got] == ["7", "x-1"]


async def test_hashed_ids_are_stable_and_follow_the_text(tmp_path: Path) -> None:
    rows = [{"instruction": "same"}, {"instruction": "other"}, {"instruction": "same"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    first = prompts(await collect(SourceConfig(path=str(path))))
    second = prompts(await collect(SourceConfig(path=str(write_csv(tmp_path / "p.csv", rows)))))
    assert [p.id for p in first] == [p.id for p in second]
    assert first[0].id == first[2].id != first[1].id
    assert len(first[0].id) == 16


async def test_missing_or_bad_id_is_a_problem(tmp_path: Path) -> None:
    rows: list[dict[str, Any]] = [
        {"instruction": "a", "id": 1},
        {"instruction": "b"},
        {"instruction": "c", "id": [1]},
    ]
    items = await collect(
        SourceConfig(path=str(write_jsonl(tmp_path / "p.jsonl", rows)), id_column="id")
    )
    assert isinstance(items[0], Prompt)
    assert [(p.line, "id" in p.error) for p in problems(items)] == [(2, True), (3, True)]


# -- bad rows are reported, the rest streams ---------------------------------------------------


async def test_bad_json_lines_are_reported_with_their_line(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_bytes(
        b'{"instruction": "one"}\n'
        b"{not json\n"
        b"\n"
        b"[1, 2]\n"
        b'{"instruction": 5}\n'
        b'{"prompt": "no instruction"}\n'
        b'{"instruction": "last"}'  # no final newline
    )
    items = await collect(SourceConfig(path=str(path)))
    assert [(p.instruction, p.line) for p in items if isinstance(p, Prompt)] == [
        ("one", 1),
        ("last", 7),
    ]
    bad = problems(items)
    assert [p.line for p in bad] == [2, 4, 5, 6]
    assert "invalid JSON" in bad[0].error
    assert "not a JSON object" in bad[1].error
    assert "not a string" in bad[2].error
    assert "no value in column `instruction`" in bad[3].error
    assert {p.path for p in bad} == {str(path)}


async def test_empty_prompt_is_a_problem_with_its_id(tmp_path: Path) -> None:
    rows = [
        {"instruction": "  \n\t", "id": "e1"},
        {"instruction": "", "id": "e2"},
        {"instruction": "fine", "id": "ok"},
    ]
    for path in (
        write_jsonl(tmp_path / "p.jsonl", rows),
        write_csv(tmp_path / "p.csv", rows),
        write_parquet(tmp_path / "p.parquet", rows),
    ):
        items = await collect(SourceConfig(path=str(path), id_column="id"))
        assert [(p.error, p.id) for p in problems(items)] == [
            ("empty prompt", "e1"),
            ("empty prompt", "e2"),
        ]
        assert [p.id for p in items if isinstance(p, Prompt)] == ["ok"]


async def test_non_utf8_line_is_a_problem(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"instruction": "ok"}\n{"instruction": "caf\xe9"}\n{"instruction": "on"}\n')
    items = await collect(SourceConfig(path=str(path)))
    assert [p.instruction for p in items if isinstance(p, Prompt)] == ["ok", "on"]
    [bad] = problems(items)
    assert bad.line == 2
    assert "UTF-8" in bad.error


async def test_non_utf8_csv_row_is_a_problem(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_bytes(b"instruction\nok\ncaf\xe9\non\n")
    items = await collect(SourceConfig(path=str(path)))
    assert [p.instruction for p in items if isinstance(p, Prompt)] == ["ok", "on"]
    [bad] = problems(items)
    assert (bad.line, "UTF-8" in bad.error) == (3, True)


# -- bad input fails up front -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["absent.jsonl", "absent.csv", "absent.json", "absent.parquet"])
async def test_missing_file_names_the_path(name: str, tmp_path: Path) -> None:
    path = tmp_path / name
    with pytest.raises(SourceError, match="no such file") as caught:
        await open_source(SourceConfig(path=str(path)))
    assert caught.value.path == str(path)
    assert str(path) in str(caught.value)


async def test_unknown_extension(tmp_path: Path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_text("hello\n")
    with pytest.raises(SourceError, match=r"unknown format '\.txt'.*\.jsonl"):
        await open_source(SourceConfig(path=str(path)))


@pytest.mark.parametrize("kind", ["jsonl", "json-array", "csv", "parquet"])
async def test_missing_column_lists_the_columns(kind: str, tmp_path: Path) -> None:
    path = make_file(kind, tmp_path)
    with pytest.raises(SourceError, match="no column `prompt`.*`id`, `instruction`, `extra`"):
        await open_source(SourceConfig(path=str(path), column="prompt"))
    with pytest.raises(SourceError, match="no column `uid`"):
        await open_source(SourceConfig(path=str(path), id_column="uid"))


async def test_json_that_does_not_decode_fails_up_front(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text('[{"instruction": "a"}, {"instruction": ')
    with pytest.raises(SourceError, match="invalid JSON"):
        await open_source(SourceConfig(path=str(path)))
    path.write_text('{\n  "instruction": "pretty-printed, not JSON lines"\n}\n')
    with pytest.raises(SourceError, match=r":1: not JSON lines: invalid JSON"):
        await open_source(SourceConfig(path=str(path)))
    path.write_text('["just", "strings"]')
    with pytest.raises(SourceError, match="not an object"):
        await open_source(SourceConfig(path=str(path)))


async def test_binary_file_is_not_text(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_bytes(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03" + bytes(range(256)))
    with pytest.raises(SourceError, match="not a text file"):
        await open_source(SourceConfig(path=str(path)))


async def test_parquet_column_must_hold_text(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "p.parquet", [{"instruction": 1}, {"instruction": 2}])
    with pytest.raises(SourceError, match="not strings"):
        await open_source(SourceConfig(path=str(path)))
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(SourceError, match="not a Parquet file"):
        await open_source(SourceConfig(path=str(tmp_path / "junk.parquet")))


async def test_empty_files_yield_nothing(tmp_path: Path) -> None:
    for name in ("e.jsonl", "e.json", "e.csv"):
        (tmp_path / name).write_bytes(b"")
        assert await collect(SourceConfig(path=str(tmp_path / name))) == []


# -- datasets -----------------------------------------------------------------------------------


async def test_saved_dataset_and_dataset_dict(tmp_path: Path) -> None:
    import datasets

    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    got = prompts(await collect(SourceConfig(dataset=str(tmp_path / "ds"), id_column="id")))
    assert [(p.id, p.instruction, p.line) for p in got] == [
        (str(row["id"]), row["instruction"], i + 1) for i, row in enumerate(ROWS)
    ]
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(ROWS),
            "test": datasets.Dataset.from_list(ROWS[:1]),
        }
    ).save_to_disk(str(tmp_path / "dd"))
    test = prompts(await collect(SourceConfig(dataset=str(tmp_path / "dd"), split="test")))
    assert [p.instruction for p in test] == TEXTS[:1]
    with pytest.raises(SourceError, match="no split 'validation'.*'train', 'test'"):
        await open_source(SourceConfig(dataset=str(tmp_path / "dd"), split="validation"))
    with pytest.raises(SourceError, match="no column `prompt`.*`instruction`"):
        await open_source(SourceConfig(dataset=str(tmp_path / "ds"), column="prompt"))
    with pytest.raises(SourceError, match="holds .*int64.*not strings"):
        await open_source(SourceConfig(dataset=str(tmp_path / "ds"), column="id"))


@pytest.mark.parametrize("streaming", [True, False])
async def test_folder_of_data_files_via_load_dataset(
    streaming: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    (tmp_path / "jsonl").mkdir()
    write_jsonl(tmp_path / "jsonl" / "train.jsonl", ROWS)
    (tmp_path / "parquet").mkdir()
    write_parquet(tmp_path / "parquet" / "train.parquet", ROWS)
    for folder in ("jsonl", "parquet"):
        config = SourceConfig(dataset=str(tmp_path / folder), streaming=streaming)
        got = prompts(await collect(config))
        assert [(p.instruction, p.line) for p in got] == [(t, i + 1) for i, t in enumerate(TEXTS)]
    with pytest.raises(SourceError, match="cannot load dataset"):
        await open_source(SourceConfig(dataset=str(tmp_path / "jsonl"), split="nope"))


async def test_unloadable_dataset_is_a_source_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="cannot load dataset") as caught:
        await open_source(SourceConfig(dataset=str(tmp_path / "no-such-folder")))
    assert caught.value.path == str(tmp_path / "no-such-folder")


# -- lifetimes ----------------------------------------------------------------------------------


def is_open(path: Path) -> bool:
    """Whether this process holds `path` open, as the OS sees it (Linux: /proc/self/fd)."""
    target = os.path.realpath(path)
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == target:
                return True
        except OSError:  # the fd of the listing itself, gone by now
            continue
    return False


async def test_early_stop_releases_the_file(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [{"instruction": f"p{i}"} for i in range(10_000)])
    source = await open_source(SourceConfig(path=str(path)))
    taken = []
    async for item in source:
        taken.append(item)
        if len(taken) == 3:
            break
    assert is_open(path), "still open mid-read (else the check below shows nothing)"
    await source.aclose()
    assert not is_open(path)
    assert [p.instruction for p in prompts(taken)] == ["p0", "p1", "p2"]
    assert [item async for item in source] == []
    await source.aclose()  # idempotent


@pytest.mark.parametrize("kind", ["csv", "parquet", "json-array"])
async def test_early_stop_other_formats(kind: str, tmp_path: Path) -> None:
    path = make_file(kind, tmp_path)
    source = await open_source(SourceConfig(path=str(path), id_column="id"))
    async with source:
        taken = []
        async for item in source:
            taken.append(item)
            break
        if kind != "json-array":  # a JSON array is read whole up front
            assert is_open(path), "still open mid-read (else the check below shows nothing)"
    assert [(p.id, p.instruction) for p in prompts(taken)] == [("1", TEXTS[0])]
    assert not is_open(path)


async def test_open_without_iterating_then_close(tmp_path: Path) -> None:
    path = make_file("jsonl", tmp_path)
    source = await open_source(SourceConfig(path=str(path)))
    async with source:
        assert is_open(path)
    assert not is_open(path), "closed by the source, not by collecting it"
    assert [item async for item in source] == []


async def test_cancelling_a_blocked_stdin_is_prompt() -> None:
    read_fd, write_fd = os.pipe()
    with io.FileIO(read_fd, "r") as stdin:
        with anyio.fail_after(2), anyio.move_on_after(0.1) as scope:
            await open_source(SourceConfig(path="-"), stdin=stdin)
        assert scope.cancelled_caught
        os.close(write_fd)  # EOF: the abandoned reader ends
        for thread in threading.enumerate():
            if thread.name == "streamfeedback stdin":
                await anyio.to_thread.run_sync(thread.join, 5)
                assert not thread.is_alive()


async def test_cancelled_read_closes_the_source(tmp_path: Path) -> None:
    path = make_file("jsonl", tmp_path)
    source = await open_source(SourceConfig(path=str(path)))
    with anyio.CancelScope() as scope:
        for _ in ROWS:  # the whole first chunk: the next step reads in a thread
            await source.__anext__()
        assert is_open(path)
        scope.cancel()
        await source.__anext__()
    assert scope.cancelled_caught
    assert not is_open(path)
    assert [item async for item in source] == []
