"""Read queries the HTTP API and the web pages make: listings with filters, sorting and keyset pagination, aggregate
score tables, one latent with its explanations and scores. SQLAlchemy Core only (every value bound, no SQL built
from strings); the same queries on SQLite and PostgreSQL.

Keyset pagination: a page is "the rows after (sort value, latent index)" of the previous page's last row, so page
1000 costs what page 1 costs (no OFFSET scan). The cursor is opaque to clients: base64 of a small JSON list.
"""

from __future__ import annotations

import base64
import json
import threading
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from sqlalchemy import Integer, and_, case, cast, func, or_, select

from ..errors import ConfigError
from .store import T_DICT, T_EXPL, T_ITEM, T_JOB, T_LATENT, T_SCORE, T_SUBJECT, Store
from .tables import Comparison

T_CMP = Comparison.__table__
SORTS = ("index", "frequency", "max_act", "mean_act", "score", "stat")


def encode_cursor(values: Sequence[Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(values), separators=(",", ":")).encode()).decode().rstrip("=")


def decode_cursor(cursor: str, n: int) -> list:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        vals = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ConfigError("cursor: not a cursor this API returned") from None
    if not isinstance(vals, list) or len(vals) != n or not all(v is None or isinstance(v, (int, float))
                                                               for v in vals):
        raise ConfigError("cursor: not a cursor this API returned")
    return vals


@dataclass
class LatentFilter:
    min_frequency: float | None = None
    max_frequency: float | None = None
    scorer: str | None = None  # score range and score sort apply to this scorer's best score per latent
    min_score: float | None = None
    max_score: float | None = None
    explained: bool | None = None  # True: only latents with an explanation; False: only without
    alive: bool | None = None  # True: fired at least once
    head: int | None = None  # attn_z dictionaries: latents whose largest decoder-norm share is in this head
    stat: str | None = None  # a latent statistic (latent_stat: separability, random_rate): its newest run's value
    min_stat: float | None = None  # is shown as `stat`, and sort=stat, min_stat and max_stat apply to it
    max_stat: float | None = None


def _dicts(result) -> list[dict]:
    """A result's rows as dicts (column name: value); cheaper than `.mappings()` per row."""
    keys = list(result.keys())
    return [dict(zip(keys, r)) for r in result.all()]


def subject_models(store: Store) -> list[dict]:
    q = (select(T_SUBJECT.c.id, T_SUBJECT.c.name, T_SUBJECT.c.created, func.count(T_DICT.c.id).label("n_dictionaries"))
         .select_from(T_SUBJECT).join(T_DICT, T_DICT.c.subject_model_id == T_SUBJECT.c.id, isouter=True)
         .group_by(T_SUBJECT.c.id, T_SUBJECT.c.name, T_SUBJECT.c.created).order_by(T_SUBJECT.c.id))
    with store.tx() as conn:
        return [dict(r) for r in conn.execute(q).mappings()]


# An aggregate over explanations and scores is unchanged while no row was added to either: both tables are
# insert-only, with growing ids. A row's id is drawn at insert and it may commit after a row with a larger id (on
# PostgreSQL, concurrent writers), so the version is the newest id *and* how many rows lie in the last RECENT ids:
# a late commit there changes the count. One statement; an index range of at most RECENT entries per table.
RECENT = 1024
_AGG_CACHE: dict[tuple, tuple[tuple, Any]] = {}
_AGG_LOCK = threading.Lock()


def _version_columns():
    cols = []
    for t in (T_EXPL, T_SCORE):
        newest = select(func.coalesce(func.max(t.c.id), 0)).scalar_subquery()
        cols += [newest, select(func.count()).select_from(t).where(t.c.id > newest - RECENT).scalar_subquery()]
    return select(*cols)


_VERSION = _version_columns()


def results_version(conn) -> tuple:
    """(newest explanation id, explanations among the last RECENT ids, the same two of scores)."""
    return tuple(conn.execute(_VERSION).one())


def _versioned(store: Store, key: tuple, compute):
    """compute(conn), kept per process under results_version: read before computing, in the same transaction, so a
    value is never older than the version it is kept under (a write meanwhile makes the next call recompute)."""
    key = (store.url, *key)
    with store.tx() as conn:
        version = results_version(conn)
        with _AGG_LOCK:
            hit = _AGG_CACHE.get(key)
        if hit is not None and hit[0] == version:
            return hit[1]
        value = compute(conn)
    with _AGG_LOCK:
        if len(_AGG_CACHE) > 256:
            _AGG_CACHE.clear()
        _AGG_CACHE[key] = (version, value)
    return value


