"""The regex a guided judge's answer must match: the aspect's exact block layout.

A local judge (vLLM, or a server that takes vLLM's `structured_outputs`) decodes under this
regex, so its answer always has one tidy block per text, in order, with a readable rating.
Rationales are one line of printable ASCII, and their length is bounded so the whole answer
fits in `max_tokens`: a byte-level tokenizer spends at most one token per ASCII byte, so an
answer of at most `max_tokens - 1` bytes always ends (with room for the end token) before it
is cut off.
"""

from __future__ import annotations

import functools

from .aspects import ASPECTS

__all__ = ["MAX_RATIONALE", "answer_regex", "min_guided_tokens"]

MAX_RATIONALE = 400
"""Characters per rationale at most: a sentence or two, as the prompt asks."""

_RATIONALE_HEAD = "[A-Za-z0-9(]"  # not a space, `*` or `_`: the parser's tidy reading
_RATIONALE_TAIL = "[ -~]"  # printable ASCII, no newline


def _fixed_bytes(aspect: str, n: int) -> tuple[int, int]:
    """(bytes of everything but the rationales, at their longest; rationale count)."""
    spec = ASPECTS[aspect]
    per_block = 1 + spec.typed
    rating = "N/A" if spec.allows_na else "5"
    total = 0
    for k in range(1, n + 1):
        block = f"#### Output for Text {k}\n"
        if spec.typed:
            block += "Type: 1, 2, 3\nRationale: \n"
        block += f"Rating: {rating}\nRationale: "
        total += len(block)
    return total + 2 * (n - 1), per_block * n


def min_guided_tokens(aspect: str, n: int) -> int:
    """The least `max_tokens` that leaves every rationale at least one character."""
    fixed, slots = _fixed_bytes(aspect, n)
    return fixed + slots + 1


@functools.lru_cache(maxsize=64)
def answer_regex(aspect: str, n: int, max_tokens: int) -> str:
    """The regex for `n` blocks of `aspect` within `max_tokens` tokens.

    :raises ValueError: unknown aspect, n < 1, or max_tokens too small for n blocks.
    """
    if aspect not in ASPECTS:
        raise ValueError(f"unknown aspect {aspect!r}")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    need = min_guided_tokens(aspect, n)
    if max_tokens < need:
        raise ValueError(
            f"max_tokens {max_tokens} is too small for a guided answer on {n} texts "
            f"(aspect {aspect}): at least {need}"
        )
    fixed, slots = _fixed_bytes(aspect, n)
    length = min(MAX_RATIONALE, (max_tokens - 1 - fixed) // slots)
    rationale = f"{_RATIONALE_HEAD}{_RATIONALE_TAIL}{{0,{length - 1}}}"
    spec = ASPECTS[aspect]
    rating = "([1-5]|N/A)" if spec.allows_na else "[1-5]"
    blocks = []
    for k in range(1, n + 1):
        block = f"#### Output for Text {k}\\n"  # no character here is special in a regex
        if spec.typed:
            block += rf"Type: (None|[1-3](, [1-3]){{0,2}})\nRationale: {rationale}\n"
        block += rf"Rating: {rating}\nRationale: {rationale}"
        blocks.append(block)
    return r"\n\n".join(blocks)
