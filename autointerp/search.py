"""Search explanations across dictionaries: semantic (cosine over sentence embeddings of the explanations) and
keyword (FTS5 on SQLite, full-text on PostgreSQL), with the store's filters. The library functions the CLI and the
API call.

Embeddings are made once per explanation and embedder (`embed_explanations`, batched, off nothing: it is a CPU job
of its own) and kept in the store (`explanation_embedding`, the source of truth). Semantic search runs over an
embedded approximate index file beside the SQLite store (autointerp.vector_index), rebuilt from the table when
it is missing, stale or corrupt; small collections are searched exactly.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
from sqlalchemy import Float, Integer, and_, cast, column, exists, func, literal, select, table, text
from sqlalchemy.types import UserDefinedType

from .errors import ConfigError
from .units import unit_pole
from .store import Store
from .store.store import T_DICT, T_EMB, T_EXPL, T_LATENT, T_SCORE, T_SUBJECT

log = logging.getLogger(__name__)
MAX_QUERY_CHARS = 500


@dataclass
class SearchFilters:
    dictionary: str | None = None  # name, key or cache folder
    subject_model: str | None = None
    hookpoint: str | None = None
    explainer: str | None = None
    scorer: str | None = None  # with min_score: the explanation's score by this scorer
    min_score: float | None = None
    min_frequency: float | None = None
    max_frequency: float | None = None
    head: int | None = None  # attn_z dictionaries: the attention head holding the latent's largest decoder share
    # LangFIR's filter: only latents whose measured firing rate on random-token sequences is at most this (latents
    # never measured are left out)
    max_random_rate: float | None = None


@dataclass
class SearchHit:
    explanation_id: int
    dictionary: str
    dictionary_pk: int
    hookpoint: str
    latent: int
    text: str
    explainer: str
    model: str
    similarity: float | None = None  # cosine (semantic) or None (keyword: rank order)
    frequency: float | None = None
    scores: dict[str, float | None] = field(default_factory=dict)
    pole: str | None = None  # a signed dictionary's unit: "+" or "-" pole of latent `base_latent`
    base_latent: int | None = None
    top_head: int | None = None  # attn_z dictionaries

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _embedder(name: str | None) -> str:
    from .embedder import embedder_name

    return embedder_name(name)


def embed_explanations(store: Store, embedder: str | None = None, dictionary: str | None = None,
                       batch_size: int = 512, progress: bool = False) -> int:
    """Embed every explanation (with text) that has no embedding from `embedder` yet; returns how many."""
    from .embedder import embed

    name = _embedder(embedder)
    done = select(T_EMB.c.explanation_id).where(T_EMB.c.embedder == name)
    q = select(T_EXPL.c.id, T_EXPL.c.text).where(T_EXPL.c.text.is_not(None), T_EXPL.c.id.not_in(done))
    if dictionary is not None:
        q = q.where(T_EXPL.c.dictionary_pk == store.dictionary(dictionary)["id"])
    with store.tx() as conn:
        todo = conn.execute(q.order_by(T_EXPL.c.id)).all()
    from tqdm import tqdm

    bar = tqdm(total=len(todo), unit="expl", desc="embed explanations", disable=not progress or not todo)
    for lo in range(0, len(todo), batch_size):
        part = todo[lo:lo + batch_size]
        vecs = embed([t for _, t in part], embedder)
        with store.tx(write=True) as conn:
            conn.execute(store._insert_ignore(T_EMB, ["explanation_id", "embedder"]), [
                {"explanation_id": i, "embedder": name, "dim": int(v.shape[0]),
                 "vector": np.asarray(v, np.float32).tobytes()} for (i, _), v in zip(part, vecs)])
            if _pgvector(store) and vecs.shape[1] == PG_DIM:
                conn.execute(text("INSERT INTO explanation_vec (explanation_id, embedder, vec) "
                                  "VALUES (:i, :e, CAST(:v AS vector)) ON CONFLICT DO NOTHING"),
                             [{"i": i, "e": name, "v": _pg_literal(v)} for (i, _), v in zip(part, vecs)])
        bar.update(len(part))
    bar.close()
    return len(todo)


def _allowed(store: Store, f: SearchFilters):
    """The filters as SQL conditions on the explanation (joined with its dictionary, subject and latent)."""
    cond = [T_EXPL.c.text.is_not(None)]
    if f.dictionary:
        cond.append(T_EXPL.c.dictionary_pk == store.dictionary(f.dictionary)["id"])
    if f.hookpoint:
        cond.append(T_DICT.c.hookpoint == f.hookpoint)
    if f.subject_model:
        cond.append(T_SUBJECT.c.name == f.subject_model)
    if f.explainer:
        cond.append(T_EXPL.c.explainer == f.explainer)
    if f.min_frequency is not None:
        cond.append(T_LATENT.c.frequency >= f.min_frequency)
    if f.max_frequency is not None:
        cond.append(T_LATENT.c.frequency <= f.max_frequency)
    if f.head is not None:
        cond.append(T_LATENT.c.top_head == f.head)
    if f.max_random_rate is not None:
        from .store.analyses import T_STAT

        cond.append(exists().where(T_STAT.c.dictionary_pk == T_EXPL.c.dictionary_pk,
                                   T_STAT.c.latent == T_EXPL.c.latent, T_STAT.c.stat == "random_rate",
                                   T_STAT.c.value <= f.max_random_rate))
    if f.min_score is not None or f.scorer:
        if not f.scorer:
            raise ConfigError("min_score needs a scorer (which score it applies to)")
        sub = select(T_SCORE.c.explanation_id).where(T_SCORE.c.scorer == f.scorer)
        if f.min_score is not None:
            sub = sub.where(T_SCORE.c.value >= f.min_score)
        cond.append(T_EXPL.c.id.in_(sub))
    return cond


def _joined(cols):
    return (select(*cols).select_from(T_EXPL)
            .join(T_DICT, T_DICT.c.id == T_EXPL.c.dictionary_pk)
            .join(T_SUBJECT, T_SUBJECT.c.id == T_DICT.c.subject_model_id)
            .join(T_LATENT, and_(T_LATENT.c.dictionary_pk == T_EXPL.c.dictionary_pk,
                                 T_LATENT.c.index == T_EXPL.c.latent), isouter=True))


def _hits(store: Store, ids: Sequence[int], sims: dict[int, float] | None = None) -> list[SearchHit]:
    if not ids:
        return []
    with store.tx() as conn:
        rows = conn.execute(_joined([T_EXPL.c.id, T_EXPL.c.latent, T_EXPL.c.text, T_EXPL.c.explainer, T_EXPL.c.model,
                                     T_EXPL.c.dictionary_pk, T_DICT.c.name, T_DICT.c.hookpoint, T_LATENT.c.frequency,
                                     T_DICT.c.signed, T_DICT.c.n_latents, T_LATENT.c.top_head])
                            .where(T_EXPL.c.id.in_(list(ids)))).mappings().all()
        scores = conn.execute(select(T_SCORE.c.explanation_id, T_SCORE.c.scorer, T_SCORE.c.value)
                              .where(T_SCORE.c.explanation_id.in_(list(ids)))).all()
    by = {r["id"]: r for r in rows}
    out = []
    for i in ids:
        r = by.get(i)
        if r is None:
            continue
        base, pole = unit_pole(r["latent"], r["n_latents"], r["signed"])
        out.append(SearchHit(i, r["name"], r["dictionary_pk"], r["hookpoint"], r["latent"], r["text"],
                             r["explainer"], r["model"], None if sims is None else sims.get(i), r["frequency"],
                             pole=pole, base_latent=base if pole else None, top_head=r["top_head"]))
    hit_by = {h.explanation_id: h for h in out}
    for eid, scorer, value in scores:
        hit_by[eid].scores[scorer] = value
    return out


def _check_query(query: str) -> str:
    q = " ".join((query or "").split())
    if not q:
        raise ConfigError("search: the query is empty")
    if len(q) > MAX_QUERY_CHARS:
        raise ConfigError(f"search: the query is {len(q)} characters long (at most {MAX_QUERY_CHARS})")
    return q


def keyword_search(store: Store, query: str, k: int = 20, filters: SearchFilters | None = None) -> list[SearchHit]:
    """Explanations matching every word of `query` (stemmed), best first. Words are bound as data: quotes,
    operators and SQL in the query are searched for, never executed."""
    q = _check_query(query)
    f = filters or SearchFilters()
    words = re.findall(r"\w+", q)
    if not words:
        return []
    cond = _allowed(store, f)
    with store.tx() as conn:
        if store.dialect == "sqlite":
            match = " ".join('"' + w.replace('"', '""') + '"' for w in words)
            if f == SearchFilters():  # the index alone: it holds exactly the explanations with a text
                # (ranked in the index, ties by id, and only the k best looked up: no explanation row per match)
                rows = conn.execute(text("SELECT rowid FROM explanation_fts WHERE explanation_fts MATCH :m "
                                         "ORDER BY bm25(explanation_fts), rowid LIMIT :k"),
                                    {"m": match, "k": k}).scalars().all()
            else:
                fts = text("SELECT rowid AS rowid, bm25(explanation_fts) AS rank FROM explanation_fts "
                           "WHERE explanation_fts MATCH :m").bindparams(m=match)\
                    .columns(column("rowid", Integer), column("rank", Float)).subquery("fts")
                # filters on the explanation alone: no dictionary, subject or latent row per match (foreign keys:
                # the inner joins never drop one, the outer join never filters), a lookup saved per match
                own = f.hookpoint is None and f.subject_model is None and f.min_frequency is None \
                    and f.max_frequency is None and f.head is None
                base = select(T_EXPL.c.id).select_from(T_EXPL) if own else _joined([T_EXPL.c.id])
                rows = conn.execute(base.join(fts, fts.c.rowid == T_EXPL.c.id).where(*cond)
                                    .order_by(fts.c.rank, T_EXPL.c.id).limit(k)).scalars().all()
        else:
            tsq = func.plainto_tsquery("english", " ".join(words))
            vec = func.to_tsvector("english", func.coalesce(T_EXPL.c.text, ""))
            rows = conn.execute(_joined([T_EXPL.c.id]).where(*cond, vec.op("@@")(tsq))
                                .order_by(func.ts_rank(vec, tsq).desc(), T_EXPL.c.id).limit(k)).scalars().all()
    return _hits(store, list(rows))


def _vectors(store: Store, embedder: str, cond, order: bool = False) -> tuple[np.ndarray, np.ndarray]:
    q = (_joined([T_EMB.c.explanation_id, T_EMB.c.vector]).join(T_EMB, T_EMB.c.explanation_id == T_EXPL.c.id)
         .where(T_EMB.c.embedder == embedder, *cond))
    with store.tx() as conn:
        rows = conn.execute(q.order_by(T_EMB.c.explanation_id) if order else q).all()
    if not rows:
        return np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
    ids = np.fromiter((r[0] for r in rows), np.int64, len(rows))
    return ids, np.stack([np.frombuffer(r[1], np.float32) for r in rows])


def semantic_search(store: Store, query: str, k: int = 20, filters: SearchFilters | None = None,
                    embedder: str | None = None) -> list[SearchHit]:
    """Explanations nearest to `query` by cosine similarity of their embeddings, best first."""
    from .embedder import embed

    q = _check_query(query)
    name = _embedder(embedder)
    f = filters or SearchFilters()
    qv = embed([q], embedder)[0]
    ids, sims = nearest(store, qv, k, _allowed(store, f), name, filtered=f != SearchFilters())
    return _hits(store, ids, dict(zip(ids, sims)))


PG_DIM = 384  # the width mirrored into pgvector (migration 0003)
T_VEC = table("explanation_vec", column("explanation_id", Integer), column("embedder"), column("vec"))


class _Vector(UserDefinedType):
    cache_ok = True

    def get_col_spec(self, **kw) -> str:
        return "vector"


def _pgvector(store: Store) -> bool:
    """PostgreSQL with the explanation_vec table (pgvector present when the schema was made)."""
    if store.dialect != "postgresql":
        return False
    if not hasattr(store, "_has_pgvector"):
        from sqlalchemy import inspect

        with store.engine.connect() as conn:
            store._has_pgvector = inspect(conn).has_table("explanation_vec")
    return store._has_pgvector


def _pg_literal(v: np.ndarray) -> str:
    return "[" + ",".join(f"{x:.7g}" for x in np.asarray(v, np.float32)) + "]"


def _pg_nearest(store: Store, vector: np.ndarray, k: int, cond, embedder: str) -> tuple[list[int], list[float]]:
    """pgvector's HNSW index, filters applied in the same query (ef_search raised so filtered queries still fill
    k results)."""
    dist = T_VEC.c.vec.op("<=>", return_type=Float)(cast(literal(_pg_literal(vector)), _Vector()))
    q = (_joined([T_EXPL.c.id, dist.label("d")])
         .join(T_VEC, and_(T_VEC.c.explanation_id == T_EXPL.c.id, T_VEC.c.embedder == embedder))
         .where(*cond).order_by(dist).limit(k))
    with store.tx() as conn:
        conn.exec_driver_sql("SET LOCAL hnsw.ef_search = 200")
        rows = conn.execute(q).all()
    return [int(r[0]) for r in rows], [1.0 - float(r[1]) for r in rows]


_INDEXES: dict[tuple[str, str], tuple[tuple, Any]] = {}


def index_path(store: Store, embedder: str) -> Path:
    """Beside the SQLite file; for a server database, under the cache folder (one per database and embedder)."""
    from sqlalchemy.engine import make_url

    from .paths import cache_root
    from .names import digest

    u = make_url(store.url)
    tag = digest(embedder)[:8]
    if store.dialect == "sqlite" and u.database and u.database != ":memory:":
        return Path(u.database).with_suffix(f".{tag}.vec")
    return cache_root() / "vector_index" / f"{digest(u.render_as_string())[:12]}-{tag}.vec"


def vector_index(store: Store, embedder: str):
    """The process's index of the table's embeddings: reused while the table has not changed (count and newest
    id), else opened from its file — rebuilt from the table when the file is missing, stale or corrupt (said once)."""
    from .vector_index import open_index

    with store.tx() as conn:
        state = tuple(conn.execute(select(func.count(), func.max(T_EMB.c.explanation_id))
                                   .where(T_EMB.c.embedder == embedder)).one())
    if not state[0]:
        return None
    key = (store.url, embedder)
    if key in _INDEXES and _INDEXES[key][0] == state:
        return _INDEXES[key][1]
    ids, mat = _vectors(store, embedder, [], order=True)
    path = index_path(store, embedder)
    path.parent.mkdir(parents=True, exist_ok=True)
    index, why = open_index(path, ids, lambda: mat, embedder=embedder)
    if why:
        log.warning("vector index %s was %s: rebuilt from the store's %d embeddings", path, why, len(ids))
    _INDEXES[key] = (state, index)
    return index


def nearest(store: Store, vector: np.ndarray, k: int, cond, embedder: str,
            filtered: bool = True) -> tuple[list[int], list[float]]:
    """The k explanation ids (of those meeting `cond`) nearest to `vector`: pgvector's HNSW on PostgreSQL with the
    extension, else the embedded index (exact below 20k vectors, HNSW above; filters restrict its candidates)."""
    if _pgvector(store) and len(vector) == PG_DIM:
        return _pg_nearest(store, vector, k, cond, embedder)
    index = vector_index(store, embedder)
    if index is None:
        return [], []
    allowed = None
    if filtered:
        with store.tx() as conn:
            allowed = np.fromiter(conn.execute(_joined([T_EXPL.c.id]).where(*cond)).scalars(), np.int64)
        if not len(allowed):
            return [], []
    hits = index.search(np.asarray(vector, np.float32), k, allowed=allowed)
    keep = hits.ids >= 0
    return [int(i) for i in hits.ids[keep]], [float(x) for x in hits.similarities[keep]]


def search(store: Store, query: str, k: int = 20, mode: str = "semantic", filters: SearchFilters | None = None,
           embedder: str | None = None) -> list[SearchHit]:
    if mode == "semantic":
        return semantic_search(store, query, k, filters, embedder)
    if mode == "keyword":
        return keyword_search(store, query, k, filters)
    raise ConfigError(f"search mode {mode!r}: expected semantic or keyword")


__all__ = ["SearchFilters", "SearchHit", "embed_explanations", "semantic_search", "keyword_search", "search",
           "nearest"]
