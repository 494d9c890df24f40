from __future__ import annotations

import anyio

from streamfeedback import (
    ChatRequest,
    EngineRequestError,
    Generation,
    GenerationFailure,
    GenerationJob,
    Prompt,
)
from streamfeedback._pool import Pool
from streamfeedback._stages import generation
from streamfeedback.engines import FakeEngine

from ..helpers import sim_config


async def test_dispatch_is_continuous_up_to_the_concurrency_bound() -> None:
    release = anyio.Event()

    async def slow(request: ChatRequest) -> str:
        await release.wait()
        if "bad" in request.messages[-1].content:
            raise EngineRequestError("fake", "prompt too long")
        return "ok"

    engine = FakeEngine("alpha", slow)
    config = sim_config(generator={"system_prompt": "be brief", "max_tokens": 77}).generators[0]
    pool = Pool({"alpha": engine}, {"alpha": config})
    jobs_tx, jobs_rx = anyio.create_memory_object_stream[GenerationJob](0)
    out_tx, out_rx = anyio.create_memory_object_stream[Generation | GenerationFailure](100)
    results: list[Generation | GenerationFailure] = []
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: generation.run("alpha", pool, jobs_rx, out_tx, concurrency=40))
            async with jobs_tx:
                for i in range(40):
                    text = "bad" if i == 3 else f"q{i}"
                    prompt = Prompt(id=f"p{i}", instruction=text)
                    await jobs_tx.send(GenerationJob(prompt=prompt, models=("alpha",), slot=0))
                await anyio.wait_all_tasks_blocked()
                assert engine.in_flight == 40, "every job is in flight before any finishes"
                release.set()
        out_tx.close()
        async with out_rx:
            results = [r async for r in out_rx]
    assert len(results) == 40
    failures = [r for r in results if isinstance(r, GenerationFailure)]
    assert [f.prompt.id for f in failures] == ["p3"]
    assert "prompt too long" in failures[0].error
    request = engine.requests[0]
    assert request.max_tokens == 77
    assert [m.role for m in request.messages] == ["system", "user"]


async def test_principles_add_a_seeded_system_prompt_and_are_recorded() -> None:
    from streamfeedback import Pipeline
    from streamfeedback._principles import PRINCIPLES

    config = sim_config(principles={"sets": ["honesty", "verbalized_calibration"], "seed": 3})
    runs = []
    for _ in range(2):
        engines = {g.label: FakeEngine(g.label, lambda r: "answer") for g in config.generators}
        async with Pipeline(config, engines=engines) as pipeline:
            runs.append([r async for r in pipeline.run([f"q{i}" for i in range(30)])])
    first = {r.id: r.principles for r in runs[0]}
    assert first == {r.id: r.principles for r in runs[1]}, "same seed, same principles"
    used = {p for r in runs[0] for p in (r.principles or [])}
    assert used == {"honesty", "verbalized_calibration"}
    wordings = {w for name in used for w in PRINCIPLES[name]}
    for engine in engines.values():
        for request in engine.requests:
            assert request.messages[0].role == "system"
            assert request.messages[0].content in wordings
