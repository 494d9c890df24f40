"""Judge-answer parsing: microseconds per answer, tidy shortcut vs the general reading.

    python benchmarks/parser.py                 # 3 texts per answer, 20000 rounds
    python benchmarks/parser.py --texts 4 --rounds 50000

Answers come from the sim judge's layout (the UltraFeedback one) with real-looking
rationales. Prints, measured in one run: a tidy answer through `parse_answer` (which takes
the shortcut), the same answer through the general reading, and an untidy answer (markdown,
preamble, closing remarks), which always takes the general reading.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from streamfeedback._judge.parser import _read_general, parse_answer

RATIONALE = "The text answers the question accurately and clearly, with one minor omission."


def tidy(n: int) -> str:
    return "\n\n".join(
        f"#### Output for Text {k}\nRating: {1 + k % 5}\nRationale: {RATIONALE}"
        for k in range(1, n + 1)
    )


def untidy(n: int) -> str:
    blocks = "\n\n".join(
        f"### **Output for Text {k}:**\n- **Rating:** {1 + k % 5}/5\n- **Rationale:** {RATIONALE}"
        for k in range(1, n + 1)
    )
    return f"Here is my evaluation.\n\n---\n\n{blocks}\n\nIn summary, all texts are fine."


def per_call(fn: Callable[[], object], rounds: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(rounds):
        fn()
    return (time.perf_counter() - start) / rounds * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--texts", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=20000)
    args = parser.parse_args()
    n, rounds = args.texts, args.rounds
    a, b = tidy(n), untidy(n)
    assert parse_answer(a, n) == _read_general(a, n, typed=False, allows_na=False)
    assert [r.rating for r in parse_answer(b, n) if r] == [1 + k % 5 for k in range(1, n + 1)]
    shortcut = per_call(lambda: parse_answer(a, n), rounds)
    general = per_call(lambda: _read_general(a, n, typed=False, allows_na=False), rounds)
    messy = per_call(lambda: parse_answer(b, n), rounds)
    print(f"{n} texts per answer, {rounds} rounds")
    print(f"tidy answer, parse_answer (shortcut):   {shortcut:7.1f} us")
    print(f"tidy answer, general reading:           {general:7.1f} us")
    print(f"untidy answer, parse_answer (general):  {messy:7.1f} us")
    print(f"shortcut speed-up: {general / shortcut:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
