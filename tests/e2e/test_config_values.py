"""Values that read as TOML but cannot run: `validate` and `run` both exit 2 naming the key.

Each one used to pass `validate` and then crash (a NaN temperature, a key with a non-ASCII
character) or misbehave (a zero timeout fails every request) only once the run had started.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from streamfeedback.testing import OpenAIServer, judge_handler

from ..helpers import decode_lines

KEY_VAR = "SF_EDGE_KEY"


def _config(tmp_path: Path, *, rater: str = "", routing: str = "", pipeline: str = "") -> Path:
    (tmp_path / "prompts.jsonl").write_text(
        "".join(json.dumps({"id": f"q{i}", "instruction": f"Say {i}."}) + "\n" for i in range(4))
    )
    path = tmp_path / "run.toml"
    path.write_text(
        '[source]\npath = "prompts.jsonl"\nid_column = "id"\n'
        f"[routing]\nn = 1\n{routing}\n"
        '[[generators]]\nname = "g"\nbackend = "sim"\nmodel = "org/g"\n'
        f'[rater]\nbackend = "sim"\nmodel = "judge"\n{rater}\n'
        f"[pipeline]\n{pipeline}\n"
    )
    return path


def _sf(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "streamfeedback", *args],
        capture_output=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def _openai_judge_config(tmp_path: Path) -> Path:
    """A config whose judge is OpenAI-compatible, its key in KEY_VAR (nothing listens)."""
    config = _config(
        tmp_path,
        rater=f'backend = "openai"\nbase_url = "http://127.0.0.1:9/v1"\napi_key_env = "{KEY_VAR}"',
    )
    config.write_text(config.read_text().replace('[rater]\nbackend = "sim"\n', "[rater]\n"))
    return config


BAD_VALUES = [
    ({"rater": "temperature = nan"}, "rater", "temperature"),
    ({"rater": "temperature = -0.5"}, "rater", "temperature"),
    ({"rater": "top_p = 1.5"}, "rater", "top_p"),
    ({"rater": "top_p = 0.0"}, "rater", "top_p"),
    ({"rater": "timeout = 0"}, "rater", "timeout"),
    ({"rater": "timeout = -3.0"}, "rater", "timeout"),
    ({"rater": "requests_per_minute = nan"}, "rater", "requests_per_minute"),
    ({"rater": "max_concurrency = 0"}, "rater", "max_concurrency"),
    ({"rater": "max_consecutive_failures = 0"}, "rater", "max_consecutive_failures"),
    ({"routing": "cooldown = 0"}, "routing", "cooldown"),
    ({"routing": "cooldown = -1.0"}, "routing", "cooldown"),
    ({"pipeline": "drain_timeout = 0"}, "pipeline", "drain_timeout"),
    ({"pipeline": "drain_timeout = inf"}, "pipeline", "drain_timeout"),
]


@pytest.mark.parametrize(("sections", "where", "key"), BAD_VALUES)
def test_a_value_that_cannot_run_exits_2_from_validate_and_run(
    tmp_path: Path, sections: dict[str, str], where: str, key: str
) -> None:
    config = _config(tmp_path, **sections)
    out = tmp_path / "out.ndjson"
    for args in (("validate", str(config)), ("run", str(config), "-o", str(out))):
        result = _sf(*args)
        stderr = result.stderr.decode()
        assert result.returncode == 2, (args, stderr)
        assert f"{where}" in stderr and f"`{key}`" in stderr, stderr
        assert "Traceback" not in stderr
        assert stderr.count("\n") == 1, f"one line, not {stderr!r}"
    assert not out.exists(), "nothing ran"


def test_a_generator_value_names_its_table(tmp_path: Path) -> None:
    config = _config(tmp_path)
    text = config.read_text().replace('model = "org/g"\n', 'model = "org/g"\ntemperature = nan\n')
    config.write_text(text)
    result = _sf("validate", str(config))
    assert result.returncode == 2
    assert b"generators[0]" in result.stderr and b"`temperature`" in result.stderr


@pytest.mark.parametrize(
    "value", ["sk-t\u00e9st-0123456789", "sk-test\x01-0123", "sk-te st\x7f", "sk-abc def-0123"]
)
def test_an_api_key_no_header_can_carry_exits_2_naming_the_variable_not_the_value(
    tmp_path: Path, value: str
) -> None:
    config = _openai_judge_config(tmp_path)
    for args in (("validate", str(config)), ("run", str(config), "-o", str(tmp_path / "o"))):
        result = _sf(*args, env={KEY_VAR: value})
        stderr = result.stderr.decode()
        assert result.returncode == 2, stderr
        assert KEY_VAR in stderr and "rater.api_key_env" in stderr
        assert value not in stderr and "Traceback" not in stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("var", ["OPENAI_ORG_ID", "OPENAI_PROJECT_ID"])
def test_an_org_or_project_id_no_header_can_carry_exits_2_naming_it(
    tmp_path: Path, var: str
) -> None:
    config = _openai_judge_config(tmp_path)
    value = "org-caf\u00e9-42"
    for args in (("validate", str(config)), ("run", str(config), "-o", str(tmp_path / "o"))):
        result = _sf(*args, env={KEY_VAR: "sk-fine-0123456789", var: value})
        stderr = result.stderr.decode()
        assert result.returncode == 2, stderr
        assert var in stderr and "rater" in stderr and stderr.count("\n") == 1, stderr
        assert value not in stderr and "Traceback" not in stderr
    assert not (tmp_path / "o").exists()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_whitespace_around_an_api_key_is_stripped(tmp_path: Path) -> None:
    key = "sk-edge-0123456789abcdef"
    async with OpenAIServer(judge_handler(untidy=0.0, broken=0.0), api_key=key) as server:
        config = _config(
            tmp_path,
            rater=f'base_url = "{server.base_url}"\napi_key_env = "{KEY_VAR}"',
        )
        config.write_text(
            config.read_text().replace('[rater]\nbackend = "sim"', '[rater]\nbackend = "openai"')
        )
        out = tmp_path / "out.ndjson"
        with anyio.fail_after(60):
            result = await anyio.run_process(
                [sys.executable, "-m", "streamfeedback", "run", str(config), "-o", str(out)],
                env={**os.environ, KEY_VAR: f"  {key}\n"},
                check=False,
            )
        assert result.returncode == 0, result.stderr.decode()
        assert server.status_counts[401] == 0
    assert sorted(r.id for r in decode_lines(out.read_bytes())) == ["q0", "q1", "q2", "q3"]
