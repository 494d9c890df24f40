from __future__ import annotations

import io
from pathlib import Path

import anyio
import pytest

from streamfeedback import Pipeline, SourceConfig
from streamfeedback._progress import render, show_progress
from streamfeedback._total import Total, expected_prompts

from ..helpers import sim_config


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


async def test_progress_draws_in_place_on_a_terminal_and_never_on_stdout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COLUMNS", "300")
    config = sim_config(
        generator={"sim_ttft": 0.05, "sim_slots": 2}, rater={"requests_per_minute": 600}
    )
    screen = _Tty()
    async with Pipeline(config) as pipeline, anyio.create_task_group() as tg:
        records = pipeline.run([f"q{i}" for i in range(40)])
        tg.start_soon(lambda: show_progress(pipeline, total=40, stream=screen, interval=0.05))
        got = [r async for r in records]
        tg.cancel_scope.cancel()
    text = screen.getvalue()
    assert len(got) == 40
    frames = [f for f in text.split("\r\x1b[K") if f]
    assert frames, "at least one frame was drawn"
    last = frames[-1]
    assert "records" in last and "/s" in last
    assert any("in flight alpha:" in f for f in frames), "engines show while they generate"
    assert "judge" in last and "of 600" in last
    assert "ETA" in text
    assert text.endswith("\r\x1b[K"), "the line is cleared at the end"


async def test_the_line_fits_the_terminal_and_shows_the_total_and_percentage() -> None:
    pool = [f"a-rather-long-model-name-number-{i}" for i in range(6)]
    config = sim_config(pool=pool, generator={"sim_ttft": 0.05, "sim_slots": 2})
    async with Pipeline(config) as pipeline, anyio.create_task_group() as tg:
        records = pipeline.run([f"q{i}" for i in range(30)])
        seen: list[str] = []

        async def take() -> None:
            async for _ in records:
                if len(seen) < 3:
                    seen.append(render(pipeline, 2.0, 30.0, total=30, elapsed=1.0))
                    for width in (40, 80, 120):
                        line = render(pipeline, 2.0, 30.0, total=30, elapsed=1.0, width=width)
                        assert len(line) <= width, line
                        seen.append(line)

        tg.start_soon(take)
    wide = render(pipeline, 2.0, 30.0, total=30, elapsed=1.0)
    assert wide.startswith("30/30 records (100%)")
    full = seen[0]
    assert "/30 records (" in full and "ETA" in full and "elapsed" in full
    assert all(name in full for name in pool), "model names are whole where there is room"
    narrow = seen[1]
    assert "/30 records (" in narrow and "%" in narrow, narrow
    eighty = seen[2]
    assert "ETA" in eighty and "in flight" in eighty, eighty


def test_expected_prompts_under_limit_and_shard() -> None:
    assert expected_prompts(100) == 100
    assert expected_prompts(100, limit=30) == 30
    assert expected_prompts(10, limit=30) == 10
    assert expected_prompts(None, limit=30) == 30
    assert expected_prompts(None) is None
    assert [expected_prompts(10, shard=(i, 3)) for i in range(3)] == [4, 3, 3]


async def test_a_narrow_terminal_gets_a_line_that_does_not_wrap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COLUMNS", "60")
    config = sim_config(generator={"sim_ttft": 0.05, "sim_slots": 2})
    screen = _Tty()
    async with Pipeline(config) as pipeline, anyio.create_task_group() as tg:
        records = pipeline.run([f"q{i}" for i in range(40)])
        tg.start_soon(lambda: show_progress(pipeline, total=40, stream=screen, interval=0.05))
        got = [r async for r in records]
        tg.cancel_scope.cancel()
    frames = [f for f in screen.getvalue().split("\r\x1b[K") if f]
    assert len(got) == 40 and frames
    assert all(len(f) < 60 for f in frames), frames
    assert all("/40 records (" in f for f in frames), frames


async def test_the_total_is_counted_from_a_file_a_parquet_file_and_a_dataset(
    tmp_path: Path,
) -> None:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "p.jsonl").write_text("".join(f'{{"instruction": "q{i}"}}\n' for i in range(7)))
    (tmp_path / "tail.jsonl").write_text('{"instruction": "a"}\n{"instruction": "b"}')
    (tmp_path / "p.csv").write_text('instruction\n"multi\nline"\nplain\n')
    pq.write_table(pa.table({"instruction": ["a", "b", "c"]}), tmp_path / "p.parquet")
    datasets.Dataset.from_dict({"instruction": ["x"] * 5}).save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict(
        {"test": datasets.Dataset.from_dict({"instruction": ["y"] * 4})}
    ).save_to_disk(str(tmp_path / "dd"))
    cases = [
        (SourceConfig(path=str(tmp_path / "p.jsonl")), 7),
        (SourceConfig(path=str(tmp_path / "tail.jsonl")), 2),
        (SourceConfig(path=str(tmp_path / "p.csv")), 2),
        (SourceConfig(path=str(tmp_path / "p.parquet")), 3),
        (SourceConfig(dataset=str(tmp_path / "ds")), 5),
        (SourceConfig(dataset=str(tmp_path / "dd"), split="test"), 4),
        (SourceConfig(path="-"), None),
        (SourceConfig(path=str(tmp_path / "missing.jsonl")), None),
    ]
    for source, expected in cases:
        total = Total()
        await total.count(source)
        assert total.value == expected, source
    limited = Total()
    await limited.count(cases[0][0], limit=5, shard=(1, 2))
    assert limited.value == 2
