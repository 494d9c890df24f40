from __future__ import annotations

import random
import re

import pytest

from streamfeedback._judge.parser import BlockRating, _read_general, _read_tidy, parse_answer


def ratings(answer: str, n: int, **kw: bool) -> list[int | None]:
    return [None if b is None else b.rating for b in parse_answer(answer, n, **kw)]


def block(k: int, rating: object, rationale: str = "fine") -> str:
    return f"#### Output for Text {k}\nRating: {rating}\nRationale: {rationale}"


PLAIN = "\n\n".join(block(k, r, f"why {k}") for k, r in [(1, 4), (2, 2), (3, 5)])


def test_plain_answer() -> None:
    assert parse_answer(PLAIN, 3) == [
        BlockRating(rating=4, rationale="why 1"),
        BlockRating(rating=2, rationale="why 2"),
        BlockRating(rating=5, rationale="why 3"),
    ]


def test_preamble_and_closing_remarks() -> None:
    answer = f"Here is my evaluation of the texts:\n\n{PLAIN}\n\nLet me know if you need more."
    parsed = parse_answer(answer, 3)
    assert ratings(answer, 3) == [4, 2, 5]
    assert parsed[2] is not None and parsed[2].rationale == "why 3"


@pytest.mark.parametrize(
    "closing",
    [
        "In summary, Text 3 is the best and Text 2 the weakest.",
        "Overall, Text 3 is the strongest of the three.",
        "**Ranking:** Text 3 > Text 1 > Text 2",
        "All three texts answer the question.",
        "---\n\nThese ratings reflect accuracy.",
        "### Summary\nText 3 wins.",
    ],
)
def test_closing_remarks_do_not_leak_into_the_last_rationale(closing: str) -> None:
    parsed = parse_answer(f"{PLAIN}\n\n{closing}\n", 3)
    assert [b.rating for b in parsed if b] == [4, 2, 5]
    assert parsed[2] is not None and parsed[2].rationale == "why 3"


def test_own_conclusion_stays_in_the_last_rationale() -> None:
    answer = f"{PLAIN}\n\nOverall, this text is a strong answer."
    parsed = parse_answer(answer, 3)
    assert parsed[2] is not None
    assert parsed[2].rationale == "why 3\n\nOverall, this text is a strong answer."


def test_trailing_horizontal_rules_are_stripped() -> None:
    answer = "\n\n---\n\n".join(block(k, k, f"why {k}") for k in (1, 2)) + "\n\n---\n"
    parsed = parse_answer(answer, 2)
    assert [b.rationale for b in parsed if b] == ["why 1", "why 2"]


def test_blank_lines_after_headers_and_multi_paragraph_rationales() -> None:
    answer = (
        "#### Output for Text 1\n\n\nRating: 3\nRationale: First paragraph.\n\n"
        "Second paragraph.\n\n  Third.  \n\n"
        "#### Output for Text 2\n\nRating: 1\n\nRationale:\n\nOnly one.\n"
    )
    parsed = parse_answer(answer, 2)
    assert parsed == [
        BlockRating(rating=3, rationale="First paragraph.\n\nSecond paragraph.\n\n  Third."),
        BlockRating(rating=1, rationale="Only one."),
    ]


@pytest.mark.parametrize(
    "header",
    [
        "### Output for Text 2",
        "#### Output for Text 2",
        "##### Output for Text 2",
        "**Output for Text 2**",
        "**Output for Text 2:**",
        "### **Output for Text 2**",
        "#### Output for Text 2:",
        "#### Text 2",
        "Text 2:",
        "**Text 2:**",
        "  #### output for text 2  ",
    ],
)
def test_header_shapes(header: str) -> None:
    answer = f"{block(1, 1)}\n\n{header}\nRating: 4\nRationale: ok"
    assert ratings(answer, 2) == [1, 4]


@pytest.mark.parametrize(
    ("line", "rating"),
    [
        ("Rating: 4", 4),
        ("**Rating:** 4", 4),
        ("**Rating**: 4", 4),
        ("Rating: **4**", 4),
        ("- **Rating:** 4", 4),
        ("Rating: 4/5", 4),
        ("Rating: 4 / 5", 4),
        ("Rating: 4 out of 5", 4),
        ("Rating: 4 (Very Good)", 4),
        ("Rating: 4 - Very Good", 4),
        ("Rating: 4.", 4),
        ("Rating: 4.0", 4),
        ("Rating: [4]", 4),
        ("Rating:\n4", 4),
        ("rating: 4", 4),
        ("Rating: high", None),
        ("Rating: 0", None),
        ("Rating: 6", None),
        ("Rating: 10", None),
        ("Rating: -1", None),
        ("Rating: 4.5", None),
        ("Rating: 3-4", None),
        ("Rating: 3 or 4", None),
        ("Rating: 3 4", None),
        ("Rating: 4, 5", None),
        ("Rating: 4/10", None),
        ("Rating: 99999999999999999999", None),
        ("Rating:", None),
    ],
)
def test_rating_values(line: str, rating: int | None) -> None:
    answer = f"#### Output for Text 1\n{line}\nRationale: because\n\n{block(2, 3)}"
    assert ratings(answer, 2) == [rating, 3]


