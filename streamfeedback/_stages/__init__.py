"""Pipeline stages, in data-flow order."""

from __future__ import annotations
