"""Turn a run's NDJSON output into a Hugging Face dataset (folder, parquet or Hub) with a card,
or into Argilla records for human review.

Targets of `--to`:
  DIR                 `datasets` save_to_disk folder, with the card as DIR/README.md
  FILE.parquet        one file in the format its extension names (.parquet, .jsonl, .json:
  FILE.jsonl|.json    an array, .csv: lists and tables as JSON text), with the card beside
  FILE.csv            it as FILE.README.md
  user/name           push to the Hugging Face Hub (`--private`), card as the repo's README.md
                      (`hub:user/name` forces the Hub when a local folder `user` exists)
  argilla:NAME        push to an Argilla server for review (extra `streamfeedback[argilla]`;
                      ARGILLA_API_URL / ARGILLA_API_KEY are read by the Argilla SDK itself)
  FILE.jsonl          with `--format argilla`: Argilla-ready records, one per line, and the
                      dataset settings (fields, questions, metadata) in FILE.settings.json

The input may be gzipped (`.gz`) or stdin (`-`, kept in a temporary file while the export
works). The dataset is built with `datasets.Dataset.from_generator` over the file, decoding one line
at a time into a temporary cache, so memory stays bounded however large the output.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec

from .._config import ASPECTS, load_config
from .._exceptions import SourceError
from .._records import Record
from ._card import RunStats, command_line, config_facts, iter_records, render_card

__all__ = [
    "argilla_record",
    "argilla_settings",
    "configure_parser",
    "dataset_features",
    "main",
    "record_row",
]

HELP = "export a run's output: datasets folder, parquet, Hub (with a card) or Argilla"

log = logging.getLogger("streamfeedback")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
_FILE_FORMATS = {".parquet": "parquet", ".jsonl": "jsonl", ".json": "json", ".csv": "csv"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("input", help="the run's NDJSON output (.gz too; '-' for stdin)")
    parser.add_argument(
        "--to",
        required=True,
        help="DIR | FILE.parquet|.jsonl|.json|.csv | user/name (Hub) | argilla:NAME",
    )
    parser.add_argument(
        "--format",
        choices=["dataset", "argilla"],
        default="dataset",
        help="dataset (default) or argilla: Argilla-ready records for human review",
    )
    parser.add_argument("--config", help="the run's TOML config, so the card can record it")
    parser.add_argument("--private", action="store_true", help="make the Hub repo private")
    parser.add_argument(
        "--license", default="other", help="license in the card's header (default: other)"
    )
    parser.add_argument("--name", dest="pretty_name", help="the dataset's title in the card")
    parser.add_argument("--split", default="train", help="split name (default: train)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing target folder or file"
    )
    parser.add_argument(
        "--cache-dir", help="where the temporary Arrow files go (default: the system temp dir)"
    )
    parser.add_argument("--argilla-workspace", help="Argilla workspace (default: the user's)")


def main(args: argparse.Namespace) -> int:
    if args.input != "-":
        return _export(args)
    # stdin can be read once; Argilla reads twice, and the card names a file
    with tempfile.TemporaryDirectory(prefix="streamfeedback-stdin-", dir=args.cache_dir) as tmp:
        copy = os.path.join(tmp, "stdin.ndjson")
        with open(copy, "wb") as fh:
            shutil.copyfileobj(sys.stdin.buffer, fh)
        return _export(argparse.Namespace(**{**vars(args), "input": copy}))


def _export(args: argparse.Namespace) -> int:
    target: str = args.to
    config = None
    if args.config:
        config = load_config(args.config)
    if target.startswith("argilla:"):
        return _push_argilla(args, target.removeprefix("argilla:"))
    if args.format == "argilla":
        return _write_argilla(args, target)
    hub_id = _hub_id(target)
    if hub_id is None and not _may_write(target, args.overwrite):
        return EXIT_USAGE
    if hub_id is not None:
        log.info(
            "pushing to the Hugging Face Hub as %s (./%s would be a local folder)", hub_id, hub_id
        )
    elif args.private:
        log.warning("--private applies to Hub pushes only; %s is a local target", target)
    stats = RunStats()
    card = None
    with tempfile.TemporaryDirectory(prefix="streamfeedback-export-", dir=args.cache_dir) as tmp:
        dataset = build_dataset(args.input, stats=stats, cache_dir=tmp, split=args.split)
        card = render_card(
            stats=stats,
            config=None if config is None else config_facts(config),
            command=command_line(args),
            source_file=os.path.basename(args.input),
            license=args.license,
            pretty_name=args.pretty_name,
        )
        if hub_id is not None:
            try:
                _push_hub(dataset, hub_id, card, private=args.private, split=args.split)
            except Exception as exc:  # offline, refused, no token: one line, not a traceback
                log.error("cannot push to the Hugging Face Hub as %s: %s", hub_id, _reason(exc))
                return EXIT_FAILED
        elif _file_format(target) is not None:
            _write_file(dataset, target, _file_format(target))
            Path(_parquet_card_path(target)).write_text(card, encoding="utf-8")
        else:
            dataset.save_to_disk(target)
            Path(target, "README.md").write_text(card, encoding="utf-8")
        del dataset
    log.info(
        "exported %d records (%d responses, %d null ratings) to %s",
        stats.records,
        stats.responses,
        stats.null_ratings,
        f"the Hub as {hub_id}" if hub_id else target,
    )
    return EXIT_OK


def _hub_id(target: str) -> str | None:
    """A Hub repo id if the target names one: `hub:user/name`, or `user/name` where `user`
    is not a local folder and the target is no local path."""
    if target.startswith("hub:"):
        return target.removeprefix("hub:")
    if _file_format(target) is not None or not _HUB_ID.match(target):
        return None
    if os.path.exists(target) or os.path.isdir(target.split("/", 1)[0]):
        return None
    return target


def _file_format(target: str) -> str | None:
    """The file format the target's extension names, or None (a folder, or the Hub)."""
    return _FILE_FORMATS.get(os.path.splitext(target)[1].lower())


