"""What a newcomer trips on in the first hour, driven through the real CLI in a process.

Each edge ends in one clear line on stderr and a known exit status: never a traceback, never
a run that silently does nothing.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from streamfeedback.testing import (
    OpenAIServer,
    Reply,
    Request,
    delayed,
    echo_handler,
    judge_handler,
)

from ..helpers import decode_lines
from .test_cli import QUICKSTART, sf, write_config

KEY = "sk-test-FIRSTHOUR-19c2e7"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _error_line(result: subprocess.CompletedProcess[bytes]) -> str:
    err = result.stderr.decode()
    assert "Traceback" not in err, err
    return err


# -- validate checks what run checks -----------------------------------------------------


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda tmp: (tmp / "prompts.jsonl").unlink(), "prompts.jsonl: no such file"),
        (
            lambda tmp: (tmp / "run.toml").write_text(
                (tmp / "run.toml").read_text().replace('id_column = "id"', 'column = "prompt"')
            ),
            "no column `prompt`",
        ),
        (
            lambda tmp: (
                (tmp / "prompts.txt").write_text("a prompt\n"),
                (tmp / "run.toml").write_text(
                    (tmp / "run.toml").read_text().replace("prompts.jsonl", "prompts.txt")
                ),
            ),
            "prompts.txt",
        ),
    ],
    ids=["missing-file", "wrong-column", "txt-source"],
)
def test_validate_rejects_what_run_rejects_with_exit_2(
    tmp_path: Path, edit: object, expected: str
) -> None:
    config = write_config(tmp_path, 3)
    edit(tmp_path)  # type: ignore[operator]
    for command in ("validate", "run"):
        result = sf(command, str(config), cwd=tmp_path)
        err = _error_line(result)
        assert result.returncode == 2, (command, err)
        assert expected in err, (command, err)
        if command == "run":
            assert result.stdout == b""


def test_validate_of_a_good_config_says_the_source_opens(tmp_path: Path) -> None:
    result = sf("validate", str(write_config(tmp_path, 3)))
    assert result.returncode == 0, result.stderr.decode()
    assert "prompts.jsonl opens and has the column 'instruction'" in result.stderr.decode()


async def test_validate_probe_asks_each_endpoint_for_its_models(tmp_path: Path) -> None:
    async with OpenAIServer(judge_handler(), models=["org/m0", "judge"]) as server:
        config = tmp_path / "probe.toml"
        (tmp_path / "prompts.jsonl").write_text('{"instruction": "hi"}\n')
        body = (
            '[source]\npath = "prompts.jsonl"\n[routing]\nn = 1\n'
            '[[generators]]\nbackend = "openai"\nmodel = "org/m0"\n'
            f'base_url = "{server.base_url}"\n'
            f'[rater]\nbackend = "openai"\nmodel = "MODEL"\nbase_url = "{server.base_url}"\n'
            'api_key_env = "SF_PROBE_KEY"\n'
        )
        env = {**os.environ, "SF_PROBE_KEY": KEY}
        config.write_text(body.replace("MODEL", "judge"))
        cmd = [sys.executable, "-m", "streamfeedback", "validate", str(config), "--probe"]
        with anyio.fail_after(60):
            good = await anyio.run_process(cmd, env=env, check=False)
        config.write_text(body.replace("MODEL", "gpt-typo"))
        with anyio.fail_after(60):
            bad = await anyio.run_process(cmd, env=env, check=False)
        asked = [r.path for r in server.requests]
    assert good.returncode == 0, good.stderr.decode()
    assert "rater: " in good.stderr.decode() and "serves judge" in good.stderr.decode()
    assert bad.returncode == 2
    err = _error_line(bad)
    assert "rater.model" in err and "does not serve 'gpt-typo'" in err and "org/m0" in err
    assert all(path.endswith("/models") for path in asked), "the probe only lists models"
    assert KEY not in good.stderr.decode() + err


def test_validate_probe_names_an_endpoint_nothing_answers_at(tmp_path: Path) -> None:
    (tmp_path / "prompts.jsonl").write_text('{"instruction": "hi"}\n')
    config = tmp_path / "probe.toml"
    config.write_text(
        '[source]\npath = "prompts.jsonl"\n[routing]\nn = 1\n'
        '[[generators]]\nbackend = "sim"\nmodel = "m"\n'
        '[rater]\nbackend = "openai"\nmodel = "j"\nbase_url = "http://127.0.0.1:1/v1"\n'
    )
    result = sf("validate", str(config), "--probe")
    assert result.returncode == 2
    err = _error_line(result)
    assert "rater.base_url" in err and "http://127.0.0.1:1/v1" in err


# -- config typos, enums and --set -------------------------------------------------------


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (
            "batch_size = 2",
            "batchsize = 2",
            "routing.batchsize: unknown key 'batchsize'; did you mean 'batch_size'?",
        ),
        ("[rater]", "[judge]", "judge: unknown section [judge]: the section is [rater]"),
        (
            'model = "judge"',
            'model = "judge"\naspect = "overall"',
            "rater.aspect: 'overall' is not one of: helpfulness, honesty, instruction-following, "
            "overall-rating, truthfulness",
        ),
        (
            '[rater]\nbackend = "sim"',
            '[rater]\nbackend = "vLLM"',
            "rater.backend: 'vLLM' is not one of: openai, sim, vllm",
        ),
        (
            'id_column = "id"',
            'id_column = "id"\nbatch_size = 3',
            "source.batch_size: unknown key 'batch_size': it belongs in [routing]",
        ),
        (
            'id_column = "id"',
            'id_column = "id"\nseed = 3',
            "source.seed: unknown key 'seed': it belongs in [generators] or [rater] or [routing]",
        ),
    ],
    ids=["typo", "judge-section", "aspect", "backend-case", "wrong-section", "shared-key"],
)
def test_config_mistakes_get_a_hint(tmp_path: Path, old: str, new: str, expected: str) -> None:
    config = write_config(tmp_path, 1)
    text = config.read_text()
    assert old in text
    config.write_text(text.replace(old, new, 1))
    for command in ("validate", "run"):
        result = sf(command, str(config))
        assert result.returncode == 2
        assert expected in _error_line(result)


def test_set_overrides_keys_for_one_run_and_is_checked_like_the_file(tmp_path: Path) -> None:
    config = write_config(tmp_path, 6)
    result = sf(
        "run",
        str(config),
        "--set",
        "rater.model=other-judge",
        "--set",
        "routing.n=1",
        "--set",
        "generators.0.name=renamed",
        "--set",
        'source.id_column="id"',
    )
    assert result.returncode == 0, result.stderr.decode()
    records = decode_lines(result.stdout)
    assert len(records) == 6
    assert {r.ultrafeedback_model for r in records} == {"other-judge"}
    assert {len(r.generation_models) for r in records} == {1}
    plan = sf(
        "validate", str(config), "--set", "generators[0].name=renamed", "--set", "rater.model=2024"
    )
    assert "  - renamed: sim org/m0" in plan.stdout.decode()
    assert "judge: sim 2024 " in plan.stdout.decode(), "a key that holds text takes digits as text"
    assert "other-judge" not in config.read_text(), "the file itself is untouched"

    for bad, expected in [
        ("routing.n=0", "routing: `n` must be at least 1 (from --set)"),
        ("routing.seed=three", "routing.seed: Expected `int`, got `str` (from --set)"),
        ("rater.aspect=overall", "'overall' is not one of"),
        ("routing.batchsize=4", "did you mean 'batch_size'? (from --set)"),
        ("generators.9.model=x", "--set 'generators.9.model=x': generators has no table 9"),
        ("nonsense", "--set 'nonsense': expected KEY=VALUE"),
    ]:
        result = sf("run", str(config), "--set", bad)
        assert result.returncode == 2, bad
        assert expected in _error_line(result), (bad, result.stderr.decode())
        assert result.stdout == b""


def test_base_url_empty_is_an_error_not_the_openai_api(tmp_path: Path) -> None:
    config = write_config(tmp_path, 1)
    config.write_text(
        config.read_text().replace(
            '[rater]\nbackend = "sim"', '[rater]\nbackend = "openai"\nbase_url = ""'
        )
    )
    result = sf("validate", str(config))
    assert result.returncode == 2
    assert "rater: `base_url` is empty" in _error_line(result)


async def test_openai_base_url_and_key_apply_where_the_config_gives_none(tmp_path: Path) -> None:
    config = write_config(tmp_path, 4)
    config.write_text(
        config.read_text().replace('[rater]\nbackend = "sim"', '[rater]\nbackend = "openai"')
    )
    async with OpenAIServer(judge_handler(broken=0.0), api_key=KEY, models=["judge"]) as server:
        env = {**os.environ, "OPENAI_BASE_URL": server.base_url, "OPENAI_API_KEY": KEY}
        with anyio.fail_after(60):
            result = await anyio.run_process(
                [sys.executable, "-m", "streamfeedback", "run", str(config), "--no-progress"],
                env=env,
                check=False,
            )
            plan = await anyio.run_process(
                [sys.executable, "-m", "streamfeedback", "validate", str(config), "--probe"],
                env=env,
                check=False,
            )
        judged = [r for r in server.requests if r.path.endswith("/chat/completions")]
    assert result.returncode == 0, result.stderr.decode()
    assert len(decode_lines(result.stdout)) == 4
    assert len(judged) == 4
    assert all(r.headers.get("authorization") == f"Bearer {KEY}" for r in judged)
    assert plan.returncode == 0, plan.stderr.decode()
    assert f"judge: openai judge on {server.base_url}" in plan.stdout.decode()
    assert KEY not in (result.stderr + plan.stdout + plan.stderr).decode()


# -- flags ---------------------------------------------------------------------------------


def test_limit_below_zero_is_refused_and_zero_says_it_does_nothing(tmp_path: Path) -> None:
    config = write_config(tmp_path, 5)
    negative = sf("run", str(config), "--limit", "-1")
    assert negative.returncode == 2 and negative.stdout == b""
    assert "--limit: '-1': must be 0 or more" in _error_line(negative)
    zero = sf("run", str(config), "--limit", "0")
    assert zero.returncode == 0 and zero.stdout == b""
    assert "--limit 0 takes no prompts: nothing to do" in _error_line(zero)


async def test_verbosity_flags_work_after_the_subcommand_and_v_shows_requests(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path, 3)
    config.write_text(
        config.read_text().replace('[rater]\nbackend = "sim"', '[rater]\nbackend = "openai"')
    )
    async with OpenAIServer(judge_handler(broken=0.0), models=["judge"]) as server:
        config.write_text(
            config.read_text().replace(
                'model = "judge"\n', f'model = "judge"\nbase_url = "{server.base_url}"\n'
            )
        )
        runs = {}
        for flags in ([], ["-q"], ["-v"], ["-vv"]):
            with anyio.fail_after(60):
                runs[" ".join(flags)] = await anyio.run_process(
                    [sys.executable, "-m", "streamfeedback", "run", str(config), *flags],
                    check=False,
                )
    for flags, result in runs.items():
        assert result.returncode == 0, (flags, result.stderr.decode())
        assert len(decode_lines(result.stdout)) == 3
    plain, quiet = runs[""].stderr.decode(), runs["-q"].stderr.decode()
    verbose, very = runs["-v"].stderr.decode(), runs["-vv"].stderr.decode()
    assert "done in" in plain and quiet == ""
    requests = f"POST {server.base_url}/chat/completions"
    assert requests not in plain
    assert verbose.count(requests) == 3, verbose
    assert len(very.splitlines()) > len(verbose.splitlines()), "-vv adds connection details"
    before = sf("-q", "validate", str(QUICKSTART))
    after = sf("validate", str(QUICKSTART), "-q")
    assert before.returncode == after.returncode == 0
    assert before.stderr == after.stderr == b""


async def test_v_shows_the_retries_of_a_failing_endpoint(tmp_path: Path) -> None:
    config = write_config(tmp_path, 2)
    echo = echo_handler()
    calls = 0

    def flaky(request: Request) -> Reply:
        nonlocal calls
        calls += 1
        return Reply.failure(503, "busy, try again") if calls == 1 else echo(request)

    async with OpenAIServer(flaky, models=["org/m0"]) as server:
        config.write_text(
            config.read_text()
            .replace(
                'name = "m0"\nbackend = "sim"',
                f'name = "m0"\nbackend = "openai"\nbase_url = "{server.base_url}"',
            )
            .replace("[routing]\nn = 3", "[routing]\nn = 6")
        )
        with anyio.fail_after(60):
            result = await anyio.run_process(
                [sys.executable, "-m", "streamfeedback", "run", str(config), "-v"], check=False
            )
    err = result.stderr.decode()
    assert result.returncode == 0, err
    assert len(decode_lines(result.stdout)) == 2
    assert re.search(r"m0: retry 1/\d+ of request .*503", err), err


def test_a_reader_that_takes_one_line_ends_the_run_quietly(tmp_path: Path) -> None:
    """`streamfeedback run cfg | head -1`: a closed pipe is how pipelines end."""
    config = write_config(tmp_path, 400)
    for flags in ([], ["-v"]):
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamfeedback", "run", str(config), "--no-progress", *flags],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=tmp_path,
        )
        assert proc.stdout is not None and proc.stderr is not None
        first = proc.stdout.readline()
        proc.stdout.close()
        with proc.stderr:
            err = proc.stderr.read().decode()
        assert proc.wait(timeout=120) == 0, err
        assert json.loads(first)["id"].startswith("q")
        assert "Traceback" not in err and "error" not in err and "Exception" not in err
        if flags:
            assert "stdout: the reader went away" in err
            summary = err.split("done in ")[1]
            written = int(summary.split(": ")[1].split(" records")[0])
            assert 1 <= written < 400 and "not written" in summary
        else:
            assert "reader went away" not in err and "done in" not in err


def test_a_closed_pipe_ends_validate_and_report_quietly(tmp_path: Path) -> None:
    config = write_config(tmp_path, 3)
    out = tmp_path / "out.ndjson"
    assert sf("run", str(config), "-o", str(out)).returncode == 0
    for args in (["validate", str(config)], ["report", str(out)], ["binarize", str(out)]):
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamfeedback", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()
        with proc.stderr:
            err = proc.stderr.read().decode()
        assert proc.wait(timeout=60) == 0, err
        assert "Traceback" not in err and "BrokenPipe" not in err


# -- missing extras ------------------------------------------------------------------------


def _without(module: str, *argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI in a process where `module` cannot be imported, as if it were not installed."""
    code = (
        f"import sys; sys.modules[{module!r}] = None; "
        "from streamfeedback._cli import main; raise SystemExit(main(sys.argv[1:]))"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120, cwd=cwd
    )


