"""The store's operations: every read and write of results and jobs goes through `Store` (SQLAlchemy Core on the
tables in tables.py — bulk writes are one executemany per chunk, not one transaction per row).

Writes that belong together commit together (`Store.tx(write=True)`): a unit's result rows and its job item; a
dictionary and all its latents. Inserts of results are insert-or-ignore on their identity, so a unit that runs twice
changes nothing the second time.
"""

from __future__ import annotations

import hashlib
import random
import time
from contextlib import contextmanager
from datetime import timedelta
from functools import cached_property
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
from sqlalchemy import and_, bindparam, delete, func, or_, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, make_url

from ..errors import ConfigError
from ..names import dictionary_name
from .engine import StoreError, engine_for, resolve_url
from .tables import (JOB_ITEM_SPENT, ApiKey, DictionaryRow, ExplanationEmbedding, ExplanationRow, Job, JobItem,
                     Latent, Score, SubjectModelRow, utcnow)

T_SUBJECT, T_DICT, T_LATENT = SubjectModelRow.__table__, DictionaryRow.__table__, Latent.__table__
T_EXPL, T_SCORE, T_JOB, T_ITEM = ExplanationRow.__table__, Score.__table__, Job.__table__, JobItem.__table__
T_EMB, T_KEY = ExplanationEmbedding.__table__, ApiKey.__table__
CHUNK = 20_000  # rows per executemany

# the headline metric of each scorer (Score.value: sorting and filtering across scorers)
HEADLINE = {"detection": "balanced_accuracy", "fuzzing": "balanced_accuracy", "intruder": "accuracy",
            "simulation": "pearson_r", "embedding": "auc", "surprisal": "auc", "intervention": "accuracy"}


def headline(scorer: str, metrics: dict | None) -> float | None:
    v = (metrics or {}).get(HEADLINE.get(scorer, ""))
    return float(v) if isinstance(v, (int, float)) and np.isfinite(v) else None


# rows of the candidate window a claim looks at: wide enough that concurrent claimers find latents nobody holds
CLAIM_WINDOW = 64

# SELECT the first `n` candidate latents whose per-latent lock this transaction gets: the SRF is scanned in order and
# LIMIT stops the scan, so no more locks are taken than leased latents
_TRY_LOCK = text("SELECT l FROM unnest(CAST(:ls AS integer[])) AS c(l) "
                 "WHERE pg_try_advisory_xact_lock(CAST(:j AS integer), l) LIMIT :n")


def _lock_latents(conn: Connection, job_id: int, candidates: list[int], limit: int) -> list[int]:
    """The latents this claim may lease: on PostgreSQL the first `limit` candidates whose (job, latent) advisory lock
    it gets (held until commit, skipped when another claimer holds it). A latent is claimed whole: row locks taken
    row by row (FOR UPDATE SKIP LOCKED) split a latent's stages between two claimers, and both ran it. On SQLite
    the write transaction is exclusive."""
    if conn.dialect.name != "postgresql":
        return candidates[:limit]
    return [int(x) for x in conn.execute(_TRY_LOCK, {"ls": candidates, "j": job_id, "n": limit}).scalars()]


def _lease(conn: Connection, claimable, latents: list[int], worker: str, lease_s: float,
           now) -> list[tuple[int, list[str]]]:
    """Lease the claimable items of `latents` (locked by `_lock_latents`): [(latent, [stages])] of what this UPDATE
    changed (RETURNING), so two claimers never lease the same item whatever the isolation level."""
    rows = conn.execute(update(T_ITEM).where(claimable, T_ITEM.c.latent.in_(latents))
                        .values(status="running", worker=worker, lease_until=now + timedelta(seconds=lease_s),
                                attempts=T_ITEM.c.attempts + 1, updated=now)
                        .returning(T_ITEM.c.latent, T_ITEM.c.stage)).all()
    return _by_latent(rows)


def _by_latent(rows) -> list[tuple[int, list[str]]]:
    out: dict[int, list[str]] = {}
    for latent, stage in rows:
        out.setdefault(int(latent), []).append(stage)
    return sorted(out.items())


CLAIM_ATTEMPTS = 5  # a claim whose candidates are all held by others looks again this often, then returns []


def _contended(attempt: int) -> None:
    """Every candidate was held by other claimers: back off a little before looking again (not after the last)."""
    if attempt < CLAIM_ATTEMPTS - 1:
        time.sleep(0.005 * (attempt + 1) + random.random() * 0.005)


def _row_of(table, row: dict) -> dict:
    """`row` with its creation time, for a prepared INSERT: a key that is no column fails here, as `.values()` did
    (executed parameters that name no column would be dropped without a word)."""
    extra = row.keys() - table.c.keys()
    if extra:
        raise ValueError(f"{table.name}: no column {sorted(extra)[0]!r}")
    return {**row, "created": utcnow()}


