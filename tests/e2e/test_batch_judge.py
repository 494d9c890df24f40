"""`streamfeedback run` with `[rater] mode = "batch"`: simulated generators, a judge behind the
test server's Files and Batches endpoints, every rating on its own response, resumable after a
crash, and the API key in no file and no output.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from streamfeedback import Record
from streamfeedback.testing import OpenAIServer, judge_handler, rating_for

from ..helpers import decode_lines

KEY = "sk-test-BATCH-E2E-PLANTED-93b1c7"
ENV = "SF_BATCH_E2E_KEY"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _config(tmp_path: Path, base_url: str, prompts: int) -> Path:
    with (tmp_path / "prompts.jsonl").open("w") as fh:
        for i in range(prompts):
            fh.write(json.dumps({"id": f"q{i:03d}", "instruction": f"Explain idea {i}."}) + "\n")
    gens = "".join(
        f'[[generators]]\nname = "m{i}"\nbackend = "sim"\nmodel = "org/m{i}"\n'
        "sim_ttft = 0\nsim_tpot = 0\nsim_output_tokens = 24\n"
        for i in range(4)
    )
    path = tmp_path / "run.toml"
    path.write_text(
        '[source]\npath = "prompts.jsonl"\nid_column = "id"\n[routing]\nn = 3\n'
        f'{gens}[rater]\nbackend = "openai"\nmodel = "gpt-judge"\nbase_url = "{base_url}"\n'
        f'api_key_env = "{ENV}"\nmode = "batch"\nbatch_poll_interval = 0.05\n'
        "batch_max_requests = 7\nshuffle = true\nmax_attempts = 3\n"
    )
    return path


def _command(config: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "streamfeedback", "-v", "run", str(config), "-o", str(out)]


def _env() -> dict[str, str]:
    return {**os.environ, ENV: KEY}


async def _run(config: Path, out: Path, limit: float = 60) -> subprocess.CompletedProcess[bytes]:
    """The run, to its end, in the config's folder."""
    with anyio.fail_after(limit):
        return await anyio.run_process(
            _command(config, out), env=_env(), cwd=config.parent, check=False
        )


def _pending_prompts(folder: Path) -> int:
    """Prompts in the created batches of the run's state file (none before it exists)."""
    total = 0
    for state in folder.glob("*.batches.json"):
        total += sum(p["prompts"] for p in json.loads(state.read_text())["batches"] if p["id"])
    return total


async def _until_pending(folder: Path, prompts: int) -> None:
    while True:
        if _pending_prompts(folder) >= prompts:
            return
        await anyio.sleep(0.02)


def _assert_aligned(records: list[Record]) -> None:
    """Every rating is its own response's (or null): none shifted onto another."""
    for record in records:
        for text, rating in zip(record.generations, record.ratings, strict=True):
            assert rating is None or rating == rating_for(text)


def _assert_key_nowhere(tmp_path: Path, *outputs: bytes) -> None:
    for data in outputs:
        assert KEY.encode() not in data
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), f"the key leaked into {path.name}"


async def test_batch_mode_through_the_cli(tmp_path: Path) -> None:
    judge = judge_handler(untidy=0.4, broken=0.05, seed=4)
    async with OpenAIServer(judge, api_key=KEY, batch_delay=0.02) as server:
        config = _config(tmp_path, server.base_url, 40)
        out = tmp_path / "out.ndjson"
        result = await _run(config, out, limit=120)
        batches = list(server.batches.values())
        lines = [len(server.files[b.input_file_id].data.splitlines()) for b in batches]
    stderr = result.stderr.decode()
    assert result.returncode == 0, stderr
    records = decode_lines(out.read_bytes())
    assert sorted(r.id for r in records) == [f"q{i:03d}" for i in range(40)]
    nulls = 0
    for record in records:
        assert record.judge_order is not None
        for text, rating in zip(record.generations, record.ratings, strict=True):
            if rating is None:
                nulls += 1
            else:
                assert rating == rating_for(text), "a rating landed on the wrong response"
    assert nulls <= 2
    assert len(batches) >= 40 // 7 and max(lines) <= 7
    assert all(b.status == "completed" for b in batches)
    assert "submitted" in stderr and "completed" in stderr
    (state,) = tmp_path.glob("*.batches.json")
    assert json.loads(state.read_text())["batches"] == []
    assert not Path(f"{state}.d").exists(), "no sidecar is left behind"
    _assert_key_nowhere(tmp_path, result.stdout, result.stderr)


