"""Placeholder until the binarize command lands."""

from __future__ import annotations

import argparse

HELP = "binarize (not available yet)"


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """No options yet."""


def main(args: argparse.Namespace) -> int:
    raise SystemExit("streamfeedback binarize is not available yet")
