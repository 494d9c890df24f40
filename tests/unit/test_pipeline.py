from __future__ import annotations

import sys
import zlib
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import msgspec
import pytest

from streamfeedback import (
    ChatRequest,
    EngineRequestError,
    EngineUnavailable,
    Failure,
    Message,
    Pipeline,
    Prompt,
    Record,
)
from streamfeedback.engines import FakeEngine, SimEngine

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup, ExceptionGroup

from ..helpers import POOL, sim_config


def _prompts(count: int) -> list[dict[str, str]]:
    return [{"id": f"p{i:04d}", "instruction": f"Question number {i}?"} for i in range(count)]


async def _collect(pipeline: Pipeline, prompts: object) -> list[Record]:
    with anyio.fail_after(20):
        return [r async for r in pipeline.run(prompts)]  # type: ignore[arg-type]


async def _assert_closed(engine: SimEngine) -> None:
    """A closed engine refuses work: what `aclose` promises, seen from outside."""
    request = ChatRequest(id="after", messages=[Message("user", "still there?")], max_tokens=4)
    with pytest.raises(EngineUnavailable, match="closed"):
        await engine.generate(request)


async def test_every_prompt_gets_one_record_from_three_distinct_models(tmp_path: Path) -> None:
    config = sim_config(source={"path": "-", "id_column": "id"})
    async with Pipeline(config, failures_path=str(tmp_path / "f.ndjson")) as pipeline:
        records = await _collect(pipeline, _prompts(120))
        stats = pipeline.statistics()
    assert sorted(r.id for r in records) == [f"p{i:04d}" for i in range(120)]
    used = set()
    by_id = {r.id: r for r in records}
    for r in records:
        assert len(r.generations) == 3 and len(set(r.generation_models)) == 3
        assert set(r.generation_models) <= set(POOL)
        used.update(r.generation_models)
        assert r.ultrafeedback_model == "judge-1" and r.simulated
        # the sim judge rates a text by its content: alignment survives the whole pipeline
        assert r.ratings == [1 + zlib.crc32(g.encode()) % 5 for g in r.generations]
        assert all(
            f"org/{m}" in g for m, g in zip(r.generation_models, r.generations, strict=False)
        )
    for i in range(0, 120, 2):
        assert by_id[f"p{i:04d}"].generation_models == by_id[f"p{i + 1:04d}"].generation_models
    assert used == set(POOL)
    assert stats.records == 120 and stats.failures == 0 and stats.in_flight == 0
    assert not (tmp_path / "f.ndjson").exists() or (tmp_path / "f.ndjson").read_bytes() == b""


async def test_failed_generations_go_to_the_failures_file(tmp_path: Path) -> None:
    config = sim_config(pool=["a", "b", "c"], n=3, batch_size=1)

    def make(name: str) -> FakeEngine:
        def answer(request: ChatRequest) -> str:
            if name == "b" and "7" in request.messages[-1].content:
                raise EngineRequestError(name, "context length exceeded")
            return f"{name} says hi"

        return FakeEngine(name, answer)

    failures = tmp_path / "failures.ndjson"
    engines = {n: make(n) for n in "abc"}
    async with Pipeline(config, engines=engines, failures_path=str(failures)) as pipeline:
        records = await _collect(pipeline, [f"prompt {i}" for i in range(20)])
    failed = [
        msgspec.json.decode(line, type=Failure) for line in failures.read_bytes().splitlines()
    ]
    assert {f.instruction for f in failed} == {"prompt 7", "prompt 17"}
    assert all(f.stage == "generation" and "context length" in f.error for f in failed)
    assert len(records) == 18
    assert all(e.closed for e in engines.values())


