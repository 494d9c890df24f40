from __future__ import annotations

import inspect

import streamfeedback


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


def test_contract_entry_points_exist() -> None:
    from streamfeedback import Pipeline, load_config

    assert callable(load_config)
    assert hasattr(Pipeline, "__aenter__") and hasattr(Pipeline, "run")
