"""Requests per second one client process carries against an instant local server.

    python benchmarks/requests_per_s.py                  # 20000 engine requests, 1200 prompts
    python benchmarks/requests_per_s.py --requests 50000 --prompts 4000

The server is a minimal aiohttp app in its own process (uvloop; a fixed answer, a tidy
UltraFeedback verdict when the body holds `<text 1>`), so the client, not the server, is what
is measured; with `taskset` the client gets core 0 and the server core 1. Two figures:

1. `OpenAIEngine.generate` alone, `--concurrency` in flight: requests/s and CPU ms per request;
2. `streamfeedback run` (a fresh process, startup counted): six `openai` generators, an
   `openai` judge, n = 3, so four requests per record: requests/s = 4 x records / wall.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio
import msgspec

from streamfeedback import ChatRequest, Message
from streamfeedback._config import GeneratorConfig
from streamfeedback.engines._openai import OpenAIEngine


def _answer(text: str) -> bytes:
    return json.dumps(
        {
            "id": "x",
            "object": "chat.completion",
            "model": "m",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 20, "completion_tokens": 12, "total_tokens": 32},
        }
    ).encode()


GENERATION = _answer("A short answer of a dozen words, the same for every prompt here.")
VERDICT = _answer(
    "\n\n".join(f"#### Output for Text {k}\nRating: {k + 2}\nRationale: fine." for k in (1, 2, 3))
)


def serve(port_file: str) -> None:
    """Serve until killed; writes the port to `port_file` once bound."""
    import uvloop
    from aiohttp import web

    async def chat(request: web.Request) -> web.Response:
        body = await request.read()
        answer = VERDICT if b"<text 1>" in body else GENERATION
        return web.Response(body=answer, content_type="application/json")

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", chat)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=4096)
        await site.start()
        port = runner.addresses[0][1]
        Path(port_file).write_text(str(port))
        await anyio.sleep_forever()

    uvloop.run(main())


async def engine_rate(url: str, requests: int, concurrency: int) -> tuple[float, float]:
    config = msgspec.convert(
        {
            "backend": "openai",
            "model": "m",
            "base_url": url,
            "api_key_env": "",
            "max_concurrency": concurrency,
        },
        GeneratorConfig,
    )
    engine = OpenAIEngine("bench", config)
    await engine.start()
    limit = anyio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with limit:
            await engine.generate(
                ChatRequest(id=f"r{i}", messages=[Message("user", f"prompt {i}")], max_tokens=64)
            )

    async def batch(n: int) -> None:
        async with anyio.create_task_group() as tg:
            for i in range(n):
                tg.start_soon(one, i)

    await batch(concurrency * 2)  # open the connections
    cpu, wall = time.process_time(), time.perf_counter()
    await batch(requests)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    await engine.aclose()
    return requests / wall, cpu / requests


def cli_rate(url: str, prompts: int, folder: Path) -> tuple[float, int]:
    with (folder / "prompts.jsonl").open("w") as fh:
        for i in range(prompts):
            fh.write(json.dumps({"id": f"p{i}", "instruction": f"Prompt number {i}."}) + "\n")
    gens = "".join(
        f'[[generators]]\nname = "g{i}"\nbackend = "openai"\nmodel = "g{i}"\n'
        f'base_url = "{url}"\nmax_tokens = 64\n'
        for i in range(6)
    )
    (folder / "rps.toml").write_text(
        '[source]\npath = "prompts.jsonl"\nid_column = "id"\n[routing]\nn = 3\n'
        f'{gens}[rater]\nbackend = "openai"\nmodel = "judge"\nbase_url = "{url}"\n'
        'max_concurrency = 256\n[output]\npath = "out.ndjson"\n'
    )
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "streamfeedback", "-q", "run", str(folder / "rps.toml")],
        check=True,
    )
    wall = time.perf_counter() - started
    records = len((folder / "out.ndjson").read_bytes().splitlines())
    return records * 4 / wall, records


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--prompts", type=int, default=1200)
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return 0
    pin = shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        port_file = folder / "port"
        server = subprocess.Popen(
            (["taskset", "-c", "1"] if pin else [])
            + [sys.executable, __file__, "--serve", str(port_file)]
        )
        try:
            while not port_file.exists() or not port_file.read_text():
                time.sleep(0.05)
            url = f"http://127.0.0.1:{port_file.read_text()}/v1"
            if pin:
                os.sched_setaffinity(0, {0})  # the CLI child inherits core 0
            rate, cpu = anyio.run(
                engine_rate,
                url,
                args.requests,
                args.concurrency,
                backend_options={"use_uvloop": True},
            )
            print(
                f"OpenAIEngine.generate: {args.requests} requests, {args.concurrency} in flight: "
                f"{rate:.0f} requests/s, {cpu * 1e3:.3f} ms CPU per request"
            )
            cli, records = cli_rate(url, args.prompts, folder)
            print(
                f"streamfeedback run: {records} records x 4 requests, startup counted: "
                f"{cli:.0f} requests/s"
            )
        finally:
            server.kill()
            server.wait()
    print("client on core 0, server on core 1" if pin else "not pinned")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
