"""The one worker loop: claim a unit → run it → heartbeat while it runs → commit its result with its item →
release; `concurrency` such slots on one event loop. The embedded runner (`runner.run_embedded`: this process,
until the job has nothing left) and a Celery task (`dispatch.run_batch_async`: up to `task_latents` latents of one
queue's stages) both run `work`; they differ only in where the work comes from (`claim`), how much of it one call
takes (`max_latents`) and what they report.

Shared by both: the budget (`dispatch.Budget`: a Redis counter every worker adds to when Redis is configured, else
the store's sum — the truth either way), the per-endpoint LLM limits (`dispatch.share_limits`), leases renewed every
third of `lease_s`, and the stop rules (the job leaving pending/running — cancelled, budget_exhausted, stopped —
is seen within a second, before the next claim; latents in flight finish and are committed).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from ..llm.base import Usage
from ..store import Store
from .units import LatentOutcome, run_latent

log = logging.getLogger(__name__)
ACTIVE = ("pending", "running")


@dataclass
class LoopResult:
    latents: int = 0  # latents this call ran (any outcome)
    done: int = 0
    skipped: int = 0
    failed: int = 0
    already_done: int = 0
    usage: Usage = field(default_factory=Usage)
    errors: list[str] = field(default_factory=list)  # the first few failed latents' reasons
    stopped_by: str | None = None  # why it stopped claiming early: cancelled, budget_exhausted, stopped, ...
    error: BaseException | None = None  # what ended it abnormally (a permanent LLM error, bad input, Ctrl-C, ...)


async def work(store: Store, job_id: int, ctx, *, claim: Callable[[], list], worker: str, lease_s: float,
               budget=None, budget_usd: float | None = None, settings=None, max_latents: int | None = None,
               on_latent: Callable[[LatentOutcome], None] | None = None) -> LoopResult:
    """Run claimed latents of job `job_id` with the job's `concurrency` in flight until `claim` finds nothing,
    `max_latents` were taken, or the job stops. Never raises for the work itself: the result carries the error; the
    latents it held and did not finish are given back."""
    from ..aio import first_error
    from .dispatch import share_limits

    res = LoopResult()
    in_flight: set[int] = set()
    stop: list[str] = []
    last_check = [time.monotonic()]
    taken = [0]

    async def still_wanted() -> bool:
        if stop:
            return False
        if budget is not None and budget_usd is not None and await asyncio.to_thread(budget.spent) >= budget_usd:
            stop.append("budget_exhausted")
            return False
        if time.monotonic() - last_check[0] > 1.0:  # a cancel reaches running loops within a second or so
            last_check[0] = time.monotonic()
            status = (await asyncio.to_thread(store.job, job_id))["status"]
            if status not in ACTIVE:
                stop.append(status)
                return False
        return True

    async def heartbeat():
        while True:
            await asyncio.sleep(lease_s / 3)
            if in_flight:
                await asyncio.to_thread(store.renew_leases, job_id, worker, sorted(in_flight), lease_s)

    async def slot(explainer_client, judge_client):
        while (max_latents is None or taken[0] < max_latents) and await still_wanted():
            taken[0] += 1
            got = await asyncio.to_thread(claim)
            if not got:
                taken[0] -= 1
                return
            (latent, stages), = got
            in_flight.add(latent)
            try:
                out = await run_latent(ctx, store, job_id, latent, stages, explainer_client, judge_client)
            finally:
                in_flight.discard(latent)
            _count(res, out)
            if budget is not None:
                budget.add(out.usage.cost_usd)
            if on_latent is not None:
                on_latent(out)

    try:
        async with ctx.clients() as (explainer_client, judge_client):
            if settings is not None:
                share_limits((explainer_client, judge_client), settings)
            ctx.preflight(judge_client)
            beat = asyncio.create_task(heartbeat())
            try:
                n = ctx.spec.concurrency if max_latents is None else min(ctx.spec.concurrency, max_latents)
                async with asyncio.TaskGroup() as tg:
                    for _ in range(max(1, n)):
                        tg.create_task(slot(explainer_client, judge_client))
            finally:
                beat.cancel()
    except BaseExceptionGroup as eg:
        res.error = first_error(eg)
    except BaseException as e:  # Ctrl-C, a failing preflight
        res.error = e
    finally:
        if in_flight:
            try:
                await asyncio.to_thread(store.release_items, job_id, sorted(in_flight), worker)
            except Exception:
                log.exception("job %d: could not release latents %s (their leases expire)", job_id, sorted(in_flight))
    res.stopped_by = stop[0] if stop else None
    return res


def _count(res: LoopResult, out: LatentOutcome) -> None:
    res.latents += 1
    res.usage.add(out.usage)
    name = {"failed": "failed", "skipped": "skipped", "already_done": "already_done"}.get(out.status, "done")
    setattr(res, name, getattr(res, name) + 1)
    if out.status == "failed" and len(res.errors) < 5:
        res.errors.append(f"latent {out.latent}: {out.error}")


__all__ = ["work", "LoopResult"]
