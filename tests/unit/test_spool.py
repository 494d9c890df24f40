from __future__ import annotations

from pathlib import Path

import anyio
import msgspec
import pytest

from streamfeedback import ChatRequest, EngineUnavailable, Generation, Joined, Pipeline, Prompt
from streamfeedback._channels import open_channel
from streamfeedback._idset import IdSet
from streamfeedback._stages.spool import Spool, SpoolEntry, read_spool, scan_spool
from streamfeedback.engines import SimEngine

from ..helpers import POOL, sim_config


def _joined(i: int) -> Joined:
    prompt = Prompt(id=f"p{i}", instruction=f"question {i}", line=i + 1, index=i + 1)
    models = ("a", "b")
    return Joined(
        prompt=prompt,
        generations=[
            Generation(
                prompt=prompt,
                models=models,
                slot=k,
                model=m,
                text=f"{m} answers {i}",
                completion_tokens=3,
                finish_reason="stop",
                latency_s=0.5,
            )
            for k, m in enumerate(models)
        ],
    )


async def _through(spool: Spool, items: list[Joined], *, reader_delay: float = 0.0) -> list[Joined]:
    in_tx, in_rx = open_channel[Joined](4)
    out_tx, out_rx = open_channel[Joined](0)
    got: list[Joined] = []

    async def consume() -> None:
        async with out_rx:
            async for item in out_rx:
                got.append(item)
                if reader_delay:
                    await anyio.sleep(reader_delay)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(spool.write, in_rx)
            tg.start_soon(spool.read, out_tx)
            tg.start_soon(consume)
            async with in_tx:
                for item in items:
                    await in_tx.send(item)
    return got


def test_entries_round_trip_with_their_metadata() -> None:
    joined = _joined(3)
    entry = SpoolEntry.from_joined(joined)
    again = msgspec.json.decode(msgspec.json.encode(entry), type=SpoolEntry).to_joined()
    assert again == joined


async def test_a_judge_that_keeps_up_reads_from_memory(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path / "s.ndjson"), cache=1024)
    got = await _through(spool, [_joined(i) for i in range(50)])
    assert [j.prompt.id for j in got] == [f"p{i}" for i in range(50)]
    assert spool.read_from_memory == 50 and spool.read_from_file == 0
    assert [j.prompt.id async for j in read_spool(spool.path)] == [f"p{i}" for i in range(50)]


async def test_a_slow_judge_reads_back_from_the_file_and_memory_stays_bounded(
    tmp_path: Path,
) -> None:
    spool = Spool(str(tmp_path / "s.ndjson"), cache=4)
    got = await _through(spool, [_joined(i) for i in range(60)], reader_delay=0.005)
    assert got == [_joined(i) for i in range(60)]
    assert spool.read_from_file > 0
    assert len(spool._cache) <= 4


async def test_resume_skips_done_ids_and_repairs_a_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "s.ndjson"
    spool = Spool(str(path))
    await _through(spool, [_joined(i) for i in range(5)])
    with path.open("ab") as fh:
        fh.write(b'{"v":1,"id":"p9","instr')
    ids, entries, torn = scan_spool(str(path))
    assert entries == 5 and torn > 0 and all(f"p{i}" in ids for i in range(5))
    done = IdSet()
    done.add("p1")
    rerun = Spool(str(path), done=done)
    rerun.finish()
    out_tx, out_rx = open_channel[Joined](10)
    await rerun.read(out_tx)
    async with out_rx:
        assert [j.prompt.id async for j in out_rx] == ["p0", "p2", "p3", "p4"]


async def test_generation_finishes_long_before_a_slow_judge_and_frees_the_engines(
    tmp_path: Path,
) -> None:
    config = sim_config(rater={"sim_ttft": 0.02, "sim_slots": 2, "max_concurrency": 2})
    engines = {n: SimEngine(n, config.generators[i]) for i, n in enumerate(POOL)}
    spool = tmp_path / "spool.ndjson"
    seen_at: int | None = None
    async with Pipeline(config, engines=engines, spool_path=str(spool)) as pipeline:
        count = 0
        async for _ in pipeline.run([f"q{i}" for i in range(100)]):
            count += 1
            if pipeline.generation_done and seen_at is None:
                seen_at = count
                for engine in engines.values():  # released at once: a closed engine refuses
                    with pytest.raises(EngineUnavailable, match="closed"):
                        await engine.generate(ChatRequest(id="x", messages=[], max_tokens=1))
    assert count == 100
    assert seen_at is not None and seen_at < 30, f"generation done only after {seen_at} ratings"
    assert pipeline.statistics().spooled == 100


async def test_generate_mode_needs_a_spool() -> None:
    with pytest.raises(ValueError, match="spool"):
        Pipeline(sim_config(), mode="generate")


async def test_an_id_repeated_by_earlier_runs_is_rated_once(tmp_path: Path) -> None:
    path = tmp_path / "s.ndjson"
    line = msgspec.json.encode(SpoolEntry.from_joined(_joined(1))) + b"\n"
    path.write_bytes(line + line + msgspec.json.encode(SpoolEntry.from_joined(_joined(2))) + b"\n")
    spool = Spool(str(path))
    spool.finish()
    out_tx, out_rx = open_channel[Joined](10)
    await spool.read(out_tx)
    async with out_rx:
        assert [j.prompt.id async for j in out_rx] == ["p1", "p2"]
