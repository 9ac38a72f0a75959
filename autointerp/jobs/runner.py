"""submit · run (embedded) · status · cancel · resume · retry: the job seam that the CLI, the Celery workers and
the API call.

`submit` validates the spec (one line for a bad field, nothing queued), registers the dictionary when given a cache
folder, and writes the job row with one item per (latent, stage) in one transaction. A spec identical in everything
that changes results (`job_identity`) resumes the existing job instead of creating a second one.

`run_embedded` executes pending items in this process with the one worker loop (`loop.work`, which the Celery tasks
run too): `spec.concurrency` latents in flight, each leased in the store (renewed while it works), so a Celery worker
or a second embedded runner on the same store never runs the same latent at the same time, and a runner that dies
leaves leases that expire (at once for a dead process of this machine).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from ..errors import ConfigError
from ..llm.base import Usage
from ..store import Store
from ..store.tables import utcnow
from .context import load_context
from .spec import JobSpec, digest, job_identity, parse_job_spec
from .dispatch import Budget
from .loop import work

log = logging.getLogger(__name__)
FINAL = ("done", "failed", "stopped", "cancelled", "budget_exhausted")


def ensure_dictionary(store: Store, ref: str) -> dict:
    """The store's dictionary for `ref`: a cache folder (registered now if new, or re-registered when the folder
    holds a newer extraction), else a name/key already in the store."""
    from ..cache import LatentCache

    path = Path(ref).expanduser()
    if (path / "manifest.json").is_file():
        cache = LatentCache(path)
        try:
            row = store.dictionary(str(path))
            if row["n_tokens"] == cache.n_tokens and row["key"].endswith(f"@{cache.manifest['hookpoint']}"):
                return row
        except ConfigError:
            pass
        return store.register_cache(cache)
    if path.exists():
        raise ConfigError(f"{path}: not a latent cache (manifest.json missing)")
    return store.dictionary(ref)


def select_latents(store: Store, dictionary: dict, spec: JobSpec) -> list[int]:
    from sqlalchemy import select

    from .selection import parse_latents
    from ..store.store import T_LATENT

    with store.tx() as conn:
        alive = list(conn.execute(select(T_LATENT.c.index).where(T_LATENT.c.dictionary_pk == dictionary["id"],
                                                                 T_LATENT.c.n_active > 0)
                                  .order_by(T_LATENT.c.index)).scalars())
    return parse_latents(spec.latents, alive, dictionary["n_latents"], spec.n_latents)


def submit(store: Store, spec: JobSpec | dict | str) -> int:
    """Create (or find, when an identical one exists) the job for `spec`; returns its id. Nothing runs yet."""
    spec = parse_job_spec(spec)
    if spec.prompt_dir and not Path(spec.prompt_dir).is_dir():
        raise ConfigError(f"prompt_dir {spec.prompt_dir}: not a folder")
    spec.sampling_config()
    from .spec import scorer_options

    scorer_options(spec)
    _preflight(spec)
    if spec.extraction is not None:
        existing = store.find_job(_extraction_job_key(spec))
        if existing is not None:  # this very job, submitted before (extracting or done): runtime settings apply,
            # but its shards stay as its items were made
            store.set_job(existing["id"], budget_usd=spec.budget_usd,
                          spec={**spec.model_dump(mode="json"), "extraction": existing["spec"]["extraction"]})
            return int(existing["id"])
        dictionary = store.dictionary_by_extraction(spec.extraction.key())
        if dictionary is None:
            return _submit_extraction(store, spec)
        # extracted before with these settings (by another job): this one starts at its latents
    else:
        dictionary = ensure_dictionary(store, spec.dictionary)
        if dictionary.get("format") == "meta-dictionary":
            from ..meta import meta_spec

            spec = meta_spec(spec, dictionary)
        elif spec.explainer == "meta":
            raise ConfigError(f"explainer 'meta' explains a meta-dictionary's latents; {dictionary['name']} is not "
                              "one (register one with `autointerp meta-members --save`)")
    latents = select_latents(store, dictionary, spec)
    key = digest(job_identity(spec, dictionary["key"], latents))  # reads every prompt file: a missing one fails here
    existing = store.find_job(key)
    if existing is not None:
        # same results, maybe other runtime settings (server address, timeouts, budget): the new ones apply
        store.set_job(existing["id"], budget_usd=spec.budget_usd, spec=spec.model_dump(mode="json"))
        return int(existing["id"])
    stages = spec.stages()
    return store.create_job_bulk(key, spec.model_dump(mode="json"), dictionary["id"], spec.budget_usd, latents,
                                 stages)


def _submit_extraction(store: Store, spec: JobSpec) -> int:
    """A job that extracts first: one item per shard and a merge item; its latents are queued by the merge."""
    from .spec import STAGE_EXTRACT, STAGE_MERGE

    ex = spec.extraction
    _check_extraction(ex)
    items = [(s, STAGE_EXTRACT) for s in range(len(ex.shard_bounds()))] + [(0, STAGE_MERGE)]
    return store.create_job(_extraction_job_key(spec), spec.model_dump(mode="json"), None, spec.budget_usd, items)


def _extraction_job_key(spec: JobSpec) -> str:
    """An extracting job's identity: the extraction's settings, the results' identity, the latent selection."""
    ident = job_identity(spec, f"extraction:{spec.extraction.key()}", [])
    return digest({**ident, "selection": [spec.latents, spec.n_latents]})


