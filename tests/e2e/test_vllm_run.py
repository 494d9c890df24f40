"""A whole `streamfeedback run` on six vllm generators, with the stand-in vllm package.

The worker processes import `tests/fake_vllm/vllm`, which logs what each engine saw.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

from ..helpers import decode_lines

ROOT = Path(__file__).parents[2]
FAKE = ROOT / "tests" / "fake_vllm"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _one_prompt(tmp_path: Path, generators: str) -> Path:
    """A config of one prompt, `generators` (TOML tables) and a simulated judge."""
    (tmp_path / "prompts.jsonl").write_text('{"id": "q0", "instruction": "Hi?"}\n')
    config = tmp_path / "run.toml"
    config.write_text(
        '[source]\npath = "prompts.jsonl"\nid_column = "id"\n[routing]\nn = 1\n'
        f'{generators}[rater]\nbackend = "sim"\nmodel = "judge"\n'
    )
    return config


def _fake_env(**extra: str) -> dict[str, str]:
    """The environment of a run whose workers import the stand-in vllm."""
    path = os.pathsep.join(filter(None, [str(FAKE), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **extra}


def _run(config: Path, out: Path, env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "streamfeedback", "run", str(config), "-o", str(out)],
        capture_output=True,
        env=env,
        timeout=120,
    )


def test_six_vllm_generators_on_six_gpus(tmp_path: Path) -> None:
    with (tmp_path / "prompts.jsonl").open("w") as fh:
        for i in range(240):
            fh.write(json.dumps({"id": f"q{i}", "instruction": f"Question {i}?"}) + "\n")
    gens = "".join(
        f'[[generators]]\nname = "m{i}"\nbackend = "vllm"\nmodel = "org/m{i}"\ngpu = {i}\n'
        f"max_tokens = {100 + i}\nmax_num_seqs = 64\n"
        for i in range(6)
    )
    config = tmp_path / "run.toml"
    config.write_text(
        '[source]\npath = "prompts.jsonl"\nid_column = "id"\n[routing]\nn = 3\n'
        f'{gens}[rater]\nbackend = "sim"\nmodel = "judge"\n'
    )
    log = tmp_path / "vllm.log"
    env = _fake_env(FAKE_VLLM_LOG=str(log), FAKE_VLLM_DELAY="0.3")
    result = subprocess.run(
        [sys.executable, "-m", "streamfeedback", "run", str(config)],
        capture_output=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr.decode()
    records = decode_lines(result.stdout)
    assert len(records) == 240
    assert all(len(set(r.generation_models)) == 3 for r in records)

    events = [json.loads(line) for line in log.read_text().splitlines()]
    builds = [e for e in events if e["event"] == "build"]
    by_model = sorted(builds, key=lambda b: b["args"]["model"])
    assert [b["cuda_visible_devices"] for b in by_model] == [str(i) for i in range(6)]
    pid_of_model = {b["args"]["model"]: b["pid"] for b in builds}
    assert len(set(pid_of_model.values())) == 6, "six engines in six processes"
    max_tokens: dict[int, set[int]] = defaultdict(set)
    peak: dict[int, int] = defaultdict(int)
    for e in events:
        if e["event"] == "request":
            max_tokens[e["pid"]].add(e["max_tokens"])
            peak[e["pid"]] = max(peak[e["pid"]], e["in_flight"])
    for i in range(6):
        pid = pid_of_model[f"org/m{i}"]
        assert max_tokens[pid] == {100 + i}, "every request carries the configured max_tokens"
        assert peak[pid] >= 24, f"engine {i}: only {peak[pid]} in flight at once"
    shutdowns = {e["pid"] for e in events if e["event"] == "shutdown"}
    assert shutdowns == set(pid_of_model.values()), "every engine is shut down"
    assert not any(_alive(pid) for pid in pid_of_model.values()), "no worker outlives the run"

    stderr = result.stderr.decode()
    assert "fake vllm" not in stderr, "the engines' own output goes to their log files"
    assert stderr.count("vLLM engine ready") == 6
    folder = Path(stderr.split("vLLM engine logs go to ", 1)[1].split()[0])
    try:
        logs = {p.name: p.read_text() for p in folder.iterdir()}
    finally:
        shutil.rmtree(folder)
    assert sorted(logs) == [f"m{i}.log" for i in range(6)]
    assert all("INFO fake vllm: loading weights" in text for text in logs.values())


def test_engine_logs_go_beside_a_file_output(tmp_path: Path) -> None:
    config = _one_prompt(
        tmp_path, '[[generators]]\nname = "only"\nbackend = "vllm"\nmodel = "org/m"\ngpu = 0\n'
    )
    result = _run(config, tmp_path / "out.ndjson", _fake_env())
    stderr = result.stderr.decode()
    assert result.returncode == 0, stderr
    log = tmp_path / "out.ndjson.logs" / "only.log"
    assert f"log: {log}" in stderr
    assert "INFO fake vllm: added request" in log.read_text()
    assert "fake vllm" not in stderr and "go to" not in stderr


def test_a_generator_that_cannot_start_stops_the_run_with_one_line(tmp_path: Path) -> None:
    config = _one_prompt(
        tmp_path,
        '[[generators]]\nname = "big"\nbackend = "vllm"\nmodel = "org/m"\ngpu = 3\n'
        '[[generators]]\nname = "small"\nbackend = "sim"\nmodel = "s"\n',
    )
    fake_log = tmp_path / "vllm.log"
    env = _fake_env(
        FAKE_VLLM_LOG=str(fake_log), FAKE_VLLM_FAIL_START="CUDA out of memory: 79.1 GiB in use"
    )
    out = tmp_path / "out.ndjson"
    result = _run(config, out, env)
    stderr = result.stderr.decode()
    assert result.returncode == 2, stderr
    assert "Traceback" not in stderr and not result.stdout
    errors = [line for line in stderr.splitlines() if "error" in line]
    assert len(errors) == 1, stderr
    assert "big" in errors[0] and "'org/m' on GPU 3" in errors[0], errors
    assert "CUDA out of memory" in errors[0] and "big.log" in errors[0], errors
    assert not out.exists() or out.read_bytes() == b""
    pids = {json.loads(line)["pid"] for line in fake_log.read_text().splitlines()}
    assert pids and not any(_alive(pid) for pid in pids), "no worker outlives the run"


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie waits for init, which may never reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_a_run_killed_while_engines_load_leaves_no_worker_behind(tmp_path: Path) -> None:
    config = _one_prompt(
        tmp_path, '[[generators]]\nname = "slow"\nbackend = "vllm"\nmodel = "org/m"\ngpu = 0\n'
    )
    fake_log = tmp_path / "vllm.log"
    env = _fake_env(FAKE_VLLM_LOG=str(fake_log), FAKE_VLLM_BUILD_DELAY="120", FAKE_VLLM_CORE="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamfeedback", "run", str(config), "-o", str(tmp_path / "o")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and '"core"' not in _read(fake_log):
            time.sleep(0.05)
        events = [json.loads(line) for line in _read(fake_log).splitlines()]
        cores = [e for e in events if e["event"] == "core"]
        assert cores, "the worker started loading"
        worker, core = cores[0]["pid"], cores[0]["core"]
        assert _running(worker) and _running(core)
    finally:
        proc.kill()  # SIGKILL: the parent says nothing to its workers
        proc.wait()
    deadline = time.monotonic() + 10
    while (_running(worker) or _running(core)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _running(worker), "the loading worker outlived its parent"
    assert not _running(core), "the worker's engine core outlived it"


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX process groups")
def test_a_worker_whose_parent_died_before_it_started_goes_at_once() -> None:
    """The parent's pid comes from the parent: one that died while the worker's Python was
    still starting (the worker already re-parented when it first looks) is noticed too."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    worker = subprocess.Popen(
        [sys.executable, "-m", "streamfeedback.engines._vllm_worker"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=_fake_env(STREAMFEEDBACK_PARENT_PID=str(gone.pid)),
        start_new_session=True,  # as the engine starts it: its group is its own to kill
    )
    try:
        assert worker.wait(timeout=30) == -signal.SIGKILL
    finally:
        worker.kill()
        worker.communicate()
