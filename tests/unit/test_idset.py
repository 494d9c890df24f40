from __future__ import annotations

import random

from streamfeedback._idset import IdSet


def test_behaves_like_a_set_through_many_resizes() -> None:
    rng = random.Random(0)
    ids = [f"id-{rng.getrandbits(40)}" for _ in range(50_000)]
    reference: set[str] = set()
    table = IdSet(capacity=4)
    for item in ids + ids[:1000]:
        assert table.add(item) == (item not in reference)
        reference.add(item)
    assert len(table) == len(reference)
    assert all(item in table for item in ids)
    assert sum(f"other-{i}" in table for i in range(10_000)) == 0
    assert 1 not in table