def _check_extraction(ex) -> None:
    """What can be checked without loading anything: the corpus names a source that exists here or anywhere."""
    from ..corpus import is_local

    spec = ex.corpus_spec()
    spec.validate()
    if is_local(spec) and not Path(ex.corpus).expanduser().exists():
        raise ConfigError(f"extraction.corpus {ex.corpus}: no such file (workers read it at this path)")


class _AnyJudge:
    """Stands in for the judge at submit: templates and options are checked before anything is queued."""

    model = ""
    supports_logprobs = True


def _preflight(spec: JobSpec) -> None:
    from ..explainers import ExplainConfig
    from ..explainers import templates as explainer_templates
    from .scoring import scorer_config

    explainer_templates(spec.explainer, ExplainConfig(prompt_dir=Path(spec.prompt_dir) if spec.prompt_dir else None))
    for name in spec.scorers:
        scorer, cfg = scorer_config(name, spec, None, {})
        if name != "intervention":  # its check needs the subject model, loaded by the runner
            scorer.preflight(cfg, _AnyJudge())


@dataclass
class JobSummary:
    job_id: int
    status: str
    latents_done: int = 0
    latents_skipped: int = 0
    latents_failed: int = 0
    latents_already_done: int = 0
    usage: Usage = field(default_factory=Usage)
    errors: list[str] = field(default_factory=list)
    stopped_by: str | None = None

    def text(self, store: Store, out: Path | None = None) -> str:
        """What `autointerp interpret`, `run` and `job run` print when the run ends: the job's score table, then
        one line of counts, LLM usage and status (and `out`, the file its rows were also exported to)."""
        from ..metrics import aggregate, format_table
        from .export import export_rows

        scores = [r for r in export_rows(store, job_id=self.job_id) if r["type"] == "score"]
        u = self.usage
        return (format_table(aggregate(scores))
                + f"\n\njob {self.job_id}: {self.latents_done} latents done, {self.latents_already_done} already "
                  f"done, {self.latents_skipped} skipped, {self.latents_failed} failed; LLM: {u.calls} calls "
                  f"({u.cached_calls} cached), {u.prompt_tokens} prompt + {u.completion_tokens} completion tokens, "
                  f"${u.cost_usd:.4f}; status {self.status}; results in the store ({store!r})"
                + (f" and {out}" if out else ""))


def _worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def release_dead_local_workers(store: Store, job_id: int) -> int:
    """Items leased by a runner of this machine whose process is gone (Ctrl-C'd hard, killed, crashed) go back
    to pending at once, instead of after their lease (a laptop user re-running a command should not wait)."""
    host = socket.gethostname()
    n = 0
    for w in store.running_workers(job_id):
        h, _, rest = w.partition(":")
        pid = rest.partition(":")[0]
        if h == host and pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            n += store.release_worker(job_id, w)
    return n


def _random_pool(store: Store, dictionary: dict) -> dict[int, str]:
    rows = store.explanations(dictionary["id"], exclude_explainer="random", with_text=True)
    if not rows:
        raise ConfigError(f"explainer 'random' draws from other latents' explanations, and the store holds none for "
                          f"dictionary {dictionary['name']}: run another explainer first")
    return {r["latent"]: r["text"] for r in rows}


def job_context(store: Store, job: dict):
    spec = parse_job_spec(job["spec"])
    dictionary = store.dictionary(job["dictionary_pk"])
    pool = _random_pool(store, dictionary) if spec.explainer == "random" else None
    return load_context(store, spec, dictionary, random_pool=pool)


