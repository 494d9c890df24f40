"""streamfeedback: stream prompts through a pool of LLMs and a judge, NDJSON out."""

from __future__ import annotations

# First, before the slow imports below: a quiet Ctrl-C in the CLI process (a no-op elsewhere).
from . import _early  # noqa: F401
from ._config import (
    Config,
    EngineConfig,
    GeneratorConfig,
    OutputConfig,
    PipelineConfig,
    RaterConfig,
    RoutingConfig,
    SourceConfig,
    load_config,
)
from ._exceptions import (
    ConfigError,
    EngineBusy,
    EngineError,
    EngineRequestError,
    EngineTimeout,
    EngineUnavailable,
    FileBusy,
    JudgeError,
    JudgeUnavailable,
    PoolUnavailable,
    SinkError,
    SourceError,
    StreamFeedbackError,
)
from ._pipeline import Pipeline, PipelineStatistics, RecordStream
from ._records import (
    AspectResult,
    ChatRequest,
    Completion,
    Failure,
    Generation,
    GenerationFailure,
    GenerationJob,
    Joined,
    Message,
    Prompt,
    Record,
    Substitution,
)

__version__ = "0.1.0"

__all__ = [
    "AspectResult",
    "ChatRequest",
    "Completion",
    "Config",
    "ConfigError",
    "EngineBusy",
    "EngineConfig",
    "EngineError",
    "EngineRequestError",
    "EngineTimeout",
    "EngineUnavailable",
    "Failure",
    "FileBusy",
    "Generation",
    "GenerationFailure",
    "GenerationJob",
    "GeneratorConfig",
    "Joined",
    "JudgeError",
    "JudgeUnavailable",
    "Message",
    "OutputConfig",
    "Pipeline",
    "PipelineConfig",
    "PipelineStatistics",
    "PoolUnavailable",
    "Prompt",
    "RaterConfig",
    "Record",
    "RecordStream",
    "RoutingConfig",
    "SinkError",
    "SourceConfig",
    "SourceError",
    "StreamFeedbackError",
    "Substitution",
    "__version__",
    "load_config",
]
