"""The JSON API (mounted at /api/v1). Handlers are thin: they check input, call the library (store queries, search,
compare, jobs, runtime) and shape the answer with the pydantic schemas."""

from __future__ import annotations

import json
import logging
import tempfile
import threading
import time
from datetime import date, datetime
from pathlib import Path
from typing import Literal, Optional

from fastapi import APIRouter, Depends, HTTPException, Path as PathParam, Query, Request
from fastapi.responses import FileResponse, Response
import numpy as np
from sqlalchemy import or_, select
from starlette.background import BackgroundTask

from ..jobs.spec import JobSpec
from ..store import Store
from ..store import queries as Q
from ..store.store import T_DICT, T_LATENT, T_SUBJECT
from ..units import unit_pole
from . import runtime
from .access import KeyedRoute, ReadRoute, read_access, require_key, store_read
from .schemas import (MAX_QUERY_CHARS, ActivationsOut, ActivationsRequest, AnalysisOut, ComparisonOut,
                      ComparisonRequest, DiffRequest,
                      DictionaryDetail, DictionaryOut, Health, JobOut, JobStatusOut, JobSubmitted, LatentDetail,
                      LatentPage, Problem, ResumeRequest, SearchResult, SteerEdit, SteerOut, SteerRequest,
                      SubjectModelOut)

log = logging.getLogger(__name__)
MAX_ID = 2 ** 62  # ids and indices beyond any store's (SQLite integers are 64-bit)


def IndexParam():  # a new Param per use: FastAPI binds each to its parameter's name
    return PathParam(..., ge=0, le=2 ** 31, description="Latent index")


def IdParam():
    return PathParam(..., ge=0, le=MAX_ID)


ERRORS = {400: {"model": Problem}, 404: {"model": Problem}, 422: {"model": Problem}}
AUTH_ERRORS = {**ERRORS, 401: {"model": Problem}}
router = APIRouter(responses={413: {"model": Problem}})
reads = APIRouter(dependencies=[Depends(read_access)], responses=AUTH_ERRORS, route_class=ReadRoute)
writes = APIRouter(dependencies=[Depends(require_key)], responses=AUTH_ERRORS, route_class=KeyedRoute)


def _json_default(o):
    if isinstance(o, (datetime, date)):
        return o.isoformat()
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def render_json(data) -> bytes:
    """JSON bytes without a second validation pass: for the hot read endpoints, whose dicts are built from the
    store's typed columns (the response_model still documents them in the contract)."""
    try:
        body = json.dumps(data, default=_json_default, separators=(",", ":"), allow_nan=False)
    except ValueError:  # a NaN/inf somewhere in stored metrics: null, as pydantic would write it
        body = json.dumps(_finite(data), default=_json_default, separators=(",", ":"), allow_nan=False)
    return body.encode()


def fast_json(data, status_code: int = 200) -> Response:
    return Response(render_json(data), status_code=status_code, media_type="application/json")


def _finite(x):
    if isinstance(x, float):
        return x if np.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


_DICT_CACHE: dict[tuple[int, str], tuple[float, dict]] = {}
DICT_TTL_S = 5.0


def store_of(request: Request) -> Store:
    return request.app.state.store


def lookup_dictionary(store: Store, ref: str) -> dict:
    """A dictionary by id, name or key only (never a filesystem path: refs come from URLs); remembered for a few
    seconds (the hot read endpoints resolve one per request)."""
    k = (id(store), ref)
    hit = _DICT_CACHE.get(k)
    now = time.monotonic()
    if hit is not None and hit[0] > now:
        return dict(hit[1])
    row = _lookup_dictionary(store, ref)
    if len(_DICT_CACHE) > 1000:
        _DICT_CACHE.clear()
    _DICT_CACHE[k] = (now + DICT_TTL_S, row)
    return dict(row)


