"""Kill it, interrupt it, feed it garbage: nothing already paid for is lost."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest

from streamfeedback import Failure

from ..helpers import decode_lines
from .test_cli import sf, write_config

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


def _wait_for_lines(path: Path, lines: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_bytes().count(b"\n") >= lines:
            return
        time.sleep(0.01)
    raise AssertionError(f"{path} never reached {lines} lines")


def test_kill_9_then_rerun_leaves_every_prompt_exactly_once(tmp_path: Path) -> None:
    config = write_config(tmp_path, 300, ttft=0.02, slots=4)
    out = tmp_path / "out.ndjson"
    for _ in range(2):
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamfeedback", "run", str(config), "-o", str(out)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_for_lines(out, out.read_bytes().count(b"\n") + 20 if out.exists() else 20)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    killed = out.read_bytes()
    done_before = {r.id for r in decode_lines(killed[: killed.rfind(b"\n") + 1])}
    assert 0 < len(done_before) < 300
    rerun = sf("run", str(config), "-o", str(out))
    assert rerun.returncode == 0, rerun.stderr.decode()
    ids = [r.id for r in decode_lines(out.read_bytes())]
    assert sorted(ids) == [f"q{i:05d}" for i in range(300)], "every prompt exactly once"
    assert f"{len(done_before)} skipped".encode() in rerun.stderr


def test_sigterm_drains_like_ctrl_c(tmp_path: Path) -> None:
    config = write_config(tmp_path, 3000, ttft=0.05, slots=4)
    out = tmp_path / "out.ndjson"
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamfeedback", "run", str(config), "-o", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    _wait_for_lines(out, 5)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr.decode()
    assert out.read_bytes().endswith(b"\n")
    assert b"SIGTERM" in stderr
    assert b"not read yet; the same command resumes them" in stderr


def test_second_ctrl_c_cancels_in_flight_and_leaves_whole_lines(tmp_path: Path) -> None:
    config = write_config(tmp_path, 300, ttft=2.0)
    out = tmp_path / "out.ndjson"
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamfeedback", "run", str(config), "-o", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr.decode()
    assert b"cancelling" in stderr
    data = out.read_bytes() if out.exists() else b""
    assert data == b"" or data.endswith(b"\n")


def test_bad_rows_go_to_the_failures_file_and_the_rest_is_done(tmp_path: Path) -> None:
    config = write_config(tmp_path, 10)
    prompts = tmp_path / "prompts.jsonl"
    with prompts.open("ab") as fh:
        fh.write(b"{not json\n")
        fh.write(json.dumps({"id": "empty", "instruction": "   "}).encode() + b"\n")
        fh.write(b'{"id": "latin", "instruction": "caf\xe9"}\n')
        fh.write(json.dumps({"id": "q00003", "instruction": "a duplicate id"}).encode() + b"\n")
    out = tmp_path / "out.ndjson"
    result = sf("run", str(config), "-o", str(out))
    assert result.returncode == 1, result.stderr.decode()
    assert sorted(r.id for r in decode_lines(out.read_bytes())) == [f"q{i:05d}" for i in range(10)]
    failures = [
        msgspec.json.decode(line, type=Failure)
        for line in Path(f"{out}.failures.ndjson").read_bytes().splitlines()
    ]
    by_line = {f.line: f for f in failures}
    assert set(by_line) == {11, 12, 13}
    assert all(f.stage == "source" for f in failures)
    assert by_line[12].error == "empty prompt" and by_line[12].id == "empty"
    stderr = result.stderr.decode()
    assert "prompts.jsonl:11" in stderr and "duplicate prompt id 'q00003'" in stderr


def test_missing_column_lists_the_columns_there_are(tmp_path: Path) -> None:
    config = write_config(tmp_path, 3)
    config.write_text(config.read_text().replace('id_column = "id"', 'column = "prompt"'))
    result = sf("run", str(config))
    assert result.returncode == 2
    assert b"prompt" in result.stderr and b"instruction" in result.stderr


def test_unset_key_variable_exits_2_before_any_work(tmp_path: Path) -> None:
    config = write_config(tmp_path, 3)
    text = config.read_text().replace(
        '[rater]\nbackend = "sim"',
        '[rater]\nbackend = "openai"\nbase_url = "http://127.0.0.1:9/v1"\n'
        'api_key_env = "SF_UNSET_KEY"',
    )
    config.write_text(text)
    env = {k: v for k, v in os.environ.items() if k != "SF_UNSET_KEY"}
    result = subprocess.run(
        [sys.executable, "-m", "streamfeedback", "run", str(config), "-o", str(tmp_path / "o")],
        capture_output=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 2
    assert b"SF_UNSET_KEY" in result.stderr and b"rater.api_key_env" in result.stderr
    assert not (tmp_path / "o").exists()
