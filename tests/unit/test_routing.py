from __future__ import annotations

from collections import Counter

import anyio

from streamfeedback import GenerationJob, Prompt
from streamfeedback._channels import open_channel
from streamfeedback._stages import routing
from streamfeedback._stages.routing import models_for_batch

POOL = ["a", "b", "c", "d", "e", "f"]


async def _route(
    prompts: list[Prompt], *, n: int = 3, batch_size: int = 2, seed: int = 0
) -> dict[str, list[GenerationJob]]:
    prompts_tx, prompts_rx = open_channel[Prompt](len(prompts))
    queues = {name: open_channel[GenerationJob](1000) for name in POOL}
    for p in prompts:
        prompts_tx.send_nowait(p)
    prompts_tx.close()
    with anyio.fail_after(5):
        await routing.run(
            prompts_rx,
            {k: tx for k, (tx, _) in queues.items()},
            n=n,
            batch_size=batch_size,
            seed=seed,
        )
    out: dict[str, list[GenerationJob]] = {}
    for name, (_, rx) in queues.items():
        async with rx:
            out[name] = [job async for job in rx]
    return out


def _prompts(count: int) -> list[Prompt]:
    return [Prompt(id=f"p{i}", instruction=f"q{i}", index=i) for i in range(1, count + 1)]


async def test_each_prompt_goes_to_n_distinct_models_and_batches_share_them() -> None:
    routed = await _route(_prompts(100))
    by_prompt: dict[str, list[GenerationJob]] = {}
    for jobs in routed.values():
        for job in jobs:
            by_prompt.setdefault(job.prompt.id, []).append(job)
    assert len(by_prompt) == 100
    for jobs in by_prompt.values():
        models = jobs[0].models
        assert len(set(models)) == 3
        assert sorted(j.slot for j in jobs) == [0, 1, 2]
        assert all(j.models == models for j in jobs)
        assert {models[j.slot] for j in jobs} == set(models)
    for i in range(1, 100, 2):
        assert by_prompt[f"p{i}"][0].models == by_prompt[f"p{i + 1}"][0].models
    assert all(routed[name] for name in POOL), "all six models get used"


async def test_same_seed_same_routing_and_skips_do_not_shift_it() -> None:
    full = await _route(_prompts(40))
    resumed = await _route([p for p in _prompts(40) if p.index % 3])
    first = {j.prompt.id: j.models for jobs in full.values() for j in jobs}
    second = {j.prompt.id: j.models for jobs in resumed.values() for j in jobs}
    assert all(first[k] == v for k, v in second.items())
    other = await _route(_prompts(40), seed=1)
    third = {j.prompt.id: j.models for jobs in other.values() for j in jobs}
    assert third != first


def test_draws_are_spread_over_the_pool() -> None:
    counts = Counter(m for b in range(3000) for m in models_for_batch(POOL, n=3, seed=0, batch=b))
    assert set(counts) == set(POOL)
    assert max(counts.values()) / min(counts.values()) < 1.2


async def test_per_prompt_mode() -> None:
    routed = await _route(_prompts(60), batch_size=1)
    models = {j.prompt.id: j.models for jobs in routed.values() for j in jobs}
    assert len(set(models.values())) > 10
