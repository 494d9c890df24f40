"""The TOML config, decoded into typed, frozen msgspec Structs.

Keys follow CONTRACT.md. Every error names the file and the key (`ConfigError`), so a user
can find the typo without reading a traceback. Relative paths in the file are relative to the
file itself, so a config runs the same from any working directory.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, TypeVar

import msgspec

from ._confighelp import apply_overrides, explain_enum, explain_unknown
from ._exceptions import ConfigError

__all__ = [
    "ASPECTS",
    "ClusterConfig",
    "Config",
    "EngineConfig",
    "GeneratorConfig",
    "OutputConfig",
    "PipelineConfig",
    "PrinciplesConfig",
    "RaterConfig",
    "RoutingConfig",
    "SourceConfig",
    "SpoolConfig",
    "api_key",
    "load_config",
]

Backend = Literal["vllm", "openai", "sim"]
Aspect = Literal[
    "helpfulness", "honesty", "instruction-following", "truthfulness", "overall-rating"
]
ASPECTS: tuple[str, ...] = (
    "helpfulness",
    "honesty",
    "instruction-following",
    "truthfulness",
    "overall-rating",
)


class _Section(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Base of every section: unknown keys are errors, so typos never pass silently."""

    def __post_init__(self) -> None:
        # TOML has `nan` and `inf`; no key of ours means anything by them, and a NaN passes
        # every `<` check below only to crash the run later.
        for key in self.__struct_fields__:
            value = getattr(self, key)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"`{key}` must be a finite number, not {value}")


def _at_least(section: _Section, key: str, low: float, *, strict: bool = False) -> None:
    """`key` of `section` must be >= low (> low when `strict`); None means unset."""
    value = getattr(section, key)
    if value is None:
        return
    if value < low or (strict and value == low):
        word = "greater than" if strict else "at least"
        raise ValueError(f"`{key}` must be {word} {low:g}, got {value:g}")


class SourceConfig(_Section, frozen=True, kw_only=True):
    """Where prompts come from: a file (`path`) or a `datasets` dataset (`dataset`)."""

    path: str | None = None
    dataset: str | None = None
    split: str = "train"
    subset: str | None = None
    streaming: bool = True
    column: str = "instruction"
    id_column: str | None = None

    def __post_init__(self) -> None:
        if (self.path is None) == (self.dataset is None):
            raise ValueError("set exactly one of `path` and `dataset`")


class RoutingConfig(_Section, frozen=True, kw_only=True):
    """How prompts are spread over the pool: `n` models per batch of `batch_size` prompts."""

    n: int = 3
    batch_size: int = 2
    seed: int = 0
    on_generation_failure: Literal["reroute", "fail"] = "reroute"
    cooldown: float = 30.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _at_least(self, "cooldown", 0.0, strict=True)
        if self.n < 1:
            raise ValueError("`n` must be at least 1")
        if self.batch_size < 1:
            raise ValueError("`batch_size` must be at least 1")


