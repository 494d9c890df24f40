"""The judge: one request per aspect per prompt, parsed by text number, re-asked when unreadable.

The responses may be shown in a shuffled order (the paper's guard against position bias);
every parsed block is mapped back through that permutation, so `ratings[i]` always belongs
to `generations[i]`. A response whose block cannot be read after `max_attempts` is null,
never a neighbour's value.

`rate` is the live path. The batch path (`_stages/batch_rating.py`) uses the same parts
(`requests`, `parse`, `merge_blocks`, `assemble`), so both build the same requests and records.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Collection, Mapping, Sequence

import anyio
import msgspec

from .._config import RaterConfig
from .._exceptions import EngineError, EngineUnavailable, JudgeError, JudgeUnavailable
from .._records import AspectResult, ChatRequest, Completion, Joined, Record, Substitution
from ..engines import Engine
from .aspects import ASPECTS, build_messages
from .guide import answer_regex
from .parser import BlockRating, parse_answer

__all__ = [
    "Judge",
    "JudgeStatistics",
    "complete",
    "custom_id",
    "merge_blocks",
    "split_custom_id",
]

log = logging.getLogger("streamfeedback.judge")

_DEAD_END = 2
"""Requests in a row that fail alike, before the judge ever answered, that stop the run."""


class JudgeStatistics(msgspec.Struct, frozen=True, kw_only=True):
    requests: int
    reasks: int
    null_ratings: int
    ratings: int
    not_applicable: int = 0


def _readable(block: BlockRating | None) -> bool:
    return block is not None and (block.rating is not None or block.not_applicable)


class Judge:
    """Rates joined prompts with an engine, for the aspects of a `RaterConfig`."""

    def __init__(
        self,
        engine: Engine,
        config: RaterConfig,
        *,
        label: str | None = None,
        seed: int = 0,
        simulated: bool = False,
    ) -> None:
        self.engine = engine
        self.config = config
        self.label = label or config.model
        self.seed = seed
        self.simulated = simulated
        self.aspects = config.aspect_list
        for aspect in self.aspects:
            if aspect not in ASPECTS:
                raise ValueError(f"unknown aspect {aspect!r}")
        self._requests = 0
        self._reasks = 0
        self._null = 0
        self._na = 0
        self._ratings = 0
        self._consecutive_failures = 0
        self._answered = False
        self._probe: anyio.Lock | None = None
        self._dead: EngineUnavailable | None = None
        self._probe_kind = ""
        self._probe_failures = 0

    def statistics(self) -> JudgeStatistics:
        return JudgeStatistics(
            requests=self._requests,
            reasks=self._reasks,
            null_ratings=self._null,
            ratings=self._ratings,
            not_applicable=self._na,
        )

    async def rate(self, joined: Joined) -> Record:
        """Rate every response of a prompt on every configured aspect.

        :raises JudgeError: the judge failed this prompt for good.
        :raises JudgeUnavailable: the judge cannot be used at all.
        """
        try:
            results = {aspect: await self._rate_aspect(joined, aspect) for aspect in self.aspects}
        except JudgeUnavailable:
            raise
        except JudgeError as exc:
            self._consecutive_failures += 1
            limit = self.config.max_consecutive_failures
            if self._consecutive_failures >= limit:
                stop = JudgeUnavailable(
                    f"judge {self.label}: {self._consecutive_failures} prompts in a row failed "
                    f"(last: {exc}); stopping instead of failing every prompt"
                )
                stop.prompt_error = str(exc)
                raise stop from exc
            raise
        self._consecutive_failures = 0
        return self._record(joined, results)

    def _record(self, joined: Joined, results: dict[str, AspectResult]) -> Record:
        first = results[self.aspects[0]]
        gens = joined.generations
        record = Record(
            id=joined.prompt.id,
            instruction=joined.prompt.instruction,
            generations=[g.text for g in gens],
            generation_models=[g.model for g in gens],
            ratings=first.ratings,
            rationales=first.rationales,
            ultrafeedback_model=self.label,
            types=first.types,
            rationales_for_ratings=first.rationales_for_ratings,
            aspect=self.aspects[0],
            judge_attempts=max(r.attempts for r in results.values()),
            judge_order=first.shown_order,
            not_applicable=first.not_applicable,
            generation_tokens=[g.completion_tokens for g in gens],
            finish_reasons=[g.finish_reason for g in gens],
            generation_latency_s=[round(g.latency_s, 4) for g in gens],
            principles=[g.principle for g in gens] if any(g.principle for g in gens) else None,
            substitutions=[
                Substitution(
                    slot=i, failed_model=g.replaced, model=g.model, error=g.replaced_because or ""
                )
                for i, g in enumerate(gens)
                if g.replaced is not None
            ]
            or None,
            simulated=self.simulated,
        )
        if len(self.aspects) > 1:
            record = msgspec.structs.replace(
                record,
                aspects=results,
                fine_grained_score=fine_grained_scores(list(results.values()), len(gens)),
            )
        return record

    async def _ask(self, request: ChatRequest) -> Completion:
        """Until the judge has answered once, send one request at a time: a wrong key or
        model then costs one request, not one per worker."""
        if self._dead is not None:
            raise self._dead
        if self._answered:
            return await self.engine.generate(request)
        if self._probe is None:
            self._probe = anyio.Lock()
        async with self._probe:
            if self._dead is not None:
                raise self._dead
            if not self._answered:
                try:
                    completion = await self.engine.generate(request)
                except EngineUnavailable as exc:
                    self._dead = exc
                    raise
                except EngineError as exc:
                    self._probe_failed(exc)
                    raise
                self._answered = True
                return completion
        return await self.engine.generate(request)

    def _probe_failed(self, exc: EngineError) -> None:
        """A judge that never answered and failed its first requests alike (nothing listens,
        always 500, the same 400) is dead: stop now, not after `max_consecutive_failures`
        prompts' worth of retries.

        :raises EngineUnavailable: the judge is dead.
        """
        if exc.status == 429:
            return
        kind = exc.kind
        self._probe_failures = self._probe_failures + 1 if kind == self._probe_kind else 1
        self._probe_kind = kind
        if self._probe_failures >= _DEAD_END:
            self._dead = EngineUnavailable(
                self.engine.name,
                f"never answered; its first {self._probe_failures} requests all failed "
                f"(last: {exc})",
                status=exc.status,
            )
            raise self._dead from exc

    async def _rate_aspect(self, joined: Joined, aspect: str) -> AspectResult:
        shown: list[BlockRating | None] = [None] * len(joined.generations)
        attempts = 0
        while attempts < self.config.max_attempts:
            attempts += 1
            request = self.request(joined, aspect, attempts)
            try:
                completion = await self._ask(request)
            except EngineUnavailable as exc:
                # A local judge whose worker died mid-run restarts it (up to its restarts):
                # ask again once it is back, rather than stopping the run.
                if not (self._answered and getattr(self.engine, "gone", None) is False):
                    raise JudgeUnavailable(f"judge {self.label}: {_reason(exc)}") from exc
                if attempts >= self.config.max_attempts:
                    raise JudgeError(f"judge {self.label} ({aspect}): {_reason(exc)}") from exc
                log.warning("judge %s: %s; asking again", self.label, _reason(exc))
                continue
            except EngineError as exc:
                raise JudgeError(f"judge {self.label} ({aspect}): {_reason(exc)}") from exc
            shown = merge_blocks(shown, self.parse(joined, aspect, completion.text))
            if complete(shown):
                break
            log.debug(
                "judge answer for %s (%s) has unreadable blocks (attempt %d of %d)",
                joined.prompt.id,
                aspect,
                attempts,
                self.config.max_attempts,
            )
        return self.aspect_result(joined, aspect, shown, attempts)

    # -- the parts the live and the batch paths share ------------------------------------

    def order(self, prompt_id: str, aspect: str, n: int) -> list[int]:
        """Which response the judge sees as text k+1: the identity unless `shuffle`.

        Seeded by the prompt id and aspect, so any process can rebuild it from the prompt.
        """
        order = list(range(n))
        if self.config.shuffle:
            random.Random(f"{self.seed}:{prompt_id}:{aspect}").shuffle(order)
        return order

    def request(self, joined: Joined, aspect: str, attempt: int) -> ChatRequest:
        """The request for one aspect of one prompt; its id is `custom_id(...)`.

        Counted in `statistics()` as made (a re-ask when `attempt > 1`), before any rate limit.
        """
        n = len(joined.generations)
        order = self.order(joined.prompt.id, aspect, n)
        texts = [joined.generations[i].text for i in order]
        self._requests += 1
        if attempt > 1:
            self._reasks += 1
        return ChatRequest(
            id=custom_id(joined.prompt.id, aspect, attempt),
            messages=build_messages(aspect, joined.prompt.instruction, texts),
            max_tokens=self.config.max_tokens,
            temperature=self.config.temperature,
            top_p=self.config.top_p,
            seed=self.config.seed,
            guide=answer_regex(aspect, n, self.config.max_tokens) if self.config.guided else None,
        )

    def requests(
        self, joined: Joined, attempt: int, aspects: Collection[str] | None = None
    ) -> list[tuple[str, str, ChatRequest]]:
        """(custom_id, aspect, request) for `aspects` (default: all configured), in config order.

        A re-ask is the same request again with a higher `attempt`; `merge_blocks` keeps what
        the earlier attempts already read.
        """
        wanted = self.aspects if aspects is None else [a for a in self.aspects if a in aspects]
        out = []
        for aspect in wanted:
            request = self.request(joined, aspect, attempt)
            out.append((request.id, aspect, request))
        return out

    def parse(self, joined: Joined, aspect: str, answer: str) -> list[BlockRating | None]:
        """One answer's blocks, indexed by text number as the judge saw them (shown order)."""
        spec = ASPECTS[aspect]
        return parse_answer(
            answer, len(joined.generations), typed=spec.typed, allows_na=spec.allows_na
        )

    def aspect_result(
        self, joined: Joined, aspect: str, shown: Sequence[BlockRating | None], attempts: int
    ) -> AspectResult:
        """Blocks in shown order mapped back onto `generations`; counted in `statistics()`."""
        spec = ASPECTS[aspect]
        n = len(joined.generations)
        if len(shown) != n:
            raise ValueError(f"{len(shown)} blocks for {n} responses")
        order = self.order(joined.prompt.id, aspect, n)
        blocks: list[BlockRating | None] = [None] * n
        for k, original in enumerate(order):
            blocks[original] = shown[k]
        ratings = [b.rating if b is not None else None for b in blocks]
        shown_order = order if self.config.shuffle else None
        na = [b is not None and b.not_applicable for b in blocks]
        not_applicable = na if any(na) else None
        self._ratings += n
        self._null += sum(1 for b in blocks if not _readable(b))
        self._na += sum(na)
        if spec.typed:
            return AspectResult(
                ratings=ratings,
                rationales=[b.types_rationale if b else None for b in blocks],
                types=[b.types if b else None for b in blocks],
                rationales_for_ratings=[b.rationale if b else None for b in blocks],
                attempts=attempts,
                shown_order=shown_order,
                not_applicable=not_applicable,
            )
        return AspectResult(
            ratings=ratings,
            rationales=[b.rationale if b else None for b in blocks],
            attempts=attempts,
            shown_order=shown_order,
            not_applicable=not_applicable,
        )

    def assemble(
        self,
        joined: Joined,
        answers: Mapping[str, Sequence[BlockRating | None]],
        attempts: Mapping[str, int],
    ) -> Record:
        """A prompt's record from each aspect's blocks (shown order) and attempt count."""
        results = {
            aspect: self.aspect_result(joined, aspect, answers[aspect], attempts[aspect])
            for aspect in self.aspects
        }
        return self._record(joined, results)


