"""binarize: Zephyr-style DPO pairs, ties and nulls skipped, seeded per prompt, streaming."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest

from streamfeedback import AspectResult, Record
from streamfeedback._cli import main as cli
from streamfeedback._tools.binarize import Pair, binarize_record, scores_of

ROOT = Path(__file__).parents[2]


def rec(ratings: list[int | None], id: str = "p1", **extra: Any) -> Record:
    n = len(ratings)
    return Record(
        id=id,
        instruction=f"question {id}?",
        generations=[f"answer {i}" for i in range(n)],
        generation_models=[f"m{i}" for i in range(n)],
        ratings=ratings,
        rationales=[f"why {i}" for i in range(n)],
        ultrafeedback_model="judge",
        aspect="overall-rating",
        **extra,
    )


def pair(record: Record, **kwargs: Any) -> Pair | str:
    return binarize_record(record, scores_of(record), **kwargs)


def test_chosen_is_the_best_and_rejected_a_lower_one_as_chat_messages() -> None:
    p = pair(rec([3, 5, 1]))
    assert isinstance(p, Pair)
    assert p.chosen[0].role == "user" and p.chosen[0].content == "question p1?"
    assert p.chosen[1].role == "assistant" and p.chosen[1].content == "answer 1"
    assert p.chosen_model == "m1" and p.score_chosen == 5.0
    assert p.rejected[1].content in {"answer 0", "answer 2"}
    assert p.score_rejected < p.score_chosen
    assert p.rejected_model == f"m{p.rejected[1].content[-1]}"


def test_min_strategy_takes_the_lowest_and_the_first_of_tied_bests() -> None:
    p = pair(rec([5, 2, 5, 1, 1]), strategy="min")
    assert isinstance(p, Pair)
    assert p.chosen_model == "m0" and p.rejected_model == "m3"
    assert (p.score_chosen, p.score_rejected) == (5.0, 1.0)


def test_ties_nulls_and_single_ratings_yield_no_pair() -> None:
    assert pair(rec([4, 4, 4])) == "tie"
    assert pair(rec([4, None, 4])) == "tie"
    assert pair(rec([None, 3, None])) == "unrated"
    assert pair(rec([None, None])) == "unrated"
    p = pair(rec([None, 2, 4]))
    assert isinstance(p, Pair) and p.rejected_model == "m1" and p.chosen_model == "m2"


def test_random_choice_is_seeded_per_prompt_and_varies_with_the_seed() -> None:
    record = rec([5, 1, 2, 3, 4, 1, 2, 3], id="abc")
    first = {pair(record, seed=s).rejected_model for s in range(40)}  # type: ignore[union-attr]
    assert len(first) > 2 and "m0" not in first
    again = [pair(record, seed=7) for _ in range(3)]
    assert again[0] == again[1] == again[2]


def test_multi_aspect_records_use_the_fine_grained_score_or_an_aspect() -> None:
    aspects = {
        "honesty": AspectResult(ratings=[1, 5, 3], rationales=["a", "b", "c"]),
        "helpfulness": AspectResult(ratings=[5, 1, 3], rationales=["a", "b", "c"]),
    }
    record = rec([1, 5, 3], aspects=aspects, fine_grained_score=[3.0, 3.0, 3.5])
    by_default = binarize_record(record, scores_of(record))
    assert isinstance(by_default, Pair) and by_default.chosen_model == "m2"
    assert by_default.score_chosen == 3.5
    helpful = scores_of(record, aspect="helpfulness")
    assert helpful == [5.0, 1.0, 3.0]
    assert scores_of(record, aspect="truthfulness") is None
    assert scores_of(record, score="rating") == [1.0, 5.0, 3.0]
    assert scores_of(rec([1, 2]), score="fine-grained") is None
    assert scores_of(rec([1, 2]), aspect="overall-rating") == [1.0, 2.0]


def write_records(path: Path, records: list[Record]) -> None:
    path.write_bytes(b"".join(msgspec.json.encode(r) + b"\n" for r in records))


def test_cli_writes_pairs_and_reports_counts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "out.ndjson"
    write_records(
        src, [rec([1, 5, 3], id="a"), rec([4, 4], id="b"), rec([None, 2], id="c"), rec([2, 3])]
    )
    out = tmp_path / "pairs.jsonl"
    assert cli(["binarize", str(src), "-o", str(out), "--strategy", "min"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt_id"] for r in rows] == ["a", "p1"]
    assert set(rows[0]) == {
        "prompt",
        "prompt_id",
        "chosen",
        "rejected",
        "score_chosen",
        "score_rejected",
        "chosen_model",
        "rejected_model",
    }
    assert rows[0]["rejected"][1] == {"role": "assistant", "content": "answer 0"}
    err = capsys.readouterr().err
    assert "2 of 4 prompts yielded a pair" in err
    assert "1 with fewer than two rated" in err and "1 with every rated response tied" in err


def test_pairs_do_not_depend_on_the_order_of_the_file(tmp_path: Path) -> None:
    records = [rec([5, 1, 2, 3, 1, 2], id=f"q{i}") for i in range(30)]
    a, b = tmp_path / "a.ndjson", tmp_path / "b.ndjson"
    write_records(a, records)
    write_records(b, records[::-1])
    cli(["binarize", str(a), "-o", str(tmp_path / "pa.jsonl"), "--seed", "3"])
    cli(["binarize", str(b), "-o", str(tmp_path / "pb.jsonl"), "--seed", "3"])
    pa = sorted((tmp_path / "pa.jsonl").read_text().splitlines())
    pb = sorted((tmp_path / "pb.jsonl").read_text().splitlines())
    assert pa == pb and len(pa) == 30


def test_unreadable_line_exits_2_naming_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "out.ndjson"
    write_records(src, [rec([1, 2])])
    with src.open("ab") as fh:
        fh.write(b"\n{not json\n")
    assert cli(["binarize", str(src), "-o", str(tmp_path / "p.jsonl")]) == 2
    assert f"{src}:3" in capsys.readouterr().err


def test_reads_stdin_and_streams_a_large_file_in_a_subprocess(tmp_path: Path) -> None:
    line = msgspec.json.encode(rec([1, 4, 2, None])) + b"\n"
    result = subprocess.run(
        [sys.executable, "-m", "streamfeedback", "binarize", "-", "--strategy", "min"],
        input=line * 2000,
        capture_output=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr.decode()
    rows = io.BytesIO(result.stdout).read().splitlines()
    assert len(rows) == 2000
    assert b"2000 of 2000 prompts yielded a pair" in result.stderr


def test_quickstart_output_binarizes_with_chosen_beating_rejected_on_every_row(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out.ndjson"
    run = subprocess.run(
        [sys.executable, "-m", "streamfeedback", "run", str(ROOT / "examples/quickstart.toml")],
        capture_output=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr.decode()
    out.write_bytes(run.stdout)
    pairs = tmp_path / "pairs.jsonl"
    for strategy in ("random", "min"):
        assert cli(["binarize", str(out), "-o", str(pairs), "--strategy", strategy]) == 0
        rows = [json.loads(line) for line in pairs.read_text().splitlines()]
        assert rows
        for row in rows:
            assert row["score_chosen"] > row["score_rejected"]
            assert (
                row["chosen"][0]
                == row["rejected"][0]
                == {
                    "role": "user",
                    "content": row["prompt"],
                }
            )
            assert row["chosen"][1]["content"] != row["rejected"][1]["content"]
