"""The pipeline over real HTTP: six generators and a judge behind an OpenAI-compatible server.

A server process on 127.0.0.1 (`streamfeedback.testing.OpenAIServer`) answers for six
generator models and the judge with the sim latency model: each generator serves `slots`
requests at once and holds a slot for `ttft + tokens * tpot`, with the sim engine's own
output-length rule (keyed on the prompt text, which is what the server sees); the judge
(`judge_handler`, untidy answers, none broken) serves `judge-slots` at once, `judge-latency`
each, behind a strict sliding-window limit of `judge-rpm` (`rate_limited`, 429 beyond it).
`streamfeedback run` drives it through the `openai` backends (aiohttp, real sockets), so
client overhead, interpreter start included, is in the figures.

    python benchmarks/over_http.py                              # 600 prompts, judge at 4800/min
    python benchmarks/over_http.py --prompts 2000 --judge-rpm 0 # no rate limit
    python benchmarks/over_http.py --in-process                 # Pipeline under uvloop instead

Prints records/s, generated tokens/s, efficiency against the ideal makespan of the server's
own latency model (see `streamfeedback._bench`), judge requests/min against the limit, and
the server's 429 count (target: 0).
"""

from __future__ import annotations

import argparse
import collections
import json
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import msgspec

from streamfeedback import Pipeline, load_config
from streamfeedback._bench import (
    JudgeModel,
    ideal_makespan,
    plan_workload,
)
from streamfeedback.engines._sim import SimLLMEngine, SimSamplingParams
from streamfeedback.testing import (
    Handler,
    OpenAIServer,
    Reply,
    Request,
    judge_handler,
    rate_limited,
)

JUDGE = "sim-judge"


def _words(n: int) -> str:
    return " ".join(f"w{i % 97}" for i in range(n))


class SimServer:
    """Routes by model: generators with slots and the sim length rule, the judge with its own."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.cores = {
            m: SimLLMEngine(m, output_tokens=args.sim_output_tokens) for m in _models(args)
        }
        self.slots = {m: anyio.Semaphore(args.sim_slots) for m in self.cores}
        self.judge_slots = anyio.Semaphore(args.judge_slots)
        self.judge_inner = judge_handler(broken=0.0)
        self.limited = rate_limited(self._judge, args.judge_rpm or 1.0, window=args.window)
        self.judge: Handler = self.limited if args.judge_rpm else self._judge
        self.judge_starts: list[float] = []

    async def __call__(self, request: Request) -> Reply:
        model = request.model or ""
        if model == JUDGE:
            return await _await(self.judge(request))
        core = self.cores[model]
        seed = request.body.get("seed") if isinstance(request.body, dict) else None
        params = SimSamplingParams(max_tokens=request.max_tokens or 512, seed=seed)
        tokens, finish = core._length(request.prompt, params)
        async with self.slots[model]:
            await anyio.sleep(self.args.sim_ttft + tokens * self.args.sim_tpot)
        return Reply(text=_words(tokens), completion_tokens=tokens, finish_reason=finish)

    async def _judge(self, request: Request) -> Reply:
        async with self.judge_slots:
            self.judge_starts.append(time.monotonic())
            await anyio.sleep(self.args.judge_latency)
        return await _await(self.judge_inner(request))


async def _await(value: Any) -> Any:
    return await value if not isinstance(value, Reply) else value


def _models(args: argparse.Namespace) -> list[str]:
    return [f"gen-{i}" for i in range(args.models)]


async def serve(args: argparse.Namespace) -> None:
    """Serve until SIGTERM; print the base URL first and the server's counts last."""
    handler = SimServer(args)
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with OpenAIServer(handler, models=[*_models(args), JUDGE]) as server:
            print(server.base_url, flush=True)
            async for _ in signals:
                break
    by_model = collections.Counter(r.model for r in server.requests)
    print(
        json.dumps(
            {
                "status_counts": dict(server.status_counts),
                "connections": server.connections,
                "requests_by_model": dict(by_model),
                "judge_starts": handler.judge_starts,
                "rejected": handler.limited.rejected,
            }
        ),
        flush=True,
    )


def write_config(folder: Path, args: argparse.Namespace, base_url: str) -> Path:
    generators = "".join(
        f'[[generators]]\nname = "{m}"\nbackend = "openai"\nmodel = "{m}"\n'
        f'base_url = "{base_url}"\nmax_tokens = 512\nmax_concurrency = 256\n'
        for m in _models(args)
    )
    rpm = f"requests_per_minute = {args.judge_rpm}\n" if args.judge_rpm else ""
    (folder / "http.toml").write_text(
        f'[source]\npath = "prompts.jsonl"\nid_column = "id"\n'
        f"[routing]\nn = 3\nbatch_size = {args.batch_size}\nseed = 0\n"
        f"{generators}"
        f'[rater]\nbackend = "openai"\nmodel = "{JUDGE}"\nbase_url = "{base_url}"\n'
        f"max_concurrency = {args.judge_slots}\n{rpm}"
        f'[output]\npath = "out.ndjson"\nfailures = "failures.ndjson"\n'
    )
    return folder / "http.toml"


def prompts(count: int) -> list[tuple[str, str]]:
    return [(f"p{i:07d}", f"HTTP benchmark prompt {i}: explain item {i}.") for i in range(count)]