def dictionary_counts(store: Store) -> dict[int, dict]:
    """{dictionary pk: {n_explained, n_explanations, n_scores}}: one grouped query each, for the listing (kept
    while no explanation or score is added: _versioned)."""
    out = _versioned(store, ("counts",), _dictionary_counts)
    return {pk: dict(v) for pk, v in out.items()}


def _dictionary_counts(conn) -> dict[int, dict]:
    ex = conn.execute(select(T_EXPL.c.dictionary_pk, func.count(func.distinct(T_EXPL.c.latent)),
                             func.count(), func.coalesce(func.sum(T_EXPL.c.cost_usd), 0.0))
                      .where(T_EXPL.c.text.is_not(None)).group_by(T_EXPL.c.dictionary_pk)).all()
    sc = conn.execute(select(T_EXPL.c.dictionary_pk, func.count(), func.coalesce(func.sum(T_SCORE.c.cost_usd), 0.0))
                      .select_from(T_SCORE).join(T_EXPL, T_EXPL.c.id == T_SCORE.c.explanation_id)
                      .group_by(T_EXPL.c.dictionary_pk)).all()
    out: dict[int, dict] = {}
    for pk, n_lat, n_ex, cost in ex:
        out.setdefault(pk, {"n_explained": 0, "n_explanations": 0, "n_scores": 0, "cost_usd": 0.0})
        out[pk].update(n_explained=int(n_lat), n_explanations=int(n_ex))
        out[pk]["cost_usd"] += float(cost)
    for pk, n_sc, cost in sc:
        out.setdefault(pk, {"n_explained": 0, "n_explanations": 0, "n_scores": 0, "cost_usd": 0.0})
        out[pk]["n_scores"] = int(n_sc)
        out[pk]["cost_usd"] += float(cost)
    return out


def _bucket(store: Store, value, n_bins: int):
    """The histogram bin of a score in [0, 1] (values outside are clamped into the end bins)."""
    scaled = value * n_bins
    b = func.floor(scaled) if store.dialect == "postgresql" else cast(scaled, Integer)  # SQLite: truncates (>= 0)
    return case((value <= 0, 0), (value >= 1, n_bins - 1), else_=b)


def score_table(store: Store, dictionary_pk: int, n_bins: int = 20) -> list[dict]:
    """Per (scorer, explainer, explainer model, judge model): count, skipped, mean, min, max of the headline score,
    and a histogram over [0, 1] in `n_bins` bins (computed in SQL: no score rows travel)."""
    base = (select(T_SCORE.c.scorer, T_EXPL.c.explainer, T_EXPL.c.model.label("explainer_model"),
                   T_SCORE.c.model.label("judge_model"))
            .select_from(T_SCORE).join(T_EXPL, T_EXPL.c.id == T_SCORE.c.explanation_id)
            .where(T_EXPL.c.dictionary_pk == dictionary_pk))
    keys = [T_SCORE.c.scorer, T_EXPL.c.explainer, T_EXPL.c.model, T_SCORE.c.model]
    agg = base.add_columns(func.count().label("n"), func.count(T_SCORE.c.value).label("n_valued"),
                           func.avg(T_SCORE.c.value).label("mean"), func.min(T_SCORE.c.value).label("min"),
                           func.max(T_SCORE.c.value).label("max"),
                           func.coalesce(func.sum(T_SCORE.c.cost_usd), 0.0).label("cost_usd")).group_by(*keys)
    bucket = _bucket(store, T_SCORE.c.value, n_bins).label("bucket")
    hist = (base.add_columns(bucket, func.count().label("c")).where(T_SCORE.c.value.is_not(None))
            .group_by(*keys, bucket))

    def compute(conn) -> tuple[list[dict], list]:
        return [dict(r) for r in conn.execute(agg).mappings()], conn.execute(hist).all()
    rows, bins = _versioned(store, ("score_table", dictionary_pk, n_bins), compute)
    rows = [dict(r) for r in rows]
    by_key = {}
    for r in rows:
        r["hist"] = [0] * n_bins
        r["n_skipped"] = r["n"] - r["n_valued"]
        by_key[(r["scorer"], r["explainer"], r["explainer_model"], r["judge_model"])] = r
    for scorer, explainer, em, jm, b, c in bins:
        r = by_key.get((scorer, explainer, em, jm))
        if r is not None:
            r["hist"][min(n_bins - 1, max(0, int(b)))] += int(c)
    return sorted(rows, key=lambda r: (r["scorer"], r["explainer"], r["explainer_model"]))


