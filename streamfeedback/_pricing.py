"""Judge cost estimates: USD per million tokens for a few well-known judge models.

Only an estimate for the end-of-run summary; `input_cost_per_mtok` / `output_cost_per_mtok`
in `[rater]` override it (and are needed for any model not listed here).
"""

from __future__ import annotations

from ._config import RaterConfig

__all__ = ["PRICES", "judge_cost"]

PRICES: dict[str, tuple[float, float]] = {
    "gpt-4-turbo": (10.0, 30.0),
    "gpt-4-turbo-2024-04-09": (10.0, 30.0),
    "gpt-4": (30.0, 60.0),
    "gpt-4o": (2.5, 10.0),
    "gpt-4o-mini": (0.15, 0.6),
}


def judge_cost(rater: RaterConfig, prompt_tokens: int, completion_tokens: int) -> float | None:
    """Estimated USD for this many tokens, or None when no price is known."""
    known = PRICES.get(rater.model)
    price_in = rater.input_cost_per_mtok
    price_out = rater.output_cost_per_mtok
    if price_in is None and price_out is None:
        if known is None or rater.backend != "openai":
            return None
        price_in, price_out = known
    return (prompt_tokens * (price_in or 0.0) + completion_tokens * (price_out or 0.0)) / 1e6
