"""Pipeline overhead: records/s on instant simulated engines, on one core, uvloop vs asyncio.

With engines that answer at once, all the time goes to the pipeline itself: intake, routing,
3 generation requests and 1 judge request per record (the sim judge's answer is parsed by the
real parser), gather and record building. Each loop runs in its own child process pinned to
one core (`taskset -c 0`, where available), so the figures are per core.

    python benchmarks/overhead.py                        # 20000 prompts, uvloop and asyncio
    python benchmarks/overhead.py --prompts 50000 --loops uvloop
    python benchmarks/overhead.py --profile              # cProfile of one run, top functions

Prints records/s by wall clock and per CPU second (the second is steadier on a shared
machine). Target (issue 6): >= 5,000 records/s on one core.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import shutil
import subprocess
import sys
from functools import partial

import anyio

from streamfeedback._bench import JudgeModel, bench_config, configure_parser, run_bench


def _config(prompts: int) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    return parser.parse_args(["--prompts", str(prompts)])


def child(prompts: int, loop: str) -> None:
    """One run in this process; prints a JSON line with the figures."""
    config = bench_config(_config(prompts))
    result = anyio.run(
        partial(run_bench, config, prompts, JudgeModel(), loop=loop),
        backend="asyncio",
        backend_options={"use_uvloop": loop == "uvloop"},
    )
    figures = {
        "loop": loop,
        "records": result.records,
        "wall_s": result.wall_s,
        "cpu_s": result.cpu_s,
        "records_per_s": result.records_per_s,
        "records_per_cpu_s": result.records / result.cpu_s,
        "peak_rss_mib": result.peak_rss_mib,
    }
    print(json.dumps(figures))


def profile(prompts: int, loop: str, top: int) -> None:
    config = bench_config(_config(prompts))
    profiler = cProfile.Profile()
    profiler.enable()
    anyio.run(
        partial(run_bench, config, prompts, JudgeModel(), loop=loop),
        backend="asyncio",
        backend_options={"use_uvloop": loop == "uvloop"},
    )
    profiler.disable()
    stats = pstats.Stats(profiler)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=20000)
    parser.add_argument("--loops", nargs="+", default=["uvloop", "asyncio"])
    parser.add_argument("--core", default="0", help="CPU list for taskset")
    parser.add_argument("--profile", action="store_true", help="cProfile one in-process run")
    parser.add_argument("--top", type=int, default=30, help="functions shown by --profile")
    parser.add_argument("--child", choices=("uvloop", "asyncio"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.prompts, args.child)
        return 0
    if args.profile:
        profile(args.prompts, args.loops[0], args.top)
        return 0
    pin = ["taskset", "-c", args.core] if shutil.which("taskset") else []
    print(
        f"{args.prompts} prompts, 6 instant sim models x 3 per prompt, instant sim judge; "
        + (f"pinned to core {args.core}" if pin else "not pinned (no taskset)")
    )
    ok = True
    for loop in args.loops:
        proc = subprocess.run(
            [*pin, sys.executable, __file__, "--child", loop, "--prompts", str(args.prompts)],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            print(f"{loop}: failed\n{proc.stderr}")
            ok = False
            continue
        f = json.loads(proc.stdout.strip().splitlines()[-1])
        print(
            f"{loop:<8} records/s={f['records_per_s']:8.0f}  "
            f"records/cpu-s={f['records_per_cpu_s']:8.0f}  wall_s={f['wall_s']:6.2f}  "
            f"cpu_s={f['cpu_s']:6.2f}  peak_rss_mib={f['peak_rss_mib']:.1f}"
        )
        ok &= f["records"] == args.prompts and f["records_per_s"] >= 5000
    print("target met (>= 5000 records/s)" if ok else "target missed (>= 5000 records/s)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
