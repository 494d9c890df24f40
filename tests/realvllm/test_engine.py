"""The vLLM backend on real vLLM (CPU build) and a tiny random model: the engine contract,
guided judging, too-long prompts, and a worker killed with SIGKILL."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from streamfeedback import ChatRequest, EngineRequestError, EngineUnavailable, Message
from streamfeedback._config import GeneratorConfig
from streamfeedback._judge.aspects import ASPECTS, build_messages
from streamfeedback._judge.guide import answer_regex
from streamfeedback._judge.parser import parse_answer
from streamfeedback.engines._vllm import VLLMEngine

from ..contract.engine_contract import check_engine
from .conftest import group_members

LOAD_S = 240  # a generous bound against hangs, not a speed check

pytestmark = pytest.mark.timeout(900)  # engines load slowly on a busy CPU


def _config(model: Path, **kw: Any) -> GeneratorConfig:
    return msgspec.convert(
        {
            "backend": "vllm",
            "model": str(model),
            "gpu": 0,
            "max_model_len": 4096,
            "max_num_seqs": 32,
            "enforce_eager": True,
            **kw,
        },
        GeneratorConfig,
    )


def _ask(i: int, text: str = "Write a short story.", max_tokens: int = 16) -> ChatRequest:
    return ChatRequest(id=f"q{i}", messages=[Message("user", text)], max_tokens=max_tokens)


@pytest.fixture(scope="module")
async def shared(
    tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[VLLMEngine]:
    """One engine for the scenarios that do not end it."""
    engine = VLLMEngine("shared", _config(tiny_model_path), log_dir=tmp_path_factory.mktemp("logs"))
    with anyio.fail_after(LOAD_S):
        await engine.start()
    yield engine
    await engine.aclose()
    assert engine.pid is not None and not group_members(engine.pid)


async def test_the_engine_contract_on_real_vllm(
    tiny_model_path: Path, tmp_path: Path, no_leftover_processes: list[int]
) -> None:
    engine = VLLMEngine("contract", _config(tiny_model_path), log_dir=tmp_path)
    with anyio.fail_after(LOAD_S):
        await check_engine(engine)
    assert engine.pid is not None
    no_leftover_processes.append(engine.pid)
    log = (tmp_path / "contract.log").read_text()
    assert "vllm" in log.lower(), "vLLM's own output goes to the engine's log file"
    assert "Passing raw prompts" not in log, "the worker uses vLLM's current input API"
    assert "Traceback" not in log, log[-2000:]


async def test_guided_judge_answers_are_always_readable(shared: VLLMEngine) -> None:
    """The random model writes noise; under the aspect's regex every rating still reads."""
    texts = ["Paris is the capital of France.", "It is Lyon.", "I do not know."]
    asked = 0
    for aspect, spec in ASPECTS.items():
        for seed in range(3):
            max_tokens = 260 if spec.typed else 160
            request = ChatRequest(
                id=f"judge-{aspect}-{seed}",
                messages=build_messages(aspect, "What is the capital of France?", texts),
                max_tokens=max_tokens,
                temperature=1.0,
                seed=seed,
                guide=answer_regex(aspect, len(texts), max_tokens),
            )
            with anyio.fail_after(60):
                answer = await shared.generate(request)
            asked += 1
            assert answer.finish_reason == "stop", (aspect, answer.text)
            assert answer.completion_tokens < max_tokens
            blocks = parse_answer(answer.text, 3, typed=spec.typed, allows_na=spec.allows_na)
            for block in blocks:
                assert block is not None, answer.text
                assert block.rating is not None or block.not_applicable, answer.text
                assert block.rationale, answer.text
    assert asked == 15


async def test_a_prompt_too_long_fails_the_request_not_the_engine(shared: VLLMEngine) -> None:
    with anyio.fail_after(60), pytest.raises(EngineRequestError, match="max_model_len"):
        await shared.generate(_ask(0, "word " * 5000))
    fits = await shared.generate(_ask(1, max_tokens=5000))
    assert fits.completion_tokens <= 4096 - fits.prompt_tokens
    assert (await shared.generate(_ask(2, max_tokens=3))).completion_tokens <= 3


async def test_cancelled_requests_are_aborted_and_the_engine_serves_on(
    shared: VLLMEngine,
) -> None:
    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(shared.generate, _ask(100 + i, max_tokens=900))
            await anyio.sleep(0.2)
            tg.cancel_scope.cancel()
        assert shared.statistics().in_flight == 0
        assert (await shared.generate(_ask(3, max_tokens=4))).completion_tokens <= 4


async def test_kill_9_kills_the_tree_the_worker_restarts_once_then_an_engine_core_death(
    tiny_model_path: Path, tmp_path: Path, no_leftover_processes: list[int]
) -> None:
    engine = VLLMEngine("victim", _config(tiny_model_path), log_dir=tmp_path, restarts=1)
    try:
        with anyio.fail_after(LOAD_S):
            await engine.start()
        first = engine.pid
        assert first is not None
        no_leftover_processes.append(first)
        assert len(group_members(first)) >= 2, "vLLM's engine core runs in its own process"

        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while group_members(first) and time.monotonic() < deadline:  # noqa: ASYNC110
            await anyio.sleep(0.1)
        assert not group_members(first), "the dead worker's vLLM processes must go at once"

        with anyio.fail_after(LOAD_S):
            try:  # sent before the engine saw the death: fails (the pipeline re-routes it)
                await engine.generate(_ask(0, max_tokens=4))
            except EngineUnavailable:
                pass
            again = await engine.generate(_ask(0, max_tokens=4))
        assert again.completion_tokens <= 4
        second = engine.pid
        assert second is not None and second != first
        no_leftover_processes.append(second)

        # Now vLLM's engine core dies under load: every request in flight fails at once with
        # one clear error (no traceback per request), and no restart is left.
        core = next(
            pid
            for pid in group_members(second)
            if Path(f"/proc/{pid}/comm").read_text().startswith("VLLM::EngineCor")
        )
        errors: list[str] = []
        finished: list[int] = []

        async def one(i: int) -> None:
            try:
                await engine.generate(_ask(10 + i, max_tokens=3000))
            except EngineUnavailable as exc:
                errors.append(str(exc))
            else:  # done between the in-flight count and the kill: a fair race
                finished.append(i)

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for i in range(16):
                    tg.start_soon(one, i)
                while engine.statistics().in_flight < 16:  # noqa: ASYNC110
                    await anyio.sleep(0.05)
                os.kill(core, signal.SIGKILL)
        assert len(errors) + len(finished) == 16, errors
        assert len(errors) >= 8, (errors, finished)
        assert all("EngineDeadError" in e or "exited" in e for e in errors), errors
        assert engine.gone
        with pytest.raises(EngineUnavailable, match="EngineDeadError|exited"):
            await engine.generate(_ask(1))
        deadline = time.monotonic() + 10
        while group_members(second) and time.monotonic() < deadline:  # noqa: ASYNC110
            await anyio.sleep(0.1)
        assert not group_members(second)
        log = (tmp_path / "victim.log").read_text()
        assert log.count("Traceback") <= 3, log[-5000:]
    finally:
        await engine.aclose()