def _best_scores(dictionary_pk: int, scorer: str):
    """(latent, best headline score by `scorer`) of a dictionary's explained latents."""
    return (select(T_EXPL.c.latent.label("latent"), func.max(T_SCORE.c.value).label("score"))
            .select_from(T_SCORE).join(T_EXPL, T_EXPL.c.id == T_SCORE.c.explanation_id)
            .where(T_EXPL.c.dictionary_pk == dictionary_pk, T_SCORE.c.scorer == scorer, T_SCORE.c.value.is_not(None))
            .group_by(T_EXPL.c.latent).subquery("best"))



def best_scores(store: Store, dictionary_pk: int, scorer: str) -> tuple[np.ndarray, np.ndarray]:
    """(latents, best headline score) of a dictionary's scored latents, sorted by (score, latent) ascending.
    Kept per process and recomputed only when an explanation or score was added since (_versioned), so
    score-sorted pages cost a binary search instead of an aggregate over every score."""
    def compute(conn) -> tuple[np.ndarray, np.ndarray]:
        rows = conn.execute(select(_best_scores(dictionary_pk, scorer))).all()
        lat = np.fromiter((r[0] for r in rows), np.int64, len(rows))
        val = np.fromiter((r[1] for r in rows), np.float64, len(rows))
        order = np.lexsort((lat, val))
        return lat[order], val[order]
    return _versioned(store, ("best_scores", dictionary_pk, scorer), compute)


def _page_by_score(store: Store, dictionary_pk: int, f: LatentFilter, order: str, limit: int,
                   cursor: str | None) -> tuple[list[dict], str | None]:
    lat, val = best_scores(store, dictionary_pk, f.scorer)
    keep = np.ones(len(lat), bool)
    if f.min_score is not None:
        keep &= val >= f.min_score
    if f.max_score is not None:
        keep &= val <= f.max_score
    lat, val = lat[keep], val[keep]
    if order == "desc":
        lat, val = lat[::-1], val[::-1]
    if cursor:
        last_v, last_i = decode_cursor(cursor, 2)
        if last_v is None or last_i is None:
            raise ConfigError("cursor: not a cursor this API returned")
        after = (val < last_v) | ((val == last_v) & (lat < last_i)) if order == "desc" else \
            (val > last_v) | ((val == last_v) & (lat > last_i))
        lat, val = lat[after], val[after]
    more = len(lat) > limit
    lat, val = lat[:limit], val[:limit]
    cols = [T_LATENT.c.index, T_LATENT.c.n_active, T_LATENT.c.frequency, T_LATENT.c.max_act, T_LATENT.c.mean_act]
    with store.tx() as conn:
        got = {r["index"]: r for r in _dicts(conn.execute(select(*cols).where(
            T_LATENT.c.dictionary_pk == dictionary_pk, T_LATENT.c.index.in_([int(i) for i in lat]))))}
        rows = []
        for i, v in zip(lat.tolist(), val.tolist()):
            if i in got:
                rows.append({**got[i], "score": v})
        _attach_best_explanations(store, dictionary_pk, rows, conn)
    nxt = encode_cursor([rows[-1]["score"], rows[-1]["index"]]) if more and rows else None
    return rows, nxt


