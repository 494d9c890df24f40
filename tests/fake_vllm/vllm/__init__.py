"""A stand-in `vllm` package for tests on machines without a GPU.

It mirrors the public API the worker uses (vLLM 0.11+: `AsyncEngineArgs`, `AsyncLLMEngine`
with `from_engine_args`, `get_tokenizer`, async-generator `generate` and `shutdown`,
`SamplingParams`, `TokensPrompt`, `RequestOutputKind`), and it misbehaves like vLLM where that
matters: it prints to stdout, `max_tokens` defaults to 16, and a prompt that leaves no room
for one output token raises ValueError.

Observable through environment variables, read when used:

    FAKE_VLLM_LOG          append one JSON line per event (import, build, built, request,
                           finish, abort, shutdown) to this file
    FAKE_VLLM_DELAY        seconds each request takes (so tests can see many in flight)
    FAKE_VLLM_BUILD_DELAY  seconds `from_engine_args` takes (weights loading)
    FAKE_VLLM_FAIL_START   raise RuntimeError with this text from `from_engine_args`
    FAKE_VLLM_CORE         `from_engine_args` starts a child process (like vLLM's engine
                           core) and logs its pid as a "core" event
    FAKE_VLLM_DIE_AFTER    os._exit(3) when the N-th request arrives (a crashed worker)
    FAKE_VLLM_DEAD_AFTER   the N-th request raises EngineDeadError (vLLM's engine core died)
    FAKE_VLLM_SYNC_TOKENIZER  `get_tokenizer()` returns the tokenizer (newer vLLM) instead of
                           a coroutine (early V1)
    FAKE_VLLM_TEMPLATE_DICT  `apply_chat_template` returns {"input_ids": [...]} (transformers 5)
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import subprocess
import sys
import time
import zlib
from collections.abc import AsyncIterator
from typing import Any

from .inputs import TokensPrompt
from .sampling_params import RequestOutputKind, SamplingParams

__version__ = "0.0.0+fake"

__all__ = [
    "AsyncEngineArgs",
    "AsyncLLMEngine",
    "CompletionOutput",
    "RequestOutput",
    "RequestOutputKind",
    "SamplingParams",
    "TokensPrompt",
]

NATURAL_LENGTH = 12
DEFAULT_MAX_MODEL_LEN = 2048
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def log(event: str, **fields: Any) -> None:
    path = os.environ.get("FAKE_VLLM_LOG")
    if not path:
        return
    line = json.dumps({"event": event, "pid": os.getpid(), "t": time.time(), **fields}) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


log("import", cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"))


class EngineDeadError(Exception):
    """As `vllm.v1.engine.exceptions.EngineDeadError`: the engine core process is gone."""


@dataclasses.dataclass
class AsyncEngineArgs:
    model: str
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    dtype: str = "auto"
    seed: int | None = None
    enforce_eager: bool = False
    trust_remote_code: bool = False
    download_dir: str | None = None
    quantization: str | None = None
    enable_log_requests: bool = False
    disable_log_stats: bool = False


@dataclasses.dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool


def _token(word: str) -> int:
    return zlib.crc32(word.encode()) % 32000


class _Tokenizer:
    def apply_chat_template(
        self,
        messages: list[dict[str, str]],
        *,
        add_generation_prompt: bool = False,
        tokenize: bool = True,
    ) -> Any:
        for m in messages:  # like a Jinja template's raise_exception (a TemplateError)
            if m["role"] not in {"system", "user", "assistant"}:
                raise RuntimeError(f"Conversation roles must be system/user/assistant: {m['role']}")
        text = "".join(f"<|{m['role']}|>{m['content']}" for m in messages)
        if add_generation_prompt:
            text += "<|assistant|>"
        if not tokenize:
            return text
        ids = [_token(f"<|{m['role']}|>") for m in messages]
        for m in messages:
            ids.extend(_token(word) for word in m["content"].split())
        if add_generation_prompt:
            ids.append(_token("<|assistant|>"))
        if os.environ.get("FAKE_VLLM_TEMPLATE_DICT"):
            return {"input_ids": ids, "attention_mask": [1] * len(ids)}
        return ids


class AsyncLLMEngine:
    """One engine. Counts requests in flight, as vLLM's scheduler would see them."""

    def __init__(self, args: AsyncEngineArgs) -> None:
        self.args = args
        self.max_model_len = args.max_model_len or DEFAULT_MAX_MODEL_LEN
        self.running = 0
        self.arrived = 0
        self.errored = False
        self._tokenizer = _Tokenizer()

    @classmethod
    def from_engine_args(cls, engine_args: AsyncEngineArgs) -> AsyncLLMEngine:
        log(
            "build",
            cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
            args=dataclasses.asdict(engine_args),
        )
        if os.environ.get("FAKE_VLLM_CORE"):
            core = subprocess.Popen(
                [sys.executable, "-c", "import time; time.sleep(600)"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
            )
            log("core", core=core.pid)
        sys.stdout.write("INFO fake vllm: loading weights (must not reach the protocol)\n")
        sys.stdout.flush()
        os.write(1, b"raw bytes on fd 1 from a C extension\n")
        time.sleep(float(os.environ.get("FAKE_VLLM_BUILD_DELAY") or 0))
        failure = os.environ.get("FAKE_VLLM_FAIL_START")
        if failure:
            raise RuntimeError(failure)
        engine = cls(engine_args)
        log("built")
        return engine

    def get_tokenizer(self) -> Any:
        if os.environ.get("FAKE_VLLM_SYNC_TOKENIZER"):
            return self._tokenizer

        async def tokenizer() -> _Tokenizer:
            return self._tokenizer

        return tokenizer()

    async def generate(
        self, prompt: TokensPrompt, sampling_params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        ids = list(prompt["prompt_token_ids"])
        if len(ids) + 1 > self.max_model_len:
            raise ValueError(
                f"The decoder prompt (length {len(ids)}) plus the number of requested output "
                f"tokens (at least 1) is longer than the maximum model length of "
                f"{self.max_model_len}."
            )
        self.arrived += 1
        die_after = int(os.environ.get("FAKE_VLLM_DIE_AFTER") or 0)
        if die_after and self.arrived >= die_after:
            log("die", arrived=self.arrived)
            os._exit(3)
        dead_after = int(os.environ.get("FAKE_VLLM_DEAD_AFTER") or 0)
        if dead_after and self.arrived >= dead_after:
            self.errored = True
            raise EngineDeadError("EngineCore encountered an issue. See stack trace for the cause.")
        limit = sampling_params.max_tokens or 16
        n_tokens = min(limit, NATURAL_LENGTH)
        finish = "length" if limit < NATURAL_LENGTH else "stop"
        words = [WORDS[(len(ids) + i) % len(WORDS)] for i in range(n_tokens)]
        delay = float(os.environ.get("FAKE_VLLM_DELAY") or 0)
        final_only = sampling_params.output_kind == RequestOutputKind.FINAL_ONLY
        self.running += 1
        log(
            "request",
            request_id=request_id,
            max_tokens=sampling_params.max_tokens,
            output_kind=sampling_params.output_kind.name,
            prompt_tokens=len(ids),
            in_flight=self.running,
        )
        sys.stdout.write(f"INFO fake vllm: added request {request_id}\n")
        done = False
        try:
            for step in range(1, n_tokens + 1):
                if delay:
                    await asyncio.sleep(delay / n_tokens)
                else:
                    await asyncio.sleep(0)
                finished = step == n_tokens
                if final_only and not finished:
                    continue
                output = RequestOutput(
                    request_id=request_id,
                    prompt_token_ids=ids,
                    outputs=[
                        CompletionOutput(
                            index=0,
                            text=" ".join(words[:step]),
                            token_ids=[_token(w) for w in words[:step]],
                            finish_reason=finish if finished else None,
                        )
                    ],
                    finished=finished,
                )
                if finished:
                    self.running -= 1
                    done = True
                    log("finish", request_id=request_id, in_flight=self.running)
                yield output
        except (asyncio.CancelledError, GeneratorExit):
            if not done:
                self.running -= 1
                done = True
                log("abort", request_id=request_id, in_flight=self.running)
            raise

    def shutdown(self) -> None:
        log("shutdown", in_flight=self.running)
