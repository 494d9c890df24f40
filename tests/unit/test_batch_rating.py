"""Rating through the Batch API, against the test server's Files and Batches endpoints."""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from streamfeedback import (
    ChatRequest,
    Failure,
    Generation,
    Joined,
    JudgeUnavailable,
    Prompt,
    RaterConfig,
    Record,
)
from streamfeedback._channels import open_channel
from streamfeedback._groups import unwrap_group
from streamfeedback._judge.judge import Judge, custom_id, merge_blocks, split_custom_id
from streamfeedback._judge.parser import BlockRating
from streamfeedback._stages import batch_rating
from streamfeedback.engines import FakeEngine
from streamfeedback.testing import (
    OpenAIServer,
    Reply,
    Request,
    judge_handler,
    rating_for,
)

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

KEY = "sk-test-BATCH-PLANTED-4e1d"
ENV = "SF_BATCH_TEST_KEY"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, KEY)


def _rater(base_url: str, **kw: Any) -> RaterConfig:
    raw = {
        "backend": "openai",
        "model": "gpt-judge",
        "base_url": base_url,
        "api_key_env": ENV,
        "mode": "batch",
        "batch_poll_interval": 0.02,
        "max_retries": 0,
        **kw,
    }
    return msgspec.convert(raw, RaterConfig)


def _judge(config: RaterConfig) -> Judge:
    def never(request: object) -> str:
        raise AssertionError("the batch path must not call the live engine")

    return Judge(FakeEngine("judge", never), config, seed=3)


def _joined(i: int, n: int = 3) -> Joined:
    prompt = Prompt(id=f"q{i:03d}", instruction=f"Explain idea {i}.", line=i + 1)
    models = tuple(f"m{k}" for k in range(n))
    gens = [
        Generation(
            prompt=prompt,
            models=models,
            slot=k,
            model=models[k],
            text=f"answer {k} to idea {i}: quality={1 + (i + k) % 5} words",
        )
        for k in range(n)
    ]
    return Joined(prompt=prompt, generations=gens)


async def _rate(
    judge: Judge,
    items: Sequence[Joined],
    state: Path,
    *,
    done: Collection[str] = (),
    max_pending: int = batch_rating.MAX_PENDING,
    gap: float = 0.0,
) -> tuple[list[Record], list[Failure]]:
    joined_tx, joined_rx = open_channel[Joined](4)
    records_tx, records_rx = open_channel[Record](4)
    failures_tx, failures_rx = open_channel[Failure](4)
    records: list[Record] = []
    failures: list[Failure] = []

    async def feed() -> None:
        async with joined_tx:
            for item in items:
                try:
                    await joined_tx.send(item)
                except anyio.BrokenResourceError:
                    return  # the rater died; its own error is the one to report
                if gap:
                    await anyio.sleep(gap)

    async def drain_records() -> None:
        async with records_rx:
            async for record in records_rx:
                records.append(record)

    async def drain_failures() -> None:
        async with failures_rx:
            async for failure in failures_rx:
                failures.append(failure)

    with anyio.fail_after(60):
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(feed)
                tg.start_soon(drain_records)
                tg.start_soon(drain_failures)
                await batch_rating.run(
                    judge,
                    joined_rx,
                    records_tx,
                    failures_tx,
                    state_path=str(state),
                    done=done,
                    max_pending=max_pending,
                )
        except BaseExceptionGroup as group:
            raise unwrap_group(group) from None
    return records, failures


def _batch_lines(server: OpenAIServer) -> list[list[dict[str, Any]]]:
    """Each submitted batch's input lines, in submission order."""
    return [
        [json.loads(line) for line in server.files[b.input_file_id].data.splitlines()]
        for b in server.batches.values()
    ]


async def _until_submitted(state: Path) -> None:
    """Until the state file records a created batch (an entry with its id)."""
    while True:
        if state.exists() and any(b["id"] for b in json.loads(state.read_text())["batches"]):
            return
        await anyio.sleep(0.01)


def _check_ratings(records: Sequence[Record]) -> None:
    for record in records:
        for text, rating in zip(record.generations, record.ratings, strict=True):
            assert rating is None or rating == rating_for(text), "rating on the wrong response"


# -- the shared judge parts --------------------------------------------------------------


def test_custom_ids_round_trip_even_with_bars_in_the_prompt_id() -> None:
    assert custom_id("a|b", "honesty", 2) == "a|b|honesty|2"
    assert split_custom_id("a|b|honesty|2") == ("a|b", "honesty", 2)
    with pytest.raises(ValueError):
        split_custom_id("no-bars")


