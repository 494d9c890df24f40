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

import anyio
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


def test_two_runs_to_stdout_do_not_share_a_failures_file(tmp_path: Path) -> None:
    config = write_config(tmp_path, 200, ttft=0.05, slots=2)
    prompts = tmp_path / "prompts.jsonl"
    rows = prompts.read_bytes().splitlines(keepends=True)
    prompts.write_bytes(rows[0] + b"{not json\n" + b"".join(rows[1:]))
    failures = tmp_path / "failures.ndjson"  # [output] failures, beside the config
    with (tmp_path / "a.ndjson").open("wb") as records:
        first = subprocess.Popen(
            [sys.executable, "-m", "streamfeedback", "run", str(config), "--no-progress"],
            stdout=records,
            stderr=subprocess.PIPE,
        )
        try:
            _wait_for(failures)
            # a second shard writing to stdout as well: it would have emptied the first's file
            second = sf("run", str(config), "--shard", "1/2")
            assert second.returncode == 2, second.stderr.decode()
            assert f"pid {first.pid}".encode() in second.stderr
            assert str(failures).encode() in second.stderr
            assert b"Traceback" not in second.stderr
            own = tmp_path / "shard1.failures.ndjson"
            apart = sf("run", str(config), "--shard", "1/2", "--set", f"output.failures={own}")
            assert apart.returncode == 1, apart.stderr.decode()  # the bad row is in its shard
            assert len(own.read_bytes().splitlines()) == 1
        finally:
            _, stderr = first.communicate(timeout=120)
    assert first.returncode == 1, stderr.decode()
    assert len(decode_lines((tmp_path / "a.ndjson").read_bytes())) == 200
    (failure,) = [json.loads(line) for line in failures.read_bytes().splitlines()]
    assert failure["line"] == 2, "the first run's failure is still there"

    prompts.write_bytes(b"".join(rows))
    clean = sf("run", str(config))
    assert clean.returncode == 0, clean.stderr.decode()
    assert not failures.exists(), "a run where nothing failed leaves no failures file"


def test_generate_shards_keep_their_failures_beside_their_spools(tmp_path: Path) -> None:
    config = write_config(tmp_path, 40, ttft=0.05, slots=2)
    prompts = tmp_path / "prompts.jsonl"
    rows = prompts.read_bytes().splitlines(keepends=True)
    prompts.write_bytes(b"".join(rows[:3]) + b"{not json\n" + b"".join(rows[3:]))
    shards = [
        _start("generate", str(config), "--shard", f"{i}/2", "--spool", str(tmp_path / f"s{i}"))
        for i in range(2)
    ]
    for shard in shards:
        _, stderr = shard.communicate(timeout=120)
        assert shard.returncode == 1, stderr.decode()  # a bad row fails in every shard
    for i in range(2):  # each in a file of its own: neither emptied the other's
        (failure,) = (tmp_path / f"s{i}.failures.ndjson").read_bytes().splitlines()
        assert json.loads(failure)["line"] == 4
    assert not (tmp_path / "failures.ndjson").exists()


def test_failures_to_stdout_or_through_a_symlink_leave_no_stray_file(tmp_path: Path) -> None:
    config = write_config(tmp_path, 60, ttft=0.05, slots=2)
    first = _start("run", str(config), "--set", "output.failures=-", cwd=tmp_path)
    try:
        time.sleep(0.5)
        assert not (tmp_path / "-").exists(), "'-' is stdout, not a file named '-'"
        dash = sf("run", str(config), "--set", "output.failures=-", cwd=tmp_path)
        assert dash.returncode == 0, dash.stderr.decode()  # nothing to share: no lock
    finally:
        _, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr.decode()

    target = tmp_path / "kept.ndjson"
    target.write_bytes(b"")
    link = tmp_path / "failures-link.ndjson"
    link.symlink_to(target)
    linked = sf("run", str(config), "--set", f"output.failures={link}")
    assert linked.returncode == 0, linked.stderr.decode()
    assert link.is_symlink() and target.exists(), "an empty failures file is removed, not a link"


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


