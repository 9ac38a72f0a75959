"""JSON lines are an export of the store (and an import into it), not a store.

Rows: `explanation` (with its `explanation_id`), `score` (referencing `explanation_id`, not a copy of the text),
`latent_usage` (a job's LLM spend on one latent, per stage, failed attempts included) and one `job` row per job
(its totals and counts). Every row carries its provenance: dictionary id, hookpoint, subject model, models, prompt
versions, seed, usage, created time.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Iterable, Iterator

from sqlalchemy import select

from ..errors import ConfigError
from ..store import Store, headline
from ..store.store import T_ITEM
from ..units import unit_pole
from .spec import digest


def _iso(t: datetime | None) -> str | None:
    return None if t is None else t.isoformat(timespec="seconds")


def _base(d: dict) -> dict:
    return {"dictionary_id": d["dictionary_id"], "hookpoint": d["hookpoint"], "dictionary": d["name"]}


def _pole(d: dict, unit: int) -> dict:
    """A signed dictionary's rows name the latent and the pole of their unit (unsigned rows stay as they were)."""
    if not d.get("signed"):
        return {}
    latent, pole = unit_pole(unit, d["n_latents"], True)
    return {"base_latent": latent, "pole": pole}


def explanation_row(d: dict, e: dict) -> dict:
    return {**_base(d), "type": "explanation", "explanation_id": e["id"], "latent": e["latent"], **_pole(d, e["latent"]),
            "explainer": e["explainer"], "model": e["model"], "prompt_version": e["prompt_version"], "seed": e["seed"],
            "text": e["text"], "skipped": e["skipped"], "parsed": e["parsed"],
            "examples_used": e["examples_used"] or [], "usage": e["usage"] or {}, "job_id": e["job_id"],
            "created": _iso(e["created"])}


def score_row(d: dict, e: dict, s: dict) -> dict:
    return {**_base(d), "type": "score", "explanation_id": e["id"], "latent": e["latent"], **_pole(d, e["latent"]),
            "explainer": e["explainer"], "explainer_model": e["model"], "scorer": s["scorer"],
            "model": s["model"], "judge_model": s["model"], "prompt_version": s["prompt_version"], "seed": s["seed"],
            "metrics": s["metrics"] or {}, "details": s["details"] or {}, "skipped": s["skipped"],
            "usage": s["usage"] or {}, "job_id": s["job_id"], "created": _iso(s["created"])}


def export_rows(store: Store, dictionary: str | int | None = None, job_id: int | None = None) -> Iterator[dict]:
    """The store's rows for one dictionary (or all), optionally one job's results: explanations and scores, then
    each job's per-latent usage and its total."""
    dicts = [store.dictionary(dictionary)] if dictionary is not None else store.dictionaries()
    if job_id is not None:
        dicts = [store.dictionary(store.job(job_id)["dictionary_pk"])]
    for d in dicts:
        job = store.job(job_id) if job_id is not None else None
        expls = store.explanations(d["id"])
        if job is not None:
            wanted = _job_explain_key(store, job)
            expls = [e for e in expls if e["explain_key"] == wanted]
        by_id = {e["id"]: e for e in expls}
        yield from (explanation_row(d, e) for e in expls)
        keys = None if job is None else set(_job_score_keys(store, job).values())
        for s in store.scores(by_id):
            if keys is None or s["score_key"] in keys:
                yield score_row(d, by_id[s["explanation_id"]], s)
        for j in ([job] if job is not None else [j for j in store.jobs(10_000) if j["dictionary_pk"] == d["id"]]):
            yield from _usage_rows(store, d, j)


def _job_explain_key(store: Store, job: dict) -> str:
    from .spec import explain_identity, parse_job_spec

    return digest(explain_identity(parse_job_spec(job["spec"]), store.dictionary(job["dictionary_pk"])["key"]))


def _job_score_keys(store: Store, job: dict) -> dict[str, str]:
    from .spec import parse_job_spec, score_identity

    spec = parse_job_spec(job["spec"])
    ek = _job_explain_key(store, job)
    return {s: digest(score_identity(spec, s, ek)) for s in spec.scorers}


def _usage_rows(store: Store, d: dict, job: dict) -> Iterator[dict]:
    with store.tx() as conn:
        items = conn.execute(select(T_ITEM).where(T_ITEM.c.job_id == job["id"]).order_by(T_ITEM.c.latent))\
            .mappings().all()
    per: dict[int, dict] = {}
    total = {"prompt_tokens": 0, "completion_tokens": 0, "calls": 0, "cost_usd": 0.0}
    for it in items:
        u = {k: it[k] for k in total}
        row = per.setdefault(it["latent"], {**_base(d), "type": "latent_usage", "job_id": job["id"],
                                            "latent": it["latent"], "usage": dict.fromkeys(total, 0),
                                            "stages": {}, "errors": {}})
        row["stages"][it["stage"]] = {**u, "status": it["status"], "attempts": it["attempts"]}
        if it["error"] and it["status"] == "failed":
            row["errors"][it["stage"]] = it["error"]
        for k in total:
            row["usage"][k] += u[k]
            total[k] += u[k]
    yield from per.values()
    yield {**_base(d), "type": "job", "job_id": job["id"], "latent": None, "status": job["status"],
           "spec": job["spec"], "usage": total, "items": store.item_counts(job["id"]), "error": job["error"],
           "created": _iso(job["created"]), "started": _iso(job["started"]), "finished": _iso(job["finished"])}