def _lookup_dictionary(store: Store, ref: str) -> dict:
    q = select(T_DICT, T_SUBJECT.c.name.label("subject_model")).join(T_SUBJECT,
                                                                      T_SUBJECT.c.id == T_DICT.c.subject_model_id)
    cond = [T_DICT.c.name == ref, T_DICT.c.key == ref]
    if ref.isdigit() and len(ref) < 18:
        cond.append(T_DICT.c.id == int(ref))
    with store.tx() as conn:
        rows = conn.execute(q.where(or_(*cond))).mappings().all()
    if not rows:
        raise HTTPException(404, f"unknown dictionary {ref[:200]!r} (GET /api/v1/dictionaries lists them)")
    if len(rows) > 1:  # a name that is another's id: the exact name wins
        named = [r for r in rows if r["name"] == ref]
        if len(named) != 1:
            raise HTTPException(400, f"dictionary {ref[:200]!r} is ambiguous: use its id")
        rows = named
    return dict(rows[0])


def _dict_out(d: dict, counts: dict, store: Store | None = None) -> dict:
    c = counts.get(d["id"], {})
    return {**d, **{k: c.get(k, 0) for k in ("n_explained", "n_explanations", "n_scores")},
            "cost_usd": float(c.get("cost_usd", 0.0)), "has_cache": runtime.open_cache(d, store) is not None}


# ------------------------------------------------------------------------------------------------- reads


@router.get("/health", response_model=Health, tags=["meta"])
def health(request: Request):
    from .. import __version__

    store = store_of(request)
    with store.tx() as conn:
        conn.execute(select(1))
    return {"status": "ok", "version": __version__, "database": store.dialect}


@reads.get("/subject-models", response_model=list[SubjectModelOut], tags=["browse"])
@store_read
def list_subject_models(request: Request):
    return Q.subject_models(store_of(request))


@reads.get("/dictionaries", response_model=list[DictionaryOut], tags=["browse"])
@store_read
def list_dictionaries(request: Request, subject_model: Optional[str] = Query(None, max_length=500)):
    store = store_of(request)
    counts = Q.dictionary_counts(store)
    ds = store.dictionaries()
    if subject_model:
        ds = [d for d in ds if d["subject_model"] == subject_model]
    return [_dict_out(d, counts, store) for d in ds]


@reads.get("/dictionaries/{ref}", response_model=DictionaryDetail, tags=["browse"])
@store_read
def get_dictionary(request: Request, ref: str):
    store = store_of(request)
    d = lookup_dictionary(store, ref)
    table = Q.score_table(store, d["id"])
    out = _dict_out(d, Q.dictionary_counts(store), store)
    return {**out, "scores": table, "explainers": sorted({r["explainer"] for r in table})}


@reads.get("/dictionaries/{ref}/plot.png", tags=["browse"], response_class=Response,
           responses={200: {"content": {"image/png": {}}, "description": "Score distributions (PNG)"},
                      404: {"model": Problem}})
def dictionary_plot(request: Request, ref: str):
    from ..plots import dictionary_plot_png

    store = store_of(request)
    d = lookup_dictionary(store, ref)
    png = dictionary_plot_png(store, d["id"])
    if png is None:
        raise HTTPException(404, f"dictionary {d['name']} has no scores to plot yet")
    return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=60"})


@reads.get("/dictionaries/{ref}/latents", response_model=LatentPage, tags=["browse"])
@store_read
def list_latents(request: Request, ref: str,
                 sort: Literal["index", "frequency", "max_act", "mean_act", "score", "stat"] = "index",
                 order: Literal["asc", "desc"] = "asc",
                 limit: int = Query(50, ge=1, le=200, description="Page size (at most 200)"),
                 cursor: Optional[str] = Query(None, max_length=200, description="next_cursor of the previous page"),
                 min_frequency: Optional[float] = Query(None, ge=0, le=1),
                 max_frequency: Optional[float] = Query(None, ge=0, le=1),
                 scorer: Optional[str] = Query(None, max_length=50),
                 min_score: Optional[float] = Query(None, ge=-1e6, le=1e6),
                 max_score: Optional[float] = Query(None, ge=-1e6, le=1e6),
                 explained: Optional[bool] = None, alive: Optional[bool] = None,
                 head: Optional[int] = Query(None, ge=0, le=4096, description="attn_z dictionaries: latents whose "
                                             "largest decoder-norm share is in this attention head"),
                 stat: Optional[Literal["separability", "random_rate", "assistant_share"]] = Query(
                     None, description="A latent statistic, shown as `stat` (its newest run); sort=stat, min_stat "
                                       "and max_stat apply to it"),
                 min_stat: Optional[float] = Query(None, ge=-1e6, le=1e6),
                 max_stat: Optional[float] = Query(None, ge=-1e6, le=1e6)):
    store = store_of(request)
    d = lookup_dictionary(store, ref)
    f = Q.LatentFilter(min_frequency, max_frequency, scorer, min_score, max_score, explained, alive, head, stat,
                       min_stat, max_stat)
    rows, nxt = Q.list_latents(store, d["id"], f=f, sort=sort, order=order, limit=limit, cursor=cursor)
    for r in rows:
        r.setdefault("score", None)
        if d.get("signed"):
            r["base_latent"], r["pole"] = unit_pole(r["index"], d["n_latents"], True)
    return fast_json({"items": rows, "next_cursor": nxt})


