"""`streamfeedback report` on the quickstart's output, as users run it: a real process."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
QUICKSTART = ROOT / "examples" / "quickstart.toml"


def sf(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streamfeedback", *args],
        capture_output=True,
        cwd=cwd,
        timeout=120,
        text=True,
    )


@pytest.fixture(scope="module")
def quickstart_output(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = tmp_path_factory.mktemp("quickstart")
    out = where / "out.ndjson"
    result = sf("run", str(QUICKSTART), "-o", str(out), cwd=where)
    assert result.returncode == 0, result.stderr
    return out


def expected_means(path: Path) -> dict[str, tuple[float, int]]:
    """Mean non-null rating and rated count per model, the way one would with jq."""
    ratings: dict[str, list[int]] = defaultdict(list)
    for line in path.read_text().splitlines():
        record = json.loads(line)
        for model, rating in zip(record["generation_models"], record["ratings"], strict=True):
            if rating is not None:
                ratings[model].append(rating)
    return {m: (sum(v) / len(v), len(v)) for m, v in ratings.items()}


def leaderboard(stdout: str) -> dict[str, list[str]]:
    block = stdout.split("Leaderboard", 1)[1].split("\n\n", 1)[0].splitlines()
    start = next(i for i, line in enumerate(block) if re.fullmatch(r"-[- ]*", line))
    rows = {}
    for line in block[start + 1 :]:
        if re.match(r"\d+ ", line):
            cells = re.split(r"\s{2,}", line.strip())
            rows[cells[1]] = cells
    return rows


def test_report_leaderboard_means_match_a_hand_computation(
    quickstart_output: Path, tmp_path: Path
) -> None:
    result = sf("report", str(quickstart_output), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "streamfeedback" not in result.stdout.split("Leaderboard", 1)[0]
    rows = leaderboard(result.stdout)
    expected = expected_means(quickstart_output)
    assert set(rows) == set(expected)
    for model, (mean, rated) in expected.items():
        assert rows[model][3] == str(rated)
        assert math.isclose(float(rows[model][4]), mean, abs_tol=0.005), model
    ranked = sorted(expected, key=lambda m: (-expected[m][0], m))
    assert [rows[m][0] for m in ranked] == [str(i) for i in range(1, len(ranked) + 1)]
    for section in ("Pairwise win rate", "Judge health", "Rating histogram"):
        assert section in result.stdout


def test_report_writes_the_plots_and_the_page(quickstart_output: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    plots, page = tmp_path / "plots", tmp_path / "report.html"
    result = sf(
        "report", str(quickstart_output), "--png", str(plots), "--html", str(page), cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert {p.name for p in plots.iterdir()} >= {
        "leaderboard.png",
        "histograms.png",
        "win_rate.png",
    }
    assert all(p.stat().st_size > 5000 for p in plots.iterdir())
    text = page.read_text()
    assert text.startswith("<!DOCTYPE html>") and text.count("data:image/png;base64,") >= 3


def test_report_on_a_missing_file_exits_2(tmp_path: Path) -> None:
    result = sf("report", "missing.ndjson", cwd=tmp_path)
    assert result.returncode == 2
    assert "missing.ndjson" in result.stderr and result.stdout == ""