async def run_embedded(store: Store, job_id: int, *, progress: bool = True, latents: list[int] | None = None,
                       worker: str | None = None) -> JobSummary:
    """Run the job's pending items in this process until none is left (or cancel / budget / a permanent error)."""
    job = store.job(job_id)
    if job["status"] == "cancelled":
        raise ConfigError(f"job {job_id} is cancelled: `autointerp job resume {job_id}` first")
    worker = worker or _worker_name()
    release_dead_local_workers(store, job_id)
    if job["dictionary_pk"] is None:  # the extraction stage first: this process runs what nobody else holds
        job = _extract_embedded(store, job_id, worker, progress)
    ctx = job_context(store, job)
    settings = embedded_settings()
    summary = JobSummary(job_id, "running")
    store.set_job(job_id, status="running", started=job["started"] or utcnow(), finished=None, error=None)
    n_latents, todo = store.latent_progress(job_id, latents)
    summary.latents_already_done = n_latents - todo - store.latent_progress(job_id, latents, ("failed",))[1]
    bar = tqdm(total=todo, unit="latent", disable=not progress, desc=f"job {job_id}", dynamic_ncols=True)
    job = store.job(job_id)
    budget = Budget(store, job_id, settings) if job["budget_usd"] is not None else None
    try:
        res = await work(store, job_id, ctx, worker=worker, lease_s=settings.lease_s, settings=settings,
                         claim=lambda: store.claim_latents(job_id, worker, 1, settings.lease_s, latents),
                         budget=budget, budget_usd=job["budget_usd"], on_latent=lambda _: bar.update(1))
    finally:
        bar.close()
    error = res.error
    summary.usage = res.usage
    summary.latents_done, summary.latents_skipped, summary.latents_failed = res.done, res.skipped, res.failed
    summary.latents_already_done += res.already_done
    stop = [res.stopped_by] if res.stopped_by else []
    summary.status = _final_status(store, job_id, stop, error)
    store.set_job(job_id, status=summary.status, finished=utcnow() if summary.status in FINAL else None,
                  error=None if error is None else f"{type(error).__name__}: {error}"[:2000])
    if error is not None:
        summary.stopped_by = f"{type(error).__name__}: {error}"
        raise error
    summary.errors = [f"latent {e['latent']} {e['stage']}: {e['error']}" for e in store.item_errors(job_id)]
    return summary


def embedded_settings():
    """The queue layer's settings for a runner in this process: its lease (AUTOINTERP_LEASE_S), shared LLM limits
    and a Redis budget counter only when AUTOINTERP_REDIS_URL names a Redis explicitly (a laptop's Redis, if any,
    may serve other stores whose job ids collide)."""
    from .dispatch import WorkerSettings

    settings = WorkerSettings.from_env()
    if not os.environ.get("AUTOINTERP_REDIS_URL"):
        settings.redis_url = None
    return settings


def _extract_embedded(store: Store, job_id: int, worker: str, progress: bool) -> dict:
    """Run the job's extraction units here (waiting for shards other workers hold), then return the job row with
    its dictionary. A failure stops the job with its reason; Ctrl-C gives the unit back."""
    from .extraction import extraction_status, run_extraction_units

    job = store.job(job_id)
    store.set_job(job_id, status="running", started=job["started"] or utcnow(), finished=None, error=None)

    def cancelled() -> bool:
        return store.job(job_id)["status"] == "cancelled"

    ex = parse_job_spec(job["spec"]).extraction
    bar = tqdm(total=ex.n_tokens if ex else 0, unit="tok", unit_scale=True, disable=not progress,
               desc=f"job {job_id} extract", dynamic_ncols=True)
    try:
        done = run_extraction_units(store, job_id, worker, embedded_settings().lease_s, wait=True,
                                    should_stop=cancelled, on_tokens=bar.update)
    except BaseException as e:
        interrupted = isinstance(e, (KeyboardInterrupt, SystemExit))
        store.set_job(job_id, status="pending" if interrupted else "stopped",
                      error=None if interrupted else f"{type(e).__name__}: {e}"[:2000],
                      finished=None if interrupted else utcnow())
        raise
    finally:
        bar.close()
    if not done:
        raise ConfigError(f"job {job_id} is cancelled: `autointerp job resume {job_id}` first")
    if progress:
        st = extraction_status(store, job_id, parse_job_spec(job["spec"]))
        if st is not None:
            print(f"job {job_id}: extracted {st['tokens']:,} tokens in {st['shards']} shard(s)"
                  + (f" at {st['tokens_per_s']:,.0f} tokens/s" if st["tokens_per_s"] else ""), flush=True)
    return store.job(job_id)


def _final_status(store: Store, job_id: int, stop: list[str], error: BaseException | None) -> str:
    if error is not None:
        return "stopped" if not isinstance(error, (KeyboardInterrupt, asyncio.CancelledError)) else "pending"
    if stop:
        return stop[0]
    counts = store.item_counts(job_id)
    if any(c.get("pending", 0) or c.get("running", 0) for c in counts.values()):
        return "running"  # others (workers, runners) still hold items
    return "failed" if any(c.get("failed", 0) for c in counts.values()) else "done"