async def test_a_crashed_batch_run_resumes_its_batches(tmp_path: Path) -> None:
    judge = judge_handler(untidy=0.4, broken=0.0, seed=5)
    async with OpenAIServer(judge, api_key=KEY, batch_delay=600) as server:
        config = _config(tmp_path, server.base_url, 12)
        out = tmp_path / "out.ndjson"
        with anyio.fail_after(60):
            async with await anyio.open_process(
                _command(config, out), env=_env(), cwd=tmp_path
            ) as process:
                await _until_pending(tmp_path, 12)
                process.send_signal(signal.SIGKILL)
                await process.wait()
        submitted = dict(server.batches)
        assert submitted and all(b.status == "validating" for b in submitted.values())
        assert not out.exists() or out.read_bytes() == b""

        server.batch_delay = 0.02
        result = await _run(config, out)
        assert result.returncode == 0, result.stderr.decode()
        assert server.batches.keys() == submitted.keys(), "no new batch: the old ones resumed"
        assert all(b.status == "completed" for b in server.batches.values())
    records = decode_lines(out.read_bytes())
    assert sorted(r.id for r in records) == [f"q{i:03d}" for i in range(12)]
    _assert_aligned(records)
    assert "resuming" in result.stderr.decode()
    assert "0 tokens generated" in result.stderr.decode(), "covered prompts are not generated"
    assert _pending_prompts(tmp_path) == 0
    _assert_key_nowhere(tmp_path, result.stdout, result.stderr)


async def test_a_run_killed_while_creating_a_batch_adopts_it_on_rerun(tmp_path: Path) -> None:
    """kill -9 after the server made a batch but before the client heard of it: the rerun
    finds that batch and resumes it; nothing is paid for twice, nothing is missing."""
    judge = judge_handler(untidy=0.2, broken=0.0, seed=9)
    async with OpenAIServer(judge, api_key=KEY, batch_delay=0.02, create_hold=600) as server:
        config = _config(tmp_path, server.base_url, 5)
        out = tmp_path / "out.ndjson"
        with anyio.fail_after(60):
            async with await anyio.open_process(
                _command(config, out), env=_env(), cwd=tmp_path
            ) as process:
                while True:
                    if server.batches:
                        break
                    await anyio.sleep(0.02)
                process.send_signal(signal.SIGKILL)
                await process.wait()
        made = list(server.batches)
        server.create_hold = 0
        result = await _run(config, out)
        assert result.returncode == 0, result.stderr.decode()
        assert list(server.batches)[: len(made)] == made
        inputs = [b.input_file_id for b in server.batches.values()]
        assert len(inputs) == len(set(inputs)), "no uploaded file was submitted twice"
    records = decode_lines(out.read_bytes())
    assert sorted(r.id for r in records) == [f"q{i:03d}" for i in range(5)]
    assert "created just before the last run stopped" in result.stderr.decode()
    _assert_key_nowhere(tmp_path, result.stdout, result.stderr)


async def test_ctrl_c_leaves_running_batches_to_the_rerun_at_once(tmp_path: Path) -> None:
    judge = judge_handler(untidy=0.0, broken=0.0, seed=6)
    async with OpenAIServer(judge, api_key=KEY, batch_delay=600) as server:
        config = _config(tmp_path, server.base_url, 12)
        # A batch may take hours: the stop must not wait out a drain timeout for it.
        config.write_text(config.read_text() + "[pipeline]\ndrain_timeout = 600\n")
        out = tmp_path / "out.ndjson"
        with anyio.fail_after(60):
            async with await anyio.open_process(
                _command(config, out), env=_env(), cwd=tmp_path
            ) as process:
                await _until_pending(tmp_path, 12)
                process.send_signal(signal.SIGINT)
                assert process.stderr is not None
                stderr = b"".join([chunk async for chunk in process.stderr]).decode()
                code = await process.wait()
        assert code == 130, stderr
        assert "Traceback" not in stderr
        assert "left running" in stderr and "the same command collects it" in stderr, stderr
        assert "drain timeout" not in stderr, "it did not wait for the batches"
        submitted = dict(server.batches)
        assert submitted and all(b.status == "validating" for b in submitted.values())

        server.batch_delay = 0.02
        result = await _run(config, out)
        assert result.returncode == 0, result.stderr.decode()
        assert server.batches.keys() == submitted.keys(), "the same batches, collected"
    records = decode_lines(out.read_bytes())
    assert sorted(r.id for r in records) == [f"q{i:03d}" for i in range(12)]
    _assert_aligned(records)
    assert _pending_prompts(tmp_path) == 0


async def test_the_batch_client_sends_the_org_and_project_stripped(tmp_path: Path) -> None:
    judge = judge_handler(untidy=0.0, broken=0.0, seed=7)
    async with OpenAIServer(judge, api_key=KEY, batch_delay=0.02) as server:
        config = _config(tmp_path, server.base_url, 3)
        env = {**_env(), "OPENAI_ORG_ID": "org-batch\n", "OPENAI_PROJECT_ID": " proj-7 "}
        with anyio.fail_after(60):
            result = await anyio.run_process(
                _command(config, tmp_path / "out.ndjson"), env=env, cwd=tmp_path, check=False
            )
        seen = [(r.path, r.headers) for r in server.requests]
    assert result.returncode == 0, result.stderr.decode()
    assert any("/batches" in path for path, _ in seen)
    for path, headers in seen:
        assert headers.get("openai-organization") == "org-batch", path
        assert headers.get("openai-project") == "proj-7", path
