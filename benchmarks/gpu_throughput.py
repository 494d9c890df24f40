"""Throughput of the vLLM backend on a GPU host: every vllm generator of a config, all at once.

Each engine (one worker process per GPU, as in a real run) answers the same prompts, so the
per-GPU numbers compare directly with vLLM's own offline benchmark on that GPU.

    pip install 'streamfeedback[vllm]'
    python benchmarks/gpu_throughput.py --config examples/ultrafeedback.toml \\
        --prompts examples/prompts.jsonl --num-prompts 2000

It prints, per engine and overall: requests/s, output tokens/s, total tokens/s, and the mean
prompt and output lengths. To compare one engine with vLLM alone, run on an idle GPU:

    CUDA_VISIBLE_DEVICES=0 vllm bench throughput --model HuggingFaceH4/zephyr-7b-beta \\
        --dataset-name random --num-prompts 2000 \\
        --random-input-len <mean prompt tokens> --random-output-len <mean output tokens> \\
        --max-num-seqs <max_num_seqs> --max-num-batched-tokens <max_num_batched_tokens>

using the mean lengths and batching settings this script printed for that engine, and compare
its "output tokens/s" with ours. `vllm bench throughput` drives the engine in-process with all
prompts queued up front, so it is the ceiling; expect this backend within about 10% of it
(the gap is the pipe, the chat template and the ~1.1 x max_num_seqs in-flight bound). A much
larger gap means the engine is starved: check that the in-flight peak reached max_num_seqs.

Smoke check without a GPU, against the fake vllm package of the tests:

    PYTHONPATH=tests/fake_vllm FAKE_VLLM_DELAY=0.05 python benchmarks/gpu_throughput.py \\
        --config examples/ultrafeedback.toml --prompts examples/prompts.jsonl --num-prompts 200
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import msgspec

from streamfeedback import (
    ChatRequest,
    EngineError,
    GenerationJob,
    GeneratorConfig,
    Prompt,
    load_config,
)
from streamfeedback._stages.generation import build_request
from streamfeedback.engines._vllm import VLLMEngine, engine_args


def read_prompts(path: Path) -> list[str]:
    """A .jsonl file (field instruction, prompt or text) or plain text, one prompt per line."""
    prompts = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        if path.suffix in {".jsonl", ".ndjson", ".json"}:
            row = json.loads(line)
            text = next((row[k] for k in ("instruction", "prompt", "text") if k in row), None)
            if not isinstance(text, str):
                raise SystemExit(f"{path}: no instruction/prompt/text field in {line[:80]}")
            prompts.append(text)
        else:
            prompts.append(line)
    if not prompts:
        raise SystemExit(f"{path}: no prompts")
    return prompts


class Tally:
    def __init__(self) -> None:
        self.requests = 0
        self.failures = 0
        self.prompt_tokens = 0
        self.output_tokens = 0
        self.load_s = 0.0
        self.elapsed_s = 0.0


def _request(config: GeneratorConfig, i: int, text: str, max_tokens: int | None) -> ChatRequest:
    """The request a run sends for this prompt (the pipeline's own builder)."""
    if max_tokens:
        config = msgspec.structs.replace(config, max_tokens=max_tokens)
    prompt = Prompt(id=f"bench-{i}", instruction=text)
    return build_request(GenerationJob(prompt=prompt, models=(config.label,), slot=0), config)


async def drive(
    engine: VLLMEngine,
    config: GeneratorConfig,
    prompts: list[str],
    num_prompts: int,
    max_tokens: int | None,
    tally: Tally,
) -> None:
    """Keep `config.concurrency` requests outstanding until `num_prompts` are answered."""
    work: Iterator[tuple[int, str]] = enumerate(
        itertools.islice(itertools.cycle(prompts), num_prompts)
    )

    async def lane() -> None:
        for i, text in work:
            try:
                completion = await engine.generate(_request(config, i, text, max_tokens))
            except EngineError as exc:
                tally.failures += 1
                print(f"{engine.name}: {exc}", file=sys.stderr)
                continue
            tally.requests += 1
            tally.prompt_tokens += completion.prompt_tokens
            tally.output_tokens += completion.completion_tokens

    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(min(config.concurrency, num_prompts)):
            tg.start_soon(lane)
    tally.elapsed_s = time.perf_counter() - started


async def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    generators = [g for g in config.generators if g.backend == "vllm"]
    if args.generators:
        generators = [g for g in generators if g.label in set(args.generators)]
    if not generators:
        raise SystemExit(f"{args.config}: no vllm generators to benchmark")
    prompts = read_prompts(Path(args.prompts))
    num_prompts = args.num_prompts or len(prompts)
    engines = [VLLMEngine(g.label, g) for g in generators]
    tallies = [Tally() for _ in engines]

    async def start(engine: VLLMEngine, tally: Tally) -> None:
        began = time.perf_counter()
        await engine.start()
        tally.load_s = time.perf_counter() - began

    try:
        async with anyio.create_task_group() as tg:  # weights load in parallel, as in a run
            for engine, tally in zip(engines, tallies, strict=True):
                tg.start_soon(start, engine, tally)
        began = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for engine, g, tally in zip(engines, generators, tallies, strict=True):
                tg.start_soon(drive, engine, g, prompts, num_prompts, args.max_tokens, tally)
        wall = time.perf_counter() - began
        peaks = [engine.statistics().peak_in_flight for engine in engines]
    finally:
        with anyio.CancelScope(shield=True):
            for engine in engines:
                await engine.aclose()

    print(f"{len(engines)} engine(s), {num_prompts} prompts each, wall {wall:.1f} s")
    header = (
        f"{'engine':<28}{'gpu':>6}{'load s':>8}{'req/s':>9}{'out tok/s':>11}{'tot tok/s':>11}"
        f"{'mean in':>9}{'mean out':>9}{'peak':>6}{'fail':>6}  batching"
    )
    print(header)
    for engine, g, tally, peak in zip(engines, generators, tallies, peaks, strict=True):
        secs = max(tally.elapsed_s, 1e-9)
        done = max(tally.requests, 1)
        knobs = engine_args(g)
        print(
            f"{engine.name[:27]:<28}{','.join(map(str, g.gpu_ids)):>6}{tally.load_s:>8.1f}"
            f"{tally.requests / secs:>9.2f}{tally.output_tokens / secs:>11.1f}"
            f"{(tally.prompt_tokens + tally.output_tokens) / secs:>11.1f}"
            f"{tally.prompt_tokens / done:>9.0f}{tally.output_tokens / done:>9.0f}"
            f"{peak:>6}{tally.failures:>6}  max_num_seqs={knobs['max_num_seqs']} "
            f"max_num_batched_tokens={knobs['max_num_batched_tokens']}"
        )
    gpus = sum(len(g.gpu_ids) for g in generators)
    out_tokens = sum(t.output_tokens for t in tallies)
    requests = sum(t.requests for t in tallies)
    print(
        f"overall: {requests / wall:.2f} req/s, {out_tokens / wall:.1f} output tok/s, "
        f"{out_tokens / wall / max(gpus, 1):.1f} output tok/s per GPU ({gpus} GPUs)"
    )
    return 1 if any(t.failures for t in tallies) else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a streamfeedback TOML config")
    parser.add_argument("--prompts", required=True, help=".jsonl (instruction/prompt/text) or .txt")
    parser.add_argument("--num-prompts", type=int, default=0, help="per engine (default: the file)")
    parser.add_argument("--max-tokens", type=int, default=None, help="override the config's")
    parser.add_argument("--generators", nargs="*", help="only these generator names")
    args = parser.parse_args()
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return anyio.run(run, args)
    return anyio.run(run, args, backend_options={"use_uvloop": True})


if __name__ == "__main__":
    sys.exit(main())