@pytest.mark.parametrize("value", ["N/A", "N/A.", "n/a", "**N/A**", "Not applicable"])
def test_not_applicable(value: str) -> None:
    answer = f"#### Output for Text 1\nRating: {value}\nRationale: a poem\n\n{block(2, 5)}"
    with_na = parse_answer(answer, 2, allows_na=True)
    assert with_na[0] == BlockRating(rating=None, not_applicable=True, rationale="a poem")
    without = parse_answer(answer, 2)
    assert without[0] == BlockRating(rating=None, not_applicable=False, rationale="a poem")
    assert ratings(answer, 2) == [None, 5]


def test_crlf_line_endings() -> None:
    parsed = parse_answer(PLAIN.replace("\n", "\r\n"), 3)
    assert [b.rating for b in parsed if b] == [4, 2, 5]
    assert parsed[0] is not None and parsed[0].rationale == "why 1"


def test_blocks_out_of_order_are_read_by_number() -> None:
    answer = "\n\n".join([block(3, 5, "c"), block(1, 4, "a"), block(2, 2, "b")])
    parsed = parse_answer(answer, 3)
    assert [(b.rating, b.rationale) for b in parsed if b] == [(4, "a"), (2, "b"), (5, "c")]


def test_fewer_blocks_than_texts() -> None:
    answer = "\n\n".join([block(1, 4), block(3, 5)])
    assert ratings(answer, 3) == [4, None, 5]
    assert parse_answer(answer, 3)[1] is None


def test_more_blocks_than_texts_are_ignored() -> None:
    answer = "\n\n".join([block(1, 4), block(2, 2), block(3, 5), block(0, 1)])
    assert ratings(answer, 2) == [4, 2]


def test_duplicate_blocks_that_disagree_empty_the_rating() -> None:
    answer = "\n\n".join([block(1, 4), block(2, 2), block(1, 5, "changed my mind")])
    parsed = parse_answer(answer, 2)
    assert parsed[0] == BlockRating(rating=None, rationale=None)
    assert parsed[1] is not None and parsed[1].rating == 2


def test_duplicate_blocks_that_agree_are_kept() -> None:
    answer = "\n\n".join([block(1, 4, "first"), block(2, 2), block(1, 4, "again")])
    assert parse_answer(answer, 2)[0] == BlockRating(rating=4, rationale="first")


def test_two_ratings_in_one_block_that_disagree() -> None:
    answer = "#### Output for Text 1\nRating: 4\nRationale: x\nRating: 2\nRationale: y"
    assert ratings(answer, 1) == [None]


def test_a_bare_text_line_is_not_a_header() -> None:
    answer = f"{block(1, 4, 'good')}\nText 2\nRating: 1\n\n{block(2, 3)}"
    assert ratings(answer, 2) == [None, 3]


def test_a_block_without_fields_is_no_block() -> None:
    answer = f"#### Output for Text 1\nI cannot rate this.\n\n{block(2, 3)}"
    assert parse_answer(answer, 2)[0] is None


def test_headerless_answer_counts_only_for_one_text() -> None:
    answer = "Rating: 4\nRationale: good"
    assert parse_answer(answer, 1) == [BlockRating(rating=4, rationale="good")]
    assert parse_answer(answer, 2) == [None, None]


def test_zero_texts_and_empty_answers() -> None:
    assert parse_answer(PLAIN, 0) == []
    assert parse_answer("", 3) == [None, None, None]
    with pytest.raises(ValueError):
        parse_answer(PLAIN, -1)


def typed_block(k: int, types: str, rating: object) -> str:
    return (
        f"#### Output for Text {k}\nType: {types}\nRationale: types {k}\n"
        f"Rating: {rating}\nRationale: rating {k}"
    )


def test_typed_block_splits_the_two_rationales() -> None:
    parsed = parse_answer(typed_block(1, "1, 3", 4), 1, typed=True)
    assert parsed == [
        BlockRating(rating=4, rationale="rating 1", types=[1, 3], types_rationale="types 1")
    ]


