"""The exception tree of streamfeedback.

    StreamFeedbackError              base; the CLI catches it
    ├── ConfigError                  bad config: names the file and the key (exit 2)
    ├── SourceError                  bad input: names the file and the line (exit 2 when fatal)
    ├── EngineError                  one request of one engine failed
    │   ├── EngineTimeout            the engine did not answer in time (retryable)
    │   ├── EngineBusy               rate limited / overloaded (retryable)
    │   ├── EngineRequestError       the request itself is bad (too long, refused): not retryable
    │   └── EngineUnavailable        gone or cannot start: not retryable (what stops the run: below)
    ├── JudgeError                   the judge could not rate a prompt
    │   └── JudgeUnavailable         the judge is unusable (bad key, missing model): fatal
    └── SinkError                    the output cannot be written (stdout closed, disk full)
        └── FileBusy                 another run holds the output or spool file (names its pid)

Per-prompt failures (EngineError, JudgeError) become failure records; the rest stop the run.
`EngineUnavailable` stops the run only where no other model can stand in: an engine that cannot
start stops it before the first prompt, and the judge's becomes `JudgeUnavailable`. A generator
that becomes unavailable mid-run fails like any other request: its prompts go to substitutes
(`[routing] on_generation_failure = "reroute"`) or to the failures file, and it leaves routing
for `[routing] cooldown` seconds; the run goes on with the other models.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "EngineBusy",
    "EngineError",
    "EngineRequestError",
    "EngineTimeout",
    "EngineUnavailable",
    "FileBusy",
    "JudgeError",
    "JudgeUnavailable",
    "SinkError",
    "SourceError",
    "StreamFeedbackError",
]


class StreamFeedbackError(Exception):
    """Base of every error streamfeedback raises on purpose."""


class ConfigError(StreamFeedbackError):
    """The config file is unreadable or invalid: names the file and, where known, the key."""

    def __init__(self, path: str, key: str | None, message: str) -> None:
        self.path = path
        self.key = key
        self.message = message
        where = f"{path}: {key}" if key else path
        super().__init__(f"{where}: {message}")


class SourceError(StreamFeedbackError):
    """The prompt source is missing or malformed: names the file and, where known, the line."""

    def __init__(self, path: str, line: int | None, message: str) -> None:
        self.path = path
        self.line = line
        self.message = message
        where = f"{path}:{line}" if line is not None else path
        super().__init__(f"{where}: {message}")


class EngineError(StreamFeedbackError):
    """One request to one engine failed."""

    retryable = False

    def __init__(self, engine: str, message: str, *, status: int | None = None) -> None:
        self.engine = engine
        self.status = status
        super().__init__(f"{engine}: {message}")


class EngineTimeout(EngineError):
    """The engine did not answer in time."""

    retryable = True


class EngineBusy(EngineError):
    """The engine is rate limited or overloaded; try again later."""

    retryable = True

    def __init__(
        self,
        engine: str,
        message: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(engine, message, status=status)
        self.retry_after = retry_after


class EngineRequestError(EngineError):
    """The engine refused this request (too long, invalid): asking again will not help."""


class EngineUnavailable(EngineError):
    """The engine is gone or could not start: asking it again will not help. Fatal at start
    and for the judge; a generator's prompts go to other models (see the module docstring)."""


class JudgeError(StreamFeedbackError):
    """The judge could not rate one prompt."""


class JudgeUnavailable(JudgeError):
    """The judge cannot be used at all (bad key, missing model): stops the run."""


class SinkError(StreamFeedbackError):
    """Records cannot be written (stdout closed, disk full).

    `reader_gone` is true when the reader of a pipe went away (`| head -1`): normal in a
    pipeline, so the CLI stops quietly then.
    """

    def __init__(self, message: str, *, reader_gone: bool = False) -> None:
        super().__init__(message)
        self.reader_gone = reader_gone


class FileBusy(SinkError):
    """Another run holds the file (the output or the spool): two runs on one file would do
    every prompt twice."""

    def __init__(self, path: str, pid: int | None) -> None:
        self.path = path
        self.pid = pid
        who = f"another run (pid {pid})" if pid is not None else "another run"
        super().__init__(f"{path}: {who} is writing this file; wait for it to end or use another")
