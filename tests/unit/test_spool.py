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
    in_tx, in_rx = open_channel[Generation](4)
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
                    for gen in item.generations:
                        await in_tx.send(gen)
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
    assert spool.read_from_memory == 100 and spool.read_from_file == 0
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
    scan = scan_spool(str(path))
    assert len(scan.complete) == 5 and scan.torn > 0 and not scan.partial
    assert all(f"p{i}" in scan.complete for i in range(5))
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


# A spool line as the first format (v1) wrote it: a whole prompt, no "v", no slots.
V1_LINE = (
    b'{"id":"old1","instruction":"an old question","line":3,"index":3,"generations":['
    b'{"model":"a","text":"a says","completion_tokens":2,"finish_reason":"stop","latency_s":0.5},'
    b'{"model":"b","text":"b says","replaced":"c","replaced_because":"c: down"}]}\n'
)


async def _read_all(path: Path, done: IdSet | None = None) -> list[Joined]:
    spool = Spool(str(path), done=done)
    spool.finish()
    out_tx, out_rx = open_channel[Joined](100)
    await spool.read(out_tx)
    async with out_rx:
        return [j async for j in out_rx]


async def test_a_spool_in_the_first_format_still_reads_back(tmp_path: Path) -> None:
    path = tmp_path / "s.ndjson"
    later = b"".join(
        msgspec.json.encode(SpoolEntry.of(g, first=k == 0)) + b"\n"
        for k, g in enumerate(_joined(7).generations)
    )
    path.write_bytes(V1_LINE + later)
    scan = scan_spool(str(path))
    assert "old1" in scan.complete and "p7" in scan.complete and not scan.partial
    for joined in (await _read_all(path), [j async for j in read_spool(str(path))]):
        assert [j.prompt.id for j in joined] == ["old1", "p7"]
        old = joined[0]
        assert old.prompt == Prompt(id="old1", instruction="an old question", line=3, index=3)
        assert [(g.slot, g.model, g.text) for g in old.generations] == [
            (0, "a", "a says"),
            (1, "b", "b says"),
        ]
        assert old.generations[0].latency_s == 0.5 and old.generations[1].replaced == "c"
        assert joined[1] == _joined(7)


async def test_a_line_of_a_later_version_reads_with_its_unknown_fields_ignored(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s.ndjson"
    path.write_bytes(
        b'{"v":3,"id":"n1","instruction":"q","models":["a"],"shard":"x",'
        b'"generations":[{"slot":0,"model":"a","text":"t","logprobs":[0.1]}]}\n'
    )
    assert [j.generations[0].text for j in await _read_all(path)] == ["t"]


async def test_a_prompt_spooled_in_part_is_joined_once_its_last_response_arrives(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s.ndjson"
    first, second = _joined(1).generations
    path.write_bytes(msgspec.json.encode(SpoolEntry.of(first, first=True)) + b"\n")
    scan = scan_spool(str(path))
    assert not len(scan.complete) and scan.partial == {"p1": (("a", "b"), frozenset({0}))}
    assert await _read_all(path) == [], "an incomplete prompt is not rated"

    spool = Spool(str(path), resumed=scan.partial)  # the rerun brings the missing response
    got = await _through(spool, [Joined(prompt=first.prompt, generations=[second])])
    assert got == [_joined(1)]
    assert spool.appended == 1
    assert len(scan_spool(str(path)).complete) == 1


async def test_a_dropped_prompt_is_not_waited_for_and_its_responses_stay(tmp_path: Path) -> None:
    path = tmp_path / "s.ndjson"
    spool = Spool(str(path))
    spool.drop("p1")
    first, _ = _joined(1).generations
    got = await _through(spool, [Joined(prompt=first.prompt, generations=[first]), _joined(2)])
    assert [j.prompt.id for j in got] == ["p2"]
    assert scan_spool(str(path)).partial == {"p1": (("a", "b"), frozenset({0}))}


async def test_a_prompt_routed_afresh_drops_the_responses_of_its_old_routing(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s.ndjson"
    old = Generation(
        prompt=Prompt(id="p1", instruction="question 1", index=2),
        models=("a", "gone"),
        slot=0,
        model="a",
        text="old answer",
    )
    path.write_bytes(msgspec.json.encode(SpoolEntry.of(old, first=True)) + b"\n")
    spool = Spool(str(path))
    in_tx, in_rx = open_channel[Generation](4)
    out_tx, out_rx = open_channel[Joined](4)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg, out_rx:
            tg.start_soon(spool.write, in_rx)
            tg.start_soon(spool.read, out_tx)
            await anyio.wait_all_tasks_blocked()  # the old line is read: the rest from memory
            assert spool.read_from_file == 1
            async with in_tx:
                for gen in _joined(1).generations:  # routed to ("a", "b") this time
                    await in_tx.send(gen)
            got = [j async for j in out_rx]
    assert spool.read_from_memory == 2
    assert got == [_joined(1)]
