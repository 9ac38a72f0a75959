"""Server-rendered pages (Jinja2, autoescaped; a little hand-written JS for live job progress and the key form).

/                       dictionaries of every subject model, search box
/d/{ref}                dictionary overview: score distributions, sortable + filterable latent table
/d/{ref}/{index}        feature page: contexts coloured by activation (hover: the value), explanations with their
                        score table, activation histogram, nearest latents elsewhere
/search                 semantic / keyword search
/compare, /compare/{id} comparisons: similarity histogram, matched pairs side by side
/analyses, /analyses/{id}  corpus-level results: a dataset diff with both sides' highlighted documents, a
                        separability run with each latent's two activation histograms
/jobs, /jobs/{id}       jobs; live progress
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, HTTPException, Path as PathParam, Query, Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates

from ..store import queries as Q
from ..units import unit_label
from .access import ReadRoute, read_access
from .schemas import MAX_QUERY_CHARS

router = APIRouter(include_in_schema=False, dependencies=[Depends(read_access)], route_class=ReadRoute)
templates = Jinja2Templates(directory=str(Path(__file__).resolve().parent / "templates"))


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.2e}"
        return f"{v:.{digits}f}"
    return str(v)


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.3g}%"


def _show_token(t: str) -> str:
    """Whitespace made visible where it would vanish (newlines, tabs); the text is escaped by the template."""
    return t.replace("\n", "↵").replace("\t", "⇥").replace("\r", "")


def _heat(a: float, top: float) -> str:
    """Background colour of a token: transparent at 0, saturated amber at the latent's max."""
    if not top or a <= 0:
        return ""
    x = max(0.0, min(1.0, a / top))
    return f"background-color: rgba(247, 127, 0, {0.12 + 0.78 * x:.3f})"


def _bars(counts, width: int = 320, height: int = 60) -> list[dict]:
    """SVG bar geometry for a histogram (height ∝ count)."""
    counts = list(counts or [])
    if not counts:
        return []
    top = max(counts) or 1
    w = width / len(counts)
    return [{"x": round(i * w, 2), "w": round(max(1.0, w - 1), 2), "h": round(height * c / top, 2),
             "y": round(height - height * c / top, 2), "c": c} for i, c in enumerate(counts)]


def _act_hist(hist, edges) -> dict | None:
    """The nonzero span of a latent's activation histogram (log2 bins) as bars with their edge labels."""
    if not hist or not any(hist):
        return None
    nz = [i for i, c in enumerate(hist) if c]
    lo, hi = nz[0], nz[-1] + 1
    out = {"bars": _bars(hist[lo:hi], 480, 90), "lo": None, "hi": None}
    if edges and len(edges) == len(hist) + 1:
        out["lo"], out["hi"] = edges[lo], edges[hi]
    return out


templates.env.filters.update(fmt=_fmt, pct=_pct, tok=_show_token)
templates.env.globals.update(heat=_heat, bars=_bars, urlencode=urlencode, log10=math.log10,
                             unit=lambda d, i: unit_label(i, d["n_latents"], bool(d.get("signed"))))


def _page(request: Request, name: str, **ctx) -> HTMLResponse:
    return templates.TemplateResponse(request, name, ctx)


def _store(request: Request):
    return request.app.state.store


@router.get("/", response_class=HTMLResponse)
def index(request: Request):
    from .routes import _dict_out

    store = _store(request)
    counts = Q.dictionary_counts(store)
    ds = [_dict_out(d, counts, store) for d in store.dictionaries()]
    models: dict[str, list] = {}
    for d in ds:
        models.setdefault(d["subject_model"], []).append(d)
    return _page(request, "index.html", models=models, n=len(ds), jobs=Q.jobs(store, 5))