def test_merge_keeps_the_first_readable_block_per_text() -> None:
    four = BlockRating(rating=4, rationale="first")
    three = BlockRating(rating=3, rationale="second")
    unreadable = BlockRating(rating=None, rationale="?")
    merged = merge_blocks([four, unreadable, None, None], [three, three, None, unreadable])
    assert merged == [four, three, None, unreadable]


def _answer(request: ChatRequest) -> str:
    """A tidy answer rating each shown text by its content, blocks in reverse order."""
    inputs = request.messages[-1].content.rpartition("\nTexts:\n")[2]
    shown = {int(k): t for k, t in re.findall(r"^<text (\d+)> (.*)$", inputs, re.M)}
    return "\n\n".join(
        f"#### Output for Text {k}\nType: 1\nRationale: kind.\n"
        f"Rating: {rating_for(shown[k])}\nRationale: text {k}."
        for k in sorted(shown, reverse=True)
    )


async def test_requests_and_assemble_rebuild_what_rate_gives() -> None:
    config = _rater("http://x", shuffle=True, aspects=["honesty", "helpfulness"])
    item = _joined(7)
    engine = FakeEngine("judge", _answer)
    live = await Judge(engine, config, seed=3).rate(item)
    assert [r.id for r in engine.requests] == ["q007|honesty|1", "q007|helpfulness|1"]

    judge = _judge(config)
    requests = judge.requests(item, 1)
    assert [(cid, aspect) for cid, aspect, _ in requests] == [
        ("q007|honesty|1", "honesty"),
        ("q007|helpfulness|1", "helpfulness"),
    ]
    assert [req for _, _, req in requests] == engine.requests
    blocks = {aspect: judge.parse(item, aspect, _answer(req)) for _, aspect, req in requests}
    assert judge.assemble(item, blocks, {"honesty": 1, "helpfulness": 1}) == live
    assert judge.requests(item, 2, ["helpfulness"])[0][0] == "q007|helpfulness|2"
    assert judge.statistics().reasks == 1


# -- batches -----------------------------------------------------------------------------


async def test_every_rating_lands_on_its_own_response_across_batches(tmp_path: Path) -> None:
    handler = judge_handler(untidy=0.4, broken=0.3, seed=2)
    async with OpenAIServer(handler) as server:
        judge = _judge(_rater(server.base_url, shuffle=True, batch_max_requests=7))
        items = [_joined(i) for i in range(40)]
        records, failures = await _rate(judge, items, tmp_path / "state.json")
        batches = _batch_lines(server)

    assert failures == []
    assert sorted(r.id for r in records) == [j.prompt.id for j in items]
    _check_ratings(records)
    assert all(len(lines) <= 7 for lines in batches)
    assert len(batches) >= 40 // 7
    first_asks = [line for lines in batches for line in lines if line["custom_id"].endswith("|1")]
    assert len(first_asks) == 40
    reasks = [lines for lines in batches if any(not ln["custom_id"].endswith("|1") for ln in lines)]
    assert reasks, "unreadable answers were asked again"
    assert all(all(not ln["custom_id"].endswith("|1") for ln in lines) for lines in reasks), (
        "re-asks go in follow-up batches of their own"
    )
    assert any((r.judge_attempts or 1) > 1 for r in records)
    nulls = sum(r.ratings.count(None) for r in records)
    assert nulls < 3
    for lines in batches:
        for line in lines:
            assert line["method"] == "POST" and line["url"] == "/v1/chat/completions"
            assert line["body"]["model"] == "gpt-judge"
    assert all(r.headers["authorization"] == f"Bearer {KEY}" for r in server.requests)
    assert not (tmp_path / "state.json.d").exists(), "sidecars are removed once emitted"
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["batches"] == []
    assert judge.statistics().requests == sum(len(lines) for lines in batches)


async def test_several_aspects_and_the_byte_limit(tmp_path: Path) -> None:
    async with OpenAIServer(judge_handler(untidy=0.4, broken=0.0)) as server:
        config = _rater(server.base_url, aspects=["helpfulness", "honesty"], batch_max_bytes=40_000)
        items = [_joined(i, n=4) for i in range(12)]
        records, failures = await _rate(_judge(config), items, tmp_path / "s.json")
        sizes = [len(server.files[b.input_file_id].data) for b in server.batches.values()]
        lines = _batch_lines(server)
    assert failures == []
    assert len(records) == 12
    _check_ratings(records)
    for record in records:
        assert record.aspects is not None and set(record.aspects) == {"helpfulness", "honesty"}
        assert record.fine_grained_score is not None
    assert len(sizes) > 1 and max(sizes) <= 40_000
    for batch in lines:
        ids = [split_custom_id(line["custom_id"])[0] for line in batch]
        assert all(ids.count(i) == 2 for i in ids), "a prompt's aspects share one batch file"


