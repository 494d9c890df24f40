from __future__ import annotations

from pathlib import Path

import pytest

from streamfeedback import ConfigError, load_config
from streamfeedback._config import check_environment

GOOD = """
[source]
path = "prompts.jsonl"
[[generators]]
name = "a"
backend = "sim"
model = "m/a"
[[generators]]
name = "b"
backend = "sim"
model = "m/b"
[rater]
backend = "sim"
model = "judge"
[routing]
n = 2
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_good_config_loads_with_defaults_and_paths_relative_to_the_file(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD))
    assert config.source.path == str(tmp_path / "prompts.jsonl")
    assert config.routing.n == 2 and config.routing.batch_size == 2
    assert config.rater.max_tokens == 2048 and config.rater.concurrency == 32
    assert config.generators[0].max_tokens == 512
    assert config.output.path == "-"


@pytest.mark.parametrize(
    ("change", "key", "words"),
    [
        (("[routing]\nn = 2", "[routing]\nn = 2\nbogus = 1"), "routing.bogus", "unknown key"),
        (("[routing]\nn = 2", "[routing]\nn = 'two'"), "routing.n", "Expected `int`"),
        (("[routing]\nn = 2", "[routing]\nn = 3"), "routing.n", "larger than the pool of 2"),
        (
            ('backend = "sim"\nmodel = "m/a"', 'backend = "tgi"\nmodel = "m/a"'),
            "generators[0].backend",
            "tgi",
        ),
        (('name = "b"', 'name = "a"'), "generators[1].name", "two generators"),
        (('path = "prompts.jsonl"', 'path = "p.jsonl"\ndataset = "x/y"'), "source", "exactly one"),
        (
            ('[rater]\nbackend = "sim"\nmodel = "judge"', '[rater]\nbackend = "sim"'),
            "rater.model",
            "missing",
        ),
        (
            (
                '[rater]\nbackend = "sim"\nmodel = "judge"',
                '[rater]\nbackend = "sim"\nmodel = "judge"\naspect = "style"',
            ),
            "rater.aspect",
            "style",
        ),
    ],
)
def test_bad_config_names_file_and_key(
    tmp_path: Path, change: tuple[str, str], key: str, words: str
) -> None:
    old, new = change
    assert old in GOOD
    path = write(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.path == str(path)
    assert info.value.key == key
    assert words in str(info.value)
    assert str(path) in str(info.value)


def test_two_vllm_engines_on_one_gpu_are_refused(tmp_path: Path) -> None:
    text = GOOD.replace(
        'backend = "sim"\nmodel = "m/a"', 'backend = "vllm"\nmodel = "m/a"\ngpu = 1'
    )
    text = text.replace(
        'backend = "sim"\nmodel = "m/b"', 'backend = "vllm"\nmodel = "m/b"\ngpu = 1'
    )
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert info.value.key == "generators[1].gpu"
    assert "GPU 1" in str(info.value)


def test_broken_toml_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[source\npath = 1")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value) and "TOML" in str(info.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.toml")
    assert "nope.toml" in str(info.value)


def test_unset_api_key_variable_is_reported_without_a_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = GOOD.replace(
        '[rater]\nbackend = "sim"', '[rater]\nbackend = "openai"\napi_key_env = "SF_TEST_KEY"'
    )
    config = load_config(write(tmp_path, text))
    monkeypatch.delenv("SF_TEST_KEY", raising=False)
    with pytest.raises(ConfigError) as info:
        check_environment(config, "run.toml")
    assert info.value.key == "rater.api_key_env" and "SF_TEST_KEY" in str(info.value)
    monkeypatch.setenv("SF_TEST_KEY", "sk-planted-secret")
    check_environment(config, "run.toml")


def test_examples_are_valid() -> None:
    """Every example config loads; the ones the README and examples/ point to must be there."""
    root = Path(__file__).parents[2] / "examples"
    found = {path.name: load_config(path) for path in root.glob("*.toml")}
    named = {"quickstart.toml", "ultrafeedback.toml", "local_judge.toml", "multi_aspect.toml"}
    assert named <= set(found), f"missing examples: {sorted(named - set(found))}"
    assert all(config.generators and config.rater.model for config in found.values())
