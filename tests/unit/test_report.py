"""The report's numbers against hand-computed ones on a three-record output, and its files."""

from __future__ import annotations

import argparse
import logging
import math
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from streamfeedback import AspectResult, Record
from streamfeedback._tools import report
from streamfeedback._tools._stats import Accumulator, Summary


def rec(
    rid: str,
    models: list[str],
    ratings: list[int | None],
    *,
    tokens: list[int] | None = None,
    finish: list[str | None] | None = None,
    attempts: int = 1,
    order: list[int] | None = None,
    aspects: dict[str, AspectResult] | None = None,
) -> Record:
    return Record(
        id=rid,
        instruction=f"instruction {rid}",
        generations=[f"text {i}" for i in range(len(models))],
        generation_models=models,
        ratings=ratings,
        rationales=[None] * len(models),
        ultrafeedback_model="judge-1",
        aspect="overall-rating",
        aspects=aspects,
        judge_attempts=attempts,
        judge_order=order,
        generation_tokens=tokens,
        finish_reasons=finish,
    )


# Three prompts, models A B C. By hand:
#   A: 5, 2, 1 -> mean 8/3, sample sd sqrt(13/3); top in r1 only -> 1/3
#   B: 3, 4, 4 -> mean 11/3; top in r2 and (tied) r3 -> 2/3
#   C: 3, null, 4 -> mean 3.5 over 2 rated; top in r3 (tied) -> 1/2
#   A vs B: r1 A, r2 B, r3 B -> 1/3 over 3; A vs C: r1 A, r3 C (r2 C null) -> 1/2 over 2;
#   B vs C: ties in r1 and r3 -> 1/2 over 2. Overall: A 2/5, B 3/5, C 2/4.
#   Positions (r2 order [2,0,1], r3 order [1,2,0]): text 1 [4], text 2 [2, 1], text 3 [4, 4].
RECORDS = [
    rec("r1", ["A", "B", "C"], [5, 3, 3], tokens=[10, 20, 30], finish=["stop", "length", "stop"]),
    rec(
        "r2",
        ["A", "B", "C"],
        [2, 4, None],
        tokens=[30, 40, 50],
        finish=["stop", "stop", "length"],
        attempts=2,
        order=[2, 0, 1],
    ),
    rec(
        "r3",
        ["B", "C", "A"],
        [4, 4, 1],
        tokens=[60, 70, 80],
        finish=["stop", "stop", "length"],
        order=[1, 2, 0],
    ),
]


def summarise(records: list[Record], aspect: str | None = None) -> Summary:
    acc = Accumulator(aspect)
    for r in records:
        acc.add(r)
    return acc.summary()


def test_leaderboard_numbers_match_the_hand_computation() -> None:
    s = summarise(RECORDS)
    assert [r.model for r in s.models] == ["B", "C", "A"]
    a, b, c = (next(r for r in s.models if r.model == m) for m in "ABC")
    assert (a.responses, a.rated, a.nulls) == (3, 3, 0)
    assert (c.responses, c.rated, c.nulls) == (3, 2, 1)
    assert a.mean == pytest.approx(8 / 3)
    assert b.mean == pytest.approx(11 / 3)
    assert c.mean == pytest.approx(3.5)
    assert a.sd == pytest.approx(math.sqrt(13 / 3))
    half = 1.96 * math.sqrt(13 / 3) / math.sqrt(3)
    # the normal interval runs past both ends of the scale here; it is kept within 1-5
    assert 8 / 3 - half < 1 and 8 / 3 + half > 5
    assert a.ci95 == pytest.approx((1.0, 5.0))
    assert (a.top_share, b.top_share, c.top_share) == pytest.approx((1 / 3, 2 / 3, 1 / 2))
    assert (a.win_rate, b.win_rate, c.win_rate) == pytest.approx((2 / 5, 3 / 5, 1 / 2))
    assert (a.shared, b.shared, c.shared) == (5, 5, 4)
    assert a.tokens_mean == pytest.approx((10 + 30 + 80) / 3)
    assert (a.length_share, b.length_share, c.length_share) == pytest.approx((1 / 3, 1 / 3, 1 / 3))
    assert a.finish == {"stop": 2, "length": 1}
    assert a.histogram == {1: 1, 2: 1, 5: 1}


