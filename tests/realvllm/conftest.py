"""The real-vLLM tier: vLLM's CPU build, a tiny random model the tests build themselves.

Runs where the real `vllm` is importable (CI's `.venv-vllm`). With STREAMFEEDBACK_REAL_VLLM=1
(set by `.ci/run`) the tier is expected, so a missing vllm fails every test instead of
skipping it. Engines are shared within a module: each one takes ~20 s and ~2 GB to load.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

EXPECTED = os.environ.get("STREAMFEEDBACK_REAL_VLLM") == "1"

# Small KV cache and no core pinning: several engines share this host's few cores and RAM.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _missing() -> str | None:
    spec = importlib.util.find_spec("vllm")
    if spec is None:
        return "real vllm is not installed"
    if "fake_vllm" in str(spec.origin):
        return "the stand-in tests/fake_vllm shadows vllm here"
    return None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    reason = _missing()
    for item in items:
        if here not in Path(str(item.fspath)).parents:
            continue
        item.add_marker(pytest.mark.realvllm)
        if reason is not None and not EXPECTED:
            item.add_marker(pytest.mark.skip(reason=f"{reason} (the real-vLLM tier)"))


@pytest.fixture(scope="session", autouse=True)
def _real_vllm_present() -> None:
    reason = _missing()
    if reason is not None and EXPECTED:
        pytest.fail(f"STREAMFEEDBACK_REAL_VLLM=1 but {reason}", pytrace=False)


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from streamfeedback.testing.tiny_model import tiny_model

    return tiny_model(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def anyio_backend() -> tuple[str, dict[str, bool]]:
    return ("asyncio", {"use_uvloop": False})


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes in a process group, read from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            found.append(int(entry.name))
    return found


@pytest.fixture
def no_leftover_processes() -> Iterator[list[int]]:
    """Process groups a test registers must be empty when it ends (vLLM's own children too)."""
    groups: list[int] = []
    yield groups
    left = {g: group_members(g) for g in groups}
    assert not any(left.values()), f"processes left behind: {left}"
