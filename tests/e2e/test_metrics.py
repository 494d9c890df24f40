"""Prometheus metrics: `streamfeedback run --metrics-port` scraped over HTTP during a real run
against OpenAI-compatible servers on 127.0.0.1, and the same figures from the library."""

from __future__ import annotations

import json
import os
import re
import socket
import sys
from pathlib import Path

import aiohttp
import anyio
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from streamfeedback import Pipeline
from streamfeedback.metrics import PipelineCollector
from streamfeedback.testing import OpenAIServer, Reply, Request, echo_handler, judge_handler

from ..helpers import sim_config

PROMPTS = 60
GATES = (20, 40)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(tmp_path: Path, base_url: str, *, extra: str = "") -> Path:
    with (tmp_path / "prompts.jsonl").open("w") as fh:
        for i in range(PROMPTS):
            fh.write(json.dumps({"id": f"q{i:04d}", "instruction": f"Explain idea {i}."}) + "\n")
    gens = "".join(
        f'[[generators]]\nname = "m{i}"\nbackend = "openai"\nmodel = "org/m{i}"\n'
        f'base_url = "{base_url}"\nmax_tokens = 64\nmax_concurrency = 4\n'
        for i in range(4)
    )
    path = tmp_path / "run.toml"
    path.write_text(
        '[source]\npath = "prompts.jsonl"\nid_column = "id"\n[routing]\nn = 2\n'
        f'{gens}[rater]\nbackend = "openai"\nmodel = "gpt-judge"\nbase_url = "{base_url}"\n'
        "max_concurrency = 8\ninput_cost_per_mtok = 10.0\noutput_cost_per_mtok = 30.0\n"
        f"{extra}"
    )
    return path


class Gated:
    """Generators answer at once for prompts below the first gate; later prompts wait for
    their gate to open, so the test can scrape a run that is part way through."""

    def __init__(self) -> None:
        self.gates = [anyio.Event() for _ in GATES]
        self.judge = judge_handler(untidy=0.0, broken=0.0)
        self.echo = echo_handler()

    async def __call__(self, request: Request) -> Reply:
        if request.model == "gpt-judge":
            return await _reply(self.judge(request))
        match = re.search(r"idea (\d+)", request.prompt)
        index = int(match.group(1)) if match else 0
        for bound, gate in zip(GATES, self.gates, strict=True):
            if index >= bound:
                await gate.wait()
        return await _reply(self.echo(request))


async def _reply(value: object) -> Reply:
    result = await value if not isinstance(value, Reply) else value  # type: ignore[misc]
    assert isinstance(result, Reply)
    return result


async def _scrape(session: aiohttp.ClientSession, port: int) -> dict[str, float]:
    """Every sample as `name{label="v"}` -> value."""
    async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = await response.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return samples


async def _until(
    session: aiohttp.ClientSession, port: int, ready: object
) -> dict[str, float]:
    """Scrape until `ready(samples)` holds (the endpoint may not be up yet)."""
    while True:
        try:
            samples = await _scrape(session, port)
        except aiohttp.ClientConnectionError:
            samples = {}
        if samples and ready(samples):  # type: ignore[operator]
            return samples
        await anyio.sleep(0.05)


async def test_metrics_endpoint_moves_during_a_real_run(tmp_path: Path) -> None:
    handler = Gated()
    port = _free_port()
    async with OpenAIServer(handler) as server, aiohttp.ClientSession() as session:
        config = _config(tmp_path, server.base_url)
        out = tmp_path / "out.ndjson"
        argv = [sys.executable, "-m", "streamfeedback", "run", str(config), "-o", str(out)]
        with anyio.fail_after(90):
            process = await anyio.open_process(
                [*argv, "--metrics-port", str(port), "--no-progress"],
                env={**os.environ},
            )
            async with process:
                early = await _until(
                    session,
                    port,
                    lambda s: s.get("streamfeedback_records_total", 0) > 0
                    and sum(
                        s.get(f'streamfeedback_generation_requests_in_flight{{model="m{i}"}}', 0)
                        for i in range(4)
                    )
                    > 0,
                )
                handler.gates[0].set()
                later = await _until(
                    session,
                    port,
                    lambda s: s["streamfeedback_records_total"]
                    > early["streamfeedback_records_total"],
                )
                handler.gates[1].set()
                assert await process.wait() == 0
                assert process.stderr is not None
        with pytest.raises(aiohttp.ClientConnectionError):
            await _scrape(session, port)  # the server went with the run

    assert len(out.read_bytes().splitlines()) == PROMPTS
    assert early["streamfeedback_records_total"] <= GATES[0]
    assert later["streamfeedback_prompts_read_total"] >= later["streamfeedback_records_total"]
    for name in (
        "streamfeedback_judge_requests_total",
        "streamfeedback_judge_cost_dollars_total",
        'streamfeedback_judge_tokens_total{kind="completion"}',
    ):
        assert 0 < early[name] < later[name], name
    assert later["streamfeedback_judge_rate_limited_total"] == 0
    assert later["streamfeedback_failures_total"] == 0
    assert "streamfeedback_spool_backlog" in later
    for i in range(4):
        model = f'model="m{i}"'
        count = later[f"streamfeedback_generation_seconds_count{{{model}}}"]
        assert count == later[f'streamfeedback_generation_seconds_bucket{{le="+Inf",{model}}}']
        assert count > 0
        assert later[f"streamfeedback_generated_tokens_total{{{model}}}"] >= count
    assert later["process_cpu_seconds_total"] > 0