async def test_a_wrong_key_stops_with_judge_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(ENV, "sk-WRONG-key-0123456789")
    async with OpenAIServer(judge_handler(), api_key=KEY) as server:
        judge = _judge(_rater(server.base_url))
        with pytest.raises(JudgeUnavailable) as info:
            await _rate(judge, [_joined(1), _joined(2)], tmp_path / "s.json")
    message = str(info.value)
    assert "401" in message and "/files" in message and "API key" in message
    assert "WRONG" not in message and "WRONG" not in caplog.text
    assert server.status_counts[401] == 1, "one refused upload, nothing more"


async def test_a_missing_key_variable_stops_before_any_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ENV)
    async with OpenAIServer(judge_handler()) as server:
        with pytest.raises(JudgeUnavailable, match=ENV):
            await _rate(_judge(_rater(server.base_url)), [_joined(1)], tmp_path / "s.json")
    assert server.requests == []


async def test_a_server_without_the_batch_api_is_a_404(tmp_path: Path) -> None:
    async with OpenAIServer(judge_handler()) as server:
        url = server.base_url.removesuffix("/v1") + "/nothing/v1"
        with pytest.raises(JudgeUnavailable, match=r"404 to POST /files.*base_url"):
            await _rate(_judge(_rater(url)), [_joined(1)], tmp_path / "s.json")


