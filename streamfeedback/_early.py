"""Ctrl-C while the command line is still importing: one line and exit 130, not a traceback.

Importing the package and its dependencies takes a moment (seconds with heavy extras), before
`_cli.main` can catch KeyboardInterrupt. Only the `streamfeedback` process itself (the console
script, or `python -m streamfeedback`) gets this handler; a program that imports the library
keeps its own SIGINT handling. `_cli.main` hands SIGINT back to Python once it can catch it.
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType

__all__ = ["release"]


def _interrupted(signum: int, frame: FrameType | None) -> None:
    # Nothing is open yet: no output, no spool, no engine. Leave at once.
    os.write(2, b"streamfeedback: error: interrupted\n")
    os._exit(130)


def _is_cli() -> bool:
    if sys.argv and os.path.basename(sys.argv[0]) in ("streamfeedback", "streamfeedback.exe"):
        return True
    orig = list(getattr(sys, "orig_argv", []))
    # `python -m streamfeedback`: while runpy imports the package, argv[0] is still "-m"
    return sys.argv[:1] == ["-m"] and "-m" in orig and orig[orig.index("-m") + 1 :][:1] == [
        "streamfeedback"
    ]


def _install() -> None:
    """Quiet Ctrl-C for the imports, in the CLI process only (and not where SIGINT is ignored)."""
    if _is_cli() and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupted)


def release() -> None:
    """Python's own SIGINT handling again, now that the caller catches KeyboardInterrupt."""
    if signal.getsignal(signal.SIGINT) is _interrupted:
        signal.signal(signal.SIGINT, signal.default_int_handler)


_install()