def latent_detail(store: Store, d: dict, index: int, n_top: int = 20, row: dict | None = None,
                  expl: list[dict] | None = None) -> dict:
    """The latent's answer; `row` (its statistics) and `expl` (Q.latent_explanations) when the caller read them."""
    if not 0 <= index < d["n_latents"]:
        raise HTTPException(404, f"latent {index} out of range (dictionary {d['name']} has latents 0.."
                                 f"{d['n_latents'] - 1})")
    if row is None:
        with store.tx() as conn:
            row = conn.execute(select(T_LATENT).where(T_LATENT.c.dictionary_pk == d["id"],
                                                      T_LATENT.c.index == index)).mappings().first()
    if row is None:
        raise HTTPException(404, f"latent {index} of {d['name']} has no statistics (not extracted)")
    ex = runtime.latent_examples(d, index, n_top=n_top, store=store)
    if expl is None:
        expl = Q.latent_explanations(store, d["id"], index)
    for e in expl:
        e["usage"] = e["usage"] or {}
        for s in e["scores"]:
            s["metrics"], s["usage"] = s["metrics"] or {}, s["usage"] or {}
    base, pole = unit_pole(index, d["n_latents"], bool(d.get("signed")))
    meta = None
    if d.get("format") == "meta-dictionary":
        from ..meta import latent_members

        meta = latent_members(store, d, index)
    return {"dictionary": d["name"], "dictionary_pk": d["id"], "index": index, **dict(row), "meta": meta,
            "pole": pole, "base_latent": base if pole else None,
            "hist_edges": ex["hist_edges"] if ex else None, "top": ex["top"] if ex else [],
            "quantiles": ex["quantiles"] if ex else [], "examples_available": ex is not None,
            "explanations": expl, "cost_usd": sum(e["total_cost_usd"] for e in expl)}


@reads.get("/dictionaries/{ref}/latents/{index}", response_model=LatentDetail, tags=["browse"])
@store_read
def get_latent(request: Request, ref: str, index: int = IndexParam(),
               n_top: int = Query(20, ge=0, le=100, description="Top examples to return")):
    store = store_of(request)
    return fast_json(latent_detail(store, lookup_dictionary(store, ref), index, n_top))


def _search_hits(hits) -> list[dict]:
    return [h.as_dict() for h in hits]


@reads.get("/dictionaries/{ref}/latents/{index}/nearest", response_model=SearchResult, tags=["search"])
def nearest_latents(request: Request, ref: str, index: int = IndexParam(), k: int = Query(10, ge=1, le=100)):
    """The latents of other dictionaries whose explanations are nearest to this latent's best explanation."""
    store = store_of(request)
    d = lookup_dictionary(store, ref)
    hits = nearest_for_latent(store, d, index, k)
    return {"query": f"{d['name']}#{index}", "mode": "semantic", "hits": _search_hits(hits)}


def nearest_for_latent(store: Store, d: dict, index: int, k: int):
    from .. import search as S

    rows = [{"index": index}]
    Q._attach_best_explanations(store, d["id"], rows)
    text = rows[0]["explanation"]
    if not text:
        raise HTTPException(404, f"latent {index} of {d['name']} has no explanation to compare by")
    fn = getattr(S, "nearest_latents", None)
    if fn is not None:  # the search library's own (issue 9), when it has one
        try:
            return fn(store, d["id"], index, k)
        except TypeError:
            pass
    _ensure_embedded(store)
    from ..embedder import embed, embedder_name
    from ..store.store import T_EXPL

    vec = embed([text])[0]
    cond = S._allowed(store, S.SearchFilters()) + [T_EXPL.c.dictionary_pk != d["id"]]
    ids, sims = S.nearest(store, vec, k, cond, embedder_name(None))
    return S._hits(store, ids, dict(zip(ids, sims)))


