"""What `validate` and `run` say about a guided judge and the vllm backend before any work,
and the guided judge's request over real HTTP (vLLM's `structured_outputs` field)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from streamfeedback._judge.guide import answer_regex
from streamfeedback.testing import OpenAIServer, judge_handler

from ..helpers import decode_lines

SIM_GENS = "".join(
    f'[[generators]]\nname = "m{i}"\nbackend = "sim"\nmodel = "sim-{i}"\n' for i in range(3)
)


def _config(tmp_path: Path, body: str, prompts: int = 3) -> Path:
    with (tmp_path / "prompts.jsonl").open("w") as fh:
        for i in range(prompts):
            fh.write(json.dumps({"id": f"q{i}", "instruction": f"Question {i}?"}) + "\n")
    path = tmp_path / "run.toml"
    path.write_text(f'[source]\npath = "prompts.jsonl"\nid_column = "id"\n{body}')
    return path


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streamfeedback", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed")
@pytest.mark.parametrize("command", ["validate", "run"])
def test_vllm_backend_without_vllm_exits_2_with_the_install_line(
    tmp_path: Path, command: str
) -> None:
    gens = '[[generators]]\nname = "m0"\nbackend = "vllm"\nmodel = "org/m0"\ngpu = 0\n'
    config = _config(tmp_path, f'[routing]\nn = 1\n{gens}[rater]\nbackend = "sim"\nmodel = "j"\n')
    result = _cli(command, str(config))
    assert result.returncode == 2, result.stderr
    assert "generators[0].backend" in result.stderr
    assert "pip install 'streamfeedback[vllm]'" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", ["validate", "run"])
def test_a_guided_judge_on_the_openai_api_is_refused(tmp_path: Path, command: str) -> None:
    rater = '[rater]\nbackend = "openai"\nmodel = "gpt-4o"\napi_key_env = "K"\nguided = true\n'
    config = _config(tmp_path, SIM_GENS + rater)
    result = _cli(command, str(config), env={"K": "sk-x", "OPENAI_BASE_URL": ""})
    assert result.returncode == 2, result.stderr
    assert "rater.guided" in result.stderr and "OpenAI API cannot guide" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_guided_judge_needs_room_for_its_blocks(tmp_path: Path) -> None:
    rater = '[rater]\nbackend = "sim"\nmodel = "j"\nguided = true\nmax_tokens = 60\n'
    result = _cli("validate", str(_config(tmp_path, SIM_GENS + rater)))
    assert result.returncode == 2, result.stderr
    assert "rater.max_tokens" in result.stderr and "needs at least" in result.stderr


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_a_guided_judge_sends_the_aspect_regex_to_a_vllm_server(tmp_path: Path) -> None:
    async with OpenAIServer(judge_handler(untidy=0, broken=0)) as server:
        rater = (
            f'[rater]\nbackend = "openai"\nmodel = "local-judge"\nbase_url = "{server.base_url}"\n'
            'aspect = "honesty"\nguided = true\nmax_tokens = 400\n'
        )
        config = _config(tmp_path, SIM_GENS + rater, prompts=4)
        out = tmp_path / "out.ndjson"
        assert _cli("validate", str(config)).returncode == 0
        with anyio.fail_after(60):
            result = await anyio.run_process(
                [sys.executable, "-m", "streamfeedback", "run", str(config), "-o", str(out)],
                check=False,
            )
        assert result.returncode == 0, result.stderr.decode()
        judged = [r for r in server.requests if r.model == "local-judge"]
    assert len(judged) == 4
    expected = answer_regex("honesty", 3, 400)
    for request in judged:
        assert request.body["structured_outputs"] == {"regex": expected}
    assert len(decode_lines(out.read_bytes())) == 4
    tidy = "\n\n".join(
        f"#### Output for Text {k}\nRating: {r}\nRationale: Clear and correct."
        for k, r in ((1, 4), (2, "N/A"), (3, 1))
    )
    assert re.fullmatch(expected, tidy), "the regex admits the layout the prompt asks for"
