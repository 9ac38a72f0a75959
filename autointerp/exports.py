"""Exports of the store in other tools' formats, and the import of delphi result folders.

Neuronpedia dataset layout (what its `export-data.py` writes and its importer reads):

    {out}/{modelId}/{source}/features/batch-N.jsonl.gz       one row per latent ("Neuron" table fields)
    {out}/{modelId}/{source}/explanations/batch-N.jsonl.gz   one row per explanation ("Explanation" table fields)
    {out}/{modelId}/{source}/activations/batch-N.jsonl.gz    one row per context ("Activation" table fields)

with its field names (modelId, layer = the source id, index as text, maxActApprox, frac_nonzero,
freq_hist_data_bar_heights/values, description, explanationModelName, tokens, values, maxValue, minValue,
maxValueTokenIndex, binMin, binMax, …), N batches of 1024 latents. Our scores have no place there; they travel in
`{source}/autointerp_scores/batch-N.jsonl.gz` beside it (Neuronpedia's importer ignores unknown folders).

delphi result folders (what `python -m delphi` writes and its log/result_analysis.py reads):

    {out}/explanations/{module}_latent{i}.txt           the explanation as a JSON string
    {out}/scores/{scorer}/{module}_latent{i}.txt        a JSON list of per-example records: str_tokens,
                                                        activations, distance, activating, prediction,
                                                        probability, correct
    {out}/run_config.json                               (ours: the models and prompt versions)

`module` is the hookpoint as delphi/sparsify name it (`layers.N` for resid_post.N, `layers.N.mlp` for mlp_out.N);
delphi's `fuzz` scorer is our `fuzzing`.

Parquet: `latents.parquet`, `explanations.parquet`, `scores.parquet` (metrics as JSON text), one dictionary each.
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
from sqlalchemy import select

from .errors import ConfigError
from .names import slug
from .store import Store, headline
from .store.store import T_LATENT
from .units import unit_pole

NP_BATCH = 1024
BASELINES = ("random", "token_frequency")
DELPHI_SCORER = {"fuzzing": "fuzz"}
FROM_DELPHI_SCORER = {"fuzz": "fuzzing"}


def neuronpedia_ids(store: Store, d: dict) -> tuple[str, str]:
    """(modelId, source id) Neuronpedia-style: the subject model's short name, and "{layer}-{dictionary name}"."""
    subject = next((x["subject_model"] for x in store.dictionaries() if x["id"] == d["id"]), "model")
    model = slug(subject.split("::")[-1].split(":")[-1].rstrip("/").split("/")[-1].removesuffix(".gguf")).lower()
    m = re.search(r"(\d+)", d["hookpoint"])
    source = slug(f"{m.group(1)}-{d['name']}" if m else d["name"]).lower()
    return model, source


def delphi_module(hookpoint: str) -> str:
    """The hookpoint as delphi (sparsify) names modules."""
    m = re.fullmatch(r"(resid_post|mlp_out|attn_out)\.(\d+)", hookpoint)
    if m:
        return {"resid_post": "layers.{}", "mlp_out": "layers.{}.mlp", "attn_out": "layers.{}.self_attn"}[
            m.group(1)].format(m.group(2))
    return hookpoint


def hookpoint_from_delphi(module: str) -> str:
    m = re.fullmatch(r"layers\.(\d+)(\.mlp|\.self_attn)?", module)
    if m:
        return {None: "resid_post", ".mlp": "mlp_out", ".self_attn": "attn_out"}[m.group(2)] + f".{m.group(1)}"
    return module


def _latents(store: Store, dictionary_pk: int) -> Iterator[dict]:
    with store.tx() as conn:
        for r in conn.execute(select(T_LATENT).where(T_LATENT.c.dictionary_pk == dictionary_pk)
                              .order_by(T_LATENT.c.index)).mappings():
            yield dict(r)


def _explanations(store: Store, dictionary_pk: int) -> list[dict]:
    return store.explanations(dictionary_pk, with_text=True)


