"""`python -m streamfeedback.testing.openai_server`; see `_cli`."""

from __future__ import annotations

from ._cli import main

if __name__ == "__main__":
    raise SystemExit(main())