def test_missing_extras_exit_2_with_the_pip_line(tmp_path: Path) -> None:
    config = write_config(tmp_path, 3, extra='[cluster]\nbackend = "ray"\n')
    for command in ("validate", "run"):
        result = _without("ray", command, str(config))
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr
        assert "pip install 'streamfeedback[ray]'" in result.stderr

    out = tmp_path / "out.ndjson"
    assert sf("run", str(write_config(tmp_path, 3)), "-o", str(out)).returncode == 0
    plots = _without("matplotlib", "report", str(out), "--png", str(tmp_path / "plots"))
    assert plots.returncode == 2 and "Traceback" not in plots.stderr
    assert "pip install 'streamfeedback[report]'" in plots.stderr
    argilla = _without("argilla", "export", str(out), "--to", "argilla:prefs")
    assert argilla.returncode == 2 and "Traceback" not in argilla.stderr
    assert "pip install 'streamfeedback[argilla]'" in argilla.stderr


# -- progress --------------------------------------------------------------------------------


async def test_the_progress_log_line_knows_the_total_of_a_file_and_projects_the_judge_cost(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path, 60, ttft=0.02, slots=2)
    async with OpenAIServer(delayed(judge_handler(), 0.02), models=["judge"]) as server:
        config.write_text(
            config.read_text().replace(
                '[rater]\nbackend = "sim"',
                f'[rater]\nbackend = "openai"\nbase_url = "{server.base_url}"\n'
                "input_cost_per_mtok = 10.0\noutput_cost_per_mtok = 30.0",
            )
        )
        with anyio.fail_after(120):
            result = await anyio.run_process(
                [
                    sys.executable,
                    "-m",
                    "streamfeedback",
                    "run",
                    str(config),
                    "--progress-every",
                    "0.1",
                    "-o",
                    str(tmp_path / "out.ndjson"),
                ],
                check=False,
            )
    err = result.stderr.decode()
    assert result.returncode == 0, err
    lines = [line for line in err.splitlines() if "progress: " in line]
    assert lines, err
    counted = [line for line in lines if "/60 records (" in line]
    # the total is counted beside the run: at most the first line may come before it
    assert len(counted) >= len(lines) - 1 and counted, lines
    assert any("ETA " in line for line in counted), counted
    assert any(" of ~$" in line for line in counted), "the judge's projected cost"
    assert all(len(line) > 80 for line in lines), "a log line is not cut to a terminal"


