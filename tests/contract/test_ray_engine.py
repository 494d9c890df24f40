"""RayEngine on a real two-node local Ray cluster (3 + 3 logical GPUs), the sim engine inside.

One cluster per module: starting Ray costs seconds, a replica (an actor process) about one.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from streamfeedback import ChatRequest, Message
from streamfeedback._config import ClusterConfig, GeneratorConfig
from streamfeedback._exceptions import (
    EngineBusy,
    EngineError,
    EngineRequestError,
    EngineTimeout,
    EngineUnavailable,
)
from streamfeedback.engines._ray import RayEngine, _encoder, _failed

from .engine_contract import check_engine

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'streamfeedback[ray]'")
cluster_utils = pytest.importorskip("ray.cluster_utils")

pytestmark = pytest.mark.timeout(120)

FAKE_VLLM = Path(__file__).resolve().parents[1] / "fake_vllm"
PYTHONPATH = os.environ.get("PYTHONPATH")
GPUS_PER_NODE = 3
NODE = {"num_cpus": 2, "num_gpus": GPUS_PER_NODE, "object_store_memory": 100 * 1024 * 1024}
# Notice a removed node in about a second, not Ray's default of fifteen.
FAST_HEALTH_CHECKS = {"health_check_period_ms": 200, "health_check_failure_threshold": 3}


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, bool]]:
    """One backend: the engine awaits Ray's futures the same way under both (the pipeline's
    uvloop is covered by the e2e run), and every replica costs an actor process."""
    return ("asyncio", {"use_uvloop": True})


@pytest.fixture(scope="module")
def vllm_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ray") / "fake_vllm.ndjson"


@pytest.fixture(scope="module")
def cluster(vllm_log: Path) -> Iterator[Any]:
    """Ray's nodes pass their environment to actors: the fake vllm must be importable there."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(FAKE_VLLM), PYTHONPATH])))
        env.setenv("FAKE_VLLM_LOG", str(vllm_log))
        env.setenv("FAKE_VLLM_DELAY", "0.05")
        yield from _cluster()


def _cluster() -> Iterator[Any]:
    local = cluster_utils.Cluster(
        initialize_head=True,
        head_node_args={**NODE, "include_dashboard": False, "_system_config": FAST_HEALTH_CHECKS},
    )
    try:
        local.add_node(**NODE)
        local.wait_for_nodes()
        ray.init(address=local.address, log_to_driver=False)
        try:
            yield local
        finally:
            ray.shutdown()
    finally:
        local.shutdown()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


CLUSTER = ClusterConfig(backend="ray", namespace="streamfeedback-tests", restarts=0)
RESTARTING = ClusterConfig(backend="ray", namespace="streamfeedback-tests", restarts=2)


def _config(**kw: Any) -> GeneratorConfig:
    return msgspec.convert({"backend": "sim", "model": "org/sim-7b", **kw}, GeneratorConfig)


def _request(i: int) -> ChatRequest:
    return ChatRequest(
        id=f"r{i}", messages=[Message("user", f"Question {i}?")], max_tokens=32, seed=i
    )


async def _run_all(engine: RayEngine, n: int, texts: dict[int, str]) -> None:
    async def one(i: int) -> None:
        texts[i] = (await engine.generate(_request(i))).text

    async with anyio.create_task_group() as tg:
        for i in range(n):
            tg.start_soon(one, i)


async def _eventually(condition: Callable[[], Awaitable[bool]], timeout: float = 20) -> None:
    """Poll state that lives in other processes until `condition` holds."""
    with anyio.fail_after(timeout):
        for _ in itertools.count():
            if await condition():
                return
            await anyio.sleep(0.01)


async def _wait_in_flight(engine: RayEngine, n: int) -> None:
    async def reached() -> bool:
        return engine.statistics().in_flight >= n

    await _eventually(reached)


async def test_ray_engine_over_sim_meets_the_contract(cluster: Any) -> None:
    await check_engine(RayEngine("sim-7b", _config(replicas=2), CLUSTER))


