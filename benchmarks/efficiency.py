"""Efficiency = ideal makespan / actual wall time, in-process and from the CLI, one workload.

The engines are the built-in simulation with a latency model like an H100 serving a 7B model
(64 sequences at once, 50 ms to first token, 10 ms per token, 128 +- 50% output tokens), six
models, three per prompt, routing batches of 2 (the seed recipe). The ideal is what a
zero-overhead client would achieve against the same engines on the same workload (see
`streamfeedback._bench`: list scheduling in arrival order per engine, then the judge).

    python benchmarks/efficiency.py                        # 600 prompts, about 20 s
    python benchmarks/efficiency.py --prompts 2000 --judge-latency 2 --judge-slots 32

In-process is `Pipeline` under uvloop, timed from entering the pipeline to the last record.
The CLI run is `streamfeedback bench` in a subprocess, timed from spawn to exit, so interpreter
start, imports and shutdown count against it. Targets (issue 6): >= 0.95 in-process and
>= 0.85 from the CLI. Exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from functools import partial

import anyio

from streamfeedback._bench import (
    BenchResult,
    JudgeModel,
    bench_config,
    configure_parser,
    ideal_makespan,
    plan_workload,
    prompt_ids,
    run_bench,
)


def _bench_argv(args: argparse.Namespace) -> list[str]:
    argv = [
        "--prompts", str(args.prompts),
        "--models", str(args.models),
        "--sim-ttft", str(args.sim_ttft),
        "--sim-tpot", str(args.sim_tpot),
        "--sim-slots", str(args.sim_slots),
        "--sim-output-tokens", str(args.sim_output_tokens),
        "--batch-size", str(args.batch_size),
    ]  # fmt: skip
    if args.judge_latency:
        argv += ["--judge-latency", str(args.judge_latency), "--judge-slots", str(args.judge_slots)]
    if args.judge_rpm:
        argv += ["--judge-rpm", str(args.judge_rpm)]
    return argv


def _cli(args: argparse.Namespace) -> tuple[float, int, str]:
    """Run `streamfeedback bench` in a subprocess: (wall seconds, records, its stdout)."""
    exe = shutil.which("streamfeedback")
    command = [exe] if exe else [sys.executable, "-m", "streamfeedback"]
    started = time.perf_counter()
    proc = subprocess.run(
        [*command, "-q", "bench", *_bench_argv(args)], capture_output=True, text=True
    )
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"streamfeedback bench failed ({proc.returncode}):\n{proc.stderr}")
    records = 0
    for line in proc.stdout.splitlines():
        key, _, value = line.partition(":")
        if key == "records":
            records = int(value)
    return wall, records, proc.stdout


def _row(label: str, ideal: float, wall: float, records: int) -> str:
    return (
        f"{label:<12} ideal_s={ideal:7.3f} actual_s={wall:7.3f} "
        f"efficiency={ideal / wall:6.3f} records={records} records_per_s={records / wall:8.1f}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    configure_parser(parser)
    parser.set_defaults(
        prompts=600, sim_ttft=0.05, sim_tpot=0.01, sim_slots=64, sim_output_tokens=128
    )
    parser.add_argument("--skip-cli", action="store_true", help="in-process only")
    args = parser.parse_args()
    config = bench_config(args)
    judge = JudgeModel(latency=args.judge_latency, slots=args.judge_slots, rpm=args.judge_rpm)
    ideal = ideal_makespan(plan_workload(config, prompt_ids(args.prompts), judge))
    print(
        f"workload: {args.prompts} prompts, {args.models} models x {config.routing.n} per prompt, "
        f"batch_size={args.batch_size}, slots={args.sim_slots}, ttft={args.sim_ttft}, "
        f"tpot={args.sim_tpot}, output={args.sim_output_tokens} tokens +-50%, "
        f"judge latency={judge.latency} slots={judge.slots} rpm={judge.rpm}"
    )
    print(
        f"ideal_s={ideal.makespan_s:.3f} lower_bound_s={ideal.lower_bound_s:.3f} "
        f"(generation {ideal.generation_s:.3f}, judge bound {ideal.judge_bound_s:.3f}, "
        f"critical path {ideal.critical_path_s:.3f})"
    )
    result: BenchResult = anyio.run(
        partial(run_bench, config, args.prompts, judge, loop=args.loop),
        backend="asyncio",
        backend_options={"use_uvloop": args.loop == "uvloop"},
    )
    ok = True
    print(_row("in-process", result.ideal_s, result.wall_s, result.records))
    utilization = " ".join(f"{n}={e.utilization:.3f}" for n, e in result.engines.items())
    print(f"{'':<12} utilization: {utilization}")
    print(
        f"{'':<12} tokens_per_s={result.tokens_per_s:.0f} "
        f"judge_requests_per_min={result.judge.requests_per_min:.0f} "
        f"peak_rss_mib={result.peak_rss_mib:.1f}"
    )
    ok &= result.records == args.prompts and result.wall_s * 0.95 <= result.ideal_s
    if not args.skip_cli:
        wall, records, _ = _cli(args)
        print(_row("cli", ideal.makespan_s, wall, records))
        ok &= records == args.prompts and wall * 0.85 <= ideal.makespan_s
    print("targets met" if ok else "a target was missed (>= 0.95 in-process, >= 0.85 cli)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