_EMBED_LOCK = threading.Lock()
INLINE_EMBED_MAX = 2000


def _ensure_embedded(store: Store) -> None:
    """Explanations not embedded yet are embedded before a semantic search when they are few (the demo, a fresh
    import); a large backlog is the CLI's job (`autointerp search` embeds it once)."""
    from sqlalchemy import func

    from .. import search as S
    from ..embedder import embedder_name
    from ..store.store import T_EMB, T_EXPL

    name = embedder_name(None)
    done = select(T_EMB.c.explanation_id).where(T_EMB.c.embedder == name)
    with store.tx() as conn:
        n = conn.execute(select(func.count()).select_from(T_EXPL).where(T_EXPL.c.text.is_not(None),
                                                                         T_EXPL.c.id.not_in(done))).scalar_one()
    if 0 < n <= INLINE_EMBED_MAX:
        with _EMBED_LOCK:
            S.embed_explanations(store)


@reads.get("/search", response_model=SearchResult, tags=["search"])
@store_read
def search(request: Request, q: str = Query(..., min_length=1, max_length=MAX_QUERY_CHARS),
           mode: Literal["semantic", "keyword"] = "semantic", k: int = Query(20, ge=1, le=200),
           dictionary: Optional[str] = Query(None, max_length=1000),
           subject_model: Optional[str] = Query(None, max_length=500),
           hookpoint: Optional[str] = Query(None, max_length=300), explainer: Optional[str] = Query(None, max_length=50),
           scorer: Optional[str] = Query(None, max_length=50), min_score: Optional[float] = Query(None, ge=-1e6, le=1e6),
           min_frequency: Optional[float] = Query(None, ge=0, le=1),
           max_frequency: Optional[float] = Query(None, ge=0, le=1),
           head: Optional[int] = Query(None, ge=0, le=4096, description="attn_z dictionaries: latents living mostly "
                                                                         "in this attention head"),
           max_random_rate: Optional[float] = Query(None, ge=0, le=1, description="Only latents whose firing rate "
                                                    "on random-token sequences (`autointerp random-rate`) is at most "
                                                    "this (LangFIR's filter)")):
    from .. import search as S

    store = store_of(request)
    if not q.strip():
        raise HTTPException(422, "q: the query is empty")
    if dictionary is not None:
        dictionary = lookup_dictionary(store, dictionary)["key"]
    if min_score is not None and not scorer:
        raise HTTPException(422, "min_score needs a scorer (which score it applies to)")
    f = S.SearchFilters(dictionary, subject_model, hookpoint, explainer, scorer, min_score, min_frequency,
                        max_frequency, head, max_random_rate)
    if mode == "semantic":
        _ensure_embedded(store)
    hits = S.search(store, q, k, mode, f)
    return fast_json({"query": q, "mode": mode, "hits": _search_hits(hits)})


@reads.get("/comparisons", response_model=list[ComparisonOut], tags=["compare"])
@store_read
def list_comparisons(request: Request, limit: int = Query(50, ge=1, le=200)):
    return Q.comparisons(store_of(request), limit)


@reads.get("/comparisons/{comparison_id}", response_model=ComparisonOut, tags=["compare"])
@store_read
def get_comparison(request: Request, comparison_id: int = IdParam()):
    return Q.comparison(store_of(request), comparison_id)


@reads.get("/jobs", response_model=list[JobOut], tags=["jobs"])
@store_read
def list_jobs(request: Request, limit: int = Query(50, ge=1, le=200),
              before: Optional[int] = Query(None, ge=0, le=MAX_ID, description="Jobs with an id below this (keyset pagination)"),
              status: Optional[str] = Query(None, max_length=30)):
    return Q.jobs(store_of(request), limit, before, status)


