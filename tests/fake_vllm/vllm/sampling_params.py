"""Stand-in for `vllm.sampling_params`: the parts the worker uses, with vLLM's defaults."""

from __future__ import annotations

import enum
from typing import Any


class RequestOutputKind(enum.Enum):
    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


class SamplingParams:
    """Keyword-only like vLLM's msgspec Struct; `max_tokens` defaults to 16 as there."""

    def __init__(
        self,
        *,
        max_tokens: int | None = 16,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE,
        **extra: Any,
    ) -> None:
        if extra:
            raise TypeError(f"unexpected SamplingParams fields: {sorted(extra)}")
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}.")
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.seed = seed
        self.output_kind = output_kind
