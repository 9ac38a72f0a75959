"""Explain and score the latents of one cache: the library function behind `autointerp interpret` (and, later,
the Celery tasks — they call this same code per chunk of latents).

Results go to a JSON-lines file, one row per explanation and per score, each with its provenance (dictionary id,
latent, explainer/scorer, model, prompt version, sampling seed, LLM usage and cost, time). Rows are appended and
fsynced per latent, so a crash loses at most the latents in flight; re-running the same command skips every
(latent, stage) already in the file and pays nothing twice (the LLM response cache covers the rest).

Usage rows: with each latent's rows goes a `latent_usage` row, the LLM usage (calls, tokens, cost) of everything
this run did for that latent (explanation + every scorer, total and per stage); a run that wrote rows ends with a
`job` row holding the run's total, its counts and how it ended.

Every prompt template the job will use is loaded (and so checked) before the first LLM call: a broken template is
one ConfigError and nothing is written. A permanent LLM error (bad credentials, unknown model) stops the job at once
and records nothing as a score; a transient one that outlives its retries leaves that latent unrecorded, so the
next run retries it.
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
from typing import Any, Mapping, Sequence

from tqdm import tqdm

from .aio import first_error, gather_or_cancel
from .cache import LatentCache
from .errors import ConfigError
from .explainers import EXPLAINERS, ExplainConfig, Explanation, check_kind, explain
from .explainers import templates as explainer_templates
from .llm import usage_scope
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
    prompt_dir: Path | None = None  # templates of the explainer and every scorer (None: the packaged prompts/)


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
    """Appends rows, fsynced. The file is opened on the first write: a job that writes nothing creates nothing."""

    def __init__(self, path: Path):
        self.path = path
        self._fh = None
        self._lock = asyncio.Lock()
        self.rows_written = 0

    def _open(self):
        if self._fh is None:
            path = self.path
            path.parent.mkdir(parents=True, exist_ok=True)
            torn = path.exists() and path.stat().st_size and path.read_bytes()[-1:] != b"\n"
            self._fh = path.open("a", encoding="utf-8")
            if torn:  # a crash mid-line: end it, so the next row is not glued onto the torn one
                self._fh.write("\n")
        return self._fh

    def write_now(self, rows: list[dict]) -> None:
        fh = self._open()
        fh.write("".join(json.dumps(r, default=_json_default) + "\n" for r in rows))
        fh.flush()
        os.fsync(fh.fileno())
        self.rows_written += len(rows)

    async def write(self, rows: list[dict]) -> None:
        async with self._lock:
            self.write_now(rows)

    def close(self) -> None:
        if self._fh is not None:
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


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _option_value(scorer: str, f: dataclasses.Field, value: Any) -> Any:
    """`value` checked against the kind of the field's default (bool, int, float, str, tuple); lists become
    tuples, a dict updates a dataclass default (e.g. sampling), a string names a Path field's folder. Other fields
    (default None or an object) take the value as is."""
    default = _default(f)
    if dataclasses.is_dataclass(default) and isinstance(value, Mapping):
        try:
            return dataclasses.replace(default, **value)
        except TypeError as e:
            raise ConfigError(f"scorer option {scorer}.{f.name}: {e}") from None
    if isinstance(value, str) and "Path" in str(f.type):
        return Path(value)
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, str):
        ok = isinstance(value, str)
    elif isinstance(default, tuple):
        ok = isinstance(value, (list, tuple))
        value = tuple(value) if ok else value
    else:
        return value
    if not ok:
        raise ConfigError(f"scorer option {scorer}.{f.name}: expected {type(default).__name__} like {default!r}, "
                          f"got {value!r}")
    return value


def check_scorer_options(scorers: Sequence[str], options: Mapping[str, Mapping[str, Any]]) -> dict:
    """{scorer: {field: value}} with every value checked. An option for a scorer not in `scorers`, an unknown field
    or a value of the wrong kind fails with one line naming it."""
    out: dict[str, dict[str, Any]] = {}
    for name, opts in options.items():
        if name not in scorers:
            raise ConfigError(f"scorer option for {name!r}, which is not among the scorers ({', '.join(scorers)})")
        fields = {f.name: f for f in dataclasses.fields(get_scorer(name).Config)}
        unknown = set(opts) - set(fields)
        if unknown:
            raise ConfigError(f"scorer {name}: unknown option(s) {', '.join(sorted(unknown))} "
                              f"(valid: {', '.join(sorted(fields))})")
        out[name] = {k: _option_value(name, fields[k], v) for k, v in opts.items()}
    return out


def _scorer_config(name: str, cfg: InterpretConfig, pool: NegativePool | None, extra: dict[str, Any]):
    """The scorer's Config: the job's sampling, pool and prompt_dir, then the scorer_context objects (by field
    name), then the scorer_options (which win)."""
    scorer = get_scorer(name)
    fields = {f.name for f in dataclasses.fields(scorer.Config)}
    base: dict[str, Any] = {"sampling": cfg.sampling, "pool": pool}
    if cfg.prompt_dir is not None:
        base["prompt_dir"] = Path(cfg.prompt_dir)
    kw = {k: v for k, v in {**base, **extra}.items() if k in fields}
    raw = cfg.scorer_options.get(name, {})
    for k, v in check_scorer_options(cfg.scorers, {name: raw})[name].items():
        if isinstance(raw[k], Mapping) and dataclasses.is_dataclass(kw.get(k)):
            v = dataclasses.replace(kw[k], **raw[k])  # a dict updates the job's value (e.g. its sampling)
        kw[k] = v
    return scorer, scorer.Config(**kw)


def _total(usages) -> Usage:
    total = Usage()
    for u in usages:
        total.add(u)
    return total


def _usage_row(base: dict, latent: int, judge_model: str, stages: dict[str, Usage]) -> dict:
    """A latent's LLM usage in this run: the total over its stages, and each stage's part."""
    total = _total(stages.values())
    return {**base, "type": "latent_usage", "latent": latent, "judge_model": judge_model, "usage": total.as_dict(),
            "stages": {k: u.as_dict() for k, u in stages.items()}, "created": _now()}


def job_key(cache: LatentCache, config: InterpretConfig, explainer_client) -> dict:
    """What makes rows belong to one job (what a re-run resumes): dictionary, hookpoint, explainer kind and model,
    seed. Score rows belong to it for one judge model (`in_job(row, key, judge_model)`)."""
    return {"dictionary_id": cache.dictionary_id, "hookpoint": cache.manifest.get("hookpoint"),
            "explainer": config.explainer, "explainer_model": getattr(explainer_client, "model", "") or "",
            "seed": config.seed}


def in_job(row: dict, key: dict, judge_model: str | None = None) -> bool:
    return all(row.get(k) == v for k, v in key.items()) and \
        (judge_model is None or row.get("judge_model") == judge_model)


async def interpret(cache: LatentCache, latents: Sequence[int], *, explainer_client, judge_client,
                    config: InterpretConfig = InterpretConfig(), out: str | Path = "results.jsonl",
                    progress: bool = True, scorer_context: dict[str, Any] | None = None) -> InterpretSummary:
    """Explain then score every latent in `latents`; appends rows to `out`. `scorer_context` passes objects some
    scorers need (e.g. subject model and dictionary for intervention) into their Config by field name."""
    check_kind(config.explainer)
    check_scorer_options(config.scorers, config.scorer_options)
    out = Path(out)
    started = _now()
    summary = InterpretSummary()
    rows = read_results(out)
    done_expl: dict[int, dict] = {}
    done_scores: set[tuple[int, str]] = set()
    judge_model = getattr(judge_client, "model", "") or ""
    job = job_key(cache, config, explainer_client)
    for r in rows:
        if not in_job(r, job):
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

    # options and every template first: a mistake there fails before the (slow) pool embedding and any LLM call
    expl_cfg = ExplainConfig(sampling=config.sampling, random_pool=random_pool,
                             prompt_dir=None if config.prompt_dir is None else Path(config.prompt_dir))
    explainer_templates(config.explainer, expl_cfg)
    for scorer, cfg in [_scorer_config(n, config, None, scorer_context or {}) for n in config.scorers]:
        scorer.preflight(cfg, judge_client)
    pool = None
    if config.hard_negatives:
        pool = NegativePool.from_examples(pool_examples(cache), cache._decode)
    scorers = [_scorer_config(n, config, pool, scorer_context or {}) for n in config.scorers]
    expl_cfg = dataclasses.replace(expl_cfg, pool=pool)
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
            stages: dict[str, Usage] = {}  # what this run spent on the latent, per stage
            with usage_scope() as spent:  # every call of this latent, including those of a stage that fails
                try:
                    if latent in done_expl:
                        r = done_expl[latent]
                        expl = Explanation(latent, r["text"], r["explainer"], r["prompt_version"], r["model"],
                                           r["seed"], examples_used=tuple(r.get("examples_used", ())))
                    else:
                        expl = await explain(record, explainer_client, kind=config.explainer, config=expl_cfg,
                                             seed=config.seed)
                        if isinstance(expl, Skipped):
                            usage = expl.usage or Usage()
                            new_rows.append({**base, "type": "explanation", "latent": latent,
                                             "skipped": expl.reason, "text": None, "usage": usage.as_dict(),
                                             "created": _now()})
                            new_rows.append(_usage_row(base, latent, judge_model, {"explanation": usage}))
                            summary.usage.add(usage)
                            summary.latents_skipped += 1
                            await writer.write(new_rows)
                            return
                        new_rows.append({**base, "type": "explanation", "latent": latent, "text": expl.text,
                                         "model": expl.model, "prompt_version": expl.prompt_version,
                                         "usage": expl.usage.as_dict(), "examples_used": list(expl.examples_used),
                                         "parsed": expl.parsed, "created": _now()})
                        stages["explanation"] = expl.usage
                    # one scorer failing for good cancels the others: no paid calls whose answers nobody reads
                    results = await gather_or_cancel(*(s.score(record, expl, judge_client, config=c,
                                                               seed=config.seed) for s, c in todo))
                    for res in results:
                        new_rows.append({**base, "type": "score", "latent": latent, "scorer": res.scorer,
                                         "explanation": expl.text, "model": res.model, "judge_model": judge_model,
                                         "prompt_version": res.prompt_version, "metrics": res.metrics,
                                         "skipped": res.skipped, "usage": res.usage.as_dict(),
                                         "details": res.details, "created": _now()})
                        stages[res.scorer] = res.usage
                    new_rows.append(_usage_row(base, latent, judge_model, stages))
                    summary.usage.add(_total(stages.values()))
                except LLMError as e:
                    # what the latent spent until it failed still counts (the scope sees every metered call; a
                    # client without metering reports only the stages that finished)
                    lost = spent if spent.calls or spent.cached_calls else _total(stages.values())
                    summary.usage.add(lost)
                    summary.errors.append(f"latent {latent}: {e}")
                    if lost.calls or lost.cached_calls:
                        await writer.write([{**_usage_row(base, latent, judge_model, {"until_failure": lost}),
                                             "error": f"{type(e).__name__}: {e}"}])
                    if isinstance(e, PermanentLLMError):
                        stop.set()
                        raise
                    summary.latents_failed += 1  # transient, retries exhausted: left for the next run
                    log.warning("latent %d failed: %s", latent, e)
                    return
                except BaseException:  # bad input, cancellation: the job stops, its total still counts the spend
                    summary.usage.add(spent if spent.calls or spent.cached_calls else _total(stages.values()))
                    raise
                finally:
                    bar.update(1)
            await writer.write(new_rows)
            summary.latents_done += 1

    error: BaseException | None = None
    try:
        # a TaskGroup cancels the latents still in flight when one raises (a permanent LLM error stops the job
        # without paying for, or half-writing, the rest)
        async with asyncio.TaskGroup() as tg:
            for i in latents:
                tg.create_task(one(int(i)))
    except BaseExceptionGroup as eg:
        error = first_error(eg)
        raise error from None  # one clear error for the caller (the CLI prints one line), not a group
    except BaseException as e:  # Ctrl-C, cancellation
        error = e
        raise
    finally:
        bar.close()
        try:
            if writer.rows_written:  # a run that wrote rows ends with its totals
                writer.write_now([{**base, "type": "job", "latent": None, "judge_model": judge_model,
                                   "scorers": list(config.scorers),
                                   "latents": len(latents), "latents_done": summary.latents_done,
                                   "latents_skipped": summary.latents_skipped,
                                   "latents_failed": summary.latents_failed,
                                   "latents_already_done": summary.latents_already_done,
                                   "usage": summary.usage.as_dict(), "errors": summary.errors[:20],
                                   "stopped_by": None if error is None else f"{type(error).__name__}: {error}",
                                   "started": started, "created": _now()}])
        finally:
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


__all__ = ["InterpretConfig", "InterpretSummary", "interpret", "read_results", "parse_latents", "check_scorer_options",
           "EXPLAINERS"]