class _Statements:
    """The statements a job's worker runs for every unit, built once per store with bound parameters: building a
    statement (operators, VALUES, its cache key) cost several times more than running it, ~1 ms of a worker's CPU
    per latent."""

    def __init__(self, store: Store):
        c = T_ITEM.c
        self.find_explanation = select(T_EXPL).where(T_EXPL.c.dictionary_pk == bindparam("d"),
                                                     T_EXPL.c.latent == bindparam("l"),
                                                     T_EXPL.c.explain_key == bindparam("k"))
        # claim_latents: items with work left (pending, or running with an expired lease), then their lease
        self.claimable = and_(c.job_id == bindparam("j"), or_(c.status == "pending", and_(
            c.status == "running", c.lease_until < bindparam("now"))))
        self.claim_candidates = select(c.latent).where(self.claimable).order_by(c.latent).limit(bindparam("n"))
        self.claim_lease = (update(T_ITEM).where(self.claimable, c.latent.in_(bindparam("ls", expanding=True)))
                            .values(status="running", worker=bindparam("w"), lease_until=bindparam("until"),
                                    attempts=c.attempts + 1, updated=bindparam("now"))
                            .returning(c.latent, c.stage))
        self.score_keys = select(T_SCORE.c.score_key).where(T_SCORE.c.explanation_id == bindparam("e"))
        self.insert_explanation = store._insert_ignore(T_EXPL, ["dictionary_pk", "latent", "explain_key"])
        self.insert_score = store._insert_ignore(T_SCORE, ["explanation_id", "score_key"])
        self.finish_item = (
            update(T_ITEM).where(c.job_id == bindparam("j"), c.latent == bindparam("l"), c.stage == bindparam("s"))
            .values(status=bindparam("st"), error=bindparam("err"), lease_until=None, updated=bindparam("now"),
                    prompt_tokens=c.prompt_tokens + bindparam("pt", type_=c.prompt_tokens.type),
                    completion_tokens=c.completion_tokens + bindparam("ct", type_=c.completion_tokens.type),
                    calls=c.calls + bindparam("n", type_=c.calls.type),
                    cost_usd=c.cost_usd + bindparam("usd", type_=c.cost_usd.type)))


