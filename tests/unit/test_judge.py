from __future__ import annotations

import re
import sys

import msgspec
import pytest

from streamfeedback import (
    ChatRequest,
    EngineUnavailable,
    Generation,
    Joined,
    JudgeError,
    JudgeUnavailable,
    Prompt,
    RaterConfig,
)
from streamfeedback._judge.judge import Judge
from streamfeedback.engines import FakeEngine

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

TEXTS = ["quality=5 first", "quality=2 second", "quality=4 third", "quality=1 fourth"]


def _joined(texts: list[str] = TEXTS) -> Joined:
    prompt = Prompt(id="p1", instruction="Say something.")
    models = tuple(f"m{i}" for i in range(len(texts)))
    gens = [
        Generation(prompt=prompt, models=models, slot=i, model=models[i], text=t)
        for i, t in enumerate(texts)
    ]
    return Joined(prompt=prompt, generations=gens)


def _shown(request: ChatRequest) -> dict[int, int]:
    """Text number -> the quality written in that text, as the judge saw them."""
    inputs = request.messages[-1].content.rpartition("\nTexts:\n")[2]
    return {int(k): int(q) for k, q in re.findall(r"<text (\d+)> quality=(\d)", inputs)}


def _rater(**kw: object) -> RaterConfig:
    return msgspec.convert({"backend": "sim", "model": "judge", **kw}, RaterConfig)


def _answer(shown: dict[int, int], *, skip: set[int] = frozenset(), reverse: bool = True) -> str:
    order = sorted(shown, reverse=reverse)
    blocks = [
        f"#### Output for Text {k}\nRating: {shown[k]}\nRationale: saw quality {shown[k]}."
        for k in order
        if k not in skip
    ]
    return "Here is my evaluation:\n\n" + "\n\n".join(blocks)


@pytest.mark.parametrize("shuffle", [False, True])
async def test_ratings_belong_to_their_own_response(shuffle: bool) -> None:
    seen_orders = set()

    def handler(request: ChatRequest) -> str:
        shown = _shown(request)
        seen_orders.add(tuple(shown.values()))
        return _answer(shown)

    judge = Judge(FakeEngine("judge", handler), _rater(shuffle=shuffle))
    for i in range(10):
        prompt = Prompt(id=f"p{i}", instruction="x")
        joined = msgspec.structs.replace(
            _joined(),
            prompt=prompt,
        )
        record = await judge.rate(joined)
        assert record.ratings == [5, 2, 4, 1]
        assert record.rationales == [f"saw quality {q}." for q in (5, 2, 4, 1)]
        assert record.generations == TEXTS
        assert record.id == f"p{i}"
    assert (len(seen_orders) > 1) == shuffle


async def test_missing_block_is_asked_again_then_null() -> None:
    calls = 0

    def handler(request: ChatRequest) -> str:
        nonlocal calls
        calls += 1
        return _answer(_shown(request), skip={2})

    judge = Judge(FakeEngine("judge", handler), _rater(max_attempts=3))
    record = await judge.rate(_joined())
    assert calls == 3 and record.judge_attempts == 3
    assert record.ratings == [5, None, 4, 1]
    assert judge.statistics().null_ratings == 1


async def test_a_second_attempt_fills_only_what_was_missing() -> None:
    answers = iter([{2}, set()])

    def handler(request: ChatRequest) -> str:
        return _answer(_shown(request), skip=next(answers))

    record = await Judge(FakeEngine("judge", handler), _rater()).rate(_joined())
    assert record.ratings == [5, 2, 4, 1] and record.judge_attempts == 2


async def test_several_aspects_keep_each_and_a_fine_grained_score() -> None:
    def handler(request: ChatRequest) -> str:
        shown = _shown(request)
        content = request.messages[-1].content
        if "\nType:" in content:
            return "\n\n".join(
                f"#### Output for Text {k}\nType: 1, 3\nRationale: t{k}\n"
                f"Rating: {min(5, q + 1)}\nRationale: r{k}"
                for k, q in shown.items()
            )
        return _answer(shown)

    judge = Judge(FakeEngine("judge", handler), _rater(aspects=["honesty", "helpfulness"]))
    record = await judge.rate(_joined())
    assert record.aspects is not None
    assert record.aspects["honesty"].ratings == [5, 2, 4, 1]
    helpful = record.aspects["helpfulness"]
    assert helpful.ratings == [5, 3, 5, 2]
    assert helpful.types == [[1, 3]] * 4
    assert helpful.rationales_for_ratings == ["r1", "r2", "r3", "r4"]
    assert record.fine_grained_score == [5.0, 2.5, 4.5, 1.5]
    assert record.ratings == [5, 2, 4, 1]