def _parquet_card_path(target: str) -> str:
    """The card beside a file target: FILE.README.md."""
    return os.path.splitext(target)[0] + ".README.md"


def _write_file(dataset: Any, target: str, kind: str | None) -> None:
    """One file: lists and tables stay nested in Parquet and JSON; CSV cells hold them as
    JSON text, since CSV has no nesting."""
    parent = os.path.dirname(target)
    if parent:
        os.makedirs(parent, exist_ok=True)
    if kind == "parquet":
        dataset.to_parquet(target)
    elif kind == "jsonl":
        dataset.to_json(target, lines=True, force_ascii=False)
    elif kind == "json":
        dataset.to_json(target, lines=False, orient="records", force_ascii=False)
    else:
        names = list(dataset.column_names)
        with open(target, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(names)
            for batch in dataset.iter(batch_size=1024):
                for i in range(len(batch[names[0]])):
                    writer.writerow([_cell(batch[name][i]) for name in names])


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    return value


def _reason(exc: BaseException) -> str:
    """An exception as one short line: its first line, and the cause's where that says more."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    cause = exc.__cause__ or exc.__context__
    more = str(cause).strip().splitlines()[0] if cause is not None and str(cause).strip() else ""
    if more and more not in text and len(text) < 40:
        text += f" ({more})"
    return text[:300]


def _may_write(target: str, overwrite: bool) -> bool:
    path = Path(target)
    if not path.exists():
        return True
    if path.is_dir() and not any(path.iterdir()):
        return True
    if overwrite:
        if path.is_dir():
            shutil.rmtree(path)
        return True
    log.error("%s exists: pass --overwrite to replace it, or choose another target", target)
    return False


def dataset_features() -> Any:
    """The Arrow schema of an exported dataset: the record fields, with `aspects` as a struct
    of the five aspects (absent ones null) so every row has the same type."""
    from datasets import Features, List, Value

    ints = List(Value("int64"))
    texts = List(Value("string"))
    aspect = {
        "ratings": ints,
        "rationales": texts,
        "types": List(ints),
        "rationales_for_ratings": texts,
        "attempts": Value("int64"),
        "shown_order": ints,
        "not_applicable": List(Value("bool")),
    }
    return Features(
        {
            "id": Value("string"),
            "instruction": Value("string"),
            "generations": texts,
            "generation_models": texts,
            "ratings": ints,
            "rationales": texts,
            "ultrafeedback_model": Value("string"),
            "types": List(ints),
            "rationales_for_ratings": texts,
            "aspect": Value("string"),
            "aspects": dict.fromkeys(ASPECTS, aspect),
            "fine_grained_score": List(Value("float64")),
            "judge_attempts": Value("int64"),
            "judge_order": ints,
            "generation_tokens": ints,
            "finish_reasons": texts,
            "generation_latency_s": List(Value("float64")),
            "not_applicable": List(Value("bool")),
            "principles": texts,
            "substitutions": List(
                {
                    "slot": Value("int64"),
                    "failed_model": Value("string"),
                    "model": Value("string"),
                    "error": Value("string"),
                }
            ),
            "simulated": Value("bool"),
        }
    )


def record_row(record: Record) -> dict[str, Any]:
    """One dataset row: the record as builtins, every feature present."""
    row: dict[str, Any] = msgspec.to_builtins(record)
    aspects = row.get("aspects") or {}
    row["aspects"] = {
        name: (
            None
            if name not in aspects
            else {
                "ratings": aspects[name]["ratings"],
                "rationales": aspects[name]["rationales"],
                "types": aspects[name].get("types"),
                "rationales_for_ratings": aspects[name].get("rationales_for_ratings"),
                "attempts": aspects[name].get("attempts", 1),
                "shown_order": aspects[name].get("shown_order"),
                "not_applicable": aspects[name].get("not_applicable"),
            }
        )
        for name in ASPECTS
    }
    row.setdefault("simulated", False)
    for key in (
        "types",
        "rationales_for_ratings",
        "aspect",
        "fine_grained_score",
        "judge_attempts",
        "judge_order",
        "generation_tokens",
        "finish_reasons",
        "generation_latency_s",
        "not_applicable",
        "principles",
        "substitutions",
    ):
        row.setdefault(key, None)
    return row


def _rows(path: str, stats: RunStats) -> Iterator[dict[str, Any]]:
    for _, record in iter_records(path):
        stats.add(record)
        yield record_row(record)


def build_dataset(path: str, *, stats: RunStats, cache_dir: str, split: str = "train") -> Any:
    """A `datasets.Dataset` streamed from the NDJSON file; `stats` fills as rows are written.

    The cache dir must be fresh: `from_generator` reuses a cache with the same fingerprint,
    which would serve a stale copy after the file changed.
    """
    import datasets

    try:
        return datasets.Dataset.from_generator(
            _rows,
            features=dataset_features(),
            gen_kwargs={"path": path, "stats": stats},
            cache_dir=cache_dir,
            split=datasets.NamedSplit(split),
        )
    except datasets.exceptions.DatasetGenerationError as exc:
        if isinstance(exc.__cause__, SourceError):
            raise exc.__cause__ from None
        raise


def _push_hub(dataset: Any, repo_id: str, card: str, *, private: bool, split: str) -> None:
    """Card first, then the data: `push_to_hub` keeps an existing README's text and adds its
    own metadata (configs, dataset_info) to the header, so the card ends up complete."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    api.upload_file(
        path_or_fileobj=card.encode(),
        path_in_repo="README.md",
        repo_id=repo_id,
        repo_type="dataset",
        commit_message="streamfeedback: dataset card",
    )
    dataset.push_to_hub(
        repo_id, private=private, split=split, commit_message="streamfeedback: export"
    )