async def test_answers_equal_the_local_engine(cluster: Any) -> None:
    from streamfeedback.engines import SimEngine

    local = SimEngine("sim-7b", _config())
    engine = RayEngine("sim-7b", _config(replicas=2), CLUSTER)
    await engine.start()
    try:
        for i in range(5):
            remote, here = await engine.generate(_request(i)), await local.generate(_request(i))
            assert (remote.text, remote.completion_tokens, remote.finish_reason) == (
                here.text,
                here.completion_tokens,
                here.finish_reason,
            )
    finally:
        await engine.aclose()
        await local.aclose()


async def test_each_actor_gets_its_own_gpu_and_too_many_wait_then_fail(cluster: Any) -> None:
    engines = [RayEngine(f"m{i}", _config(model=f"org/m{i}", gpu=0), CLUSTER) for i in range(6)]
    try:
        async with anyio.create_task_group() as tg:
            for engine in engines:
                tg.start_soon(engine.start)
        for engine in engines:
            assert (await engine.generate(_request(0))).text
        replicas = [e.statistics().replicas[0] for e in engines]
        places = {(r.node_id, tuple(r.gpu_ids)) for r in replicas}
        assert len(places) == 6, places
        assert all(len(r.gpu_ids) == 1 for r in replicas)
        assert len({r.node_id for r in replicas}) == 2, "both nodes hold actors"
        assert len({r.pid for r in replicas}) == 6, "one process per actor"

        seventh = RayEngine("m6", _config(model="org/m6", gpu=0, timeout=1.0), CLUSTER)
        with pytest.raises(EngineUnavailable, match="not placed .* needs 1 GPU"):
            await seventh.start()
        await seventh.aclose()
    finally:
        for engine in engines:
            await engine.aclose()


async def test_vllm_replicas_see_the_gpus_ray_assigned(cluster: Any, vllm_log: Path) -> None:
    """The stand-in vllm (tests/fake_vllm) runs in a worker process inside each actor."""
    tp2 = RayEngine("tp2", _config(backend="vllm", model="org/tp2", gpus=[0, 1]), CLUSTER)
    pair = RayEngine("pair", _config(backend="vllm", model="org/pair", gpu=0, replicas=2), CLUSTER)
    assert (tp2.num_gpus, pair.num_gpus) == (2, 1)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(tp2.start)
            tg.start_soon(pair.start)
        for engine in (tp2, pair):
            await _run_all(engine, 20, {})
        replicas = [*tp2._replicas, *pair._replicas]
        started = [r.started for r in replicas if r.started is not None]
        assert len(started) == 3
        for info in started:
            assert info.cuda_visible_devices == ",".join(info.gpu_ids)
        places = [(s.node_id, gpu) for s in started for gpu in s.gpu_ids]
        assert len(places) == len(set(places)) == 4
    finally:
        await tp2.aclose()
        await pair.aclose()
    events = [json.loads(line) for line in vllm_log.read_text().splitlines()]
    builds = {e["pid"]: e for e in events if e["event"] == "build"}
    seen = sorted((b["args"]["model"], b["cuda_visible_devices"]) for b in builds.values())
    wanted = sorted(
        (model, ",".join(s.gpu_ids))
        for model, engine in (("org/tp2", tp2), ("org/pair", pair))
        for s in (r.started for r in engine._replicas)
        if s is not None
    )
    assert seen == wanted, "vLLM sees the physical GPUs Ray gave its actor"
    assert {b["args"]["tensor_parallel_size"] for b in builds.values()} == {1, 2}
    assert {e["pid"] for e in events if e["event"] == "shutdown"} == set(builds)

    async def gone() -> bool:
        return not any(_alive(pid) for pid in builds)

    await _eventually(gone, 10)


async def test_replicas_share_the_load_within_their_bound(cluster: Any) -> None:
    engine = RayEngine("shared", _config(replicas=3, max_concurrency=40, sim_ttft=0.3), CLUSTER)
    await engine.start()
    texts: dict[int, str] = {}
    try:
        await _run_all(engine, 300, texts)
    finally:
        await engine.aclose()
    stats = engine.statistics()
    assert sorted(texts) == list(range(300))
    assert stats.requests == 300 and stats.failures == 0
    assert stats.peak_in_flight <= 120
    for replica in stats.replicas:
        assert replica.requests > 60, [r.requests for r in stats.replicas]
        assert replica.peak_in_flight <= 40
    assert len({r.pid for r in stats.replicas}) == 3