def custom_id(prompt_id: str, aspect: str, attempt: int) -> str:
    """`<prompt id>|<aspect>|<attempt>`, unique per request of a run. A prompt id may hold `|`
    itself, so read it back with `split_custom_id`, which splits from the right."""
    return f"{prompt_id}|{aspect}|{attempt}"


def split_custom_id(value: str) -> tuple[str, str, int]:
    """(prompt id, aspect, attempt) from a `custom_id`.

    :raises ValueError: not of that form.
    """
    prompt_id, aspect, attempt = value.rsplit("|", 2)
    return prompt_id, aspect, int(attempt)


def merge_blocks(
    earlier: Sequence[BlockRating | None], parsed: Sequence[BlockRating | None]
) -> list[BlockRating | None]:
    """What a re-ask adds: a text keeps the first readable block it got; a text still
    unreadable takes the new answer's block, if that answer has one for it."""
    return [
        old if _readable(old) or new is None else new
        for old, new in zip(earlier, parsed, strict=True)
    ]


def complete(blocks: Sequence[BlockRating | None]) -> bool:
    """Whether every text has a readable block (a rating, or N/A where the aspect allows it)."""
    return all(_readable(b) for b in blocks)


def fine_grained_scores(results: Sequence[AspectResult], n: int) -> list[float | None]:
    """Per response, the mean rating over aspects, skipping nulls and N/A."""
    scores: list[float | None] = []
    for i in range(n):
        values = [r.ratings[i] for r in results if r.ratings[i] is not None]
        scores.append(
            round(sum(v for v in values if v is not None) / len(values), 4) if values else None
        )
    return scores


def _reason(exc: EngineError) -> str:
    """The engine's message without its name, which the judge's own prefix already gives."""
    text, prefix = str(exc), f"{exc.engine}: "
    return text[len(prefix) :] if text.startswith(prefix) else text
