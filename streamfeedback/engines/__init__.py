"""Model backends behind one interface (`Engine`), and the factory that picks one by config."""

from __future__ import annotations

import os
from typing import Literal

from .._config import EngineConfig
from ._base import Engine, EngineStatistics
from ._fake import FakeEngine
from ._sim import SimEngine

__all__ = ["Engine", "EngineStatistics", "FakeEngine", "SimEngine", "make_engine"]


def make_engine(
    name: str,
    config: EngineConfig,
    *,
    role: Literal["generator", "judge"] = "generator",
    log_dir: str | os.PathLike[str] | None = None,
    restarts: int = 0,
) -> Engine:
    """Build (but do not start) the engine a config section asks for.

    Heavy backends are imported here, not at package import, so the CPU-only install works.
    `log_dir` and `restarts` apply to local worker processes (vllm): where their own output
    goes (default: a temporary folder) and how often a dead one is replaced.
    """
    if config.backend == "sim":
        return SimEngine(name, config, role=role)
    if config.backend == "openai":
        from ._openai import OpenAIEngine

        return OpenAIEngine(name, config)
    if config.backend == "vllm":
        from ._vllm import VLLMEngine

        return VLLMEngine(name, config, log_dir=log_dir, restarts=restarts)
    raise ValueError(f"unknown backend {config.backend!r}")
