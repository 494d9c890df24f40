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

from .parser import reads_as_marker

__all__ = ["neutralize"]

_BREAKS = re.compile("\r\n?|[\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")
_TAG = re.compile(r"<(\s*/?\s*text\b[^<>\n]{0,24})>", re.IGNORECASE)
_INPUT_LABEL = re.compile(r"[ \t>*_#]*(?:instruction|texts?|input)\b[^:\n]{0,24}:", re.IGNORECASE)


def neutralize(text: str) -> str:
    """`text` as the judge may see it: no line of it reads as one of our markers."""
    text = _TAG.sub(r"(\1)", _BREAKS.sub("\n", text))
    first, sep, rest = text.partition("\n")
    if not sep:
        return text  # it follows our own tag or label on that line: no line start to take
    lines = rest.split("\n")
    return "\n".join([first, *(f"> {line}" if _suspect(line) else line for line in lines)])


def _suspect(line: str) -> bool:
    return bool(_INPUT_LABEL.match(line)) or reads_as_marker(line)
