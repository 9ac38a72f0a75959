"""The extraction stage of a job: shard units (gpu queue) → one merge unit → the job's latent units.

A shard unit collects its token range (`extract.extract_shard`; every dictionary of the extraction in the same
forward passes) and leaves its states in the store (`blob` "job/<id>/shard/<s>/<member>"), committed with its item;
its progress (tokens, tokens/s) is written every few seconds and renews its lease, so a killed GPU worker's shard is
leased again once the lease runs out and recomputed (a late duplicate of a finished shard writes nothing). The merge unit, once every shard is done, merges the states exactly
(`extract.publish_shards`) into a temporary folder, registers each dictionary with its examples in the store
(no path: nothing on this machine's disk is needed afterwards), queues the job's latents and deletes the shard
states — the queued latents and the merge item commit together, so a merge that runs twice queues nothing twice.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time

from ..errors import AutointerpError
from ..store import Store
from ..store.examples import delete_blobs, get_blob, put_blob
from .spec import STAGE_EXTRACT, STAGE_MERGE, ExtractionSpec, JobSpec, parse_job_spec

log = logging.getLogger(__name__)


class ExtractionFailed(AutointerpError):
    """A shard or the merge failed for good: the job stops with its reason."""


PROGRESS_S = 5.0  # seconds between a shard's progress writes (each renews its lease)


_SUBJECTS: dict[tuple, object] = {}
_SUBJECTS_LOCK = threading.Lock()


def _subject(model: str, device: str | None, dtype: str | None):
    """One subject model per worker process and settings (a GPU worker runs shard after shard on it; the last two
    are kept)."""
    from ..subject import load_subject

    key = (model, device, dtype)
    with _SUBJECTS_LOCK:
        if key in _SUBJECTS:
            return _SUBJECTS[key]
    subject = load_subject(model, device=device, dtype=dtype)
    with _SUBJECTS_LOCK:
        _SUBJECTS[key] = subject
        while len(_SUBJECTS) > 2:
            _SUBJECTS.pop(next(iter(_SUBJECTS)))
    return subject


def share_subject(subject):
    """Let this process's extraction units use a subject model already loaded (by its default device and dtype):
    the demo trains its SAEs on it, then its job extracts on the same one instead of loading it again."""
    with _SUBJECTS_LOCK:
        _SUBJECTS[(subject.spec, None, None)] = subject
    return subject


def _shard_key(job_id: int, shard: int, member: int) -> str:
    return f"job/{job_id}/shard/{shard}/{member}"


def run_shard(store: Store, job_id: int, spec: ExtractionSpec, shard: int, worker: str, lease_s: float,
              on_tokens=None) -> dict:
    """Run one leased shard to its stored state; returns its progress record. `on_tokens(n)`: n more tokens done
    (a progress bar)."""
    from ..extract import extract_shard

    w0, w1 = spec.shard_bounds()[shard]
    t0 = time.monotonic()
    last = [0.0]
    record = {"windows": [w0, w1], "tokens": 0, "tokens_total": (w1 - w0) * spec.ctx_len, "tokens_per_s": None,
              "worker": worker}

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        if on_tokens is not None:
            on_tokens(done - record["tokens"])
        record.update(tokens=done, tokens_per_s=round(done / max(1e-6, now - t0), 1))
        if now - last[0] >= PROGRESS_S:
            last[0] = now
            store.set_progress(job_id, shard, STAGE_EXTRACT, dict(record), worker, lease_s)

    stop = threading.Event()

    def beat() -> None:  # the lease outlives a slow first batch (model loading)
        while not stop.wait(lease_s / 3):
            store.set_progress(job_id, shard, STAGE_EXTRACT, dict(record), worker, lease_s)

    beater = threading.Thread(target=beat, daemon=True, name=f"shard-{shard}-lease")
    beater.start()
    try:
        subject = _subject(spec.model, spec.device, spec.dtype)
        kw = spec.extract_kwargs()
        kw.pop("device"), kw.pop("dtype")
        data = extract_shard(subject, [m.dictionary for m in spec.members()], spec.hookpoint, spec.corpus_spec(),
                             windows=(w0, w1), on_progress=progress, **kw)
    finally:
        stop.set()
        beater.join(timeout=5)
    record.update(seconds=round(time.monotonic() - t0, 2), bytes=sum(len(d) for d in data))
    from sqlalchemy import select, update

    from ..store.store import T_ITEM
    from ..store.tables import utcnow

    this = (T_ITEM.c.job_id == job_id, T_ITEM.c.latent == shard, T_ITEM.c.stage == STAGE_EXTRACT)
    with store.tx(write=True) as conn:
        if conn.execute(select(T_ITEM.c.status).where(*this)).scalar() == "done":
            return record  # a late duplicate (its lease had run out and another worker finished it): nothing to add
        for member, part in enumerate(data):
            put_blob(conn, _shard_key(job_id, shard, member), part)
        conn.execute(update(T_ITEM).where(*this)
                     .values(status="done", progress=record, lease_until=None, error=None, updated=utcnow()))
    return record


def run_merge(store: Store, job_id: int, spec: JobSpec) -> dict:
    """Merge every shard's state, register the dictionary (examples in the store), queue the job's latents."""
    from ..extract import publish_shards
    from ..store.store import T_JOB
    from .runner import select_latents

    ex = spec.extraction
    n = len(ex.shard_bounds())
    registered = []
    for member, mspec in enumerate(ex.members()):  # each member's states, merged and registered in turn
        with store.tx() as conn:
            states = [get_blob(conn, _shard_key(job_id, s, member)) for s in range(n)]
        missing = [s for s, b in enumerate(states) if b is None]
        if missing:
            raise RuntimeError(f"job {job_id}: shard states {missing} of {mspec.dictionary} missing from the store")
        name = ex.names[member] if member < len(ex.names) else None
        with tempfile.TemporaryDirectory(prefix="autointerp-merge-") as tmp:
            cache = publish_shards(states, tmp)
            registered.append(store.register_cache(cache, name=name, extraction_key=mspec.key(), keep_path=False))
    dictionary = registered[0]
    latents = select_latents(store, dictionary, spec)
    with store.tx(write=True) as conn:
        from sqlalchemy import update

        from ..store.store import T_ITEM
        from ..store.tables import utcnow

        store.add_latent_items(conn, job_id, latents, spec.stages())
        conn.execute(update(T_JOB).where(T_JOB.c.id == job_id).values(dictionary_pk=dictionary["id"]))
        conn.execute(update(T_ITEM).where(T_ITEM.c.job_id == job_id, T_ITEM.c.stage == STAGE_MERGE)
                     .values(status="done", lease_until=None, error=None, updated=utcnow(),
                             progress={"dictionary": dictionary["name"], "latents": len(latents),
                                       "n_alive": dictionary["n_alive"],
                                       "also": [d["name"] for d in registered[1:]]}))
        delete_blobs(conn, f"job/{job_id}/shard/")
    return dictionary


def run_extraction_units(store: Store, job_id: int, worker: str, lease_s: float, *, wait: bool = False,
                         should_stop=lambda: False, on_tokens=None) -> bool:
    """Run this job's extraction units that this process can lease: shards, then the merge once every shard is
    done. With `wait`, keep polling while other workers hold shards (the embedded runner); else return at once.
    True when the extraction is finished (the job's latents are queued)."""
    job = store.job(job_id)
    spec = parse_job_spec(job["spec"])
    if spec.extraction is None:
        return True
    while not should_stop():
        shard = store.claim_unit(job_id, worker, STAGE_EXTRACT, lease_s)
        if shard is not None:
            try:
                run_shard(store, job_id, spec.extraction, shard, worker, lease_s, on_tokens)
            except BaseException as e:
                _fail_unit(store, job_id, shard, STAGE_EXTRACT, e)
                raise
            continue
        merge = store.claim_unit(job_id, worker, STAGE_MERGE, lease_s, after=STAGE_EXTRACT)
        if merge is not None:
            try:
                run_merge(store, job_id, spec)
            except BaseException as e:
                _fail_unit(store, job_id, merge, STAGE_MERGE, e)
                raise
            return True
        if extraction_done(store, job_id):
            return True
        failed = [i for i in store.unit_items(job_id, (STAGE_EXTRACT, STAGE_MERGE)) if i["status"] == "failed"]
        if failed:
            i = failed[0]
            raise ExtractionFailed(f"{i['stage']} unit {i['latent']} failed: {i['error']} (`autointerp job retry "
                                   f"{job_id}` runs it again)")
        if not wait:
            return False
        time.sleep(1.0)
    return extraction_done(store, job_id)


def _fail_unit(store: Store, job_id: int, unit: int, stage: str, e: BaseException) -> None:
    """A unit that raised: given back on an interruption (Ctrl-C, shutdown), else failed with its reason (bad
    input fails for good; `job retry` runs it again)."""
    interrupted = isinstance(e, (KeyboardInterrupt, SystemExit))
    try:
        with store.tx(write=True) as conn:
            store.finish_item(conn, job_id, unit, stage, "pending" if interrupted else "failed",
                              error=None if interrupted else f"{type(e).__name__}: {e}"[:2000])
    except Exception:
        log.exception("job %d: could not record %s %d's failure (its lease expires)", job_id, stage, unit)


def extraction_done(store: Store, job_id: int) -> bool:
    items = store.unit_items(job_id, (STAGE_MERGE,))
    return not items or all(i["status"] == "done" for i in items)


def extraction_status(store: Store, job_id: int, spec: JobSpec) -> dict | None:
    """Shards (done / total), tokens collected, throughput and ETA, per shard too; None for a job without an
    extraction stage."""
    items = store.unit_items(job_id, (STAGE_EXTRACT, STAGE_MERGE))
    if not items or spec.extraction is None:
        return None
    bounds = spec.extraction.shard_bounds()
    shards = [i for i in items if i["stage"] == STAGE_EXTRACT]
    merge = [i for i in items if i["stage"] == STAGE_MERGE]
    per = []
    tokens = total = 0
    rate = 0.0
    for i in shards:
        p = i["progress"] or {}
        w0, w1 = bounds[i["latent"]] if i["latent"] < len(bounds) else (0, 0)
        size = (w1 - w0) * spec.extraction.ctx_len
        p.setdefault("tokens_total", size)
        tokens += size if i["status"] == "done" else int(p.get("tokens", 0))
        total += size
        if i["status"] == "running" and p.get("tokens_per_s"):
            rate += float(p["tokens_per_s"])
        per.append({"shard": i["latent"], "status": i["status"], "tokens": p.get("tokens", 0),
                    "tokens_total": p.get("tokens_total"), "tokens_per_s": p.get("tokens_per_s"),
                    "worker": i["worker"], "attempts": i["attempts"], "error": i["error"]})
    done = sum(i["status"] == "done" for i in shards)
    if not rate:  # nothing running now: the finished shards' tokens over their seconds (one worker's rate)
        fin = [i["progress"] or {} for i in shards if i["status"] == "done"]
        secs = sum(float(p.get("seconds") or 0) for p in fin)
        rate = sum(int(p.get("tokens_total") or 0) for p in fin) / secs if secs else 0.0
    left = max(0, total - tokens) if total else None
    return {"shards": len(shards), "shards_done": done, "merged": bool(merge) and merge[0]["status"] == "done",
            "tokens": tokens, "tokens_per_s": round(rate, 1) if rate else None,
            "eta_s": round(left / rate, 1) if rate and left is not None else None, "per_shard": per}


__all__ = ["run_shard", "run_merge", "run_extraction_units", "extraction_done", "extraction_status"]
