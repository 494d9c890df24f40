"""DPO pairs from a run's output, as the Zephyr recipe makes them.

Per record: `chosen` is the response with the highest score (the first by index when several
share it), `rejected` a random one of the responses scored strictly lower (seeded per prompt
id, so the pairs do not depend on the order of the file), or the lowest with
`--strategy min`. Unrated (null) responses never take part; a record with fewer than two
rated responses, or whose rated responses all tie, yields no pair. The score is the judge's
rating for single-aspect runs and the fine-grained score (mean over aspects) for multi-aspect
runs, unless `--aspect` or `--score` says otherwise. Reads and writes one line at a time, so
outputs larger than memory work. Pairs go to stdout (or -o) as JSONL; the counts to stderr.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
from typing import IO, Literal

import msgspec

from .._records import Message, Record
from ._card import iter_records

__all__ = ["Pair", "binarize_record", "configure_parser", "main"]

log = logging.getLogger("streamfeedback")

HELP = "DPO pairs (prompt, chosen, rejected, scores) from a run's NDJSON output"

Strategy = Literal["random", "min"]
ScoreKind = Literal["auto", "rating", "fine-grained"]


class Pair(msgspec.Struct, frozen=True, kw_only=True):
    """One DPO pair: chat message lists as TRL's DPO trainer and the Zephyr recipe take them."""

    prompt: str
    prompt_id: str
    chosen: list[Message]
    rejected: list[Message]
    score_chosen: float
    score_rejected: float
    chosen_model: str
    rejected_model: str


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="the run's NDJSON output ('-' for stdin)")
    parser.add_argument("-o", "--output", help="write pairs to PATH instead of stdout ('-')")
    parser.add_argument(
        "--strategy",
        choices=["random", "min"],
        default="random",
        help="rejected = a random lower-scored response (default) or the lowest-scored one",
    )
    parser.add_argument(
        "--seed", type=int, default=42, help="seed of the random choice, per prompt (default 42)"
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--aspect",
        help="score responses by this aspect's ratings (multi-aspect runs, or the run's aspect)",
    )
    which.add_argument(
        "--score",
        choices=["auto", "rating", "fine-grained"],
        default="auto",
        help="auto (default): fine-grained score where the record has one, else the rating",
    )


def scores_of(
    record: Record, *, aspect: str | None = None, score: ScoreKind = "auto"
) -> list[float | None] | None:
    """The score of each response, or None when the record does not have the one asked for."""
    if aspect is not None:
        if record.aspects is not None:
            result = record.aspects.get(aspect)
            return None if result is None else [_num(r) for r in result.ratings]
        if record.aspect == aspect:
            return [_num(r) for r in record.ratings]
        return None
    if score == "fine-grained" or (score == "auto" and record.fine_grained_score is not None):
        return None if record.fine_grained_score is None else list(record.fine_grained_score)
    return [_num(r) for r in record.ratings]


def _num(rating: int | None) -> float | None:
    return None if rating is None else float(rating)


def binarize_record(
    record: Record,
    scores: list[float | None],
    *,
    strategy: Strategy = "random",
    seed: int = 42,
) -> Pair | str:
    """The pair for one record, or the reason there is none ("unrated" or "tie")."""
    rated = [(i, s) for i, s in enumerate(scores) if s is not None and i < len(record.generations)]
    if len(rated) < 2:
        return "unrated"
    best = max(s for _, s in rated)
    chosen = next(i for i, s in rated if s == best)
    lower = [(i, s) for i, s in rated if s < best]
    if not lower:
        return "tie"
    if strategy == "min":
        worst = min(s for _, s in lower)
        rejected = next(i for i, s in lower if s == worst)
    else:
        rejected = random.Random(f"{seed}:{record.id}").choice(lower)[0]
    user = Message("user", record.instruction)
    return Pair(
        prompt=record.instruction,
        prompt_id=record.id,
        chosen=[user, Message("assistant", record.generations[chosen])],
        rejected=[user, Message("assistant", record.generations[rejected])],
        score_chosen=best,
        score_rejected=_float(scores[rejected]),
        chosen_model=record.generation_models[chosen],
        rejected_model=record.generation_models[rejected],
    )


def _float(value: float | None) -> float:
    assert value is not None
    return value


def main(args: argparse.Namespace) -> int:
    out_path: str | None = args.output if args.output not in (None, "-") else None
    if out_path is not None:
        with open(out_path, "wb") as fh:
            return _binarize(args, fh)
    return _binarize(args, sys.stdout.buffer)


def _binarize(args: argparse.Namespace, out: IO[bytes]) -> int:
    encoder = msgspec.json.Encoder()
    buffer = bytearray()
    counts = {"records": 0, "pairs": 0, "unrated": 0, "tie": 0, "no score": 0}
    for _, record in iter_records(args.input):
        counts["records"] += 1
        scores = scores_of(record, aspect=args.aspect, score=args.score)
        if scores is None:
            counts["no score"] += 1
            continue
        pair = binarize_record(record, scores, strategy=args.strategy, seed=args.seed)
        if isinstance(pair, str):
            counts[pair] += 1
            continue
        counts["pairs"] += 1
        buffer.clear()
        encoder.encode_into(pair, buffer)
        buffer.extend(b"\n")
        try:
            out.write(buffer)
        except BrokenPipeError:
            return 0
        except OSError as exc:
            sys.stderr.write(f"streamfeedback: error: cannot write pairs: {exc}\n")
            return 1
    try:
        out.flush()
    except BrokenPipeError:
        return 0
    share = 100.0 * counts["pairs"] / counts["records"] if counts["records"] else 0.0
    missing = ""
    if counts["no score"]:
        what = f"aspect {args.aspect!r}" if args.aspect else "fine-grained score"
        missing = f", {counts['no score']} without the {what}"
    log.info(
        "binarize: %d of %d prompts yielded a pair (%.1f%%); skipped: %d with fewer than two "
        "rated responses, %d with every rated response tied%s",
        counts["pairs"],
        counts["records"],
        share,
        counts["unrated"],
        counts["tie"],
        missing,
    )
    return 0
