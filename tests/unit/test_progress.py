from __future__ import annotations

import io

import anyio

from streamfeedback import Pipeline
from streamfeedback._progress import show_progress

from ..helpers import sim_config


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


async def test_progress_draws_in_place_on_a_terminal_and_never_on_stdout() -> None:
    config = sim_config(
        generator={"sim_ttft": 0.05, "sim_slots": 2}, rater={"requests_per_minute": 600}
    )
    screen = _Tty()
    async with Pipeline(config) as pipeline, anyio.create_task_group() as tg:
        records = pipeline.run([f"q{i}" for i in range(40)])
        tg.start_soon(lambda: show_progress(pipeline, total=40, stream=screen, interval=0.05))
        got = [r async for r in records]
        tg.cancel_scope.cancel()
    text = screen.getvalue()
    assert len(got) == 40
    frames = [f for f in text.split("\r\x1b[K") if f]
    assert frames, "at least one frame was drawn"
    last = frames[-1]
    assert "records" in last and "/s" in last and "in flight alpha:" in last
    assert "judge" in last and "of 600" in last
    assert "ETA" in text
    assert text.endswith("\r\x1b[K"), "the line is cleared at the end"