@pytest.mark.parametrize(
    ("value", "types"),
    [
        ("1, 3", [1, 3]),
        ("3, 1", [1, 3]),
        ("1,2,3", [1, 2, 3]),
        ("None", []),
        ("none.", []),
        ("**None**", []),
        ("[1, 2]", [1, 2]),
        ("1 and 3", [1, 3]),
        ("2 (Useful and Comprehensive Information)", [2]),
        ("1, 4", [1]),
        ("0, 2, 7", [2]),
        ("5", None),
        ("Clarity and Relevance, Not Lengthy, No Repetition", [1, 3]),
        ("unsure", None),
        ("", None),
    ],
)
def test_type_values(value: str, types: list[int] | None) -> None:
    parsed = parse_answer(typed_block(1, value, 3), 1, typed=True)
    assert parsed[0] is not None
    assert parsed[0].types == types
    assert parsed[0].rating == 3


def test_typed_block_with_markdown() -> None:
    answer = (
        "**Output for Text 1**\n\n**Type:** 2\n**Rationale:** informative\n"
        "**Rating:** **5**\n**Rationale:** excellent"
    )
    assert parse_answer(answer, 1, typed=True) == [
        BlockRating(rating=5, rationale="excellent", types=[2], types_rationale="informative")
    ]


def test_missing_type_line_is_none_not_empty() -> None:
    parsed = parse_answer(block(1, 3, "only a rating"), 1, typed=True)
    assert parsed == [BlockRating(rating=3, rationale="only a rating", types=None)]


def test_untyped_parse_ignores_type_lines() -> None:
    parsed = parse_answer(typed_block(1, "1", 2), 1)
    assert parsed == [BlockRating(rating=2, rationale="rating 1")]


def test_rationale_before_rating_in_an_untyped_block() -> None:
    answer = "#### Output for Text 1\nRationale: said first\nRating: 2"
    assert parse_answer(answer, 1) == [BlockRating(rating=2, rationale="said first")]


TRICKY_RATIONALES = [
    "x",
    "The text is accurate and clear, with minor omissions.",
    "ends in bold**",
    "has **bold** inside and a trailing space   ",
    "mentions Rating: 3 and Text 2: in passing",
    "--- not a rule here",
    "# not a heading here",
    "In summary, it is fine.",
    "unicode \u2713 and tabs\tinside",
    "some __underscored__ words__",
]


def _tidy_answer(rng: random.Random, n: int) -> tuple[str, dict[int, tuple[int, str]]]:
    written = {}
    for k in range(1, n + 1):
        if rng.random() < 0.85:
            written[k] = (rng.randint(1, 5), rng.choice(TRICKY_RATIONALES))
    order = list(written)
    rng.shuffle(order)
    blocks = [
        f"#### Output for Text {k}\nRating: {written[k][0]}\nRationale: {written[k][1]}"
        for k in order
    ]
    return "\n\n".join(blocks) + rng.choice(["", "\n", "\n\n", "  \n"]), written


@pytest.mark.parametrize(("typed", "allows_na"), [(False, False), (True, True)])
def test_tidy_answers_take_the_shortcut_and_read_as_the_general_reading_does(
    typed: bool, allows_na: bool
) -> None:
    for seed in range(2000):
        rng = random.Random(seed)
        n = rng.randint(1, 6)
        answer, written = _tidy_answer(rng, n)
        if not written:
            continue
        assert _read_tidy(answer, n) is not None, answer
        parsed = parse_answer(answer, n, typed=typed, allows_na=allows_na)
        assert parsed == _read_general(answer, n, typed=typed, allows_na=allows_na), answer
        for k in range(1, n + 1):
            block = parsed[k - 1]
            if k in written:
                assert block is not None and block.rating == written[k][0], answer
            else:
                assert block is None, answer


UNTIDY_EDITS = [
    lambda a: "Here are my ratings:\n\n" + a,
    lambda a: a + "\n\nIn summary, Text 1 is best.",
    lambda a: a.replace("\n\n", "\n\n\n", 1),
    lambda a: a.replace("Text 1\n", "Text 01\n"),
    lambda a: a.replace("Text 1\n", "Text 9\n"),
    lambda a: a.replace("Rating: ", "Rating: 0", 1),
    lambda a: a.replace("Rating: ", "**Rating:** ", 1),
    lambda a: a.replace("Rationale: ", "Rationale: **", 1),
    lambda a: a.replace("Rationale: ", "Rationale:\n", 1),
    lambda a: a + "\n\n" + a.partition("\n\n")[0],
    lambda a: a.replace("#### ", "### ", 1),
    lambda a: a.replace("\nRationale: ", "\nRationale: a\n\nsecond paragraph ", 1),
]


