"""Typed records that cross stage boundaries, in data-flow order.

Prompt -> GenerationJob -> ChatRequest/Completion -> Generation | GenerationFailure
-> Joined -> Record | Failure. Every one is a frozen msgspec Struct so a stage cannot
mutate what another stage still holds, and so the sink can encode without copying.
"""

from __future__ import annotations

import hashlib

import msgspec

__all__ = [
    "AspectResult",
    "ChatRequest",
    "Completion",
    "Failure",
    "Generation",
    "GenerationFailure",
    "GenerationJob",
    "Joined",
    "Message",
    "Prompt",
    "Record",
    "Response",
    "Substitution",
    "stable_id",
]


def stable_id(text: str) -> str:
    """A prompt id derived from its text, so reruns agree on it without an id column."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Prompt(msgspec.Struct, frozen=True, kw_only=True):
    """One instruction from the source.

    `line` is where it stands in the source file (for messages); `index` is its 1-based
    ordinal among the source's prompts, which routing uses so that skipping prompts on
    resume does not change where the others go.
    """

    id: str
    instruction: str
    line: int | None = None
    index: int = 0


class Message(msgspec.Struct, frozen=True):
    """One chat message, as the OpenAI and vLLM chat templates take it."""

    role: str
    content: str


class ChatRequest(msgspec.Struct, frozen=True, kw_only=True):
    """What an engine is asked: one chat, one completion."""

    id: str
    messages: list[Message]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    guide: str | None = None
    """A regex the whole answer must match (a guided judge); engines that cannot guide fail."""


class Completion(msgspec.Struct, frozen=True, kw_only=True):
    """What an engine answers. Token counts are the engine's own where it reports them."""

    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    latency_s: float = 0.0


class GenerationJob(msgspec.Struct, frozen=True, kw_only=True):
    """A prompt routed to one model: `slot` is that model's place among the prompt's `models`."""

    prompt: Prompt
    models: tuple[str, ...]
    slot: int


class Response(msgspec.Struct, frozen=True, kw_only=True):
    """What one model answered, without the prompt: the part of a `Generation` the spool
    keeps per response (the prompt is spooled once, with its first response)."""

    model: str
    text: str
    completion_tokens: int = 0
    prompt_tokens: int = 0
    finish_reason: str | None = None
    latency_s: float = 0.0
    principle: str | None = None
    replaced: str | None = None
    replaced_because: str | None = None


class Generation(Response, frozen=True, kw_only=True):
    """One model's response to one prompt: the `slot`-th of the prompt's routed `models`."""

    prompt: Prompt
    models: tuple[str, ...]
    slot: int


class GenerationFailure(msgspec.Struct, frozen=True, kw_only=True):
    """One model failed one prompt for good (after its retries); `attempts` counts the models
    actually asked, substitutes included (not the ones skipped while cooling down)."""

    prompt: Prompt
    models: tuple[str, ...]
    slot: int
    model: str
    error: str
    attempts: int = 1


class Joined(msgspec.Struct, frozen=True, kw_only=True):
    """All responses of a prompt, in routing order: what the judge rates (and the spool keeps)."""

    prompt: Prompt
    generations: list[Generation]


class AspectResult(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One aspect's judgement of every response of a prompt, indexed like `generations`."""

    ratings: list[int | None]
    rationales: list[str | None]
    types: list[list[int] | None] | None = None
    rationales_for_ratings: list[str | None] | None = None
    attempts: int = 1
    shown_order: list[int] | None = None
    not_applicable: list[bool] | None = None


class Substitution(msgspec.Struct, frozen=True, kw_only=True):
    """Another model answered in place of the routed one: the routed model failed the prompt
    for good, or was cooling down (failing most requests) when the prompt's turn came."""

    slot: int
    failed_model: str
    model: str
    error: str


class Record(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One output line: a prompt, its responses and the judge's ratings, aligned by index.

    The first seven fields are the UltraFeedback columns (CONTRACT.md); the rest are extras.
    `judge_order[k]` is the index (into `generations`) of the response the judge saw as
    text k+1, present when the order was shuffled. `not_applicable[i]` is true where the judge
    answered N/A (honesty) rather than a rating: a null rating with a reason, not a misread.
    """

    id: str
    instruction: str
    generations: list[str]
    generation_models: list[str]
    ratings: list[int | None]
    rationales: list[str | None]
    ultrafeedback_model: str
    types: list[list[int] | None] | None = None
    rationales_for_ratings: list[str | None] | None = None
    aspect: str | None = None
    aspects: dict[str, AspectResult] | None = None
    fine_grained_score: list[float | None] | None = None
    judge_attempts: int | None = None
    judge_order: list[int] | None = None
    not_applicable: list[bool] | None = None
    generation_tokens: list[int] | None = None
    finish_reasons: list[str | None] | None = None
    generation_latency_s: list[float] | None = None
    principles: list[str | None] | None = None
    substitutions: list[Substitution] | None = None
    simulated: bool = False


class Failure(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A prompt that failed for good: one line of the failures file."""

    id: str
    stage: str
    error: str
    attempts: int = 1
    instruction: str | None = None
    line: int | None = None
    model: str | None = None
