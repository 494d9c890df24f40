"""`streamfeedback run` with `[cluster] backend = "ray"` against a local Ray cluster.

The CLI runs as its own process and connects to the test's cluster by address, as a user's
driver would connect to theirs; its records must equal those of a local run of the same config.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from ..helpers import decode_lines

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'streamfeedback[ray]'")
cluster_utils = pytest.importorskip("ray.cluster_utils")

pytestmark = pytest.mark.timeout(120)

PROMPTS = 120


@pytest.fixture(scope="module")
def address() -> Iterator[str]:
    """A one-node cluster with six logical GPUs; this process never connects to it."""
    local = cluster_utils.Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 2,
            "num_gpus": 6,
            "object_store_memory": 100 * 1024 * 1024,
            "include_dashboard": False,
        },
    )
    try:
        yield str(local.address)
    finally:
        local.shutdown()


def _write(tmp_path: Path, name: str, cluster: str = "") -> Path:
    prompts = tmp_path / "prompts.jsonl"
    if not prompts.exists():
        with prompts.open("w") as fh:
            for i in range(PROMPTS):
                fh.write(json.dumps({"id": f"q{i:04d}", "instruction": f"Question {i}?"}) + "\n")
    gens = "".join(
        f'[[generators]]\nname = "m{i}"\nbackend = "sim"\nmodel = "org/m{i}"\ngpu = {i}\n'
        f"sim_ttft = 0.01\nmax_tokens = {40 + i}\n"
        for i in range(6)
    )
    path = tmp_path / f"{name}.toml"
    path.write_text(
        '[source]\npath = "prompts.jsonl"\nid_column = "id"\n[routing]\nn = 3\nbatch_size = 2\n'
        f'{gens}[rater]\nbackend = "sim"\nmodel = "judge"\n'
        f'[output]\nfailures = "{name}.failures.ndjson"\n{cluster}'
    )
    return path


def _run(config: Path) -> subprocess.CompletedProcess[bytes]:
    result = subprocess.run(
        [sys.executable, "-m", "streamfeedback", "run", str(config)],
        capture_output=True,
        timeout=100,
    )
    assert result.returncode == 0, result.stderr.decode()
    assert all(line.startswith(b"{") for line in result.stdout.splitlines()), "records only"
    failures = config.with_suffix(".failures.ndjson")
    assert not failures.exists() or not failures.read_text(), failures.read_text()
    return result


def _comparable(data: bytes) -> dict[str, dict[str, Any]]:
    """Records by id, without latencies (the only fields that may differ between runs)."""
    records = {}
    for record in decode_lines(data):
        raw = msgspec.to_builtins(record)
        raw.pop("generation_latency_s", None)
        records[record.id] = raw
    return records


def test_a_ray_run_writes_the_records_of_a_local_run(tmp_path: Path, address: str) -> None:
    local = _run(_write(tmp_path, "local"))
    remote = _run(_write(tmp_path, "ray", f'[cluster]\nbackend = "ray"\naddress = "{address}"\n'))
    expected = _comparable(local.stdout)
    assert len(expected) == PROMPTS
    assert _comparable(remote.stdout) == expected


def test_an_unreachable_address_stops_the_run_quickly_naming_it(tmp_path: Path) -> None:
    config = _write(tmp_path, "nowhere", '[cluster]\nbackend = "ray"\naddress = "127.0.0.1:1"\n')
    result = subprocess.run(
        [sys.executable, "-m", "streamfeedback", "run", str(config)],
        capture_output=True,
        timeout=30,
    )
    assert result.returncode == 2, result.stderr.decode()
    assert result.stdout == b""
    # the engines start together, so the first to fail (and be named) may be any of them
    assert re.search(rb"org/m\d", result.stderr), result.stderr.decode()
    assert b"nothing answers at 127.0.0.1:1" in result.stderr
