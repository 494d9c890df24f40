from __future__ import annotations

from pathlib import Path

from streamfeedback import Failure
from streamfeedback._channels import open_channel
from streamfeedback._stages.sink import NdjsonWriter, drain, read_done_ids


async def test_writer_appends_whole_lines(tmp_path: Path) -> None:
    path = tmp_path / "out" / "f.ndjson"
    async with NdjsonWriter(str(path)) as writer:
        await writer.write_many([Failure(id="a", stage="s", error="e")])
    async with NdjsonWriter(str(path)) as writer:
        tx, rx = open_channel[Failure](10)
        for i in range(5):
            tx.send_nowait(Failure(id=f"b{i}", stage="s", error="e"))
        tx.close()
        async with rx:
            assert await drain(rx, writer) == 5
    lines = path.read_bytes().splitlines(keepends=True)
    assert len(lines) == 6 and all(line.endswith(b"\n") for line in lines)
    ids, torn = read_done_ids(str(path))
    assert len(ids) == 6 and torn == 0
    assert all(i in ids for i in ["a", "b0", "b1", "b2", "b3", "b4"])


def test_torn_last_line_is_cut_and_not_counted(tmp_path: Path) -> None:
    path = tmp_path / "out.ndjson"
    path.write_bytes(b'{"id":"a","x":1}\n{"id":"b"}\nnot json\n{"id":"c","gen')
    ids, torn = read_done_ids(str(path))
    assert len(ids) == 2 and "a" in ids and "b" in ids and "c" not in ids
    assert torn == len(b'{"id":"c","gen')
    assert path.read_bytes() == b'{"id":"a","x":1}\n{"id":"b"}\nnot json\n'


def test_missing_output_means_nothing_done(tmp_path: Path) -> None:
    ids, torn = read_done_ids(str(tmp_path / "none.ndjson"))
    assert len(ids) == 0 and torn == 0
