"""The edges of durability, from the command line: huge lines, two runs on one file, torn
tails under --no-resume, a full disk."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..helpers import decode_lines
from .test_cli import sf, write_config

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX locks and signals")

BIG = 5_000_000


def _ids(path: Path) -> list[str]:
    return sorted(r.id for r in decode_lines(path.read_bytes()))


def _start(*args: str, **kwargs: object) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "streamfeedback", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        **kwargs,  # type: ignore[call-overload]
    )


def _wait_for(path: Path, lines: int = 1, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_bytes().count(b"\n") >= lines:
            return
        time.sleep(0.01)
    raise AssertionError(f"{path} never reached {lines} lines")


def _with_big_prompt(tmp_path: Path, prompts: int) -> Path:
    config = write_config(tmp_path, prompts)
    with (tmp_path / "prompts.jsonl").open("a") as fh:
        fh.write(json.dumps({"id": "big", "instruction": "x" * BIG}) + "\n")
    return config


def test_a_5mb_prompt_reads_back_on_every_resume(tmp_path: Path) -> None:
    config = _with_big_prompt(tmp_path, 5)
    out = tmp_path / "out.ndjson"
    for _ in range(2):  # the second run reads the output and the spool back from disk
        result = sf("run", str(config), "-o", str(out))
        assert result.returncode == 0, result.stderr.decode()
    assert b"6 skipped" in result.stderr
    records = {r.id: r for r in decode_lines(out.read_bytes())}
    assert sorted(records) == ["big", *(f"q{i:05d}" for i in range(5))]
    assert records["big"].instruction == "x" * BIG

    out.unlink()  # the judge's part again: every prompt comes from the spool, none generated
    rerate = sf("run", str(config), "-o", str(out))
    assert rerate.returncode == 0, rerate.stderr.decode()
    assert b"0 tokens generated" in rerate.stderr
    assert _ids(out) == ["big", *(f"q{i:05d}" for i in range(5))]


def test_a_5mb_prompt_through_generate_then_rate(tmp_path: Path) -> None:
    config = _with_big_prompt(tmp_path, 3)
    spool = tmp_path / "s.ndjson"
    assert sf("generate", str(config), "--spool", str(spool)).returncode == 0
    out = tmp_path / "rated.ndjson"
    rate = sf("rate", str(config), "--spool", str(spool), "-o", str(out))
    assert rate.returncode == 0, rate.stderr.decode()
    assert _ids(out) == ["big", "q00000", "q00001", "q00002"]


def test_a_second_run_on_the_same_output_exits_2_naming_the_first(tmp_path: Path) -> None:
    config = write_config(tmp_path, 200, ttft=0.05, slots=2)
    out = tmp_path / "out.ndjson"
    first = _start("run", str(config), "-o", str(out), "--no-progress")
    try:
        _wait_for(out)
        second = sf("run", str(config), "-o", str(out))
        assert second.returncode == 2, second.stderr.decode()
        assert f"pid {first.pid}".encode() in second.stderr
        assert str(out).encode() in second.stderr

        # the same spool under another output, and `rate` on a spool being written: refused too
        spool = f"{out}.spool.ndjson"
        other = sf("run", str(config), "-o", str(tmp_path / "b.ndjson"), "--spool", spool)
        assert other.returncode == 2 and f"pid {first.pid}".encode() in other.stderr
        rate = sf("rate", str(config), "--spool", spool, "-o", str(tmp_path / "c.ndjson"))
        assert rate.returncode == 2 and f"pid {first.pid}".encode() in rate.stderr
        assert b"Traceback" not in second.stderr + other.stderr + rate.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=30)
    rerun = sf("run", str(config), "-o", str(out))
    assert rerun.returncode == 0, rerun.stderr.decode()
    assert _ids(out) == [f"q{i:05d}" for i in range(200)], "every prompt exactly once"


def test_no_resume_never_appends_onto_a_torn_last_line(tmp_path: Path) -> None:
    config = write_config(tmp_path, 5)
    out = tmp_path / "out.ndjson"
    assert sf("run", str(config), "-o", str(out)).returncode == 0
    os.unlink(f"{out}.spool.ndjson")
    whole = out.read_bytes()
    out.write_bytes(whole + b'{"id": "q00003", "instruction": "torn by a ki')
    again = sf("run", str(config), "-o", str(out), "--no-resume")
    assert again.returncode == 0, again.stderr.decode()
    assert b"cut a torn last line" in again.stderr
    assert out.read_bytes().startswith(whole)
    assert len(decode_lines(out.read_bytes())) == 10, "every line a whole record"


def _tmpfs(path: Path, size: str) -> bool:
    path.mkdir(exist_ok=True)
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)])
    return done.returncode == 0


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[tuple[Path, bool]]:
    """A 64 KiB filesystem where mounting works (root), else a plain folder (the test then
    limits the file size of the run instead, which fails writes with EFBIG)."""
    disk = tmp_path / "disk"
    mounted = _tmpfs(disk, "64k")
    try:
        yield disk, mounted
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)], check=True)


def _limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))


def test_a_full_disk_is_one_line_and_a_summary_then_a_rerun_completes(
    tmp_path: Path, small_disk: tuple[Path, bool]
) -> None:
    disk, mounted = small_disk
    config = write_config(tmp_path, 300)
    out = disk / "out.ndjson"
    cmd = [sys.executable, "-m", "streamfeedback", "run", str(config), "-o", str(out)]
    full = subprocess.run(
        cmd,
        capture_output=True,
        timeout=120,
        preexec_fn=None if mounted else _limit_file_size,
    )
    stderr = full.stderr.decode()
    assert full.returncode == 1, stderr
    cause = "No space left on device" if mounted else "File too large"
    errors = [line for line in stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1 and cause in errors[0] and str(disk) in errors[0], stderr
    assert "Traceback" not in stderr and "ExceptionGroup" not in stderr
    assert "done in" in stderr
    for path in disk.iterdir():
        data = path.read_bytes()
        assert data == b"" or data.endswith(b"\n"), f"{path.name} ends in a torn line"

    if mounted:
        subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True)
    rerun = subprocess.run(cmd, capture_output=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr.decode()
    assert _ids(out) == [f"q{i:05d}" for i in range(300)], "every record whole, none twice"