def list_latents(store: Store, dictionary_pk: int, *, f: LatentFilter | None = None, sort: str = "index",
                 order: str = "asc", limit: int = 50, cursor: str | None = None) -> tuple[list[dict], str | None]:
    """One page of a dictionary's latents and the cursor of the next page (None at the end)."""
    f = f or LatentFilter()
    if sort not in SORTS:
        raise ConfigError(f"sort {sort!r}: expected one of {', '.join(SORTS)}")
    if order not in ("asc", "desc"):
        raise ConfigError(f"order {order!r}: expected asc or desc")
    if sort == "score" and not f.scorer:
        raise ConfigError("sort=score needs a scorer (which score to sort by)")
    if (f.min_score is not None or f.max_score is not None) and not f.scorer:
        raise ConfigError("min_score/max_score need a scorer (which score they apply to)")
    if (sort == "stat" or f.min_stat is not None or f.max_stat is not None) and not f.stat:
        raise ConfigError("sort=stat, min_stat and max_stat need stat (which statistic, e.g. separability)")
    by_score = sort == "score" or f.min_score is not None or f.max_score is not None
    others = (f.min_frequency, f.max_frequency, f.explained, f.alive, f.head, f.stat)
    if f.scorer and by_score and sort in ("score",) and all(x is None for x in others):
        return _page_by_score(store, dictionary_pk, f, order, limit, cursor)
    cols = [T_LATENT.c.index, T_LATENT.c.n_active, T_LATENT.c.frequency, T_LATENT.c.max_act, T_LATENT.c.mean_act,
            T_LATENT.c.top_head]
    q = select(*cols).where(T_LATENT.c.dictionary_pk == dictionary_pk)
    if sort == "frequency" and not by_score and store.dialect == "sqlite":
        # SQLite: walk the frequency index (stopping after a page) instead of sorting every row of the dictionary
        # found through the primary key; `+ 0` keeps the planner off the primary key for this predicate
        q = select(*cols).where((T_LATENT.c.dictionary_pk + 0) == dictionary_pk)
    score_col = None
    display_only = f.scorer and not by_score  # the score is shown, not used: looked up for the page only
    if f.scorer and not display_only:
        best = _best_scores(dictionary_pk, f.scorer)
        score_col = best.c.score
        # inner join when the score matters for membership (a range, or sorting by it): unscored latents have none;
        # then the scored latents drive the join (each finds its latent row by primary key)
        inner = sort == "score" or f.min_score is not None or f.max_score is not None
        on = and_(T_LATENT.c.dictionary_pk == dictionary_pk, T_LATENT.c.index == best.c.latent)
        if inner:
            q = select(*cols, score_col.label("score")).select_from(best).join(T_LATENT, on)
        else:
            q = q.add_columns(score_col.label("score")).join(best, best.c.latent == T_LATENT.c.index, isouter=True)
        if f.min_score is not None:
            q = q.where(score_col >= f.min_score)
        if f.max_score is not None:
            q = q.where(score_col <= f.max_score)
    stat_col = None
    if f.stat:
        sv = _stat_values(dictionary_pk, f.stat)
        stat_col = sv.c.value
        if sort == "stat" or f.min_stat is not None or f.max_stat is not None:  # only latents that have it
            q = q.join(sv, sv.c.latent == T_LATENT.c.index)
        else:
            q = q.join(sv, sv.c.latent == T_LATENT.c.index, isouter=True)
        q = q.add_columns(stat_col.label("stat"))
        if f.min_stat is not None:
            q = q.where(stat_col >= f.min_stat)
        if f.max_stat is not None:
            q = q.where(stat_col <= f.max_stat)
    if f.min_frequency is not None:
        q = q.where(T_LATENT.c.frequency >= f.min_frequency)
    if f.max_frequency is not None:
        q = q.where(T_LATENT.c.frequency <= f.max_frequency)
    if f.alive is not None:
        q = q.where(T_LATENT.c.n_active > 0 if f.alive else T_LATENT.c.n_active == 0)
    if f.head is not None:
        q = q.where(T_LATENT.c.top_head == f.head)
    if f.explained is not None:
        has = select(T_EXPL.c.latent).where(T_EXPL.c.dictionary_pk == dictionary_pk, T_EXPL.c.text.is_not(None))
        q = q.where(T_LATENT.c.index.in_(has) if f.explained else T_LATENT.c.index.not_in(has))
    key = T_LATENT.c.index if sort == "index" else score_col if sort == "score" else stat_col if sort == "stat" \
        else T_LATENT.c[sort]
    desc = order == "desc"
    if cursor:
        if sort == "index":
            (last_i,) = decode_cursor(cursor, 1)
            q = q.where(T_LATENT.c.index < last_i if desc else T_LATENT.c.index > last_i)
        else:
            last_v, last_i = decode_cursor(cursor, 2)
            if last_v is None or last_i is None:
                raise ConfigError("cursor: not a cursor this API returned")
            # ties on the sort value are broken by the latent index, in the same direction
            q = q.where(or_(key < last_v, and_(key == last_v, T_LATENT.c.index < last_i)) if desc else
                        or_(key > last_v, and_(key == last_v, T_LATENT.c.index > last_i)))
    if sort == "index":
        q = q.order_by(T_LATENT.c.index.desc() if desc else T_LATENT.c.index)
    else:
        q = q.order_by(key.desc() if desc else key, T_LATENT.c.index.desc() if desc else T_LATENT.c.index)
    with store.tx() as conn:
        rows = _dicts(conn.execute(q.limit(limit + 1)))
        more = len(rows) > limit
        rows = rows[:limit]
        if not display_only:
            _attach_best_explanations(store, dictionary_pk, rows, conn)
    if display_only:  # `score` before the explanation's keys, as the page's rows always had them
        lat, val = best_scores(store, dictionary_pk, f.scorer)
        by = dict(zip(lat.tolist(), val.tolist()))
        for r in rows:
            r["score"] = by.get(r["index"])
        _attach_best_explanations(store, dictionary_pk, rows)
    nxt = None
    if more and rows:
        last = rows[-1]
        nxt = encode_cursor([last["index"]] if sort == "index" else [last[sort], last["index"]])
    return rows, nxt


