"""The UltraFeedback judge: annotation prompts, answer parsing, and the rating stage's core."""

from __future__ import annotations
