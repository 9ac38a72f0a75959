"""The units of a job: explain latent L, score its explanation with scorer S — and `run_latent`, which runs a
latent's pending stages (the explanation first, then its scorers concurrently). The embedded runner and the Celery
workers call `run_latent`; nothing else writes results.

Each unit's writes commit together with its job item (explanation row + item "explain"; score row + item
"score:S"), insert-or-ignore on the result's identity, so a unit that runs twice (a retry, a late duplicate from a
worker killed after it wrote) adds nothing. What a unit spent is added to its item even when it fails, so a job's
cost counts failed attempts. A scorer failing for good cancels its latent's other calls (nobody would read their
answers); the explanation and scores already written are kept.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from ..aio import gather_or_cancel
from ..errors import AutointerpError
from ..explainers import Explanation, explain
from ..llm import usage_scope
from ..llm.base import LLMError, PermanentLLMError, Usage
from ..sampling import Skipped, shared_samples
from ..store import Store, headline
from .context import JobContext
from .spec import STAGE_EXPLAIN, score_stage


@dataclass
class LatentOutcome:
    latent: int
    status: str  # done | skipped | failed | already_done
    usage: Usage = field(default_factory=Usage)
    error: str | None = None


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"[:2000]


async def _db(fn, *args, **kw):
    """Store calls run on a worker thread: a busy database (another process's write) never stalls the loop."""
    return await asyncio.to_thread(fn, *args, **kw)


def _explanation_row(ctx: JobContext, job_id: int, latent: int, res, usage: Usage) -> dict:
    base = {"dictionary_pk": ctx.dictionary["id"], "latent": latent, "explain_key": ctx.explain_key,
            "explainer": ctx.spec.explainer, "seed": ctx.spec.seed, "usage": usage.as_dict(),
            "cost_usd": usage.cost_usd, "job_id": job_id}
    if isinstance(res, Skipped):
        return {**base, "text": None, "skipped": res.reason, "parsed": False}
    return {**base, "text": res.text, "model": res.model, "prompt_version": res.prompt_version,
            "parsed": res.parsed, "examples_used": [int(i) for i in res.examples_used]}


def _as_explanation(row: dict) -> Explanation:
    return Explanation(row["latent"], row["text"], row["explainer"], row["prompt_version"], row["model"],
                       row["seed"], examples_used=tuple(row.get("examples_used") or ()))


async def _explain(ctx: JobContext, store: Store, job_id: int, record, client) -> tuple[dict, bool]:
    """(The latent's explanation row: the stored one with this identity, else made now and stored; whether this
    call inserted it — a row just inserted has no scores yet)."""
    row = await _db(store.find_explanation, ctx.dictionary["id"], record.latent, ctx.explain_key)
    if row is not None:
        def mark():
            with store.tx(write=True) as conn:
                store.finish_item(conn, job_id, record.latent, STAGE_EXPLAIN, "done" if row["text"] else "skipped",
                                  error=row["skipped"])
        await _db(mark)
        return row, False
    with usage_scope() as spent:
        try:
            res = await explain(record, client, kind=ctx.spec.explainer, config=ctx.explain_config,
                                seed=ctx.spec.seed)
        except BaseException as e:
            await _fail(store, job_id, record.latent, STAGE_EXPLAIN, spent, e)
            raise
    usage = res.usage if isinstance(res, Explanation) else (res.usage or spent)

    def write() -> tuple[dict, bool]:
        with store.tx(write=True) as conn:
            stored = store.store_explanation(conn, _explanation_row(ctx, job_id, record.latent, res, usage))
            store.finish_item(conn, job_id, record.latent, STAGE_EXPLAIN,
                              "skipped" if isinstance(res, Skipped) else "done", usage,
                              error=res.reason if isinstance(res, Skipped) else None)
            return stored
    return await _db(write)


async def _fail(store: Store, job_id: int, latent: int, stage: str, spent: Usage, e: BaseException) -> None:
    """Record a stage's failure and its spend; a cancellation (the job stopping) gives the item back instead."""
    status = "pending" if isinstance(e, asyncio.CancelledError) else "failed"

    def write():
        with store.tx(write=True) as conn:
            store.finish_item(conn, job_id, latent, stage, status, spent,
                              error=None if status == "pending" else _err(e))
    await asyncio.shield(_db(write))


async def _score(ctx: JobContext, store: Store, job_id: int, record, expl_row: dict, scorer, cfg, client,
                 done_keys: set[str]) -> Usage:
    name, stage = scorer.name, score_stage(scorer.name)
    key = ctx.score_keys[name]
    if key in done_keys:
        def mark():
            with store.tx(write=True) as conn:
                store.finish_item(conn, job_id, record.latent, stage, "done")
        await _db(mark)
        return Usage()
    with usage_scope() as spent:
        try:
            res = await scorer.score(record, _as_explanation(expl_row), client, config=cfg, seed=ctx.spec.seed)
        except BaseException as e:
            await _fail(store, job_id, record.latent, stage, spent, e)
            raise

    def write():
        with store.tx(write=True) as conn:
            store.insert_score(conn, {"explanation_id": expl_row["id"], "score_key": key, "scorer": name,
                                      "model": res.model, "prompt_version": res.prompt_version, "seed": res.seed,
                                      "value": headline(name, res.metrics), "metrics": res.metrics,
                                      "details": res.details, "skipped": res.skipped, "usage": res.usage.as_dict(),
                                      "cost_usd": res.usage.cost_usd, "job_id": job_id})
            store.finish_item(conn, job_id, record.latent, stage, "skipped" if res.skipped else "done", res.usage,
                              error=res.skipped)
    await _db(write)
    return res.usage


async def run_latent(ctx: JobContext, store: Store, job_id: int, latent: int, stages: list[str],
                     explainer_client, judge_client) -> LatentOutcome:
    """Run a latent's leased stages. Transient LLM failures (after the client's retries) end as failed items with
    the reason; a permanent one (bad credentials, unknown model) and bad input are raised: they stop the job."""
    record = ctx.record(latent)
    with usage_scope() as total, shared_samples():  # the latent is sampled once for all its stages
        try:
            await ctx.warm(record)
            expl, fresh = await _explain(ctx, store, job_id, record, explainer_client)
            todo = [(s, c) for s, c in ctx.scorer_configs if score_stage(s.name) in stages]
            if not expl["text"]:
                await _db(_skip_scores, store, job_id, latent, todo, expl["skipped"] or "no explanation")
                return LatentOutcome(latent, "already_done" if expl.get("job_id") != job_id else "skipped", total)
            done_keys = set() if fresh else await _db(store.score_keys_done, expl["id"])
            reused = expl.get("job_id") != job_id and all(ctx.score_keys[s.name] in done_keys for s, _ in todo)
            await gather_or_cancel(*(_score(ctx, store, job_id, record, expl, s, c, judge_client, done_keys)
                                     for s, c in todo))
        except (PermanentLLMError, AutointerpError):
            raise
        except LLMError as e:
            # the stages this failure cancelled or never reached fail with it (not pending: the runner would
            # lease them again at once); `retry` or a resume gives them another chance
            await _db(store.fail_unfinished, job_id, latent, stages, f"not finished: {_err(e)}")
            return LatentOutcome(latent, "failed", total, _err(e))
    return LatentOutcome(latent, "already_done" if reused else "done", total)


def _skip_scores(store: Store, job_id: int, latent: int, todo, reason: str) -> None:
    with store.tx(write=True) as conn:
        for s, _ in todo:
            store.finish_item(conn, job_id, latent, score_stage(s.name), "skipped", error=f"explanation: {reason}")
