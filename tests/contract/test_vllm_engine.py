"""VLLMEngine: the contract suite, over the fake `vllm` package and (on a GPU host) real vLLM.

The fake (tests/fake_vllm) runs in real worker processes, exactly like vLLM would, and logs
what the worker asked of it to a JSON-lines file, so these tests check the worker's side too:
which GPU each engine saw, the max_tokens of each request, how many were in flight at once,
aborts and shutdown. Process-heavy tests run on one event loop only, to stay fast.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from streamfeedback import (
    ChatRequest,
    EngineError,
    EngineRequestError,
    EngineUnavailable,
    Message,
)
from streamfeedback._config import GeneratorConfig
from streamfeedback.engines import make_engine
from streamfeedback.engines._vllm import VLLMEngine, engine_args

from .engine_contract import check_engine

FAKE_VLLM = Path(__file__).resolve().parents[1] / "fake_vllm"
BOTH_LOOPS = [
    pytest.param(("asyncio", {"use_uvloop": False}), id="asyncio"),
    pytest.param(("asyncio", {"use_uvloop": True}), id="asyncio+uvloop"),
]


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, bool]]:
    return ("asyncio", {"use_uvloop": False})


@pytest.fixture
def fake_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Workers import the fake vllm and log to a fresh file; the knobs start unset."""
    path = tmp_path / "fake_vllm.ndjson"
    parts = [str(FAKE_VLLM), os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in parts if p))
    monkeypatch.setenv("FAKE_VLLM_LOG", str(path))
    for knob in (
        "DELAY",
        "BUILD_DELAY",
        "FAIL_START",
        "DIE_AFTER",
        "DEAD_AFTER",
        "SYNC_TOKENIZER",
        "TEMPLATE_DICT",
    ):
        monkeypatch.delenv(f"FAKE_VLLM_{knob}", raising=False)
    return path


def _events(path: Path, event: str | None = None) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if event is None or r["event"] == event]


async def _wait_for_event(path: Path, event: str, count: int = 1) -> list[dict[str, Any]]:
    """Poll the fake's log (another process writes it) until `count` such events are in."""
    with anyio.fail_after(5):
        while len(found := _events(path, event)) < count:  # noqa: ASYNC110 - another process
            await anyio.sleep(0.01)
    return found


def _config(**kw: Any) -> GeneratorConfig:
    where = {} if "gpus" in kw else {"gpu": 0}
    return msgspec.convert(
        {"backend": "vllm", "model": "fake-org/fake-7b", **where, **kw}, GeneratorConfig
    )