class Store:
    def __init__(self, url: str | None = None):
        self.url = resolve_url(url)
        self.engine = engine_for(self.url)
        self.dialect = self.engine.dialect.name

    def __repr__(self) -> str:
        return f"Store({make_url(self.url).render_as_string()})"

    @cached_property
    def _stmt(self) -> "_Statements":
        return _Statements(self)

    @contextmanager
    def tx(self, write: bool = False) -> Iterator[Connection]:
        """One transaction; `write=True` takes SQLite's write lock at BEGIN (see engine._sqlite_begin)."""
        with self.engine.connect() as conn:
            conn.info["write"] = write
            try:
                with conn.begin():
                    yield conn
            finally:
                conn.info.pop("write", None)

    def _insert_ignore(self, table, index_elements: Sequence[str]):
        ins = (postgresql.insert if self.dialect == "postgresql" else sqlite.insert)(table)
        return ins.on_conflict_do_nothing(index_elements=list(index_elements))

    def _upsert(self, table, index_elements: Sequence[str], update_cols: Sequence[str]):
        ins = (postgresql.insert if self.dialect == "postgresql" else sqlite.insert)(table)
        return ins.on_conflict_do_update(index_elements=list(index_elements),
                                         set_={c: ins.excluded[c] for c in update_cols})

    # ------------------------------------------------------------------------------------------- dictionaries

    def register_cache(self, cache, name: str | None = None, *, extraction_key: str | None = None,
                       keep_path: bool = True) -> dict:
        """Register an extraction: its subject model, its dictionary (by checkpoint id and hookpoint), every
        latent's statistics and (unless AUTOINTERP_EXAMPLES=folder) its display examples, in one transaction (a
        re-extraction replaces them). `extraction_key`: the job settings that made it (a later job on the same
        settings reuses it); `keep_path=False`: the folder is temporary, record no path. Returns the row."""
        from ..cache import LatentCache
        from .examples import examples_in_store, save_examples

        m = cache.manifest
        d = m["dictionary"]
        key = f"{d['id']}@{m['hookpoint']}"
        s = cache.stats
        n_active = np.asarray(s["n_active"], dtype=np.int64)
        act_sum, act_max = np.asarray(s["act_sum"], np.float64), np.asarray(s["act_max"], np.float64)
        hist = np.asarray(cache.array("hist"))
        n_tokens = max(1, cache.n_tokens)
        heads_file = getattr(cache, "path", None) and cache.path / "head_share.npy"  # attn_z dictionaries
        heads = np.load(heads_file).astype(np.float32) if heads_file and heads_file.is_file() else None
        row = {"key": key, "name": name or dictionary_name(d["id"], m["hookpoint"]),
               "dictionary_id": d["id"], "hookpoint": m["hookpoint"], "format": d.get("format", ""),
               "source": str(d.get("source", "")), "n_latents": int(d["n_latents"]), "d_in": int(d.get("d_in", 0)),
               "n_tokens": int(cache.n_tokens), "ctx_len": int(cache.ctx_len),
               "cache_path": str(cache.path.resolve()) if keep_path else None,
               "n_alive": int((n_active > 0).sum()), "manifest": m, "extraction_key": extraction_key,
               "examples_in_store": False, "signed": bool(d.get("signed", False)), "quality": m.get("quality")}
        in_store = examples_in_store() and isinstance(cache, LatentCache)
        with self.tx(write=True) as conn:
            conn.execute(self._insert_ignore(T_SUBJECT, ["name"]).values(name=m["model"], created=utcnow()))
            subject_pk = conn.execute(select(T_SUBJECT.c.id).where(T_SUBJECT.c.name == m["model"])).scalar_one()
            row["subject_model_id"] = subject_pk
            conn.execute(self._upsert(T_DICT, ["key"], [c for c in row if c not in ("key", "name")])
                         .values(**row, created=utcnow()))
            pk = conn.execute(select(T_DICT.c.id).where(T_DICT.c.key == key)).scalar_one()
            conn.execute(delete(T_LATENT).where(T_LATENT.c.dictionary_pk == pk))
            for lo in range(0, len(n_active), CHUNK):
                hi = min(lo + CHUNK, len(n_active))
                conn.execute(T_LATENT.insert(), [
                    {"dictionary_pk": pk, "index": i, "n_active": int(n_active[i]),
                     "frequency": float(n_active[i] / n_tokens), "max_act": float(act_max[i]),
                     "mean_act": float(act_sum[i] / n_active[i]) if n_active[i] else 0.0,
                     "hist": hist[i].tolist() if n_active[i] else None,
                     "heads": None if heads is None else [round(float(v), 4) for v in heads[i]],
                     "top_head": None if heads is None else int(heads[i].argmax())}
                    for i in range(lo, hi)])
            if in_store:
                manifest = save_examples(conn, pk, cache)
                conn.execute(update(T_DICT).where(T_DICT.c.id == pk).values(manifest=manifest,
                                                                            examples_in_store=True))
            if (m.get("corpus") or {}).get("chat") and isinstance(cache, LatentCache):
                _save_role_shares(conn, pk, cache)
        return self.dictionary(pk)

    def dictionary(self, ref: int | str) -> dict:
        """A dictionary by primary key, name, key ("<id>@<hookpoint>"), checkpoint id or cache folder."""
        with self.tx() as conn:
            q = select(T_DICT)
            if isinstance(ref, int) or (isinstance(ref, str) and ref.isdigit()):
                rows = conn.execute(q.where(T_DICT.c.id == int(ref))).mappings().all()
            else:
                from pathlib import Path

                path = str(Path(ref).expanduser().resolve()) if Path(ref).expanduser().exists() else None
                named = [T_DICT.c.name == ref, T_DICT.c.key == ref, T_DICT.c.dictionary_id == ref]
                if path is not None:  # (`cache_path == None` would be IS NULL: every extraction made by a job)
                    named.append(T_DICT.c.cache_path == path)
                rows = conn.execute(q.where(or_(*named))).mappings().all()
        if len(rows) == 1:
            return dict(rows[0])
        if len(rows) > 1:
            raise ConfigError(f"dictionary {ref!r} is ambiguous: it names {len(rows)} dictionaries "
                              f"({', '.join(r['name'] for r in rows[:5])}); use one of those names")
        known = [d["name"] for d in self.dictionaries()[:10]]
        raise ConfigError(f"unknown dictionary {ref!r} (known: {', '.join(known) or 'none; run autointerp extract'})")

    def dictionaries(self) -> list[dict]:
        with self.tx() as conn:
            rows = conn.execute(select(T_DICT, T_SUBJECT.c.name.label("subject_model"))
                                .join(T_SUBJECT, T_SUBJECT.c.id == T_DICT.c.subject_model_id)
                                .order_by(T_DICT.c.id)).mappings().all()
        return [dict(r) for r in rows]

    def latent(self, dictionary_pk: int, index: int) -> dict:
        with self.tx() as conn:
            row = conn.execute(select(T_LATENT).where(T_LATENT.c.dictionary_pk == dictionary_pk,
                                                      T_LATENT.c.index == index)).mappings().first()
        if row is None:
            raise ConfigError(f"latent {index}: not in dictionary {dictionary_pk} "
                              f"(has it been extracted? the dictionary's latents are 0..n_latents-1)")
        return dict(row)

    # ------------------------------------------------------------------------------------------- results

    def find_explanation(self, dictionary_pk: int, latent: int, explain_key: str, conn=None) -> dict | None:
        args = {"d": dictionary_pk, "l": latent, "k": explain_key}
        if conn is not None:
            row = conn.execute(self._stmt.find_explanation, args).mappings().first()
        else:
            with self.tx() as c:
                row = c.execute(self._stmt.find_explanation, args).mappings().first()
        return None if row is None else dict(row)

    def score_keys_done(self, explanation_id: int) -> set[str]:
        with self.tx() as conn:
            return set(conn.execute(self._stmt.score_keys, {"e": explanation_id}).scalars())

    def insert_explanation(self, conn: Connection, row: dict) -> int:
        """Insert-or-ignore on (dictionary, latent, explain_key); the id of the row that is there afterwards."""
        return self.store_explanation(conn, row)[0]["id"]

    def store_explanation(self, conn: Connection, row: dict) -> tuple[dict, bool]:
        """insert_explanation, returning the row that is there afterwards and whether this call inserted it (a row
        just inserted has no scores yet: the caller need not look for them)."""
        r = conn.execute(self._stmt.insert_explanation, _row_of(T_EXPL, row))
        found = self.find_explanation(row["dictionary_pk"], row["latent"], row["explain_key"], conn)
        return found, r.rowcount == 1

    def insert_score(self, conn: Connection, row: dict) -> None:
        conn.execute(self._stmt.insert_score, _row_of(T_SCORE, row))

    def explanations(self, dictionary_pk: int | None = None, *, latents: Iterable[int] | None = None,
                     explainer: str | None = None, exclude_explainer: str | None = None,
                     with_text: bool = False) -> list[dict]:
        q = select(T_EXPL)
        if dictionary_pk is not None:
            q = q.where(T_EXPL.c.dictionary_pk == dictionary_pk)
        if latents is not None:
            q = q.where(T_EXPL.c.latent.in_(list(latents)))
        if explainer is not None:
            q = q.where(T_EXPL.c.explainer == explainer)
        if exclude_explainer is not None:
            q = q.where(T_EXPL.c.explainer != exclude_explainer)
        if with_text:
            q = q.where(T_EXPL.c.text.is_not(None))
        with self.tx() as conn:
            return [dict(r) for r in conn.execute(q.order_by(T_EXPL.c.id)).mappings()]

    def scores(self, explanation_ids: Iterable[int]) -> list[dict]:
        ids = list(explanation_ids)
        out: list[dict] = []
        with self.tx() as conn:
            for lo in range(0, len(ids), 1000):
                out += [dict(r) for r in conn.execute(select(T_SCORE).where(T_SCORE.c.explanation_id.in_(
                    ids[lo:lo + 1000])).order_by(T_SCORE.c.id)).mappings()]
        return out

    # ------------------------------------------------------------------------------------------- jobs

    def find_job(self, key: str) -> dict | None:
        with self.tx() as conn:
            row = conn.execute(select(T_JOB).where(T_JOB.c.key == key, T_JOB.c.status != "cancelled")
                               .order_by(T_JOB.c.id.desc())).mappings().first()
        return None if row is None else dict(row)

    def create_job(self, key: str, spec: dict, dictionary_pk: int, budget_usd: float | None,
                   items: Iterable[tuple[int, str]]) -> int:
        """The job row and its items, in one transaction (nothing queued when any of it fails)."""
        with self.tx(write=True) as conn:
            job_id = conn.execute(T_JOB.insert().values(key=key, spec=spec, dictionary_pk=dictionary_pk,
                                                        budget_usd=budget_usd, status="pending", created=utcnow(),
                                                        updated=utcnow())).inserted_primary_key[0]
            n = 0
            batch: list[dict] = []
            now = utcnow()
            for latent, stage in items:
                batch.append({"job_id": job_id, "latent": latent, "stage": stage, "status": "pending",
                              "updated": now})
                if len(batch) >= CHUNK:
                    conn.execute(T_ITEM.insert(), batch)
                    n += len(batch)
                    batch = []
            if batch:
                conn.execute(T_ITEM.insert(), batch)
                n += len(batch)
            conn.execute(update(T_JOB).where(T_JOB.c.id == job_id).values(n_items=n))
        return int(job_id)

    def job(self, job_id: int) -> dict:
        with self.tx() as conn:
            row = conn.execute(select(T_JOB).where(T_JOB.c.id == job_id)).mappings().first()
        if row is None:
            raise ConfigError(f"unknown job {job_id}")
        return dict(row)

    def jobs(self, limit: int = 50) -> list[dict]:
        with self.tx() as conn:
            return [dict(r) for r in conn.execute(select(T_JOB).order_by(T_JOB.c.id.desc()).limit(limit)).mappings()]

    def set_job(self, job_id: int, **values: Any) -> None:
        with self.tx(write=True) as conn:
            conn.execute(update(T_JOB).where(T_JOB.c.id == job_id).values(**values, updated=utcnow()))

    def claim_latents(self, job_id: int, worker: str, limit: int, lease_s: float,
                      latents: Sequence[int] | None = None) -> list[tuple[int, list[str]]]:
        """Lease up to `limit` latents with work left (pending items, or running ones whose lease expired):
        [(latent, [stages])], in latent order. What is returned is what this call's UPDATE changed (RETURNING), so
        two workers never lease the same item, whatever the isolation level; a latent is leased whole, and on
        PostgreSQL latents another claimer is leasing are skipped instead of waited for."""
        st = self._stmt
        for attempt in range(CLAIM_ATTEMPTS):
            now = utcnow()
            args = {"j": job_id, "now": now, "n": max(CLAIM_WINDOW, limit * 16)}
            with self.tx(write=True) as conn:
                if latents is None:  # a worker's claim: the statements built once (_Statements)
                    q = st.claim_candidates
                else:
                    q = (select(T_ITEM.c.latent).where(st.claimable, T_ITEM.c.latent.in_(list(latents)))
                         .order_by(T_ITEM.c.latent).limit(bindparam("n")))
                candidates = list(dict.fromkeys(conn.execute(q, args).scalars()))
                if not candidates:
                    return []
                chosen = _lock_latents(conn, job_id, candidates, limit)
                leased = _by_latent(conn.execute(st.claim_lease, {
                    **args, "ls": chosen, "w": worker, "until": now + timedelta(seconds=lease_s)}).all()) \
                    if chosen else []
            if leased:
                return leased
            _contended(attempt)
        return []  # only contended candidates, five times over: the caller comes back later

    def renew_leases(self, job_id: int, worker: str, latents: Sequence[int], lease_s: float) -> None:
        if not latents:
            return
        with self.tx(write=True) as conn:
            conn.execute(update(T_ITEM).where(T_ITEM.c.job_id == job_id, T_ITEM.c.worker == worker,
                                              T_ITEM.c.status == "running", T_ITEM.c.latent.in_(list(latents)))
                         .values(lease_until=utcnow() + timedelta(seconds=lease_s)))

    def finish_item(self, conn: Connection, job_id: int, latent: int, stage: str, status: str,
                    usage=None, error: str | None = None) -> None:
        """Mark an item done/failed/skipped/pending and add this attempt's spend (inside the unit's transaction)."""
        u = usage.as_dict() if usage is not None else {}
        conn.execute(self._stmt.finish_item, {
            "j": job_id, "l": latent, "s": stage, "st": status, "err": error, "now": utcnow(),
            "pt": int(u.get("prompt_tokens", 0)), "ct": int(u.get("completion_tokens", 0)),
            "n": int(u.get("calls", 0)), "usd": float(u.get("cost_usd", 0.0))})

    def running_workers(self, job_id: int) -> list[str]:
        with self.tx() as conn:
            return [w for w in conn.execute(select(T_ITEM.c.worker).where(T_ITEM.c.job_id == job_id,
                                                                        T_ITEM.c.status == "running")
                                            .distinct()).scalars() if w]

    def release_worker(self, job_id: int, worker: str) -> int:
        """All items a (dead) worker holds go back to pending; returns how many."""
        with self.tx(write=True) as conn:
            r = conn.execute(update(T_ITEM).where(T_ITEM.c.job_id == job_id, T_ITEM.c.worker == worker,
                                                  T_ITEM.c.status == "running")
                             .values(status="pending", lease_until=None, updated=utcnow()))
        return r.rowcount

    def release_items(self, job_id: int, latents: Sequence[int], worker: str) -> None:
        """Give leased, unfinished items back (a runner stopping early: cancel, budget, Ctrl-C)."""
        if not latents:
            return
        with self.tx(write=True) as conn:
            conn.execute(update(T_ITEM).where(T_ITEM.c.job_id == job_id, T_ITEM.c.worker == worker,
                                              T_ITEM.c.status == "running", T_ITEM.c.latent.in_(list(latents)))
                         .values(status="pending", lease_until=None, updated=utcnow()))

    def fail_unfinished(self, job_id: int, latent: int, stages: Sequence[str], error: str) -> None:
        with self.tx(write=True) as conn:
            conn.execute(update(T_ITEM).where(T_ITEM.c.job_id == job_id, T_ITEM.c.latent == latent,
                                              T_ITEM.c.stage.in_(list(stages)),
                                              T_ITEM.c.status.in_(("pending", "running")))
                         .values(status="failed", error=error, lease_until=None, updated=utcnow()))

    def reset_items(self, job_id: int, from_status: str) -> int:
        with self.tx(write=True) as conn:
            r = conn.execute(update(T_ITEM).where(T_ITEM.c.job_id == job_id, T_ITEM.c.status == from_status)
                             .values(status="pending", error=None, updated=utcnow()))
        return r.rowcount

    def item_counts(self, job_id: int) -> dict[str, dict[str, int]]:
        """{stage: {status: count}}. On SQLite a skip scan of ix_job_item_stage (job_id, stage, status): each
        (stage, status) present found by one index seek past the previous one, its items counted in one index-only
        range; a GROUP BY compared every item's (stage, status) through a temporary B-tree (1.6 s at 3M items, this
        0.15 s). All in one read transaction, one snapshot, so the counts add up as one GROUP BY's would. PostgreSQL
        keeps the GROUP BY: a hash aggregate over a parallel scan, or an index-only scan of ix_job_item_stage once
        vacuum has marked the pages all-visible (before that, a count per (stage, status) is a scan each)."""
        c = T_ITEM.c
        out: dict[str, dict[str, int]] = {}
        with self.tx() as conn:
            if self.dialect == "postgresql":
                for stage, status, n in conn.execute(select(c.stage, c.status, func.count())
                                                     .where(c.job_id == job_id).group_by(c.stage, c.status)):
                    out.setdefault(stage, {})[status] = int(n)
                return out
            stage_p, status_p = bindparam("stage", type_=c.stage.type), bindparam("status", type_=c.status.type)
            next_stage = select(c.stage, c.status).where(c.job_id == job_id, c.stage > stage_p)\
                .order_by(c.stage, c.status).limit(1)
            next_status = select(c.status).where(c.job_id == job_id, c.stage == stage_p, c.status > status_p)\
                .order_by(c.status).limit(1)
            count = select(func.count()).select_from(T_ITEM).where(c.job_id == job_id, c.stage == stage_p,
                                                                  c.status == status_p)
            row = conn.execute(select(c.stage, c.status).where(c.job_id == job_id).order_by(c.stage, c.status)
                               .limit(1)).first()
            while row is not None:
                stage, status = row
                while status is not None:
                    out.setdefault(stage, {})[status] = int(
                        conn.execute(count, {"stage": stage, "status": status}).scalar_one())
                    status = conn.execute(next_status, {"stage": stage, "status": status}).scalar()
                row = conn.execute(next_stage, {"stage": stage}).first()
        return out

    def latent_progress(self, job_id: int, latents: Sequence[int] | None = None,
                        statuses: Sequence[str] = ("pending", "running")) -> tuple[int, int]:
        """(latents in the job, latents with an item in one of `statuses`), optionally among `latents` (the
        extraction's shard and merge items are not latents)."""
        cond = [T_ITEM.c.job_id == job_id, T_ITEM.c.stage.notin_(("extract", "merge"))]
        if latents is not None:
            cond.append(T_ITEM.c.latent.in_(list(latents)))
        with self.tx() as conn:
            total = conn.execute(select(func.count(func.distinct(T_ITEM.c.latent))).where(*cond)).scalar_one()
            some = conn.execute(select(func.count(func.distinct(T_ITEM.c.latent)))
                                .where(*cond, T_ITEM.c.status.in_(list(statuses)))).scalar_one()
        return int(total), int(some)

    def job_spend(self, job_id: int) -> dict:
        """The job's spend summed over its items: only those with spend (JOB_ITEM_SPENT, written out as the partial
        index ix_job_item_spend's predicate so the sums are an index-only scan of those items; the others are all
        zeros). Over all 3M items of a fresh job this was 0.6 s on SQLite; a job whose every item has spend still
        reads them all, from the index."""
        with self.tx() as conn:
            r = conn.execute(select(func.coalesce(func.sum(T_ITEM.c.prompt_tokens), 0),
                                    func.coalesce(func.sum(T_ITEM.c.completion_tokens), 0),
                                    func.coalesce(func.sum(T_ITEM.c.calls), 0),
                                    func.coalesce(func.sum(T_ITEM.c.cost_usd), 0.0))
                             .where(T_ITEM.c.job_id == job_id, text(f"({JOB_ITEM_SPENT})"))).one()
        return {"prompt_tokens": int(r[0]), "completion_tokens": int(r[1]), "calls": int(r[2]),
                "cost_usd": float(r[3])}

    def item_errors(self, job_id: int, limit: int = 20) -> list[dict]:
        with self.tx() as conn:
            return [dict(r) for r in conn.execute(
                select(T_ITEM.c.latent, T_ITEM.c.stage, T_ITEM.c.error, T_ITEM.c.attempts)
                .where(T_ITEM.c.job_id == job_id, T_ITEM.c.status == "failed")
                .order_by(T_ITEM.c.latent).limit(limit)).mappings()]

    # ------------------------------------------------------------------------------------------- api keys

    def create_api_key(self, name: str, key: str) -> None:
        with self.tx(write=True) as conn:
            conn.execute(T_KEY.insert().values(name=name, key_hash=hashlib.sha256(key.encode()).hexdigest(),
                                               created=utcnow(), revoked=False))

    def api_key_valid(self, key: str) -> bool:
        h = hashlib.sha256(key.encode()).hexdigest()
        with self.tx() as conn:
            return conn.execute(select(T_KEY.c.id).where(T_KEY.c.key_hash == h, T_KEY.c.revoked.is_(False)))\
                .first() is not None


    # ------------------------------------------------------------------------------------------- queue (workers)
    # The Celery dispatcher's and workers' view of jobs (autointerp/jobs/dispatch.py): which jobs want work, the
    # sweeper's re-queue of expired leases, and job completion — each one indexed query, cheap at millions of items.

    def active_jobs(self, statuses: Sequence[str] = ("pending", "running")) -> list[dict]:
        with self.tx() as conn:
            return [dict(r) for r in conn.execute(
                select(T_JOB.c.id, T_JOB.c.spec, T_JOB.c.status, T_JOB.c.budget_usd, T_JOB.c.started,
                       T_JOB.c.dictionary_pk)
                .where(T_JOB.c.status.in_(list(statuses))).order_by(T_JOB.c.id)).mappings()]

    def requeue_expired(self, job_id: int) -> int:
        """Items whose lease ran out (their worker was killed, or hangs) go back to pending; returns how many.
        A late finish by the old holder changes nothing (results are insert-or-ignore on their identity)."""
        now = utcnow()
        with self.tx(write=True) as conn:
            r = conn.execute(update(T_ITEM).where(T_ITEM.c.job_id == job_id, T_ITEM.c.status == "running",
                                                  T_ITEM.c.lease_until < now)
                             .values(status="pending", lease_until=None, updated=now))
        return r.rowcount

    def has_expired_leases(self, job_id: int) -> bool:
        with self.tx() as conn:
            return conn.execute(select(T_ITEM.c.latent).where(T_ITEM.c.job_id == job_id, T_ITEM.c.status == "running",
                                                              T_ITEM.c.lease_until < utcnow()).limit(1))\
                .first() is not None

    def has_items(self, job_id: int, statuses: Sequence[str]) -> bool:
        with self.tx() as conn:
            return conn.execute(select(T_ITEM.c.latent).where(T_ITEM.c.job_id == job_id,
                                                              T_ITEM.c.status.in_(list(statuses))).limit(1))\
                .first() is not None

    def set_job_status_from(self, job_id: int, from_statuses: Sequence[str], status: str, **values: Any) -> bool:
        """Change a job's status only from one of `from_statuses` (a worker never overwrites a cancel); `started`
        is kept when already set. True when it changed."""
        now = utcnow()
        if values.pop("start", False):
            values["started"] = func.coalesce(T_JOB.c.started, now)
        with self.tx(write=True) as conn:
            r = conn.execute(update(T_JOB).where(T_JOB.c.id == job_id, T_JOB.c.status.in_(list(from_statuses)))
                             .values(status=status, **values, updated=now))
        return r.rowcount > 0

    def finish_job_if_complete(self, job_id: int) -> str | None:
        """`done` (or `failed` when an item failed) once no item is pending or running, for a job still pending
        or running; returns the new status, None when the job has work left or was not active."""
        now = utcnow()
        with self.tx(write=True) as conn:
            def exists(*statuses):
                return conn.execute(select(T_ITEM.c.latent).where(T_ITEM.c.job_id == job_id,
                                                                  T_ITEM.c.status.in_(statuses)).limit(1))\
                    .first() is not None
            if exists("pending", "running"):
                return None
            status = "failed" if exists("failed") else "done"
            r = conn.execute(update(T_JOB).where(T_JOB.c.id == job_id, T_JOB.c.status.in_(("pending", "running")))
                             .values(status=status, finished=now, updated=now))
        return status if r.rowcount else None


    def create_job_bulk(self, key: str, spec: dict, dictionary_pk: int, budget_usd: float | None,
                        latents: Sequence[int], stages: Sequence[str]) -> int:
        """`create_job` for big jobs: the same rows in one transaction, written by the driver itself (sqlite3
        executemany of tuples; PostgreSQL COPY) instead of SQLAlchemy's per-row parameter processing, which was 85 %
        of a million-latent submit."""
        now = utcnow()
        proc = T_ITEM.c.updated.type._cached_bind_processor(self.engine.dialect)
        stamp = proc(now) if proc else now
        cols = "job_id, latent, stage, status, attempts, prompt_tokens, completion_tokens, calls, cost_usd, updated"
        with self.tx(write=True) as conn:
            job_id = int(conn.execute(T_JOB.insert().values(key=key, spec=spec, dictionary_pk=dictionary_pk,
                                                            budget_usd=budget_usd, status="pending", created=now,
                                                            updated=now)).inserted_primary_key[0])
            if self.dialect == "postgresql":
                with conn.connection.driver_connection.cursor() as cur, \
                        cur.copy(f"COPY job_item ({cols}) FROM STDIN") as cp:
                    for latent in latents:
                        for stage in stages:
                            cp.write_row((job_id, int(latent), stage, "pending", 0, 0, 0, 0, 0.0, stamp))
            else:
                sql = f"INSERT INTO job_item ({cols}) VALUES (?, ?, ?, 'pending', 0, 0, 0, 0, 0.0, ?)"
                step = max(1, CHUNK // max(1, len(stages)))
                for lo in range(0, len(latents), step):
                    conn.exec_driver_sql(sql, [(job_id, int(latent), stage, stamp)
                                               for latent in latents[lo:lo + step] for stage in stages])
            conn.execute(update(T_JOB).where(T_JOB.c.id == job_id).values(n_items=len(latents) * len(stages)))
        if self.dialect == "postgresql" and len(latents) * len(stages) >= 50_000:
            # fresh statistics now, not when autovacuum gets round to it: until then the planner scans and sorts
            # every item of the job for each claim (1.5-2.8 s per claim at 3M items, 10 ms after)
            with self.engine.connect() as conn:
                conn.exec_driver_sql("ANALYZE job_item")
                conn.commit()
        return job_id


    def _stage_claimable(self, job_id: int, stages: Sequence[str], after_explain: bool, now):
        """Items of `stages` that may be leased now; with `after_explain`, only for latents whose explanation is
        finished (another queue's workers make it)."""
        cond = [T_ITEM.c.job_id == job_id, T_ITEM.c.stage.in_(list(stages)),
                or_(T_ITEM.c.status == "pending", and_(T_ITEM.c.status == "running", T_ITEM.c.lease_until < now))]
        if after_explain:
            e = T_ITEM.alias("expl")
            cond.append(select(e.c.latent).where(e.c.job_id == job_id, e.c.latent == T_ITEM.c.latent,
                                                 e.c.stage == "explain", e.c.status.in_(("done", "skipped")))
                        .correlate(T_ITEM).exists())
        return and_(*cond)

    def claim_stages(self, job_id: int, worker: str, limit: int, lease_s: float, stages: Sequence[str],
                     after_explain: bool) -> list[tuple[int, list[str]]]:
        """`claim_latents` restricted to some stages (one queue's share of a job: e.g. the gpu queue's intervention
        items, claimable once the llm queue has explained the latent). Same guarantees: what is returned is what
        this call's UPDATE changed; latents leased whole (of these stages), held ones skipped."""
        for attempt in range(CLAIM_ATTEMPTS):
            now = utcnow()
            claimable = self._stage_claimable(job_id, stages, after_explain, now)
            with self.tx(write=True) as conn:
                # pending items first, then expired leases: bounded range scans of ix_job_item_status in latent
                # order (one query with the OR made PostgreSQL sort all of a 3M-item job)
                candidates: list[int] = []
                for status in ("pending", "running"):
                    window = max(256 if after_explain else CLAIM_WINDOW, limit * 16)
                    q = self._stage_candidates(job_id, stages, after_explain, status, now, window)
                    candidates = list(dict.fromkeys(candidates + list(conn.execute(q).scalars())))
                    if len(candidates) >= limit * 4:
                        break
                if not candidates:
                    return []
                chosen = _lock_latents(conn, job_id, candidates, limit)
                leased = _lease(conn, claimable, chosen, worker, lease_s, now) if chosen else []
            if leased:
                return leased
            _contended(attempt)
        return []

    def _stage_candidates(self, job_id: int, stages: Sequence[str], after_explain: bool, status: str, now,
                          window: int):
        """Latents to try to claim: the first `window` items of `stages` with `status` (expired, for running) in
        latent order — and with `after_explain`, those of them already explained. Explanations finish roughly in
        latent order, so the window holds the claimable ones; a bounded window keeps this one index range scan at
        any job size (checking every pending item against its explanation took 0.7 s at 900k items)."""
        cond = [T_ITEM.c.job_id == job_id, T_ITEM.c.status == status, T_ITEM.c.stage.in_(list(stages))]
        if status == "running":
            cond.append(T_ITEM.c.lease_until < now)
        inner = select(T_ITEM.c.latent).where(*cond).order_by(T_ITEM.c.latent).limit(window)
        if not after_explain:
            return inner
        sub = inner.subquery()
        e = T_ITEM.alias("expl")
        done = select(e.c.latent).where(e.c.job_id == job_id, e.c.latent == sub.c.latent, e.c.stage == "explain",
                                        e.c.status.in_(("done", "skipped"))).exists()
        return select(sub.c.latent).where(done).order_by(sub.c.latent)

    def has_claimable(self, job_id: int, stages: Sequence[str], after_explain: bool) -> bool:
        """Whether `claim_stages` would find pending work (leases that expired are the sweeper's)."""
        q = self._stage_candidates(job_id, stages, after_explain, "pending", utcnow(), 256)
        with self.tx() as conn:
            return conn.execute(q.limit(1)).first() is not None

    def fail_orphans(self, job_id: int) -> int:
        """Pending items of latents whose explanation failed can never run (their queue waits for it): they fail
        with that reason; `retry` puts both back."""
        e = T_ITEM.alias("expl")
        failed_expl = select(e.c.latent).where(e.c.job_id == job_id, e.c.stage == "explain", e.c.status == "failed")
        cond = and_(T_ITEM.c.job_id == job_id, T_ITEM.c.status == "pending", T_ITEM.c.stage != "explain",
                    T_ITEM.c.latent.in_(failed_expl))
        with self.tx() as conn:
            if conn.execute(select(T_ITEM.c.latent).where(cond).limit(1)).first() is None:
                return 0
        with self.tx(write=True) as conn:
            return conn.execute(update(T_ITEM).where(cond).values(status="failed", updated=utcnow(),
                                                                  error="not run: the explanation failed")).rowcount


    # ------------------------------------------------------------------------------------- job-level units

    def claim_unit(self, job_id: int, worker: str, stage: str, lease_s: float,
                   after: str | None = None) -> int | None:
        """Lease one pending (or expired) item of a job-level stage (an extraction shard, the merge); with `after`,
        only once every item of that stage is done. Returns the item's `latent` (the shard index) or None."""
        for attempt in range(CLAIM_ATTEMPTS):
            now = utcnow()
            claimable = and_(T_ITEM.c.job_id == job_id, T_ITEM.c.stage == stage,
                             or_(T_ITEM.c.status == "pending",
                                 and_(T_ITEM.c.status == "running", T_ITEM.c.lease_until < now)))
            with self.tx(write=True) as conn:
                if after is not None and conn.execute(select(T_ITEM.c.latent).where(
                        T_ITEM.c.job_id == job_id, T_ITEM.c.stage == after, T_ITEM.c.status != "done")
                        .limit(1)).first() is not None:
                    return None
                unit = conn.execute(select(T_ITEM.c.latent).where(claimable).order_by(T_ITEM.c.latent)
                                    .limit(1)).scalar()
                if unit is None:
                    return None
                r = conn.execute(update(T_ITEM).where(claimable, T_ITEM.c.latent == unit).values(
                    status="running", worker=worker, lease_until=now + timedelta(seconds=lease_s),
                    attempts=T_ITEM.c.attempts + 1, updated=now))
            if r.rowcount == 1:
                return int(unit)
            _contended(attempt)
        return None

    def set_progress(self, job_id: int, unit: int, stage: str, progress: dict, worker: str | None = None,
                     lease_s: float | None = None) -> None:
        """A running unit's progress (and, with `lease_s`, its lease renewed: the progress is its heartbeat)."""
        values: dict[str, Any] = {"progress": progress, "updated": utcnow()}
        if lease_s is not None:
            values["lease_until"] = utcnow() + timedelta(seconds=lease_s)
        cond = [T_ITEM.c.job_id == job_id, T_ITEM.c.latent == unit, T_ITEM.c.stage == stage,
                T_ITEM.c.status == "running"]
        if worker is not None:
            cond.append(T_ITEM.c.worker == worker)
        with self.tx(write=True) as conn:
            conn.execute(update(T_ITEM).where(*cond).values(**values))

    def has_pending_units(self, job_id: int) -> bool:
        """Whether the job's extraction has a unit to hand out (a pending shard, or the merge once shards are
        done; expired leases are the sweeper's)."""
        with self.tx() as conn:
            q = select(T_ITEM.c.stage).where(T_ITEM.c.job_id == job_id, T_ITEM.c.stage.in_(("extract", "merge")),
                                            T_ITEM.c.status == "pending")
            stages = set(conn.execute(q).scalars())
            if "extract" in stages:
                return True
            return "merge" in stages and conn.execute(select(T_ITEM.c.latent).where(
                T_ITEM.c.job_id == job_id, T_ITEM.c.stage == "extract", T_ITEM.c.status != "done")
                .limit(1)).first() is None

    def failed_unit(self, job_id: int) -> str | None:
        """The reason of the job's first failed extraction unit, if any."""
        with self.tx() as conn:
            row = conn.execute(select(T_ITEM.c.stage, T_ITEM.c.latent, T_ITEM.c.error).where(
                T_ITEM.c.job_id == job_id, T_ITEM.c.stage.in_(("extract", "merge")), T_ITEM.c.status == "failed")
                .limit(1)).first()
        return None if row is None else f"{row[0]} unit {row[1]} failed: {row[2]}"

    def unit_items(self, job_id: int, stages: Sequence[str]) -> list[dict]:
        with self.tx() as conn:
            return [dict(r) for r in conn.execute(select(T_ITEM).where(T_ITEM.c.job_id == job_id,
                                                                       T_ITEM.c.stage.in_(list(stages)))
                                                  .order_by(T_ITEM.c.stage, T_ITEM.c.latent)).mappings()]

    def dictionary_by_extraction(self, extraction_key: str) -> dict | None:
        """The dictionary an extraction with these settings registered (with its examples in the store)."""
        with self.tx() as conn:
            row = conn.execute(select(T_DICT).where(T_DICT.c.extraction_key == extraction_key,
                                                    T_DICT.c.examples_in_store.is_(True))
                               .order_by(T_DICT.c.id.desc()).limit(1)).mappings().first()
        return dict(row) if row is not None else None

    def add_latent_items(self, conn: Connection, job_id: int, latents: Sequence[int], stages: Sequence[str]) -> None:
        """The latent units of a job whose dictionary was just extracted (inside the merge's transaction; a second
        merge of the same job inserts nothing)."""
        now = utcnow()
        rows = [{"job_id": job_id, "latent": int(l), "stage": st, "status": "pending", "attempts": 0,
                 "prompt_tokens": 0, "completion_tokens": 0, "calls": 0, "cost_usd": 0.0, "updated": now}
                for l in latents for st in stages]
        for lo in range(0, len(rows), CHUNK):
            conn.execute(self._insert_ignore(T_ITEM, ["job_id", "latent", "stage"]), rows[lo:lo + CHUNK])
        conn.execute(update(T_JOB).where(T_JOB.c.id == job_id).values(n_items=T_JOB.c.n_items + len(rows),
                                                                      updated=now))


def _save_role_shares(conn: Connection, dictionary_pk: int, cache) -> None:
    """A chat extraction's latents: the `assistant_share` statistic (share of their firing tokens in assistant
    turns; details: every role's share), so the latent list can sort and filter by "fires on assistant turns"."""
    from ..chat import ROLES, role_shares
    from ..names import digest
    from .analyses import _put_stats

    shares = role_shares(cache)
    if shares is None:
        return
    fired = np.nonzero(shares.sum(axis=1) > 0)[0]
    a = ROLES.index("assistant")
    _put_stats(conn, dictionary_pk, {"stat": "assistant_share", "key": digest({"roles": cache.manifest["corpus"]}),
                                     "values": {int(j): (float(shares[j, a]),
                                                         {r: round(float(shares[j, k]), 4)
                                                          for k, r in enumerate(ROLES)}) for j in fired}}, None)


def open_store(url: str | None = None) -> Store:
    """The store at `url` ($AUTOINTERP_DATABASE_URL, else the SQLite file under the cache folder)."""
    return Store(url)


__all__ = ["Store", "StoreError", "open_store", "headline", "HEADLINE"]
