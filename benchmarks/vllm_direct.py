"""The vLLM backend against `AsyncLLMEngine` used directly, on the same requests.

Both engines are loaded side by side with the same engine arguments: the backend's (a worker
process behind a pipe, as in a run) and one in this process. Each round sends the same batch
of chat requests to one and then the other (the order alternates between rounds), and
prints output tokens/s for both and their ratio; the summary is the median ratio (goal: the
backend at >= 0.95 of direct). Runs anywhere vLLM runs; without `--model` it builds the tiny
random model of `streamfeedback.testing.tiny_model` (on a CPU, with vLLM's CPU build):

    VLLM_CPU_KVCACHE_SPACE=1 python benchmarks/vllm_direct.py --rounds 6 --requests 128
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import statistics
import sys
import time
from typing import Any

import msgspec

from streamfeedback import ChatRequest, GeneratorConfig, Message
from streamfeedback.engines._vllm import VLLMEngine, engine_args


def _requests(n: int, max_tokens: int, round_: int) -> list[ChatRequest]:
    return [
        ChatRequest(
            id=f"r{round_}-{i}",
            messages=[Message("user", f"Write a few sentences about the number {i}.")],
            max_tokens=max_tokens,
            temperature=0.0,
            seed=i,
        )
        for i in range(n)
    ]


# vLLM logs to stdout by default; the figures are this script's stdout.
os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")


class Direct:
    """AsyncLLMEngine in this process, fed exactly as the worker feeds it."""

    def __init__(self, model: str, args: dict[str, Any]) -> None:
        import vllm
        from vllm.sampling_params import RequestOutputKind

        self.vllm = vllm
        self.kind = RequestOutputKind.FINAL_ONLY
        self.engine = vllm.AsyncLLMEngine.from_engine_args(
            vllm.AsyncEngineArgs(model=model, **args)
        )
        self.tokenizer = self.engine.get_tokenizer()

    async def generate(self, request: ChatRequest) -> int:
        ids = self.tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in request.messages],
            add_generation_prompt=True,
            tokenize=True,
        )
        if not isinstance(ids, list):
            ids = list(ids["input_ids"])
        (prompt,) = self.engine.renderer.render_cmpl([self.vllm.TokensPrompt(prompt_token_ids=ids)])
        params = self.vllm.SamplingParams(
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            seed=request.seed,
            output_kind=self.kind,
        )
        final: Any = None
        stream = self.engine.generate(prompt, params, request.id)
        async with contextlib.aclosing(stream):
            async for output in stream:
                final = output
        return len(final.outputs[0].token_ids)

    def close(self) -> None:
        self.engine.shutdown()
        self.engine = None
        gc.collect()


async def _timed(generate: Any, requests: list[ChatRequest]) -> tuple[float, int]:
    started = time.perf_counter()
    counts = await asyncio.gather(*(generate(r) for r in requests))
    return time.perf_counter() - started, sum(counts)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a model folder or Hub id (default: the tiny model)")
    parser.add_argument("--rounds", type=int, default=6, help="pairs (backend, direct)")
    parser.add_argument("--requests", type=int, default=128, help="requests per round")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    opts = parser.parse_args()
    model = opts.model
    if model is None:
        from streamfeedback.testing.tiny_model import tiny_model

        model = str(tiny_model())
    config = msgspec.convert(
        {
            "backend": "vllm",
            "model": model,
            "gpu": 0,
            "max_model_len": 2048,
            "max_num_seqs": opts.max_num_seqs,
            "enforce_eager": True,
        },
        GeneratorConfig,
    )
    backend = VLLMEngine("backend", config)
    await backend.start()
    direct = Direct(model, engine_args(config))

    async def via_backend(request: ChatRequest) -> int:
        return (await backend.generate(request)).completion_tokens

    # one warm-up round each, not counted
    await _timed(via_backend, _requests(opts.requests, opts.max_tokens, -1))
    await _timed(direct.generate, _requests(opts.requests, opts.max_tokens, -2))
    ratios = []
    try:
        for r in range(opts.rounds):
            requests = _requests(opts.requests, opts.max_tokens, r)
            order = [("backend", via_backend), ("direct", direct.generate)]
            if r % 2:
                order.reverse()
            rates: dict[str, float] = {}
            for label, generate in order:
                seconds, tokens = await _timed(generate, requests)
                rates[label] = tokens / seconds
            ratio = rates["backend"] / rates["direct"]
            ratios.append(ratio)
            print(
                f"round {r}: backend {rates['backend']:.0f} tok/s, direct "
                f"{rates['direct']:.0f} tok/s, ratio {ratio:.3f}",
                flush=True,
            )
    finally:
        await backend.aclose()
        direct.close()
    print(
        f"median ratio backend/direct over {len(ratios)} pairs: {statistics.median(ratios):.3f}"
        f" (min {min(ratios):.3f}, max {max(ratios):.3f}); {opts.requests} requests x "
        f"{opts.max_tokens} tokens per round, max_num_seqs {opts.max_num_seqs}"
    )


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
