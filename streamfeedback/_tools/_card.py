"""Reading a run's NDJSON output, and summarising it for a dataset card.

Shared by export and binarize: both stream the output line by line with one reused decoder,
so outputs larger than memory work, and both stop at the first unreadable line with its
file and line number (exit 2). The card records what a reader of a published dataset needs
to trust it: the config (when given), counts, rating histograms and the command that made it.
It never holds secrets: only the names from the config, never environment values.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shlex
import sys
import zlib
from collections.abc import Iterator
from typing import Any

import msgspec

from .._config import Config, GeneratorConfig, RaterConfig
from .._exceptions import SourceError
from .._records import Record

__all__ = [
    "RunStats",
    "command_line",
    "config_facts",
    "iter_records",
    "render_card",
    "score_lists",
]

_decoder = msgspec.json.Decoder(Record)


def iter_records(path: str) -> Iterator[tuple[int, Record]]:
    """(line number, record) for every non-blank line of an NDJSON output (`.gz` too); "-"
    is stdin.

    :raises SourceError: naming the file and line of the first line that is not a record.
    """
    if path == "-":
        yield from _iter_lines("<stdin>", sys.stdin.buffer)
        return
    try:
        fh: Any = gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")
    except OSError as exc:
        raise SourceError(path, None, f"cannot read: {exc.strerror or exc}") from exc
    with fh:
        try:
            yield from _iter_lines(path, fh)
        except (OSError, EOFError, zlib.error) as exc:  # not gzip, or cut short
            raise SourceError(path, None, f"cannot read: {exc}") from exc


def _iter_lines(name: str, fh: Any) -> Iterator[tuple[int, Record]]:
    for number, line in enumerate(fh, start=1):
        if not line.strip():
            continue
        try:
            record = _decoder.decode(line)
        except msgspec.DecodeError as exc:
            raise SourceError(name, number, f"not a streamfeedback record: {exc}") from exc
        if not (len(record.generations) == len(record.generation_models) == len(record.ratings)):
            raise SourceError(
                name, number, "generations, generation_models and ratings differ in length"
            )
        yield number, record


def score_lists(record: Record) -> dict[str, list[int | None]]:
    """Per aspect, the ratings of the record's responses (one entry for single-aspect runs)."""
    if record.aspects:
        return {name: list(result.ratings) for name, result in record.aspects.items()}
    return {record.aspect or "rating": list(record.ratings)}


class RunStats:
    """Counts and histograms gathered while the records stream past, for the card."""

    def __init__(self) -> None:
        self.records = 0
        self.responses = 0
        self.null_ratings = 0
        self.simulated = 0
        self.responses_per_model: dict[str, int] = {}
        self.judge_models: dict[str, int] = {}
        self.aspects: list[str] = []
        self.histograms: dict[str, dict[str, dict[str, int]]] = {}

    def add(self, record: Record) -> None:
        self.records += 1
        self.responses += len(record.generations)
        self.simulated += record.simulated
        self.judge_models[record.ultrafeedback_model] = (
            self.judge_models.get(record.ultrafeedback_model, 0) + 1
        )
        for model in record.generation_models:
            self.responses_per_model[model] = self.responses_per_model.get(model, 0) + 1
        for aspect, ratings in score_lists(record).items():
            if aspect not in self.aspects:
                self.aspects.append(aspect)
            per_model = self.histograms.setdefault(aspect, {})
            for model, rating in zip(record.generation_models, ratings, strict=False):
                bucket = "null" if rating is None else str(rating)
                self.null_ratings += rating is None
                hist = per_model.setdefault(model, {})
                hist[bucket] = hist.get(bucket, 0) + 1

    def facts(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "responses": self.responses,
            "null_ratings": self.null_ratings,
            "simulated_records": self.simulated,
            "responses_per_model": dict(sorted(self.responses_per_model.items())),
            "judge_models": dict(sorted(self.judge_models.items())),
            "aspects": list(self.aspects),
            "rating_histograms": {
                aspect: {
                    model: dict(sorted(hist.items(), key=lambda kv: _bucket_order(kv[0])))
                    for model, hist in sorted(per_model.items())
                }
                for aspect, per_model in self.histograms.items()
            },
        }


def _bucket_order(bucket: str) -> tuple[int, str]:
    return (1, bucket) if bucket == "null" else (0, bucket.rjust(4))


def _sampling(engine: GeneratorConfig | RaterConfig) -> dict[str, Any]:
    facts: dict[str, Any] = {
        "max_tokens": engine.max_tokens,
        "temperature": engine.temperature,
        "top_p": engine.top_p,
    }
    if engine.seed is not None:
        facts["seed"] = engine.seed
    return facts


def config_facts(config: Config) -> dict[str, Any]:
    """What the card says about a config: names, routing, judge, sampling.

    Leaves out base URLs and key variable names: neither is needed to read the data, and a
    URL can point inside a private network.
    """
    source = config.source
    src: dict[str, Any] = {"column": source.column, "id_column": source.id_column}
    if source.dataset is not None:
        src.update(dataset=source.dataset, split=source.split, subset=source.subset)
    else:
        src["path"] = source.path
    rater = config.rater
    return {
        "source": src,
        "routing": {
            "n": config.routing.n,
            "batch_size": config.routing.batch_size,
            "seed": config.routing.seed,
            "pool_size": len(config.generators),
        },
        "generators": [
            {
                "name": g.label,
                "model": g.model,
                "backend": g.backend,
                **_sampling(g),
                **({"system_prompt": g.system_prompt} if g.system_prompt else {}),
            }
            for g in config.generators
        ],
        "judge": {
            "model": rater.model,
            "backend": rater.backend,
            "aspects": rater.aspect_list,
            "shuffle": rater.shuffle,
            "max_attempts": rater.max_attempts,
            **_sampling(rater),
        },
    }


