"""Corpus-level results in the store: analyses (a dataset diff, a separability run) and the per-latent statistics
they leave (`latent_stat`: separability, the random-token firing rate), read back by the CLI, the API and pages."""

from __future__ import annotations

from typing import Any, Sequence

from sqlalchemy import select

from ..errors import ConfigError
from .store import Store
from .tables import Analysis, LatentStat

T_ANALYSIS = Analysis.__table__
T_STAT = LatentStat.__table__
STATS = ("separability", "random_rate", "assistant_share")  # the per-latent statistics the store knows


def save_analysis(store: Store, kind: str, dictionary_pk: int, title: str, params: dict, summary: dict,
                  result: dict, stats: dict[str, Any] | None = None) -> int:
    """One analysis row and (optionally) its per-latent statistics, in one transaction: a failure stores nothing.
    `stats`: {"stat": name, "key": settings hash, "values": {latent: (value, details)}}; a rerun with the same
    key replaces that statistic's earlier rows."""
    with store.tx(write=True) as conn:
        aid = conn.execute(T_ANALYSIS.insert().values(kind=kind, dictionary_pk=dictionary_pk, title=title[:500],
                                                      params=params, summary=summary, result=result)
                           ).inserted_primary_key[0]
        if stats:
            _put_stats(conn, dictionary_pk, stats, aid)
    return int(aid)


def save_latent_stats(store: Store, dictionary_pk: int, stats: dict) -> None:
    with store.tx(write=True) as conn:
        _put_stats(conn, dictionary_pk, stats, None)


def _put_stats(conn, dictionary_pk: int, stats: dict, analysis_id: int | None) -> None:
    if stats["stat"] not in STATS:
        raise ConfigError(f"latent statistic {stats['stat']!r}: expected one of {', '.join(STATS)}")
    conn.execute(T_STAT.delete().where((T_STAT.c.dictionary_pk == dictionary_pk) & (T_STAT.c.stat == stats["stat"])
                                       & (T_STAT.c.stat_key == stats["key"])))
    rows = [{"dictionary_pk": dictionary_pk, "latent": int(j), "stat": stats["stat"], "stat_key": stats["key"],
             "value": float(v), "details": det, "analysis_id": analysis_id} for j, (v, det) in stats["values"].items()]
    for s in range(0, len(rows), 5000):
        conn.execute(T_STAT.insert(), rows[s:s + 5000])


def analyses(store: Store, dictionary_pk: int | None = None, kind: str | None = None, limit: int = 50) -> list[dict]:
    q = select(T_ANALYSIS.c.id, T_ANALYSIS.c.kind, T_ANALYSIS.c.dictionary_pk, T_ANALYSIS.c.title,
               T_ANALYSIS.c.params, T_ANALYSIS.c.summary, T_ANALYSIS.c.created)
    if dictionary_pk is not None:
        q = q.where(T_ANALYSIS.c.dictionary_pk == dictionary_pk)
    if kind is not None:
        q = q.where(T_ANALYSIS.c.kind == kind)
    with store.tx() as conn:
        return [dict(r) for r in conn.execute(q.order_by(T_ANALYSIS.c.id.desc()).limit(limit)).mappings()]


def analysis(store: Store, analysis_id: int) -> dict:
    with store.tx() as conn:
        row = conn.execute(select(T_ANALYSIS).where(T_ANALYSIS.c.id == analysis_id)).mappings().first()
    if row is None:
        raise ConfigError(f"unknown analysis {analysis_id}")
    return dict(row)


def latent_stats(store: Store, dictionary_pk: int, latents: Sequence[int] | None = None,
                 stat: str | None = None) -> list[dict]:
    """The statistics of some latents (or all), newest first per (latent, stat)."""
    q = select(T_STAT).where(T_STAT.c.dictionary_pk == dictionary_pk)
    if latents is not None:
        q = q.where(T_STAT.c.latent.in_([int(j) for j in latents]))
    if stat is not None:
        q = q.where(T_STAT.c.stat == stat)
    with store.tx() as conn:
        return [dict(r) for r in conn.execute(q.order_by(T_STAT.c.latent, T_STAT.c.created.desc())).mappings()]


def latest_stats(store: Store, dictionary_pk: int, latent: int) -> list[dict]:
    """A latent's statistics, the newest run of each (what its page shows), with the analysis's title as `label`."""
    seen, out = set(), []
    for s in latent_stats(store, dictionary_pk, [latent]):
        if s["stat"] not in seen:
            seen.add(s["stat"])
            out.append(s)
    titles = {}
    ids = [s["analysis_id"] for s in out if s["analysis_id"] is not None]
    if ids:
        with store.tx() as conn:
            titles = dict(conn.execute(select(T_ANALYSIS.c.id, T_ANALYSIS.c.title)
                                       .where(T_ANALYSIS.c.id.in_(ids))).all())
    for s in out:
        s["label"] = titles.get(s["analysis_id"])
    return out


def stat_names(store: Store, dictionary_pk: int) -> list[str]:
    """The statistics some latent of the dictionary has, in STATS order."""
    with store.tx() as conn:
        have = {r[0] for r in conn.execute(select(T_STAT.c.stat).where(T_STAT.c.dictionary_pk == dictionary_pk)
                                           .group_by(T_STAT.c.stat)).all()}
    return [s for s in STATS if s in have]


def register_meta_dictionary(store: Store, row: dict, subject_model_id: int, latents: Sequence[dict]) -> dict:
    """A meta-dictionary as a dictionary of its own (so jobs explain its latents and pages list them): its row,
    keyed like any other, and one latent row per meta-latent (`n_active`: the base latents it fires on,
    `frequency`: their share of the base's units, max/mean: its activations on them), in one transaction; a second
    registration of the same key replaces the latents' statistics and keeps the explanations."""
    from sqlalchemy import delete

    from .store import T_DICT, T_LATENT
    from .tables import utcnow

    with store.tx(write=True) as conn:
        conn.execute(store._upsert(T_DICT, ["key"], [c for c in row if c not in ("key", "name")])
                     .values(**row, subject_model_id=subject_model_id, created=utcnow()))
        pk = conn.execute(select(T_DICT.c.id).where(T_DICT.c.key == row["key"])).scalar_one()
        conn.execute(delete(T_LATENT).where(T_LATENT.c.dictionary_pk == pk))
        if latents:
            conn.execute(T_LATENT.insert(), [{**r, "dictionary_pk": pk} for r in latents])
    return store.dictionary(pk)
