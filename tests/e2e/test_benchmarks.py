"""The benchmark scripts still run and print their figures (tiny sizes; nothing is timed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _run(script: str, *args: str, timeout: float = 120) -> str:
    result = subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_overhead_child_reports_every_record() -> None:
    line = _run("overhead.py", "--child", "uvloop", "--prompts", "300").strip().splitlines()[-1]
    figures = json.loads(line)
    assert figures["records"] == 300 and figures["records_per_s"] > 0


def test_parser_benchmark_compares_the_shortcut_with_the_general_reading() -> None:
    out = _run("parser.py", "--rounds", "200")
    assert "shortcut speed-up:" in out and "untidy answer" in out


def test_memory_benchmark_prints_the_rss_ratio() -> None:
    out = _run("memory.py", "--sizes", "200", "400")
    assert "rss_ratio_largest_vs_smallest=" in out


def test_over_http_in_process_sees_no_429_and_every_token_planned() -> None:
    out = _run(
        "over_http.py", "--prompts", "24", "--in-process", "--sim-ttft", "0.01", "--sim-tpot", "0"
    )
    assert "records=24 " in out and " 429s=0 " in out
    tokens = out.split("(tokens ")[1].split(")")[0]
    got, planned = tokens.split(", planned ")
    assert got == planned


@pytest.mark.skipif(sys.platform != "linux", reason="pins cores with sched_setaffinity")
def test_http_client_benchmark_prints_both_paths() -> None:
    out = _run("http_client.py", "--requests", "120", "--concurrency", "8", "--rounds", "2")
    assert "OpenAIEngine.generate" in out and "aiohttp transport" in out
    assert "ms CPU per request" in out


def test_vs_bare_runs_the_cli_and_the_bare_client_on_one_server() -> None:
    out = _run("vs_bare.py", "--prompts", "16", "--rounds", "1", "--sim-tpot", "0")
    assert out.count("records=16") == 2 and "ratio cli/bare: wall=" in out


@pytest.mark.skipif(sys.platform != "linux", reason="pins cores with sched_setaffinity")
def test_requests_per_s_prints_both_figures() -> None:
    out = _run("requests_per_s.py", "--requests", "200", "--prompts", "20")
    assert "OpenAIEngine.generate: 200 requests" in out
    assert "streamfeedback run: 20 records x 4 requests" in out


def test_kill_resume_benchmark_prints_what_the_rerun_redid() -> None:
    out = _run("kill_resume.py", "--prompts", "12", "--kill-after", "0.3")
    assert "redone=" in out and "records 12/12" in out
