"""streamfeedback embedded in an async app: the pipeline runs in the app's own event loop.

    .venv/bin/python examples/embed_async.py [--limit N] [CONFIG.toml]

(`.venv` as the README's setup makes it; `python` will do in an activated venv.)

The "app" here is a heartbeat task that keeps ticking while records stream in, and a
consumer that keeps a running mean rating per model, as a web service or a training loop
would. The pipeline does not start its own loop or install uvloop; leaving the `async with`
block stops its workers, also on error or cancellation. Defaults to the quickstart config
(simulated models and judge: no GPU or key needed).
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from streamfeedback import Pipeline, load_config

HERE = Path(__file__).parent


async def heartbeat(done: asyncio.Event, interval: float = 0.05) -> int:
    """Another task of the app: proves the loop stays responsive during the run."""
    ticks = 0
    while not done.is_set():
        ticks += 1
        try:
            await asyncio.wait_for(done.wait(), interval)
        except asyncio.TimeoutError:
            pass
    return ticks


async def collect(
    config_path: Path, limit: int | None, done: asyncio.Event
) -> dict[str, list[int]]:
    """Run the pipeline and gather every readable rating per model."""
    ratings: dict[str, list[int]] = {}
    try:
        async with Pipeline(load_config(config_path), limit=limit) as pipeline:
            async for record in pipeline.run():
                for model, rating in zip(record.generation_models, record.ratings, strict=True):
                    if rating is not None:
                        ratings.setdefault(model, []).append(rating)
            stats = pipeline.statistics()
        print(
            f"{stats.records} records, {stats.failures} failures, "
            f"{stats.generation_tokens} generated tokens"
        )
    finally:
        done.set()
    return ratings


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default=str(HERE / "quickstart.toml"))
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args()

    done = asyncio.Event()
    ticks, ratings = await asyncio.gather(
        heartbeat(done), collect(Path(args.config), args.limit, done)
    )
    print(f"heartbeat ticked {ticks} times while the pipeline ran")
    print("mean rating per model:")
    for model, values in sorted(ratings.items()):
        print(f"  {model:<28} {sum(values) / len(values):.2f}  ({len(values)} ratings)")


if __name__ == "__main__":
    asyncio.run(main())
