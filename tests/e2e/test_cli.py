"""The command line as users drive it: a real process, stdout for records, stderr for logs."""

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

from streamfeedback import Record

from ..helpers import decode_lines

ROOT = Path(__file__).parents[2]
QUICKSTART = ROOT / "examples" / "quickstart.toml"


def sf(
    *args: str,
    cwd: Path | None = None,
    stdin: bytes | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "streamfeedback", *args],
        capture_output=True,
        cwd=cwd,
        input=stdin,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def write_config(
    tmp_path: Path, prompts: int, *, ttft: float = 0.0, slots: int = 256, extra: str = ""
) -> Path:
    with (tmp_path / "prompts.jsonl").open("w") as fh:
        for i in range(prompts):
            fh.write(json.dumps({"id": f"q{i:05d}", "instruction": f"Question {i}?"}) + "\n")
    gens = "".join(
        f'[[generators]]\nname = "m{i}"\nbackend = "sim"\nmodel = "org/m{i}"\n'
        f"sim_ttft = {ttft}\nsim_slots = {slots}\n"
        for i in range(6)
    )
    path = tmp_path / "run.toml"
    path.write_text(
        '[source]\npath = "prompts.jsonl"\nid_column = "id"\n'
        "[routing]\nn = 3\nbatch_size = 2\n"
        f'{gens}[rater]\nbackend = "sim"\nmodel = "judge"\n{extra}'
    )
    return path


def test_quickstart_prints_one_record_per_prompt_and_logs_only_on_stderr(tmp_path: Path) -> None:
    result = sf("run", str(QUICKSTART), cwd=tmp_path)
    assert result.returncode == 0, result.stderr.decode()
    records = decode_lines(result.stdout)
    prompts = (ROOT / "examples" / "prompts.jsonl").read_text().splitlines()
    assert sorted(r.id for r in records) == sorted(json.loads(p)["id"] for p in prompts)
    models = set()
    for r in records:
        assert len(set(r.generation_models)) == 3 and len(r.ratings) == 3
        models.update(r.generation_models)
    assert len(models) == 6
    assert b": 40 records (" in result.stderr
    assert all(line.startswith(b"{") for line in result.stdout.splitlines())


def test_output_file_resumes_and_repairs_a_torn_line(tmp_path: Path) -> None:
    config = write_config(tmp_path, 50)
    out = tmp_path / "out.ndjson"
    first = sf("run", str(config), "-o", str(out), "--limit", "20")
    assert first.returncode == 0, first.stderr.decode()
    assert first.stdout == b""
    assert len(decode_lines(out.read_bytes())) == 20
    with out.open("ab") as fh:
        fh.write(b'{"id":"q00030","instruction":"tor')
    second = sf("run", str(config), "-o", str(out))
    assert second.returncode == 0, second.stderr.decode()
    assert b"torn last line" in second.stderr and b"20 skipped" in second.stderr
    ids = [r.id for r in decode_lines(out.read_bytes())]
    assert sorted(ids) == [f"q{i:05d}" for i in range(50)]