@pytest.mark.parametrize("spool_on_disk", [True, False], ids=["spool-fills-it", "output-fills-it"])
def test_a_full_disk_is_one_line_and_a_summary_then_a_rerun_completes(
    tmp_path: Path, small_disk: tuple[Path, bool], spool_on_disk: bool
) -> None:
    disk, mounted = small_disk
    config = write_config(tmp_path, 300)
    out = disk / "out.ndjson"
    spool = out.parent / "out.ndjson.spool.ndjson" if spool_on_disk else tmp_path / "spool.ndjson"
    cmd = [sys.executable, "-m", "streamfeedback", "run", str(config), "-o", str(out)]
    cmd += ["--spool", str(spool)]
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
    assert len(errors) == 1 and cause in errors[0], stderr
    if mounted:
        assert str(spool if spool_on_disk else out) in errors[0], stderr
    assert "Traceback" not in stderr and "ExceptionGroup" not in stderr
    assert "done in" in stderr
    for path in [*disk.iterdir(), spool]:
        data = path.read_bytes()
        assert data == b"" or data.endswith(b"\n"), f"{path.name} ends in a torn line"

    if mounted:
        subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True)
    rerun = subprocess.run(cmd, capture_output=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr.decode()
    assert _ids(out) == [f"q{i:05d}" for i in range(300)], "every record whole, none twice"


JUDGE = "gpt-judge"
KEY = "sk-test-durability-0123456789"
SLOW = {"org/m3": 0.3, "org/m4": 0.3, "org/m5": 0.3}


def _http_config(tmp_path: Path, base_url: str, prompts: int, routing: str = "") -> Path:
    with (tmp_path / "prompts.jsonl").open("w") as fh:
        for i in range(prompts):
            fh.write(json.dumps({"id": f"q{i:04d}", "instruction": f"Explain idea {i}."}) + "\n")
    gens = "".join(
        f'[[generators]]\nname = "m{i}"\nbackend = "openai"\nmodel = "org/m{i}"\n'
        f'base_url = "{base_url}"\nmax_tokens = 32\nmax_concurrency = 4\n'
        for i in range(6)
    )
    path = tmp_path / "run.toml"
    path.write_text(
        '[source]\npath = "prompts.jsonl"\nid_column = "id"\n[routing]\nn = 3\nbatch_size = 1\n'
        f'{routing}{gens}[rater]\nbackend = "openai"\nmodel = "{JUDGE}"\nbase_url = "{base_url}"\n'
        'api_key_env = "SF_TEST_KEY"\n[pipeline]\nbuffer = 4\n'
    )
    return path


def _spooled_pairs(spool: Path) -> tuple[set[tuple[str, str]], set[str]]:
    """(prompt id, model) of every response in the spool, and the prompts spooled in part."""
    pairs: set[tuple[str, str]] = set()
    models: dict[str, int] = {}
    for line in spool.read_bytes().splitlines():
        entry = json.loads(line)
        if "models" in entry:
            models[entry["id"]] = len(entry["models"])
        elif "v" not in entry:  # the first format: a whole prompt per line
            models[entry["id"]] = len(entry["generations"])
        pairs.update((entry["id"], g["model"]) for g in entry["generations"])
    done = {key: sum(1 for k, _ in pairs if k == key) for key in models}
    return pairs, {key for key, n in done.items() if n < models[key]}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_kill_9_mid_prompt_then_the_rerun_asks_only_for_the_missing_responses(
    tmp_path: Path,
) -> None:
    from streamfeedback.testing import OpenAIServer, Reply, Request, judge_handler

    judge = judge_handler(untidy=0.0, broken=0.0)

    async def handler(request: Request) -> Reply:
        if request.model != JUDGE:
            await anyio.sleep(SLOW.get(request.model or "", 0.02))
        return await judge(request)

    prompts = 120
    out = tmp_path / "out.ndjson"
    spool = Path(f"{out}.spool.ndjson")
    cmd = [sys.executable, "-m", "streamfeedback", "run", "--no-progress"]
    env = {**os.environ, "SF_TEST_KEY": KEY}
    async with OpenAIServer(handler) as server:
        config = _http_config(tmp_path, server.base_url, prompts)
        with anyio.fail_after(60):
            async with await anyio.open_process(
                [*cmd, str(config), "-o", str(out)], env=env, stderr=subprocess.DEVNULL
            ) as proc:
                while True:  # kill -9 once some 60 responses are spooled
                    if spool.exists() and spool.read_bytes().count(b"\n") >= 60:
                        break
                    await anyio.sleep(0.02)
                proc.kill()
                await proc.wait()
        pairs, partial = _spooled_pairs(spool)
        assert partial, "the kill was meant to find prompts with some of their responses spooled"
        first_run = [r for r in server.requests if r.model != JUDGE]
        mark = len(server.requests)
        with anyio.fail_after(120):
            rerun = await anyio.run_process(
                [*cmd, str(config), "-o", str(out)], env=env, check=False
            )
        assert rerun.returncode == 0, rerun.stderr.decode()
        asked = [
            (f"q{int(r.prompt.split()[2].rstrip('.')):04d}", (r.model or "")[4:])
            for r in server.requests[mark:]
            if r.model != JUDGE
        ]
    assert not set(asked) & pairs, "a response already in the spool was asked for again"
    assert len(asked) == len(set(asked)) == 3 * prompts - len(pairs), "only what was missing"
    records = decode_lines(out.read_bytes())
    assert sorted(r.id for r in records) == [f"q{i:04d}" for i in range(prompts)]
    for r in records:
        assert len(set(r.generation_models)) == 3
    redone = len(first_run) - len(pairs)
    assert redone <= 6 * 4 + 8, f"{redone} answered responses were lost: more than in flight"
    assert str(len(partial)).encode() + b" prompts generated in part" in rerun.stderr


def test_a_spool_of_the_first_format_resumes_from_the_command_line(tmp_path: Path) -> None:
    config = write_config(tmp_path, 5)
    out = tmp_path / "out.ndjson"
    old = [  # the first spool format: a whole prompt per line, no version, no slots
        {
            "id": f"q{i:05d}",
            "instruction": f"Question {i}?",
            "line": i + 1,
            "index": i + 1,
            "generations": [{"model": m, "text": f"old {m} {i}"} for m in ("m0", "m1", "m2")],
        }
        for i in range(3)
    ]
    Path(f"{out}.spool.ndjson").write_text("".join(json.dumps(e) + "\n" for e in old))
    result = sf("run", str(config), "-o", str(out))
    assert result.returncode == 0, result.stderr.decode()
    assert b"holds 3 generated prompts" in result.stderr
    records = {r.id: r for r in decode_lines(out.read_bytes())}
    assert sorted(records) == [f"q{i:05d}" for i in range(5)]
    for i in range(3):
        assert records[f"q{i:05d}"].generations == [f"old {m} {i}" for m in ("m0", "m1", "m2")]
        assert records[f"q{i:05d}"].generation_models == ["m0", "m1", "m2"]


async def test_a_prompt_failed_mid_way_keeps_its_finished_responses_for_the_rerun(
    tmp_path: Path,
) -> None:
    from streamfeedback.testing import OpenAIServer, Reply, Request, judge_handler

    judge = judge_handler(untidy=0.0, broken=0.0)
    broken = {"org/m2"}

    async def handler(request: Request) -> Reply:
        if request.model in broken:
            return Reply.failure(400, "this model refuses today")
        return await judge(request)

    out = tmp_path / "out.ndjson"
    env = {**os.environ, "SF_TEST_KEY": KEY}
    async with OpenAIServer(handler) as server:
        config = _http_config(
            tmp_path, server.base_url, 30, routing='on_generation_failure = "fail"\n'
        )
        cmd = [sys.executable, "-m", "streamfeedback", "run", str(config), "-o", str(out)]
        with anyio.fail_after(120):
            first = await anyio.run_process(cmd, env=env, check=False)
        assert first.returncode == 1, first.stderr.decode()
        failed = len(Path(f"{out}.failures.ndjson").read_bytes().splitlines())
        assert 0 < failed < 30
        broken.clear()
        mark = len(server.requests)
        with anyio.fail_after(120):
            rerun = await anyio.run_process(cmd, env=env, check=False)
        asked = [r.model for r in server.requests[mark:] if r.model != JUDGE]
    assert rerun.returncode == 0, rerun.stderr.decode()
    assert asked == ["org/m2"] * failed, "only the failed response of each prompt, once"
    assert _ids(out) == [f"q{i:04d}" for i in range(30)]


def test_a_prompt_spooled_in_part_is_routed_afresh_when_a_model_left_the_pool(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path, 3)
    out = tmp_path / "out.ndjson"
    # an earlier run spooled one response of each; "gone" is no longer configured
    partial = [
        {
            "v": 2,
            "id": f"q{i:05d}",
            "instruction": f"Question {i}?",
            "index": i + 1,
            "models": models,
            "generations": [{"slot": slot, "model": models[slot], "text": "kept"}],
        }
        for i, models, slot in ((0, ["m0", "m1", "gone"], 0), (1, ["m3", "m4", "m5"], 1))
    ]
    Path(f"{out}.spool.ndjson").write_text("".join(json.dumps(e) + "\n" for e in partial))
    result = sf("run", str(config), "-o", str(out))
    assert result.returncode == 0, result.stderr.decode()
    records = {r.id: r for r in decode_lines(out.read_bytes())}
    assert sorted(records) == ["q00000", "q00001", "q00002"]
    assert "gone" not in records["q00000"].generation_models
    assert "kept" not in records["q00000"].generations
    assert records["q00001"].generation_models == ["m3", "m4", "m5"]
    assert records["q00001"].generations[1] == "kept", "the spooled response is used"
    assert "kept" not in (records["q00001"].generations[0], records["q00001"].generations[2])