# Argilla -------------------------------------------------------------------------------------


def _slug(aspect: str) -> str:
    return aspect.replace("-", "_")


def _question_aspects(record: Record) -> list[str | None]:
    """None for a single-aspect record (plain rating_i), else the aspect names."""
    return list(record.aspects) if record.aspects else [None]


def _qname(kind: str, i: int, aspect: str | None) -> str:
    return f"{kind}_{i}" if aspect is None else f"{_slug(aspect)}_{kind}_{i}"


def argilla_settings(*, responses: int, required: int, aspects: list[str | None]) -> dict[str, Any]:
    """The Argilla dataset settings as plain data: one text field per response, a 1-5 rating
    and a rationale question per response (and aspect), the model names as metadata."""
    fields = [{"name": "instruction", "title": "Instruction", "type": "text", "required": True}]
    fields += [
        {
            "name": f"response_{i}",
            "title": f"Response {i}",
            "type": "text",
            "required": i <= required,
        }
        for i in range(1, responses + 1)
    ]
    questions: list[dict[str, Any]] = []
    for aspect in aspects:
        label = "" if aspect is None else f" ({aspect})"
        for i in range(1, responses + 1):
            questions.append(
                {
                    "name": _qname("rating", i, aspect),
                    "title": f"Rating of response {i}{label}",
                    "type": "rating",
                    "values": [1, 2, 3, 4, 5],
                    "required": i <= required,
                }
            )
            questions.append(
                {
                    "name": _qname("rationale", i, aspect),
                    "title": f"Rationale for response {i}{label}",
                    "type": "text",
                    "required": False,
                }
            )
    metadata: list[dict[str, Any]] = [{"name": "judge", "type": "terms"}]
    metadata += [{"name": f"model_{i}", "type": "terms"} for i in range(1, responses + 1)]
    if any(a is not None for a in aspects):
        metadata += [
            {"name": f"fine_grained_score_{i}", "type": "float"} for i in range(1, responses + 1)
        ]
    return {
        "guidelines": "Check the judge's suggested ratings and rationales for each response; "
        "correct them where you disagree.",
        "fields": fields,
        "questions": questions,
        "metadata": metadata,
    }


