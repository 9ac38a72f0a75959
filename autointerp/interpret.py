"""Explain and score the latents of one cache: the library function behind `autointerp interpret` (and, later,
the Celery tasks — they call this same code per chunk of latents).

Results go to a JSON-lines file, one row per explanation and per score, each with its provenance (dictionary id,
latent, explainer/scorer, model, prompt version, sampling seed, LLM usage and cost, time). Rows are appended and
fsynced per latent, so a crash loses at most the latents in flight; re-running the same command skips every
(latent, stage) already in the file and pays nothing twice (the LLM response cache covers the rest).

A permanent LLM error (bad credentials, unknown model) stops the job at once and records nothing as a score;
a transient one that outlives its retries leaves that latent unrecorded, so the next run retries it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from tqdm import tqdm

from .cache import LatentCache
from .errors import ConfigError
from .explainers import EXPLAINERS, ExplainConfig, Explanation, check_kind, explain
from .llm.base import LLMError, PermanentLLMError, Usage
from .records import Examples
from .sampling import NegativePool, SamplingConfig, Skipped
from .scorers import get_scorer

log = logging.getLogger(__name__)


@dataclass
class InterpretConfig:
    explainer: str = "default"
    scorers: Sequence[str] = ("detection", "fuzzing")
    seed: int = 0
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    hard_negatives: bool = True  # embed the cache's random pool once for "hard" negatives
    concurrency: int = 8  # latents in flight
    scorer_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # per scorer Config overrides


@dataclass
class InterpretSummary:
    latents_done: int = 0
    latents_skipped: int = 0
    latents_failed: int = 0
    latents_already_done: int = 0
    usage: Usage = field(default_factory=Usage)
    errors: list[str] = field(default_factory=list)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_results(path: Path) -> list[dict]:
    """Rows of a results file; a torn last line (crash mid-write) is ignored."""
    rows = []
    if not path.exists():
        return rows
    with path.open(encoding="utf-8") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("%s: ignoring a torn line", path)
    return rows


class _ResultWriter:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        torn = path.exists() and path.stat().st_size and path.read_bytes()[-1:] != b"\n"
        self._fh = path.open("a", encoding="utf-8")
        if torn:  # a crash mid-line: end it, so the next row is not glued onto the torn one
            self._fh.write("\n")
        self._lock = asyncio.Lock()

    async def write(self, rows: list[dict]) -> None:
        async with self._lock:
            self._fh.write("".join(json.dumps(r, default=_json_default) + "\n" for r in rows))
            self._fh.flush()
            os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()


def _json_default(o):
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def pool_examples(cache: LatentCache) -> Examples:
    import numpy as np

    rows = np.asarray(cache.array("pool_rows"), dtype=np.int64)
    tokens = np.asarray(cache.array("windows")[np.sort(rows)], dtype=np.int32)
    return Examples(np.sort(rows), tokens, np.zeros(tokens.shape, np.float32))


def _scorer_config(name: str, cfg: InterpretConfig, pool: NegativePool | None, extra: dict[str, Any]):
    scorer = get_scorer(name)
    fields = {f.name for f in dataclasses.fields(scorer.Config)}
    kw = {k: v for k, v in {"sampling": cfg.sampling, "pool": pool, **extra}.items() if k in fields}
    kw.update({k: v for k, v in cfg.scorer_options.get(name, {}).items() if k in fields})
    unknown = set(cfg.scorer_options.get(name, {})) - fields
    if unknown:
        raise ConfigError(f"scorer {name}: unknown option(s) {', '.join(sorted(unknown))} "
                          f"(valid: {', '.join(sorted(fields))})")
    return scorer, scorer.Config(**kw)


async def interpret(cache: LatentCache, latents: Sequence[int], *, explainer_client, judge_client,
                    config: InterpretConfig = InterpretConfig(), out: str | Path = "results.jsonl",
                    progress: bool = True, scorer_context: dict[str, Any] | None = None) -> InterpretSummary:
    """Explain then score every latent in `latents`; appends rows to `out`. `scorer_context` passes objects some
    scorers need (e.g. subject model and dictionary for intervention) into their Config by field name."""
    check_kind(config.explainer)
    out = Path(out)
    summary = InterpretSummary()
    rows = read_results(out)
    done_expl: dict[int, dict] = {}
    done_scores: set[tuple[int, str]] = set()
    expl_model = getattr(explainer_client, "model", "") or ""
    judge_model = getattr(judge_client, "model", "") or ""
    job = {"dictionary_id": cache.dictionary_id, "hookpoint": cache.manifest.get("hookpoint"),
           "explainer": config.explainer, "explainer_model": expl_model, "seed": config.seed}
    for r in rows:
        if any(r.get(k) != v for k, v in job.items()):
            continue
        if r["type"] == "explanation":
            done_expl[int(r["latent"])] = r
        elif r["type"] == "score" and r.get("judge_model") == judge_model:
            done_scores.add((int(r["latent"]), r["scorer"]))
    random_pool = None
    if config.explainer == "random":  # the baseline draws from other explainers' texts for this dictionary
        random_pool = {int(r["latent"]): r["text"] for r in rows if r["type"] == "explanation" and r.get("text")
                       and r.get("dictionary_id") == cache.dictionary_id and r.get("explainer") != "random"}
        if not random_pool:
            raise ConfigError(f"explainer 'random' draws from other latents' explanations, and {out} holds none for "
                              "this dictionary: run another explainer first")

    pool = None
    if config.hard_negatives:
        pool = NegativePool.from_examples(pool_examples(cache), cache._decode)
    scorers = [_scorer_config(n, config, pool, scorer_context or {}) for n in config.scorers]
    expl_cfg = ExplainConfig(sampling=config.sampling, pool=pool, random_pool=random_pool)
    base = {**job, "model_subject": cache.manifest.get("model")}
    writer = _ResultWriter(out)
    sem = asyncio.Semaphore(max(1, config.concurrency))
    bar = tqdm(total=len(latents), unit="latent", disable=not progress, desc="interpret", dynamic_ncols=True)
    stop = asyncio.Event()

    async def one(latent: int) -> None:
        async with sem:
            if stop.is_set():
                return
            todo = [s for s in scorers if (latent, s[0].name) not in done_scores]
            if latent in done_expl and (done_expl[latent].get("skipped") or not todo):
                summary.latents_already_done += 1
                bar.update(1)
                return
            record = cache.record(latent)
            new_rows: list[dict] = []
            try:
                if latent in done_expl:
                    r = done_expl[latent]
                    expl = Explanation(latent, r["text"], r["explainer"], r["prompt_version"], r["model"], r["seed"],
                                       examples_used=tuple(r.get("examples_used", ())))
                else:
                    expl = await explain(record, explainer_client, kind=config.explainer, config=expl_cfg,
                                         seed=config.seed)
                    if isinstance(expl, Skipped):
                        usage = expl.usage or Usage()
                        new_rows.append({**base, "type": "explanation", "latent": latent, "skipped": expl.reason,
                                         "text": None, "usage": usage.as_dict(), "created": _now()})
                        summary.usage.add(usage)
                        summary.latents_skipped += 1
                        await writer.write(new_rows)
                        return
                    new_rows.append({**base, "type": "explanation", "latent": latent, "text": expl.text,
                                     "model": expl.model, "prompt_version": expl.prompt_version,
                                     "usage": expl.usage.as_dict(), "examples_used": list(expl.examples_used),
                                     "parsed": expl.parsed, "created": _now()})
                    summary.usage.add(expl.usage)
                results = await asyncio.gather(*(s.score(record, expl, judge_client, config=c, seed=config.seed)
                                                 for s, c in todo))
                for res in results:
                    new_rows.append({**base, "type": "score", "latent": latent, "scorer": res.scorer,
                                     "explanation": expl.text, "model": res.model, "judge_model": judge_model,
                                     "prompt_version": res.prompt_version, "metrics": res.metrics,
                                     "skipped": res.skipped, "usage": res.usage.as_dict(), "details": res.details,
                                     "created": _now()})
                    summary.usage.add(res.usage)
            except PermanentLLMError as e:
                stop.set()
                summary.errors.append(f"latent {latent}: {e}")
                raise
            except LLMError as e:  # transient, retries exhausted: leave the latent for the next run
                summary.latents_failed += 1
                summary.errors.append(f"latent {latent}: {e}")
                log.warning("latent %d failed: %s", latent, e)
                return
            finally:
                bar.update(1)
            await writer.write(new_rows)
            summary.latents_done += 1

    try:
        # a TaskGroup cancels the latents still in flight when one raises (a permanent LLM error stops the job
        # without paying for, or half-writing, the rest)
        async with asyncio.TaskGroup() as tg:
            for i in latents:
                tg.create_task(one(int(i)))
    except* PermanentLLMError as eg:
        raise eg.exceptions[0] from None
    finally:
        bar.close()
        writer.close()
    return summary


def parse_latents(spec: str | None, cache: LatentCache, n: int | None) -> list[int]:
    """`0-99,120,130` or None (the first `n` alive latents)."""
    if not spec:
        alive = cache.alive_latents().tolist()
        return alive[: n or len(alive)]
    out: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        try:
            if "-" in part:
                a, b = part.split("-", 1)
                out.extend(range(int(a), int(b) + 1))
            elif part:
                out.append(int(part))
        except ValueError:
            raise ConfigError(f"--latents: {part!r} is not a number or a range like 0-99") from None
    bad = [i for i in out if not 0 <= i < cache.n_latents]
    if bad:
        raise ConfigError(f"--latents: {bad[0]} out of range (the dictionary has {cache.n_latents} latents)")
    return out


__all__ = ["InterpretConfig", "InterpretSummary", "interpret", "read_results", "parse_latents", "EXPLAINERS"]
