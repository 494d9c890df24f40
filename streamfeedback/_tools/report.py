"""Placeholder until the report command lands."""

from __future__ import annotations

import argparse

HELP = "report (not available yet)"


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """No options yet."""


def main(args: argparse.Namespace) -> int:
    raise SystemExit("streamfeedback report is not available yet")