def test_broken_toml_exits_2_naming_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[source\npath = 'x'\n")
    result = sf("run", str(bad))
    assert result.returncode == 2
    assert str(bad).encode() in result.stderr and result.stdout == b""


def test_bad_key_and_pool_errors_exit_2(tmp_path: Path) -> None:
    config = write_config(tmp_path, 1, extra="bogus = 1\n")
    result = sf("run", str(config))
    assert result.returncode == 2 and b"rater.bogus" in result.stderr
    config = write_config(tmp_path, 1)
    config.write_text(config.read_text().replace("n = 3", "n = 7"))
    result = sf("validate", str(config))
    assert result.returncode == 2 and b"routing.n" in result.stderr


def test_missing_source_exits_2_before_any_work(tmp_path: Path) -> None:
    config = write_config(tmp_path, 1)
    (tmp_path / "prompts.jsonl").unlink()
    result = sf("run", str(config))
    assert result.returncode == 2
    assert b"prompts.jsonl" in result.stderr and result.stdout == b""


def test_validate_prints_the_plan() -> None:
    result = sf("validate", str(QUICKSTART))
    assert result.returncode == 0, result.stderr.decode()
    plan = result.stdout.decode()
    assert "routing: 3 of 6 models per batch of 2" in plan
    assert "judge: sim gpt-4-turbo-2024-04-09" in plan


def test_stdin_source(tmp_path: Path) -> None:
    config = write_config(tmp_path, 0)
    config.write_text(config.read_text().replace('path = "prompts.jsonl"', 'path = "-"'))
    lines = b"".join(
        json.dumps({"id": f"s{i}", "instruction": f"stdin {i}"}).encode() + b"\n" for i in range(7)
    )
    result = sf("run", str(config), stdin=lines)
    assert result.returncode == 0, result.stderr.decode()
    assert sorted(r.id for r in decode_lines(result.stdout)) == [f"s{i}" for i in range(7)]


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_ctrl_c_drains_in_flight_then_a_rerun_completes_exactly_once(tmp_path: Path) -> None:
    config = write_config(tmp_path, 3000, ttft=0.01, slots=4)
    out = tmp_path / "out.ndjson"
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamfeedback", "run", str(config), "-o", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if out.exists() and out.stat().st_size > 0:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr.decode()
    assert b"no new prompts" in stderr
    data = out.read_bytes()
    assert data.endswith(b"\n")
    done = decode_lines(data)
    assert 0 < len(done) < 3000
    rerun = sf("run", str(config), "-o", str(out))
    assert rerun.returncode == 0, rerun.stderr.decode()
    assert f"{len(done)} skipped".encode() in rerun.stderr
    ids = [r.id for r in decode_lines(out.read_bytes())]
    assert sorted(ids) == [f"q{i:05d}" for i in range(3000)]


def test_records_decode_with_the_contract_fields(tmp_path: Path) -> None:
    result = sf("run", str(QUICKSTART), "--limit", "4", cwd=tmp_path)
    for line in result.stdout.splitlines():
        raw = msgspec.json.decode(line)
        for key in (
            "id",
            "instruction",
            "generations",
            "generation_models",
            "ratings",
            "rationales",
            "ultrafeedback_model",
        ):
            assert key in raw
        msgspec.json.decode(line, type=Record)
    assert len(result.stdout.splitlines()) == 4


def test_progress_lines_go_to_stderr_when_it_is_not_a_terminal(tmp_path: Path) -> None:
    config = write_config(tmp_path, 60, ttft=0.05, slots=2)
    result = sf("run", str(config), "--progress-every", "0.2")
    assert result.returncode == 0, result.stderr.decode()
    assert b"progress: " in result.stderr and b"in flight m0:" in result.stderr
    assert all(line.startswith(b"{") for line in result.stdout.splitlines())
    quiet = sf("run", str(config), "--no-progress", "--progress-every", "0.2")
    assert b"progress: " not in quiet.stderr


def test_shards_cover_the_source_once_with_the_same_routing(tmp_path: Path) -> None:
    config = write_config(tmp_path, 61)
    whole = sf("run", str(config), "-o", str(tmp_path / "whole.ndjson"))
    assert whole.returncode == 0, whole.stderr.decode()
    parts = []
    for i in range(3):
        out = tmp_path / f"part{i}.ndjson"
        result = sf("run", str(config), "--shard", f"{i}/3", "-o", str(out))
        assert result.returncode == 0, result.stderr.decode()
        parts.extend(decode_lines(out.read_bytes()))
    expected = {
        r.id: r.generation_models for r in decode_lines((tmp_path / "whole.ndjson").read_bytes())
    }
    assert sorted(r.id for r in parts) == sorted(expected)
    assert all(r.generation_models == expected[r.id] for r in parts)
    bad = sf("run", str(config), "--shard", "3/3")
    assert bad.returncode == 2 and b"--shard" in bad.stderr
