"""Structured concurrency for the LLM stages: when one task of a group fails, the others are cancelled (no
paid calls whose answers nobody reads) and one error comes out, not an exception group."""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, TypeVar

from .errors import AutointerpError
from .llm import PermanentLLMError

log = logging.getLogger(__name__)
T = TypeVar("T")


def first_error(eg: BaseExceptionGroup) -> BaseException:
    """What a failed TaskGroup raises: the first error that stops a job (permanent LLM error, bad input), else the
    first of any kind; the others are logged."""
    leaves: list[BaseException] = []

    def walk(g: BaseExceptionGroup) -> None:
        for e in g.exceptions:
            if isinstance(e, BaseExceptionGroup):
                walk(e)
            else:
                leaves.append(e)

    walk(eg)
    first = next((e for e in leaves if isinstance(e, (PermanentLLMError, AutointerpError))), leaves[0])
    for e in leaves:
        if e is not first:
            log.warning("also failed: %s: %s", type(e).__name__, e)
    return first


async def gather_or_cancel(*aws: Awaitable[T]) -> list[T]:
    """Like asyncio.gather, in order, but the first failure cancels the rest and is raised as itself."""
    try:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(a) for a in aws]
    except BaseExceptionGroup as eg:
        raise first_error(eg) from None
    return [t.result() for t in tasks]
