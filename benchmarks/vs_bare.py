"""`streamfeedback run` against a bare aiohttp client, over HTTP, alternated in one session.

    python benchmarks/vs_bare.py                        # 512 prompts, 3 rounds of each
    python benchmarks/vs_bare.py --prompts 256 --rounds 5

One server process (`over_http.py --serve`: six generator models with 64 slots each, 2 ms per
output token, the sim length rule, up to 512 tokens; the judge on the same server) answers both
clients. Each round runs the CLI (`backend = "openai"` for all seven engines, records to a file)
and `bare_client.py` (the same requests, nothing else), in alternating order, each in a fresh
process: wall time from spawn to exit, client CPU from the child's rusage. Prints each run,
then the medians and the ratios CLI / bare (targets: wall <= 1.1x, CPU per request <= 1.5x).
`--baseline-python PY` adds a third contender in the same rounds: `PY -m streamfeedback run`,
another checkout's interpreter (say, the one before a change), on the same config.
"""

from __future__ import annotations

import argparse
import json
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import over_http  # noqa: E402


def _child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _timed(argv: list[str], cwd: Path) -> tuple[float, float]:
    """Run in `cwd` (not the checkout), so `-m streamfeedback` imports the interpreter's own."""
    cpu, started = _child_cpu(), time.perf_counter()
    subprocess.run(argv, check=True, cwd=cwd)
    return time.perf_counter() - started, _child_cpu() - cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sim-tpot", type=float, default=0.002)
    parser.add_argument("--sim-ttft", type=float, default=0.0)
    parser.add_argument("--sim-output-tokens", type=int, default=256)
    parser.add_argument("--judge-latency", type=float, default=0.0)
    parser.add_argument("--judge-slots", type=int, default=64)
    parser.add_argument("--baseline-python", help="also run PY -m streamfeedback (elsewhere)")
    args = parser.parse_args()
    server_args = [
        f"--sim-tpot={args.sim_tpot}",
        f"--sim-ttft={args.sim_ttft}",
        f"--sim-output-tokens={args.sim_output_tokens}",
        f"--judge-latency={args.judge_latency}",
        f"--judge-slots={args.judge_slots}",
        "--judge-rpm=0",
    ]
    server = subprocess.Popen(
        [sys.executable, str(HERE / "over_http.py"), "--serve", *server_args],
        stdout=subprocess.PIPE,
        text=True,
    )
    runs: dict[str, list[tuple[float, float]]] = {"cli": [], "bare": []}
    if args.baseline_python:
        runs["base"] = []
    try:
        assert server.stdout is not None
        base_url = server.stdout.readline().strip()
        ns = over_http.argparse.Namespace(
            models=6, batch_size=2, judge_rpm=0, judge_slots=args.judge_slots
        )
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            with (folder / "prompts.jsonl").open("w") as fh:
                for pid, text in over_http.prompts(args.prompts):
                    fh.write(json.dumps({"id": pid, "instruction": text}) + "\n")
            config = over_http.write_config(folder, ns, base_url)
            cli = [sys.executable, "-m", "streamfeedback", "-q", "run", str(config)]
            bare = [
                sys.executable,
                str(HERE / "bare_client.py"),
                base_url,
                str(folder / "prompts.jsonl"),
                str(folder / "bare.ndjson"),
                f"--judge-concurrency={args.judge_slots}",
            ]
            argv = {"cli": cli, "bare": bare}
            if args.baseline_python:
                argv["base"] = [args.baseline_python, *cli[1:]]
            for r in range(args.rounds):
                order = list(runs) if r % 2 == 0 else list(reversed(runs))
                for who in order:
                    for leftover in folder.glob("out.ndjson*"):
                        leftover.unlink()
                    wall, cpu = _timed(argv[who], folder)
                    written = folder / ("bare.ndjson" if who == "bare" else "out.ndjson")
                    records = len(written.read_text().splitlines())
                    runs[who].append((wall, cpu))
                    print(f"round {r} {who:4s} wall_s={wall:.2f} cpu_s={cpu:.2f} records={records}")
    finally:
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=60)
    requests = args.prompts * 4  # three generations and one judge request per prompt
    med = {
        k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v))
        for k, v in runs.items()
    }
    for who, (wall, cpu) in med.items():
        print(
            f"median {who:4s} wall_s={wall:.2f} cpu_s={cpu:.2f} "
            f"cpu_ms_per_request={cpu / requests * 1e3:.3f}"
        )
    for who in [w for w in med if w != "bare"]:
        print(
            f"ratio {who}/bare: wall={med[who][0] / med['bare'][0]:.2f} "
            f"cpu={med[who][1] / med['bare'][1]:.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
