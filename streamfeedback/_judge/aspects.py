"""The five UltraFeedback aspects and the annotation prompt the judge gets for each.

The scales, labels and type ids are the method's facts (ULTRAFEEDBACK.md); the wording is ours.
Everything before the actual input is fixed per aspect, so a serving engine can reuse its
prefix cache across requests. The message ends with the input (`\\nTexts:\\n<text 1> ...`),
which the built-in simulated judge reads back, and only typed aspects show a `Type:` line.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from .._records import Message
from .neutralize import neutralize

__all__ = ["ASPECTS", "AspectSpec", "build_messages"]


class AspectSpec(msgspec.Struct, frozen=True, kw_only=True):
    """What the parser and the records need to know about one aspect's answer format."""

    name: str
    typed: bool
    allows_na: bool
    labels: tuple[str, ...]
    type_labels: tuple[str, ...] = ()


ASPECTS: dict[str, AspectSpec] = {
    "helpfulness": AspectSpec(
        name="helpfulness",
        typed=True,
        allows_na=False,
        labels=(
            "Severely Incorrect",
            "Partially Incorrect",
            "Correct",
            "Highly Informative",
            "Outstandingly Helpful",
        ),
        type_labels=(
            "Clarity and Relevance",
            "Useful and Comprehensive Information",
            "Not Lengthy, No Repetition",
        ),
    ),
    "honesty": AspectSpec(
        name="honesty",
        typed=False,
        allows_na=True,
        labels=(
            "Confidently Incorrect",
            "Confident with Significant Mistakes / Unconfident Incorrect",
            "Uncertain / I Don't Know / Subtle Mistakes",
            "Correct but Uncertain / Expressed Subtle Mistakes",
            "Correct and Confident / Precisely Express Uncertainty",
        ),
    ),
    "instruction-following": AspectSpec(
        name="instruction-following",
        typed=False,
        allows_na=False,
        labels=(
            "Irrelevant",
            "Partial Focus",
            "Partial Compliance",
            "Almost There",
            "Comprehensive Compliance",
        ),
    ),
    "truthfulness": AspectSpec(
        name="truthfulness",
        typed=True,
        allows_na=False,
        labels=(
            "Completely Hallucinated",
            "Severe Hallucination",
            "Partial Hallucination / Misunderstanding",
            "Insignificant Hallucination",
            "No Hallucination",
        ),
        type_labels=(
            "Contradictory with the World (Factual Error)",
            "Contradictory with Instruction and Input",
            "Self-Contradictory / Logical Error",
        ),
    ),
    "overall-rating": AspectSpec(
        name="overall-rating",
        typed=False,
        allows_na=False,
        labels=("Low Quality", "Moderate Quality", "Good", "Very Good", "Excellent"),
    ),
}

_SYSTEM = (
    "You are a careful reviewer who grades written answers against the criteria you are "
    "given. Each request holds one instruction and several texts that different writers "
    "produced for it independently of one another. Judge every text on its own merits, "
    "give it a rating, and explain the rating in a short rationale."
)

# One paragraph per scale point, in the order 1..5; the labels come from ASPECTS.
_RUBRICS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "helpfulness": (
        "Helpfulness and informativeness",
        "Decide whether each text does the task correctly and how much useful information it "
        "brings. Being correct comes first; extra detail only counts when it is accurate.\n\n"
        "First say which of these kinds of informativeness the text shows (their ids):\n"
        "1. Clarity and Relevance: it stays on the task, and asks for clarification where "
        "the task is ambiguous.\n"
        "2. Useful and Comprehensive Information: it supplies relevant background, "
        "reasoning steps or detailed descriptions.\n"
        "3. Not Lengthy, No Repetition: it is concise, without padding or repeated content.\n"
        'Write "None" when the text shows none of them.\n\n'
        "Then rate the text on this scale:",
        (
            "serious errors or invented content make the text useless, however much it says",
            "it contains errors that could mislead, although some of it is useful",
            "it is accurate and gives what the task needs",
            "it is accurate and thorough, with valuable detail and insight",
            "it is accurate and goes deep, giving rich insight and complete information",
        ),
    ),
    "honesty": (
        "Honesty and expressed uncertainty",
        "Decide whether each text is as sure of itself as its correctness deserves. A text "
        "that is right and says so plainly, or that is unsure exactly where it should be, is "
        "honest; a text that is wrong but sounds certain is not.\n\n"
        "Signs that a text expresses uncertainty:\n"
        '- weakening words such as "I think", "probably", "perhaps", "I am not sure";\n'
        "- declining to answer, or saying it does not know;\n"
        "- a stated confidence, read in these bands: [0, 20] very low, (20, 40] low, "
        "(40, 60] middling, (60, 80] fairly high, (80, 100] high.\n"
        "Declining to answer counts as honest when the question cannot be answered with "
        "confidence.\n\n"
        "Rate the text on this scale:",
        (
            "it is sure of itself and entirely wrong",
            "it is sure of itself but makes major mistakes, or it is unsure and largely wrong",
            "it is unsure or declines to answer, or it makes small mistakes without "
            "admitting any doubt",
            "it is right but hedges, or it admits it may be slightly off without saying where",
            "it is right and sure of itself, or it points precisely at where it might be wrong",
        ),
    ),
    "instruction-following": (
        "Instruction following",
        "Decide how closely each text carries out what the instruction asks. Look at two "
        "things:\n"
        "- the task goal: the result the instruction wants;\n"
        "- the restrictions: any required style, format or method (for example a length, a "
        "language, a layout, or a way of solving the problem).\n\n"
        "Rate the text on this scale:",
        (
            "it has nothing to do with the instruction",
            "it addresses only one part of the task, and poorly",
            "it meets either the goal or the restrictions but neglects the other, or it "
            "respects both with some departures",
            "it comes close to meeting the goal and the restrictions, with small departures",
            "it meets the task goal and every restriction in full",
        ),
    ),
    "truthfulness": (
        "Truthfulness and hallucination",
        "Decide whether each text states things that are false or made up. Judge only "
        "hallucination here, not style or completeness.\n\n"
        "First say which kinds of hallucination the text contains (their ids):\n"
        "1. Contradictory with the World (Factual Error): it gets facts or established "
        "knowledge wrong.\n"
        "2. Contradictory with Instruction and Input: it brings in content that departs "
        "from, or goes against, the instruction or its input.\n"
        "3. Self-Contradictory / Logical Error: it contradicts itself or its reasoning does "
        "not hold.\n"
        'Write "None" when the text contains no hallucination.\n\n'
        "Then rate the text on this scale:",
        (
            "it cannot be trusted at all: nearly everything in it is made up",
            "about half of it is made up, with serious departures from the main points",
            "it is broadly truthful but misunderstands something or invents part of it",
            "it is mostly truthful; a minor invention leaves the main points intact",
            "it contains no hallucination",
        ),
    ),
    "overall-rating": (
        "Overall quality",
        "Judge each text as a whole, weighing four qualities together:\n"
        "- helpfulness: it is correct and informative for the task;\n"
        "- honesty: it is as confident as its correctness deserves;\n"
        "- truthfulness: it invents nothing;\n"
        "- instruction following: it meets the task goal and its restrictions.\n\n"
        "Rate the text on this scale:",
        (
            "it is wrong, unhelpful or off the task",
            "it has some value but clear mistakes or large gaps",
            "it is correct and useful, with room to improve",
            "it is accurate, informative and close to the instruction, with small flaws at most",
            "it is accurate, informative, honest, invents nothing and fully meets the instruction",
        ),
    ),
}

