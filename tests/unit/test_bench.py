"""The bench's ideal makespan on hand-computed workloads, and its JSON output (no timings)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from streamfeedback._bench import (
    JudgeModel,
    Workload,
    bench_config,
    configure_parser,
    ideal_makespan,
    list_schedule,
    main,
    plan_workload,
    prompt_ids,
)

KEYS = {
    "records",
    "wall_s",
    "records_per_s",
    "tokens_per_s",
    "ideal_s",
    "lower_bound_s",
    "efficiency",
    "engines",
    "judge",
    "peak_rss_mib",
}


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    return parser.parse_args(list(argv))


def test_list_schedule_in_arrival_order() -> None:
    # slots free at 0, 0: job0 0-3, job1 0-1, job2 1-3, job3 3-5 (both slots free at 3)
    assert list_schedule([3, 1, 2, 2], 2) == [3, 1, 3, 5]


def test_list_schedule_waits_for_ready_and_spacing() -> None:
    assert list_schedule([1, 1, 1], 4, ready=[0, 0, 5]) == [1, 1, 6]
    assert list_schedule([1, 1, 1], 4, spacing=2.0) == [1, 3, 5]


def test_ideal_of_a_tiny_workload() -> None:
    # engine a (2 slots): jobs 3, 1, 2, 2 end at 3, 1, 3, 5
    # engine b (2 slots): jobs 2, 2, 4 end at 2, 2, 6
    # prompts: P0 = a0 + b0 -> ready 3; P1 = a1 + b1 -> 2; P2 = a2 + b2 -> 6; P3 = a3 -> 5
    # judge: latency 1, 1 slot: ready order 2, 3, 5, 6 -> ends 3, 4, 6, 7
    workload = Workload(
        slots={"a": 2, "b": 2},
        durations={"a": [3, 1, 2, 2], "b": [2, 2, 4]},
        tokens={"a": [3, 1, 2, 2], "b": [2, 2, 4]},
        prompts=[[("a", 0), ("b", 0)], [("a", 1), ("b", 1)], [("a", 2), ("b", 2)], [("a", 3)]],
        judge=JudgeModel(latency=1.0, slots=1),
    )
    ideal = ideal_makespan(workload)
    assert ideal.engines["a"].makespan_s == 5
    assert ideal.engines["a"].lower_bound_s == 4  # max(8 / 2, 3)
    assert ideal.engines["b"].makespan_s == 6
    assert ideal.engines["b"].lower_bound_s == 4  # max(8 / 2, 4)
    assert ideal.generation_s == 6
    assert ideal.judge_bound_s == 4  # 4 requests x 1 s on 1 slot
    assert ideal.critical_path_s == 5  # P2: its longest job 4, then the judge 1
    assert ideal.makespan_s == 7
    assert ideal.lower_bound_s == 5


def test_ideal_with_a_rate_limited_judge() -> None:
    # 60 rpm: one request a second; three prompts ready at 0 -> judge starts 0, 1, 2
    workload = Workload(
        slots={"a": 4},
        durations={"a": [0, 0, 0]},
        tokens={"a": [0, 0, 0]},
        prompts=[[("a", 0)], [("a", 1)], [("a", 2)]],
        judge=JudgeModel(latency=0.5, slots=8, rpm=60),
    )
    ideal = ideal_makespan(workload)
    assert ideal.makespan_s == 2.5
    assert ideal.judge_bound_s == 3  # 3 requests at 1 per second


def test_plan_follows_routing_and_sim_lengths() -> None:
    args = _args("--models", "4", "--sim-ttft", "0.5", "--sim-tpot", "0.01", "--sim-slots", "8")
    config = bench_config(args)
    workload = plan_workload(config, prompt_ids(10), JudgeModel())
    assert all(len(jobs) == 3 for jobs in workload.prompts)
    assert sum(len(d) for d in workload.durations.values()) == 30
    # a routing batch of 2 prompts goes to the same models
    assert [e for e, _ in workload.prompts[0]] == [e for e, _ in workload.prompts[1]]
    for name, durations in workload.durations.items():
        for duration, tokens in zip(durations, workload.tokens[name], strict=True):
            assert duration == pytest.approx(0.5 + tokens * 0.01)
            assert 32 <= tokens <= 96  # 64 x [0.5, 1.5]


def test_bench_main_prints_json(capsys: pytest.CaptureFixture[str]) -> None:
    args = _args("--prompts", "30", "--json", "--loop", "asyncio", "--sim-ttft", "0.001")
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert KEYS <= set(result)
    assert result["records"] == 30
    assert result["judge"]["requests"] == 30
    assert set(result["engines"]) == {f"sim-{i}" for i in range(6)}
    assert sum(e["requests"] for e in result["engines"].values()) == 90


def test_bench_cli_json() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "streamfeedback", "bench", "--prompts", "50", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert KEYS <= set(result)
    assert result["records"] == 50
