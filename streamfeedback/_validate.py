"""`streamfeedback validate`: the plan a config makes, and every check `run` makes before its
first request (config, API-key variables, extras, the source's first row or schema), plus an
optional probe of each OpenAI-compatible endpoint's model list.

Kept apart from the CLI so the plan's wording and the checks live in one place with one job:
to let a mistake show in a second instead of after a long start-up.
"""

from __future__ import annotations

import msgspec

from ._config import Config, EngineConfig, api_key
from ._exceptions import ConfigError
from ._stages.source import open_source

__all__ = ["check_source", "plan", "probe"]

_OPENAI_API = "https://api.openai.com/v1"


def _location(engine: EngineConfig) -> str:
    """Where an engine runs, for the plan."""
    if engine.backend == "vllm":
        return f"GPU {','.join(map(str, engine.gpu_ids))}"
    if engine.backend == "openai":
        return engine.base_url or "OpenAI API"
    return "simulated"


def plan(config: Config, path: str) -> str:
    """A human-readable summary of what a config would do."""
    src = config.source
    lines = [f"config: {path}"]
    what = f"file {src.path}" if src.path else f"dataset {src.dataset} (split {src.split})"
    id_from = f"column {src.id_column!r}" if src.id_column else "hash of the text"
    lines.append(f"source: {what}; instruction from column {src.column!r}; id from {id_from}")
    r = config.routing
    lines.append(
        f"routing: {r.n} of {len(config.generators)} models per batch of {r.batch_size} "
        f"prompt(s), seed {r.seed}"
    )
    lines.append("generators:")
    for g in config.generators:
        where = _location(g)
        lines.append(
            f"  - {g.label}: {g.backend} {g.model} on {where}; max_tokens {g.max_tokens}, "
            f"temperature {g.temperature}, up to {g.concurrency} in flight"
        )
    j = config.rater
    limits = ", ".join(
        f"{v:g} {k}"
        for k, v in (("requests/min", j.requests_per_minute), ("tokens/min", j.tokens_per_minute))
        if v is not None
    )
    where = _location(j)
    lines.append(
        f"judge: {j.backend} {j.model} on {where}; aspects {', '.join(j.aspect_list)}; "
        f"max_tokens {j.max_tokens}, temperature {j.temperature}; "
        f"up to {j.concurrency} at once{'; ' + limits if limits else ''}"
        f"{'; responses shuffled' if j.shuffle else ''}; up to {j.max_attempts} attempts"
    )
    if j.mode == "batch":
        lines.append(
            f"judge mode: OpenAI Batch API, up to {j.batch_max_requests} requests per batch, "
            f"polled every {j.batch_poll_interval:g}s"
        )
    if config.principles.sets:
        lines.append(
            f"principles: {', '.join(config.principles.sets)} (seed {config.principles.seed})"
        )
    if config.cluster.backend == "ray":
        replicas = sum(g.replicas for g in config.generators)
        lines.append(
            f"cluster: Ray at {config.cluster.address or 'a local cluster'}; "
            f"{replicas} generator actors"
        )
    r2 = config.routing
    lines.append(
        f"on a failed generation: {r2.on_generation_failure}; failing models cool down "
        f"for {r2.cooldown:g}s"
    )
    out = config.output
    spool = config.spool.path or (f"{out.path}.spool.ndjson" if out.path != "-" else "none")
    lines.append(
        f"output: {'stdout' if out.path == '-' else out.path}; failures: {out.failures}; "
        f"spool: {spool}"
    )
    return "\n".join(lines) + "\n"


async def check_source(config: Config) -> str:
    """Open the source and read its first row or schema, as `run` does before it starts.

    :raises SourceError: the file is missing, of an unknown kind, or lacks the column.
    """
    if config.source.path == "-":
        return "source: stdin, checked when the run reads it"
    # a Hub dataset is streamed here whatever the config says: its first rows and schema
    # are all a check needs, not a download of the whole dataset
    source = await open_source(msgspec.structs.replace(config.source, streaming=True))
    await source.aclose()
    return f"source: {source.name} opens and has the column {config.source.column!r}"


async def probe(config: Config, origin: str, *, timeout: float = 10.0) -> list[str]:
    """Ask each OpenAI-compatible endpoint for its models (`GET /models`) and check that it
    serves the configured one.

    :raises ConfigError: naming the section, the URL and what went wrong (never the key).
    """
    import openai

    sections: list[tuple[str, EngineConfig]] = [
        (f"generators[{i}]", g) for i, g in enumerate(config.generators)
    ]
    sections.append(("rater", config.rater))
    found: list[str] = []
    for where, engine in sections:
        if engine.backend != "openai":
            continue
        base = (engine.base_url or _OPENAI_API).rstrip("/")
        client = openai.AsyncOpenAI(
            base_url=base, api_key=api_key(engine) or "EMPTY", timeout=timeout, max_retries=0
        )
        try:
            served = [m.id async for m in client.models.list()]
        except openai.APIStatusError as exc:
            raise ConfigError(
                origin, f"{where}.base_url", f"GET {base}/models answered {exc.status_code}"
            ) from None
        except openai.APIConnectionError as exc:
            reason = str(exc.__cause__ or exc) or type(exc).__name__
            raise ConfigError(origin, f"{where}.base_url", f"{base}: {reason}") from None
        finally:
            await client.close()
        if engine.model not in served:
            listed = ", ".join(served[:10]) + (" ..." if len(served) > 10 else "")
            raise ConfigError(
                origin,
                f"{where}.model",
                f"{base} does not serve {engine.model!r}; it serves: {listed or 'nothing'}",
            )
        found.append(f"probe: {where}: {base} serves {engine.model}")
    return found