def _request(i: int, *, max_tokens: int = 32, words: int = 8) -> ChatRequest:
    return ChatRequest(
        id=f"req-{i}",
        messages=[Message("user", " ".join(["word"] * words))],
        max_tokens=max_tokens,
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
async def engine_factory(tmp_path: Path) -> AsyncIterator[Any]:
    """Builds engines and closes whatever a failing test left open."""
    engines: list[VLLMEngine] = []

    def build(config: GeneratorConfig, name: str = "fake-7b") -> VLLMEngine:
        engine = VLLMEngine(name, config, log_dir=tmp_path / "logs")
        engines.append(engine)
        return engine

    yield build
    for engine in engines:
        await engine.aclose()


# -- the contract ---------------------------------------------------------------------------


@pytest.mark.parametrize("anyio_backend", BOTH_LOOPS)
async def test_vllm_engine_meets_the_contract_over_the_fake(fake_log: Path) -> None:
    engine = make_engine("fake-7b", _config(), log_dir=fake_log.parent / "logs")
    assert isinstance(engine, VLLMEngine)
    await check_engine(engine)
    assert engine.log_path == fake_log.parent / "logs" / "fake-7b.log"
    builds = _events(fake_log, "build")
    assert len(builds) == 1, "start() twice must not spawn twice"
    assert engine.pid == builds[0]["pid"]
    assert not _alive(builds[0]["pid"])
    assert _events(fake_log, "shutdown"), "aclose must shut the engine down gracefully"
    assert {r["output_kind"] for r in _events(fake_log, "request")} == {"FINAL_ONLY"}
    assert "vllm" not in sys.modules, "the parent process must never import vllm"


def _real_vllm_skip_reason() -> str | None:
    if importlib.util.find_spec("vllm") is None or "fake_vllm" in str(
        importlib.util.find_spec("vllm").origin  # type: ignore[union-attr]
    ):
        return "real vllm is not installed"
    if shutil.which("nvidia-smi") is None or not Path("/dev/nvidia0").exists():
        return "no CUDA GPU on this host"
    if not os.environ.get("STREAMFEEDBACK_TEST_VLLM_MODEL"):
        return "set STREAMFEEDBACK_TEST_VLLM_MODEL to a small chat model to run this"
    return None


@pytest.mark.gpu
async def test_vllm_engine_meets_the_contract_on_a_gpu() -> None:
    reason = _real_vllm_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    config = msgspec.convert(
        {
            "backend": "vllm",
            "model": os.environ["STREAMFEEDBACK_TEST_VLLM_MODEL"],
            "gpu": int(os.environ.get("STREAMFEEDBACK_TEST_GPU", "0")),
            "max_model_len": 2048,
            "max_num_seqs": 32,
            "gpu_memory_utilization": 0.5,
            "enforce_eager": True,
        },
        GeneratorConfig,
    )
    engine = VLLMEngine("gpu-contract", config)
    with anyio.fail_after(600):
        await check_engine(engine)
    too_long = VLLMEngine("gpu-too-long", config)
    try:
        await too_long.start()
        with pytest.raises(EngineRequestError):
            await too_long.generate(_request(0, words=5000))
        assert (await too_long.generate(_request(1, max_tokens=4))).completion_tokens <= 4
    finally:
        await too_long.aclose()


# -- the worker side ------------------------------------------------------------------------


def test_engine_args_set_batching_explicitly_and_pass_only_what_is_set() -> None:
    args = engine_args(_config(gpus=[2, 3], max_num_seqs=64, seed=7))
    assert args == {
        "tensor_parallel_size": 2,
        "gpu_memory_utilization": 0.9,
        "max_num_seqs": 64,
        "max_num_batched_tokens": 8192,
        "dtype": "auto",
        "seed": 7,
    }
    full = engine_args(
        _config(
            max_model_len=4096,
            max_num_batched_tokens=16384,
            enforce_eager=True,
            trust_remote_code=True,
            download_dir="/models",
            quantization="awq",
        )
    )
    assert full["max_num_batched_tokens"] == 16384
    assert full["max_model_len"] == 4096
    assert full["enforce_eager"] is full["trust_remote_code"] is True
    assert full["download_dir"] == "/models" and full["quantization"] == "awq"


async def test_six_engines_load_in_parallel_one_per_gpu(
    fake_log: Path, engine_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_VLLM_BUILD_DELAY", "1.0")
    engines = [engine_factory(_config(gpu=i), name=f"m{i}") for i in range(6)]
    engines.append(engine_factory(_config(gpus=[6, 7]), name="tp"))
    async with anyio.create_task_group() as tg:
        for engine in engines:
            tg.start_soon(engine.start)

    builds = _events(fake_log, "build")
    built = _events(fake_log, "built")
    assert len(builds) == len(built) == 7
    seen = {row["pid"]: row for row in builds}
    pids = [engine.pid for engine in engines]
    assert len(set(pids)) == 7, "one process per engine"
    assert [seen[pid]["cuda_visible_devices"] for pid in pids] == [*"012345", "6,7"]
    assert [seen[pid]["args"]["tensor_parallel_size"] for pid in pids] == [1] * 6 + [2]
    for row in builds:
        assert row["args"]["max_num_seqs"] == 256
        assert row["args"]["max_num_batched_tokens"] == 8192
    assert max(r["t"] for r in builds) < min(r["t"] for r in built), "loads must overlap"
    for row in _events(fake_log, "import"):
        assert row["pid"] in seen, "only workers import vllm"

    answers = [await engine.generate(_request(i)) for i, engine in enumerate(engines)]
    assert all(a.text for a in answers)
    for engine in engines:
        await engine.aclose()
    assert not any(_alive(pid) for pid in pids if pid is not None)


async def test_keeps_the_batch_full_but_bounded(
    fake_log: Path, engine_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """100 concurrent generates, max_num_seqs=64: about 1.1 x 64 in flight at the engine."""
    monkeypatch.setenv("FAKE_VLLM_DELAY", "0.4")
    engine = engine_factory(_config(max_num_seqs=64))
    await engine.start()
    lengths: list[int] = []

    async def one(i: int) -> None:
        lengths.append((await engine.generate(_request(i, max_tokens=7))).completion_tokens)

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            for i in range(100):
                tg.start_soon(one, i)
    assert lengths == [7] * 100

    requests = _events(fake_log, "request")
    assert len(requests) == 100
    assert {r["max_tokens"] for r in requests} == {7}, "every request carries max_tokens"
    peak = max(r["in_flight"] for r in requests)
    assert 50 <= peak <= 71, peak
    stats = engine.statistics()
    assert stats.peak_in_flight == 70  # int(64 * 1.1)
    assert (stats.requests, stats.failures, stats.in_flight) == (100, 0, 0)
    assert stats.completion_tokens == 700


async def test_start_failure_names_model_gpu_and_error(
    fake_log: Path, engine_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_VLLM_FAIL_START", "CUDA out of memory: 79.1 GiB in use")
    engine = engine_factory(_config(gpu=3))
    with anyio.fail_after(10), pytest.raises(EngineUnavailable) as info:
        await engine.start()
    message = str(info.value)
    assert "fake-org/fake-7b" in message
    assert "GPU 3" in message
    assert "CUDA out of memory: 79.1 GiB in use" in message
    assert engine.pid == _events(fake_log, "build")[0]["pid"]
    assert not _alive(engine.pid)
    with pytest.raises(EngineUnavailable):
        await engine.generate(_request(0))
    await engine.aclose()
    await engine.aclose()


async def test_start_fails_when_the_worker_cannot_import_vllm(
    fake_log: Path, engine_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", "")  # no fake, and no real vllm here either
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is importable here")
    engine = engine_factory(_config(gpus=[4, 5]))
    with anyio.fail_after(10), pytest.raises(EngineUnavailable) as info:
        await engine.start()
    assert "GPUs 4,5" in str(info.value)
    assert "ModuleNotFoundError" in str(info.value)


async def test_worker_death_fails_in_flight_and_later_requests(
    fake_log: Path, engine_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_VLLM_DELAY", "30")
    monkeypatch.setenv("FAKE_VLLM_DIE_AFTER", "6")
    engine = engine_factory(_config(gpu=2))
    await engine.start()
    errors: list[BaseException] = []

    async def one(i: int) -> None:
        try:
            await engine.generate(_request(i))
        except EngineError as exc:
            errors.append(exc)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for i in range(5):
                tg.start_soon(one, i)
            await _wait_for_event(fake_log, "request", 5)
            tg.start_soon(one, 5)  # the sixth request kills the worker
    assert len(errors) == 6
    for exc in errors:
        assert isinstance(exc, EngineUnavailable)
        assert "fake-org/fake-7b" in str(exc) and "GPU 2" in str(exc)
        assert "exited with code 3" in str(exc)
    with anyio.fail_after(1), pytest.raises(EngineUnavailable, match="code 3"):
        await engine.generate(_request(9))
    assert engine.statistics().in_flight == 0
    await engine.aclose()


async def test_a_dead_vllm_engine_takes_the_worker_down(
    fake_log: Path, engine_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_VLLM_DELAY", "30")
    monkeypatch.setenv("FAKE_VLLM_DEAD_AFTER", "3")
    engine = engine_factory(_config())
    await engine.start()
    errors: list[BaseException] = []

    async def one(i: int) -> None:
        try:
            await engine.generate(_request(i))
        except EngineError as exc:
            errors.append(exc)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for i in range(2):
                tg.start_soon(one, i)
            await _wait_for_event(fake_log, "request", 2)
            tg.start_soon(one, 2)
    assert len(errors) == 3
    for exc in errors:
        assert isinstance(exc, EngineUnavailable)
        assert "EngineDeadError" in str(exc)
    pid = engine.pid
    assert pid is not None
    deadline = time.monotonic() + 10  # the requests failed first; the worker then exits
    while _alive(pid) and time.monotonic() < deadline:  # noqa: ASYNC110
        await anyio.sleep(0.05)
    assert not _alive(pid)
    assert engine.gone
    assert _events(fake_log, "shutdown"), "the worker still shuts the engine down"
    assert sorted(a["in_flight"] for a in _events(fake_log, "abort")) == [0, 1]


async def test_prompt_too_long_fails_the_request_not_the_worker(
    fake_log: Path, engine_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_VLLM_SYNC_TOKENIZER", "1")
    monkeypatch.setenv("FAKE_VLLM_TEMPLATE_DICT", "1")
    known = engine_factory(_config(max_model_len=64))  # the worker checks before vLLM does
    unknown = engine_factory(_config())  # the fake (2048 tokens) raises ValueError, as vLLM
    async with anyio.create_task_group() as tg:
        tg.start_soon(known.start)
        tg.start_soon(unknown.start)
    for engine, words in ((known, 100), (unknown, 3000)):
        with anyio.fail_after(5), pytest.raises(EngineRequestError) as info:
            await engine.generate(_request(0, words=words))
        assert "max" in str(info.value) and "fake-org/fake-7b" in str(info.value)
        again = await engine.generate(_request(1, max_tokens=5))
        assert again.completion_tokens == 5 and again.finish_reason == "length"
        assert engine.statistics().failures == 1
    odd = ChatRequest(id="odd", messages=[Message("narrator", "hi")], max_tokens=4)
    with pytest.raises(EngineRequestError, match="roles"):
        await known.generate(odd)
    assert (await known.generate(_request(3, max_tokens=4))).completion_tokens == 4
    # max_tokens is capped to what fits in max_model_len, so vLLM never refuses it
    fits = await known.generate(_request(2, max_tokens=500, words=55))
    assert fits.completion_tokens == 64 - fits.prompt_tokens


async def test_cancelling_a_generate_aborts_it_in_the_worker(
    fake_log: Path, engine_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_VLLM_DELAY", "30")
    engine = engine_factory(_config())
    await engine.start()
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.generate, _request(0))
            tg.start_soon(engine.generate, _request(1))
            await _wait_for_event(fake_log, "request", 2)
            tg.cancel_scope.cancel()
        aborts = await _wait_for_event(fake_log, "abort", 2)
    assert sorted(a["in_flight"] for a in aborts) == [0, 1], "the GPU slots are freed"
    assert engine.statistics().in_flight == 0
    with anyio.move_on_after(0.05):
        await engine.generate(_request(2))
    await _wait_for_event(fake_log, "abort", 3)


async def test_aclose_while_busy_and_cancelled_leaves_no_process(
    fake_log: Path, engine_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_VLLM_DELAY", "30")
    engine = engine_factory(_config())
    await engine.start()
    pid = engine.pid
    assert pid is not None and _alive(pid)
    errors: list[BaseException] = []

    async def waiting() -> None:
        try:
            await engine.generate(_request(0))
        except EngineUnavailable as exc:
            errors.append(exc)

    started = time.perf_counter()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(waiting)
            await _wait_for_event(fake_log, "request")
            with anyio.CancelScope() as scope:
                scope.cancel()  # aclose must finish even when its caller is cancelled
                await engine.aclose()
    assert time.perf_counter() - started < 5
    assert len(errors) == 1 and "closed" in str(errors[0])
    assert not _alive(pid)
    assert _events(fake_log, "shutdown"), "Shutdown reached the worker, which shut vLLM down"
    await engine.aclose()  # twice is fine
    with pytest.raises(EngineUnavailable):
        await engine.start()
