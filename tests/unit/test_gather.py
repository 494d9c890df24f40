from __future__ import annotations

import anyio

from streamfeedback import Failure, Generation, GenerationFailure, Joined, Prompt
from streamfeedback._channels import open_channel
from streamfeedback._stages import gather


def _gen(prompt: Prompt, models: tuple[str, ...], slot: int) -> Generation:
    return Generation(
        prompt=prompt,
        models=models,
        slot=slot,
        model=models[slot],
        text=f"{prompt.id} by {models[slot]}",
    )


async def _run(
    items: list[Generation | GenerationFailure], *, completed: list[str] | None = None
) -> tuple[list[Joined], list[Failure]]:
    joined_tx, joined_rx = open_channel[Joined](100)
    fail_tx, fail_rx = open_channel[Failure](100)
    on_complete = None if completed is None else completed.append
    with anyio.fail_after(5):
        async with gather.Gather(joined_tx, fail_tx, on_complete=on_complete) as join:
            for item in items:
                await join.send(item)
    async with joined_rx, fail_rx:
        return [j async for j in joined_rx], [f async for f in fail_rx]


async def test_joins_in_routing_order_whatever_the_finish_order() -> None:
    models = ("x", "y", "z")
    p1, p2 = Prompt(id="1", instruction="a"), Prompt(id="2", instruction="b")
    items: list[Generation | GenerationFailure] = [
        _gen(p1, models, 2),
        _gen(p2, models, 1),
        _gen(p1, models, 0),
        _gen(p2, models, 2),
        _gen(p2, models, 0),
        _gen(p1, models, 1),
    ]
    joined, failures = await _run(items)
    assert failures == []
    assert [j.prompt.id for j in joined] == ["2", "1"]
    for j in joined:
        assert [g.model for g in j.generations] == ["x", "y", "z"]
        assert all(g.text == f"{j.prompt.id} by {g.model}" for g in j.generations)


async def test_a_failed_generation_fails_the_prompt_once_all_answers_are_in() -> None:
    models = ("x", "y")
    p = Prompt(id="1", instruction="a", line=7)
    failed = GenerationFailure(prompt=p, models=models, slot=1, model="y", error="boom")
    joined, failures = await _run([failed, _gen(p, models, 0)])
    assert joined == []
    assert len(failures) == 1
    assert failures[0].id == "1" and failures[0].stage == "generation"
    assert "boom" in failures[0].error and failures[0].model == "y" and failures[0].line == 7


async def test_incomplete_joins_at_end_of_stream_become_failures() -> None:
    p = Prompt(id="1", instruction="a")
    joined, failures = await _run([_gen(p, ("x", "y"), 0)])
    assert joined == [] and [f.id for f in failures] == ["1"]


async def test_completion_is_reported_once_per_prompt_when_its_last_answer_arrives() -> None:
    models = ("x", "y")
    p1, p2 = Prompt(id="1", instruction="a"), Prompt(id="2", instruction="b")
    completed: list[str] = []
    items: list[Generation | GenerationFailure] = [
        _gen(p1, models, 0),
        _gen(p2, models, 1),
        _gen(p2, models, 0),
        _gen(p1, models, 1),
    ]
    joined, _ = await _run(items, completed=completed)
    assert completed == ["2", "1"] == [j.prompt.id for j in joined]


async def test_an_error_inside_the_table_closes_the_outputs_without_reporting() -> None:
    joined_tx, joined_rx = open_channel[Joined](10)
    fail_tx, fail_rx = open_channel[Failure](10)
    p = Prompt(id="1", instruction="a")
    try:
        async with gather.Gather(joined_tx, fail_tx) as join:
            await join.send(_gen(p, ("x", "y"), 0))
            raise RuntimeError("a worker died")
    except RuntimeError:
        pass
    with anyio.fail_after(5), joined_rx, fail_rx:
        assert [j async for j in joined_rx] == [] and [f async for f in fail_rx] == []
