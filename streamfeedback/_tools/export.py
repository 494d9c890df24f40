"""Placeholder until the export command lands."""

from __future__ import annotations

import argparse

HELP = "export (not available yet)"


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """No options yet."""


def main(args: argparse.Namespace) -> int:
    raise SystemExit("streamfeedback export is not available yet")