async def test_engine_errors_map_to_judge_errors() -> None:
    def down(request: ChatRequest) -> str:
        raise EngineUnavailable("judge", "401 Unauthorized")

    with pytest.raises(JudgeUnavailable):
        await Judge(FakeEngine("judge", down), _rater()).rate(_joined())

    from streamfeedback import EngineBusy

    def busy(request: ChatRequest) -> str:
        raise EngineBusy("judge", "429")

    with pytest.raises(JudgeError) as info:
        await Judge(FakeEngine("judge", busy), _rater()).rate(_joined())
    assert not isinstance(info.value, JudgeUnavailable)


async def test_a_dead_judge_costs_one_request_not_one_per_worker() -> None:
    import anyio

    def down(request: ChatRequest) -> str:
        raise EngineUnavailable("judge", "http://127.0.0.1/v1 answered 401: check the API key")

    engine = FakeEngine("judge", down)
    judge = Judge(engine, _rater())
    with pytest.raises(BaseExceptionGroup) as info:
        async with anyio.create_task_group() as tg:
            for _ in range(32):
                tg.start_soon(judge.rate, _joined())
    assert all(isinstance(e, JudgeUnavailable) for e in info.value.exceptions)
    assert "401" in str(info.value.exceptions[0])
    assert len(engine.requests) == 1


async def test_the_first_answer_opens_the_gate_for_everyone() -> None:
    import anyio

    async def slow(request: ChatRequest) -> str:
        await anyio.sleep(0.05)
        return _answer(_shown(request))

    engine = FakeEngine("judge", slow)
    judge = Judge(engine, _rater())
    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(judge.rate, _joined())
    assert engine.peak_in_flight >= 19


async def test_a_run_of_failed_prompts_stops_the_judge() -> None:
    from streamfeedback import EngineBusy

    answered = 0

    def flaky(request: ChatRequest) -> str:
        nonlocal answered
        if answered < 2:
            answered += 1
            return _answer(_shown(request))
        raise EngineBusy("judge", "500 after retries")

    judge = Judge(FakeEngine("judge", flaky), _rater(max_consecutive_failures=4))
    await judge.rate(_joined())
    await judge.rate(_joined())
    for _ in range(3):
        with pytest.raises(JudgeError) as info:
            await judge.rate(_joined())
        assert not isinstance(info.value, JudgeUnavailable)
    with pytest.raises(JudgeUnavailable, match="4 prompts in a row"):
        await judge.rate(_joined())


async def test_an_honest_na_is_marked_and_not_counted_as_unreadable() -> None:
    def handler(request: ChatRequest) -> str:
        shown = _shown(request)
        blocks = [
            f"#### Output for Text {k}\nRating: {'N/A' if q == 2 else q}\nRationale: r{k}"
            for k, q in shown.items()
        ]
        return "\n\n".join(blocks)

    calls = 0

    def counted(request: ChatRequest) -> str:
        nonlocal calls
        calls += 1
        return handler(request)

    judge = Judge(FakeEngine("judge", counted), _rater(aspect="honesty", shuffle=True))
    record = await judge.rate(_joined())
    assert record.ratings == [5, None, 4, 1]
    assert record.not_applicable == [False, True, False, False]
    assert calls == 1, "an N/A is an answer: no re-ask"
    assert judge.statistics().null_ratings == 0


class _RestartingJudge(FakeEngine):
    """A local judge engine that replaces its own dead worker (as the vLLM backend does)."""

    gone = False


async def test_a_local_judge_whose_worker_died_is_asked_again_not_given_up() -> None:
    """The worker died under a request (EngineUnavailable) and restarts: the judge asks again
    instead of stopping the run; once the engine is gone for good, the run stops."""
    died = iter([False, True, False])

    def handler(request: ChatRequest) -> str:
        if next(died, False):
            raise EngineUnavailable("judge", "the worker exited with code 3")
        return _answer(_shown(request))

    engine = _RestartingJudge("judge", handler)
    judge = Judge(engine, _rater())
    assert (await judge.rate(_joined())).ratings == [5, 2, 4, 1]
    record = await judge.rate(_joined())  # the worker died under its first attempt
    assert record.ratings == [5, 2, 4, 1] and record.judge_attempts == 2

    answers = iter([True])

    def then_down(request: ChatRequest) -> str:
        if next(answers, False):
            return _answer(_shown(request))
        raise EngineUnavailable("judge", "the worker exited with code 3")

    gone = _RestartingJudge("judge", then_down)
    judge = Judge(gone, _rater())
    await judge.rate(_joined())
    gone.gone = True  # past its restarts
    with pytest.raises(JudgeUnavailable):
        await judge.rate(_joined())