# -- export and binarize -------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_output(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = tmp_path_factory.mktemp("output")
    result = sf("run", str(QUICKSTART), "-o", str(where / "out.ndjson"), "-q")
    assert result.returncode == 0, result.stderr.decode()
    with (where / "out.ndjson").open("rb") as src, gzip.open(where / "out.ndjson.gz", "wb") as dst:
        dst.write(src.read())
    return where / "out.ndjson"


_OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def test_export_picks_the_format_from_the_extension(run_output: Path, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    ids = [json.loads(line)["id"] for line in run_output.read_text().splitlines()]
    for name in ("out.jsonl", "out.json", "out.csv", "out.parquet"):
        target = tmp_path / name
        result = sf("export", str(run_output), "--to", str(target), env=_OFFLINE)
        assert result.returncode == 0, result.stderr.decode()
        assert target.is_file(), f"{name} is one file, not a datasets folder"
        assert (tmp_path / "out.README.md").is_file()
        if name.endswith(".jsonl"):
            rows = [json.loads(line) for line in target.read_text().splitlines()]
        elif name.endswith(".json"):
            rows = json.loads(target.read_text())
        elif name.endswith(".csv"):
            with target.open(newline="") as fh:
                rows = list(csv.DictReader(fh))
            assert isinstance(json.loads(rows[0]["generations"]), list), "lists as JSON text"
        else:
            rows = pq.read_table(target).to_pylist()
        assert [row["id"] for row in rows] == ids, name
    folder = tmp_path / "folder"
    assert sf("export", str(run_output), "--to", str(folder), env=_OFFLINE).returncode == 0
    assert (folder / "dataset_info.json").is_file() and (folder / "README.md").is_file()


def test_export_and_binarize_read_gzip_and_stdin(run_output: Path, tmp_path: Path) -> None:
    gz = run_output.with_name("out.ndjson.gz")
    plain = sf("binarize", str(run_output)).stdout
    assert plain.count(b"\n") > 0
    assert sf("binarize", str(gz)).stdout == plain
    assert sf("binarize", "-", stdin=run_output.read_bytes()).stdout == plain
    for source, stdin in ((str(gz), None), ("-", run_output.read_bytes())):
        target = tmp_path / f"from-{'stdin' if stdin else 'gz'}.jsonl"
        result = sf("export", source, "--to", str(target), stdin=stdin, env=_OFFLINE)
        assert result.returncode == 0, result.stderr.decode()
        assert len(target.read_text().splitlines()) == len(run_output.read_text().splitlines())
    broken = tmp_path / "broken.ndjson.gz"
    broken.write_bytes(b"not gzip at all\n")
    for command in (["binarize", str(broken)], ["export", str(broken), "--to", "x.jsonl"]):
        result = sf(*command, cwd=tmp_path, env=_OFFLINE)
        assert result.returncode == 2, command
        assert "broken.ndjson.gz: cannot read" in _error_line(result)


def test_export_to_the_hub_offline_says_so_in_one_line(run_output: Path, tmp_path: Path) -> None:
    for env in (_OFFLINE, {"HF_ENDPOINT": "http://127.0.0.1:1", "HF_TOKEN": "hf_unused"}):
        result = sf("export", str(run_output), "--to", "someone/prefs", cwd=tmp_path, env=env)
        assert result.returncode == 1
        err = _error_line(result)
        errors = [line for line in err.splitlines() if ": error: " in line]
        assert len(errors) == 1 and "cannot push to the Hugging Face Hub as someone/prefs" in err
        assert len(err.splitlines()) < 10, err
        assert "hf_unused" not in err
