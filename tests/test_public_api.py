from __future__ import annotations

import inspect
import json
from pathlib import Path

import msgspec

import streamfeedback
from streamfeedback import Pipeline, load_config


def test_all_lists_exactly_the_public_names() -> None:
    public = {
        name
        for name, value in vars(streamfeedback).items()
        if not name.startswith("_") and not inspect.ismodule(value) and name != "annotations"
    }
    public.add("__version__")
    assert set(streamfeedback.__all__) == public


def test_all_is_sorted() -> None:
    assert list(streamfeedback.__all__) == sorted(streamfeedback.__all__)


async def test_the_library_runs_as_the_contract_shows(tmp_path: Path) -> None:
    """CONTRACT.md's library example, as written: load_config, Pipeline, run() over the
    config's source; each record carries the contract's fields, index-aligned."""
    (tmp_path / "prompts.jsonl").write_text(
        "".join(json.dumps({"id": f"p{i}", "prompt": f"Question {i}?"}) + "\n" for i in range(5))
    )
    pool = ["alpha", "bravo", "charlie", "delta"]
    generators = "".join(
        f'[[generators]]\nname = "{name}"\nbackend = "sim"\nmodel = "org/{name}"\n\n'
        for name in pool
    )
    config = tmp_path / "run.toml"
    config.write_text(
        '[source]\npath = "prompts.jsonl"\ncolumn = "prompt"\nid_column = "id"\n\n'
        "[routing]\nn = 3\n\n"
        f"{generators}"
        '[rater]\nbackend = "sim"\nmodel = "judge-1"\n\n'
        f'[output]\nfailures = "{tmp_path / "failures.ndjson"}"\n'
    )
    async with Pipeline(load_config(config)) as pipeline:
        records = [msgspec.to_builtins(record) async for record in pipeline.run()]
    assert sorted(r["id"] for r in records) == [f"p{i}" for i in range(5)]
    for r in records:
        assert r["instruction"] == f"Question {r['id'][1:]}?"
        assert len(r["generations"]) == len(r["ratings"]) == len(r["rationales"]) == 3
        assert len(set(r["generation_models"])) == 3 and set(r["generation_models"]) <= set(pool)
        assert all(rating is None or 1 <= rating <= 5 for rating in r["ratings"])
        assert r["ultrafeedback_model"] == "judge-1"
    assert not (tmp_path / "failures.ndjson").exists()
