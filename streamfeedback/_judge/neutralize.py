"""What the judge sees of an instruction or a response: the same text, minus our markers.

The annotation prompt frames each response as `<text k> ...` under `Texts:`, and the judge
answers in `#### Output for Text k` / `Rating:` blocks. A response that contains those very
markers (a model quoting a rubric, or an attacker) could make a judge split the texts
differently, or read an answer it wrote itself as a rating for another text. So, in the
judge's copy only (records keep the original):

- `<text k>`-like tags anywhere become `(text k)`;
- a line that reads as one of the template's input labels (`Instruction:`, `Texts:`) or as
  a header or field of an answer block is quoted with `> `, which neither the judge's layout
  nor our parser treats as a marker (the first line follows our own tag, so it is left be);
- every kind of line break becomes `\\n`, so no marker hides behind a bare `\\r`.
"""

from __future__ import annotations

import re

from .parser import MARKER_LINE

__all__ = ["neutralize"]

_BREAKS = re.compile("\r\n?|[\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")
_TAG = re.compile(r"<(\s*/?\s*text\b[^<>\n]{0,24})>", re.IGNORECASE)
# One pass over the text finds every line start to quote (after a newline: the first line
# follows our own tag or label): an input label of the template, or a header or field of an
# answer block. Anchored on the newline, a literal, so the scan is quick.
_SUSPECT = re.compile(
    r"\n(?=[ \t>*_#]*(?:instruction|texts?|input)\b[^:\n]{0,24}:|" + MARKER_LINE.pattern + ")",
    re.IGNORECASE | re.MULTILINE,
)


def neutralize(text: str) -> str:
    """`text` as the judge may see it: no line of it reads as one of our markers."""
    if "\r" in text or "\x0b" in text or "\x0c" in text or not text.isascii():
        text = _BREAKS.sub("\n", text)  # (rare: a scan per character, so only when needed)
    elif "\x1c" in text or "\x1d" in text or "\x1e" in text:
        text = _BREAKS.sub("\n", text)
    return _SUSPECT.sub("\n> ", _TAG.sub(r"(\1)", text))