@router.get("/d/{ref}", response_class=HTMLResponse)
def dictionary_page(request: Request, ref: str,
                    sort: str = Query("index", max_length=20), order: str = Query("asc", max_length=4),
                    limit: int = Query(50, ge=1, le=200), cursor: Optional[str] = Query(None, max_length=200),
                    scorer: Optional[str] = Query(None, max_length=50), min_score: Optional[str] = None,
                    max_score: Optional[str] = None, min_frequency: Optional[str] = None,
                    max_frequency: Optional[str] = None, explained: Optional[str] = None,
                    head: Optional[str] = None, min_stat: Optional[str] = None):
    from ..store.analyses import stat_names
    from .routes import _dict_out, lookup_dictionary

    store = _store(request)
    d = lookup_dictionary(store, ref)
    sort = sort if sort in Q.SORTS else "index"
    order = order if order in ("asc", "desc") else "asc"
    out = _dict_out(d, Q.dictionary_counts(store), store)
    table = Q.score_table(store, d["id"])
    scorers = sorted({r["scorer"] for r in table})

    def num(v, name):
        if v in (None, ""):
            return None
        try:
            return float(v)
        except ValueError:
            raise HTTPException(400, f"{name}: expected a number, got {v[:40]!r}")

    f = Q.LatentFilter(num(min_frequency, "min_frequency"), num(max_frequency, "max_frequency"), scorer or None,
                       num(min_score, "min_score"), num(max_score, "max_score"),
                       {"yes": True, "no": False}.get(explained or ""), None,
                       int(num(head, "head")) if head not in (None, "") else None)
    stats = stat_names(store, d["id"])
    if stats:  # a statistic the latents have (separability): a column, a sort key and a lower bound
        f.stat, f.min_stat = stats[0], num(min_stat, "min_stat")
    elif sort == "stat":
        sort = "index"
    if sort == "score" and not f.scorer:
        f.scorer = scorers[0] if scorers else None
        if f.scorer is None:
            sort = "index"
    rows, nxt = Q.list_latents(store, d["id"], f=f, sort=sort, order=order, limit=limit, cursor=cursor)
    params = {k: v for k, v in {"sort": sort, "order": order, "limit": limit, "scorer": f.scorer or "",
                                "min_score": min_score or "", "max_score": max_score or "",
                                "min_frequency": min_frequency or "", "max_frequency": max_frequency or "",
                                "explained": explained or "", "head": head or "",
                                "min_stat": min_stat or ""}.items() if v not in ("", None)}
    sort_links = {}
    for key in Q.SORTS:
        flip = {"asc": "desc", "desc": "asc"}[order] if sort == key else ("asc" if key == "index" else "desc")
        sort_links[key] = f"/d/{d['id']}?" + urlencode({**params, "sort": key, "order": flip})
    from ..quality import quality_rows

    return _page(request, "dictionary.html", d=out, table=table, scorers=scorers, rows=rows, next_cursor=nxt,
                 quality=[(label, v) for label, (v,) in quality_rows(out.get("quality"))],
                 params=params, sort_links=sort_links, sort=sort, order=order, f=f, explained=explained or "", first_page=not cursor)


@router.get("/d/{ref}/{index}", response_class=HTMLResponse)
def latent_page(request: Request, ref: str, index: int = PathParam(..., ge=0, le=2 ** 31)):
    from .routes import latent_detail, lookup_dictionary

    store = _store(request)
    d = lookup_dictionary(store, ref)
    lat = latent_detail(store, d, index)
    top_act = max([e["max_act"] for e in lat["top"]] + [lat["max_act"] or 0.0]) or 1.0
    scorers = sorted({s["scorer"] for e in lat["explanations"] for s in e["scores"]})
    from ..store.analyses import latest_stats

    return _page(request, "latent.html", d=d, lat=lat, top_act=top_act, scorers=scorers,
                 stats=latest_stats(store, d["id"], index),
                 hist=_act_hist(lat["hist"], lat["hist_edges"]),
                 prev=index - 1 if index > 0 else None, next=index + 1 if index + 1 < d["n_latents"] else None)


@router.get("/search", response_class=HTMLResponse)
def search_page(request: Request, q: str = Query("", max_length=MAX_QUERY_CHARS), mode: str = Query("semantic"),
                dictionary: Optional[str] = Query(None, max_length=300), k: int = Query(25, ge=1, le=200)):
    from .. import search as S
    from .routes import _ensure_embedded, lookup_dictionary

    store = _store(request)
    hits, error = [], None
    mode = mode if mode in ("semantic", "keyword") else "semantic"
    if q.strip():
        try:
            key = lookup_dictionary(store, dictionary)["key"] if dictionary else None
            if mode == "semantic":
                _ensure_embedded(store)
            hits = S.search(store, q, k, mode, S.SearchFilters(dictionary=key))
        except HTTPException as e:
            error = e.detail
        except Exception as e:  # noqa: BLE001 — shown on the page, one line
            error = " ".join(str(e).split())[:300]
    return _page(request, "search.html", q=q, mode=mode, hits=hits, error=error, dictionary=dictionary or "",
                 dictionaries=store.dictionaries())


@router.get("/compare", response_class=HTMLResponse)
def compare_list(request: Request):
    store = _store(request)
    names = {d["id"]: d["name"] for d in store.dictionaries()}
    return _page(request, "compare_list.html", comparisons=Q.comparisons(store, 100), names=names,
                 dictionaries=store.dictionaries())


def _pairs(store, c: dict, limit: int = 200) -> list[dict]:
    """Matched pairs of a comparison result with both sides' explanations (result["pairs"]: [a, b, similarity] or
    {"a", "b", "similarity"} rows), best first."""
    res = _matching_part(c)
    raw = res.get("pairs") or res.get("matches") or []
    pairs = []
    for p in raw:
        if isinstance(p, dict):
            a, b = p.get("a", p.get("latent_a")), p.get("b", p.get("latent_b"))
            s = p.get("similarity", p.get("score"))
        elif isinstance(p, (list, tuple)) and len(p) >= 2:
            a, b, s = p[0], p[1], p[2] if len(p) > 2 else None
        else:
            continue
        if isinstance(a, int) and isinstance(b, int):
            pairs.append({"a": a, "b": b, "similarity": s if isinstance(s, (int, float)) else None})
    pairs.sort(key=lambda p: -(p["similarity"] if p["similarity"] is not None else -1e9))
    pairs = pairs[:limit]
    la = Q.explanation_texts(store, c["dictionary_a"], [p["a"] for p in pairs])
    lb = Q.explanation_texts(store, c["dictionary_b"], [p["b"] for p in pairs])
    for p in pairs:
        p["text_a"], p["text_b"] = la.get(p["a"]), lb.get(p["b"])
    return pairs


