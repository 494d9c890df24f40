"""Endpoints where nothing listens, from the CLI: a judge at a dead address stops the run at
once (exit 2, naming the endpoint) instead of being retried per prompt, and keeps what the
generators made, so the rerun with the judge up asks the generators for nothing again."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import anyio
import pytest

from streamfeedback.testing import OpenAIServer, judge_handler

from ..helpers import decode_lines

PROMPTS = 30


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _config(tmp_path: Path, generators_url: str, judge_url: str) -> Path:
    with (tmp_path / "prompts.jsonl").open("w") as fh:
        for i in range(PROMPTS):
            fh.write(json.dumps({"id": f"q{i:03d}", "instruction": f"Explain idea {i}."}) + "\n")
    gens = "".join(
        f'[[generators]]\nname = "m{i}"\nbackend = "openai"\nmodel = "org/m{i}"\n'
        f'base_url = "{generators_url}"\nmax_tokens = 32\n'
        for i in range(3)
    )
    path = tmp_path / "run.toml"
    path.write_text(
        '[source]\npath = "prompts.jsonl"\nid_column = "id"\n[routing]\nn = 2\n'
        f'{gens}[rater]\nbackend = "openai"\nmodel = "gpt-judge"\nbase_url = "{judge_url}"\n'
    )
    return path


async def _run(config: Path, out: Path) -> tuple[int, str]:
    with anyio.fail_after(60):  # against a hang; retried per prompt, this took minutes
        result = await anyio.run_process(
            [sys.executable, "-m", "streamfeedback", "run", str(config), "-o", str(out)],
            check=False,
        )
    return result.returncode, result.stderr.decode()


async def test_a_judge_where_nothing_listens_stops_the_run_and_loses_nothing(
    tmp_path: Path,
) -> None:
    async with OpenAIServer(judge_handler()) as gone:
        dead = gone.base_url
    out = tmp_path / "out.ndjson"
    async with OpenAIServer(judge_handler()) as server:
        code, err = await _run(_config(tmp_path, server.base_url, dead), out)
        assert code == 2, err
        assert f"cannot reach {dead} (connection refused)" in err
        assert "Traceback" not in err
        assert err.count("cannot reach") <= 2, "one line, not one per prompt"
        generated = len(server.requests)
        assert not out.exists() or out.read_bytes() == b""

        code, err = await _run(_config(tmp_path, server.base_url, server.base_url), out)
        assert code == 0, err
        asked_again = [r for r in server.requests[generated:] if r.model != "gpt-judge"]
    records = decode_lines(out.read_bytes())
    assert sorted(r.id for r in records) == [f"q{i:03d}" for i in range(PROMPTS)]
    # Prompts the first run spooled are rated without being generated again (at least the one
    # the judge was first asked about).
    assert len(asked_again) < 2 * PROMPTS