def command_line(args: argparse.Namespace) -> str:
    """The command as typed: from sys.argv when it holds this command, else rebuilt from args."""
    argv = list(sys.argv[1:])
    command = getattr(args, "command", None)
    if command and command in argv:
        return shlex.join(["streamfeedback", *argv])
    rebuilt = ["streamfeedback", str(command or "export")]
    first = ("input", "to")
    options = sorted(
        vars(args).items(), key=lambda kv: first.index(kv[0]) if kv[0] in first else len(first)
    )
    for key, value in options:
        if key in {"command", "tool_main", "verbose", "quiet"} or value in (None, False):
            continue
        if key == "input":
            rebuilt.append(str(value))
        elif value is True:
            rebuilt.append(f"--{key.replace('_', '-')}")
        else:
            rebuilt += [f"--{key.replace('_', '-')}", str(value)]
    return shlex.join(rebuilt)


def _size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K")):
        if n < limit:
            return name
    return "100K<n<1M" if n < 1_000_000 else "1M<n<10M"


def render_card(
    *,
    stats: RunStats,
    config: dict[str, Any] | None,
    command: str,
    source_file: str,
    license: str = "other",
    pretty_name: str | None = None,
) -> str:
    """The dataset card (README.md): YAML header, the facts in prose and tables, and the same
    facts as one JSON block so scripts can check a dataset against its run."""
    from huggingface_hub import DatasetCardData

    from .. import __version__

    facts = stats.facts()
    header = DatasetCardData(
        license=license,
        task_categories=["text-generation"],
        tags=["ultrafeedback", "streamfeedback", "dpo", "preference", "synthetic"],
        size_categories=[_size_category(stats.records)],
        pretty_name=pretty_name,
    ).to_yaml()
    lines = [
        "---",
        header,
        "---",
        "",
        f"# {pretty_name or 'UltraFeedback-style preference data'}",
        "",
        f"Made with streamfeedback {__version__}: each prompt was answered by several models "
        "of a pool and every answer was rated 1-5 by an LLM judge with the UltraFeedback "
        "annotation prompt.",
        "",
        "## Made by",
        "",
        "```sh",
        command,
        "```",
        "",
        f"from the output file `{source_file}`.",
        "",
        "## Counts",
        "",
        f"- records (prompts): {stats.records}",
        f"- responses: {stats.responses}",
        f"- null ratings (the judge's answer could not be read): {stats.null_ratings}",
        f"- judge models: {', '.join(facts['judge_models']) or '-'}",
        f"- aspects: {', '.join(stats.aspects) or '-'}",
    ]
    if stats.simulated:
        lines.append(
            f"- simulated records: {stats.simulated} (made by the built-in simulation, "
            "not by real models: not for training)"
        )
    lines += ["", "## Configuration", ""]
    if config is None:
        lines.append(
            "No config was given to the export, so only what the records themselves say is "
            "known: the generator names per response, the judge model and the aspect(s). "
            "Routing, sampling settings and the source are not recorded here; pass "
            "`--config CONFIG.toml` to include them."
        )
    else:
        routing, judge = config["routing"], config["judge"]
        lines += [
            f"- routing: {routing['n']} of {routing['pool_size']} models per batch of "
            f"{routing['batch_size']} prompt(s), seed {routing['seed']}",
            f"- judge: {judge['model']} ({judge['backend']}), aspects "
            f"{', '.join(judge['aspects'])}, temperature {judge['temperature']}, top_p "
            f"{judge['top_p']}, max_tokens {judge['max_tokens']}"
            f"{', responses shuffled before judging' if judge['shuffle'] else ''}",
            f"- source: {json.dumps(config['source'])}",
            "",
            "| name | model | backend | max_tokens | temperature | top_p |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {g['name']} | {g['model']} | {g['backend']} | {g['max_tokens']} "
            f"| {g['temperature']} | {g['top_p']} |"
            for g in config["generators"]
        ]
    lines += ["", "## Rating histograms", ""]
    for aspect, per_model in facts["rating_histograms"].items():
        lines += [
            f"### {aspect}",
            "",
            "| model | 1 | 2 | 3 | 4 | 5 | null |",
            "|---|---|---|---|---|---|---|",
        ]
        for model, hist in per_model.items():
            cells = " | ".join(str(hist.get(b, 0)) for b in ("1", "2", "3", "4", "5", "null"))
            lines.append(f"| {model} | {cells} |")
        lines.append("")
    machine = {
        **facts,
        "config": config,
        "command": command,
        "source_file": source_file,
        "streamfeedback_version": __version__,
    }
    lines += [
        "## Use",
        "",
        "Binarize for DPO with `streamfeedback binarize OUT.ndjson` (chosen = the highest "
        "rated response, rejected = a random lower-rated one; ties and unrated responses "
        "are skipped).",
        "",
        "## Facts (machine-readable)",
        "",
        "```json",
        json.dumps(machine, indent=2, sort_keys=False),
        "```",
        "",
    ]
    return "\n".join(lines)


def card_facts(card: str) -> dict[str, Any]:
    """The JSON facts block of a card made by `render_card` (for checks and tests)."""
    marker = "## Facts (machine-readable)"
    body = card.split(marker, 1)[1]
    start = body.index("```json\n") + len("```json\n")
    end = body.index("\n```", start)
    result: dict[str, Any] = json.loads(body[start:end])
    return result