def test_pairwise_win_rates_are_symmetric_and_count_shared_prompts() -> None:
    s = summarise(RECORDS)
    assert s.win_rate("A", "B") == pytest.approx((1 / 3, 3))
    assert s.win_rate("B", "A") == pytest.approx((2 / 3, 3))
    assert s.win_rate("A", "C") == pytest.approx((1 / 2, 2))
    assert s.win_rate("C", "B") == pytest.approx((1 / 2, 2))
    assert s.win_rate("A", "A") is None
    assert s.win_rate("A", "Z") is None


def test_judge_health_counts_nulls_reasks_histogram_and_positions() -> None:
    s = summarise(RECORDS)
    assert (s.records, s.responses, s.nulls) == (3, 9, 1)
    assert (s.reasked, s.reasks) == (1, 1)
    assert s.histogram == {1: 1, 2: 1, 3: 2, 4: 3, 5: 1}
    assert s.shuffled == 2
    assert [(p.position, p.ratings.n, p.ratings.mean) for p in s.positions] == [
        (1, 1, 4.0),
        (2, 2, 1.5),
        (3, 2, 4.0),
    ]
    assert s.judges == ["judge-1"]


def aspects_record(rid: str, x: list[int | None], y: list[int | None]) -> Record:
    results = {
        "helpfulness": AspectResult(ratings=x, rationales=[None] * len(x), attempts=1),
        "honesty": AspectResult(ratings=y, rationales=[None] * len(y), attempts=3),
    }
    return msgspec.structs.replace(
        rec(rid, ["A", "B", "C", "D"][: len(x)], x),
        aspect="helpfulness",
        aspects=results,
        judge_attempts=3,
    )


def test_aspect_agreement_is_pearson_over_responses_rated_on_both() -> None:
    # Pairs (1,2) (2,4) (3,5) count; (4, null) does not. r = 3 / sqrt(2 * 42/9).
    s = summarise([aspects_record("r1", [1, 2], [2, 4]), aspects_record("r2", [3, 4], [5, None])])
    (row,) = s.agreement
    assert (row.first, row.second, row.n) == ("helpfulness", "honesty", 3)
    assert row.r == pytest.approx(3 / math.sqrt(2 * 42 / 9))
    by_name = {a.aspect: a for a in s.aspects}
    assert by_name["honesty"].nulls == 1 and by_name["honesty"].reasks == 4
    assert by_name["helpfulness"].reasks == 0
    assert s.reasks == 4


def test_aspect_option_ranks_on_that_aspect_and_skips_records_without_it() -> None:
    records = [aspects_record("r1", [1, 2], [2, 4]), RECORDS[0]]
    s = summarise(records, aspect="honesty")
    assert s.records == 1 and s.skipped == 1
    assert {r.model: r.mean for r in s.models} == {"A": 2.0, "B": 4.0}


def test_misaligned_record_is_rejected() -> None:
    bad = msgspec.structs.replace(RECORDS[0], ratings=[1, 2])
    with pytest.raises(ValueError, match="do not line up"):
        Accumulator().add(bad)


# The command