@reads.get("/jobs/{job_id}", response_model=JobStatusOut, tags=["jobs"])
@store_read
def get_job(request: Request, job_id: int = IdParam()):
    from ..jobs import status

    return status(store_of(request), job_id).as_dict()


EXPORT_FORMATS = ("jsonl", "neuronpedia", "delphi", "parquet")


@reads.get("/dictionaries/{ref}/export", tags=["export"], response_class=FileResponse,
           responses={200: {"content": {"application/zip": {}, "application/x-ndjson": {}},
                            "description": "jsonl: the JSON-lines export; neuronpedia, delphi, parquet: a zip of the "
                                           "folder layout"}})
def export(request: Request, ref: str, format: Literal["jsonl", "neuronpedia", "delphi", "parquet"] = "jsonl"):
    """The dictionary's results in one of the export formats (Neuronpedia's dataset layout, delphi result folders,
    parquet tables, our JSON lines)."""
    import shutil

    from .. import exports

    store = store_of(request)
    d = lookup_dictionary(store, ref)
    tmp = Path(tempfile.mkdtemp(prefix="autointerp-export-"))
    cleanup = BackgroundTask(shutil.rmtree, tmp, ignore_errors=True)
    try:
        if format == "jsonl":
            from ..jobs.export import export_rows, write_jsonl

            path = tmp / f"{d['name']}.jsonl"
            write_jsonl(export_rows(store, d["id"]), path)
            return FileResponse(path, media_type="application/x-ndjson", filename=path.name, background=cleanup)
        folder = tmp / "out"
        {"neuronpedia": exports.export_neuronpedia, "delphi": exports.export_delphi,
         "parquet": exports.export_parquet}[format](store, d["id"], folder)
        archive = shutil.make_archive(str(tmp / f"{d['name']}-{format}"), "zip", folder)
        return FileResponse(archive, media_type="application/zip", filename=Path(archive).name, background=cleanup)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@reads.get("/analyses", response_model=list[AnalysisOut], tags=["corpus"])
@store_read
def list_analyses(request: Request, dictionary: Optional[str] = Query(None, max_length=1000),
                  kind: Optional[str] = Query(None, pattern="^(diff|separability|meta)$"),
                  limit: int = Query(50, ge=1, le=200)):
    """Stored corpus-level results (dataset diffs, separability runs), newest first; without their full result."""
    from ..store.analyses import analyses

    store = store_of(request)
    pk = lookup_dictionary(store, dictionary)["id"] if dictionary else None
    return analyses(store, pk, kind, limit)


@reads.get("/analyses/{analysis_id}", response_model=AnalysisOut, tags=["corpus"])
@store_read
def get_analysis(request: Request, analysis_id: int = IdParam()):
    from ..store.analyses import analysis

    return analysis(store_of(request), analysis_id)


# ------------------------------------------------------------------------------------------------- writes


@writes.post("/comparisons", response_model=ComparisonOut, status_code=201, tags=["compare"],
             responses={501: {"model": Problem}})
def start_comparison(request: Request, body: ComparisonRequest):
    """Compare two dictionaries (by explanation embeddings, decoder/encoder cosine or activations) and store the
    result."""
    store = store_of(request)
    a, b = lookup_dictionary(store, body.a), lookup_dictionary(store, body.b)
    try:
        from .. import compare as C
    except ImportError:
        raise HTTPException(501, "comparison is not available in this installation (autointerp.compare missing)")
    fn = getattr(C, "compare", None)
    if fn is None:
        raise HTTPException(501, "comparison is not available in this installation (autointerp.compare.compare)")
    out = fn(store, a["key"], b["key"], method=body.method)
    cid = out.get("id") if isinstance(out, dict) else getattr(out, "id", None)
    if cid is None:
        cid = Q.comparisons(store, 1)[0]["id"]
    return Q.comparison(store, int(cid))


@writes.post("/diffs", response_model=AnalysisOut, status_code=201, tags=["corpus"])
def start_diff(request: Request, body: DiffRequest):
    """Which latents fire in more of the documents of A than of B (and the reverse), by firing-rate difference
    with BH-corrected q-values and each latent's best documents on both sides; stored as an analysis. For corpora
    bigger than a request, use `autointerp diff` (same computation, same store)."""
    from ..store.analyses import analysis

    store = store_of(request)
    d = lookup_dictionary(store, body.dictionary)
    aid = runtime.diff_texts(d, body, request.app.state.settings.device, store=store)
    return analysis(store, aid)