async def test_killing_an_actor_mid_run_loses_no_request(cluster: Any) -> None:
    engine = RayEngine("victim", _config(replicas=3, sim_ttft=1.0), CLUSTER)
    await engine.start()
    texts: dict[int, str] = {}
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_run_all, engine, 200, texts)
            await _wait_in_flight(engine, 200)
            ray.kill(engine._replicas[1].actor)
    finally:
        await engine.aclose()
    stats = engine.statistics()
    assert sorted(texts) == list(range(200))
    assert stats.failures == 0 and stats.requests == 200
    assert stats.failovers > 0, "the victim's requests in flight were served elsewhere"
    assert not stats.replicas[1].alive
    assert sum(r.requests for r in stats.replicas) == 200


async def test_losing_a_node_fails_over_to_the_other(cluster: Any) -> None:
    engine = RayEngine("spread", _config(replicas=6, gpu=0, sim_ttft=1.0), CLUSTER)
    await engine.start()
    texts: dict[int, str] = {}
    worker = cluster.list_all_nodes()[1]
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_run_all, engine, 120, texts)
            await _wait_in_flight(engine, 120)
            cluster.remove_node(worker, allow_graceful=False)
    finally:
        await engine.aclose()
        cluster.add_node(**NODE)
        cluster.wait_for_nodes()
    stats = engine.statistics()
    assert sorted(texts) == list(range(120))
    assert stats.failures == 0
    lost = [r for r in stats.replicas if r.node_id == worker.node_id]
    assert len(lost) == GPUS_PER_NODE
    assert not any(r.alive for r in lost)
    assert stats.failovers > 0, "requests in flight on the lost node were served elsewhere"
    assert stats.requests == 120


async def test_no_replica_left_is_unavailable_naming_model_and_replica(cluster: Any) -> None:
    engine = RayEngine("lonely", _config(), CLUSTER)
    await engine.start()
    try:
        ray.kill(engine._replicas[0].actor)
        with pytest.raises(EngineUnavailable, match=r"org/sim-7b.*no live replica.*replica 0"):
            for i in range(50):  # the kill lands asynchronously
                await engine.generate(_request(i))
                await anyio.sleep(0.05)
    finally:
        await engine.aclose()
    assert not engine.statistics().replicas[0].alive


async def test_aclose_kills_every_actor_and_is_safe_twice(cluster: Any) -> None:
    engine = RayEngine("closer", _config(replicas=2), CLUSTER)
    await engine.start()
    handles = [r.actor for r in engine._replicas]
    pids = [r.pid for r in engine.statistics().replicas]
    await engine.aclose()
    await engine.aclose()
    with pytest.raises(EngineUnavailable, match="closed"):
        await engine.start()

    async def gone() -> bool:
        """`ray.kill` lands asynchronously: a call may still get through just after it."""
        for handle in handles:
            try:
                await handle.start.remote()
            except ray.exceptions.RayActorError:
                continue
            return False
        return not any(_alive(pid) for pid in pids if pid is not None)

    await _eventually(gone, 10)


async def test_engine_errors_cross_the_boundary_as_the_same_class() -> None:
    engine = RayEngine("m", _config(), CLUSTER)
    errors: list[EngineError] = [
        EngineError("inner", "odd"),
        EngineTimeout("inner", "slow"),
        EngineBusy("inner", "busy", status=429, retry_after=2.5),
        EngineRequestError("inner", "too long", status=400),
    ]
    for error in errors:
        answer = msgspec.msgpack.decode(_encoder.encode(_failed(error)), type=type(_failed(error)))
        with pytest.raises(type(error)) as caught:
            engine._raise(answer)
        assert type(caught.value) is type(error)
        assert str(caught.value) == f"m: {str(error).removeprefix('inner: ')}"
        assert caught.value.status == error.status
    assert getattr(caught.value, "retry_after", None) is None
    busy = _failed(errors[2])
    with pytest.raises(EngineBusy) as caught_busy:
        engine._raise(busy)
    assert caught_busy.value.retry_after == 2.5


async def test_missing_ray_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    engine = RayEngine("m", _config(), CLUSTER)
    with pytest.raises(EngineUnavailable, match=r"streamfeedback\[ray\]"):
        await engine.start()
    await engine.aclose()


