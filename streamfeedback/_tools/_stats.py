"""One-pass statistics over a run's records, for `streamfeedback report`.

The accumulator keeps counters only (per model, per pair of models, per position, per pair
of aspects), so memory grows with the pool and not with the output: a report can stream
over files larger than memory. Ratings are integers, so the sums are exact Python ints and
the means and variances computed from them are not eroded by float rounding.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from .._records import Record

__all__ = [
    "Accumulator",
    "AgreementRow",
    "AspectRow",
    "Moments",
    "ModelRow",
    "PositionRow",
    "Summary",
    "Z95",
]

Z95 = 1.96
"""The normal quantile of the 95% confidence interval of a mean."""
SCALE = (1, 5)
"""UltraFeedback's rating scale: plots and confidence intervals stay within it."""


@dataclass
class Moments:
    """Count, sum and sum of squares of integer ratings: mean, sd and CI without the values."""

    n: int = 0
    total: int = 0
    squares: int = 0

    def add(self, value: int) -> None:
        self.n += 1
        self.total += value
        self.squares += value * value

    @property
    def mean(self) -> float | None:
        return self.total / self.n if self.n else None

    @property
    def sd(self) -> float | None:
        """The sample standard deviation (n - 1 in the denominator); None below two values."""
        if self.n < 2:
            return None
        return math.sqrt(max(0, self.n * self.squares - self.total**2) / (self.n * (self.n - 1)))

    @property
    def ci95(self) -> tuple[float, float] | None:
        """mean +/- 1.96 * sd / sqrt(n), the normal approximation, clipped to the rating
        scale (a mean of ratings cannot leave it; few ratings would say it could); None
        below two values."""
        mean, sd = self.mean, self.sd
        if mean is None or sd is None:
            return None
        half = Z95 * sd / math.sqrt(self.n)
        low, high = min(SCALE[0], mean), max(SCALE[1], mean)
        return max(low, mean - half), min(high, mean + half)


@dataclass
class _Model:
    responses: int = 0
    nulls: int = 0
    ratings: Moments = field(default_factory=Moments)
    histogram: Counter[int] = field(default_factory=Counter)
    top: int = 0
    tokens: int = 0
    tokens_n: int = 0
    finish: Counter[str] = field(default_factory=Counter)


@dataclass
class _Pair:
    """Ratings of two responses on the same values: Pearson's r from running sums."""

    n: int = 0
    sx: int = 0
    sy: int = 0
    sxx: int = 0
    syy: int = 0
    sxy: int = 0

    def add(self, x: int, y: int) -> None:
        self.n += 1
        self.sx += x
        self.sy += y
        self.sxx += x * x
        self.syy += y * y
        self.sxy += x * y

    @property
    def r(self) -> float | None:
        """Pearson's correlation; None when fewer than two pairs or a side never varies."""
        cov = self.n * self.sxy - self.sx * self.sy
        vx = self.n * self.sxx - self.sx**2
        vy = self.n * self.syy - self.sy**2
        if self.n < 2 or vx <= 0 or vy <= 0:
            return None
        return cov / math.sqrt(vx * vy)


@dataclass
class _Aspect:
    ratings: Moments = field(default_factory=Moments)
    responses: int = 0
    nulls: int = 0
    not_applicable: int = 0
    results: int = 0
    reasked: int = 0
    reasks: int = 0


@dataclass(frozen=True)
class ModelRow:
    """One generator model's line of the leaderboard."""

    model: str
    responses: int
    rated: int
    nulls: int
    mean: float | None
    sd: float | None
    ci95: tuple[float, float] | None
    top_share: float | None
    win_rate: float | None
    shared: int
    tokens_mean: float | None
    length_share: float | None
    finish: dict[str, int]
    histogram: dict[int, int]


@dataclass(frozen=True)
class PositionRow:
    """Ratings of the responses the judge saw as text `position` (1-based)."""

    position: int
    ratings: Moments


@dataclass(frozen=True)
class AspectRow:
    """One aspect's judge health: how often it was unreadable or asked again."""

    aspect: str
    responses: int
    nulls: int
    ratings: Moments
    results: int
    reasked: int
    reasks: int
    not_applicable: int = 0


@dataclass(frozen=True)
class AgreementRow:
    """Pearson's r between two aspects over responses both rated non-null."""

    first: str
    second: str
    n: int
    r: float | None