def _start_runner(request: Request, job_id: int) -> bool:
    """Run the job in this server process (a thread with its own event loop) unless one already runs it."""
    if not request.app.state.settings.embedded_runner:
        return False
    runners: dict = request.app.state.runners
    t = runners.get(job_id)
    if t is not None and t.is_alive():
        return True
    store = store_of(request)

    def work():
        from ..jobs import run

        try:
            run(store, job_id, progress=False)
        except BaseException as e:  # noqa: BLE001 — recorded on the job row by the runner
            log.warning("job %d stopped: %s", job_id, e)

    t = threading.Thread(target=work, name=f"job-{job_id}", daemon=True)
    runners[job_id] = t
    t.start()
    return True


@writes.post("/jobs", response_model=JobSubmitted, status_code=201, tags=["jobs"])
def submit_job(request: Request, spec: JobSpec,
               run: bool = Query(True, description="Start it in this server's embedded runner (else workers pick "
                                                   "it up)")):
    from ..jobs import status, submit

    store = store_of(request)
    ref = spec.dictionary
    if ref is not None and ("\x00" in ref or not ref.strip()):
        raise HTTPException(422, "dictionary: expected a dictionary name, key or cache folder")
    try:
        job_id = submit(store, spec)
    except (OSError, ValueError) as e:  # a "folder" the filesystem refuses to look at (name too long, …)
        field = "dictionary" if ref is not None else "extraction.corpus"
        raise HTTPException(400, f"{field}: not a usable path or store name ({type(e).__name__})")
    here = _start_runner(request, job_id) if run else False
    return {"job_id": job_id, "status": status(store, job_id).as_dict(), "running_here": here}


@writes.post("/jobs/{job_id}/cancel", response_model=JobStatusOut, tags=["jobs"])
def cancel_job(request: Request, job_id: int = IdParam()):
    from ..jobs import cancel, status

    store = store_of(request)
    cancel(store, job_id)
    return status(store, job_id).as_dict()


@writes.post("/jobs/{job_id}/resume", response_model=JobSubmitted, tags=["jobs"])
def resume_job(request: Request, job_id: int = IdParam(), body: Optional[ResumeRequest] = None, run: bool = Query(True)):
    from ..jobs import resume, status

    store = store_of(request)
    resume(store, job_id, None if body is None else body.budget_usd)
    here = _start_runner(request, job_id) if run else False
    return {"job_id": job_id, "status": status(store, job_id).as_dict(), "running_here": here}


@writes.post("/activations", response_model=ActivationsOut, tags=["model"])
def activations(request: Request, body: ActivationsRequest):
    """Which latents fire on this text: the subject model and dictionary run on it; per token, the top latents with
    their activations and best explanations."""
    store = store_of(request)
    d = lookup_dictionary(store, body.dictionary)
    out = runtime.activations(d, body.text, body.top_k, request.app.state.settings.device, store=store)
    labels = Q.explanation_texts(store, d["id"], [l["latent"] for t in out["tokens"] for l in t["latents"]])
    for t in out["tokens"]:
        for l in t["latents"]:
            l["explanation"] = labels.get(l["latent"])
    return out


@writes.post("/steer", response_model=SteerOut, tags=["model"])
def steer(request: Request, body: SteerRequest):
    """Greedy completions of a prompt with one or several latents edited at each strength: added along their
    decoder direction, clamped to a value, or ablated."""
    from ..scorers.intervention import steer_edit

    store = store_of(request)
    d = lookup_dictionary(store, body.dictionary)
    items = body.latents if body.latents is not None else [SteerEdit(latent=body.latent, value=body.value)]
    edits = [steer_edit(e.latent, e.mode or body.mode, e.value) for e in items]
    return runtime.steer(d, edits, body.prompt, body.strengths, body.max_new_tokens,
                         request.app.state.settings.device, store=store)


router.include_router(reads)
router.include_router(writes)
