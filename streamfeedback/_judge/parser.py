"""Reading a judge's answer back into one rating per text, by the text's number.

A judge writes one `Output for Text k` block per text, but real answers wander: preambles,
closing remarks, markdown, blocks out of order, missing or repeated blocks, `4/5`, `N/A`.
Every block is filed under the number in its own header, never under its position, and a
value that cannot be read is None. A rating is never moved to a neighbour's text, so the
worst a broken answer can do is leave a rating empty (and the judge may then be asked again).
"""

from __future__ import annotations

import re

import msgspec

__all__ = ["MARKER_LINE", "BlockRating", "parse_answer", "reads_as_marker"]


class BlockRating(msgspec.Struct, frozen=True, kw_only=True):
    """What the judge said about one text."""

    rating: int | None
    not_applicable: bool = False
    rationale: str | None = None
    types: list[int] | None = None
    types_rationale: str | None = None


_BOLD = r"(?:\*\*|__)"

# An answer in exactly the layout the prompt asks for, one block at a time:
# `#### Output for Text k` / `Rating: r` / `Rationale: one line`, blocks apart by a blank line.
# Most judge answers are this tidy; `_read_tidy` reads them without the general machinery and
# gives what the general reading would (a test holds the two to that).
_TIDY_BLOCK = re.compile(
    r"#### Output for Text ([1-9]\d{0,5})\nRating: ([1-5])\nRationale: ([^\s*_][^\n]*)"
    r"(?:\n\n(?=#)|[ \t\n]*\Z)"
)

# A line that is only a block header: `#### Output for Text 2`, `**Output for Text 2:**`,
# `### **Text 2**`, `Text 2:`. A bare `Text 2` line, without any of those marks, is not.
_HEADER = re.compile(
    rf"^[ \t]*(?P<hashes>\#{{1,6}})?[ \t]*(?P<bold>{_BOLD})?[ \t]*"
    r"(?P<out>output[ \t]+for[ \t]+)?text[ \t]*\#?[ \t]*(?P<num>\d{1,6})"
    rf"[ \t]*(?P<colon>:)?[ \t]*{_BOLD}?[ \t]*(?P<c2>:)?[ \t]*\#*[ \t]*$",
    re.IGNORECASE | re.MULTILINE,
)

# A field label at the start of a line, markdown or list bullet allowed around it:
# `Rating: 4`, `**Rating:** 4`, `**Rating**: 4`, `- Rationale (rating): ...`.
_FIELD = re.compile(
    rf"^[ \t]*(?:[-*+][ \t]+)?{_BOLD}?[ \t]*(?:overall[ \t]+)?"
    r"(?P<label>type\(s\)|types?|rationale|rating)"
    r"(?:[ \t]*\([^)\n]{0,40}\)|[ \t]+for[ \t]+(?:the[ \t]+)?(?:rating|types?))?"
    rf"[ \t]*{_BOLD}?[ \t]*:[ \t]*{_BOLD}?",
    re.IGNORECASE | re.MULTILINE,
)

# Where a block's text ends early: a horizontal rule or a markdown heading line.
_STOP = re.compile(
    r"^[ \t]*(?:(?:-[ \t]*){3,}|(?:\*[ \t]*){3,}|(?:_[ \t]*){3,}|\#{1,6}[ \t]+\S.*)$",
    re.MULTILINE,
)

# A paragraph start inside the last block, tested against _CLOSING to drop closing remarks.
_PARAGRAPH = re.compile(r"\n[ \t]*\n[ \t>*_]*(?=\S)")
_CLOSING = re.compile(
    r"(?:in[ \t]+summary|to[ \t]+summari[sz]e|summary|in[ \t]+conclusion|conclusion|"
    r"final[ \t]+(?:ranking|thoughts|verdict|notes?)|rankings?|ranked|in[ \t]+comparison|"
    r"comparing[ \t]+(?:the|all|these)|let[ \t]+me[ \t]+know|i[ \t]+hope|hope[ \t]+this|"
    r"these[ \t]+(?:ratings|evaluations|annotations|assessments)|"
    r"(?:all|both|each[ \t]+of)[ \t]+(?:the[ \t]+)?(?:\w+[ \t]+)?(?:texts|responses|outputs))\b",
    re.IGNORECASE,
)
_OVERALL = re.compile(r"(?:overall|in[ \t]+general|generally)\b", re.IGNORECASE)
_OTHER_TEXTS = re.compile(
    r"\b(?:texts|responses|outputs)\b|\btext[ \t]*(\d{1,6})\b|"
    r"\b(?:of|among)[ \t]+(?:the|all)[ \t]+(?:two|three|four|five|six|seven|eight|nine|ten)\b",
    re.IGNORECASE,
)

