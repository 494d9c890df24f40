from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from streamfeedback import (
    ChatRequest,
    EngineBusy,
    EngineRequestError,
    EngineUnavailable,
    Failure,
    Pipeline,
    PoolUnavailable,
)
from streamfeedback._pool import Pool
from streamfeedback.engines import FakeEngine

from ..helpers import POOL, sim_config


def _engines(broken: str, error: type[Exception] = EngineUnavailable) -> dict[str, FakeEngine]:
    def make(name: str) -> FakeEngine:
        def answer(request: ChatRequest) -> str:
            if name == broken:
                raise error(name, "server is gone")
            return f"{name} answers"

        return FakeEngine(name, answer)

    return {name: make(name) for name in POOL}


async def test_a_failing_model_is_substituted_and_leaves_routing(tmp_path: Path) -> None:
    config = sim_config(routing={"n": 3, "batch_size": 2, "cooldown": 3600})
    engines = _engines("charlie", EngineBusy)
    async with Pipeline(config, engines=engines, failures_path=str(tmp_path / "f")) as pipeline:
        records = [r async for r in pipeline.run([f"q{i}" for i in range(200)])]
    assert len(records) == 200
    substituted = cooled = 0
    for r in records:
        assert len(set(r.generation_models)) == 3 and "charlie" not in r.generation_models
        assert all(
            g == f"{m} answers" for g, m in zip(r.generations, r.generation_models, strict=True)
        )
        for sub in r.substitutions or []:
            substituted += 1
            assert sub.failed_model == "charlie" and "server is gone" in sub.error
            assert r.generation_models[sub.slot] == sub.model
            cooled += "cooling down" in sub.error or "left the run" in sub.error
    assert substituted > 0
    assert cooled > 0, "jobs queued for charlie after it cooled down went elsewhere unasked"
    assert cooled + len(engines["charlie"].requests) == substituted
    assert pipeline.pool.cooldowns() == {"charlie": 1}
    assert pipeline.pool.gone("charlie"), "it never answered: a dead end, not a bad patch"
    asked = len(engines["charlie"].requests)
    assert asked < 40, f"charlie should leave routing once it cools down, was asked {asked}x"
    assert not (tmp_path / "f").exists()


async def test_fail_policy_sends_the_prompt_to_the_failures_file(tmp_path: Path) -> None:
    config = sim_config(routing={"n": 3, "on_generation_failure": "fail", "cooldown": 3600})
    failures = tmp_path / "f.ndjson"
    async with Pipeline(config, engines=_engines("charlie"), failures_path=str(failures)) as p:
        records = [r async for r in p.run([f"q{i}" for i in range(60)])]
    failed = [msgspec.json.decode(x, type=Failure) for x in failures.read_bytes().splitlines()]
    assert failed and len(records) + len(failed) == 60
    assert all(f.stage == "generation" and f.model == "charlie" for f in failed)


async def test_with_no_model_left_the_prompt_fails(tmp_path: Path) -> None:
    config = sim_config(pool=["alpha", "bravo", "charlie"], n=3)
    engines = {
        n: e
        for n, e in _engines("charlie", EngineRequestError).items()
        if n in ("alpha", "bravo", "charlie")
    }
    failures = tmp_path / "f.ndjson"
    async with Pipeline(config, engines=engines, failures_path=str(failures)) as p:
        records = [r async for r in p.run(["q"])]
    assert records == []
    (failed,) = [msgspec.json.decode(x, type=Failure) for x in failures.read_bytes().splitlines()]
    assert "server is gone" in failed.error


def test_substitutes_are_distinct_per_prompt_and_prefer_healthy_models() -> None:
    now = [0.0]
    pool = Pool(
        {n: FakeEngine(n, lambda r: "x") for n in POOL}, {}, cooldown=10, clock=lambda: now[0]
    )
    for _ in range(10):
        pool.record("delta", ok=False)
    assert pool.cooling("delta")
    assert "delta" not in pool.available(3)
    picks = [pool.substitute("p1", ("alpha", "bravo", "charlie")) for _ in range(4)]
    assert picks[:2] != ["delta"] and set(picks[:3]) == {"delta", "echo", "foxtrot"}
    assert picks[2] == "delta", "a cooling model only when nothing healthy is left"
    assert picks[3] is None
    now[0] = 11.0
    assert not pool.cooling("delta") and "delta" in pool.available(3)


def _pool() -> Pool:
    configs = {g.label: g for g in sim_config().generators}
    return Pool({n: FakeEngine(n, lambda r: "x") for n in POOL}, configs, need=3)


def test_a_model_that_never_answered_and_failed_alike_leaves_the_run() -> None:
    pool = _pool()
    for _ in range(7):
        pool.failed("alpha", EngineRequestError("alpha", "bad", status=400))
    pool.failed("alpha", EngineBusy("alpha", "cannot reach"))  # another kind: starts over
    for _ in range(7):
        pool.failed("alpha", EngineRequestError("alpha", "bad", status=400))
    assert pool.gone("alpha") is None
    for _ in range(20):
        pool.failed("alpha", EngineBusy("alpha", "rate limited", status=429))  # busy, not dead
    pool.failed("alpha", EngineRequestError("alpha", "bad", status=400))
    assert "first 8 requests" in (pool.gone("alpha") or "")
    assert "alpha" not in pool.available(3) and pool.substitute("p", ("bravo",)) != "alpha"

    pool.record("bravo", ok=True)
    for _ in range(50):
        pool.failed("bravo", EngineRequestError("bravo", "bad", status=400))
    assert pool.gone("bravo") is None, "a model that answered once cools down instead"
    pool.failed("bravo", EngineUnavailable("bravo", "401: check the API key", status=401))
    assert pool.gone("bravo") is not None, "a refused key is a dead end at once"
    assert pool.exhausted is None


class _RestartingEngine(FakeEngine):
    """An engine that replaces its own dead worker (as the vLLM backend does) until `gone`."""

    gone = False


def test_an_engine_that_restarts_its_worker_leaves_only_when_it_says_it_is_gone() -> None:
    configs = {g.label: g for g in sim_config().generators}
    engines = {n: _RestartingEngine(n, lambda r: "x") for n in POOL}
    pool = Pool(engines, configs, need=3)
    for _ in range(40):  # its worker died on the first batch, before any answer: restarting
        pool.failed("alpha", EngineUnavailable("alpha", "the worker exited with code 3"))
    assert pool.gone("alpha") is None, "its restarts are still to come"
    engines["alpha"].gone = True
    pool.failed("alpha", EngineUnavailable("alpha", "the worker exited with code 3"))
    assert "gone for good" in (pool.gone("alpha") or "")
    assert "alpha" not in pool.available(3)


def test_too_few_models_left_for_a_record_stops_the_run() -> None:
    pool = _pool()
    for name in ("alpha", "bravo", "charlie"):
        pool.failed(name, EngineUnavailable(name, "http://x/v1 answered 404"))
    with pytest.raises(PoolUnavailable, match=r"2 of 6 generators left.*needs 3.*http://x/v1"):
        pool.failed("delta", EngineUnavailable("delta", "http://x/v1 answered 404"))
    with pytest.raises(PoolUnavailable):
        pool.check()
