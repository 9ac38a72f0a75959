"""Meta-dictionaries ("canonical units", Leask et al. 2025, "Sparse autoencoders do not find canonical units of
analysis"): a TopK dictionary trained on another dictionary's decoder rows. A meta-latent fires on the base latents
whose directions share a component, so it is read by the base latents it fires on (and their explanations), not by
token contexts.

    m = train_meta_dictionary("runs/sae/resid_post.15", n_latents=256, k=4, out_dir="runs/meta")
    meta, info = load_meta_dictionary(m.path)
    members = meta_members(meta, base_rows(load_dictionary(info["base"]["source"])), top=10)

On disk: train-sae's layout (`<out>/<folder>/cfg.json` + `sae.safetensors`, sparsify format, so every loader reads
it) plus `meta.json` beside them naming the base dictionary and the training settings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from autointerp.dictionaries import Dictionary, as_units, load_dictionary
from autointerp.errors import ConfigError
from autointerp.lru import LRU
from autointerp.train_sae import TopKSAE, train_topk_sae

SIDECAR = "meta.json"
KIND = "meta-dictionary"


def base_rows(base: Dictionary) -> Tensor:
    """The rows a meta-dictionary is trained on and encodes: the base's decoder directions per stored unit (a signed
    dictionary's "+" poles, then its "-" poles with the negated rows, as the store numbers them), each scaled to unit
    norm so a meta-latent's activation measures direction, not a base latent's scale. Zero rows stay zero (they
    fire nothing). float32 [n_units, d]."""
    rows = as_units(base).decoder_directions().detach().float().cpu()
    return _unit(rows)


def _unit(rows: Tensor) -> Tensor:
    if rows.ndim != 2 or not rows.is_floating_point():
        raise ConfigError(f"decoder rows must be a float tensor [N, d], got {tuple(rows.shape)} {rows.dtype}")
    norm = rows.float().norm(dim=1, keepdim=True)
    return torch.where(norm > 0, rows.float() / norm.clamp(min=torch.finfo(torch.float32).tiny), 0.0)


@dataclass
class MetaResult:
    path: Path  # the checkpoint folder (cfg.json, sae.safetensors, meta.json)
    fvu: float  # of the unit rows, final weights
    dead_fraction: float  # meta-latents that fire on no base row
    steps: int
    info: dict  # the sidecar's content
    model: TopKSAE = field(repr=False)


def _source(base: Dictionary | str | Path) -> tuple[Dictionary, str]:
    """(the dictionary, how to load it again from anywhere: a local path made absolute, a hub id as given)."""
    d = base if isinstance(base, Dictionary) else load_dictionary(base)
    src = str(base) if not isinstance(base, Dictionary) else d.source
    p = Path(src).expanduser()
    return d, str(p.resolve()) if p.exists() else src


def train_meta_dictionary(
    base: Dictionary | str | Path,
    n_latents: int,
    k: int,
    *,
    out_dir: str | Path,
    folder: str | None = None,
    steps: int = 2000,
    lr: float | None = None,
    batch_size: int = 256,
    k_start: int | None = None,
    seed: int = 0,
    num_threads: int | None = None,
    progress: bool = False,
) -> MetaResult:
    """Train a TopK meta-dictionary on `base`'s unit decoder rows (see `base_rows`) with train_topk_sae and write it
    to `out_dir/folder` (default: the base's hookpoint, else "decoder") with its sidecar.

    Two settings differ from an activation SAE, both needed to find planted directions reliably (tests/test_meta.py):
    no decoder bias (a learned offset absorbs what unit rows share, and the latents then fit around it), and k
    annealed from `k_start` (default 4k, at most n_latents) down to k over the first half of the steps."""
    d, source = _source(base)
    rows = base_rows(d)
    if n_latents < 1 or not 1 <= k <= n_latents:
        raise ConfigError(f"meta-dictionary: need 1 <= k <= n_latents, got k={k}, n_latents={n_latents}")
    if rows.shape[0] < 2:
        raise ConfigError(f"{d.id}: {rows.shape[0]} decoder row(s); a meta-dictionary needs at least 2")
    folder = folder or (d.hookpoint or "decoder").replace("/", ".")
    k_start = min(n_latents, 4 * k) if k_start is None else k_start
    r = train_topk_sae(rows, n_latents, k, out_dir=out_dir, hookpoint=folder, steps=steps, lr=lr,
                       batch_size=batch_size, seed=seed, num_threads=num_threads, progress=progress,
                       decoder_bias=False, k_start=k_start)
    info = {
        "kind": KIND,
        "base": {"source": source, "id": d.id, "format": d.format, "hookpoint": d.hookpoint,
                 "n_latents": d.n_latents, "signed": bool(d.signed), "n_units": int(rows.shape[0]),
                 "d": int(rows.shape[1])},
        "rows": "unit-norm decoder rows of the base's units (a signed base: '+' poles, then '-' poles)",
        "n_latents": n_latents, "k": k,
        "training": {"steps": r.steps, "lr": lr, "batch_size": batch_size, "k_start": k_start, "seed": seed,
                     "decoder_bias": False, "fvu": r.fvu, "dead_fraction": r.dead_fraction},
    }
    (r.path / SIDECAR).write_text(json.dumps(info, indent=1))
    return MetaResult(path=r.path, fvu=r.fvu, dead_fraction=r.dead_fraction, steps=r.steps, info=info, model=r.model)


def read_sidecar(path: str | Path) -> dict:
    """The sidecar of a meta-dictionary folder (or of the single checkpoint folder below `path`)."""
    p = Path(path).expanduser()
    found = [p / SIDECAR] if (p / SIDECAR).is_file() else sorted(p.glob(f"*/{SIDECAR}")) if p.is_dir() else []
    if len(found) != 1:
        what = "no such folder" if not p.is_dir() else (f"{len(found)} meta-dictionaries below it; name one" if found
                                                          else f"no {SIDECAR} (not made by train-sae --on-decoder)")
        raise ConfigError(f"{path}: {what}")
    try:
        info = json.loads(found[0].read_text())
    except ValueError as e:
        raise ConfigError(f"{found[0]}: not JSON ({e})") from None
    if not isinstance(info, dict) or info.get("kind") != KIND or not isinstance(info.get("base"), dict):
        raise ConfigError(f"{found[0]}: not a meta-dictionary sidecar (expected kind {KIND!r} and a base)")
    info["path"] = str(found[0].parent)
    return info


def load_meta_dictionary(path: str | Path) -> tuple[Dictionary, dict]:
    """(the meta-dictionary, its sidecar) from the folder train_meta_dictionary wrote (or its parent)."""
    info = read_sidecar(path)
    return load_dictionary(info["path"]), info


@torch.no_grad()
def meta_members(meta: Dictionary | TopKSAE, base_decoder_rows: Tensor, top: int | None = None
                 ) -> list[list[tuple[int, float]]]:
    """For each meta-latent, the base rows (units) it fires on as (base unit, activation), largest first; at most
    `top` of them when given. The rows are scaled to unit norm first, as in training (see `base_rows`)."""
    if top is not None and top < 1:
        raise ConfigError(f"meta_members: top must be >= 1, got {top}")
    rows = _unit(base_decoder_rows)
    n_meta = int(meta.n_latents if isinstance(meta, Dictionary) else meta.W_dec.shape[0])
    chunk = max(1, (64 << 20) // (4 * n_meta))  # dense codes [chunk, n_meta] of at most 64 MiB at once
    metas, bases, acts = [], [], []
    for lo in range(0, rows.shape[0], chunk):
        codes = meta.encode(rows[lo:lo + chunk])
        b, m = torch.nonzero(codes > 0, as_tuple=True)
        metas.append(m.numpy())
        bases.append((b + lo).numpy())
        acts.append(codes[b, m].float().numpy())
    m, b, a = (np.concatenate(x) if x else np.zeros(0) for x in (metas, bases, acts))
    order = np.lexsort((b, -a, m))  # by meta-latent, then activation (largest first), then base index
    m, b, a = m[order], b[order], a[order]
    bounds = np.searchsorted(m, np.arange(n_meta + 1))
    out = []
    for j in range(n_meta):
        lo, hi = int(bounds[j]), int(bounds[j + 1])
        hi = hi if top is None else min(hi, lo + top)
        out.append([(int(i), float(v)) for i, v in zip(b[lo:hi], a[lo:hi])])
    return out


# ----------------------------------------------------------------------------------------- the store (read only)


def store_dictionary_for(store, base_info: dict, ref: str | None = None) -> dict:
    """The store's row of the base dictionary: `ref` (a name, key or id) when given, else the one extracted from the
    base checkpoint (same checkpoint id; the same hookpoint when it was extracted at several)."""
    if ref is not None:
        return store.dictionary(ref)
    rows = [d for d in store.dictionaries() if d["dictionary_id"] == base_info["id"]]
    if len(rows) > 1 and base_info.get("hookpoint"):
        rows = [d for d in rows if d["hookpoint"] == base_info["hookpoint"]] or rows
    if len(rows) != 1:
        what = ("is not in the store (extract it, or name the store's dictionary)" if not rows else
                f"is in the store {len(rows)} times ({', '.join(d['name'] for d in rows[:5])}); name one")
        raise ConfigError(f"base dictionary {base_info['id']} {what}")
    return rows[0]


def unit_explanations(store, dictionary_pk: int, units, explainer: str | None = None) -> dict[int, str]:
    """Unit -> explanation text: the newest of `explainer`'s, or by default the newest that is not a baseline
    (random, token_frequency)."""
    from autointerp.exports import BASELINES

    best: dict[int, dict] = {}
    wanted = sorted(set(units))
    expls = [e for lo in range(0, len(wanted), 500)  # a bounded IN list per query
             for e in store.explanations(dictionary_pk, latents=wanted[lo:lo + 500], with_text=True)]
    for e in expls:
        if (e["explainer"] != explainer) if explainer is not None else (e["explainer"] in BASELINES):
            continue
        if e["latent"] not in best or e["id"] > best[e["latent"]]["id"]:
            best[e["latent"]] = e
    return {i: e["text"] for i, e in best.items()}


def save_meta_analysis(store, base_pk: int, meta_path, info: dict, every: list[list[tuple[int, float]]],
                       top: int = 50) -> int:
    """Store a meta-dictionary's member lists as an analysis (kind "meta") of its base dictionary: its page lists,
    per meta-latent, the base latents it fires on with their explanations (read when the page is shown)."""
    from .store.analyses import save_analysis

    rows = [{"meta_latent": j, "n_members": len(m), "members": [[int(i), round(float(a), 4)] for i, a in m[:top]]}
            for j, m in enumerate(every)]
    alive = [r for r in rows if r["n_members"]]
    summary = {"meta_latents": len(rows), "alive": len(alive),
               "mean_members": sum(r["n_members"] for r in alive) / max(1, len(alive)), "k": info.get("k")}
    params = {"meta": str(meta_path), "base": info.get("base"), "n_latents": info.get("n_latents"),
              "k": info.get("k"), "top": top}
    return save_analysis(store, "meta", base_pk, f"meta-dictionary {Path(str(meta_path)).name} "
                         f"({len(rows)} x k={info.get('k')})", params, summary, {"rows": rows})


# ------------------------------------------------------------- a meta-dictionary in the store, explained by jobs

EXPLAIN_SHOWN = 15  # explained members the explainer sees (every other one, strongest first) ...
TEST_SHOWN = 15  # ... and held out for the embedding scorer, with as many non-members


def register_meta_dictionary(store, base: dict, meta_path, info: dict, every: list[list[tuple[int, float]]],
                             analysis_id: int, n_units: int) -> dict:
    """Register the meta-dictionary as a store dictionary of its own, beside its member-list analysis: a job then
    explains its latents (explainer `meta`) from their base latents' explanations, and its pages list them. The
    hookpoint reads `meta:<base name>` (it encodes decoder rows, not activations); names follow the one slug rule."""
    from .names import dictionary_name
    from .store.analyses import register_meta_dictionary as register

    hookpoint = f"meta:{base['name']}"
    meta_id = str(Path(str(meta_path)).expanduser().resolve())
    n_meta = len(every)
    acts = [np.asarray([a for _, a in m], np.float64) for m in every]
    manifest = {"model": base.get("subject_model") or _subject_name(store, base), "hookpoint": hookpoint,
                "dictionary": {"id": meta_id, "n_latents": n_meta, "format": KIND, "source": meta_id,
                               "d_in": int((info.get("base") or {}).get("d") or base.get("d_in") or 0)},
                "meta": {"base_pk": int(base["id"]), "base_key": base["key"], "base_name": base["name"],
                         "analysis_id": int(analysis_id), "n_units": int(n_units), "k": info.get("k")}}
    row = {"key": f"{meta_id}@{hookpoint}", "name": dictionary_name(meta_id, hookpoint), "dictionary_id": meta_id,
           "hookpoint": hookpoint, "format": KIND, "source": meta_id, "n_latents": n_meta,
           "d_in": manifest["dictionary"]["d_in"], "n_tokens": 0, "ctx_len": 0, "cache_path": None,
           "n_alive": sum(1 for m in every if m), "manifest": manifest, "examples_in_store": False,
           "signed": False, "quality": None}
    latents = [{"index": j, "n_active": len(every[j]), "frequency": len(every[j]) / max(1, n_units),
                "max_act": float(a.max()) if a.size else 0.0, "mean_act": float(a.mean()) if a.size else 0.0,
                "hist": None, "heads": None, "top_head": None} for j, a in enumerate(acts)]
    return register(store, row, int(base["subject_model_id"]), latents)


def _subject_name(store, base: dict) -> str:
    return next(d["subject_model"] for d in store.dictionaries() if d["id"] == base["id"])


META_EXPLAINERS = ("meta", "random")  # what reads member lists (random: another meta-latent's explanation)
META_SCORERS = ("embedding",)  # the scorers that read member lists (the judges read token examples)


def meta_spec(spec, dictionary: dict):
    """A job spec as it runs on a meta-dictionary: explainer `default` means `meta` (the kind that reads member
    lists); another token explainer, or a scorer that reads token examples, fails with one line saying what works."""
    name = dictionary["name"]
    if spec.explainer == "default":
        spec = spec.model_copy(update={"explainer": "meta"})
    if spec.explainer not in META_EXPLAINERS:
        raise ConfigError(f"dictionary {name} is a meta-dictionary: explainer {spec.explainer!r} reads token "
                          f"examples; use one of {', '.join(META_EXPLAINERS)}")
    bad = [s for s in spec.scorers if s not in META_SCORERS]
    if bad:
        raise ConfigError(f"dictionary {name} is a meta-dictionary: scorer(s) {', '.join(bad)} read token examples; "
                          f"use --scorers {','.join(META_SCORERS)} (or none)")
    return spec


@dataclass
class MetaRecord:
    """What the job seam reads for one meta-latent: its explained base latents, strongest first, split into what
    the explainer sees and what the embedding scorer tests on (disjoint), plus explained base latents it does not
    fire on (the scorer's negatives)."""

    members_only: ClassVar[bool] = True  # what explainers and scorers test: no token windows here
    latent: int
    n_members: int
    explain: list[dict]  # {"unit", "label", "activation", "explanation"}
    test: list[dict]
    negatives: list[dict]


_MEMBER_LISTS = LRU(8)


def member_lists(store, analysis_id: int) -> dict[int, tuple[int, list[tuple[int, float]]]]:
    """meta-latent -> (its member count, its stored members [(base unit, activation)], strongest first), from the
    analysis `meta-members --save` stored (kept per process: an analysis never changes)."""
    from .store.analyses import analysis

    def read():
        rows = (analysis(store, analysis_id).get("result") or {}).get("rows") or []
        return {int(r["meta_latent"]): (int(r["n_members"]), [(int(u), float(a)) for u, a in r["members"]])
                for r in rows}
    return _MEMBER_LISTS.get((store.url, int(analysis_id)), read)


def latent_members(store, dictionary: dict, latent: int) -> dict:
    """A registered meta-latent's page data: its base dictionary and the base latents it fires on (stored ones,
    strongest first) with their newest explanations."""
    meta = dictionary["manifest"]["meta"]
    n, members = member_lists(store, meta["analysis_id"]).get(int(latent), (0, []))
    base = store.dictionary(meta["base_pk"])
    texts = unit_explanations(store, base["id"], [u for u, _ in members])
    from .units import unit_label

    return {"base_dictionary": base["name"], "base_dictionary_pk": base["id"], "n_members": n, "analysis_id":
            meta["analysis_id"], "members": [{"unit": u, "label": unit_label(u, base["n_latents"], base["signed"]),
                                              "activation": round(a, 4), "explanation": texts.get(u)}
                                             for u, a in members]}


class MetaSource:
    """A registered meta-dictionary's latents for the job seam (what a cache is to a token dictionary). Member lists
    come from its analysis; the base latents' explanations are read from the store once (the newest non-baseline
    explanation of each). Negatives are drawn per (seed, latent) from the explained base latents outside the stored
    member list (a meta-latent with more members than the analysis kept may draw a weak member: it can only lower
    the score)."""

    def __init__(self, store, dictionary: dict, seed: int = 0):
        self.manifest = dictionary["manifest"]
        self.meta = self.manifest["meta"]
        self.seed = int(seed)
        self.path = None
        self.members = member_lists(store, self.meta["analysis_id"])
        base = store.dictionary(self.meta["base_pk"])
        self.base_n, self.base_signed = int(base["n_latents"]), bool(base.get("signed"))
        self.texts = unit_explanations(store, base["id"], range(self.base_n))
        self.explained = np.asarray(sorted(self.texts), np.int64)

    def attach_tokenizer(self, tokenizer) -> None:  # nothing here is tokens
        pass

    def _entry(self, unit: int, act: float | None) -> dict:
        from .units import unit_label

        return {"unit": unit, "label": unit_label(unit, self.base_n, self.base_signed),
                "activation": None if act is None else round(act, 4), "explanation": self.texts[unit]}

    def record(self, latent: int) -> MetaRecord:
        from .sampling import rng_for

        n, members = self.members.get(int(latent), (0, []))
        shown = [self._entry(u, a) for u, a in members if u in self.texts]
        explain, test = shown[0::2][:EXPLAIN_SHOWN], shown[1::2][:TEST_SHOWN]
        outside = self.explained[~np.isin(self.explained, [u for u, _ in members])]
        rng = rng_for(self.seed, int(latent), "meta-negatives")
        picked = rng.choice(outside, size=min(len(test), len(outside)), replace=False) if len(outside) else []
        return MetaRecord(int(latent), n, explain, test, [self._entry(int(u), None) for u in sorted(picked)])
