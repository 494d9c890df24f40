"""kill -9 mid-run, then rerun: how many responses answered before the kill are asked again.

A local OpenAI-compatible server answers six generators (three of them slow, so many prompts
have some responses and not others when the kill comes) and a judge. The run is killed
`--kill-after` seconds after the server's first answer (start-up time varies); the rerun's
generation requests are compared with the answers the server had sent before the kill.
`--src DIR` runs another checkout (PYTHONPATH) to compare.

    python benchmarks/kill_resume.py --kill-after 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import anyio

from streamfeedback.testing import OpenAIServer, Reply, Request, judge_handler

JUDGE = "gpt-judge"
SLOW = {"org/m3": 0.3, "org/m4": 0.3, "org/m5": 0.3}


async def measure(args: argparse.Namespace) -> None:
    judge = judge_handler(untidy=0.0, broken=0.0)
    answered: list[tuple[str, str]] = []
    first_answer = anyio.Event()

    async def handler(request: Request) -> Reply:
        if request.model == JUDGE:
            return await judge(request)
        await anyio.sleep(SLOW.get(request.model or "", 0.02))
        reply = await judge(request)
        answered.append((request.prompt, request.model or ""))
        first_answer.set()
        return reply

    tmp = Path(tempfile.mkdtemp())
    with (tmp / "prompts.jsonl").open("w") as fh:
        for i in range(args.prompts):
            fh.write(json.dumps({"id": f"q{i:04d}", "instruction": f"Explain idea {i}."}) + "\n")
    env = {**os.environ, "SF_KEY": "unused"}
    if args.src:
        env["PYTHONPATH"] = args.src
    out = tmp / "out.ndjson"
    async with OpenAIServer(handler) as server:
        gens = "".join(
            f'[[generators]]\nname = "m{i}"\nbackend = "openai"\nmodel = "org/m{i}"\n'
            f'base_url = "{server.base_url}"\nmax_tokens = 32\nmax_concurrency = 4\n'
            for i in range(6)
        )
        (tmp / "run.toml").write_text(
            '[source]\npath = "prompts.jsonl"\nid_column = "id"\n'
            "[routing]\nn = 3\nbatch_size = 1\n"
            f'{gens}[rater]\nbackend = "openai"\nmodel = "{JUDGE}"\n'
            f'base_url = "{server.base_url}"\napi_key_env = "SF_KEY"\n[pipeline]\nbuffer = 4\n'
        )
        cmd = [sys.executable, "-m", "streamfeedback", "run", "--no-progress"]
        cmd += [str(tmp / "run.toml"), "-o", str(out)]
        async with await anyio.open_process(cmd, env=env, stderr=subprocess.DEVNULL) as proc:
            await first_answer.wait()
            await anyio.sleep(args.kill_after)
            proc.kill()
            await proc.wait()
        before = set(answered)
        mark = len(server.requests)
        rerun = await anyio.run_process(cmd, env=env, check=False)
        again = [(r.prompt, r.model) for r in server.requests[mark:] if r.model != JUDGE]
    redone = sum(1 for pair in again if pair in before)
    records = len(out.read_bytes().splitlines())
    print(
        f"answered before the kill: {len(before)}; rerun asked {len(again)}, "
        f"redone={redone}; rerun exit {rerun.returncode}; records {records}/{args.prompts}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=120)
    parser.add_argument("--kill-after", type=float, default=3.0, help="seconds")
    parser.add_argument("--src", help="a checkout to run instead of the installed package")
    anyio.run(measure, parser.parse_args())


if __name__ == "__main__":
    main()
