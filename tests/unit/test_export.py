"""export: datasets folder, parquet and Hub with a card that matches the run; Argilla records.

Nothing here reaches the network: the Hub push is tested up to the upload calls and the
Argilla push against a fake `argilla` module.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import msgspec
import pytest

from streamfeedback import AspectResult, Record, load_config
from streamfeedback._cli import main as cli
from streamfeedback._tools._card import card_facts

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

datasets = pytest.importorskip("datasets")

ROOT = Path(__file__).parents[2]
QUICKSTART = ROOT / "examples" / "quickstart.toml"


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


@pytest.fixture(scope="module")
def quickstart_output(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The quickstart's output, made once by the real CLI."""
    where = tmp_path_factory.mktemp("quickstart")
    run = subprocess.run(
        [sys.executable, "-m", "streamfeedback", "run", str(QUICKSTART), "-o", "out.ndjson"],
        capture_output=True,
        timeout=60,
        cwd=where,
    )
    assert run.returncode == 0, run.stderr.decode()
    return where / "out.ndjson"


def records_of(path: Path) -> list[Record]:
    decoder = msgspec.json.Decoder(Record)
    return [decoder.decode(line) for line in path.read_bytes().splitlines() if line.strip()]


def histograms(rows: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    hist: dict[str, dict[str, int]] = {}
    for row in rows:
        for model, rating in zip(row["generation_models"], row["ratings"], strict=True):
            bucket = "null" if rating is None else str(rating)
            hist.setdefault(model, {}).setdefault(bucket, 0)
            hist[model][bucket] += 1
    return hist


def check_card_against(card: str, rows: list[dict[str, Any]], command: str) -> None:
    facts = card_facts(card)
    assert card.startswith("---\n")
    header = card.split("---\n")[1]
    for tag in ("ultrafeedback", "streamfeedback", "dpo"):
        assert f"- {tag}\n" in header
    assert "license: other" in header and "text-generation" in header
    assert facts["records"] == len(rows)
    assert facts["responses"] == sum(len(r["generations"]) for r in rows)
    assert facts["null_ratings"] == sum(r["ratings"].count(None) for r in rows)
    assert facts["rating_histograms"]["overall-rating"] == histograms(rows)
    assert facts["judge_models"] == {"gpt-4-turbo-2024-04-09": len(rows)}
    assert facts["command"] == command
    config = load_config(QUICKSTART)
    assert facts["config"]["routing"] == {"n": 3, "batch_size": 2, "seed": 0, "pool_size": 6}
    assert [g["name"] for g in facts["config"]["generators"]] == [
        g.label for g in config.generators
    ]
    assert facts["config"]["generators"][0]["temperature"] == 0.7
    assert facts["config"]["judge"]["aspects"] == ["overall-rating"]
    assert facts["config"]["judge"]["max_tokens"] == 2048
    assert "api_key" not in card.lower()


def test_quickstart_exports_to_a_saved_dataset_that_reloads_and_matches_its_card(
    quickstart_output: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "dataset"
    argv = ["export", str(quickstart_output), "--to", str(target), "--config", str(QUICKSTART)]
    monkeypatch.setattr(sys, "argv", ["streamfeedback", *argv])
    assert cli(argv) == 0
    reloaded = datasets.load_from_disk(str(target))
    rows = reloaded.to_list()
    originals = records_of(quickstart_output)
    assert [r["id"] for r in rows] == [r.id for r in originals]
    assert [r["ratings"] for r in rows] == [r.ratings for r in originals]
    assert rows[0]["generations"] == originals[0].generations
    card = (target / "README.md").read_text()
    check_card_against(card, rows, "streamfeedback " + " ".join(argv))


def test_quickstart_exports_to_parquet_with_the_card_beside_it(
    quickstart_output: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "uf.parquet"
    argv = ["export", str(quickstart_output), "--to", str(target), "--config", str(QUICKSTART)]
    monkeypatch.setattr(sys, "argv", ["streamfeedback", *argv])
    assert cli(argv) == 0
    reloaded = datasets.load_dataset(
        "parquet", data_files=str(target), split="train", cache_dir=str(tmp_path / "c")
    )
    rows = reloaded.to_list()
    assert len(rows) == len(records_of(quickstart_output)) == 40
    card = (tmp_path / "uf.README.md").read_text()
    check_card_against(card, rows, "streamfeedback " + " ".join(argv))


def test_card_without_config_says_what_is_unknown_and_rebuilds_the_command(
    quickstart_output: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "argv", ["pytest"])
    target = tmp_path / "d"
    assert cli(["export", str(quickstart_output), "--to", str(target)]) == 0
    card = (target / "README.md").read_text()
    assert "No config was given" in card
    facts = card_facts(card)
    assert facts["config"] is None
    assert facts["command"].startswith(f"streamfeedback export {quickstart_output} --to ")


def multi_aspect_record(i: int) -> Record:
    names = ["helpfulness", "honesty", "instruction-following", "truthfulness"]
    return Record(
        id=f"m{i}",
        instruction=f"q{i}",
        generations=["a", "b"],
        generation_models=["x", "y"],
        ratings=[4, None],
        rationales=["types", "types"],
        rationales_for_ratings=["good", "bad"],
        types=[[1, 3], None],
        ultrafeedback_model="judge",
        aspect="helpfulness",
        aspects={
            name: AspectResult(
                ratings=[4, None] if name == "helpfulness" else [5, 2],
                rationales=["r1", "r2"],
                rationales_for_ratings=["good", "bad"] if name == "helpfulness" else None,
            )
            for name in names
        },
        fine_grained_score=[4.75, 2.0],
    )


def write_records(path: Path, records: list[Record]) -> None:
    path.write_bytes(b"".join(msgspec.json.encode(r) + b"\n" for r in records))


def test_multi_aspect_records_keep_every_aspect_and_a_rerun_sees_a_changed_file(
    tmp_path: Path,
) -> None:
    src = tmp_path / "ma.ndjson"
    write_records(src, [multi_aspect_record(i) for i in range(3)])
    target = tmp_path / "ma.parquet"
    assert cli(["export", str(src), "--to", str(target)]) == 0
    row = datasets.load_dataset(
        "parquet", data_files=str(target), split="train", cache_dir=str(tmp_path / "c1")
    )[0]
    assert row["aspects"]["honesty"]["ratings"] == [5, 2]
    assert row["aspects"]["helpfulness"]["ratings"] == [4, None]
    assert row["aspects"]["overall-rating"] is None
    assert row["fine_grained_score"] == [4.75, 2.0] and row["types"] == [[1, 3], None]
    facts = card_facts((tmp_path / "ma.README.md").read_text())
    assert facts["aspects"] == ["helpfulness", "honesty", "instruction-following", "truthfulness"]
    assert facts["rating_histograms"]["helpfulness"]["y"] == {"null": 3}
    assert facts["null_ratings"] == 3

    write_records(src, [multi_aspect_record(i) for i in range(5)])
    assert cli(["export", str(src), "--to", str(target)]) == 2
    assert cli(["export", str(src), "--to", str(target), "--overwrite"]) == 0
    again = datasets.load_dataset(
        "parquet", data_files=str(target), split="train", cache_dir=str(tmp_path / "c2")
    )
    assert again.num_rows == 5


def test_unreadable_input_exits_2_naming_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "bad.ndjson"
    write_records(src, [multi_aspect_record(0)])
    with src.open("ab") as fh:
        fh.write(b'{"id": "x"}\n')
    assert cli(["export", str(src), "--to", str(tmp_path / "out")]) == 2
    assert f"{src}:2" in capsys.readouterr().err


def test_hub_push_uploads_the_card_then_the_data_with_the_private_flag(
    quickstart_output: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import huggingface_hub

    calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def record(name: str) -> Any:
        def fake(self: Any, *args: Any, **kwargs: Any) -> None:
            if name == "push_to_hub":
                kwargs["rows"] = self.num_rows
            calls.append((name, args, kwargs))

        return fake

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", record("create_repo"))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_file", record("upload_file"))
    monkeypatch.setattr(datasets.Dataset, "push_to_hub", record("push_to_hub"))
    monkeypatch.chdir(tmp_path)
    argv = ["export", str(quickstart_output), "--to", "someone/uf-test", "--private"]
    assert cli([*argv, "--config", str(QUICKSTART)]) == 0
    assert [c[0] for c in calls] == ["create_repo", "upload_file", "push_to_hub"]
    create, upload, push = calls
    assert create[1] == ("someone/uf-test",)
    assert create[2]["private"] is True and create[2]["repo_type"] == "dataset"
    assert upload[2]["repo_id"] == "someone/uf-test" and upload[2]["path_in_repo"] == "README.md"
    assert upload[2]["repo_type"] == "dataset"
    card = upload[2]["path_or_fileobj"].decode()
    assert card_facts(card)["records"] == 40
    assert push[1] == ("someone/uf-test",)
    assert push[2]["private"] is True and push[2]["rows"] == 40
    assert not (tmp_path / "someone").exists()


class FakeArgilla:
    """Just enough of the Argilla v2 SDK to see what export hands it."""

    def __init__(self) -> None:
        self.created: list[Any] = []
        self.logged: list[Any] = []
        self.module = types.ModuleType("argilla")
        fake = self

        class Thing:
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                self.args, self.kwargs = args, kwargs

        class Records:
            def log(self, records: list[Any]) -> None:
                fake.logged.extend(records)

        class Dataset(Thing):
            def __init__(self, **kwargs: Any) -> None:
                super().__init__(**kwargs)
                self.records = Records()

            def create(self) -> None:
                fake.created.append(self)

        for name in (
            "Argilla",
            "Settings",
            "TextField",
            "RatingQuestion",
            "TextQuestion",
            "TermsMetadataProperty",
            "FloatMetadataProperty",
            "Record",
            "Suggestion",
        ):
            setattr(self.module, name, type(name, (Thing,), {}))
        self.module.Dataset = Dataset  # type: ignore[attr-defined]


def test_argilla_push_builds_rating_settings_and_records_with_suggestions(
    quickstart_output: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeArgilla()
    monkeypatch.setitem(sys.modules, "argilla", fake.module)
    argv = ["export", str(quickstart_output), "--to", "argilla:uf-review"]
    assert cli([*argv, "--argilla-workspace", "team"]) == 0
    (dataset,) = fake.created
    assert dataset.kwargs["name"] == "uf-review" and dataset.kwargs["workspace"] == "team"
    assert dataset.kwargs["client"].kwargs == {}  # URL and key come from the SDK's own env
    settings = dataset.kwargs["settings"].kwargs
    assert [f.kwargs["name"] for f in settings["fields"]] == [
        "instruction",
        "response_1",
        "response_2",
        "response_3",
    ]
    questions = {q.kwargs["name"]: q for q in settings["questions"]}
    assert set(questions) == {f"{k}_{i}" for k in ("rating", "rationale") for i in (1, 2, 3)}
    assert type(questions["rating_1"]).__name__ == "RatingQuestion"
    assert questions["rating_1"].kwargs["values"] == [1, 2, 3, 4, 5]
    assert {m.kwargs["name"] for m in settings["metadata"]} == {
        "judge",
        "model_1",
        "model_2",
        "model_3",
    }
    originals = records_of(quickstart_output)
    assert len(fake.logged) == len(originals)
    first, source = fake.logged[0].kwargs, originals[0]
    assert first["id"] == source.id
    assert first["fields"]["instruction"] == source.instruction
    assert first["fields"]["response_2"] == source.generations[1]
    assert first["metadata"]["model_3"] == source.generation_models[2]
    suggested = {s.kwargs["question_name"]: s.kwargs for s in first["suggestions"]}
    assert suggested["rating_1"]["value"] == source.ratings[0]
    assert suggested["rationale_1"]["value"] == source.rationales[0]
    assert suggested["rating_1"]["agent"] == source.ultrafeedback_model
    assert suggested["rating_1"]["type"] == "model"


def test_argilla_push_without_the_sdk_names_the_extra(
    quickstart_output: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "argilla", None)
    assert cli(["export", str(quickstart_output), "--to", "argilla:x"]) == 2
    assert "streamfeedback[argilla]" in capsys.readouterr().err


def test_argilla_jsonl_has_per_aspect_suggestions_and_a_settings_file(tmp_path: Path) -> None:
    src = tmp_path / "ma.ndjson"
    write_records(src, [multi_aspect_record(0)])
    target = tmp_path / "review.jsonl"
    assert cli(["export", str(src), "--to", str(target), "--format", "argilla"]) == 0
    (line,) = target.read_text().splitlines()
    row = json.loads(line)
    assert row["fields"] == {"instruction": "q0", "response_1": "a", "response_2": "b"}
    assert row["metadata"] == {
        "judge": "judge",
        "model_1": "x",
        "model_2": "y",
        "fine_grained_score_1": 4.75,
        "fine_grained_score_2": 2.0,
    }
    suggested = {s["question_name"]: s["value"] for s in row["suggestions"]}
    assert suggested["helpfulness_rating_1"] == 4
    assert "helpfulness_rating_2" not in suggested  # null rating: no suggestion
    assert suggested["helpfulness_rationale_2"] == "bad"
    assert suggested["instruction_following_rating_2"] == 2
    settings = json.loads((tmp_path / "review.settings.json").read_text())
    names = {q["name"] for q in settings["questions"]}
    assert "truthfulness_rationale_2" in names and "honesty_rating_1" in names
    assert len(names) == 4 * 2 * 2


def test_the_dataset_schema_has_every_record_field() -> None:
    """A field added to Record but not to the schema would be dropped from every export."""
    from streamfeedback import AspectResult, Record
    from streamfeedback._tools.export import dataset_features

    features = dataset_features()
    assert set(features) == set(Record.__struct_fields__)
    assert set(features["aspects"]["honesty"]) == set(AspectResult.__struct_fields__)