@pytest.fixture
def report_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Report logs, captured even when the CLI has stopped propagation to the root logger."""
    logger = logging.getLogger("streamfeedback.report")
    logger.addHandler(caplog.handler)
    caplog.handler.setLevel(logging.INFO)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        yield caplog
    finally:
        logger.removeHandler(caplog.handler)
        logger.setLevel(level)


def write(path: Path, records: list[Record], extra: bytes = b"") -> Path:
    path.write_bytes(b"".join(msgspec.json.encode(r) + b"\n" for r in records) + extra)
    return path


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    report.configure_parser(parser)
    return report.main(parser.parse_args(argv))


def table_rows(text: str, title: str) -> list[list[str]]:
    """The cells of one text table, split on runs of two or more spaces."""
    block = text.split(title, 1)[1].split("\n\n", 1)[0].splitlines()
    start = next(i for i, line in enumerate(block) if re.fullmatch(r"-[- ]*", line))
    rows = []
    for line in block[start + 1 :]:
        if not line.startswith(("mean:", "top-rated", "tokens:", "  ", "win rate of")):
            rows.append(re.split(r"\s{2,}", line.strip()))
    return rows


def test_text_report_prints_the_leaderboard(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path / "out.ndjson", RECORDS)
    assert run(str(path)) == 0
    out = capsys.readouterr().out
    rows = table_rows(out, "Leaderboard")
    assert [r[:5] for r in rows] == [
        ["1", "B", "3", "3", "3.67"],
        ["2", "C", "3", "2", "3.50"],
        ["3", "A", "3", "3", "2.67"],
    ]
    a = rows[2]
    assert a[5] == "[1.00, 5.00]", "the interval is kept within the 1-5 scale"
    assert a[6:10] == ["33.3%", "40.0%", "40.0", "33.3%"]
    assert "1.96*sd/sqrt(n)" in out
    assert "Position bias" in out and "Aspect agreement" not in out
    wins = table_rows(out, "Pairwise win rate")
    assert wins[0] == ["1", "B", "50% (2)", "67% (3)"]


def test_bad_lines_are_skipped_with_a_warning_naming_the_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], report_log: pytest.LogCaptureFixture
) -> None:
    path = write(tmp_path / "out.ndjson", RECORDS[:1], b'{"id": "torn", "instr')
    assert run(str(path)) == 0
    assert f"{path}:2: not a record" in report_log.text
    assert "Leaderboard" in capsys.readouterr().out
    assert run(str(path), "--strict") == 2
    assert f"{path}:2: not a record" in report_log.text


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"not json\n", ":1: not a record"), (b"", ": no records"), (b"\n\n", ": no records")],
)
def test_unreadable_input_exits_2_naming_the_file(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    report_log: pytest.LogCaptureFixture,
    content: bytes,
    message: str,
) -> None:
    path = tmp_path / "out.ndjson"
    path.write_bytes(content)
    assert run(str(path)) == 2
    assert f"{path}{message}" in report_log.text
    assert capsys.readouterr().out == ""


def test_missing_file_exits_2(tmp_path: Path, report_log: pytest.LogCaptureFixture) -> None:
    assert run(str(tmp_path / "nope.ndjson")) == 2
    assert "nope.ndjson: cannot open" in report_log.text


def test_gzip_input_is_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import gzip

    path = tmp_path / "out.ndjson.gz"
    path.write_bytes(gzip.compress(b"".join(msgspec.json.encode(r) + b"\n" for r in RECORDS)))
    assert run(str(path)) == 0
    assert table_rows(capsys.readouterr().out, "Leaderboard")[0][:5] == ["1", "B", "3", "3", "3.67"]


def test_png_without_matplotlib_names_the_extra(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    report_log: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(report, "_have_matplotlib", lambda: False)
    path = write(tmp_path / "out.ndjson", RECORDS)
    assert run(str(path), "--png", str(tmp_path / "plots")) == 2
    assert "pip install 'streamfeedback[report]'" in report_log.text
    assert not (tmp_path / "plots").exists()
    page = tmp_path / "r.html"
    assert run(str(path), "--html", str(page)) == 0
    assert "Leaderboard" in page.read_text() and "<img" not in page.read_text()
    capsys.readouterr()


HOSTILE = '<script>alert("x")</script>&'


def hostile_records() -> list[Record]:
    return [msgspec.structs.replace(r, generation_models=[HOSTILE, "B", "C"]) for r in RECORDS]


def test_html_escapes_the_data_and_is_self_contained(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(report, "_have_matplotlib", lambda: False)
    path = write(tmp_path / "out.ndjson", hostile_records())
    page = tmp_path / "r.html"
    assert run(str(path), "--html", str(page)) == 0
    text = page.read_text()
    assert "<script" not in text
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;" in text
    assert not re.search(r"(src|href)=\"(?!data:)", text)
    capsys.readouterr()


def test_png_and_html_files_are_written_and_non_trivial(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    records = [*hostile_records(), aspects_record("r4", [1, 2, 3], [2, 4, 5])]
    path = write(tmp_path / "out.ndjson", records)
    plots, page = tmp_path / "plots", tmp_path / "r.html"
    assert run(str(path), "--png", str(plots), "--html", str(page)) == 0
    capsys.readouterr()
    names = sorted(p.name for p in plots.iterdir())
    assert names == [
        "aspect_agreement.png",
        "histograms.png",
        "leaderboard.png",
        "position_bias.png",
        "win_rate.png",
    ]
    for png in plots.iterdir():
        data = png.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000, png
    text = page.read_text()
    assert text.count('src="data:image/png;base64,') == 5
    assert "<script" not in text and len(text) > 20000


def test_html_renders_in_headless_chromium(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium is not installed")
    pytest.importorskip("matplotlib")
    path = write(tmp_path / "out.ndjson", RECORDS)
    page = tmp_path / "r.html"
    assert run(str(path), "--html", str(page)) == 0
    capsys.readouterr()
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--screenshot={shot}",
            "--window-size=1200,2000",
            page.as_uri(),
        ],
        capture_output=True,
        timeout=60,
        check=True,
    )
    assert shot.stat().st_size > 10000


def test_na_share_is_exact_from_not_applicable() -> None:
    from streamfeedback import Record
    from streamfeedback._tools._stats import Accumulator

    stats = Accumulator()
    stats.add(
        Record(
            id="a",
            instruction="i",
            generations=["x", "y"],
            generation_models=["m1", "m2"],
            ratings=[None, 4],
            rationales=[None, "ok"],
            ultrafeedback_model="judge",
            aspect="honesty",
            not_applicable=[True, False],
        )
    )
    (row,) = stats.summary().aspects
    assert row.not_applicable == 1 and row.nulls == 1 and row.responses == 2


def test_a_confidence_interval_stays_on_the_rating_scale_and_is_unchanged_inside_it() -> None:
    from streamfeedback._tools._stats import Moments

    near_top = Moments()
    for value in (5, 5, 4):
        near_top.add(value)
    assert near_top.ci95 is not None
    assert near_top.ci95[1] == 5.0 and 3.0 < near_top.ci95[0] < near_top.mean  # type: ignore[operator]
    many = Moments()
    for value in [2, 3, 4] * 30:
        many.add(value)
    half = 1.96 * (many.sd or 0.0) / math.sqrt(90)
    assert many.ci95 == pytest.approx((3 - half, 3 + half))


def test_plots_keep_the_rating_scale_show_shared_prompts_and_flag_simulated_runs() -> None:
    pytest.importorskip("matplotlib", reason="the [report] extra is part of [dev]")
    from streamfeedback._tools.report import (
        _plot_leaderboard,
        _plot_positions,
        _plot_win_rate,
        render_html,
        render_text,
    )

    s = summarise(RECORDS)
    board = _plot_leaderboard(s)
    assert board is not None
    assert board.axes[0].get_xlim() == (1.0, 5.0)
    wins = _plot_win_rate(s)
    assert wins is not None
    labels = [t.get_text() for t in wins.axes[0].texts]
    assert labels and all("\nn=" in label for label in labels)
    names = [r.model for r in s.models]
    expected = [
        f"{wr[0]:.2f}\nn={wr[1]}"
        for a in names
        for b in names
        if (wr := s.win_rate(a, b)) is not None
    ]
    assert labels == expected, "each cell says how many prompts the pair shared"
    assert "SIMULATED" not in wins.axes[0].get_title()
    assert "Simulated run" not in render_text(s)

    simulated = summarise([msgspec.structs.replace(r, simulated=True) for r in RECORDS])
    assert render_text(simulated).startswith("Simulated run: every record came from simulated")
    assert "id=simulated" in render_html(simulated, {}, "out.ndjson")
    sim_wins = _plot_win_rate(simulated)
    assert sim_wins is not None and "SIMULATED" in sim_wins.axes[0].get_title()
    positions = _plot_positions(simulated)
    if positions is not None:
        assert positions.axes[0].get_ylim() == (1.0, 5.0)
