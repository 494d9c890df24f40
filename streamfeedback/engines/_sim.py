"""The built-in simulation: answers like a loaded continuous-batching engine, with no GPU.

`SimLLMEngine` has the shape of vLLM's `AsyncLLMEngine.generate` (an async generator of
request outputs, aborted by closing it), so the adapter code path is the one real engines
take. Latency model: `slots` sequences run at once; each holds a slot for
`ttft + tokens * tpot` seconds. Instant (ttft = tpot = 0) by default.

As a judge, the simulation reads the `<text k>` responses out of the annotation prompt and
answers in the UltraFeedback output format, so the real parser runs on every sim record.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import zlib
from collections.abc import AsyncIterator, Sequence
from typing import Literal

import anyio
import msgspec

from .._config import EngineConfig
from .._exceptions import EngineUnavailable
from .._records import ChatRequest, Completion

__all__ = ["SimEngine", "SimLLMEngine", "SimOutput", "SimRequestOutput", "SimSamplingParams"]

_WORDS = (
    "the answer depends on context and a careful reading shows several useful points "
    "first consider the question then weigh each option against the evidence and finally "
    "summarise what follows for the reader in clear and simple terms"
).split()


class SimSamplingParams(msgspec.Struct, kw_only=True):
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None


class SimOutput(msgspec.Struct, kw_only=True):
    text: str
    token_ids: Sequence[int]
    finish_reason: str | None


class SimRequestOutput(msgspec.Struct, kw_only=True):
    request_id: str
    prompt_token_ids: Sequence[int]
    outputs: list[SimOutput]
    finished: bool


class SimLLMEngine:
    """A stand-in for `AsyncLLMEngine`: `generate(prompt, params, request_id)` yields once."""

    def __init__(
        self,
        model: str,
        *,
        ttft: float = 0.0,
        tpot: float = 0.0,
        slots: int = 256,
        output_tokens: int = 64,
        role: Literal["generator", "judge"] = "generator",
    ) -> None:
        self.model = model
        self.ttft = ttft
        self.tpot = tpot
        self.output_tokens = output_tokens
        self.role = role
        self._slots = anyio.Semaphore(slots)
        self.running = 0
        self.peak_running = 0

    async def generate(
        self, prompt: str, sampling_params: SimSamplingParams, request_id: str
    ) -> AsyncIterator[SimRequestOutput]:
        output = self.complete(prompt, sampling_params, request_id)
        delay = self.ttft + len(output.outputs[0].token_ids) * self.tpot
        if delay > 0:
            async with self._slots:
                self.running += 1
                self.peak_running = max(self.peak_running, self.running)
                try:
                    await anyio.sleep(delay)
                finally:
                    self.running -= 1
        else:
            await anyio.lowlevel.checkpoint()
        yield output

    @property
    def instant(self) -> bool:
        return self.ttft <= 0 and self.tpot <= 0

    def answer(
        self, prompt: str, sampling_params: SimSamplingParams, request_id: str
    ) -> tuple[str, int, str]:
        """(text, completion tokens, finish reason) of a request: what `complete` reports."""
        if self.role == "judge":
            text = _judge_answer(prompt)
            return text, min(text.count(" ") + 1, sampling_params.max_tokens), "stop"
        n_tokens, finish = self._length(request_id, sampling_params)
        return self._response(prompt, n_tokens), n_tokens, finish

    def complete(
        self, prompt: str, sampling_params: SimSamplingParams, request_id: str
    ) -> SimRequestOutput:
        """The finished output for a request, without the wait (the latency model's part)."""
        text, n_tokens, finish = self.answer(prompt, sampling_params, request_id)
        return SimRequestOutput(
            request_id=request_id,
            prompt_token_ids=range(max(1, len(prompt) // 4)),
            outputs=[SimOutput(text=text, token_ids=range(n_tokens), finish_reason=finish)],
            finished=True,
        )

    def _length(self, request_id: str, params: SimSamplingParams) -> tuple[int, str]:
        """Output length: uniform in [0.5, 1.5] x `output_tokens`, fixed per request id."""
        draw = zlib.crc32(f"{self.model}\0{request_id}\0{params.seed}".encode()) % 1001
        wanted = max(1, round(self.output_tokens * (0.5 + draw / 1000)))
        if wanted >= params.max_tokens:
            return params.max_tokens, "length"
        return wanted, "stop"

    def _response(self, prompt: str, n_tokens: int) -> str:
        start = zlib.crc32(f"{self.model}\0{prompt}".encode()) % len(_WORDS)
        words = _WORD_CYCLE[start : start + max(0, n_tokens - 2)]
        return f"[sim {self.model}] {' '.join(words)}"


_WORD_CYCLE = _WORDS * (1 + 65536 // len(_WORDS))

_TEXT_MARK = re.compile(r"<text (\d+)>[ \t]?")  # only at a line start: see _judge_answer


def _judge_answer(prompt: str) -> str:
    """Rate each `<text k>` of the prompt's input section, in the UltraFeedback layout."""
    head, _, inputs = prompt.rpartition("\nTexts:\n")
    marks = [
        m for m in _TEXT_MARK.finditer(inputs) if not m.start() or inputs[m.start() - 1] == "\n"
    ]
    typed = "\nType:" in head
    blocks = []
    for i, mark in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(inputs)
        text = inputs[mark.end() : end].strip()
        rating = 1 + zlib.crc32(text.encode()) % 5
        lines = [f"#### Output for Text {mark.group(1)}"]
        if typed:
            kinds = sorted({1 + zlib.crc32(text.encode()) % 3, 1 + len(text) % 3})
            lines += [
                f"Type: {', '.join(map(str, kinds))}",
                "Rationale: simulated type judgement.",
            ]
        lines += [f"Rating: {rating}", f"Rationale: simulated rating of {len(text)} characters."]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


class SimEngine:
    """The `Engine` adapter over `SimLLMEngine`, driven like a real async engine."""

    def __init__(
        self,
        name: str,
        config: EngineConfig,
        *,
        role: Literal["generator", "judge"] = "generator",
    ) -> None:
        self.name = name
        self.config = config
        self.core = SimLLMEngine(
            config.model,
            ttft=config.sim_ttft,
            tpot=config.sim_tpot,
            slots=config.sim_slots,
            output_tokens=config.sim_output_tokens,
            role=role,
        )
        self._closed = False

    async def start(self) -> None:
        if self._closed:
            raise EngineUnavailable(self.name, "engine was closed")

    async def generate(self, request: ChatRequest) -> Completion:
        if self._closed:
            raise EngineUnavailable(self.name, "engine was closed")
        prompt = "\n\n".join(m.content for m in request.messages)
        params = SimSamplingParams(
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            seed=request.seed,
        )
        started = time.perf_counter()
        if self.core.instant:  # no latency model: skip the stream, keep one loop trip
            await asyncio.sleep(0)
            text, n_tokens, finish = self.core.answer(prompt, params, request.id)
            return Completion(
                text=text,
                prompt_tokens=max(1, len(prompt) // 4),
                completion_tokens=n_tokens,
                finish_reason=finish,
                latency_s=time.perf_counter() - started,
            )
        final: SimRequestOutput | None = None
        stream = self.core.generate(prompt, params, request.id)
        async with contextlib.aclosing(stream):  # type: ignore[type-var]
            async for output in stream:
                final = output
        assert final is not None
        out = final.outputs[0]
        return Completion(
            text=out.text,
            prompt_tokens=len(final.prompt_token_ids),
            completion_tokens=len(out.token_ids),
            finish_reason=out.finish_reason,
            latency_s=time.perf_counter() - started,
        )

    async def aclose(self) -> None:
        self._closed = True
