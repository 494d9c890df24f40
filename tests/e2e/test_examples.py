"""Every file in examples/ does what its header says, run the way it says."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from streamfeedback import load_config
from streamfeedback._config import api_key_env

from ..helpers import decode_lines

ROOT = Path(__file__).parents[2]
EXAMPLES = ROOT / "examples"
TOMLS = sorted(EXAMPLES.glob("*.toml"))
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def run(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(args),
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=60,
        env={**os.environ, **OFFLINE, **(env or {})},
    )


def test_the_examples_folder_has_the_documented_files() -> None:
    names = {p.name for p in EXAMPLES.iterdir()}
    assert {
        "quickstart.toml",
        "multi_aspect.toml",
        "local_judge.toml",
        "embed_async.py",
        "jq_pipeline.sh",
    } <= names


@pytest.mark.parametrize("config", TOMLS, ids=[p.name for p in TOMLS])
def test_every_example_config_validates(config: Path, tmp_path: Path) -> None:
    """Configs that need an API key get a dummy one: validate only checks that it is set."""
    keys = {
        var: "dummy-key-for-validate"
        for engine in [*load_config(config).generators, load_config(config).rater]
        if engine.backend == "openai" and (var := api_key_env(engine)) is not None
    }
    sections = [*load_config(config).generators, load_config(config).rater]
    if any(engine.backend == "vllm" for engine in sections):
        # validate checks that vllm is installed (exit 2 otherwise): the stand-in will do
        fake = str(ROOT / "tests" / "fake_vllm")
        keys["PYTHONPATH"] = os.pathsep.join(filter(None, [fake, os.environ.get("PYTHONPATH")]))
    source = load_config(config).source
    overrides = []
    if source.dataset is not None:
        # a Hub dataset cannot be opened offline (validate says so, exit 2, as run would):
        # a local stand-in with the same split and columns checks the rest of the config
        import datasets

        columns = [source.column, *([source.id_column] if source.id_column else [])]
        local = datasets.Dataset.from_dict({c: ["Say hello."] for c in columns})
        datasets.DatasetDict({source.split: local}).save_to_disk(str(tmp_path / "ds"))
        overrides = ["--set", f"source.dataset={tmp_path / 'ds'}"]
    result = run(
        sys.executable,
        "-m",
        "streamfeedback",
        "validate",
        str(config),
        *overrides,
        cwd=tmp_path,
        env=keys,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"config: {config}")
    assert "judge:" in result.stdout


def test_local_judge_puts_six_vllm_generators_and_the_vllm_judge_on_seven_gpus() -> None:
    config = load_config(EXAMPLES / "local_judge.toml")
    assert [g.backend for g in config.generators] == ["vllm"] * 6
    assert sorted(gpu for g in config.generators for gpu in g.gpu_ids) == [0, 1, 2, 3, 4, 5]
    assert config.rater.backend == "vllm" and config.rater.gpu_ids == [6]


def test_multi_aspect_runs_with_the_paper_settings_and_rates_four_aspects(tmp_path: Path) -> None:
    path = EXAMPLES / "multi_aspect.toml"
    config = load_config(path)
    assert config.routing.n == 4 and len(config.generators) == 6
    assert config.routing.batch_size == 1
    assert all(
        (g.temperature, g.top_p, g.max_tokens) == (1.0, 1.0, 1024) for g in config.generators
    )
    assert (config.rater.temperature, config.rater.top_p, config.rater.shuffle) == (0.0, 0.6, True)
    result = run(
        sys.executable, "-m", "streamfeedback", "run", str(path), "--limit", "5", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    records = decode_lines(result.stdout.encode())
    assert len(records) == 5
    aspects = ["helpfulness", "honesty", "instruction-following", "truthfulness"]
    for record in records:
        assert record.aspects is not None and sorted(record.aspects) == aspects
        assert record.fine_grained_score is not None and len(record.fine_grained_score) == 4
        assert len(record.generations) == 4


def test_embed_async_runs_inside_an_app_loop(tmp_path: Path) -> None:
    python = ROOT / ".venv" / "bin" / "python"  # as its header says, from the README's setup
    python = python if python.exists() else Path(sys.executable)
    result = run(str(python), str(EXAMPLES / "embed_async.py"), "--limit", "10", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "10 records, 0 failures" in result.stdout
    assert "heartbeat ticked" in result.stdout and "mean rating per model:" in result.stdout


def _without_streamfeedback_on_path() -> str:
    """PATH as a shell without an activated venv has it: no `streamfeedback` on it."""
    venv_bin = str(Path(sys.executable).parent)
    keep = [
        d
        for d in os.environ.get("PATH", os.defpath).split(os.pathsep)
        if d and d != venv_bin and not (Path(d) / "streamfeedback").exists()
    ]
    return os.pathsep.join(keep)


@pytest.mark.parametrize("how", ["STREAMFEEDBACK", "readme-setup"])
def test_jq_pipeline_prints_mean_ratings_and_pair_counts(tmp_path: Path, how: str) -> None:
    """Run as the README leaves a user: no activated venv (or with STREAMFEEDBACK set)."""
    assert shutil.which("jq") and shutil.which("bash"), "needs jq and bash (.ci/run installs jq)"
    env = {"PATH": _without_streamfeedback_on_path(), "STREAMFEEDBACK": ""}
    if how == "STREAMFEEDBACK":
        env["STREAMFEEDBACK"] = f"{sys.executable} -m streamfeedback"
    result = run("bash", str(EXAMPLES / "jq_pipeline.sh"), cwd=tmp_path, env=env)
    if how == "readme-setup" and not (ROOT / ".venv" / "bin" / "streamfeedback").exists():
        assert result.returncode == 127
        assert "streamfeedback not found: run the README's setup" in result.stderr
        return
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split("\t") == ["model", "responses", "rated", "mean_rating"]
    table = [line.split("\t") for line in lines[1:-1]]
    assert len(table) == 6
    assert sum(int(row[1]) for row in table) == 40 * 3
    assert all(1.0 <= float(row[3]) <= 5.0 for row in table)
    pairs, ok = lines[-1].removeprefix("DPO pairs: ").split(", chosen scored above rejected in ")
    assert int(pairs) == int(ok) > 0


def test_the_license_file_matches_pyproject_and_the_readme_output_is_ignored() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'license = "Apache-2.0"' in pyproject
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text, "the full text, not a pointer to it"
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    assert "quickstart.ndjson" in ignored, "the README's own output stays out of git"