async def test_engines_start_in_parallel_and_close_on_failed_start() -> None:
    config = sim_config()
    started: list[str] = []

    class Broken(FakeEngine):
        async def start(self) -> None:
            await anyio.sleep(0.05)
            raise EngineUnavailable(self.name, "no GPU 3")

    engines = {n: FakeEngine(n, lambda r: "x") for n in POOL}
    engines["delta"] = Broken("delta", lambda r: "x")
    with pytest.raises(EngineUnavailable, match="no GPU 3"):
        async with Pipeline(config, engines=engines):
            started.append("body")
    assert started == []
    assert all(e.closed for e in engines.values())


async def test_breaking_out_early_cancels_the_run_and_closes_engines() -> None:
    config = sim_config()
    engines = {n: SimEngine(n, config.generators[i]) for i, n in enumerate(POOL)}
    judge = SimEngine("j", config.rater, role="judge")
    with anyio.fail_after(10):
        async with Pipeline(config, engines=engines, judge_engine=judge) as pipeline:
            async for _record in pipeline.run(_prompts(5000)):
                break
    for engine in [*engines.values(), judge]:
        await _assert_closed(engine)


async def test_cancellation_from_outside_cleans_up() -> None:
    config = sim_config(generator={"sim_ttft": 10.0})
    engines = {n: SimEngine(n, config.generators[i]) for i, n in enumerate(POOL)}
    with anyio.move_on_after(0.3) as scope:
        async with Pipeline(config, engines=engines) as pipeline:
            async for _ in pipeline.run(_prompts(100)):
                pass
    assert scope.cancelled_caught
    for engine in engines.values():
        await _assert_closed(engine)


async def test_a_slow_consumer_back_pressures_the_source() -> None:
    config = sim_config(
        generator={"max_concurrency": 2},
        rater={"max_concurrency": 2},
        pipeline={"buffer": 2},
    )
    pulled = 0

    async def source() -> AsyncIterator[str]:
        nonlocal pulled
        for i in range(100_000):
            pulled += 1
            yield f"prompt {i}"

    with anyio.fail_after(10):
        async with Pipeline(config) as pipeline:
            records = pipeline.run(source())
            first = await records.receive()
            await anyio.wait_all_tasks_blocked()
            for _ in range(20):
                await anyio.sleep(0.01)
                await anyio.wait_all_tasks_blocked()
            assert first.id
            assert pulled < 150, f"the source ran ahead by {pulled} prompts"
            pipeline.stop_intake()
            rest = [r async for r in records]
    assert len(rest) + 1 == pipeline.statistics().read


async def test_stop_intake_finishes_what_is_in_flight() -> None:
    config = sim_config(generator={"sim_ttft": 0.01})
    async with Pipeline(config) as pipeline:
        records = pipeline.run(_prompts(10_000))
        got = [await records.receive() for _ in range(10)]
        pipeline.stop_intake()
        got += [r async for r in records]
        stats = pipeline.statistics()
    assert stats.read < 10_000
    assert len(got) == stats.read == stats.records
    assert len({r.id for r in got}) == len(got)


async def test_skip_ids_limit_and_duplicates() -> None:
    config = sim_config(source={"path": "-", "id_column": "id"})
    prompts = _prompts(30) + [{"id": "p0003", "instruction": "again"}]
    async with Pipeline(config, skip_ids={"p0001", "p0002"}, limit=10) as pipeline:
        records = await _collect(pipeline, prompts)
        stats = pipeline.statistics()
    assert sorted(r.id for r in records) == [f"p{i:04d}" for i in range(10) if i not in (1, 2)]
    assert stats.skipped == 2


async def _outcome(
    tmp_path: Path, source: dict[str, object], prompts: object = None
) -> tuple[list[str], list[dict[str, object]]]:
    """The record ids and the failures file of a run over `prompts` (None: the source)."""
    failures = tmp_path / ("from-file.ndjson" if prompts is None else "from-code.ndjson")
    async with Pipeline(sim_config(source=source), failures_path=str(failures)) as pipeline:
        records = await _collect(pipeline, prompts)
    lines = failures.read_bytes().splitlines() if failures.exists() else []
    return sorted(r.id for r in records), [msgspec.json.decode(line) for line in lines]


