"""`streamfeedback run` on real vLLM: three generator workers and a guided vLLM judge, a
worker killed with SIGKILL mid-run, and Ctrl-C while the engines load."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ..helpers import decode_lines
from .conftest import group_members

READY = re.compile(r"(\S+): vLLM engine ready \(.*worker pid (\d+); log: (.+)\)$")

pytestmark = pytest.mark.timeout(900)  # engines load slowly on a busy CPU


def _engine(name: str, model: Path, gpu: int, **extra: object) -> str:
    lines = [f'name = "{name}"'] if name else []
    lines += [
        'backend = "vllm"',
        f'model = "{model}"',
        f"gpu = {gpu}",
        "enforce_eager = true",
        "max_num_seqs = 32",
        "max_model_len = 4096",
    ]
    lines += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


def _write(tmp_path: Path, prompts: int, body: str) -> Path:
    with (tmp_path / "prompts.jsonl").open("w") as fh:
        for i in range(prompts):
            fh.write(json.dumps({"id": f"q{i}", "instruction": f"Question {i}?"}) + "\n")
    config = tmp_path / "run.toml"
    config.write_text(f'[source]\npath = "prompts.jsonl"\nid_column = "id"\n{body}')
    return config


def _one_generator(model: Path, tmp_path: Path) -> Path:
    """Five prompts, one vLLM generator (m0) and a simulated judge."""
    gens = "[[generators]]\n" + _engine("m0", model, 0)
    return _write(
        tmp_path, 5, f'[routing]\nn = 1\n{gens}[rater]\nbackend = "sim"\nmodel = "judge"\n'
    )


def _ready_pids(stderr: str) -> dict[str, int]:
    return {m[1]: int(m[2]) for line in stderr.splitlines() if (m := READY.search(line))}


def test_three_vllm_generators_and_a_guided_vllm_judge(
    tiny_model_path: Path, tmp_path: Path
) -> None:
    gens = "".join(
        "[[generators]]\n" + _engine(f"m{i}", tiny_model_path, i, max_tokens=24) for i in range(3)
    )
    judge = _engine("", tiny_model_path, 3, max_tokens=200, guided=True, temperature=1.0)
    config = _write(tmp_path, 12, f"[routing]\nn = 3\n{gens}[rater]\n{judge}")
    out = tmp_path / "out.ndjson"
    result = subprocess.run(
        [sys.executable, "-m", "streamfeedback", "run", str(config), "-o", str(out)],
        capture_output=True,
        timeout=600,
    )
    stderr = result.stderr.decode()
    assert result.returncode == 0, stderr
    records = decode_lines(out.read_bytes())
    assert len(records) == 12
    for record in records:
        assert sorted(record.generation_models) == ["m0", "m1", "m2"]
        assert None not in record.ratings, "a guided judge gives every rating readably"
    assert "Traceback" not in stderr, stderr
    assert len(stderr.splitlines()) <= 40, stderr
    pids = _ready_pids(stderr)
    assert len(pids) == 4, stderr
    logs = sorted(p.name for p in (tmp_path / "out.ndjson.logs").iterdir())
    assert len(logs) == 4 and {"m0.log", "m1.log", "m2.log"} <= set(logs)
    for log in (tmp_path / "out.ndjson.logs").iterdir():
        text = log.read_text()
        assert "Traceback" not in text, (log, text[-3000:])
        assert "vllm" in text.lower()
    assert not any(group_members(pid) for pid in pids.values()), "no process outlives the run"


def test_kill_9_of_a_worker_mid_run_the_run_completes_on_the_others(
    tiny_model_path: Path, tmp_path: Path
) -> None:
    gens = "".join(
        "[[generators]]\n" + _engine(f"m{i}", tiny_model_path, i, max_tokens=64) for i in range(3)
    )
    config = _write(
        tmp_path,
        150,
        f'[routing]\nn = 2\n[cluster]\nrestarts = 0\n{gens}[rater]\nbackend = "sim"\n'
        'model = "judge"\n',
    )
    out = tmp_path / "out.ndjson"
    with subprocess.Popen(
        [sys.executable, "-m", "streamfeedback", "run", str(config), "-o", str(out)],
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stderr is not None
        lines: list[str] = []
        while len(_ready_pids("\n".join(lines))) < 3:
            line = proc.stderr.readline()
            assert line, "".join(lines)
            lines.append(line)
        victim = _ready_pids("\n".join(lines))["m0"]
        deadline = time.monotonic() + 120
        while not (out.exists() and out.stat().st_size) and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        while group_members(victim) and time.monotonic() - killed < 10:
            time.sleep(0.1)
        assert not group_members(victim), "the dead worker's vLLM processes must go"
        _, rest = proc.communicate(timeout=600)
    stderr = "".join(lines) + rest
    records = decode_lines(out.read_bytes())
    assert len({r.id for r in records}) == 150, stderr[-3000:]
    assert proc.returncode == 0, stderr[-3000:]
    assert "m0: the worker exited with code -9" in stderr and "for good" in stderr
    assert "Traceback" not in stderr


def test_ctrl_c_while_the_engines_load_stops_within_seconds(
    tiny_model_path: Path, tmp_path: Path
) -> None:
    config = _one_generator(tiny_model_path, tmp_path)
    out = tmp_path / "out.ndjson"
    log = tmp_path / "out.ndjson.logs" / "m0.log"
    with subprocess.Popen(
        [sys.executable, "-m", "streamfeedback", "run", str(config), "-o", str(out)],
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        deadline = time.monotonic() + 300
        while not (log.exists() and "vllm" in log.read_text().lower()):
            assert time.monotonic() < deadline, "the worker never started loading"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        sent = time.monotonic()
        _, stderr = proc.communicate(timeout=60)
        took = time.monotonic() - sent
    assert proc.returncode == 130, stderr
    assert "SIGINT while the engines start: stopping them" in stderr
    assert "Traceback" not in stderr, stderr
    assert took < 20, f"took {took:.1f}s to stop"  # a generous bound against hangs
    leftovers = subprocess.run(["pgrep", "-f", str(tiny_model_path)], capture_output=True)
    assert not leftovers.stdout.strip(), "no vLLM process is left"


def test_a_run_killed_while_the_engines_load_leaves_no_vllm_process(
    tiny_model_path: Path, tmp_path: Path
) -> None:
    config = _one_generator(tiny_model_path, tmp_path)
    out = tmp_path / "out.ndjson"
    with subprocess.Popen(
        [sys.executable, "-m", "streamfeedback", "run", str(config), "-o", str(out)],
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        deadline = time.monotonic() + 300
        worker = None
        while worker is None or len(group_members(worker)) < 2:  # vLLM's engine core is up
            assert time.monotonic() < deadline, "the worker never started its engine core"
            found = subprocess.run(
                ["pgrep", "-P", str(proc.pid), "-f", "_vllm_worker"], capture_output=True
            ).stdout.split()
            worker = int(found[0]) if found else None
            time.sleep(0.05)
        proc.kill()  # SIGKILL: the run tells its worker nothing
        proc.wait()
    killed = time.monotonic()
    while group_members(worker) and time.monotonic() - killed < 10:
        time.sleep(0.1)
    assert not group_members(worker), "the orphaned worker and its engine core must go"