async def test_a_dead_replica_is_restarted_and_serves_again(cluster: Any) -> None:
    engine = RayEngine("phoenix", _config(replicas=1), RESTARTING)
    await engine.start()
    try:
        first = engine.statistics().replicas[0]
        assert first.pid is not None
        ray.kill(engine._replicas[0].actor)
        with pytest.raises(EngineUnavailable, match="no live replica"):
            for i in range(100):  # the kill lands asynchronously
                await engine.generate(_request(i))
                await anyio.sleep(0.05)

        async def back() -> bool:
            return engine.statistics().replicas[0].alive

        await _eventually(back, 60)
        again = engine.statistics().replicas[0]
        assert again.restarts == 1 and again.pid != first.pid
        assert not _alive(first.pid), "the dead actor's process is gone"
        completion = await engine.generate(_request(1000))
        assert completion.text
    finally:
        await engine.aclose()
    assert not engine.statistics().replicas[0].alive


async def test_restarts_stop_at_the_configured_count_and_at_close(
    cluster: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "streamfeedback")
    engine = RayEngine("mayfly", _config(replicas=1), RESTARTING)
    await engine.start()
    try:
        for n in (1, 2):
            pid = engine.statistics().replicas[0].pid
            ray.kill(engine._replicas[0].actor)

            async def dead() -> bool:
                try:
                    await engine.generate(_request(0))
                except EngineUnavailable:
                    return True
                return False

            await _eventually(dead, 20)

            async def replaced(pid: int | None = pid) -> bool:
                stats = engine.statistics().replicas[0]
                return stats.alive and stats.pid != pid

            await _eventually(replaced, 60)
            assert engine.statistics().replicas[0].restarts == n
        ray.kill(engine._replicas[0].actor)
        await _eventually(dead, 20)

        async def given_up() -> bool:
            return "replica 0 stays dead after 2 restarts" in caplog.text

        await _eventually(given_up, 10)
        stats = engine.statistics().replicas[0]
        assert not stats.alive and stats.restarts == 2, "no third restart"
    finally:
        await engine.aclose()
    assert not [t for t in asyncio.all_tasks() if "restart supervisor" in t.get_name()]


async def test_a_crashed_restart_supervisor_is_heard_at_once(
    cluster: Any, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in the supervisor is logged as it happens and makes the engine unavailable, so
    the pipeline stops routing to it, instead of restarts silently stopping until aclose."""
    caplog.set_level(logging.ERROR, "streamfeedback")

    async def crash(self: RayEngine, replica: Any) -> None:
        raise RuntimeError("a bug in the supervisor")

    monkeypatch.setattr(RayEngine, "_restart", crash)
    engine = RayEngine("brittle", _config(replicas=2), RESTARTING)
    await engine.start()
    try:
        ray.kill(engine._replicas[0].actor)
        with pytest.raises(EngineUnavailable, match="restart supervisor failed: RuntimeError"):
            for i in range(200):  # replica 1 serves until the crash is heard
                await engine.generate(_request(i))
                await anyio.sleep(0.02)
        assert "a background task failed: RuntimeError('a bug in the supervisor')" in caplog.text
    finally:
        await engine.aclose()


async def test_a_restart_that_cannot_create_an_actor_gives_up_cleanly(
    cluster: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """An unexpected error while replacing a replica ends that try, not the supervisor: later
    losses still report EngineUnavailable, and aclose still tears everything down."""
    caplog.set_level(logging.WARNING, "streamfeedback")
    engine = RayEngine("unlucky", _config(replicas=2), RESTARTING)
    await engine.start()
    try:

        def no_actor() -> Any:
            raise RuntimeError("the GCS is unreachable")

        engine._new_actor = no_actor  # type: ignore[method-assign]
        ray.kill(engine._replicas[0].actor)

        async def given_up() -> bool:
            return "replica 0 stays dead after 2 restarts" in caplog.text

        while not engine._replicas[0].dead:
            await engine.generate(_request(0))
            await anyio.sleep(0.02)
        await _eventually(given_up, 20)
        assert "did not come back: the GCS is unreachable" in caplog.text
        ray.kill(engine._replicas[1].actor)
        with pytest.raises(EngineUnavailable, match="no live replica"):
            for i in range(100):
                await engine.generate(_request(i))
                await anyio.sleep(0.02)
    finally:
        await engine.aclose()
    assert all(r.actor is None for r in engine._replicas), "every actor killed"