def argilla_record(record: Record) -> dict[str, Any]:
    """One Argilla record as plain data: fields, metadata and the judge's suggestions."""
    fields: dict[str, str] = {"instruction": record.instruction}
    metadata: dict[str, Any] = {"judge": record.ultrafeedback_model}
    for i, (text, model) in enumerate(
        zip(record.generations, record.generation_models, strict=True), 1
    ):
        fields[f"response_{i}"] = text
        metadata[f"model_{i}"] = model
        if record.fine_grained_score is not None and record.aspects:
            score = record.fine_grained_score[i - 1]
            if score is not None:
                metadata[f"fine_grained_score_{i}"] = score
    suggestions: list[dict[str, Any]] = []
    judged: list[tuple[str | None, list[int | None], list[str | None]]]
    if record.aspects:
        judged = [
            (
                name,
                list(result.ratings),
                list(result.rationales_for_ratings or result.rationales),
            )
            for name, result in record.aspects.items()
        ]
    else:
        judged = [
            (None, list(record.ratings), list(record.rationales_for_ratings or record.rationales))
        ]
    for aspect, ratings, rationales in judged:
        for i, (rating, rationale) in enumerate(zip(ratings, rationales, strict=False), 1):
            if rating is not None:
                suggestions.append(
                    {
                        "question_name": _qname("rating", i, aspect),
                        "value": rating,
                        "agent": record.ultrafeedback_model,
                    }
                )
            if rationale:
                suggestions.append(
                    {
                        "question_name": _qname("rationale", i, aspect),
                        "value": rationale,
                        "agent": record.ultrafeedback_model,
                    }
                )
    return {"id": record.id, "fields": fields, "metadata": metadata, "suggestions": suggestions}


class _Shape:
    """The widest and narrowest record and the aspects seen: what the settings must cover."""

    def __init__(self) -> None:
        self.most = 0
        self.fewest: int | None = None
        self.aspects: list[str | None] = []

    def add(self, record: Record) -> None:
        n = len(record.generations)
        self.most = max(self.most, n)
        self.fewest = n if self.fewest is None else min(self.fewest, n)
        for aspect in _question_aspects(record):
            if aspect not in self.aspects:
                self.aspects.append(aspect)

    def settings(self) -> dict[str, Any]:
        return argilla_settings(
            responses=self.most, required=self.fewest or 0, aspects=self.aspects or [None]
        )


def _write_argilla(args: argparse.Namespace, target: str) -> int:
    if not _may_write(target, args.overwrite):
        return EXIT_USAGE
    shape = _Shape()
    encoder = msgspec.json.Encoder()
    with open(target, "wb") as out:
        for _, record in iter_records(args.input):
            shape.add(record)
            out.write(encoder.encode(argilla_record(record)) + b"\n")
    settings_path = str(Path(target).with_suffix(".settings.json"))
    Path(settings_path).write_text(json.dumps(shape.settings(), indent=2) + "\n")
    log.info("wrote Argilla records to %s and their settings to %s", target, settings_path)
    return EXIT_OK


def _push_argilla(args: argparse.Namespace, name: str, batch: int = 256) -> int:
    """Create the dataset and log the records in batches: two passes over the file, the
    first to learn how many responses the settings need."""
    if not name:
        sys.stderr.write("streamfeedback: error: --to argilla:NAME needs a dataset name\n")
        return EXIT_USAGE
    try:
        rg: Any = importlib.import_module("argilla")
    except ImportError:
        sys.stderr.write(
            "streamfeedback: error: pushing to Argilla needs the Argilla SDK: "
            "pip install 'streamfeedback[argilla]' (or write records for it with "
            "--to FILE.jsonl --format argilla)\n"
        )
        return EXIT_USAGE
    shape = _Shape()
    for _, record in iter_records(args.input):
        shape.add(record)
    spec = shape.settings()
    settings = rg.Settings(
        guidelines=spec["guidelines"],
        fields=[
            rg.TextField(name=f["name"], title=f["title"], required=f["required"])
            for f in spec["fields"]
        ],
        questions=[
            rg.RatingQuestion(
                name=q["name"], title=q["title"], values=q["values"], required=q["required"]
            )
            if q["type"] == "rating"
            else rg.TextQuestion(name=q["name"], title=q["title"], required=q["required"])
            for q in spec["questions"]
        ],
        metadata=[
            rg.TermsMetadataProperty(name=m["name"])
            if m["type"] == "terms"
            else rg.FloatMetadataProperty(name=m["name"])
            for m in spec["metadata"]
        ],
    )
    client = rg.Argilla()
    dataset = rg.Dataset(
        name=name, workspace=args.argilla_workspace, settings=settings, client=client
    )
    dataset.create()
    pending: list[Any] = []
    sent = 0
    for _, record in iter_records(args.input):
        data = argilla_record(record)
        pending.append(
            rg.Record(
                id=data["id"],
                fields=data["fields"],
                metadata=data["metadata"],
                suggestions=[rg.Suggestion(type="model", **s) for s in data["suggestions"]],
            )
        )
        if len(pending) >= batch:
            dataset.records.log(pending)
            sent += len(pending)
            pending = []
    if pending:
        dataset.records.log(pending)
        sent += len(pending)
    log.info("pushed %d records to the Argilla dataset %s", sent, name)
    return EXIT_OK