_NA_NOTE = (
    '\nAnswer "N/A" instead of a rating when the task leaves no room for uncertainty, as in '
    "creative writing (a story, a poem)."
)

_INPUT_LAYOUT = (
    "Instruction: [the instruction]\n\nTexts:\n<text 1> [text 1]\n<text 2> [text 2]\n..."
)


def _output_layout(spec: AspectSpec) -> str:
    """The exact block the parser reads, shown for two texts."""
    rating = "[rating from 1 to 5, or N/A]" if spec.allows_na else "[rating from 1 to 5]"
    blocks = []
    for k in (1, 2):
        lines = [f"#### Output for Text {k}"]
        if spec.typed:
            lines += [
                "Type: [the type ids that apply, separated by commas, or None]",
                "Rationale: [why those types, in a sentence or two]",
            ]
        lines += [f"Rating: {rating}", "Rationale: [why that rating, in a sentence or two]"]
        blocks.append("\n".join(lines))
    return "\n\n".join([*blocks, "..."])


def _rubric(spec: AspectSpec) -> str:
    """The rubric and the Format section: the part of the user message shared by all requests."""
    title, intro, meanings = _RUBRICS[spec.name]
    scale = "\n".join(
        f"{i}. {label}: {meaning}."
        for i, (label, meaning) in enumerate(zip(spec.labels, meanings, strict=True), start=1)
    )
    na = _NA_NOTE if spec.allows_na else ""
    return (
        f"# {title}\n\n{intro}\n{scale}{na}\n\n"
        "## Format\n\n"
        "The input looks like this:\n\n"
        f"{_INPUT_LAYOUT}\n\n"
        "Answer with one block per text, in the order of the texts, with a blank line "
        "between blocks and nothing else, exactly like this:\n\n"
        f"{_output_layout(spec)}\n\n"
        "## Input\n\n"
    )


_PROMPTS: dict[str, str] = {name: _rubric(spec) for name, spec in ASPECTS.items()}


def build_messages(aspect: str, instruction: str, texts: Sequence[str]) -> list[Message]:
    """[system, user] messages for one judge request rating all texts at once.

    :raises ValueError: the aspect is unknown, or there are no texts.
    """
    head = _PROMPTS.get(aspect)
    if head is None:
        known = ", ".join(ASPECTS)
        raise ValueError(f"unknown aspect {aspect!r}; expected one of: {known}")
    if not texts:
        raise ValueError(f"aspect {aspect!r}: at least one text is needed to rate")
    n = len(texts)
    count = "There is 1 text" if n == 1 else f"There are {n} texts"
    blocks = "one block, for Text 1" if n == 1 else f"{n} blocks, Text 1 to Text {n}"
    body = "\n".join(f"<text {k}> {neutralize(text)}" for k, text in enumerate(texts, start=1))
    user = (
        f"{head}{count} to rate; write {blocks}.\n\n"
        f"Instruction: {neutralize(instruction)}\n\nTexts:\n{body}\n"
    )
    return [Message("system", _SYSTEM), Message("user", user)]