_MARKUP = " \t*_`[]()"
_NA = re.compile(r"(?:n[ \t]*/[ \t]*a|na|not[ \t]+applicable)\b", re.IGNORECASE)
_NUMBER = re.compile(r"(\d{1,9})(?:\.0+)?(?!\d)")
_SCALE = re.compile(r"[ \t]*(?:/|out[ \t]+of)[ \t]*(\d{1,9})(?!\d)", re.IGNORECASE)
_AMBIGUOUS_TAIL = re.compile(
    r"[ \t]*(?:[-\u2013\u2014/.,]|or\b|to\b|and\b)?[ \t]*\d", re.IGNORECASE
)
_NO_TYPES = re.compile(r"(?:none|n[ \t]*/[ \t]*a|no[ \t]+types?|-+)(?![\w])", re.IGNORECASE)
_TYPE_ID = re.compile(r"(?<!\d)(\d{1,3})(?!\d)")
# Type names of the two typed aspects; their key words do not overlap, so the aspect is not
# needed to read them. Used only when a judge names its types instead of giving ids.
_TYPE_NAMES = (
    (re.compile(r"clarity|relevan", re.I), 1),
    (re.compile(r"useful|comprehensive", re.I), 2),
    (re.compile(r"lengthy|repetit", re.I), 3),
    (re.compile(r"with[ \t]+the[ \t]+world|factual", re.I), 1),
    (re.compile(r"with[ \t]+instruction", re.I), 2),
    (re.compile(r"self[- \t]*contradict|logical", re.I), 3),
)


def parse_answer(
    answer: str, n: int, *, typed: bool = False, allows_na: bool = False
) -> list[BlockRating | None]:
    """Index i belongs to text i+1, read by the block's text NUMBER, never by its position.

    None means that text's block is missing. Blocks for numbers outside 1..n are ignored.
    When a text has several blocks whose ratings disagree, its rating is None.

    :raises ValueError: n is negative.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if "\r" in answer:
        answer = answer.replace("\r\n", "\n").replace("\r", "\n")
    tidy = _read_tidy(answer, n)
    if tidy is not None:
        return tidy
    return _read_general(answer, n, typed=typed, allows_na=allows_na)


MARKER_LINE = re.compile(rf"(?:{_HEADER.pattern})|(?:{_FIELD.pattern})", re.I | re.M)
"""A line start that would read as a block header or a field label in a judge's answer."""


def reads_as_marker(line: str) -> bool:
    """Whether one line would read as a block header or a field label in a judge's answer."""
    return bool(MARKER_LINE.match(line))


def _read_general(answer: str, n: int, *, typed: bool, allows_na: bool) -> list[BlockRating | None]:
    """Any answer, however it wanders (`parse_answer` without the tidy shortcut)."""
    found: list[list[BlockRating]] = [[] for _ in range(n)]
    headers = [
        m for m in _HEADER.finditer(answer) if any(m.group("out", "hashes", "bold", "colon", "c2"))
    ]
    if not headers and n == 1:
        # With one text there is nothing to misalign: a headerless answer is its block.
        block = _read_block(answer, 0, len(answer), 1, last=True, typed=typed, na=allows_na)
        if block is not None:
            found[0].append(block)
    for i, header in enumerate(headers):
        num = int(header.group("num"))
        if not 1 <= num <= n:
            continue
        last = i + 1 == len(headers)
        end = len(answer) if last else headers[i + 1].start()
        block = _read_block(answer, header.end(), end, num, last=last, typed=typed, na=allows_na)
        if block is not None:
            found[num - 1].append(block)
    return [_merge(blocks) for blocks in found]


def _read_tidy(answer: str, n: int) -> list[BlockRating | None] | None:
    """The blocks of a tidy answer, each text at most once; None if it is not that tidy."""
    out: list[BlockRating | None] = [None] * n
    pos, end = 0, len(answer)
    match = _TIDY_BLOCK.match
    while pos < end:
        block = match(answer, pos)
        if block is None:
            return None
        num = int(block.group(1))
        if num > n or out[num - 1] is not None:
            return None
        out[num - 1] = BlockRating(rating=int(block.group(2)), rationale=_clean(block.group(3)))
        pos = block.end()
    return out if pos else None