def write_jsonl(rows: Iterable[dict], path: str | Path) -> int:
    """Write rows to `path` atomically (a temporary file renamed into place); returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    n = 0
    with tmp.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, default=str) + "\n")
            n += 1
    os.replace(tmp, path)
    return n


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a JSON-lines file; a malformed line is one error naming its number."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    rows = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{n}: not a JSON object ({e.msg})") from None
            if not isinstance(r, dict) or "type" not in r:
                raise ConfigError(f"{path}:{n}: expected a JSON object with a 'type' field")
            rows.append(r)
    return rows


def import_jsonl(store: Store, path: str | Path, dictionary: str | None = None) -> dict[str, int]:
    """Import a results.jsonl (ours, from before the store, or an export) into the store, in one transaction.
    Explanation and score rows need their dictionary registered (extract, or `dictionary=` a cache folder);
    identity keys come from the rows' own settings, so importing twice adds nothing."""
    from .runner import ensure_dictionary

    rows = read_jsonl(path)
    fixed = ensure_dictionary(store, dictionary) if dictionary else None
    cache: dict[tuple, dict] = {}

    def dict_for(r: dict, n: int) -> dict:
        if fixed is not None:
            return fixed
        k = (r.get("dictionary_id"), r.get("hookpoint"))
        if k not in cache:
            try:
                cache[k] = store.dictionary(f"{k[0]}@{k[1]}")
            except ConfigError:
                raise ConfigError(f"{path}:{n}: dictionary {k[0]} at {k[1]} is not in the store (register its "
                                  "cache first: autointerp import --dictionary CACHE_FOLDER)") from None
        return cache[k]

    counts = {"explanations": 0, "scores": 0}
    with store.tx(write=True) as conn:
        ids: dict[tuple, int] = {}
        for n, r in enumerate(rows, 1):
            if r["type"] == "explanation":
                d = dict_for(r, n)
                try:
                    key = digest({"imported": [r.get("explainer"), r.get("model"), r.get("prompt_version"),
                                               r.get("seed")]})
                    row = {"dictionary_pk": d["id"], "latent": int(r["latent"]), "explain_key": key,
                           "explainer": str(r.get("explainer") or "imported"), "model": r.get("model") or "",
                           "prompt_version": r.get("prompt_version") or "", "seed": int(r.get("seed") or 0),
                           "text": r.get("text"), "skipped": r.get("skipped"), "parsed": bool(r.get("parsed", True)),
                           "examples_used": list(r.get("examples_used") or []), "usage": r.get("usage") or {},
                           "cost_usd": float((r.get("usage") or {}).get("cost_usd", 0.0))}
                except (KeyError, TypeError, ValueError) as e:
                    raise ConfigError(f"{path}:{n}: explanation row: bad or missing field ({e})") from None
                ids[(d["id"], row["latent"], r.get("explanation_id") or (row["explainer"], row["model"]))] = \
                    store.insert_explanation(conn, row)
                counts["explanations"] += 1
        for n, r in enumerate(rows, 1):
            if r["type"] != "score":
                continue
            d = dict_for(r, n)
            ref = r.get("explanation_id") or (r.get("explainer") or "imported", r.get("explainer_model") or "")
            eid = ids.get((d["id"], int(r.get("latent", -1)), ref))
            if eid is None:
                eid = _match_by_text(ids, d["id"], r)
            if eid is None:
                raise ConfigError(f"{path}:{n}: score row for latent {r.get('latent')} has no explanation row "
                                  "before it in the file")
            metrics = r.get("metrics") or {}
            store.insert_score(conn, {
                "explanation_id": eid, "score_key": digest({"imported": [r.get("scorer"), r.get("model"),
                                                                       r.get("prompt_version"), r.get("seed")]}),
                "scorer": str(r.get("scorer")), "model": r.get("model") or "", "seed": int(r.get("seed") or 0),
                "prompt_version": r.get("prompt_version") or "", "value": headline(str(r.get("scorer")), metrics),
                "metrics": metrics, "details": r.get("details") or {}, "skipped": r.get("skipped"),
                "usage": r.get("usage") or {}, "cost_usd": float((r.get("usage") or {}).get("cost_usd", 0.0))})
            counts["scores"] += 1
    return counts


def _match_by_text(ids: dict, dictionary_pk: int, r: dict) -> int | None:
    """Old results files copied the explanation text into score rows: one explanation of that latent is it."""
    cands = [v for (d, latent, _), v in ids.items() if d == dictionary_pk and latent == r.get("latent")]
    return cands[0] if len(cands) == 1 else None