async def in_process(path: Path) -> tuple[int, int]:
    """Run the config's pipeline here; (records, generated tokens)."""
    records = tokens = 0
    async with Pipeline(load_config(path)) as pipeline:
        async for record in pipeline.run():
            records += 1
            tokens += sum(record.generation_tokens or [])
    return records, tokens


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=600)
    parser.add_argument("--models", type=int, default=6)
    parser.add_argument("--sim-ttft", type=float, default=0.05)
    parser.add_argument("--sim-tpot", type=float, default=0.01)
    parser.add_argument("--sim-slots", type=int, default=64)
    parser.add_argument("--sim-output-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--judge-latency", type=float, default=0.2)
    parser.add_argument("--judge-slots", type=int, default=32)
    parser.add_argument("--judge-rpm", type=float, default=4800, help="0: no limit")
    parser.add_argument("--window", type=float, default=60.0, help="server's sliding window")
    parser.add_argument("--in-process", action="store_true", help="Pipeline, not the CLI")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        anyio.run(serve, args, backend_options={"use_uvloop": True})
        return 0

    server_argv = [a for a in sys.argv[1:] if a != "--in-process"]
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", *server_argv],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        base_url = server.stdout.readline().strip()
        if not base_url:
            raise SystemExit("the server did not start")
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            items = prompts(args.prompts)
            with (folder / "prompts.jsonl").open("w") as fh:
                for pid, text in items:
                    fh.write(json.dumps({"id": pid, "instruction": text}) + "\n")
            path = write_config(folder, args, base_url)
            started = time.perf_counter()
            cpu = _cpu()
            if args.in_process:
                records, tokens = anyio.run(in_process, path, backend_options={"use_uvloop": True})
                wall = time.perf_counter() - started
                cpu = _cpu() - cpu
            else:
                subprocess.run(
                    [sys.executable, "-m", "streamfeedback", "-q", "run", str(path)], check=True
                )
                wall = time.perf_counter() - started
                cpu = _cpu() - cpu
                lines = (folder / "out.ndjson").read_text().splitlines()
                records = len(lines)
                tokens = sum(sum(json.loads(x).get("generation_tokens") or []) for x in lines)
            config = load_config(path)
    finally:
        server.send_signal(signal.SIGTERM)
        tail, _ = server.communicate(timeout=30)
    stats = json.loads(tail.strip().splitlines()[-1])

    texts = dict(items)

    def length(key: str, g: Any) -> int:
        core = SimLLMEngine(g.model, output_tokens=args.sim_output_tokens)
        params = SimSamplingParams(max_tokens=g.max_tokens, seed=g.seed)
        return core._length(texts[key.rsplit(":", 1)[0]], params)[0]

    judge = JudgeModel(
        latency=args.judge_latency, slots=args.judge_slots, rpm=args.judge_rpm or None
    )
    plan = plan_workload(
        _sim_slots(config, args.sim_slots, args.sim_ttft, args.sim_tpot),
        [pid for pid, _ in items],
        judge,
        length=length,
    )
    ideal = ideal_makespan(plan)
    starts = sorted(stats["judge_starts"])
    span = starts[-1] - starts[0] if len(starts) > 1 else 0.0
    judge_rpm = (len(starts) - 1) * 60 / span if span > 0 else 0.0
    busiest = _max_in_window(starts, args.window)
    planned_tokens = sum(sum(t) for t in plan.tokens.values())
    how = "Pipeline in-process" if args.in_process else "streamfeedback run (startup counted)"
    print(f"{args.prompts} prompts over HTTP, {args.models} openai generators + judge; {how}")
    print(
        f"records={records} wall_s={wall:.3f} records_per_s={records / wall:.1f} "
        f"tokens_per_s={tokens / wall:.0f} (tokens {tokens}, planned {planned_tokens})"
    )
    print(
        f"ideal_s={ideal.makespan_s:.3f} lower_bound_s={ideal.lower_bound_s:.3f} "
        f"efficiency={ideal.makespan_s / wall:.3f} client_cpu_s={cpu:.2f}"
    )
    limit = f"{args.judge_rpm:g}" if args.judge_rpm else "none"
    print(
        f"judge: requests={len(starts)} requests_per_min={judge_rpm:.0f} (limit {limit}) "
        f"most_in_{args.window:g}s={busiest} 429s={stats['status_counts'].get('429', 0)} "
        f"http_connections={stats['connections']}"
    )
    return 0 if records == args.prompts and not stats["rejected"] else 1


def _cpu() -> float:
    """CPU seconds of this process and its finished children (the CLI run): the client."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _max_in_window(times: list[float], window: float) -> int:
    """The most request starts in any half-open window of `window` seconds."""
    most, first = 0, 0
    for last, t in enumerate(times):
        while times[first] <= t - window:
            first += 1
        most = max(most, last - first + 1)
    return most


def _sim_slots(config: Any, slots: int, ttft: float, tpot: float) -> Any:
    """The run's config with the server's latency model on each generator, for the plan."""
    generators = [
        msgspec.structs.replace(g, sim_slots=slots, sim_ttft=ttft, sim_tpot=tpot)
        for g in config.generators
    ]
    return msgspec.structs.replace(config, generators=generators)


if __name__ == "__main__":
    raise SystemExit(main())