@pytest.mark.parametrize("edit", range(len(UNTIDY_EDITS)))
def test_nearly_tidy_answers_read_as_the_general_reading_does(edit: int) -> None:
    for seed in range(300):
        rng = random.Random(seed)
        n = rng.randint(1, 4)
        answer, _ = _tidy_answer(rng, n)
        answer = UNTIDY_EDITS[edit](answer)
        for typed in (False, True):
            assert parse_answer(answer, n, typed=typed, allows_na=typed) == _read_general(
                answer, n, typed=typed, allows_na=typed
            ), answer


# Alignment, property-style: random ratings, shuffled blocks, random untidiness.

PREAMBLES = ["", "Here is my evaluation:\n\n", "Sure! Below are the ratings.\n\n---\n\n"]
CLOSINGS = [
    "",
    "\n\nLet me know if you need anything else.",
    "\n\n---\n",
    "\n\nOverall, Text 1 wins.",
]


def _header(rng: random.Random, k: int) -> str:
    hashes = "#" * rng.randint(3, 5)
    return rng.choice(
        [
            f"{hashes} Output for Text {k}",
            f"**Output for Text {k}**",
            f"{hashes} **Output for Text {k}**",
            f"**Output for Text {k}:**",
        ]
    )


def _rating_line(rng: random.Random, rating: int) -> str:
    value = rng.choice([f"{rating}", f"**{rating}**", f"{rating}/5", f"{rating}.", f"{rating} (x)"])
    label = rng.choice(["Rating:", "**Rating:**", "**Rating**:"])
    return f"{label} {value}"


TYPE_VALUES = {"1, 3": [1, 3], "None": [], "[2]": [2], "1 and 2": [1, 2], "**3, 1**": [1, 3]}


def _random_answer(
    rng: random.Random, n: int, typed: bool
) -> tuple[str, list[int], list[list[int] | None], set[int]]:
    """An answer for n texts: the rating and types written for each, and the texts it breaks."""
    written = [rng.randint(1, 5) for _ in range(n)]
    written_types: list[list[int] | None] = [None] * n
    broken: set[int] = set()
    blocks = []
    for k in range(1, n + 1):
        fate = rng.random()
        if fate < 0.1:
            broken.add(k)  # dropped
            continue
        rating_line = _rating_line(rng, written[k - 1])
        if fate < 0.18:
            broken.add(k)
            rating_line = rng.choice(["Rating: high", "Rating: 7", "Rating: ?", "Rating: 2-3"])
        lines = [_header(rng, k)]
        if rng.random() < 0.3:
            lines.append("")
        if typed:
            value = rng.choice(sorted(TYPE_VALUES))
            written_types[k - 1] = TYPE_VALUES[value]
            lines += [f"Type: {value}", f"Rationale: types of {k}"]
        lines.append(rating_line)
        rationale = f"Rationale: about text {k}."
        if rng.random() < 0.3:
            rationale += "\n\nA second paragraph about it.\nRating of 3 would be too low."
        lines.append(rationale)
        blocks.append("\n".join(lines))
        if rng.random() < 0.1:  # a repeat that agrees
            again = _rating_line(rng, written[k - 1])
            blocks.append(f"{_header(rng, k)}\n{again}\nRationale: again, text {k}")
    if rng.random() < 0.3:  # a stray block for a text that does not exist
        blocks.append(f"{_header(rng, n + 1)}\nRating: 1\nRationale: extra")
    rng.shuffle(blocks)
    sep = rng.choice(["\n\n", "\n\n---\n\n", "\n\n\n"])
    answer = rng.choice(PREAMBLES) + sep.join(blocks) + rng.choice(CLOSINGS)
    if rng.random() < 0.3:
        answer = answer.replace("\n", "\r\n")
    return answer, written, written_types, broken


@pytest.mark.parametrize("typed", [False, True])
def test_ratings_never_move_to_another_text(typed: bool) -> None:
    for seed in range(500):
        rng = random.Random(seed)
        n = rng.randint(1, 6)
        answer, written, written_types, broken = _random_answer(rng, n, typed)
        parsed = parse_answer(answer, n, typed=typed)
        assert len(parsed) == n
        for k, result in enumerate(parsed, start=1):
            got = None if result is None else result.rating
            if k in broken:
                assert got is None, (seed, k, answer)
            else:
                assert got == written[k - 1], (seed, k, answer)
            if result is not None:
                assert result.types == written_types[k - 1], (seed, k, answer)
                assert result.types_rationale == (f"types of {k}" if typed else None)
                if result.rating is not None:
                    assert result.rationale is not None
                    assert set(re.findall(r"text (\d+)", result.rationale, re.I)) == {str(k)}