def _read_block(
    text: str, start: int, end: int, num: int, *, last: bool, typed: bool, na: bool
) -> BlockRating | None:
    """One block's fields, from its header's end to the next header; None if it has none."""
    fields = list(_FIELD.finditer(text, start, end))
    if not fields:
        return None
    if last:
        end = _closing_start(text, fields, end, num)
        fields = [f for f in fields if f.start() < end]
    ratings: list[tuple[int | None, bool]] = []
    rating_tail: str | None = None
    types: list[int] | None = None
    seen_type = False
    seen_rating = False
    before: list[tuple[str | None, bool]] = []  # rationales before the rating, after a Type:?
    after: str | None = None
    for i, field in enumerate(fields):
        value_end = fields[i + 1].start() if i + 1 < len(fields) else end
        stop = _STOP.search(text, field.end(), value_end)
        value = text[field.end() : value_end if stop is None else stop.start()]
        label = field.group("label").lower()
        if label == "rating":
            line, _, rest = value.strip().partition("\n")
            ratings.append(_read_rating(line, na))
            if not seen_rating:
                rating_tail = _clean(rest)
            seen_rating = True
        elif label == "rationale":
            if seen_rating:
                if after is None:
                    after = _clean(value)
            else:
                before.append((_clean(value), seen_type))
        elif not seen_type:
            seen_type = True
            types = _read_types(value) if typed else None
    rating, not_applicable = ratings[0] if ratings else (None, False)
    if any(r != ratings[0] for r in ratings[1:]):
        rating, not_applicable = None, False
    types_rationale = None
    if typed:
        types_rationale = next((r for r, after_type in before if after_type), None)
        spare = next((r for r, after_type in before if not after_type), None)
    else:
        spare = before[0][0] if before else None
    rationale = after or spare or rating_tail
    return BlockRating(
        rating=rating,
        not_applicable=not_applicable,
        rationale=rationale,
        types=types,
        types_rationale=types_rationale,
    )


def _closing_start(text: str, fields: list[re.Match[str]], end: int, num: int) -> int:
    """Where closing remarks begin in the last block: a paragraph after its first rating
    that speaks of all the texts. Never earlier, so a rating is never cut off."""
    first_rating = next((f for f in fields if f.group("label").lower() == "rating"), None)
    if first_rating is None:
        return end
    for para in _PARAGRAPH.finditer(text, first_rating.end(), end):
        if _is_closing(text, para.end(), num):
            return para.start()
    return end


def _is_closing(text: str, at: int, num: int) -> bool:
    """Whether the paragraph at `at` talks about the whole answer rather than text `num`."""
    if _CLOSING.match(text, at):
        return True
    if not _OVERALL.match(text, at):
        return False
    line_end = text.find("\n", at)
    line = text[at : line_end if line_end >= 0 else len(text)]
    return any(m.group(1) is None or int(m.group(1)) != num for m in _OTHER_TEXTS.finditer(line))


def _clean(value: str) -> str | None:
    """A rationale without surrounding whitespace or stray bold markers; None when empty."""
    value = value.strip()
    if value.startswith(("**", "__")) and value.count(value[:2]) % 2:
        value = value[2:].lstrip()
    if value.endswith(("**", "__")) and value.count(value[-2:]) % 2:
        value = value[:-2].rstrip()
    return value or None


def _read_rating(line: str, na: bool) -> tuple[int | None, bool]:
    """(rating, not_applicable) from a Rating: value such as `4`, `**4**`, `4/5`, `N/A.`."""
    line = line.strip(_MARKUP)
    if _NA.match(line):
        return None, na
    number = _NUMBER.match(line)
    if number is None:
        return None, False
    pos = number.end()
    scale = _SCALE.match(line, pos)
    if scale is not None:
        if scale.group(1) != "5":
            return None, False
        pos = scale.end()
    if _AMBIGUOUS_TAIL.match(line, pos):
        return None, False
    rating = int(number.group(1))
    return (rating, False) if 1 <= rating <= 5 else (None, False)


def _read_types(value: str) -> list[int] | None:
    """Type ids from `1, 3`, `[1, 2]`, `1 and 3` or names; [] for `None`; None if unreadable."""
    line = value.strip().partition("\n")[0].strip(_MARKUP)
    if _NO_TYPES.match(line):
        return []
    ids = {int(m) for m in _TYPE_ID.findall(line)}
    if not ids:
        ids = {tid for pattern, tid in _TYPE_NAMES if pattern.search(line)}
    kept = sorted(i for i in ids if 1 <= i <= 3)
    return kept or None


def _merge(blocks: list[BlockRating]) -> BlockRating | None:
    """One text's blocks as one: kept when they agree, emptied where they disagree."""
    if not blocks:
        return None
    first = blocks[0]
    if len(blocks) == 1:
        return first
    agree = all(
        (b.rating, b.not_applicable) == (first.rating, first.not_applicable) for b in blocks
    )
    with_types = [b for b in blocks if b.types is not None]  # no Type: line, no vote
    types_agree = bool(with_types) and all(b.types == with_types[0].types for b in with_types)
    return BlockRating(
        rating=first.rating if agree else None,
        not_applicable=first.not_applicable if agree else False,
        rationale=next((b.rationale for b in blocks if b.rationale), None) if agree else None,
        types=with_types[0].types if types_agree else None,
        types_rationale=(
            next((b.types_rationale for b in with_types if b.types_rationale), None)
            if types_agree
            else None
        ),
    )