def _stat_values(dictionary_pk: int, stat: str):
    """(latent, value) of a statistic's newest run on a dictionary (one settings key: a rerun with other settings,
    e.g. another concept, replaces the one shown)."""
    from .analyses import T_STAT

    newest = (select(T_STAT.c.stat_key).where(T_STAT.c.dictionary_pk == dictionary_pk, T_STAT.c.stat == stat)
              .order_by(T_STAT.c.created.desc()).limit(1).scalar_subquery())
    return (select(T_STAT.c.latent, T_STAT.c.value)
            .where(T_STAT.c.dictionary_pk == dictionary_pk, T_STAT.c.stat == stat, T_STAT.c.stat_key == newest)
            .subquery())


def _attach_best_explanations(store: Store, dictionary_pk: int, rows: list[dict], conn=None) -> None:
    """Each row gets `explanation` (the text of its best-scored explanation, else its newest) and `scores`
    ({scorer: best headline score}) — one query for the whole page (each explanation joined to its valued scores;
    `conn`: a transaction the caller already holds)."""
    if not rows:
        return
    idx = [r["index"] for r in rows]
    q = (select(T_EXPL.c.id, T_EXPL.c.latent, T_EXPL.c.text, T_EXPL.c.explainer, T_SCORE.c.scorer, T_SCORE.c.value)
         .select_from(T_EXPL.outerjoin(T_SCORE, and_(T_SCORE.c.explanation_id == T_EXPL.c.id,
                                                     T_SCORE.c.value.is_not(None))))
         .where(T_EXPL.c.dictionary_pk == dictionary_pk, T_EXPL.c.latent.in_(idx), T_EXPL.c.text.is_not(None))
         .order_by(T_EXPL.c.id))
    if conn is None:
        with store.tx() as conn:
            got = conn.execute(q).all()
    else:
        got = conn.execute(q).all()
    ex: list[tuple] = []
    per_expl: dict[int, dict[str, float]] = {}
    for eid, latent, text, explainer, scorer, v in got:
        d = per_expl.get(eid)
        if d is None:
            d = per_expl[eid] = {}
            ex.append((eid, latent, text, explainer))
        if scorer is not None:
            d[scorer] = max(v, d.get(scorer, v))
    best: dict[int, tuple] = {}
    scores: dict[int, dict[str, float]] = {}
    for eid, latent, text, explainer in ex:
        s = per_expl[eid]
        mean = sum(s.values()) / len(s) if s else -1.0
        # baselines (random, token_frequency) never stand for a latent when an LLM explanation exists
        baseline = explainer in ("random", "token_frequency")
        rank = (not baseline, mean, eid)
        if latent not in best or rank > best[latent][0]:
            best[latent] = (rank, text, explainer)
        agg = scores.setdefault(latent, {})
        for k, v in s.items():
            if not baseline:
                agg[k] = max(v, agg.get(k, v))
    for r in rows:
        b = best.get(r["index"])
        r["explanation"] = b[1] if b else None
        r["explainer"] = b[2] if b else None
        r["scores"] = scores.get(r["index"], {})


