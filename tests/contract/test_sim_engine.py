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