class EngineConfig(_Section, frozen=True, kw_only=True):
    """Keys shared by generators and the rater: the backend and how to reach and drive it."""

    backend: Backend
    model: str
    max_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 1.0
    seed: int | None = None
    max_concurrency: int | None = None
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    timeout: float = 180.0
    max_retries: int = 5
    rate_limit_patience: float = 900.0
    # openai
    base_url: str | None = None
    api_key_env: str | None = None
    # vllm
    gpu: int | None = None
    gpus: list[int] | None = None
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    dtype: str = "auto"
    enforce_eager: bool = False
    trust_remote_code: bool = False
    download_dir: str | None = None
    quantization: str | None = None
    # sim
    sim_ttft: float = 0.0
    sim_tpot: float = 0.0
    sim_slots: int = 256
    sim_output_tokens: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_tokens < 1:
            raise ValueError("`max_tokens` must be at least 1")
        _at_least(self, "temperature", 0.0)
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"`top_p` must be greater than 0 and at most 1, got {self.top_p:g}")
        _at_least(self, "timeout", 0.0, strict=True)
        _at_least(self, "max_retries", 0)
        _at_least(self, "rate_limit_patience", 0.0)
        for key in ("sim_ttft", "sim_tpot"):
            _at_least(self, key, 0.0)
        _at_least(self, "sim_output_tokens", 1)
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError("`max_concurrency` must be at least 1")
        for key in ("requests_per_minute", "tokens_per_minute"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ValueError(f"`{key}` must be positive")
        if self.gpu is not None and self.gpus is not None:
            raise ValueError("set `gpu` or `gpus`, not both")
        if self.sim_slots < 1:
            raise ValueError("`sim_slots` must be at least 1")
        if self.base_url is not None and not self.base_url.strip():
            raise ValueError(
                "`base_url` is empty: give the server's URL, or remove the key for the "
                "OpenAI API (or OPENAI_BASE_URL)"
            )

    @property
    def gpu_ids(self) -> list[int]:
        """The GPUs this engine owns (vllm only)."""
        if self.gpus is not None:
            return list(self.gpus)
        return [] if self.gpu is None else [self.gpu]

    @property
    def concurrency(self) -> int:
        """Requests this engine may have in flight at once."""
        if self.max_concurrency is not None:
            return self.max_concurrency
        if self.backend == "vllm":
            return max(1, int(self.max_num_seqs * 1.1))
        return 256


_E = TypeVar("_E", bound=EngineConfig)


class GeneratorConfig(EngineConfig, frozen=True, kw_only=True):
    """One model of the pool. `name` is what records call it (defaults to `model`)."""

    name: str | None = None
    system_prompt: str | None = None
    replicas: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.replicas < 1:
            raise ValueError("`replicas` must be at least 1")

    @property
    def label(self) -> str:
        return self.name or self.model


class RaterConfig(EngineConfig, frozen=True, kw_only=True):
    """The judge: an engine plus the UltraFeedback aspect(s) it rates."""

    max_tokens: int = 2048
    max_concurrency: int | None = 32
    aspect: Aspect = "overall-rating"
    aspects: list[Aspect] | None = None
    shuffle: bool = False
    max_attempts: int = 3
    max_consecutive_failures: int = 10
    mode: Literal["live", "batch"] = "live"
    batch_poll_interval: float = 30.0
    batch_max_requests: int = 50_000
    batch_max_bytes: int = 200_000_000
    batch_completion_window: str = "24h"
    input_cost_per_mtok: float | None = None
    output_cost_per_mtok: float | None = None
    guided: bool = False
    """Constrain the answer to the aspect's block layout (local judges: vllm, vLLM servers)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_attempts < 1:
            raise ValueError("`max_attempts` must be at least 1")
        _at_least(self, "max_consecutive_failures", 1)
        _at_least(self, "batch_poll_interval", 0.0, strict=True)
        for key in ("input_cost_per_mtok", "output_cost_per_mtok"):
            _at_least(self, key, 0.0)
        if self.aspects is not None and not self.aspects:
            raise ValueError("`aspects` must name at least one aspect")

    @property
    def aspect_list(self) -> list[str]:
        return list(self.aspects) if self.aspects else [self.aspect]


PrincipleName = Literal["helpfulness", "honesty", "truthfulness", "verbalized_calibration"]


class PrinciplesConfig(_Section, frozen=True, kw_only=True):
    """Per-completion system prompts drawn from principle sets (the paper's setting)."""

    sets: list[PrincipleName] = []
    seed: int = 0


class SpoolConfig(_Section, frozen=True, kw_only=True):
    """The durable log of generations between gather and rating.

    `path` defaults to `<output>.spool.ndjson` beside a file output; a stdout-only run has
    no spool unless `path` is set. `cache` bounds the entries the judge may take from memory.
    """

    path: str | None = None
    cache: int = 1024

    def __post_init__(self) -> None:
        if self.cache < 0:
            raise ValueError("`cache` must not be negative")


class ClusterConfig(_Section, frozen=True, kw_only=True):
    """Where generator workers run: in this machine's processes, or as Ray actors."""

    backend: Literal["local", "ray"] = "local"
    address: str | None = None
    namespace: str | None = None
    restarts: int = 3
    """How often a dead Ray replica (or local vLLM worker) is replaced (each its own count)."""

    def __post_init__(self) -> None:
        if self.restarts < 0:
            raise ValueError("`restarts` must be at least 0")


class OutputConfig(_Section, frozen=True, kw_only=True):
    """Where records and failures go. `path = "-"` is stdout."""

    path: str = "-"
    failures: str = "failures.ndjson"


class PipelineConfig(_Section, frozen=True, kw_only=True):
    """Tuning: channel bounds and the shutdown deadline."""

    buffer: int = 64
    drain_timeout: float = 10.0
    metrics_port: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _at_least(self, "drain_timeout", 0.0, strict=True)
        if self.buffer < 1:
            raise ValueError("`buffer` must be at least 1")
        if self.metrics_port is not None and not 1 <= self.metrics_port <= 65535:
            raise ValueError("`metrics_port` must be a TCP port, 1 to 65535")


class Config(_Section, frozen=True, kw_only=True):
    """The whole run. Build it with `load_config` (or `msgspec.convert` in code)."""

    source: SourceConfig
    generators: list[GeneratorConfig]
    rater: RaterConfig
    routing: RoutingConfig = RoutingConfig()
    principles: PrinciplesConfig = PrinciplesConfig()
    spool: SpoolConfig = SpoolConfig()
    cluster: ClusterConfig = ClusterConfig()
    output: OutputConfig = OutputConfig()
    pipeline: PipelineConfig = PipelineConfig()


def load_config(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> Config:
    """Read, decode and check a TOML config; relative paths become relative to its folder.

    `overrides` are `KEY=VALUE` strings (the CLI's `--set`), applied before the checks so
    they are checked like the file.

    :raises ConfigError: naming the file and, where it applies, the key.
    """
    file = Path(path)
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise ConfigError(str(file), None, f"cannot read config: {exc.strerror or exc}") from exc
    try:
        raw = msgspec.toml.decode(data)
        raw = apply_overrides(raw, list(overrides), Config)
        config = msgspec.convert(raw, Config)
    except msgspec.ValidationError as exc:
        key, message = _split_validation_error(str(exc))
        if key and any(_overridden(key, item) for item in overrides):
            message += " (from --set)"
        raise ConfigError(str(file), key, message) from exc
    except msgspec.DecodeError as exc:
        raise ConfigError(str(file), None, f"invalid TOML: {exc}") from exc
    except ValueError as exc:
        raise ConfigError(str(file), None, str(exc)) from exc
    config = _resolve_paths(config, file.parent)
    config = _openai_defaults(config)
    check_config(config, str(file))
    return config


def check_config(config: Config, origin: str = "<config>") -> None:
    """Cross-section checks that one section alone cannot make.

    :raises ConfigError: naming the key at fault.
    """
    if not config.generators:
        raise ConfigError(origin, "generators", "the pool is empty: add [[generators]] tables")
    names: set[str] = set()
    for i, g in enumerate(config.generators):
        if g.label in names:
            raise ConfigError(
                origin, f"generators[{i}].name", f"two generators are named {g.label!r}"
            )
        names.add(g.label)
    if config.cluster.backend != "ray":
        for i, g in enumerate(config.generators):
            if g.replicas > 1:
                raise ConfigError(
                    origin,
                    f"generators[{i}].replicas",
                    'replicas need [cluster] backend = "ray" (one engine per GPU here)',
                )
    if config.routing.n > len(config.generators):
        raise ConfigError(
            origin,
            "routing.n",
            f"n = {config.routing.n} is larger than the pool of "
            f"{len(config.generators)} generators",
        )
    owners: dict[int, str] = {}
    for where, engine in _engine_sections(config):
        if engine.backend != "vllm":
            continue
        on_ray = config.cluster.backend == "ray" and where != "rater"
        if on_ray:
            continue  # Ray places the actors; `gpus` only sets how many each one needs
        if not engine.gpu_ids:
            raise ConfigError(
                origin, f"{where}.gpu", "a vllm engine needs `gpu = k` or `gpus = [...]`"
            )
        for gpu in engine.gpu_ids:
            if gpu in owners:
                raise ConfigError(
                    origin,
                    f"{where}.gpu",
                    f"GPU {gpu} is already used by {owners[gpu]}: one vllm engine per GPU",
                )
            owners[gpu] = where
    _check_guided(config, origin)


def _check_guided(config: Config, origin: str) -> None:
    from ._judge.guide import min_guided_tokens

    rater = config.rater
    if not rater.guided:
        return
    if rater.mode == "batch":
        raise ConfigError(origin, "rater.guided", "the OpenAI Batch API cannot guide a judge")
    for aspect in rater.aspect_list:
        need = min_guided_tokens(aspect, config.routing.n)
        if rater.max_tokens < need:
            raise ConfigError(
                origin,
                "rater.max_tokens",
                f"a guided {aspect} answer on {config.routing.n} texts needs at least {need}",
            )


OPENAI_HEADER_VARS = (
    ("OPENAI_ORG_ID", "OpenAI-Organization"),
    ("OPENAI_PROJECT_ID", "OpenAI-Project"),
)
"""The OpenAI SDK's own variables and the headers it sends them in; the engines send them too."""


def check_environment(config: Config, origin: str = "<config>") -> None:
    """Check that every API-key variable the config names is set, that the extras the
    config needs are installed, and that a guided judge can be guided, before any work starts.

    :raises ConfigError: naming the key and the variable (never its value), or the extra
        with its `pip install` line.
    """
    if config.cluster.backend == "ray" and importlib.util.find_spec("ray") is None:
        raise ConfigError(
            origin,
            "cluster.backend",
            "Ray is not installed: pip install 'streamfeedback[ray]'",
        )
    rater = config.rater
    if rater.guided and rater.backend == "openai":
        url = base_url(rater) or ""
        if not url or "api.openai.com" in url:
            raise ConfigError(
                origin,
                "rater.guided",
                "the OpenAI API cannot guide a judge: set base_url to a vLLM server "
                '(it takes structured_outputs), use backend = "vllm", or drop guided',
            )
    for where, engine in _engine_sections(config):
        local = where == "rater" or config.cluster.backend != "ray"
        if engine.backend == "vllm" and local and importlib.util.find_spec("vllm") is None:
            raise ConfigError(
                origin,
                f"{where}.backend",
                "vllm is not installed: pip install 'streamfeedback[vllm]' "
                "(on a CPU-only host, see the README's vLLM on CPU section)",
            )
    for where, engine in _engine_sections(config):
        if engine.backend != "openai":
            continue
        for env, _ in OPENAI_HEADER_VARS:
            value = sdk_env(env)
            if value and not header_safe(value):
                raise ConfigError(
                    origin,
                    f"{where}.backend",
                    f"environment variable {env} holds a character an HTTP header cannot "
                    "carry (not printable ASCII, or a space); check how it was set",
                )
        var = api_key_env(engine)
        key = api_key(engine)
        if var is None and key == "EMPTY":
            continue  # a local server that needs no key, and none is set
        shown = var or "OPENAI_API_KEY"
        if not key:
            raise ConfigError(
                origin,
                f"{where}.api_key_env",
                f"environment variable {shown} is not set (it should hold the API key)",
            )
        if not header_safe(key):
            # An HTTP header cannot carry it: the run would fail on its first request.
            raise ConfigError(
                origin,
                f"{where}.api_key_env",
                f"environment variable {shown} holds a character an API key cannot have "
                "(not printable ASCII, or a space); check how it was set",
            )


def header_safe(key: str) -> bool:
    """Whether an HTTP header can carry `key` as a bearer token: printable ASCII, no space."""
    return key.isascii() and key.isprintable() and " " not in key


def _engine_sections(config: Config) -> list[tuple[str, EngineConfig]]:
    """Every engine section with the key path errors name it by."""
    sections: list[tuple[str, EngineConfig]] = [
        (f"generators[{i}]", g) for i, g in enumerate(config.generators)
    ]
    sections.append(("rater", config.rater))
    return sections


def api_key_env(engine: EngineConfig) -> str | None:
    """The variable that holds this engine's key: the configured one, or OPENAI_API_KEY for
    the OpenAI API itself (no `base_url`); local servers need none."""
    if engine.api_key_env:
        return engine.api_key_env
    return "OPENAI_API_KEY" if engine.base_url is None else None


_PATH_SUFFIX = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)
_UNKNOWN_FIELD = re.compile(r"^Object contains unknown field `(?P<field>[^`]+)`$")
_BAD_ENUM = re.compile(r"^Invalid enum value (?P<value>.*)$", re.S)
_MISSING_FIELD = re.compile(r"^Object missing required field `(?P<field>[^`]+)`$")


def _split_validation_error(text: str) -> tuple[str | None, str]:
    """Turn msgspec's "... - at `$.a.b[0]`" into ("a.b[0]", "...")."""
    match = _PATH_SUFFIX.match(text)
    assert match is not None
    message, path = match["msg"], (match["path"] or "").lstrip(".")
    unknown = _UNKNOWN_FIELD.match(message)
    if unknown:
        field = unknown["field"]
        message = explain_unknown(Config, path, field)
        path = f"{path}.{field}" if path else field
    enum = _BAD_ENUM.match(message)
    if enum:
        message = explain_enum(Config, path, enum["value"]) or message
    missing = _MISSING_FIELD.match(message)
    if missing:
        field = missing["field"]
        path = f"{path}.{field}" if path else field
        message = "required key is missing"
    return (path or None), message


def base_url(engine: EngineConfig) -> str | None:
    """Where an OpenAI-compatible engine sends requests: its `base_url`, else
    `OPENAI_BASE_URL` as the OpenAI SDK reads it; None for the OpenAI API itself."""
    return engine.base_url or os.environ.get("OPENAI_BASE_URL", "").strip() or None


def _openai_defaults(config: Config) -> Config:
    """`OPENAI_BASE_URL` where an OpenAI-compatible section gives no `base_url`, as the
    OpenAI SDK does (its key then comes from OPENAI_API_KEY when set, see `api_key`)."""

    def fill(engine: _E) -> _E:
        if engine.backend != "openai" or engine.base_url is not None:
            return engine
        url = base_url(engine)
        return engine if url is None else msgspec.structs.replace(engine, base_url=url)

    return msgspec.structs.replace(
        config, generators=[fill(g) for g in config.generators], rater=fill(config.rater)
    )


def api_key(engine: EngineConfig) -> str | None:
    """The key to send: from `api_key_env` (None when that is unset), else OPENAI_API_KEY
    when set (the SDK's default), else a placeholder local servers accept."""
    var = api_key_env(engine)
    # Stripped: a trailing newline from `export KEY=$(cat keyfile)` is no part of the key.
    if var is not None:
        return os.environ.get(var, "").strip() or None
    return os.environ.get("OPENAI_API_KEY", "").strip() or "EMPTY"


def sdk_env(name: str) -> str | None:
    """One of the SDK's own variables (OPENAI_ORG_ID, ...), stripped like the key; None when
    unset or blank."""
    return os.environ.get(name, "").strip() or None


def _overridden(key: str, override: str) -> bool:
    """Whether the error at `key` is about what `--set KEY=VALUE` set."""
    name = re.sub(r"\.(\d+)", r"[\1]", override.partition("=")[0].strip())
    return key == name or key.startswith((name + ".", name + "[")) or name.startswith(key + ".")


def _resolve_paths(config: Config, base: Path) -> Config:
    def resolve(value: str | None) -> str | None:
        if value is None or value == "-":
            return value
        return str(base / value) if not Path(value).is_absolute() else value

    source = config.source
    if source.path is not None:
        source = msgspec.structs.replace(source, path=resolve(source.path))
    elif source.dataset is not None and (base / source.dataset).exists():
        source = msgspec.structs.replace(source, dataset=resolve(source.dataset))
    spool = msgspec.structs.replace(config.spool, path=resolve(config.spool.path))
    output = msgspec.structs.replace(
        config.output,
        path=resolve(config.output.path) or "-",
        failures=resolve(config.output.failures) or "failures.ndjson",
    )
    return msgspec.structs.replace(config, source=source, output=output, spool=spool)
