"""Stopping a run and counting it honestly: Ctrl-C, the drain timeout, reruns, the summary."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import msgspec
import pytest
from anyio.abc import Process
from anyio.streams.text import TextReceiveStream

from streamfeedback import Failure
from streamfeedback.testing import OpenAIServer, Reply, Request, judge_handler

from ..helpers import decode_lines
from .test_cli import sf, write_config

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

JUDGE = "gpt-judge"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _http_config(tmp_path: Path, base_url: str, prompts: int, *, rater: str = "") -> Path:
    with (tmp_path / "prompts.jsonl").open("w") as fh:
        for i in range(prompts):
            fh.write(json.dumps({"id": f"q{i:04d}", "instruction": f"Explain idea {i}."}) + "\n")
    gens = "".join(
        f'[[generators]]\nname = "m{i}"\nbackend = "openai"\nmodel = "org/m{i}"\n'
        f'base_url = "{base_url}"\nmax_tokens = 16\nmax_concurrency = 8\n'
        for i in range(4)
    )
    path = tmp_path / "run.toml"
    path.write_text(
        '[source]\npath = "prompts.jsonl"\nid_column = "id"\n[routing]\nn = 2\n'
        f'{gens}[rater]\nbackend = "openai"\nmodel = "{JUDGE}"\nbase_url = "{base_url}"\n'
        f"max_retries = 0\n{rater}"
    )
    return path


@asynccontextmanager
async def _started(config: Path, out: Path) -> AsyncIterator[Process]:
    """The command line running `config`; killed if the test fails before it ends."""
    proc = await anyio.open_process(
        [sys.executable, "-m", "streamfeedback", "run", str(config), "-o", str(out)],
        env={**os.environ, "OPENAI_API_KEY": "sk-test-stop-0123456789"},
    )
    async with proc:
        try:
            yield proc
        finally:
            if proc.returncode is None:
                proc.kill()


async def _finish(proc: Process) -> tuple[int, str]:
    assert proc.stderr is not None
    chunks = [chunk async for chunk in TextReceiveStream(proc.stderr)]
    return await proc.wait(), "".join(chunks)


async def test_ctrl_c_after_every_prompt_was_taken_finishes_them_and_exits_0(
    tmp_path: Path,
) -> None:
    judge = judge_handler(untidy=0.0, broken=0.0)
    release, all_asked = anyio.Event(), anyio.Event()
    asked = 0

    async def handler(request: Request) -> Reply:
        nonlocal asked
        if request.model == JUDGE:
            asked += 1
            if asked == 10:  # every prompt is with the judge: nothing is left to start
                all_asked.set()
            if asked > 1:  # (the judge's first answer opens it to more than one request)
                await release.wait()
        return await judge(request)

    async with OpenAIServer(handler) as server:
        out = tmp_path / "out.ndjson"
        async with _started(_http_config(tmp_path, server.base_url, 10), out) as proc:
            with anyio.fail_after(60):
                await all_asked.wait()
            proc.send_signal(signal.SIGINT)
            await anyio.sleep(0.3)
            release.set()
            code, stderr = await _finish(proc)
    assert code == 0, stderr
    assert "SIGINT: no new prompts" in stderr and "stopped:" not in stderr
    assert sorted(r.id for r in decode_lines(out.read_bytes())) == [f"q{i:04d}" for i in range(10)]


async def test_first_ctrl_c_stops_within_the_drain_timeout_and_says_what_is_left(
    tmp_path: Path,
) -> None:
    judge = judge_handler(untidy=0.0, broken=0.0)
    hang = True
    busy = anyio.Event()

    async def handler(request: Request) -> Reply:
        if request.model != JUDGE and hang:
            if len(server.requests) >= 16:
                busy.set()
            await anyio.sleep_forever()
        return await judge(request)

    async with OpenAIServer(handler) as server:
        config = _http_config(tmp_path, server.base_url, 300)
        out = tmp_path / "out.ndjson"
        async with _started(config, out) as proc:
            with anyio.fail_after(60):
                await busy.wait()
            stopped = time.monotonic()
            proc.send_signal(signal.SIGINT)
            code, stderr = await _finish(proc)
            took = time.monotonic() - stopped
        assert code == 130, stderr
        # the default drain timeout is 10 s; the old one was 60 s
        assert took < 40, f"the first Ctrl-C took {took:.0f}s"
        assert "the drain timeout (10s) ran out" in stderr
        assert "prompts unfinished and the prompts of the source not read yet" in stderr
        assert "the same command resumes them" in stderr
        assert "Traceback" not in stderr

        hang = False
        rerun = await anyio.run_process(
            [sys.executable, "-m", "streamfeedback", "run", str(config), "-o", str(out)],
            env={**os.environ, "OPENAI_API_KEY": "sk-test-stop-0123456789"},
            check=False,
        )
    assert rerun.returncode == 0, rerun.stderr.decode()
    ids = [r.id for r in decode_lines(out.read_bytes())]
    assert sorted(ids) == [f"q{i:04d}" for i in range(300)], "every prompt exactly once"


async def test_first_ctrl_c_starts_no_new_request_and_ends_when_those_in_flight_are_done(
    tmp_path: Path,
) -> None:
    judge = judge_handler(untidy=0.0, broken=0.0)
    busy = anyio.Event()
    signalled: int | None = None

    async def handler(request: Request) -> Reply:
        if request.model != JUDGE:
            if len(server.requests) >= 24:
                busy.set()
            await anyio.sleep(1.0)  # each generation takes a second
        return await judge(request)

    async with OpenAIServer(handler) as server:
        config = _http_config(tmp_path, server.base_url, 400)
        out = tmp_path / "out.ndjson"
        async with _started(config, out) as proc:
            with anyio.fail_after(60):
                await busy.wait()
            proc.send_signal(signal.SIGINT)
            signalled = len(server.requests)
            code, stderr = await _finish(proc)
        after = len(server.requests) - signalled
        assert code == 130, stderr
        # the requests in flight finish (and their prompts' judge requests, already under
        # way, may too); nothing new starts, so nothing waits for the drain timeout
        assert "drain timeout" not in stderr.replace("[pipeline] drain_timeout", "")
        assert after <= 8, f"{after} requests arrived after the Ctrl-C"
        assert "the same command resumes them" in stderr
        done = len(decode_lines(out.read_bytes())) if out.exists() else 0
        rerun = await anyio.run_process(
            [sys.executable, "-m", "streamfeedback", "run", str(config), "-o", str(out)],
            env={**os.environ, "OPENAI_API_KEY": "sk-test-stop-0123456789"},
            check=False,
        )
    assert rerun.returncode == 0, rerun.stderr.decode()
    assert f"{done} skipped".encode() in rerun.stderr
    ids = [r.id for r in decode_lines(out.read_bytes())]
    assert sorted(ids) == [f"q{i:04d}" for i in range(400)], "every prompt exactly once"


def test_a_rerun_with_a_smaller_limit_rates_only_its_own_prompts(tmp_path: Path) -> None:
    config = write_config(tmp_path, 30)
    out = tmp_path / "out.ndjson"
    spool = f"{out}.spool.ndjson"
    generated = sf("generate", str(config), "--spool", spool, "--limit", "20")
    assert generated.returncode == 0, generated.stderr.decode()
    run = sf("run", str(config), "-o", str(out), "--limit", "5")
    assert run.returncode == 0, run.stderr.decode()
    assert sorted(r.id for r in decode_lines(out.read_bytes())) == [f"q{i:05d}" for i in range(5)]
    assert b"0 skipped (already done)" in run.stderr
    assert b"5 generated before (rated from the spool)" in run.stderr
    assert b"0 tokens generated" in run.stderr
    rest = sf("run", str(config), "-o", str(out))
    assert rest.returncode == 0, rest.stderr.decode()
    assert b"5 skipped (already done)" in rest.stderr
    assert b"15 generated before (rated from the spool)" in rest.stderr
    ids = [r.id for r in decode_lines(out.read_bytes())]
    assert sorted(ids) == [f"q{i:05d}" for i in range(30)]


async def test_the_summary_counts_n_a_ratings(tmp_path: Path) -> None:
    async def handler(request: Request) -> Reply:
        if request.model != JUDGE:
            return Reply(text="Once upon a time.")
        blocks = [f"#### Output for Text {k}\nRating: N/A\nRationale: a story." for k in (1, 2)]
        return Reply(text="\n\n".join(blocks))

    async with OpenAIServer(handler) as server:
        config = _http_config(tmp_path, server.base_url, 6, rater='aspect = "honesty"\n')
        out = tmp_path / "out.ndjson"
        async with _started(config, out) as proc:
            code, stderr = await _finish(proc)
    assert code == 0, stderr
    records = decode_lines(out.read_bytes())
    assert all(r.not_applicable == [True, True] for r in records)
    assert "0 null ratings, 12 N/A" in stderr


async def test_a_run_of_failed_prompts_says_as_many_as_the_failures_file_holds(
    tmp_path: Path,
) -> None:
    judge = judge_handler(untidy=0.0, broken=0.0)
    answered = 0

    async def handler(request: Request) -> Reply:
        nonlocal answered
        if request.model == JUDGE:
            answered += 1
            if answered > 3:
                return Reply.failure(400, "this prompt breaks a content rule")
        return await judge(request)

    async with OpenAIServer(handler) as server:
        config = _http_config(
            tmp_path,
            server.base_url,
            40,
            rater="max_concurrency = 1\nmax_consecutive_failures = 4\n",
        )
        out = tmp_path / "out.ndjson"
        async with _started(config, out) as proc:
            code, stderr = await _finish(proc)
    assert code == 2, stderr
    assert "4 prompts in a row failed" in stderr
    failures = [
        msgspec.json.decode(line, type=Failure)
        for line in Path(f"{out}.failures.ndjson").read_bytes().splitlines()
    ]
    assert len(failures) == 4 and all(f.stage == "rating" for f in failures)
    assert "4 failed" in stderr
    assert len(decode_lines(out.read_bytes())) == 3


def test_ctrl_c_while_the_command_starts_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    """Interrupts landing anywhere from Python's start through the package imports, the
    config and the engines' start: never a traceback through our code."""
    config = write_config(tmp_path, 2000, ttft=0.05, slots=4)
    seen: set[int] = set()
    for i in range(12):
        out = tmp_path / f"out{i}.ndjson"
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamfeedback", "run", str(config), "-o", str(out)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        time.sleep(0.05 * (i + 1))
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        stderr = err.decode()
        assert "streamfeedback/" not in stderr, stderr  # no frame of ours in a traceback
        seen.add(proc.returncode)
        # Python's own start, before any code of ours runs, may die of the signal or print a
        # traceback of its own; from our first line on it is one line and 130 (or a record)
        if "Traceback" not in stderr and proc.returncode != -signal.SIGINT:
            assert proc.returncode == 130, stderr
            assert "interrupted" in stderr or "SIGINT" in stderr, stderr
    assert 130 in seen
