"""Failure policy over real HTTP: a dead pool model, a judge with a bad key, a long 429 spell."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

import anyio
import pytest

from streamfeedback.testing import OpenAIServer, Reply, Request, judge_handler

from ..helpers import decode_lines

KEY = "sk-test-failure-policy-0123456789"
JUDGE = "gpt-judge"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _config(
    tmp_path: Path, base_url: str, prompts: int, *, judge_extra: str = "", gen_extra: str = ""
) -> Path:
    with (tmp_path / "prompts.jsonl").open("w") as fh:
        for i in range(prompts):
            fh.write(json.dumps({"id": f"q{i:04d}", "instruction": f"Explain idea {i}."}) + "\n")
    gens = "".join(
        f'[[generators]]\nname = "m{i}"\nbackend = "openai"\nmodel = "org/m{i}"\n'
        f'base_url = "{base_url}"\nmax_tokens = 32\nmax_retries = 1\n{gen_extra}'
        for i in range(6)
    )
    path = tmp_path / "run.toml"
    path.write_text(
        '[source]\npath = "prompts.jsonl"\nid_column = "id"\n[routing]\nn = 3\ncooldown = 600\n'
        f'{gens}[rater]\nbackend = "openai"\nmodel = "{JUDGE}"\nbase_url = "{base_url}"\n'
        f'api_key_env = "SF_TEST_KEY"\nmax_concurrency = 16\n{judge_extra}'
    )
    return path


async def _run(config: Path, out: Path) -> tuple[int, bytes]:
    with anyio.fail_after(120):
        result = await anyio.run_process(
            [sys.executable, "-m", "streamfeedback", "run", str(config), "-o", str(out)],
            env={**os.environ, "SF_TEST_KEY": KEY},
            check=False,
        )
    return result.returncode, result.stderr


async def test_a_dead_pool_model_is_replaced_in_every_record(tmp_path: Path) -> None:
    judge = judge_handler(untidy=0.0, broken=0.0)

    async def handler(request: Request) -> Reply:
        if request.model == "org/m2":
            return Reply.failure(503, "model server is gone")
        return await judge(request)

    async with OpenAIServer(handler) as server:
        out = tmp_path / "out.ndjson"
        config = _config(tmp_path, server.base_url, 300, gen_extra="max_concurrency = 4\n")
        config.write_text(config.read_text() + "[pipeline]\nbuffer = 4\n")
        code, stderr = await _run(config, out)
        m2_requests = sum(r.model == "org/m2" for r in server.requests)
    assert code == 0, stderr.decode()
    records = decode_lines(out.read_bytes())
    assert len(records) == 300
    for r in records:
        assert len(set(r.generation_models)) == 3 and "m2" not in r.generation_models
    assert any(r.substitutions for r in records)
    assert b"m2 was taken out of routing" in stderr
    # without the cool-down m2 would get ~150 prompts, two attempts each
    assert m2_requests < 100, f"m2 should leave routing, it got {m2_requests} requests"


async def test_a_judge_answering_401_stops_the_run_and_a_rerun_does_not_regenerate(
    tmp_path: Path,
) -> None:
    judge = judge_handler(untidy=0.0, broken=0.0)
    bad_key = True

    async def handler(request: Request) -> Reply:
        if request.model == JUDGE and bad_key:
            return Reply.failure(401, "Incorrect API key provided")
        return await judge(request)

    async with OpenAIServer(handler) as server:
        config = _config(tmp_path, server.base_url, 60)
        out = tmp_path / "out.ndjson"
        started = time.monotonic()
        code, stderr = await _run(config, out)
        took = time.monotonic() - started
        judge_requests = sum(r.model == JUDGE for r in server.requests)
        assert code == 2, stderr.decode()
        assert b"401" in stderr and JUDGE.encode() in stderr and server.base_url.encode() in stderr
        assert judge_requests <= 3, f"{judge_requests} judge requests after a 401"
        assert took < 60
        assert KEY.encode() not in stderr

        bad_key = False
        spooled = Path(f"{out}.spool.ndjson").read_bytes().count(b"\n")  # a line a response
        assert spooled > 0, "what was generated before the stop is kept"
        generated_before = sum(r.model != JUDGE for r in server.requests)
        code, stderr = await _run(config, out)
        generated_after = sum(r.model != JUDGE for r in server.requests)
    assert code == 0, stderr.decode()
    assert sorted(r.id for r in decode_lines(out.read_bytes())) == [f"q{i:04d}" for i in range(60)]
    assert generated_after - generated_before == 3 * 60 - spooled, (
        "the rerun generates only what the spool did not hold"
    )


async def test_a_long_spell_of_429s_slows_the_run_but_fails_nothing(tmp_path: Path) -> None:
    judge = judge_handler(untidy=0.0, broken=0.0)
    spell_ends: list[float] = []  # 3 s from the judge's first request, however slow the start

    async def handler(request: Request) -> Reply:
        if request.model == JUDGE:
            if not spell_ends:
                spell_ends.append(time.monotonic() + 3.0)
            if time.monotonic() < spell_ends[0]:
                return Reply.failure(429, "Rate limit reached", retry_after=0.2)
        return await judge(request)

    async with OpenAIServer(handler) as server:
        out = tmp_path / "out.ndjson"
        code, stderr = await _run(
            _config(tmp_path, server.base_url, 40, judge_extra="max_retries = 2\n"), out
        )
        throttled = server.status_counts[429]
    assert code == 0, stderr.decode()
    assert throttled > 3, "the judge really was rate limiting"
    assert len(decode_lines(out.read_bytes())) == 40
    failures = Path(f"{out}.failures.ndjson")
    assert not failures.exists() or failures.read_bytes() == b""


def _nothing_listens() -> str:
    """A base URL on 127.0.0.1 where nothing listens (connection refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


async def test_a_judge_where_nothing_listens_stops_the_run_in_seconds(tmp_path: Path) -> None:
    dead = _nothing_listens()
    async with OpenAIServer(judge_handler(untidy=0.0, broken=0.0)) as server:
        config = _config(tmp_path, server.base_url, 60, judge_extra="max_retries = 2\n")
        head, sep, rater = config.read_text().partition("[rater]")
        config.write_text(head + sep + rater.replace(server.base_url, dead))
        out = tmp_path / "out.ndjson"
        code, stderr = await _run(config, out)
    text = stderr.decode()
    assert code == 2, text
    assert dead in text, text
    assert "cannot reach" in text and "Traceback" not in text
    failures = Path(f"{out}.failures.ndjson")
    assert not failures.exists() or not failures.read_bytes().strip(), (
        "the first refused connection stops the run: no prompt fails for good, a rerun takes them"
    )
    assert Path(f"{out}.spool.ndjson").read_bytes().count(b"\n") > 0, "generations are kept"


async def test_a_judge_that_always_answers_500_stops_the_run(tmp_path: Path) -> None:
    judge = judge_handler(untidy=0.0, broken=0.0)

    async def handler(request: Request) -> Reply:
        if request.model == JUDGE:
            return Reply.failure(500, "internal error")
        return await judge(request)

    async with OpenAIServer(handler) as server:
        config = _config(tmp_path, server.base_url, 60, judge_extra="max_retries = 1\n")
        code, stderr = await _run(config, tmp_path / "out.ndjson")
        judge_requests = sum(r.model == JUDGE for r in server.requests)
    text = stderr.decode()
    assert code == 2, text
    assert "500" in text and server.base_url in text and JUDGE in text
    assert judge_requests == 4, "two prompts, two attempts each: then the judge is dead"


@pytest.mark.parametrize("status", [400, None])
async def test_generators_that_fail_every_request_stop_the_run_naming_the_endpoint(
    tmp_path: Path, status: int | None
) -> None:
    """Every model answers 400 to everything, or nothing listens at their address."""
    judge = judge_handler(untidy=0.0, broken=0.0)

    async def handler(request: Request) -> Reply:
        if request.model != JUDGE and status is not None:
            return Reply.failure(status, "max_tokens is too large for this model")
        return await judge(request)

    async with OpenAIServer(handler) as server:
        config = _config(tmp_path, server.base_url, 200)
        if status is None:
            dead = _nothing_listens()
            text = config.read_text()
            head, sep, rater = text.partition("[rater]")
            config.write_text(head.replace(server.base_url, dead) + sep + rater)
        where = dead if status is None else server.base_url
        out = tmp_path / "out.ndjson"
        started = time.monotonic()
        code, stderr = await _run(config, out)
        took = time.monotonic() - started
        generator_requests = sum(r.model != JUDGE for r in server.requests)
    text = stderr.decode()
    assert code == 2, text
    last = text.splitlines()[-2]
    assert "generators left" in last and where in last, last
    assert "Traceback" not in text
    assert took < 60
    if status is not None:
        # a first wave of requests is in flight before any answer comes back
        assert generator_requests < 600, generator_requests
    assert not out.exists() or out.read_bytes() == b""