def latent_explanations(store: Store, dictionary_pk: int, index: int) -> list[dict]:
    """Every explanation of a latent with its scores (best LLM explanations first)."""
    with store.tx() as conn:
        ex = [dict(r) for r in conn.execute(select(T_EXPL).where(T_EXPL.c.dictionary_pk == dictionary_pk,
                                                                 T_EXPL.c.latent == index)
                                            .order_by(T_EXPL.c.id)).mappings()]
        ids = [e["id"] for e in ex]
        sc = [dict(r) for r in conn.execute(select(T_SCORE).where(T_SCORE.c.explanation_id.in_(ids))
                                            .order_by(T_SCORE.c.scorer, T_SCORE.c.id)).mappings()] if ids else []
    by = {e["id"]: e for e in ex}
    for e in ex:
        e["scores"] = []
    for s in sc:
        by[s["explanation_id"]]["scores"].append(s)
    for e in ex:
        vals = [s["value"] for s in e["scores"] if s["value"] is not None]
        e["mean_score"] = sum(vals) / len(vals) if vals else None
        e["total_cost_usd"] = float(e["cost_usd"] or 0) + sum(float(s["cost_usd"] or 0) for s in e["scores"])
    baseline = ("random", "token_frequency")
    ex.sort(key=lambda e: (e["text"] is None, e["explainer"] in baseline, -(e["mean_score"] or -1.0), e["id"]))
    return ex


def jobs(store: Store, limit: int = 50, before: int | None = None, status: str | None = None) -> list[dict]:
    q = select(T_JOB.c.id, T_JOB.c.kind, T_JOB.c.status, T_JOB.c.dictionary_pk, T_JOB.c.n_items, T_JOB.c.created,
               T_JOB.c.started, T_JOB.c.finished, T_JOB.c.error, T_JOB.c.budget_usd)
    if before is not None:
        q = q.where(T_JOB.c.id < before)
    if status is not None:
        q = q.where(T_JOB.c.status == status)
    with store.tx() as conn:
        return [dict(r) for r in conn.execute(q.order_by(T_JOB.c.id.desc()).limit(limit)).mappings()]


def comparisons(store: Store, limit: int = 50) -> list[dict]:
    q = select(T_CMP.c.id, T_CMP.c.dictionary_a, T_CMP.c.dictionary_b, T_CMP.c.method, T_CMP.c.params,
               T_CMP.c.summary, T_CMP.c.created).order_by(T_CMP.c.id.desc()).limit(limit)
    with store.tx() as conn:
        return [dict(r) for r in conn.execute(q).mappings()]


def comparison(store: Store, comparison_id: int) -> dict:
    with store.tx() as conn:
        row = conn.execute(select(T_CMP).where(T_CMP.c.id == comparison_id)).mappings().first()
    if row is None:
        raise ConfigError(f"unknown comparison {comparison_id}")
    return dict(row)


def explanation_texts(store: Store, dictionary_pk: int, latents: Sequence[int]) -> dict[int, str]:
    """{latent: best explanation text} for a few latents (the activations endpoint's labels)."""
    rows = [{"index": int(i)} for i in dict.fromkeys(latents)]
    _attach_best_explanations(store, dictionary_pk, rows)
    return {r["index"]: r["explanation"] for r in rows if r["explanation"]}


__all__ = ["LatentFilter", "list_latents", "score_table", "subject_models", "dictionary_counts",
           "latent_explanations", "jobs", "comparisons", "comparison", "encode_cursor", "decode_cursor",
           "explanation_texts", "SORTS", "T_ITEM"]


def api_keys(store: Store) -> list[dict]:
    """Keys by id, name, created, revoked (never the key: only its hash is stored, and not shown)."""
    from .store import T_KEY

    with store.tx() as conn:
        return [dict(r) for r in conn.execute(select(T_KEY.c.id, T_KEY.c.name, T_KEY.c.created, T_KEY.c.revoked)
                                              .order_by(T_KEY.c.id)).mappings()]


def revoke_api_key(store: Store, key_id: int) -> bool:
    from sqlalchemy import update

    from .store import T_KEY

    with store.tx(write=True) as conn:
        return conn.execute(update(T_KEY).where(T_KEY.c.id == key_id).values(revoked=True)).rowcount > 0
