from __future__ import annotations

import msgspec

from streamfeedback._config import GeneratorConfig
from streamfeedback.engines import SimEngine

from .engine_contract import check_engine


def _config(**kw: object) -> GeneratorConfig:
    return msgspec.convert({"backend": "sim", "model": "sim-7b", **kw}, GeneratorConfig)


async def test_sim_engine_meets_the_contract() -> None:
    await check_engine(SimEngine("sim-7b", _config()))


async def test_sim_engine_with_latency_meets_the_contract() -> None:
    await check_engine(SimEngine("sim-7b", _config(sim_ttft=0.01, sim_tpot=0.0005, sim_slots=4)))


async def test_sim_engine_runs_at_most_slots_sequences_at_once() -> None:
    engine = SimEngine("sim-7b", _config(sim_ttft=0.02, sim_slots=3))
    await check_engine(engine, concurrency=12)
    assert engine.core.peak_running == 3


async def test_instant_answers_equal_the_streamed_ones() -> None:
    """The instant path skips the vLLM-shaped stream; it must answer exactly as it would."""
    from streamfeedback import ChatRequest, Message
    from streamfeedback._judge.aspects import build_messages

    instant = SimEngine("sim-7b", _config(max_tokens=80))
    streamed = SimEngine("sim-7b", _config(max_tokens=80, sim_ttft=0.0001))
    judges = [
        SimEngine("judge", _config(**cfg), role="judge") for cfg in ({}, {"sim_ttft": 0.0001})
    ]
    requests = [
        ChatRequest(id=f"p{i}:m", messages=[Message("user", f"q{i}")], max_tokens=80, seed=i)
        for i in range(40)
    ]
    for request in requests:
        a, b = await instant.generate(request), await streamed.generate(request)
        assert (a.text, a.prompt_tokens, a.completion_tokens, a.finish_reason) == (
            b.text,
            b.prompt_tokens,
            b.completion_tokens,
            b.finish_reason,
        )
    assert {r.finish_reason for r in [await instant.generate(q) for q in requests]} == {
        "stop",
        "length",
    }
    ask = ChatRequest(
        id="j", messages=build_messages("honesty", "q", ["one", "two", "three"]), max_tokens=500
    )
    a, b = await judges[0].generate(ask), await judges[1].generate(ask)
    assert a.text == b.text and a.completion_tokens == b.completion_tokens
    assert a.text.count("#### Output for Text") == 3
