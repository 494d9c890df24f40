"""docs/architecture.md stays true as code moves: every module it names exists."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "architecture.md"

# `streamfeedback/_stages/spool.py`, `_stages/gather.py`, `tests/contract/engine_contract.py`
_PATH = re.compile(r"(?<![\w/.])((?:streamfeedback|_stages|tests)/[\w/]*\w(?:\.py)?)")
# `streamfeedback.testing.openai_server`, `streamfeedback.engines._vllm_worker`
_MODULE = re.compile(r"(?<![\w/.])(streamfeedback(?:\.\w+)+)")


def named_paths(text: str) -> set[str]:
    """The repository paths a page names; `_stages/x.py` is short for the package's."""
    found = set()
    for path in _PATH.findall(text):
        if path.startswith("_stages/"):
            path = f"streamfeedback/{path}"
        found.add(path.rstrip("/"))
    return found


def missing_paths(text: str) -> list[str]:
    return sorted(p for p in named_paths(text) if not (ROOT / p).exists())


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is gone too
        return False


def missing_modules(text: str) -> list[str]:
    return sorted(m for m in set(_MODULE.findall(text)) if not _importable(m))


def test_every_path_the_page_names_exists() -> None:
    text = PAGE.read_text(encoding="utf-8")
    assert missing_paths(text) == []


def test_every_module_the_page_names_imports() -> None:
    text = PAGE.read_text(encoding="utf-8")
    assert missing_modules(text) == []


def test_the_page_names_the_pipeline_stages() -> None:
    # guards the check itself: a page whose paths the pattern no longer sees would pass above
    named = named_paths(PAGE.read_text(encoding="utf-8"))
    stages = {
        f"streamfeedback/_stages/{name}.py"
        for name in ("source", "intake", "routing", "generation", "gather", "spool", "rating")
    }
    assert stages <= named
    assert "streamfeedback/_pipeline.py" in named


def test_a_moved_module_is_caught() -> None:
    text = (
        "see `streamfeedback/_stages/teleport.py`, `_stages/nowhere.py` and "
        "`streamfeedback.engines._gone`, `streamfeedback.nowhere.x`, "
        "beside `streamfeedback/_pipeline.py`"
    )
    assert missing_paths(text) == [
        "streamfeedback/_stages/nowhere.py",
        "streamfeedback/_stages/teleport.py",
    ]
    assert missing_modules(text) == ["streamfeedback.engines._gone", "streamfeedback.nowhere.x"]