def _scores_by_expl(store: Store, ids: Iterable[int]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for s in store.scores(list(ids)):
        out.setdefault(s["explanation_id"], []).append(s)
    return out


class _Batches:
    """Rows into batch-N.jsonl.gz files, a new file every `size` latents (by latent index)."""

    def __init__(self, folder: Path, size: int):
        self.folder, self.size = folder, size
        folder.mkdir(parents=True, exist_ok=True)
        self.n, self.f = -1, None

    def write(self, latent: int, row: dict) -> None:
        b = latent // self.size
        if b != self.n:
            self.close()
            self.n = b
            self.f = gzip.open(self.folder / f"batch-{b}.jsonl.gz", "wt", encoding="utf-8", compresslevel=5)
        self.f.write(json.dumps(row, default=str) + "\n")

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None


def _bin_centers(edges: np.ndarray) -> list[float]:
    return [float(x) for x in np.sqrt(edges[:-1] * edges[1:])]


def export_neuronpedia(store: Store, dictionary: int | str, out: str | Path, *, model_id: str | None = None,
                       source_id: str | None = None, n_top: int = 20, n_per_quantile: int = 5,
                       batch_size: int = NP_BATCH) -> Path:
    """Write the dictionary in Neuronpedia's dataset layout under `out`; returns `out/{modelId}/{source}`."""
    from .store.examples import latent_examples

    d = store.dictionary(dictionary)
    mid, sid = neuronpedia_ids(store, d)
    mid, sid = model_id or mid, source_id or sid
    root = Path(out) / mid / sid
    expls = _explanations(store, d["id"])
    by_latent: dict[int, list[dict]] = {}
    for e in expls:
        by_latent.setdefault(e["latent"], []).append(e)
    scores = _scores_by_expl(store, [e["id"] for e in expls])
    from .store.examples import open_cache
    from .cache import hist_edges

    cache = open_cache(d, store)
    cache_edges = cache.hist_edges if cache is not None else None
    feats, exps, acts, scs = (_Batches(root / k, batch_size) for k in ("features", "explanations", "activations",
                                                                       "autointerp_scores"))
    try:
        for lat in _latents(store, d["id"]):
            i = lat["index"]
            hist = lat["hist"] or []
            edges = cache_edges if cache_edges is not None and len(cache_edges) == len(hist) + 1 else \
                hist_edges(max(1, len(hist)))
            nz = [j for j, c in enumerate(hist) if c]
            feats.write(i, {
                "modelId": mid, "layer": sid, "index": str(i), "maxActApprox": lat["max_act"], "creatorId": None,
                "frac_nonzero": lat["frequency"],
                "freq_hist_data_bar_heights": [hist[j] for j in nz],
                "freq_hist_data_bar_values": [_bin_centers(edges)[j] for j in nz] if nz else [],
                "logits_hist_data_bar_heights": [], "logits_hist_data_bar_values": [],
                "neuron_alignment_indices": [], "neuron_alignment_l1": [], "neuron_alignment_values": [],
                "correlated_neurons_indices": [], "correlated_neurons_l1": [], "correlated_neurons_pearson": [],
                "decoder_weights_dist": [], "neg_str": [], "neg_values": [], "pos_str": [], "pos_values": [],
                "sourceSetName": sid.split("-", 1)[-1], "topkCosSimIndices": [], "topkCosSimValues": [],
                "vector": [], "vectorLabel": None, "hookName": d["hookpoint"], "vectorDefaultSteerStrength": None,
                "hasVector": False})
            for e in by_latent.get(i, []):
                exps.write(i, {"id": f"{mid}@{sid}@{i}@{e['id']}", "modelId": mid, "layer": sid, "index": str(i),
                               "authorId": None, "description": e["text"], "embedding": None,
                               "typeName": f"autointerp-{e['explainer']}", "explanationModelName": e["model"] or None,
                               "umap_x": None, "umap_y": None, "umap_cluster": None,
                               "umap_log_feature_sparsity": None})
                for s in scores.get(e["id"], []):
                    scs.write(i, {"explanationId": f"{mid}@{sid}@{i}@{e['id']}", "modelId": mid, "layer": sid,
                                  "index": str(i), "scorer": s["scorer"], "value": s["value"],
                                  "metrics": s["metrics"] or {}, "judgeModel": s["model"],
                                  "promptVersion": s["prompt_version"]})
            if lat["n_active"]:
                ex = latent_examples(d, i, n_top=n_top, per_quantile=n_per_quantile)
                if ex is None:
                    continue
                rows = [(None, None, x) for x in ex["top"]] + [(q["lo"], q["hi"], x) for q in ex["quantiles"]
                                                                for x in q["examples"]]
                for k, (lo, hi, x) in enumerate(rows):
                    v = x["acts"]
                    acts.write(i, {"id": f"{mid}@{sid}@{i}@a{k}", "modelId": mid, "layer": sid, "index": str(i),
                                   "creatorId": None, "dataSource": None, "tokens": x["tokens"],
                                   "maxValue": max(v), "minValue": min(v), "values": v,
                                   "maxValueTokenIndex": int(np.argmax(v)), "dfaValues": [], "dfaMaxValue": None,
                                   "dfaTargetIndex": None, "binContains": None if lo is None else 1.0,
                                   "binMin": -1 if lo is None else lo, "binMax": -1 if hi is None else hi})
    finally:
        for b in (feats, exps, acts, scs):
            b.close()
    return root


def read_jsonl_gz(folder: str | Path) -> list[dict]:
    """Every row of a folder's batch-N.jsonl.gz files, in batch order."""
    files = sorted(Path(folder).glob("batch-*.jsonl.gz"), key=lambda p: int(p.name.split("-")[1].split(".")[0]))
    rows = []
    for f in files:
        with gzip.open(f, "rt", encoding="utf-8") as fh:
            rows += [json.loads(line) for line in fh if line.strip()]
    return rows


# ----------------------------------------------------------------------------------------------------- delphi


def _best_per_latent(expls: list[dict], explainer: str | None) -> dict[int, dict]:
    best: dict[int, dict] = {}
    for e in expls:
        if explainer is not None and e["explainer"] != explainer:
            continue
        if explainer is None and e["explainer"] in BASELINES:
            continue
        prev = best.get(e["latent"])
        if prev is None or e["id"] > prev["id"]:
            best[e["latent"]] = e
    return best


def export_delphi(store: Store, dictionary: int | str, out: str | Path, *, explainer: str | None = None) -> Path:
    """A delphi result folder for one dictionary (one explanation per latent: the newest LLM one, or those of
    `explainer`); per-example score records with their tokens and activations when the extraction cache is here."""
    from .store.examples import open_cache
    from .tokens import decoder_for

    d = store.dictionary(dictionary)
    out = Path(out)
    module = delphi_module(d["hookpoint"])
    (out / "explanations").mkdir(parents=True, exist_ok=True)
    best = _best_per_latent(_explanations(store, d["id"]), explainer)
    scores = _scores_by_expl(store, [e["id"] for e in best.values()])
    cache = open_cache(d, store)
    decode = decoder_for(cache.manifest["model"]) if cache is not None else None
    models, prompts = set(), set()
    for i, e in sorted(best.items()):
        name = f"{module}_latent{i}.txt"
        (out / "explanations" / name).write_bytes(json.dumps(e["text"]).encode())
        models.add(e["model"])
        prompts.add(e["prompt_version"])
        known = _kept_acts(cache, i) if cache is not None else {}
        for s in scores.get(e["id"], []):
            folder = out / "scores" / DELPHI_SCORER.get(s["scorer"], s["scorer"])
            folder.mkdir(parents=True, exist_ok=True)
            records = _delphi_records(s, cache, decode, known)
            (folder / name).write_text(json.dumps(records))
    poles = {"poles": {"n_units": d["n_latents"], "rule": "latent<i> for i < n_units/2 is latent i's + pole, "
                                                          "else latent i - n_units/2's - pole"}} if d.get("signed") else {}
    (out / "run_config.json").write_text(json.dumps({
        "exported_by": "autointerp", "dictionary": d["name"], "dictionary_id": d["dictionary_id"],
        "hookpoints": [module], "explainer_model": sorted(m for m in models if m)[:1] or [None],
        "explainer_models": sorted(models), "prompt_versions": sorted(prompts), **poles}, indent=1))
    return out


def _kept_acts(cache, latent: int) -> dict[int, np.ndarray]:
    out = {}
    for buf in ("top", "sample"):
        rows, acts = cache.kept(buf, latent)
        for r, a in zip(rows, acts):
            out[int(r)] = a
    return out


def _delphi_records(score: dict, cache, decode, known: dict[int, np.ndarray]) -> list[dict]:
    det = score["details"] or {}
    examples = det.get("examples")
    if not isinstance(examples, list):  # not a classification scorer: its metrics, as one record
        return [{"metrics": score["metrics"] or {}, "value": score["value"]}]
    out = []
    for x in examples:
        w = x.get("window_id")
        toks: list[str] = []
        acts: list[float] = []
        if cache is not None and isinstance(w, int) and 0 <= w < cache.n_windows_stored:
            ids = cache.windows([w])[0].tolist()
            toks = decode(ids)
            a = known.get(w)
            acts = [round(float(v), 4) for v in a] if a is not None else [0.0] * len(toks)
        label, pred = x.get("label"), x.get("pred")
        out.append({"str_tokens": toks, "activations": acts,
                    "distance": x.get("quantile", -1) if label else -1, "activating": bool(label),
                    "prediction": None if pred is None else bool(pred), "probability": x.get("prob"),
                    "correct": None if pred is None else bool(pred) == bool(label), "window_id": w})
    return out


_LATENT_FILE = re.compile(r"^(?P<module>.+)_latent(?P<i>\d+)\.txt$")


def _metrics_from_records(scorer: str, records: Any) -> tuple[dict, dict]:
    """(metrics, details) from a delphi score file's records."""
    from .metrics import binary_metrics

    if not isinstance(records, list):
        raise ValueError("expected a JSON list of records")
    cls = [r for r in records if isinstance(r, dict) and "activating" in r]
    if cls:
        ok = [r for r in cls if r.get("prediction") is not None]
        y = [int(bool(r["activating"])) for r in ok]
        p = [int(bool(r["prediction"]) if not isinstance(r["prediction"], (int, float)) else r["prediction"] >= 0.5)
             for r in ok]
        probs = [r.get("probability") for r in ok]
        have = bool(ok) and all(isinstance(v, (int, float)) for v in probs)
        m = binary_metrics(y, p, probs if have else None)
        m["n"], m["n_failed"] = len(cls), len(cls) - len(ok)
        ex = [{"window_id": r.get("window_id"), "label": int(bool(r["activating"])),
               "quantile": r.get("distance", -1), "pred": None if r.get("prediction") is None
               else int(bool(r["prediction"])), "prob": r.get("probability"),
               "text": "".join(r.get("str_tokens") or [])[:2000]} for r in cls]
        return m, {"examples": ex, "source": "delphi"}
    sim = [r for r in records if isinstance(r, dict) and "ev_correlation_score" in r]
    if sim:
        vals = [r["ev_correlation_score"] for r in sim if isinstance(r.get("ev_correlation_score"), (int, float))]
        return {"pearson_r": float(np.mean(vals)) if vals else None}, {"source": "delphi", "n": len(sim)}
    return {}, {"source": "delphi", "records": records[:50]}


def import_delphi(store: Store, folder: str | Path, dictionary: str, *, explainer_model: str | None = None,
                  module: str | None = None) -> dict[str, int]:
    """Import a delphi result folder (explanations/ and scores/) into the store, as explanations of `dictionary`
    (a store name/key or a cache folder, registered when new); all rows or none, importing twice adds nothing.
    `module` picks one hookpoint's files when the run covered several (default: the files of the dictionary's
    hookpoint, or the only module present)."""
    from .jobs.runner import ensure_dictionary
    from .names import digest

    folder = Path(folder)
    ex_dir = folder / "explanations"
    if not ex_dir.is_dir():
        raise ConfigError(f"{folder}: not a delphi result folder (explanations/ missing)")
    d = ensure_dictionary(store, dictionary)
    cfg = {}
    if (folder / "run_config.json").is_file():
        try:
            cfg = json.loads((folder / "run_config.json").read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{folder / 'run_config.json'}: invalid JSON ({e.msg})") from None
    model = explainer_model or cfg.get("explainer_model") or ""
    if isinstance(model, list):
        model = model[0] if model else ""
    files = {}
    for f in sorted(ex_dir.iterdir()):
        m = _LATENT_FILE.match(f.name)
        if m:
            files.setdefault(m.group("module"), []).append((int(m.group("i")), f))
    if not files:
        raise ConfigError(f"{ex_dir}: no explanation files named MODULE_latentN.txt")
    if module is None:
        mine = [k for k in files if hookpoint_from_delphi(k) == d["hookpoint"] or k == d["hookpoint"]]
        if len(mine) == 1:
            module = mine[0]
        elif len(files) == 1:
            module = next(iter(files))
        else:
            raise ConfigError(f"{folder}: explanations of several modules ({', '.join(sorted(files))}); pick one "
                              "with module=")
    if module not in files:
        raise ConfigError(f"{folder}: no explanations of module {module!r} (has {', '.join(sorted(files))})")
    run_key = {"delphi": [folder.resolve().name, model]}
    ekey = digest({"imported-delphi": run_key})
    counts = {"explanations": 0, "scores": 0}
    score_dirs = [p for p in sorted((folder / "scores").iterdir()) if p.is_dir()] if (folder / "scores").is_dir() \
        else []
    with store.tx(write=True) as conn:
        for i, f in files[module]:
            if not 0 <= i < d["n_latents"]:
                raise ConfigError(f"{f}: latent {i} out of range (dictionary {d['name']} has {d['n_latents']})")
            raw = f.read_bytes()
            try:
                text = json.loads(raw)
            except json.JSONDecodeError:
                text = raw.decode("utf-8", "replace").strip()
            if isinstance(text, dict):
                text = text.get("explanation") or json.dumps(text)
            if not isinstance(text, str):
                raise ConfigError(f"{f}: expected an explanation string")
            eid = store.insert_explanation(conn, {
                "dictionary_pk": d["id"], "latent": i, "explain_key": ekey, "explainer": "delphi", "model": model,
                "prompt_version": "delphi", "seed": 0, "text": text, "skipped": None, "parsed": True,
                "examples_used": [], "usage": {}, "cost_usd": 0.0})
            counts["explanations"] += 1
            for sd in score_dirs:
                sf = sd / f.name
                if not sf.is_file():
                    continue
                scorer = FROM_DELPHI_SCORER.get(sd.name, sd.name)
                try:
                    metrics, details = _metrics_from_records(scorer, json.loads(sf.read_bytes()))
                except (json.JSONDecodeError, ValueError) as e:
                    raise ConfigError(f"{sf}: not a delphi score file ({e})") from None
                store.insert_score(conn, {
                    "explanation_id": eid, "score_key": digest({"imported-delphi": [run_key, scorer]}),
                    "scorer": scorer, "model": model, "prompt_version": "delphi", "seed": 0,
                    "value": headline(scorer, metrics), "metrics": metrics, "details": details, "skipped": None,
                    "usage": {}, "cost_usd": 0.0})
                counts["scores"] += 1
    return counts


# ----------------------------------------------------------------------------------------------------- parquet


def _pole_columns(d: dict, units: list[int]) -> dict:
    """A signed dictionary's tables name each unit's latent and pole (unsigned ones' tables stay as they were)."""
    if not d.get("signed"):
        return {}
    got = [unit_pole(u, d["n_latents"], True) for u in units]
    return {"base_latent": [g[0] for g in got], "pole": [g[1] for g in got]}


def export_parquet(store: Store, dictionary: int | str, out: str | Path) -> Path:
    """latents.parquet, explanations.parquet, scores.parquet of one dictionary under `out`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = store.dictionary(dictionary)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lat = list(_latents(store, d["id"]))
    poles = _pole_columns(d, [r["index"] for r in lat])
    pq.write_table(pa.table({
        "dictionary": [d["name"]] * len(lat), "latent": [r["index"] for r in lat], **poles,
        "n_active": [r["n_active"] for r in lat], "frequency": [r["frequency"] for r in lat],
        "max_act": [r["max_act"] for r in lat], "mean_act": [r["mean_act"] for r in lat],
        "hist": pa.array([r["hist"] for r in lat], type=pa.list_(pa.int64()))}), out / "latents.parquet")
    ex = store.explanations(d["id"])
    pq.write_table(pa.table({
        "explanation_id": pa.array([e["id"] for e in ex], pa.int64()),
        "latent": pa.array([e["latent"] for e in ex], pa.int64()), **_pole_columns(d, [e["latent"] for e in ex]),
        "text": pa.array([e["text"] for e in ex], pa.string()),
        "explainer": pa.array([e["explainer"] for e in ex], pa.string()),
        "model": pa.array([e["model"] for e in ex], pa.string()),
        "prompt_version": pa.array([e["prompt_version"] for e in ex], pa.string()),
        "seed": pa.array([e["seed"] for e in ex], pa.int64()),
        "skipped": pa.array([e["skipped"] for e in ex], pa.string()),
        "cost_usd": pa.array([float(e["cost_usd"] or 0) for e in ex], pa.float64()),
        "created": pa.array([e["created"] for e in ex], pa.timestamp("us"))}), out / "explanations.parquet")
    by = {e["id"]: e for e in ex}
    sc = store.scores(by)
    pq.write_table(pa.table({
        "score_id": pa.array([s["id"] for s in sc], pa.int64()),
        "explanation_id": pa.array([s["explanation_id"] for s in sc], pa.int64()),
        "latent": pa.array([by[s["explanation_id"]]["latent"] for s in sc], pa.int64()),
        "scorer": pa.array([s["scorer"] for s in sc], pa.string()),
        "value": pa.array([s["value"] for s in sc], pa.float64()),
        "metrics": pa.array([json.dumps(s["metrics"] or {}) for s in sc], pa.string()),
        "model": pa.array([s["model"] for s in sc], pa.string()),
        "prompt_version": pa.array([s["prompt_version"] for s in sc], pa.string()),
        "skipped": pa.array([s["skipped"] for s in sc], pa.string()),
        "cost_usd": pa.array([float(s["cost_usd"] or 0) for s in sc], pa.float64())}), out / "scores.parquet")
    return out


__all__ = ["export_neuronpedia", "export_delphi", "import_delphi", "export_parquet", "read_jsonl_gz",
           "delphi_module", "hookpoint_from_delphi", "neuronpedia_ids"]