def _from(failures: list[dict[str, object]], path: str) -> list[dict[str, object]]:
    """Failures with their place-derived ids (`path:line`) named after `<prompts>`."""
    return [{**f, "id": str(f["id"]).replace(f"{path}:", "<prompts>:", 1)} for f in failures]


async def test_rows_from_code_fail_exactly_as_the_same_rows_from_a_file(tmp_path: Path) -> None:
    rows: list[dict[str, object]] = [
        {"id": "ok", "instruction": "A fine question?"},
        {"id": 1.5, "instruction": "a number for an id"},
        {"id": ["a"], "instruction": "an array for an id"},
        {"id": True, "instruction": "a boolean for an id"},
        {"id": None, "instruction": "no id"},
        {"instruction": "no id column at all"},
        {"id": "empty", "instruction": ""},
        {"id": "blank", "instruction": " \n\t"},
        {"id": "no-text"},
        {"id": "number-text", "instruction": 3},
        {"id": 7, "instruction": "an integer id is its digits"},
    ]
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(b"".join(msgspec.json.encode(row) + b"\n" for row in rows))
    source = {"path": str(path), "id_column": "id"}
    from_file = await _outcome(tmp_path, source)
    from_code = await _outcome(tmp_path, source, rows)
    assert from_code[0] == from_file[0] == ["7", "ok"]
    assert len(from_code[1]) == len(rows) - 2
    assert from_code[1] == _from(from_file[1], str(path))
    assert {f["error"] for f in from_code[1]} >= {
        "id column `id` holds a number, not a string or an integer",
        "no value in id column `id`",
        "empty prompt",
        "no value in column `instruction`",
    }


async def test_lone_surrogates_from_code_fail_as_undecodable_bytes_in_a_csv_file(
    tmp_path: Path,
) -> None:
    # A CSV file's undecodable bytes reach the row check as lone surrogates
    # (surrogateescape): a text from code holding one is no more valid UTF-8.
    path = tmp_path / "prompts.csv"
    path.write_bytes(b"id,instruction\nok,fine\na\xff,bad id\nb,bad \xfe text\n")
    rows = [
        {"id": "ok", "instruction": "fine"},
        {"id": "a\udcff", "instruction": "bad id"},
        {"id": "b", "instruction": "bad \udcfe text"},
    ]
    source = {"path": str(path), "id_column": "id"}
    ids, from_file = await _outcome(tmp_path, source)
    code_ids, from_code = await _outcome(tmp_path, source, rows)
    assert code_ids == ids == ["ok"]
    bad_id, bad_text = "id column `id` is not valid UTF-8", "not valid UTF-8"
    # the same failures, but a CSV file's line numbers count its header
    assert from_file == [
        {"id": f"{path}:3", "stage": "source", "error": bad_id, "line": 3},
        {"id": "b", "stage": "source", "error": bad_text, "line": 4},
    ]
    assert from_code == [
        {"id": "<prompts>:2", "stage": "source", "error": bad_id, "line": 2},
        {"id": "b", "stage": "source", "error": bad_text, "line": 3},
    ]


async def test_texts_from_code_pass_the_row_checks_too(tmp_path: Path) -> None:
    path = tmp_path / "prompts.jsonl"
    texts = ["A fine question?", "", "   ", "bad \udcfe text"]
    path.write_bytes(b"".join(msgspec.json.encode({"instruction": t}) + b"\n" for t in texts[:3]))
    ids, failures = await _outcome(tmp_path, {"path": "-"}, texts)
    from_file = await _outcome(tmp_path, {"path": str(path)})
    assert ids == from_file[0] and len(ids) == 1
    assert failures[:2] == _from(from_file[1], str(path))
    assert failures == [
        {"id": "<prompts>:2", "stage": "source", "error": "empty prompt", "line": 2},
        {"id": "<prompts>:3", "stage": "source", "error": "empty prompt", "line": 3},
        {"id": "<prompts>:4", "stage": "source", "error": "not valid UTF-8", "line": 4},
    ]