@dataclass(frozen=True)
class Summary:
    """Everything the report shows, computed once and rendered as text, HTML or plots."""

    aspect: str | None
    judges: list[str]
    records: int
    skipped: int
    simulated: int
    models: list[ModelRow]
    pairs: dict[tuple[str, str], tuple[int, int, int]]
    histogram: dict[int, int]
    responses: int
    nulls: int
    reasked: int
    reasks: int
    shuffled: int
    positions: list[PositionRow]
    aspects: list[AspectRow]
    agreement: list[AgreementRow]

    def win_rate(self, a: str, b: str) -> tuple[float, int] | None:
        """(win rate of a against b, prompts they shared), None when they shared none.

        Win rate = (wins + 0.5 * ties) / shared, over prompts where both have a rating.
        """
        if a == b:
            return None
        key, flip = ((a, b), False) if a < b else ((b, a), True)
        wins_first, wins_second, ties = self.pairs.get(key, (0, 0, 0))
        shared = wins_first + wins_second + ties
        if not shared:
            return None
        wins = wins_second if flip else wins_first
        return (wins + 0.5 * ties) / shared, shared


class Accumulator:
    """Feed it records one at a time (`add`), then read the `summary`.

    `aspect` picks which ratings rank the models: None takes each record's `ratings` (its
    first aspect); a name takes that aspect from `aspects` (or `ratings` when the record's
    `aspect` is that name), and records without it are counted as skipped.
    """

    def __init__(self, aspect: str | None = None) -> None:
        self.aspect = aspect
        self._first_aspect: str | None = None
        self._judges: dict[str, None] = {}
        self._records = 0
        self._skipped = 0
        self._simulated = 0
        self._models: dict[str, _Model] = {}
        self._pairs: dict[tuple[str, str], list[int]] = {}
        self._histogram: Counter[int] = Counter()
        self._responses = 0
        self._nulls = 0
        self._reasked = 0
        self._reasks = 0
        self._shuffled = 0
        self._positions: list[Moments] = []
        self._aspects: dict[str, _Aspect] = {}
        self._agreement: dict[tuple[str, str], _Pair] = {}

    def add(self, record: Record) -> bool:
        """Count one record; False when it lacks the chosen aspect (then it only counts as
        skipped). Raises ValueError when its lists do not line up with `generations`."""
        n = len(record.generations)
        if len(record.generation_models) != n or len(record.ratings) != n:
            raise ValueError(
                f"{len(record.generations)} generations, {len(record.generation_models)} "
                f"models and {len(record.ratings)} ratings do not line up"
            )
        picked = self._pick(record)
        if picked is None:
            self._skipped += 1
            return False
        ratings, order = picked
        if len(ratings) != n:
            raise ValueError(f"aspect {self.aspect!r} has {len(ratings)} ratings for {n} texts")
        if self._first_aspect is None:
            self._first_aspect = record.aspect
        self._records += 1
        self._judges.setdefault(record.ultrafeedback_model)
        self._simulated += record.simulated
        self._count_judge(record)
        self._count_models(record, ratings)
        self._count_pairs(record.generation_models, ratings)
        if order is not None and sorted(order) == list(range(n)):
            self._shuffled += 1
            while len(self._positions) < n:
                self._positions.append(Moments())
            for k, index in enumerate(order):
                rating = ratings[index]
                if rating is not None:
                    self._positions[k].add(rating)
        return True

    def _pick(self, record: Record) -> tuple[list[int | None], list[int] | None] | None:
        """The ratings that rank the models, and the order the judge saw them in."""
        if self.aspect is None or record.aspect == self.aspect:
            return record.ratings, record.judge_order
        result = (record.aspects or {}).get(self.aspect)
        if result is None:
            return None
        return result.ratings, result.shown_order

    def _count_judge(self, record: Record) -> None:
        attempts = record.judge_attempts or 1
        self._reasked += attempts > 1
        per_aspect: list[tuple[str, list[int | None], int]]
        na: dict[str, list[bool] | None]
        if record.aspects:
            per_aspect = [(a, r.ratings, r.attempts) for a, r in record.aspects.items()]
            na = {a: r.not_applicable for a, r in record.aspects.items()}
        else:
            per_aspect = [(record.aspect or "rating", record.ratings, attempts)]
            na = {per_aspect[0][0]: record.not_applicable}
        self._reasks += sum(max(0, att - 1) for _, _, att in per_aspect)
        for name, ratings, att in per_aspect:
            acc = self._aspects.setdefault(name, _Aspect())
            acc.results += 1
            acc.reasked += att > 1
            acc.reasks += max(0, att - 1)
            acc.not_applicable += sum(na.get(name) or ())
            for rating in ratings:
                acc.responses += 1
                if rating is None:
                    acc.nulls += 1
                else:
                    acc.ratings.add(rating)
        for i, (a, ra, _) in enumerate(per_aspect):
            for b, rb, _ in per_aspect[i + 1 :]:
                key, first, second = ((a, b), ra, rb) if a < b else ((b, a), rb, ra)
                pair = self._agreement.setdefault(key, _Pair())
                for x, y in zip(first, second, strict=False):
                    if x is not None and y is not None:
                        pair.add(x, y)

    def _count_models(self, record: Record, ratings: Sequence[int | None]) -> None:
        rated = [r for r in ratings if r is not None]
        best = max(rated) if rated else None
        tokens = record.generation_tokens
        finish = record.finish_reasons
        for i, (model, rating) in enumerate(zip(record.generation_models, ratings, strict=True)):
            acc = self._models.get(model)
            if acc is None:
                acc = self._models[model] = _Model()
            acc.responses += 1
            self._responses += 1
            if rating is None:
                acc.nulls += 1
                self._nulls += 1
            else:
                acc.ratings.add(rating)
                acc.histogram[rating] += 1
                self._histogram[rating] += 1
                acc.top += rating == best
            if tokens is not None and i < len(tokens):
                acc.tokens += tokens[i]
                acc.tokens_n += 1
            if finish is not None and i < len(finish):
                acc.finish[finish[i] or "unknown"] += 1

    def _count_pairs(self, models: Sequence[str], ratings: Sequence[int | None]) -> None:
        """Per prompt, each model's rating (the mean if it answered twice), compared pairwise."""
        by_model: dict[str, list[int]] = {}
        for model, rating in zip(models, ratings, strict=True):
            if rating is not None:
                by_model.setdefault(model, []).append(rating)
        means = sorted((m, sum(v) / len(v)) for m, v in by_model.items())
        for i, (a, ra) in enumerate(means):
            for b, rb in means[i + 1 :]:
                counts = self._pairs.setdefault((a, b), [0, 0, 0])
                counts[0 if ra > rb else 1 if rb > ra else 2] += 1

    def summary(self) -> Summary:
        """The statistics so far, leaderboard sorted by mean rating (unrated models last)."""
        pairs = {k: (v[0], v[1], v[2]) for k, v in self._pairs.items()}
        rows = [self._row(name, acc, pairs) for name, acc in self._models.items()]
        rows.sort(key=lambda r: (r.mean is None, -(r.mean or 0.0), r.model))
        aspects = [
            AspectRow(
                name,
                acc.responses,
                acc.nulls,
                acc.ratings,
                acc.results,
                acc.reasked,
                acc.reasks,
                acc.not_applicable,
            )
            for name, acc in self._aspects.items()
        ]
        agreement = [AgreementRow(a, b, p.n, p.r) for (a, b), p in sorted(self._agreement.items())]
        return Summary(
            aspect=self.aspect or self._first_aspect,
            judges=list(self._judges),
            records=self._records,
            skipped=self._skipped,
            simulated=self._simulated,
            models=rows,
            pairs=pairs,
            histogram=dict(sorted(self._histogram.items())),
            responses=self._responses,
            nulls=self._nulls,
            reasked=self._reasked,
            reasks=self._reasks,
            shuffled=self._shuffled,
            positions=[PositionRow(k + 1, m) for k, m in enumerate(self._positions)],
            aspects=aspects,
            agreement=agreement,
        )

    @staticmethod
    def _row(
        name: str, acc: _Model, pairs: dict[tuple[str, str], tuple[int, int, int]]
    ) -> ModelRow:
        score = 0.0
        shared = 0
        for (a, b), (wa, wb, ties) in pairs.items():
            if name == a:
                score += wa + 0.5 * ties
            elif name == b:
                score += wb + 0.5 * ties
            else:
                continue
            shared += wa + wb + ties
        finished = sum(acc.finish.values())
        return ModelRow(
            model=name,
            responses=acc.responses,
            rated=acc.ratings.n,
            nulls=acc.nulls,
            mean=acc.ratings.mean,
            sd=acc.ratings.sd,
            ci95=acc.ratings.ci95,
            top_share=acc.top / acc.ratings.n if acc.ratings.n else None,
            win_rate=score / shared if shared else None,
            shared=shared,
            tokens_mean=acc.tokens / acc.tokens_n if acc.tokens_n else None,
            length_share=acc.finish["length"] / finished if finished else None,
            finish=dict(acc.finish.most_common()),
            histogram=dict(sorted(acc.histogram.items())),
        )
