"""Answer handlers: an echo generator, a strict rate limit, a delay, and an UltraFeedback judge."""

from __future__ import annotations

import collections
import math
import random
import re
import zlib

import msgspec

from ._http import Handler, Reply, Request, _call

__all__ = [
    "EchoHandler",
    "JudgeAnswer",
    "JudgeHandler",
    "RateLimitedHandler",
    "delayed",
    "echo_handler",
    "judge_handler",
    "rate_limited",
    "rating_for",
]

_FILLER = (
    "a clear answer weighs the question against what is known and then states the result "
    "plainly with one example and a short summary for the reader"
).split()


class EchoHandler:
    """A generator: answers with words drawn from the model name and the prompt.

    `max_tokens` caps the answer in words (`finish_reason="length"` when it bites).
    """

    def __init__(self, *, words: int = 24) -> None:
        self.words = words
        self.calls = 0

    def __call__(self, request: Request) -> Reply:
        self.calls += 1
        model = request.model or "model"
        prompt_words = request.prompt.split()
        seed = zlib.crc32(f"{model}\0{request.prompt}".encode())
        words = ["echo", model, *prompt_words[:8]]
        i = 0
        while len(words) < self.words:
            words.append(_FILLER[(seed + 7 * i) % len(_FILLER)])
            i += 1
        cap = request.max_tokens
        if cap is not None and cap < len(words):
            return Reply(text=" ".join(words[:cap]), finish_reason="length")
        return Reply(text=" ".join(words), finish_reason="stop")


def echo_handler(*, words: int = 24) -> EchoHandler:
    """A generator handler; see `EchoHandler`."""
    return EchoHandler(words=words)


class RateLimitedHandler:
    """A strict sliding-window limit in front of `inner`: beyond `rpm * window / 60` requests
    (by arrival time) in any `window` seconds, answer 429 with `retry-after`.

    Successful answers carry `x-ratelimit-*` headers like OpenAI's. `rejected` counts the 429s.
    """

    def __init__(self, inner: Handler, rpm: float, *, window: float = 60.0) -> None:
        if rpm <= 0 or window <= 0:
            raise ValueError("rpm and window must be positive")
        self.inner = inner
        self.rpm = rpm
        self.window = window
        self.budget = max(1, math.floor(rpm * window / 60.0))
        self.accepted = 0
        self.rejected = 0
        self.starts: list[float] = []
        self._recent: collections.deque[float] = collections.deque()

    async def __call__(self, request: Request) -> Reply:
        now = request.time
        recent = self._recent
        while recent and recent[0] <= now - self.window:
            recent.popleft()
        if len(recent) >= self.budget:
            self.rejected += 1
            wait = recent[0] + self.window - now
            return Reply.failure(
                429,
                f"Rate limit reached: {self.budget} requests per {self.window:g}s",
                retry_after=wait,
                headers=self._headers(0, wait),
            )
        recent.append(now)
        self.accepted += 1
        self.starts.append(now)
        reply = await _call(self.inner, request)
        reset = recent[0] + self.window - now
        headers = {**self._headers(self.budget - len(recent), reset), **reply.headers}
        return msgspec.structs.replace(reply, headers=headers)

    def _headers(self, remaining: int, reset: float) -> dict[str, str]:
        return {
            "x-ratelimit-limit-requests": f"{self.rpm:g}",
            "x-ratelimit-remaining-requests": str(max(0, remaining)),
            "x-ratelimit-reset-requests": f"{max(0.0, reset):.3f}s",
        }


def rate_limited(inner: Handler, rpm: float, *, window: float = 60.0) -> RateLimitedHandler:
    """Put a strict server-side rate limit in front of `inner`; see `RateLimitedHandler`."""
    return RateLimitedHandler(inner, rpm, window=window)


def delayed(inner: Handler, seconds: float) -> Handler:
    """Answer like `inner`, `seconds` later (a slow server or a long generation)."""

    async def handler(request: Request) -> Reply:
        reply = await _call(inner, request)
        return msgspec.structs.replace(reply, delay=reply.delay + seconds)

    return handler


_TEXT_MARK = re.compile(r"^<text (\d+)>[ \t]?", re.M)
_QUALITY = re.compile(r"quality=(\d+)")
_LABELS = {1: "Poor", 2: "Fair", 3: "Average", 4: "Good", 5: "Excellent"}


def rating_for(text: str) -> int:
    """The rating `judge_handler` gives a response: `quality=K` inside it, else a stable hash."""
    match = _QUALITY.search(text)
    if match:
        return min(5, max(1, int(match.group(1))))
    return 1 + zlib.crc32(text.strip().encode()) % 5