async def test_prompt_structs_from_code_pass_the_row_checks_too(tmp_path: Path) -> None:
    prompts: list[object] = [
        Prompt(id="ok", instruction="A fine question?", line=7),
        Prompt(id="blank", instruction="  "),
        Prompt(id="b\udcff", instruction="a bad id"),
        Prompt(id="t", instruction="bad \udcfe text"),
        42,
    ]
    ids, failures = await _outcome(tmp_path, {"path": "-"}, prompts)
    assert ids == ["ok"]
    assert failures == [
        {"id": "blank", "stage": "source", "error": "empty prompt", "line": 2},
        {
            "id": "<prompts>:3",
            "stage": "source",
            "error": "id column `id` is not valid UTF-8",
            "line": 3,
        },
        {"id": "t", "stage": "source", "error": "not valid UTF-8", "line": 4},
        {
            "id": "<prompts>:5",
            "stage": "source",
            "error": "a number, not a text or a row",
            "line": 5,
        },
    ]


async def test_run_needs_the_context_manager_and_runs_once() -> None:
    pipeline = Pipeline(sim_config())
    with pytest.raises(RuntimeError, match="async with"):
        pipeline.run([])
    async with pipeline:
        await _collect(pipeline, [])
        with pytest.raises(RuntimeError, match="once"):
            pipeline.run([])


async def test_unwrap_group_finds_the_cause_under_nested_groups_and_knock_on_errors() -> None:
    from streamfeedback import JudgeUnavailable
    from streamfeedback._pipeline import unwrap_group

    cause = JudgeUnavailable("judge: 401")
    nested = ExceptionGroup("rating", [cause, JudgeUnavailable("judge: 401")])
    group = BaseExceptionGroup("pipeline", [nested, anyio.BrokenResourceError()])
    assert unwrap_group(group) is cause
    bug = BaseExceptionGroup("pipeline", [nested, TypeError("a bug")])
    assert unwrap_group(bug) is bug
    assert unwrap_group(cause) is cause


async def test_nothing_is_in_flight_after_a_run_with_bad_rows_and_spooled_prompts(
    tmp_path: Path,
) -> None:
    """A bad row fails without entering the run, and a prompt rated from the spool enters it
    without being generated: once every record is out, nothing is in flight (the CLI reads 0
    as "complete" after a Ctrl-C that let the run finish)."""
    config = sim_config(source={"path": "-", "id_column": "id"})
    spool = str(tmp_path / "spool.ndjson")
    rows: list[object] = [*_prompts(6), {"id": "bad", "instruction": "   "}]
    async with Pipeline(
        config, failures_path=str(tmp_path / "f1.ndjson"), spool_path=spool, mode="generate"
    ) as pipeline:
        await _collect(pipeline, _prompts(3))
    async with Pipeline(
        config, failures_path=str(tmp_path / "f2.ndjson"), spool_path=spool
    ) as pipeline:
        records = await _collect(pipeline, rows)
        stats = pipeline.statistics()
        # the record stream ends once the failures are written too: the figures are final
        failed = (tmp_path / "f2.ndjson").read_bytes().splitlines()
    assert len(records) == 6 and stats.failures == 1 and len(failed) == 1
    assert stats.from_spool == 3 and stats.read == 3
    assert stats.in_flight == 0


async def test_the_spool_backlog_is_empty_once_the_judge_read_everything(tmp_path: Path) -> None:
    """An unreadable spool line (skipped with a warning) is read all the same: the backlog
    gauge ends at 0, not at the number of such lines."""
    config = sim_config(source={"path": "-", "id_column": "id"})
    spool = tmp_path / "spool.ndjson"
    spool.write_bytes(b'{"not a spool line": \n')
    async with Pipeline(
        config, failures_path=str(tmp_path / "f.ndjson"), spool_path=str(spool)
    ) as pipeline:
        records = await _collect(pipeline, _prompts(5))
        stats = pipeline.statistics()
    assert len(records) == 5 and stats.spool_backlog == 0