async def test_resume_polls_the_pending_batch_instead_of_submitting_again(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state.json"
    items = [_joined(i) for i in range(5)]
    async with OpenAIServer(judge_handler(untidy=0.4, broken=0.0), batch_delay=60) as server:
        judge = _judge(_rater(server.base_url))
        with anyio.move_on_after(20) as scope:
            async with anyio.create_task_group() as tg:

                async def cancel_once_submitted() -> None:
                    await _until_submitted(state)
                    tg.cancel_scope.cancel()

                tg.start_soon(cancel_once_submitted)
                await _rate(judge, items, state, gap=0.0)
        assert not scope.cancelled_caught
        saved = json.loads(state.read_text())
        assert len(saved["batches"]) == 1 and saved["batches"][0]["prompts"] == 5
        assert len(server.batches) == 1
        (pending,) = server.batches.values()
        assert pending.status == "validating"

        server.batch_delay = 0.05
        # the pipeline sends the unfinished prompts again; one is already in the output
        records, failures = await _rate(
            _judge(_rater(server.base_url)), items, state, done={"q002"}
        )
        assert len(server.batches) == 1, "no new batch for prompts a pending batch covers"
        assert pending.status == "completed"
    assert failures == []
    assert sorted(r.id for r in records) == ["q000", "q001", "q003", "q004"]
    _check_ratings(records)
    assert json.loads(state.read_text())["batches"] == []
    assert not (tmp_path / "state.json.d").exists()


async def test_pending_ids_lists_what_a_state_file_covers(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    assert len(batch_rating.pending_ids(str(state))) == 0
    async with OpenAIServer(judge_handler(), batch_delay=60) as server:
        with anyio.move_on_after(20):
            async with anyio.create_task_group() as tg:

                async def cancel_once_submitted() -> None:
                    await _until_submitted(state)
                    tg.cancel_scope.cancel()

                tg.start_soon(cancel_once_submitted)
                await _rate(_judge(_rater(server.base_url)), [_joined(1), _joined(2)], state)
    ids = batch_rating.pending_ids(str(state))
    assert "q001" in ids and "q002" in ids and "q003" not in ids


async def test_errored_requests_are_retried_or_failed(tmp_path: Path) -> None:
    judge_answers = judge_handler(untidy=0.0, broken=0.0)
    calls: dict[str, int] = {}

    async def handler(request: Request) -> Reply:
        prompt = request.prompt
        key = "idea 1:" if "idea 1:" in prompt else "idea 2:" if "idea 2:" in prompt else ""
        calls[key] = calls.get(key, 0) + 1
        if key == "idea 1:" and calls[key] == 1:
            return Reply.failure(503, "overloaded, try later")
        if key == "idea 2:":
            return Reply.failure(400, f"context too long (key {KEY})")
        return await judge_answers(request)

    async with OpenAIServer(handler) as server:
        judge = _judge(_rater(server.base_url))
        records, failures = await _rate(judge, [_joined(i) for i in range(4)], tmp_path / "s")
    assert sorted(r.id for r in records) == ["q000", "q001", "q003"]
    retried = next(r for r in records if r.id == "q001")
    assert retried.judge_attempts == 2 and None not in retried.ratings
    _check_ratings(records)
    (failure,) = failures
    assert failure.id == "q002" and failure.stage == "rating" and failure.line == 3
    assert "400" in failure.error and "context too long" in failure.error
    assert KEY not in failure.error


@pytest.mark.parametrize("status", [401, 403])
async def test_a_line_refused_for_auth_fails_without_the_servers_text(
    tmp_path: Path, status: int
) -> None:
    """As for a live request: servers quote the key in auth errors, so none of it is kept."""

    answers = judge_handler(untidy=0.0, broken=0.0)

    async def handler(request: Request) -> Reply:
        if "idea 1:" in request.prompt:
            return Reply.failure(status, f"key {KEY[:-4]}... is not allowed here")
        return await answers(request)

    async with OpenAIServer(handler) as server:
        judge = _judge(_rater(server.base_url))
        records, failures = await _rate(judge, [_joined(i) for i in range(3)], tmp_path / "s")
    assert sorted(r.id for r in records) == ["q000", "q002"]
    (failure,) = failures
    assert failure.id == "q001" and failure.error.endswith(f"answered {status}")
    assert "not allowed" not in failure.error


@pytest.mark.parametrize("max_attempts", [1, 2])
async def test_an_expired_batch_is_asked_again_up_to_max_attempts(
    tmp_path: Path, max_attempts: int
) -> None:
    async with OpenAIServer(judge_handler(untidy=0.0, broken=0.0), expire_after=3) as server:
        judge = _judge(
            _rater(
                server.base_url,
                max_attempts=max_attempts,
                batch_max_requests=5,
                batch_poll_interval=0.1,
            )
        )
        records, failures = await _rate(judge, [_joined(i) for i in range(5)], tmp_path / "s")
        statuses = [b.status for b in server.batches.values()]
    _check_ratings(records)
    if max_attempts == 1:
        assert statuses == ["expired"]
        assert len(records) == 3 and len(failures) == 2
        assert all("completion window expired" in f.error for f in failures)
    else:
        assert statuses == ["expired", "completed"]
        assert len(records) == 5 and failures == []
        assert sorted(r.judge_attempts or 1 for r in records) == [1, 1, 1, 2, 2]


async def test_a_batch_that_fails_validation_stops_the_run(tmp_path: Path) -> None:
    async with OpenAIServer(judge_handler()) as server:
        judge = _judge(_rater(server.base_url))
        # the same prompt twice: one custom_id twice in one file, which the API refuses whole
        with pytest.raises(JudgeUnavailable, match="failed at .*line 2: .*repeated"):
            await _rate(judge, [_joined(1), _joined(1)], tmp_path / "s.json")
        statuses = [b.status for b in server.batches.values()]
    assert statuses == ["failed"]
    assert json.loads((tmp_path / "s.json").read_text())["batches"] == []


async def test_a_slow_input_is_flushed_when_idle(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="streamfeedback.batch")
    async with OpenAIServer(judge_handler(untidy=0.0, broken=0.0)) as server:
        judge = _judge(_rater(server.base_url, batch_poll_interval=0.05))
        records, _ = await _rate(judge, [_joined(i) for i in range(3)], tmp_path / "s", gap=0.3)
        sizes = [b.total for b in server.batches.values()]
    assert len(records) == 3
    assert sizes == [1, 1, 1], "each prompt went out after the input idled"
    assert "submitted: 1 requests for 1 prompts" in caplog.text
    assert "completed" in caplog.text


async def test_pending_batches_are_bounded(tmp_path: Path) -> None:
    async with OpenAIServer(judge_handler(untidy=0.0, broken=0.0), batch_delay=0.1) as server:
        judge = _judge(_rater(server.base_url, batch_max_requests=2))
        peak = 0

        async def watch() -> None:
            nonlocal peak
            while True:
                live = sum(1 for b in server.batches.values() if b.status not in ("completed",))
                peak = max(peak, live)
                await anyio.sleep(0.005)

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            records, _ = await _rate(
                judge, [_joined(i) for i in range(12)], tmp_path / "s", max_pending=2
            )
            tg.cancel_scope.cancel()
    assert len(records) == 12
    assert len(server.batches) >= 6
    assert all(b.total <= 2 for b in server.batches.values())
    assert peak <= 2


# -- a crash between recording a batch and hearing back from its create call ---------------


def _state_entries(state: Path) -> list[dict[str, Any]]:
    return list(json.loads(state.read_text())["batches"]) if state.exists() else []


async def _die_while_creating(server: OpenAIServer, state: Path, items: list[Joined]) -> None:
    """Run the rater until it has recorded a batch-to-be and asked for it, then stop it dead
    (cancelled while the server holds its answer to POST /batches)."""
    server.create_hold = 30
    with anyio.move_on_after(20):
        async with anyio.create_task_group() as tg:

            async def stop_once_asked() -> None:
                while True:
                    if _state_entries(state) and any(
                        r.method == "POST" and r.path.endswith("/batches") for r in server.requests
                    ):
                        break
                    await anyio.sleep(0.01)
                tg.cancel_scope.cancel()

            tg.start_soon(stop_once_asked)
            await _rate(_judge(_rater(server.base_url)), items, state)
    server.create_hold = 0
    assert [e["id"] for e in _state_entries(state)] == [""], "recorded, never heard back"


async def test_a_batch_created_as_the_run_died_is_adopted_not_submitted_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = tmp_path / "state.json"
    items = [_joined(i) for i in range(5)]
    async with OpenAIServer(judge_handler(untidy=0.3, broken=0.0)) as server:
        await _die_while_creating(server, state, items)
        assert len(server.batches) == 1, "the server made the batch the client never heard of"
        (orphan,) = server.batches
        inputs = [f.id for f in server.files.values() if f.purpose == "batch"]
        with caplog.at_level(logging.WARNING, "streamfeedback"):
            records, failures = await _rate(_judge(_rater(server.base_url)), items, state)
        assert list(server.batches) == [orphan], "adopted, not submitted again"
        assert [f.id for f in server.files.values() if f.purpose == "batch"] == inputs
    assert failures == []
    assert sorted(r.id for r in records) == [j.prompt.id for j in items]
    _check_ratings(records)
    assert f"batch {orphan} was created just before the last run stopped" in caplog.text
    assert _state_entries(state) == []


async def test_a_batch_recorded_but_never_created_is_created_from_its_uploaded_file(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state.json"
    items = [_joined(i) for i in range(4)]
    async with OpenAIServer(judge_handler(untidy=0.0, broken=0.0)) as server:
        await _die_while_creating(server, state, items)
        server.batches.clear()  # as if the create call never reached the server
        (entry,) = _state_entries(state)
        records, failures = await _rate(_judge(_rater(server.base_url)), items, state)
        assert [b.input_file_id for b in server.batches.values()] == [entry["input_file_id"]]
        (batch,) = server.batches.values()
        assert batch.metadata == {
            "source": "streamfeedback",
            "sidecar": entry["sidecar"],
            "token": entry["token"],
        }
    assert failures == []
    assert sorted(r.id for r in records) == [j.prompt.id for j in items]


async def test_an_unsubmitted_batch_whose_file_is_gone_is_written_again_from_its_sidecar(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = tmp_path / "state.json"
    items = [_joined(i) for i in range(4)]
    async with OpenAIServer(judge_handler(untidy=0.0, broken=0.0)) as server:
        await _die_while_creating(server, state, items)
        server.batches.clear()
        (entry,) = _state_entries(state)
        gone = server.files.pop(entry["input_file_id"])  # expired meanwhile
        with caplog.at_level(logging.WARNING, "streamfeedback"):
            records, failures = await _rate(_judge(_rater(server.base_url)), [], state)
        (batch,) = server.batches.values()
        assert batch.input_file_id != entry["input_file_id"]
        assert server.files[batch.input_file_id].data == gone.data, "the same requests again"
    assert failures == []
    assert sorted(r.id for r in records) == [j.prompt.id for j in items], "from the sidecar"
    assert "submitting its 4 prompts again" in caplog.text
    assert not any((tmp_path / "state.json.d").glob("*")), "no stray sidecar left"


async def test_a_resumed_pipeline_without_a_spool_does_not_generate_what_batches_cover(
    tmp_path: Path,
) -> None:
    """Library use, no spool: prompts in batches an earlier run submitted are resumed from the
    state file, never generated again."""
    from streamfeedback import Pipeline

    from ..helpers import POOL, sim_config

    state = tmp_path / "run.batches.json"
    prompts = [f"Explain idea {i}." for i in range(6)]

    def engines() -> dict[str, FakeEngine]:
        return {name: FakeEngine(name, lambda r: f"an answer of {r.id}") for name in POOL}

    async with OpenAIServer(judge_handler(untidy=0.0, broken=0.0), batch_delay=600) as server:
        config = sim_config(
            rater={
                "backend": "openai",
                "model": "gpt-judge",
                "base_url": server.base_url,
                "api_key_env": ENV,
                "mode": "batch",
                "batch_poll_interval": 0.02,
            }
        )
        first = engines()
        with anyio.move_on_after(20) as scope:
            async with Pipeline(config, engines=first, batch_state_path=str(state)) as pipeline:
                pipeline.run(prompts)
                while True:
                    entries = _state_entries(state)
                    if sum(e["prompts"] for e in entries if e["id"]) == len(prompts):
                        break
                    await anyio.sleep(0.02)
                assert pipeline.statistics().records == 0
                scope.cancel()  # the run dies with every prompt in a submitted batch
                await anyio.lowlevel.checkpoint()
        assert scope.cancelled_caught
        assert sum(len(e.requests) for e in first.values()) == 3 * len(prompts)

        server.batch_delay = 0.02
        again = engines()
        with anyio.fail_after(30):
            async with Pipeline(config, engines=again, batch_state_path=str(state)) as pipeline:
                records = [r async for r in pipeline.run(prompts)]
        assert sum(len(e.requests) for e in again.values()) == 0, "nothing generated again"
    assert len(records) == len(prompts)
    _check_ratings(records)


async def _stop_when(server: OpenAIServer, state: Path, items: list[Joined], posts: int) -> None:
    """Run the rater; once `posts` POST /batches have arrived (the last held by the server),
    stop it dead."""
    with anyio.move_on_after(20):
        async with anyio.create_task_group() as tg:

            async def stop() -> None:
                while True:
                    made = [
                        r
                        for r in server.requests
                        if r.method == "POST" and r.path.endswith("/batches")
                    ]
                    if len(made) == posts - 1:
                        server.create_hold = 30
                    if len(made) >= posts:
                        break
                    await anyio.sleep(0.005)
                tg.cancel_scope.cancel()

            tg.start_soon(stop)
            await _rate(_judge(_rater(server.base_url, max_attempts=3)), items, state)
    server.create_hold = 0


async def test_a_follow_up_batch_created_as_the_run_died_keeps_its_sidecar_and_is_adopted(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state.json"
    items = [_joined(i) for i in range(3)]
    async with OpenAIServer(judge_handler(untidy=0.0, broken=1.0)) as server:
        await _stop_when(server, state, items, posts=2)  # the re-asks' batch is being created
        (entry,) = _state_entries(state)
        assert entry["id"] == "" and entry["attempt"] == 2
        assert (tmp_path / "state.json.d" / entry["sidecar"]).exists(), "its sidecar stays"
        made = list(server.batches)
        server.handler = judge_handler(untidy=0.0, broken=0.0)
        records, failures = await _rate(_judge(_rater(server.base_url, max_attempts=3)), [], state)
        assert list(server.batches) == made, "the follow-up batch was adopted, not made again"
    assert failures == [] and sorted(r.id for r in records) == [j.prompt.id for j in items]


async def test_a_batch_resubmitted_over_the_token_limit_is_recorded_before_it_is_created(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state.json"
    items = [_joined(i) for i in range(3)]
    async with OpenAIServer(judge_handler(untidy=0.0, broken=0.0)) as server:
        run_batch = server._run_batch
        refused: list[str] = []

        async def over_the_limit_once(batch: Any, headers: dict[str, str]) -> None:
            if refused:
                await run_batch(batch, headers)
                return
            refused.append(batch.id)
            batch.errors = [{"code": "token_limit_exceeded", "message": "Enqueued token limit"}]
            batch.move("failed")

        server._run_batch = over_the_limit_once  # type: ignore[method-assign]
        await _stop_when(server, state, items, posts=2)  # the same file, submitted again
        assert [e["id"] for e in _state_entries(state)] == [""]
        records, failures = await _rate(_judge(_rater(server.base_url)), [], state)
        inputs = [b.input_file_id for b in server.batches.values()]
    assert len(inputs) == 2 and len(set(inputs)) == 1, "the refused file, submitted once more"
    assert failures == [] and sorted(r.id for r in records) == [j.prompt.id for j in items]