class JudgeAnswer(msgspec.Struct, frozen=True, kw_only=True):
    """What the judge answered for one request: the expected ratings by text number, and
    which text (if any) it made unreadable or left out."""

    ratings: dict[int, int]
    untidy: bool
    broken: int | None
    text: str


class JudgeHandler:
    """An UltraFeedback judge that rates each `<text k>` by its content (`rating_for`).

    With probability `untidy` an answer is messy but readable (preamble, closing remark, bold,
    3-5 hashes, `4/5`, `4 (Good)`, CRLF, reordered blocks, blank lines after headers); with
    probability `broken` one block is missing or its rating unreadable. Prompts without
    `<text k>` markers after the last "\\nTexts:\\n" go to `fallback` (an echo generator), so
    one server can serve a whole pipeline. Answers are reproducible: the randomness is seeded by
    `seed`, the prompt and how often that prompt was seen.
    """

    def __init__(
        self,
        *,
        untidy: float = 0.4,
        broken: float = 0.05,
        seed: int = 0,
        fallback: Handler | None = None,
    ) -> None:
        self.untidy = untidy
        self.broken = broken
        self.seed = seed
        self.fallback = fallback if fallback is not None else EchoHandler()
        self.answers: list[JudgeAnswer] = []
        self._seen: collections.Counter[int] = collections.Counter()

    async def __call__(self, request: Request) -> Reply:
        prompt = request.prompt
        _, sep, inputs = prompt.rpartition("\nTexts:\n")
        marks = list(_TEXT_MARK.finditer(inputs)) if sep else []
        if not marks:
            return await _call(self.fallback, request)
        key = zlib.crc32(prompt.encode())
        self._seen[key] += 1
        rng = random.Random(f"{self.seed}\0{key}\0{self._seen[key]}")
        texts: list[tuple[int, str]] = []
        for i, mark in enumerate(marks):
            end = marks[i + 1].start() if i + 1 < len(marks) else len(inputs)
            texts.append((int(mark.group(1)), inputs[mark.end() : end].strip()))
        answer = self._answer(texts, typed="\nType:" in prompt, rng=rng)
        self.answers.append(answer)
        return Reply(text=answer.text)

    def _answer(
        self, texts: list[tuple[int, str]], *, typed: bool, rng: random.Random
    ) -> JudgeAnswer:
        untidy = rng.random() < self.untidy
        broken_id: int | None = None
        broken_mode = ""
        if texts and rng.random() < self.broken:
            broken_id = rng.choice(texts)[0]
            broken_mode = rng.choice(("missing", "unreadable"))
        style = {
            name: untidy and rng.random() < 0.5
            for name in (
                "preamble",
                "closing",
                "bold",
                "hashes",
                "slash",
                "label",
                "crlf",
                "reorder",
                "blank",
            )
        }
        if untidy and not any(style.values()):
            style[rng.choice(sorted(style))] = True
        ratings = {k: rating_for(text) for k, text in texts}
        blocks: list[str] = []
        for k, text in texts:
            if k == broken_id and broken_mode == "missing":
                continue
            hashes = "#" * (rng.randint(3, 5) if style["hashes"] else 4)
            label = "**Rating:**" if style["bold"] else "Rating:"
            rating = ratings[k]
            value = str(rating)
            if style["slash"] and rng.random() < 0.5:
                value = f"{rating}/5"
            elif style["label"]:
                value = f"{rating} ({_LABELS[rating]})"
            if k == broken_id:
                value = rng.choice(("N/A", "unclear", "see above"))
            lines = [f"{hashes} Output for Text {k}"]
            if style["blank"]:
                lines.append("")
            if typed:
                kinds = sorted({1 + zlib.crc32(text.encode()) % 3, 1 + len(text) % 3})
                lines += [
                    f"Type: {', '.join(map(str, kinds))}",
                    f"Rationale: text {k} shows types {', '.join(map(str, kinds))}.",
                ]
            lines += [f"{label} {value}", f"Rationale: text {k} has {len(text)} characters."]
            blocks.append("\n".join(lines))
        if style["reorder"]:
            rng.shuffle(blocks)
        body = "\n\n".join(blocks)
        if style["preamble"]:
            body = "Here is my assessment of each text.\n\n" + body
        if style["closing"]:
            body += "\n\nOverall, the texts differ mostly in accuracy and clarity."
        if style["crlf"]:
            body = body.replace("\n", "\r\n")
        return JudgeAnswer(ratings=ratings, untidy=untidy, broken=broken_id, text=body)


def judge_handler(
    *,
    untidy: float = 0.4,
    broken: float = 0.05,
    seed: int = 0,
    fallback: Handler | None = None,
) -> JudgeHandler:
    """A judge handler; see `JudgeHandler`."""
    return JudgeHandler(untidy=untidy, broken=broken, seed=seed, fallback=fallback)
