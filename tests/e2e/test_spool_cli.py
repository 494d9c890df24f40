"""Two speeds from the command line: generate, rate, and resume across output and spool."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import msgspec

from ..helpers import decode_lines
from .test_cli import sf, write_config

SLOW_JUDGE = "sim_ttft = 0.05\nsim_slots = 2\nmax_concurrency = 2\n"


def _comparable(data: bytes) -> dict[str, object]:
    return {r.id: msgspec.to_builtins(r) for r in decode_lines(data)}


def test_generate_then_rate_gives_the_same_records_as_one_run(tmp_path: Path) -> None:
    config = write_config(tmp_path, 40, extra="shuffle = true\n")
    one = sf("run", str(config), "-o", str(tmp_path / "one.ndjson"))
    assert one.returncode == 0, one.stderr.decode()

    spool = tmp_path / "two.spool.ndjson"
    gen = sf("generate", str(config), "--spool", str(spool))
    assert gen.returncode == 0, gen.stderr.decode()
    assert gen.stdout == b"" and b"40 prompts spooled" in gen.stderr
    rate = sf("rate", str(config), "--spool", str(spool), "-o", str(tmp_path / "two.ndjson"))
    assert rate.returncode == 0, rate.stderr.decode()
    assert b"tokens generated" not in rate.stderr

    first = _comparable((tmp_path / "one.ndjson").read_bytes())
    second = _comparable((tmp_path / "two.ndjson").read_bytes())
    assert len(first) == 40
    for record in (*first.values(), *second.values()):
        assert isinstance(record, dict)
        record.pop("generation_latency_s")  # wall-clock timings differ between the runs
    assert first == second


def test_rerating_with_another_aspect_needs_no_generation(tmp_path: Path) -> None:
    config = write_config(tmp_path, 10)
    spool = tmp_path / "s.ndjson"
    assert sf("generate", str(config), "--spool", str(spool)).returncode == 0
    honesty = config.read_text().replace('model = "judge"', 'model = "judge"\naspect = "honesty"')
    config.write_text(honesty)
    out = tmp_path / "honesty.ndjson"
    result = sf("rate", str(config), "--spool", str(spool), "-o", str(out))
    assert result.returncode == 0, result.stderr.decode()
    assert {r.aspect for r in decode_lines(out.read_bytes())} == {"honesty"}


def test_killed_after_generation_the_rerun_generates_nothing(tmp_path: Path) -> None:
    config = write_config(tmp_path, 150, extra=SLOW_JUDGE)
    out = tmp_path / "out.ndjson"
    spool = Path(f"{out}.spool.ndjson")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamfeedback", "run", str(config), "-o", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if spool.exists() and spool.read_bytes().count(b"\n") == 150 * 3:  # a line a response
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    rated_before = out.read_bytes().count(b"\n") if out.exists() else 0
    assert rated_before < 150, "the judge was meant to be behind when the run was killed"

    config.write_text(config.read_text().replace(SLOW_JUDGE, ""))
    rerun = sf("run", str(config), "-o", str(out))
    assert rerun.returncode == 0, rerun.stderr.decode()
    assert b"0 tokens generated" in rerun.stderr
    assert b"150 skipped" in rerun.stderr
    ids = [r.id for r in decode_lines(out.read_bytes())]
    assert sorted(ids) == [f"q{i:05d}" for i in range(150)]


def test_generate_without_a_spool_is_a_usage_error(tmp_path: Path) -> None:
    config = write_config(tmp_path, 3)
    result = sf("generate", str(config))
    assert result.returncode == 2 and b"spool" in result.stderr


def test_no_resume_refuses_to_generate_again_over_a_spool(tmp_path: Path) -> None:
    config = write_config(tmp_path, 3)
    out = tmp_path / "out.ndjson"
    assert sf("run", str(config), "-o", str(out)).returncode == 0
    again = sf("run", str(config), "-o", str(out), "--no-resume")
    assert again.returncode == 2 and b"spool" in again.stderr