async def test_a_port_in_use_is_exit_2_before_any_request(tmp_path: Path) -> None:
    handler = Gated()
    async with OpenAIServer(handler) as server:
        config = _config(tmp_path, server.base_url)
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            result = await anyio.run_process(
                [sys.executable, "-m", "streamfeedback", "run", str(config)]
                + ["--metrics-port", str(port)],
                check=False,
            )
        assert not server.requests
    assert result.returncode == 2
    assert result.stdout == b""
    err = result.stderr.decode()
    assert f"--metrics-port: cannot serve metrics on 127.0.0.1:{port}" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("command", ["run", "validate"])
async def test_metrics_without_prometheus_client_is_exit_2_with_the_pip_line(
    tmp_path: Path, command: str
) -> None:
    config = _config(tmp_path, "http://127.0.0.1:9/v1", extra="[pipeline]\nmetrics_port = 9400\n")
    code = (
        "import sys; sys.modules['prometheus_client'] = None; "
        "from streamfeedback._cli import main; raise SystemExit(main(sys.argv[1:]))"
    )
    result = await anyio.run_process(
        [sys.executable, "-c", code, command, str(config)], check=False
    )
    assert result.returncode == 2
    err = result.stderr.decode()
    assert "pipeline.metrics_port" in err
    assert "pip install 'streamfeedback[metrics]'" in err
    assert "Traceback" not in err


async def test_a_metrics_port_out_of_range_is_a_config_error(tmp_path: Path) -> None:
    config = _config(tmp_path, "http://127.0.0.1:9/v1", extra="[pipeline]\nmetrics_port = 0\n")
    result = await anyio.run_process(
        [sys.executable, "-m", "streamfeedback", "validate", str(config)], check=False
    )
    assert result.returncode == 2
    assert "pipeline: `metrics_port` must be a TCP port" in result.stderr.decode()


async def test_the_library_exposes_the_same_figures() -> None:
    config = sim_config(
        rater={"input_cost_per_mtok": 1.0, "output_cost_per_mtok": 2.0},
        generator={"sim_ttft": 0.001},
    )
    registry = CollectorRegistry()
    async with Pipeline(config) as pipeline:
        registry.register(PipelineCollector(pipeline))
        records = [r async for r in pipeline.run([f"prompt {i}" for i in range(12)])]
    stats = pipeline.statistics()
    assert len(records) == stats.records == 12
    assert sum(m.requests for m in stats.models.values()) == 36
    assert all(sum(m.seconds_buckets) == m.requests for m in stats.models.values())
    assert stats.judge_cost_dollars is not None  # a price is set (the sim counts no tokens)
    text = generate_latest(registry).decode()
    assert "streamfeedback_records_total 12.0" in text
    assert 'streamfeedback_generation_seconds_count{model="alpha"}' in text


async def test_the_library_module_without_prometheus_client_names_the_pip_line() -> None:
    code = (
        "import sys; sys.modules['prometheus_client'] = None\n"
        "try:\n    import streamfeedback.metrics\n"
        "except ImportError as exc:\n    print(exc)\n"
    )
    result = await anyio.run_process([sys.executable, "-c", code])
    assert b"pip install 'streamfeedback[metrics]'" in result.stdout