def run(store: Store, job_id: int, **kw) -> JobSummary:
    return asyncio.run(run_embedded(store, job_id, **kw))


# ----------------------------------------------------------------------------------------------- control


@dataclass
class JobStatus:
    job_id: int
    status: str
    dictionary: str
    stages: dict[str, dict[str, int]]
    spend: dict
    budget_usd: float | None
    latents: int
    latents_finished: int
    rate_per_s: float | None
    eta_s: float | None
    error: str | None
    errors: list[dict]
    extraction: dict | None = None

    def as_dict(self) -> dict:
        return dict(self.__dict__)

    def text(self) -> str:
        """What `autointerp job status` prints."""
        sp = self.spend
        lines = [f"job {self.job_id} [{self.status}] dictionary {self.dictionary}: {self.latents_finished}/"
                 f"{self.latents} latents finished; ${sp['cost_usd']:.4f} spent"
                 + (f" of ${self.budget_usd:.2f}" if self.budget_usd else "")
                 + f", {sp['calls']} LLM calls, {sp['prompt_tokens']}+{sp['completion_tokens']} tokens"]
        ex = self.extraction
        if ex:
            lines.append(f"  extraction: {ex['shards_done']}/{ex['shards']} shards, {ex['tokens']:,} tokens"
                         + (f", {ex['tokens_per_s']:,.0f} tokens/s" if ex["tokens_per_s"] else "")
                         + (f", ETA {ex['eta_s']:.0f} s" if ex["eta_s"] else "") + (", merged" if ex["merged"] else ""))
            for sh in ex["per_shard"]:
                lines.append(f"    shard {sh['shard']:<3} {sh['status']:<8} {sh['tokens']:>10,}/"
                             f"{sh['tokens_total']:,} tokens"
                             + (f"  {sh['tokens_per_s']:,.0f} tokens/s" if sh["tokens_per_s"] else "")
                             + (f"  {sh['worker']}" if sh["status"] == "running" and sh["worker"] else ""))
        if self.rate_per_s:
            lines.append(f"  {self.rate_per_s:.2f} latents/s" + (f", ETA {self.eta_s:.0f} s" if self.eta_s else ""))
        for stage, c in sorted(self.stages.items()):
            lines.append(f"  {stage:<22} " + "  ".join(f"{k} {v}" for k, v in sorted(c.items())))
        if self.error:
            lines.append(f"  stopped by: {self.error}")
        for e in self.errors[:5]:
            lines.append(f"  failed: latent {e['latent']} {e['stage']}: {e['error']}")
        return "\n".join(lines)


def status(store: Store, job_id: int) -> JobStatus:
    job = store.job(job_id)
    counts = store.item_counts(job_id)
    stages = parse_job_spec(job["spec"]).stages()
    per_latent = [counts.get(s, {}) for s in stages]
    n = sum(per_latent[0].values()) if per_latent else 0
    unfinished = max((c.get("pending", 0) + c.get("running", 0) for c in per_latent), default=0)
    finished = n - unfinished
    rate = eta = None
    if job["started"] is not None and finished:
        end = job["finished"] or utcnow()
        elapsed = max(1e-6, (end - job["started"]).total_seconds())
        rate = finished / elapsed
        eta = unfinished / rate if unfinished else 0.0
    from .extraction import extraction_status

    spec = parse_job_spec(job["spec"])
    name = store.dictionary(job["dictionary_pk"])["name"] if job["dictionary_pk"] is not None else \
        f"(extracting {spec.extraction.dictionary})"
    return JobStatus(job_id, job["status"], name, counts, store.job_spend(job_id), job["budget_usd"], n, finished,
                     rate, eta, job["error"], store.item_errors(job_id), extraction_status(store, job_id, spec))


def cancel(store: Store, job_id: int) -> None:
    store.job(job_id)
    store.set_job(job_id, status="cancelled")


def resume(store: Store, job_id: int, budget_usd: float | None = None) -> None:
    """Make a cancelled, stopped or budget-limited job runnable again (a new budget when given)."""
    job = store.job(job_id)
    values = {"status": "pending", "error": None}
    if budget_usd is not None:
        if budget_usd < 0:
            raise ConfigError("budget: expected a number >= 0")
        values.update(budget_usd=budget_usd, spec={**job["spec"], "budget_usd": budget_usd})
    store.set_job(job_id, **values)


def retry_failed(store: Store, job_id: int) -> int:
    """Failed items back to pending; returns how many."""
    store.job(job_id)
    n = store.reset_items(job_id, "failed")
    store.set_job(job_id, status="pending")
    return n


__all__ = ["submit", "run", "run_embedded", "status", "cancel", "resume", "retry_failed", "JobSummary",
           "JobStatus", "ensure_dictionary", "job_context"]
