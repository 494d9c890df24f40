"""Peak RSS of a CLI run against the length of its source: memory must stay flat.

Runs `streamfeedback run` on a generated jsonl of each size, with a judge slower than the
generators (so back-pressure, not buffering, must hold the line), and prints peak RSS per
size and the ratio of the largest to the smallest. Target (issue 5/6): 200k within 1.3x of 20k.

    python benchmarks/memory.py                  # 20k and 200k prompts
    python benchmarks/memory.py --sizes 2000 20000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIG = """
[source]
path = "prompts.jsonl"
id_column = "id"
[routing]
n = 3
batch_size = 2
{generators}
[rater]
backend = "sim"
model = "slow-judge"
max_concurrency = 16
sim_ttft = {judge_latency}
sim_slots = 16
[output]
path = "out.ndjson"
failures = "failures.ndjson"
"""


def make_source(folder: Path, size: int) -> None:
    with (folder / "prompts.jsonl").open("w") as fh:
        for i in range(size):
            fh.write(json.dumps({"id": f"p{i:07d}", "instruction": f"Prompt {i}: " + "x" * 200}))
            fh.write("\n")


def run(size: int, judge_latency: float) -> tuple[float, float, int]:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_source(folder, size)
        generators = "".join(
            f'[[generators]]\nname = "m{i}"\nbackend = "sim"\nmodel = "m{i}"\n' for i in range(6)
        )
        (folder / "run.toml").write_text(
            CONFIG.format(generators=generators, judge_latency=judge_latency)
        )
        started = time.perf_counter()
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        proc = subprocess.run(
            [sys.executable, "-m", "streamfeedback", "-q", "run", str(folder / "run.toml")],
            capture_output=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            check=False,
        )
        wall = time.perf_counter() - started
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        if proc.returncode != 0:
            raise SystemExit(proc.stderr.decode())
        lines = (folder / "out.ndjson").read_bytes().count(b"\n")
        # ru_maxrss of children is the max over all children so far: run sizes in rising order
        return max(peak, before) / 1024, wall, lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 200_000])
    parser.add_argument("--judge-latency", type=float, default=0.001)
    args = parser.parse_args()
    results = []
    for size in sorted(args.sizes):
        rss, wall, lines = run(size, args.judge_latency)
        assert lines == size, f"{lines} records for {size} prompts"
        results.append((size, rss))
        print(
            f"prompts={size:>8} peak_rss_mib={rss:8.1f} wall_s={wall:7.1f} "
            f"records_per_s={size / wall:8.0f}"
        )
    ratio = results[-1][1] / results[0][1]
    print(f"rss_ratio_largest_vs_smallest={ratio:.2f} (target <= 1.30)")


if __name__ == "__main__":
    main()