def _matching_part(c: dict) -> dict:
    """The part of a stored result that holds the matching (decoder comparisons nest theirs under "decoder")."""
    res = c.get("result") or {}
    if not res.get("pairs") and isinstance(res.get("decoder"), dict):
        return res["decoder"]
    return res


def _similarity_hist(c: dict) -> dict | None:
    """{counts, lo, hi} of the matched pairs' similarities (the stored histogram, else binned from the pairs)."""
    res = _matching_part(c)
    for k in ("histogram", "similarity_hist", "hist"):
        h = res.get(k) or (c.get("summary") or {}).get(k)
        edges = None
        if isinstance(h, dict):
            h, edges = h.get("counts"), h.get("edges")
        if isinstance(h, list) and h and all(isinstance(x, (int, float)) for x in h):
            ok = isinstance(edges, list) and len(edges) == len(h) + 1
            return {"counts": [int(x) for x in h], "lo": edges[0] if ok else None, "hi": edges[-1] if ok else None}
    sims = [p[2] if isinstance(p, (list, tuple)) and len(p) > 2 else p.get("similarity") if isinstance(p, dict)
            else None for p in (res.get("pairs") or [])]
    sims = [s for s in sims if isinstance(s, (int, float))]
    if not sims:
        return None
    lo = -1.0 if min(sims) < 0 else 0.0
    counts = [0] * 20
    for s in sims:
        counts[min(19, max(0, int((s - lo) / (1.0 - lo) * 20)))] += 1
    return {"counts": counts, "lo": lo, "hi": 1.0}


@router.get("/compare/{comparison_id}", response_class=HTMLResponse)
def compare_page(request: Request, comparison_id: int = PathParam(..., ge=0, le=2 ** 62)):
    store = _store(request)
    c = Q.comparison(store, comparison_id)
    names = {d["id"]: d["name"] for d in store.dictionaries()}
    summary = {k: v for k, v in (c.get("summary") or {}).items() if not isinstance(v, (list, dict))}
    return _page(request, "compare.html", c=c, names=names, summary=summary, pairs=_pairs(store, c),
                 hist=_similarity_hist(c))


@router.get("/analyses", response_class=HTMLResponse)
def analyses_page(request: Request):
    from ..store.analyses import analyses

    store = _store(request)
    names = {d["id"]: d["name"] for d in store.dictionaries()}
    return _page(request, "analyses.html", analyses=analyses(store, limit=200), names=names)


@router.get("/analyses/{analysis_id}", response_class=HTMLResponse)
def analysis_page(request: Request, analysis_id: int = PathParam(..., ge=0, le=2 ** 62)):
    from ..store.analyses import analysis, latent_stats

    store = _store(request)
    a = analysis(store, analysis_id)
    d = store.dictionary(a["dictionary_pk"])
    rows = (a.get("result") or {}).get("rows") or []
    hists, texts, meta_d, meta_texts = {}, {}, None, {}
    if a["kind"] == "meta":  # the members' explanations as they are now
        from ..meta import unit_explanations

        texts = unit_explanations(store, d["id"], [u for r in rows for u, _ in r["members"]])
        # the meta-dictionary registered from this analysis (meta-members --save): its latents' own explanations
        meta_d = next((m for m in store.dictionaries() if ((m.get("manifest") or {}).get("meta") or {})
                       .get("analysis_id") == a["id"]), None)
        if meta_d is not None:
            meta_texts = unit_explanations(store, meta_d["id"], [r["meta_latent"] for r in rows if r["n_members"]])
    if a["kind"] == "separability":  # each latent's two histograms, from its stored statistic
        for s in latent_stats(store, d["id"], [r["latent"] for r in rows], "separability"):
            if s["analysis_id"] == a["id"]:
                hists[s["latent"]] = s["details"]
    return _page(request, "analysis.html", a=a, d=d, rows=rows, hists=hists, texts=texts, meta_d=meta_d,
                 meta_texts=meta_texts,
                 summary={k: v for k, v in (a.get("summary") or {}).items() if not isinstance(v, (list, dict))})


@router.get("/jobs", response_class=HTMLResponse)
def jobs_page(request: Request):
    store = _store(request)
    names = {d["id"]: d["name"] for d in store.dictionaries()}
    return _page(request, "jobs.html", jobs=Q.jobs(store, 100), names=names)


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(request: Request, job_id: int = PathParam(..., ge=0, le=2 ** 62)):
    from ..jobs import status

    st = status(_store(request), job_id).as_dict()
    return _page(request, "job.html", st=st, job_id=job_id)
