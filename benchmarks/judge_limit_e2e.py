"""Issue 3's acceptance run: the CLI against an untidy, rate-limited judge over real HTTP.

An OpenAI-compatible server on 127.0.0.1 rates each text by its content, answers untidily 40%
of the time and brokenly 5% of the time, and enforces its own requests-per-minute limit with
429s. `streamfeedback run` (sim generators, the `openai` judge at the same limit) must finish
in about the time the limit allows, with no 429s, every rating on its own response, < 1% null,
and the API key nowhere in the output, the logs or the files.

    python benchmarks/judge_limit_e2e.py                     # 200 prompts at 120/min (~100 s)
    python benchmarks/judge_limit_e2e.py --prompts 60 --rpm 600
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import anyio
import msgspec

from streamfeedback import Record
from streamfeedback.testing import OpenAIServer, judge_handler, rate_limited, rating_for

KEY = "sk-bench-PLANTED-key-5e8d1f"


async def main(prompts: int, rpm: float) -> int:
    judge = judge_handler(untidy=0.4, broken=0.05, seed=7)
    async with OpenAIServer(rate_limited(judge, rpm)) as server:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            with (folder / "prompts.jsonl").open("w") as fh:
                for i in range(prompts):
                    fh.write(json.dumps({"id": f"q{i}", "instruction": f"Explain idea {i}."}))
                    fh.write("\n")
            gens = "".join(
                f'[[generators]]\nname = "m{i}"\nbackend = "sim"\nmodel = "org/m{i}"\n'
                for i in range(6)
            )
            (folder / "run.toml").write_text(
                '[source]\npath = "prompts.jsonl"\nid_column = "id"\n'
                f'{gens}[rater]\nbackend = "openai"\nmodel = "gpt-judge"\n'
                f'base_url = "{server.base_url}"\napi_key_env = "SF_BENCH_KEY"\n'
                f"requests_per_minute = {rpm}\nshuffle = true\n"
            )
            out = folder / "out.ndjson"
            started = time.perf_counter()
            result = await anyio.run_process(
                [
                    sys.executable,
                    "-m",
                    "streamfeedback",
                    "run",
                    str(folder / "run.toml"),
                    "-o",
                    str(out),
                ],
                env={**os.environ, "SF_BENCH_KEY": KEY},
                check=False,
            )
            wall = time.perf_counter() - started
            records = [msgspec.json.decode(x, type=Record) for x in out.read_bytes().splitlines()]
            leaked = any(KEY.encode() in p.read_bytes() for p in folder.iterdir() if p.is_file())
            leaked = leaked or KEY.encode() in result.stdout + result.stderr
    ratings = [(g, r) for rec in records for g, r in zip(rec.generations, rec.ratings, strict=True)]
    nulls = sum(r is None for _, r in ratings)
    wrong = sum(r is not None and r != rating_for(g) for g, r in ratings)
    requests = len(judge.answers)
    ideal = max(0.0, (requests - 1) * 60 / rpm)
    print(f"exit_status={result.returncode}")
    print(f"records={len(records)} of {prompts}")
    print(f"judge_requests={requests} (re-asks {requests - len(records)})")
    print(f"wall_s={wall:.1f} ideal_s_at_limit={ideal:.1f} ratio={ideal / wall:.2f}")
    print(f"achieved_rpm={requests / wall * 60:.1f} limit_rpm={rpm:g}")
    print(f"server_429s={server.status_counts[429]}")
    print(f"null_share={nulls / len(ratings):.4f} misaligned={wrong}")
    print(
        f"untidy_answers={sum(a.untidy for a in judge.answers)} "
        f"broken_answers={sum(a.broken is not None for a in judge.answers)}"
    )
    print(f"key_leaked={leaked}")
    ok = (
        result.returncode == 0
        and len(records) == prompts
        and wrong == 0
        and nulls / len(ratings) < 0.01
        and server.status_counts[429] == 0
        and not leaked
    )
    return 0 if ok else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--rpm", type=float, default=120)
    args = parser.parse_args()
    raise SystemExit(anyio.run(main, args.prompts, args.rpm))
