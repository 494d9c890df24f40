"""A bare asyncio + aiohttp client doing what `streamfeedback run` does over HTTP, and no more.

    python benchmarks/bare_client.py BASE_URL prompts.jsonl out.ndjson --models 6 --n 3

The yardstick of `vs_bare.py`: per prompt, `n` chat requests to the models routing picks (the
pipeline's own seeded routing, batches of `batch_size`, so the load per model is the same),
then one judge request built from the same UltraFeedback template, then one NDJSON line. No
limiter, no retries, no parsing of the judge's answer, no spool, no failures file: the least
any client must do for these requests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

import aiohttp
import msgspec
import uvloop

from streamfeedback._judge.aspects import build_messages
from streamfeedback._stages.routing import models_for_batch


class _Message(msgspec.Struct):
    content: str


class _Choice(msgspec.Struct):
    message: _Message


class _Answer(msgspec.Struct):
    choices: list[_Choice]


decode = msgspec.json.Decoder(_Answer).decode
encode = msgspec.json.Encoder().encode


async def chat(
    session: aiohttp.ClientSession, url: str, model: str, messages: list[dict[str, str]], limit: int
) -> str:
    body = {"model": model, "messages": messages, "max_tokens": limit, "temperature": 0.7}
    async with session.post(url, data=encode(body)) as response:
        data = await response.read()
        if response.status != 200:
            raise RuntimeError(f"{model}: {response.status} {data[:200]!r}")
    return decode(data).choices[0].message.content


async def main(args: argparse.Namespace) -> int:
    with open(args.prompts) as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    models = [f"gen-{i}" for i in range(args.models)]
    url = args.base_url.rstrip("/") + "/chat/completions"
    slots = {m: asyncio.Semaphore(args.concurrency) for m in models}
    judge_slots = asyncio.Semaphore(args.judge_concurrency)
    out = open(args.out, "wb")
    headers = {"Authorization": "Bearer EMPTY", "Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=0)

    async def generate(session: aiohttp.ClientSession, model: str, text: str) -> str:
        async with slots[model]:
            return await chat(session, url, model, [{"role": "user", "content": text}], 512)

    async def prompt(
        session: aiohttp.ClientSession, row: dict[str, str], picked: list[str]
    ) -> None:
        text = row["instruction"]
        texts = await asyncio.gather(*(generate(session, m, text) for m in picked))
        messages = [
            {"role": m.role, "content": m.content}
            for m in build_messages("overall-rating", text, list(texts))
        ]
        async with judge_slots:
            verdict = await chat(session, url, args.judge, messages, 2048)
        record = {"id": row["id"], "generations": texts, "models": picked, "judge": verdict}
        out.write(encode(record) + b"\n")

    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
        tasks = []
        for start in range(0, len(rows), args.batch_size):
            batch = start // args.batch_size
            picked = list(models_for_batch(models, n=args.n, seed=0, batch=batch))
            for row in rows[start : start + args.batch_size]:
                tasks.append(asyncio.ensure_future(prompt(session, row, picked)))
        await asyncio.gather(*tasks)
    out.close()
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base_url")
    parser.add_argument("prompts")
    parser.add_argument("out")
    parser.add_argument("--models", type=int, default=6)
    parser.add_argument("--n", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=256, help="per model")
    parser.add_argument("--judge", default="sim-judge")
    parser.add_argument("--judge-concurrency", type=int, default=32)
    sys.exit(uvloop.run(main(parser.parse_args())))
