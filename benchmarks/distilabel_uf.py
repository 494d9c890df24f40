"""distilabel's UltraFeedback recipe against the same server as `vs_bare.py`, for the wall time.

Runs in its own virtual environment (distilabel pins its own dependencies), outside the repo:

    python3 -m venv /tmp/distvenv && /tmp/distvenv/bin/pip install distilabel==1.5.3
    python benchmarks/over_http.py --serve --sim-tpot=0.002 --sim-ttft=0 \\
        --sim-output-tokens=256 --judge-latency=0 --judge-slots=64 --judge-rpm=0 &   # prints URL
    /tmp/distvenv/bin/python benchmarks/distilabel_uf.py URL --prompts 512 --batch 64

The pipeline of distilabel's UltraFeedback example: load -> `sample_n_steps(n=3)` over six
`TextGeneration` steps (`OpenAILLM`, 512 new tokens) -> `GroupColumns` -> `UltraFeedback`
(overall-rating, the judge on the same server), every step with `--batch` rows per batch
("tuned": the default of 50 per step is slower). Prints the wall time and the rows out.
"""

from __future__ import annotations

import argparse
import os
import time

from distilabel.models import OpenAILLM
from distilabel.pipeline import Pipeline, sample_n_steps
from distilabel.steps import GroupColumns, LoadDataFromDicts
from distilabel.steps.tasks import TextGeneration, UltraFeedback


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base_url")
    parser.add_argument("--prompts", type=int, default=512)
    parser.add_argument("--models", type=int, default=6)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    rows = [
        {"instruction": f"HTTP benchmark prompt {i}: explain item {i}."}
        for i in range(args.prompts)
    ]

    def llm(model: str, tokens: int) -> OpenAILLM:
        return OpenAILLM(
            model=model,
            base_url=args.base_url,
            api_key="EMPTY",
            generation_kwargs={"max_new_tokens": tokens, "temperature": 0.7},
        )

    # A fresh name per run: distilabel 1.5.3 fails at the end when it finds its own cache.
    with Pipeline(name=f"uf-bench-{os.getpid()}-{time.time_ns()}") as pipeline:
        load = LoadDataFromDicts(data=rows, batch_size=args.batch)
        generators = [
            TextGeneration(
                name=f"gen_{i}", llm=llm(f"gen-{i}", 512), input_batch_size=args.batch
            )
            for i in range(args.models)
        ]
        group = GroupColumns(
            columns=["generation", "model_name"],
            output_columns=["generations", "generation_models"],
            input_batch_size=args.batch,
        )
        judge = UltraFeedback(
            aspect="overall-rating", llm=llm("sim-judge", 2048), input_batch_size=args.batch
        )
        load >> sample_n_steps(n=3) >> generators >> group >> judge  # type: ignore[operator]
    started = time.perf_counter()
    distiset = pipeline.run(use_cache=False)
    wall = time.perf_counter() - started
    out = sum(len(split) for ds in distiset.values() for split in ds.values())
    print(f"distilabel rows={out} wall_s={wall:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
