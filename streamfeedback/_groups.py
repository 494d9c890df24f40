"""Task-group failures, read one way: the pipeline, the CLI and the stages that own a task
group all raise the one meaningful error of an `ExceptionGroup`, so callers catch it plainly."""

from __future__ import annotations

import sys

import anyio

from ._exceptions import StreamFeedbackError

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

__all__ = ["unwrap_group"]

_KNOCK_ON = (anyio.BrokenResourceError, anyio.ClosedResourceError)


def unwrap_group(exc: BaseException) -> BaseException:
    """The one meaningful error of a task-group failure, so callers can catch it plainly.

    Several workers hitting one fatal error (a dead judge) report it once, and a stage whose
    neighbour died meanwhile (a broken channel) is a consequence, not a cause. Anything else
    (two different errors, a bug) keeps the whole group.
    """
    cancelled = anyio.get_cancelled_exc_class()
    leaves: list[BaseException] = [e for e in _leaves(exc) if not isinstance(e, cancelled)]
    if len(leaves) == 1:
        return leaves[0]
    ours = [e for e in leaves if isinstance(e, StreamFeedbackError)]
    if ours and all(isinstance(e, (StreamFeedbackError, *_KNOCK_ON)) for e in leaves):
        return ours[0]
    return exc


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]
