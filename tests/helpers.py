"""Builders shared by the tests: configs as data, and output decoding."""

from __future__ import annotations

from typing import Any

import msgspec

from streamfeedback import Config, Record

POOL = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot"]


def sim_config(
    *,
    pool: list[str] = POOL,
    n: int = 3,
    batch_size: int = 2,
    seed: int = 0,
    rater: dict[str, Any] | None = None,
    generator: dict[str, Any] | None = None,
    **sections: Any,
) -> Config:
    raw: dict[str, Any] = {
        "source": {"path": "-"},
        "routing": {"n": n, "batch_size": batch_size, "seed": seed},
        "generators": [
            {"name": name, "backend": "sim", "model": f"org/{name}", **(generator or {})}
            for name in pool
        ],
        "rater": {"backend": "sim", "model": "judge-1", **(rater or {})},
        **sections,
    }
    return msgspec.convert(raw, Config)


record_decoder = msgspec.json.Decoder(Record)


def decode_lines(data: bytes) -> list[Record]:
    return [record_decoder.decode(line) for line in data.splitlines() if line]
